"""DICOM reading, series grouping, geometry checks and volume assembly.

Import nothing heavy here: ``medpipe ingest`` must start fast.
"""

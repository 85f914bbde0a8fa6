"""DICOM reading, series grouping, geometry checks and volume assembly; DICOM outputs.

Reading: ``header``, ``series``, ``geometry``, ``volume``. Between volumes and source frames:
``frames``. Writing results back: ``seg``, ``sr``, ``pmap``, ``sc`` (highdicom, imported only
there), sharing ``output`` and ``uids``.

Import nothing heavy here: ``medpipe ingest`` must start fast.
"""

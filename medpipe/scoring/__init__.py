"""Scoring DICOM exports with a trained model package: ``medpipe score`` and the ``score`` stage."""

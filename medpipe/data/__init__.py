"""Datasets, transforms and samplers on MONAI (imports torch / MONAI: never from ``medpipe ingest``)."""

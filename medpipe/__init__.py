"""medpipe: DICOM-native medical imaging pipelines built on MONAI."""

__version__ = "0.1.0"

"""Write the synthetic study as DICOM: single-frame MR Image Storage files and a SEG.

Every value that ends up in a file (UIDs, dates, times) is a function of the generator's
inputs, so the same inputs give byte-identical files. Files are written atomically.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, MRImageStorage

from medpipe.dicom.uids import derive_uid
from medpipe.io import atomic_path
from medpipe.sample.grid import AXIAL_ORIENTATION, Grid

log = logging.getLogger(__name__)

MANUFACTURER = "medpipe"
MODEL_NAME = "medpipe synthetic brain MR phantom"
#: Bumped whenever the generated content changes (it is part of every UID).
#: 2: UIDs are ``2.25`` UIDs from medpipe.dicom.uids; the SEG is written by medpipe.dicom.seg.
GENERATOR_VERSION = "2"
_UID_NAMESPACE = "medpipe.sample.brain_tumor"


def make_uid(*parts: object) -> str:
    """A deterministic UID from the generator namespace, its version and ``parts`` (see :func:`derive_uid`)."""
    return derive_uid(_UID_NAMESPACE, GENERATOR_VERSION, *parts)


@dataclass(frozen=True)
class StudyHeader:
    """Patient and study level attributes shared by all series of one case."""

    patient_name: str
    patient_id: str
    patient_birth_date: str
    patient_sex: str
    patient_age: str
    study_uid: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    frame_of_reference_uid: str
    study_description: str = "Synthetic brain MR (medpipe sample data)"


@dataclass(frozen=True)
class MRProtocol:
    """Acquisition parameters written into the MR Image module."""

    description: str
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    repetition_time: float
    echo_time: float
    echo_train_length: int
    flip_angle: float
    inversion_time: float | None = None
    contrast_agent: str | None = None
    sequence_name: str = ""


PROTOCOLS: dict[str, MRProtocol] = {
    "T1": MRProtocol("T1", ("SE",), ("SK", "SP"), 500.0, 10.0, 3, 90.0, sequence_name="tse2d1_3"),
    "T2": MRProtocol("T2", ("SE",), ("SK", "SP"), 4000.0, 100.0, 15, 150.0, sequence_name="tse2d1_15"),
    "FLAIR": MRProtocol(
        "FLAIR", ("SE", "IR"), ("SK", "SP", "MP"), 9000.0, 120.0, 20, 150.0,
        inversion_time=2500.0, sequence_name="tir2d1_20",
    ),
    "T1c": MRProtocol(
        "T1c", ("SE",), ("SK", "SP"), 500.0, 10.0, 3, 90.0,
        contrast_agent="GADOLINIUM", sequence_name="tse2d1_3",
    ),
}


def _common_dataset(study: StudyHeader, model_name: str = MODEL_NAME,
                    software_versions: str = f"brain_tumor {GENERATOR_VERSION}") -> Dataset:
    """Patient, General Study, Frame of Reference and General Equipment attributes."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.patient_birth_date
    ds.PatientSex = study.patient_sex
    ds.PatientAge = study.patient_age
    ds.StudyInstanceUID = study.study_uid
    ds.StudyDate = study.study_date
    ds.StudyTime = study.study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = study.study_id
    ds.AccessionNumber = study.accession_number
    ds.StudyDescription = study.study_description
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = "medpipe synthetic data"
    ds.ManufacturerModelName = model_name
    ds.SoftwareVersions = software_versions
    ds.DeviceSerialNumber = "0"
    return ds


def _window(pixels: np.ndarray) -> tuple[int, int]:
    """A display window (centre, width) covering the head's signal."""
    head = pixels[pixels > 0.05 * float(pixels.max())]
    high = float(np.percentile(head, 99.5)) if head.size else float(pixels.max() or 1)
    return int(round(high / 2)), max(int(round(high)), 2)


def slice_from_template(template: Dataset, sop_instance_uid: str, number: int) -> Dataset:
    """A fresh single-frame dataset sharing ``template``'s (never mutated) elements, with its own file meta
    (the template's SOP class, Explicit VR Little Endian), SOP Instance UID and InstanceNumber ``number``."""
    sl = Dataset()
    sl.update(template)
    sl.file_meta = FileMetaDataset()
    sl.file_meta.MediaStorageSOPClassUID = template.SOPClassUID
    sl.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    sl.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sl.SOPInstanceUID = sop_instance_uid
    sl.InstanceNumber = number
    return sl


def write_mr_series(
    directory: Path,
    pixels: np.ndarray,
    grid: Grid,
    study: StudyHeader,
    protocol: MRProtocol,
    series_number: int,
    series_uid: str,
    series_time: str,
    uid_key: Sequence[object],
) -> list[Dataset]:
    """Write one file per slice as ``directory/IM0001.dcm``...; return their headers.

    ``pixels`` is ``(slices, rows, columns)`` uint16 with 12 bits used; slice 0 is the most
    inferior. SOP Instance UIDs derive from ``uid_key`` and the slice index.
    """
    if pixels.shape != grid.shape or pixels.dtype != np.uint16:
        raise ValueError(f"expected uint16 pixels of shape {grid.shape}, got {pixels.dtype} {pixels.shape}")
    ds = _common_dataset(study)
    # General Series
    ds.Modality = "MR"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = protocol.description
    ds.SeriesDate = study.study_date
    ds.SeriesTime = series_time
    ds.ProtocolName = f"Brain {protocol.description} axial"
    ds.BodyPartExamined = "BRAIN"
    ds.PatientPosition = "HFS"
    # General Image / General Acquisition
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.AcquisitionNumber = 1
    ds.AcquisitionDate = study.study_date
    ds.AcquisitionTime = series_time
    ds.ContentDate = study.study_date
    ds.ContentTime = series_time
    ds.ImagesInAcquisition = grid.slices
    ds.ImageComments = "Synthetic image generated by medpipe; not from a patient."
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    # Contrast/Bolus (present only when contrast was given)
    if protocol.contrast_agent is not None:
        ds.ContrastBolusAgent = protocol.contrast_agent
        ds.ContrastBolusRoute = "IV"
    # MR Image
    ds.ScanningSequence = list(protocol.scanning_sequence)
    ds.SequenceVariant = list(protocol.sequence_variant)
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = protocol.sequence_name
    ds.AngioFlag = "N"
    ds.RepetitionTime = protocol.repetition_time
    ds.EchoTime = protocol.echo_time
    ds.EchoTrainLength = protocol.echo_train_length
    if protocol.inversion_time is not None:
        ds.InversionTime = protocol.inversion_time
    ds.NumberOfAverages = 1
    ds.ImagingFrequency = 123.2
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = 1
    ds.MagneticFieldStrength = 3
    ds.FlipAngle = protocol.flip_angle
    ds.AcquisitionMatrix = [0, grid.matrix, grid.matrix, 0]
    ds.InPlanePhaseEncodingDirection = "ROW"
    ds.PercentSampling = 100
    ds.PercentPhaseFieldOfView = 100
    ds.ReceiveCoilName = "HEAD"
    # Image Plane
    ds.PixelSpacing = [grid.pixel_spacing, grid.pixel_spacing]
    ds.ImageOrientationPatient = list(AXIAL_ORIENTATION)
    ds.SliceThickness = grid.slice_thickness
    ds.SpacingBetweenSlices = grid.spacing_between_slices
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = grid.matrix
    ds.Columns = grid.matrix
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    # VOI LUT
    center, width = _window(pixels)
    ds.WindowCenter = center
    ds.WindowWidth = width
    # SOP Common
    ds.SOPClassUID = MRImageStorage
    ds.InstanceCreationDate = study.study_date
    ds.InstanceCreationTime = series_time

    directory.mkdir(parents=True, exist_ok=True)
    width_digits = max(4, len(str(grid.slices)))
    written: list[Dataset] = []
    for i in range(grid.slices):
        sl = slice_from_template(ds, make_uid(*uid_key, "slice", i), i + 1)
        position = grid.slice_position(i)
        sl.ImagePositionPatient = [round(v, 4) for v in position]
        sl.SliceLocation = round(position[2], 4)
        frame = np.ascontiguousarray(pixels[i], dtype="<u2")
        sl.SmallestImagePixelValue = int(frame.min())
        sl.LargestImagePixelValue = int(frame.max())
        sl.PixelData = frame.tobytes()
        target = directory / f"IM{i + 1:0{width_digits}d}.dcm"
        with atomic_path(target) as tmp:
            pydicom.dcmwrite(tmp, sl, enforce_file_format=True)
        del sl.PixelData
        written.append(sl)
    log.debug("wrote %d slices of %s to %s", grid.slices, protocol.description, directory)
    return written


#: (segment label, tumour label value in the phantom, SNOMED CT property type keyword, RGB colour)
SEGMENTS: tuple[tuple[str, int, str, tuple[int, int, int]], ...] = (
    ("Necrotic core", 1, "Necrosis", (255, 64, 64)),
    ("Edema", 2, "Edema", (64, 160, 255)),
    ("Enhancing tumor", 3, "Neoplasm", (255, 220, 0)),
)


def write_seg(
    target: Path,
    source_images: Sequence[Dataset],
    labels: np.ndarray,
    study: StudyHeader,
    series_uid: str,
    sop_uid: str,
    series_time: str,
    uid_key: Sequence[object],
) -> None:
    """Write the tumour labels as a BINARY DICOM Segmentation referencing ``source_images``.

    ``labels`` is ``(slices, rows, columns)`` with values 0-3 (BraTS convention), slice ``i``
    lying on ``source_images[i]``. An all-zero ``labels`` gives a valid SEG whose three
    segments are empty (all frames are kept then). Written by :func:`medpipe.dicom.seg.write_seg`.
    """
    from pydicom.sr.codedict import codes

    from medpipe.dicom.output import AlgorithmSpec, Equipment, OutputIdentity
    from medpipe.dicom.seg import SegmentSpec
    from medpipe.dicom.seg import write_seg as write_dicom_seg

    algorithm = AlgorithmSpec(
        name="medpipe synthetic brain tumour phantom",
        # The labels are the model that generated the image; of the CID 7162 families,
        # "Deformable Models" (randomly perturbed ellipsoids) describes it best.
        family=codes.cid7162.DeformableModels,
        version=GENERATOR_VERSION,
        source=MANUFACTURER,
    )
    segments = [
        SegmentSpec(
            label=name,
            category=codes.SCT.MorphologicallyAbnormalStructure,
            type=getattr(codes.SCT, keyword),
            anatomic_region=codes.SCT.Brain,
            color=rgb,
            tracking_id=name,
            tracking_uid=make_uid(*uid_key, "segment", number),
        )
        for number, (name, _, keyword, rgb) in enumerate(SEGMENTS, start=1)
    ]
    identity = OutputIdentity(
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        series_number=100,
        created=dt.datetime.strptime(study.study_date + series_time, "%Y%m%d%H%M%S"),
        series_description="SEG tumor ground truth",
    )
    equipment = Equipment(
        manufacturer=MANUFACTURER, model_name=MODEL_NAME, software_versions=f"brain_tumor {GENERATOR_VERSION}",
        device_serial_number="0", institution_name="medpipe synthetic data",
    )
    per_segment = np.zeros(labels.shape, dtype=np.uint8)  # label map with value n = segment n
    for number, (_, value, _, _) in enumerate(SEGMENTS, start=1):
        per_segment[labels == value] = number
    write_dicom_seg(
        target, source_images, per_segment, segments, algorithm, identity, equipment=equipment,
        content_label="TUMOR", content_description="Ground truth of the synthetic tumour",
    )

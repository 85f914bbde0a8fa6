"""Fixtures and helpers of the PACS tests: a private network, a real Orthanc, node files, sample studies.

The fixtures (``private_network``, ``pacs_sample``, ``orthanc``) reach every test module through
``pytest_plugins`` in ``tests/conftest.py``.
The tests skip with the reason where Orthanc is not installed or a network namespace cannot be made;
with ``MEDPIPE_REQUIRE_ORTHANC=1`` (set by ``.ci/run``) they fail instead, so CI never skips them.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml

from tests.dicom_factory import Geometry, RLELossless, pattern, write_series
from tests.orthanc_server import LOOPBACK, Orthanc, PrivateNetwork, free_port, why_no_orthanc

OUR_AET = "MEDPIPE"


def _require() -> None:
    reason = why_no_orthanc()
    if reason is None:
        return
    if os.environ.get("MEDPIPE_REQUIRE_ORTHANC") == "1":
        pytest.fail(f"MEDPIPE_REQUIRE_ORTHANC=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def private_network() -> Iterator[PrivateNetwork]:
    """This test module's thread in a loopback-only network namespace (left again at the end)."""
    _require()
    with PrivateNetwork() as net:
        yield net


@dataclass
class Sample:
    """What the PACS tests upload: one synthetic brain MR study (4 series + SEG) and one RLE CT series."""

    files: list[Path]
    mr_study: str
    mr_patient: str
    ct_study: str
    ct_patient: str
    ct_series: str
    ct_files: list[Path]

    def by_sop(self) -> dict[str, Path]:
        return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in self.files}


def make_sample(folder: Path) -> Sample:
    from medpipe.sample.brain_tumor import generate_brain_tumor

    infos = generate_brain_tumor(folder / "mr", cases=1, seed=3, tumor_fraction=1.0, matrix=48, pixel_spacing=4.2, slices=12,
                                 slice_thickness=10.0)
    mr_files = sorted((folder / "mr").rglob("*.dcm"))
    ct = write_series(folder / "ct", pattern((24, 20, 10), seed=5, noise=200), Geometry(), modality="CT",
                      transfer_syntax=RLELossless, patient_id="CTPAT01", tag="ct", seed=5,
                      extra={"BodyPartExamined": "ABDOMEN"})
    ct_files = sorted((folder / "ct").rglob("*.dcm"))
    first = pydicom.dcmread(mr_files[0], stop_before_pixels=True)
    del infos
    return Sample(mr_files + ct_files, str(first.StudyInstanceUID), str(first.PatientID), ct.study_uid,
                  "CTPAT01", ct.series_uid, ct_files)


@pytest.fixture(scope="module")
def pacs_sample(tmp_path_factory: pytest.TempPathFactory) -> Sample:
    return make_sample(tmp_path_factory.mktemp("sample"))


@pytest.fixture(scope="module")
def orthanc(private_network: PrivateNetwork, tmp_path_factory: pytest.TempPathFactory, pacs_sample: Sample
            ) -> Iterator[Orthanc]:
    """A real Orthanc on loopback that knows MEDPIPE (at a free port), with the sample uploaded."""
    o = Orthanc(tmp_path_factory.mktemp("orthanc"), modalities={"medpipe": (OUR_AET, free_port())}).start()
    try:
        o.upload(pacs_sample.files)
        yield o
    finally:
        o.stop()


def node_settings(o: Orthanc, **overrides: Any) -> dict[str, Any]:
    aet, port = o.modalities.get("medpipe", (OUR_AET, free_port()))
    settings: dict[str, Any] = {
        "ae_title": o.aet, "host": LOOPBACK, "port": o.dicom_port, "our_ae_title": aet, "our_port": port,
        "bind": LOOPBACK, "dicomweb": o.dicomweb_url, "timeout": 10, "retries": 1, "retry_delay": 0.2,
    }
    settings.update(overrides)
    return {k: v for k, v in settings.items() if v is not None}


def write_nodes(path: Path, nodes: dict[str, dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"nodes": nodes}, sort_keys=False))
    return path


def dataset_bytes(data: bytes) -> bytes:
    """A Part 10 file's data set (everything after the file meta group), as stored."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    fh = io.BytesIO(data)
    read_preamble(fh, False)
    _read_file_meta_info(fh)
    return data[fh.tell():]


def transfer_syntax(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)

"""medpipe against a real Orthanc (Debian packages), in a private loopback-only network namespace.

Echo, find, pull by C-MOVE, C-GET and WADO-RS (the pulled files equal the uploaded ones), resume,
push of a SEG and SR by C-STORE and STOW-RS, ``pacs://`` sources for ingest and score, ``score --push``.
The failure paths are in ``test_pacs_failures.py``, the listener in ``test_pacs_listener.py``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from medpipe.cli import app
from medpipe.pacs.nodes import nodes_from_dict
from medpipe.pacs.pull import pull
from medpipe.pacs.push import push
from medpipe.pacs.query import StudyQuery
from tests.orthanc_server import Orthanc
from tests.pacs_support import Sample, dataset_bytes, node_settings, transfer_syntax, write_nodes
from tests.scoring_helpers import tiny_segmenter_package

runner = CliRunner()


@pytest.fixture(scope="module")
def node_file(orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_nodes(tmp_path_factory.mktemp("nodes") / "pacs.yaml", {"orthanc": node_settings(orthanc)})


def _node(orthanc: Orthanc, **overrides: object):  # type: ignore[no-untyped-def]
    return nodes_from_dict({"nodes": {"orthanc": node_settings(orthanc, **overrides)}}).get("orthanc")


def _invoke(*args: str) -> object:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def test_echo_dimse_and_dicomweb(node_file: Path) -> None:
    result = _invoke("pacs", "echo", "orthanc", "--pacs", str(node_file))
    out = result.output  # type: ignore[attr-defined]
    assert "C-ECHO MEDPIPE -> ORTHANC" in out and "QIDO-RS" in out and out.count(": ok") == 2


@pytest.mark.parametrize("via", ["dimse", "dicomweb"])
def test_find_studies_and_series(node_file: Path, pacs_sample: Sample, via: str) -> None:
    out = _invoke("pacs", "find", "orthanc", "--pacs", str(node_file), "--modality", "MR", "--csv", "-",
                  "--via", via).output  # type: ignore[attr-defined]
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["StudyInstanceUID"] for r in rows] == [pacs_sample.mr_study]
    assert rows[0]["PatientID"] == pacs_sample.mr_patient and rows[0]["NumberOfStudyRelatedSeries"] == "5"

    out = _invoke("pacs", "find", "orthanc", "--pacs", str(node_file), "--patient-id", pacs_sample.ct_patient,
                  "--series", "--csv", "-", "--via", via).output  # type: ignore[attr-defined]
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["SeriesInstanceUID"], r["Modality"], r["NumberOfSeriesRelatedInstances"]) for r in rows] == \
        [(pacs_sample.ct_series, "CT", str(len(pacs_sample.ct_files)))]

    # a date range that excludes everything, and the table output
    out = _invoke("pacs", "find", "orthanc", "--pacs", str(node_file), "--study-date", "19900101-19901231",
                  "--via", via).output  # type: ignore[attr-defined]
    assert "0 studies" in out


def _assert_same_files(pulled: Path, pacs_sample: Sample, *, whole_file: bool) -> int:
    originals = pacs_sample.by_sop()
    files = sorted(p for p in pulled.rglob("*.dcm"))
    assert files and not [p for p in pulled.rglob("*") if p.is_file() and p.suffix != ".dcm"]
    for p in files:
        sop = p.stem
        original = originals[sop].read_bytes()
        got = p.read_bytes()
        if whole_file:
            assert got == original, p
        else:  # DIMSE carries the data set; the file meta header is the receiver's
            assert dataset_bytes(got) == dataset_bytes(original), p
            assert transfer_syntax(p) == transfer_syntax(originals[sop])
    return len(files)


@pytest.mark.parametrize(("method", "bind"), [("move", None), ("move", "127.0.0.1"), ("get", None), ("wado", None)])
def test_pull_equals_upload_and_resumes(orthanc: Orthanc, pacs_sample: Sample, tmp_path: Path, method: str,
                                        bind: str | None) -> None:
    """engine auto: C-MOVE by dcmtk (movescu + storescp) where installed, by pynetdicom with a bind address
    (storescp has none); C-GET by pynetdicom (test_pacs_dcmtk.py: getscu)."""
    node = _node(orthanc, bind=bind)
    query = StudyQuery(study_uids=(pacs_sample.mr_study, pacs_sample.ct_study))
    report = pull(node, query, tmp_path, methods=(method,))
    assert report.expected == len(pacs_sample.files) and report.received == len(pacs_sample.files)
    assert report.by_method == {method: len(pacs_sample.files)}
    assert _assert_same_files(tmp_path, pacs_sample, whole_file=method == "wado") == len(pacs_sample.files)
    # the RLE CT arrived in RLE (no transcoding on the way)
    assert {transfer_syntax(p) for p in (tmp_path / pacs_sample.ct_study).rglob("*.dcm")} == {"1.2.840.10008.1.2.5"}

    # resume: files already there are not asked for again; missing ones (IMAGE level) are
    again = pull(node, query, tmp_path, methods=(method,))
    assert (again.already, again.received) == (len(pacs_sample.files), 0)
    ct_files = sorted((tmp_path / pacs_sample.ct_study).rglob("*.dcm"))
    for p in ct_files[:3]:
        p.unlink()
    (ct_files[4].parent / f".medpipe-tmp.abc.tmp.{ct_files[4].name}").write_bytes(b"half a file")  # a killed run's leftover
    third = pull(node, query, tmp_path, methods=(method,))
    assert (third.already, third.received) == (len(pacs_sample.files) - 3, 3)
    assert _assert_same_files(tmp_path, pacs_sample, whole_file=method == "wado") == len(pacs_sample.files)


def test_pull_cli_by_query(node_file: Path, pacs_sample: Sample, tmp_path: Path) -> None:
    out = _invoke("pacs", "pull", "orthanc", "--pacs", str(node_file), "--modality", "MR", "--out",
                  str(tmp_path)).output  # type: ignore[attr-defined]
    mr = [f for f in pacs_sample.files if f not in pacs_sample.ct_files]
    seg = [f for f in mr if pydicom.dcmread(f, stop_before_pixels=True).Modality == "SEG"]
    assert "1 study, 4 series" in out and "C-MOVE" in out  # only the MR series of the MR study
    assert len(list(tmp_path.rglob("*.dcm"))) == len(mr) - len(seg)


def test_ingest_and_score_from_pacs_url_then_push(node_file: Path, orthanc: Orthanc, pacs_sample: Sample,
                                                  tmp_path: Path) -> None:
    url = f"pacs://orthanc?PatientID={pacs_sample.ct_patient}&via=get"
    out = _invoke("ingest", url, "--out", str(tmp_path / "ingested"), "--pacs", str(node_file)).output  # type: ignore[attr-defined]
    assert f"pulled {len(pacs_sample.ct_files)} new instance(s)" in out
    with open(tmp_path / "ingested" / "manifest.csv", newline="") as fh:
        volumes = list(csv.DictReader(fh))
    assert [(v["series_uid"], v["status"]) for v in volumes] == [(pacs_sample.ct_series, "ok")]

    model = tiny_segmenter_package(tmp_path / "model", bias=1.0)
    scored = tmp_path / "scored"
    _invoke("score", f"pacs://orthanc?StudyInstanceUID={pacs_sample.ct_study}", "--model", str(model.path), "--out",
            str(scored), "--pacs", str(node_file), "--push", "orthanc", "--device", "cpu", "--quiet")
    results = sorted((scored / "results").rglob("*.dcm"))
    assert {p.name for p in results} == {"seg.dcm", "sr.dcm"}
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in results}
    assert set(uids) <= orthanc.sop_instance_uids()
    for sop, p in uids.items():  # what Orthanc stores is what medpipe wrote
        assert dataset_bytes(orthanc.instance_file(sop)) == dataset_bytes(p.read_bytes())

    # scoring again with --push sends nothing twice
    again = _invoke("score", f"pacs://orthanc?StudyInstanceUID={pacs_sample.ct_study}", "--model", str(model.path),
                    "--out", str(scored), "--pacs", str(node_file), "--push", "orthanc", "--device", "cpu")
    assert "pushed to orthanc: 0 file(s) stored" in again.output  # type: ignore[attr-defined]

    # STOW-RS: remove them from Orthanc, push over DICOMweb, find them again
    for sop in uids:
        ids = orthanc.rest("POST", "/tools/lookup", sop.encode(), "text/plain")
        orthanc.rest("DELETE", f"/instances/{ids[0]['ID']}")
    assert not set(uids) & orthanc.sop_instance_uids()
    report = push(_node(orthanc), list(uids.values()), via="dicomweb")
    assert [r.status for r in report.results] == ["ok", "ok"], [r.detail for r in report.results]
    assert set(uids) <= orthanc.sop_instance_uids()
    for sop, p in uids.items():
        assert orthanc.instance_file(sop) == p.read_bytes()  # STOW-RS carries the whole file


def test_ingest_deidentified_from_pacs_keeps_the_pull_out_of_out(node_file: Path, orthanc: Orthanc,
                                                                   pacs_sample: Sample, tmp_path: Path) -> None:
    at_pacs = orthanc.rest("POST", "/tools/find", {"Level": "Instance", "Query": {"PatientID": pacs_sample.ct_patient}})
    out = tmp_path / "deid"
    _invoke("ingest", f"pacs://orthanc?PatientID={pacs_sample.ct_patient}", "--out", str(out), "--pacs", str(node_file),
            "--deidentify", "--key", str(tmp_path / "key.json"), "--quiet")
    pulled = sorted((tmp_path / "deid.pacs" / "orthanc").rglob("*.dcm"))
    assert len(pulled) == len(at_pacs) >= len(pacs_sample.ct_files) and not (out / "pacs").exists()
    with open(out / "manifest.csv", newline="") as fh:
        volumes = list(csv.DictReader(fh))
    assert len(volumes) == 1 and volumes[0]["patient_id"] != pacs_sample.ct_patient  # a pseudonym
    assert pacs_sample.ct_patient not in (out / "manifest.csv").read_text()


def test_push_cli_dimse(node_file: Path, orthanc: Orthanc, tmp_path: Path) -> None:
    from tests.dicom_factory import pattern, write_series

    w = write_series(tmp_path / "new", pattern((8, 8, 3), seed=9), patient_id="PUSHED", tag="push", seed=9)
    (tmp_path / "new" / "preview.png").write_bytes(b"\x89PNG not DICOM")  # in a folder: not pushed
    out = _invoke("pacs", "push", "orthanc", str(tmp_path / "new"), "--pacs", str(node_file)).output  # type: ignore[attr-defined]
    assert "3 file(s) to orthanc by C-STORE: 3 stored" in out
    assert set(w.sop_uids.values()) <= orthanc.sop_instance_uids()
    named = runner.invoke(app, ["pacs", "push", "orthanc", str(tmp_path / "new" / "preview.png"), "--pacs",
                                str(node_file)])  # named explicitly: reported
    assert named.exit_code == 2 and "not a readable DICOM file" in named.output


def test_pipeline_score_stage_with_pacs_source(node_file: Path, pacs_sample: Sample, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A YAML pipeline's score stage takes a pacs:// source as `medpipe score` does: pulled into the stage folder."""
    import yaml

    from medpipe.config import load_pipeline
    from medpipe.errors import ConfigError
    from medpipe.runner import run_pipeline

    monkeypatch.chdir(tmp_path)
    model = tiny_segmenter_package(tmp_path / "model", bias=1.0)
    url = f"pacs://orthanc?StudyInstanceUID={pacs_sample.ct_study}&via=get"
    doc = {"name": "pacs_score", "device": "cpu",
           "stages": [{"stage": "score", "source": url, "pacs": str(node_file), "model": str(model.path)}]}
    pipeline_file = tmp_path / "pipeline.yaml"
    pipeline_file.write_text(yaml.safe_dump(doc, sort_keys=False))
    summary = run_pipeline(load_pipeline(pipeline_file), tmp_path / "run")
    stage_dir = tmp_path / "run" / "stages" / "00_score"
    pulled = {p.stem for p in (stage_dir / "pacs" / "orthanc").rglob("*.dcm")}
    ct = {u for u, f in pacs_sample.by_sop().items() if f in pacs_sample.ct_files}
    assert ct <= pulled  # (with results an earlier test of this module pushed into the study)
    assert summary.metrics["pacs_pulled"] == summary.metrics["pacs_instances"] == len(pulled)
    assert summary.metrics["scored"] == 1
    with open(stage_dir / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["study_uid"], r["status"]) for r in rows] == [(pacs_sample.ct_study, "ok")]
    assert {p.name for p in (stage_dir / "results").rglob("*.dcm")} == {"seg.dcm", "sr.dcm"}

    # a bad query is a validation error naming the stage, the field and the line, before anything runs
    doc["stages"][0]["source"] = "pacs://orthanc?Modalty=CT"
    pipeline_file.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(ConfigError, match=r"stages\[0\] \(score\).*unknown query key 'Modalty' \(did you mean "
                                          r"'Modality'\?\).*line"):
        load_pipeline(pipeline_file)

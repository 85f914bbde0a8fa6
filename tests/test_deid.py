"""``medpipe deid``: PS3.15 Table E.1-1 as data, no PHI left, valid objects, keyed and reproducible pseudonyms.

Checked on the real vendor-shaped files of the ``deid-data`` package and on a generated sample with PHI
planted everywhere (top level, nested sequences, private tags, free text). The leak check
(:mod:`medpipe.deid.audit`) picks identifying values by what they are, not by the table, and scans
every byte of every output file.
"""

from __future__ import annotations

import csv
import json
import os
import stat
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from medpipe.deid.audit import identifying_values, leaks
from medpipe.deid.engine import Deidentifier
from medpipe.deid.keys import DeidKey
from medpipe.deid.run import DeidSettings, deidentify
from medpipe.deid.table import ProfileOptions
from medpipe.errors import ConfigError
from medpipe.sample.brain_tumor import SEG_SOURCE_SERIES, SERIES_NUMBERS
from tests.deid_helpers import deid_data_folder, new_dciodvfy_errors, planted_sample, planted_values
from tests.dicom_checks import DCIODVFY, needs_dciodvfy

KEY = DeidKey(bytes(range(32)))
OTHER_KEY = DeidKey(bytes(range(1, 33)))


# -- whole exports ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deid_data_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("deid_data")
    settings = DeidSettings(key=root / "key", map=root / "map.json", allow_burned_in=True)
    report = deidentify(deid_data_folder(), root / "out", settings, workers=2)
    return root / "out", root / "map.json", {"report": report}


def _sources_by_uid(folder: Path) -> dict[str, tuple[Path, Dataset]]:
    out = {}
    for p in sorted(folder.rglob("*")):
        try:
            ds = pydicom.dcmread(p)
        except Exception:  # noqa: BLE001 - not DICOM
            continue
        out.setdefault(str(ds.SOPInstanceUID), (p, ds))
    return out


def test_deid_data_every_file_written_or_explained(deid_data_run: tuple[Path, Path, dict]) -> None:
    out, _, info = deid_data_run
    report = info["report"]
    n_sources = sum(1 for p in deid_data_folder().rglob("*") if p.is_file())
    assert report.n_files == n_sources
    with open(out / "rejected.csv", newline="") as fh:
        rejected = list(csv.DictReader(fh))
    dicoms = list(out.rglob("*.dcm"))
    assert len(dicoms) == report.written and report.written + len(rejected) == n_sources
    reasons = {r["reason"] for r in rejected}
    # README, __init__.py and the two cine zips are not DICOM; humans/ctbrain1 and 2 share a SOP Instance UID
    assert reasons <= {"not a DICOM file"} | {r for r in reasons if r.startswith("duplicate SOP Instance UID")}
    assert report.written == 12


def test_deid_data_no_phi_no_original_uid_same_pixels(deid_data_run: tuple[Path, Path, dict]) -> None:
    out, map_path, _ = deid_data_run
    sources = _sources_by_uid(deid_data_folder())
    uids = json.loads(map_path.read_text())["uids"]
    checked = 0
    for f in sorted(out.rglob("*.dcm")):
        ds = pydicom.dcmread(f)
        src_path, src = sources[uids[str(ds.SOPInstanceUID)]]
        values = identifying_values(src)
        assert len(values) >= 10, src_path
        assert leaks(f, values) == [], f"{src_path.name}: PHI left"
        assert ds.PixelData == src.PixelData, src_path.name  # byte for byte
        assert ds.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.PatientIdentityRemoved == "YES"
        checked += 1
    assert checked == 12
    # the reports are scanned too: nothing of the sources' names or paths
    all_values = set().union(*(identifying_values(ds) for _, ds in sources.values()))
    for report in ("rejected.csv", "deid.json", ".deid-journal.jsonl"):
        assert leaks(out / report, all_values) == []
        assert "dicom-cookies" not in (out / report).read_text() and "ctbrain" not in (out / report).read_text()


@needs_dciodvfy
def test_deid_data_no_new_dciodvfy_errors(deid_data_run: tuple[Path, Path, dict]) -> None:
    out, map_path, _ = deid_data_run
    sources = _sources_by_uid(deid_data_folder())
    uids = json.loads(map_path.read_text())["uids"]
    for f in sorted(out.rglob("*.dcm")):
        src_path, _ = sources[uids[str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)]]
        assert new_dciodvfy_errors(src_path, f) == [], src_path.name


def test_burned_in_text_is_quarantined_by_default(tmp_path: Path) -> None:
    report = deidentify(deid_data_folder(), tmp_path / "out", DeidSettings(key=tmp_path / "key"), workers=1)
    reasons = [r for _, r in report.rejected]
    assert sum("Burned In Annotation is YES" in r for r in reasons) == 2  # the grey-scale US and the multi-frame US
    assert sum("ultrasound image without Burned In Annotation NO" in r for r in reasons) == 1  # RGB US
    assert sum("secondary capture without Burned In Annotation NO" in r for r in reasons) == 9  # cookies, CT SCs
    assert report.written == 1  # the cat's DX says NO
    assert [p.parent.parent.parent.name for p in (tmp_path / "out").rglob("*.dcm")] != []


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("planted")
    return planted_sample(root, cases=3)


def _all_values(src: Path, free_text: bool = True) -> set[str]:
    values = planted_values()
    for f in src.rglob("*.dcm"):
        values |= identifying_values(pydicom.dcmread(f), free_text=free_text)
    return values


@pytest.mark.parametrize("profile", [[], ["retain-modified-dates", "clean-descriptors", "retain-patient-characteristics"]])
def test_planted_phi_is_gone_everywhere(planted: tuple[Path, dict], tmp_path: Path, profile: list[str]) -> None:
    src, _ = planted
    options = ProfileOptions.from_names(profile)
    report = deidentify(src, tmp_path / "out", DeidSettings(key=tmp_path / "k", map=tmp_path / "m.json",
                                                              options=options), workers=2)
    assert report.rejected == [] or {r for _, r in report.rejected} == {"not a DICOM file"}
    values = _all_values(src, free_text=not profile)
    found = {str(f.relative_to(tmp_path)): leaks(f, values) for f in (tmp_path / "out").rglob("*") if f.is_file()}
    assert {k: v for k, v in found.items() if v} == {}
    # the private map does hold them (that is its job), and it is 0600
    assert leaks(tmp_path / "m.json", {"MRN-884211"}) == ["MRN-884211"]
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o600
    # valid objects: no dciodvfy error that the source did not have (every SEG, three images)
    if DCIODVFY is not None:
        uids = json.loads((tmp_path / "m.json").read_text())["uids"]
        sources = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in src.rglob("*.dcm")}
        outputs = sorted((tmp_path / "out").rglob("*.dcm"))
        firsts = list({p.parent: p for p in outputs}.values())  # one file per series
        segs = [p for p in firsts if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG"]
        for p in segs + [p for p in firsts if p not in segs][:3]:
            source = sources[uids[str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)]]
            assert new_dciodvfy_errors(source, p) == [], source.relative_to(src)


def test_same_key_same_bytes_other_key_other_names(planted: tuple[Path, dict], tmp_path: Path) -> None:
    src, _ = planted
    (tmp_path / "key").write_text("medpipe-deid-key v1\n" + "ab" * 32 + "\n")
    a = deidentify(src, tmp_path / "a", DeidSettings(key=tmp_path / "key"), workers=2)
    b = deidentify(src, tmp_path / "b", DeidSettings(key=tmp_path / "key"), workers=1)
    files_a = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*.dcm")}
    files_b = {p.relative_to(tmp_path / "b"): p.read_bytes() for p in (tmp_path / "b").rglob("*.dcm")}
    assert a.written == b.written == len(files_a) and files_a == files_b
    (tmp_path / "key2").write_text("medpipe-deid-key v1\n" + "cd" * 32 + "\n")
    deidentify(src, tmp_path / "c", DeidSettings(key=tmp_path / "key2"), workers=2)
    uids_a = {str(pydicom.dcmread(p).SOPInstanceUID) for p in (tmp_path / "a").rglob("*.dcm")}
    uids_c = {str(pydicom.dcmread(p).SOPInstanceUID) for p in (tmp_path / "c").rglob("*.dcm")}
    assert len(uids_c) == len(uids_a) and not uids_a & uids_c
    assert {p.name for p in (tmp_path / "a").iterdir() if p.is_dir()}.isdisjoint(
        p.name for p in (tmp_path / "c").iterdir() if p.is_dir())  # other patient pseudonyms
    # the key never lands in an output
    secret = (tmp_path / "key").read_text().split()[-1]
    for p in (tmp_path / "a").rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            assert secret.encode() not in data and bytes.fromhex(secret) not in data


def test_seg_references_its_deidentified_series(planted: tuple[Path, dict], tmp_path: Path) -> None:
    src, _ = planted
    deidentify(src, tmp_path / "out", DeidSettings(key=tmp_path / "k"), workers=2)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in
              (pydicom.dcmread(p, stop_before_pixels=True) for p in (tmp_path / "out").rglob("*.dcm"))}
    segs = [ds for ds in by_uid.values() if ds.Modality == "SEG"]
    assert len(segs) == 3
    for seg in segs:
        ref_series = seg.ReferencedSeriesSequence[0]
        refs = [str(i.ReferencedSOPInstanceUID) for i in ref_series.ReferencedInstanceSequence]
        frame_refs = {str(src_item.ReferencedSOPInstanceUID)
                      for fg in seg.PerFrameFunctionalGroupsSequence
                      for der in fg.DerivationImageSequence for src_item in der.SourceImageSequence}
        assert refs and set(refs) | frame_refs <= set(by_uid)  # every reference resolves in the output
        for uid in refs:
            image = by_uid[uid]
            assert image.SeriesInstanceUID == ref_series.SeriesInstanceUID
            assert image.StudyInstanceUID == seg.StudyInstanceUID and image.PatientID == seg.PatientID
            assert image.FrameOfReferenceUID == seg.FrameOfReferenceUID
            assert image.SeriesNumber == SERIES_NUMBERS[SEG_SOURCE_SERIES]
    # SEG and images of one case sit in one study folder of the tree
    assert {p.parent.parent.name for p in (tmp_path / "out").rglob("*.dcm")} == {s.StudyInstanceUID for s in segs}


def test_modified_dates_one_shift_per_patient_across_studies(planted: tuple[Path, dict], tmp_path: Path) -> None:
    src, _ = planted  # cases 1 and 3 are two studies of the same planted patient
    originals: dict[str, tuple[str, str]] = {}  # SOP UID -> (study date, patient)
    for f in src.rglob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        originals[str(ds.SOPInstanceUID)] = (str(ds.StudyDate), str(ds.PatientID))
    settings = DeidSettings(key=tmp_path / "k", map=tmp_path / "m.json",
                            options=ProfileOptions(retain_modified_dates=True))
    deidentify(src, tmp_path / "out", settings, workers=2)
    uids = json.loads((tmp_path / "m.json").read_text())["uids"]
    import datetime as dt

    shifts: dict[str, set[int]] = {}
    studies: dict[str, set[str]] = {}
    for p in (tmp_path / "out").rglob("*.dcm"):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        date, patient = originals[uids[str(ds.SOPInstanceUID)]]
        days = (dt.datetime.strptime(str(ds.StudyDate), "%Y%m%d") - dt.datetime.strptime(date, "%Y%m%d")).days
        shifts.setdefault(patient, set()).add(days)
        studies.setdefault(patient, set()).add(str(ds.StudyInstanceUID))
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    assert len(shifts) == 2 and all(len(s) == 1 and next(iter(s)) < 0 for s in shifts.values())
    assert max(len(s) for s in studies.values()) == 2  # the shift held across the patient's two studies


def test_resume_after_an_interrupted_run(planted: tuple[Path, dict], tmp_path: Path) -> None:
    src, _ = planted
    settings = DeidSettings(key=tmp_path / "k")
    first = deidentify(src, tmp_path / "out", settings, workers=1)
    outputs = sorted((tmp_path / "out").rglob("*.dcm"))
    before = {p: p.read_bytes() for p in outputs}
    # as if killed: the last files never written and the journal cut mid-line
    for p in outputs[-5:]:
        p.unlink()
    journal = tmp_path / "out" / ".deid-journal.jsonl"
    lines = journal.read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    journal.write_text("\n".join(lines[:-10]) + "\n" + lines[-10][:17])
    # to do again: the 10 lost journal lines (incl. the cut one), the 5 deleted files (which of them overlap
    # depends on the random key's pseudonyms, hence the set), and anything not written last time
    redo = {e["ref"] for e in entries[-10:]}
    redo |= {e["ref"] for e in entries if e.get("out") and any(str(p).endswith(e["out"]) for p in outputs[-5:])}
    redo |= {e["ref"] for e in entries if e["status"] != "written"}
    again = deidentify(src, tmp_path / "out", settings, workers=1)
    assert again.n_done == len(redo) and len(redo) >= 10
    assert {p: p.read_bytes() for p in sorted((tmp_path / "out").rglob("*.dcm"))} == before
    assert again.written == first.written
    with pytest.raises(ConfigError, match="another key or profile"):
        deidentify(src, tmp_path / "out", DeidSettings(key=tmp_path / "other"), workers=1)


def test_key_and_map_must_stay_out_of_the_output(planted: tuple[Path, dict], tmp_path: Path) -> None:
    src, _ = planted
    with pytest.raises(ConfigError, match="key file must not be inside the output"):
        deidentify(src, tmp_path / "out", DeidSettings(key=tmp_path / "out" / "k"))
    with pytest.raises(ConfigError, match="map must not be inside the output"):
        deidentify(src, tmp_path / "out", DeidSettings(key=tmp_path / "k", map=tmp_path / "out" / "m.json"))


def test_patient_mapping_csv(planted: tuple[Path, dict], tmp_path: Path) -> None:
    src, _ = planted
    csv_path = tmp_path / "patients.csv"
    csv_path.write_text("PatientID,PseudonymID,PseudonymName\nMRN-884211,TRIAL-001,Trial^One\n")
    deidentify(src, tmp_path / "out", DeidSettings(key=tmp_path / "k", patients=csv_path), workers=2)
    ids = {str(pydicom.dcmread(p, stop_before_pixels=True).PatientID) for p in (tmp_path / "out").rglob("*.dcm")}
    assert "TRIAL-001" in ids and len(ids) == 2
    names = {str(pydicom.dcmread(p, stop_before_pixels=True).PatientName) for p in (tmp_path / "out" / "TRIAL-001").rglob("*.dcm")}
    assert names == {"Trial^One"}
    (tmp_path / "bad.csv").write_text("PatientID,Pseudo\n1,2\n")
    with pytest.raises(ConfigError, match="needs columns PatientID and PseudonymID"):
        deidentify(src, tmp_path / "out2", DeidSettings(key=tmp_path / "k", patients=tmp_path / "bad.csv"))


def test_zip_source(planted: tuple[Path, dict], tmp_path: Path) -> None:
    import zipfile

    src, _ = planted
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(src.rglob("*.dcm"))[:12]:
            zf.write(p, p.relative_to(src))
    report = deidentify(archive, tmp_path / "out", DeidSettings(key=tmp_path / "k"), workers=1)
    assert report.written == 12 and report.rejected == []


def test_cli_deid(planted: tuple[Path, dict], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medpipe.cli import app

    src, _ = planted
    result = CliRunner().invoke(app, ["deid", str(src), "--out", str(tmp_path / "out"), "--key", str(tmp_path / "k"),
                                      "--profile", "retain-modified-dates,clean-descriptors", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "written" in result.output and "MRN-884211" not in result.output
    summary = json.loads((tmp_path / "out" / "deid.json").read_text())
    assert summary["options"] == ["retain_modified_dates", "clean_descriptors"] and summary["state"] == "complete"
    bad = CliRunner().invoke(app, ["deid", str(src), "--out", str(tmp_path / "o2"), "--key", str(tmp_path / "k"),
                                   "--profile", "retain-everything"])
    assert bad.exit_code == 2 and "unknown profile option 'retain-everything'" in bad.output


def test_deid_command_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = ("import sys; from medpipe.cli import app; import medpipe.deid.run, medpipe.deid.reidentify; "
            "print(any(m in sys.modules for m in ('torch', 'monai', 'medpipe.models')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.stdout.strip() == "False"


def test_fast_writer_gives_the_bytes_of_dcmwrite(planted: tuple[Path, dict]) -> None:
    """medpipe.deid.writer writes raw elements directly: the file must be byte-identical to pydicom's."""
    import io

    from pydicom.data import get_testdata_file

    from medpipe.deid.writer import dataset_bytes

    src, _ = planted
    files = [p for p in sorted(deid_data_folder().rglob("*.dcm")) if p.stat().st_size < 5_000_000]
    files += sorted(src.rglob("*.dcm"))[:3] + sorted(src.rglob("SEG/*.dcm"))[:1]
    files += [Path(get_testdata_file(n)) for n in ("MR_small_implicit.dcm", "MR_small_bigendian.dcm",
                                                   "JPEG2000.dcm", "image_dfl.dcm")]
    fast = 0
    for path in files:
        ds = pydicom.dcmread(path)
        Deidentifier(KEY).apply(ds)
        expected = io.BytesIO()
        pydicom.dcmwrite(expected, ds, enforce_file_format=True)
        data = dataset_bytes(ds)
        if data is not None:
            assert data == expected.getvalue(), path.name
            fast += 1
    assert fast >= len(files) - 2  # all but big endian and deflate take the fast path


def test_dicomdir_source(planted: tuple[Path, dict], tmp_path: Path) -> None:
    from pydicom.fileset import FileSet

    src, _ = planted
    fs = FileSet()
    for p in sorted(src.rglob("*.dcm"))[:6]:
        fs.add(p)
    fs.write(tmp_path / "media")
    report = deidentify(tmp_path / "media" / "DICOMDIR", tmp_path / "out", DeidSettings(key=tmp_path / "k"), workers=1)
    assert report.n_files == 6 and report.written == 6
    values = _all_values(src)
    assert all(leaks(p, values) == [] for p in (tmp_path / "out").rglob("*") if p.is_file())

"""De-identification in the workflows: ``ingest --deidentify`` leaves no PHI anywhere in its output, and
results of ``medpipe score`` on de-identified data re-identify onto the original study."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from medpipe.cli import app
from medpipe.deid.audit import identifying_values, leaks
from medpipe.deid.run import DeidSettings, deidentify
from medpipe.deid.table import ProfileOptions
from medpipe.errors import ConfigError
from tests.deid_helpers import planted_sample, planted_values
from tests.dicom_checks import dciodvfy_errors, needs_dciodvfy


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    return planted_sample(tmp_path_factory.mktemp("planted"), cases=2)


def _phi(src: Path) -> set[str]:
    values = planted_values()
    for f in src.rglob("*.dcm"):
        values |= identifying_values(pydicom.dcmread(f), free_text=False)
    # the source's own file and folder names (the sample names folders after the original Patient ID)
    values |= {p.name for p in src.iterdir() if p.is_dir()} | {str(src)}
    return values


def test_ingest_deidentify_leaves_no_phi_in_any_output(planted: tuple[Path, dict], tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    src, _ = planted
    out = tmp_path / "ingest"
    caplog.set_level(logging.DEBUG)
    result = CliRunner().invoke(app, ["ingest", str(src), "--out", str(out), "--deidentify", "--key",
                                      str(tmp_path / "key"), "--profile", "clean-descriptors", "--workers", "1"])
    assert result.exit_code == 0, result.output
    phi = _phi(src)
    # catalog, manifest, rejected, sidecars, volume and preview names, previews, the de-identified copy
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".png" for p in files) and any(p.name.endswith(".nii.gz") for p in files)
    found = {str(p.relative_to(out)): leaks(p, phi) for p in files}
    assert {k: v for k, v in found.items() if v} == {}
    assert not any(v in str(p.relative_to(out)) for p in files for v in phi)  # file and folder names
    assert leaks_in_text(result.output, phi) == [] and leaks_in_text(caplog.text, phi) == []
    from medpipe.catalog import open_catalog

    with open_catalog(out) as cat:
        vols = cat.volumes()
        assert len({v.patient_id for v in vols}) == 2 and all(v.patient_id.startswith("P") for v in vols)
        # the SEG of each study still points at its (de-identified) FLAIR series
        segs = cat.objects(modality="SEG")
        assert len(segs) == 2
        for seg in segs:
            flair = [v for v in vols if v.study_uid == seg.study_uid and v.series_description.startswith("FLAIR")]
            assert len(flair) == 1 and [o.sop_uid for o in cat.objects_referencing(flair[0].series_uid)] == [seg.sop_uid]
    # the map stays outside OUT, private
    assert (tmp_path / "key.map.json").is_file() and not list(out.rglob("*.map.json"))


def leaks_in_text(text: str, values: set[str]) -> list[str]:
    import re

    return [v for v in values if re.search(r"(?<![0-9A-Za-z])" + re.escape(v) + r"(?![0-9A-Za-z])", text)]


def test_ingest_deidentify_options_need_the_flag(planted: tuple[Path, dict], tmp_path: Path) -> None:
    src, _ = planted
    r = CliRunner().invoke(app, ["ingest", str(src), "--out", str(tmp_path / "o"), "--key", str(tmp_path / "k")])
    assert r.exit_code == 2 and "only apply with --deidentify" in r.output
    r = CliRunner().invoke(app, ["ingest", str(src), "--out", str(tmp_path / "o"), "--deidentify"])
    assert r.exit_code == 2 and "--deidentify needs --key" in r.output
    r = CliRunner().invoke(app, ["ingest", str(src), "--out", str(tmp_path / "o"), "--deidentify", "--key",
                                 str(tmp_path / "o" / "k")])
    assert r.exit_code == 2 and "must not be inside the output folder" in r.output


@pytest.fixture(scope="module")
def scored(planted: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The planted export de-identified, scored by a tiny FLAIR segmenter, then re-identified."""
    from medpipe.scoring.engine import ScoreOptions, score
    from tests.scoring_helpers import tiny_segmenter_package

    src, _ = planted
    root = tmp_path_factory.mktemp("scored")
    key, mapfile = root / "private" / "site.key", root / "private" / "site.map.json"
    settings = DeidSettings(key=key, map=mapfile, options=ProfileOptions(clean_descriptors=True,
                                                                         retain_modified_dates=True))
    deidentify(src, root / "deid", settings, workers=2)
    package = tiny_segmenter_package(root / "model" / "pkg", rules={
        "FLAIR": {"modality": "MR", "series_description": "(?i)flair"}})
    report = score(root / "deid", package, root / "scored", ScoreOptions(device="cpu", cpu_threads=1,
                                                                         ingest_workers=1))
    assert [r["status"] for r in report.rows] == ["ok", "ok"], report.rows
    result = CliRunner().invoke(app, ["reidentify", str(root / "scored" / "results"), "--key", str(key),
                                      "--map", str(mapfile), "--out", str(root / "reid")])
    assert result.exit_code == 0, result.output
    return {"root": root, "src": src, "key": key, "map": mapfile}


def test_score_on_deidentified_data_reidentifies_onto_the_original_study(scored: dict) -> None:
    root, src = scored["root"], scored["src"]
    originals = {}
    for f in src.rglob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        originals[str(ds.SOPInstanceUID)] = ds
    segs = [pydicom.dcmread(p) for p in (root / "reid").rglob("SEG_*.dcm")]
    srs = [pydicom.dcmread(p) for p in (root / "reid").rglob("SR_*.dcm")]
    assert len(segs) == 2 and len(srs) == 2
    for seg in segs:
        ref = seg.ReferencedSeriesSequence[0]
        instances = [str(i.ReferencedSOPInstanceUID) for i in ref.ReferencedInstanceSequence]
        assert instances and all(uid in originals for uid in instances)  # the original instances
        source = originals[instances[0]]
        assert ref.SeriesInstanceUID == source.SeriesInstanceUID and "FLAIR" in source.SeriesDescription
        assert seg.StudyInstanceUID == source.StudyInstanceUID
        assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
        assert seg.PatientID == source.PatientID and str(seg.PatientName) == str(source.PatientName)
        assert seg.PatientBirthDate == source.PatientBirthDate and seg.AccessionNumber == source.AccessionNumber
        assert seg.StudyDate == source.StudyDate and seg.StudyID == source.StudyID
        frame_refs = {str(s.ReferencedSOPInstanceUID) for fg in seg.PerFrameFunctionalGroupsSequence
                      for d in fg.DerivationImageSequence for s in d.SourceImageSequence}
        assert frame_refs <= set(instances)
        assert "PatientIdentityRemoved" not in seg and "DeidentificationMethod" not in seg
        # the pixels of the SEG are those medpipe score wrote on the de-identified data
    for sr in srs:
        assert sr.StudyInstanceUID in {s.StudyInstanceUID for s in segs}
        uids = {str(e.value) for e in sr.iterall() if e.VR == "UI"}
        assert not any(u in scored_pseudonyms(root) for u in uids)  # no pseudonymous UID left in the SR


def scored_pseudonyms(root: Path) -> set[str]:
    return set(json.loads((root / "private" / "site.map.json").read_text())["uids"])


@needs_dciodvfy
def test_reidentified_objects_are_valid(scored: dict) -> None:
    for p in sorted((scored["root"] / "reid").rglob("*.dcm")):
        assert dciodvfy_errors(p) == [], p.name


def test_reidentify_refuses_another_key_and_an_edited_map(scored: dict, tmp_path: Path) -> None:
    from medpipe.deid.keys import load_or_create_key
    from medpipe.deid.reidentify import reidentify

    root = scored["root"]
    load_or_create_key(tmp_path / "other.key")
    with pytest.raises(ConfigError, match="made with another key"):
        reidentify(root / "scored" / "results", tmp_path / "r1", tmp_path / "other.key", scored["map"])
    doc = json.loads(scored["map"].read_text())
    pseudo = next(iter(doc["studies"]))
    doc["uids"][pseudo] = "1.2.3.4.5.6.7.8.9"  # a forged original for the study
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="does not match the key"):
        reidentify(root / "scored" / "results", tmp_path / "r2", scored["key"], forged)


def test_tesseract_flags_burned_in_text(tmp_path: Path) -> None:
    """The optional pixel check: text drawn into an image is found; a plain image is not flagged."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    from medpipe.deid.burned_in import ocr_reason
    from tests.dicom_factory import AXIAL, Geometry, write_series

    if shutil.which("tesseract") is None:
        if os.environ.get("CI"):
            pytest.fail("tesseract is not installed: .ci/run installs tesseract-ocr")
        pytest.skip("tesseract not installed (apt-get install tesseract-ocr)")
    img = Image.new("L", (512, 512), 20)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=36)
    draw.text((30, 40), "DOE JONATHAN", fill=230, font=font)
    draw.text((30, 100), "DOB 12/04/1958", fill=230, font=font)
    pixels = np.asarray(img, dtype=np.int16)
    plain = (np.indices((512, 512)).sum(axis=0) % 97).astype(np.int16) * 3
    write_series(tmp_path / "text", np.stack([pixels.T], axis=-1), Geometry(AXIAL, pixel_spacing=(0.5, 0.5)), modality="OT")
    write_series(tmp_path / "plain", np.stack([plain.T], axis=-1), Geometry(AXIAL, pixel_spacing=(0.5, 0.5)), modality="OT")
    text_ds = pydicom.dcmread(next((tmp_path / "text").glob("*")))
    plain_ds = pydicom.dcmread(next((tmp_path / "plain").glob("*")))
    reason = ocr_reason(text_ds)
    assert reason is not None and "Tesseract read" in reason and "DOE" not in reason
    assert ocr_reason(plain_ds) is None
    # through the command: quarantined with the reason (with --allow-burned-in the header rule is off)
    report = deidentify(tmp_path / "text", tmp_path / "out", DeidSettings(key=tmp_path / "k", allow_burned_in=True,
                                                                         ocr=True), workers=1)
    assert report.written == 0 and "pixel text check" in report.rejected[0][1]


def test_tesseract_missing_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f.dcm").write_bytes(b"x")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="needs the tesseract command"):
        deidentify(tmp_path / "src", tmp_path / "out", DeidSettings(key=tmp_path / "k", ocr=True))


def test_subprocess_cli_roundtrip(planted: tuple[Path, dict], tmp_path: Path) -> None:
    import sys

    src, _ = planted
    cmd = [sys.executable, "-m", "medpipe.cli", "deid", str(src), "--out", str(tmp_path / "out"), "--key",
           str(tmp_path / "k"), "--workers", "2", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    assert subprocess.run(cmd, capture_output=True, env=env, timeout=300, check=False).returncode == 0
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == len(list(src.rglob("*.dcm")))


def test_reidentify_puts_real_headers_back_as_they_were(tmp_path: Path) -> None:
    """Two real headers of deid-data (a Siemens head CT, an Agfa DX of a cat) de-identified with the basic
    profile, then re-identified as if they were results: the Patient and General Study modules and every UID
    come back exactly as they were, the markers go, and what cannot be re-identified is listed.

    Guards against: a value of the map not written back (Other Patient IDs "M1212121"), an empty original
    value (the cat's Patient's Age) left out, an empty Other Patient IDs (retired) written back, a
    multi-valued UID (Irradiation Event UID, VM 1-n) left pseudonymous or cut to one value, UIDs the map does
    not know (SOP Class UIDs) damaged, the file meta's SOP Instance UID left pseudonymous, a forged map entry
    accepted or refused without its hint, the output folder inside RESULTS read back as input.
    """
    import copy
    import re

    from medpipe.deid.engine import PATIENT_KEYWORDS, STUDY_KEYWORDS, Deidentifier
    from medpipe.deid.keys import load_or_create_key
    from medpipe.deid.mapping import MapBuilder, merge_into_map
    from medpipe.deid.reidentify import MARKERS, reidentify
    from tests.deid_helpers import deid_data_folder

    key_path, map_path, results = tmp_path / "site.key", tmp_path / "site.map.json", tmp_path / "results"
    key, _ = load_or_create_key(key_path)
    results.mkdir()
    builder = MapBuilder()
    originals = {}
    for name in ("humans/ctbrain1.dcm", "animals/cat.dcm"):
        ds = pydicom.dcmread(deid_data_folder() / name, stop_before_pixels=True)
        if ds.Modality == "CT":  # a second irradiation event (two spiral runs): a two-valued UID
            ds.IrradiationEventUID = [ds.IrradiationEventUID, "1.3.12.2.1107.5.1.4.65515.33333777778888855555444477778"]
        originals[str(ds.SOPInstanceUID)] = ds
        deid = copy.deepcopy(ds)
        builder.add(Deidentifier(key).apply(deid))
        deid.save_as(results / f"{ds.Modality}.dcm", enforce_file_format=True)
        if ds.Modality == "DX":  # a study the map does not know (made on other data)
            deid.StudyInstanceUID = "1.2.3.4"
            deid.save_as(results / "study_not_in_map.dcm", enforce_file_format=True)
    merge_into_map(map_path, key.key_id, builder)
    # the original CT as a "result": its patient is not in the map; a broken .dcm; a text file (ignored)
    shutil.copy(deid_data_folder() / "humans" / "ctbrain2.dcm", results / "not_deidentified.dcm")
    (results / "broken.dcm").write_bytes(b"not DICOM")
    (results / "notes.txt").write_text("hello")
    # the output inside RESULTS (and sorted among its files): a second run must not read the first one's files back
    out = results / "out"
    first = reidentify(results, out, key_path, map_path)
    second = reidentify(results, out, key_path, map_path)
    ct, dx = originals.values()
    assert sorted(first.written) == sorted(second.written) == sorted([
        f"00007041776/1.2.840.113696.376376.500.43158802.99999999999999/CT_{ct.SOPInstanceUID}.dcm",
        f"16550/{dx.StudyInstanceUID}/DX_{dx.SOPInstanceUID}.dcm"])
    assert sorted(first.rejected) == sorted(second.rejected) == [
        ("broken.dcm", "not a readable DICOM file"),
        ("not_deidentified.dcm", "its patient is not in the map (not made on data de-identified with this map)"),
        ("study_not_in_map.dcm", "its study is not in the map (not made on data de-identified with this map)")]
    assert (out / "rejected.csv").read_text().splitlines()[0] == "path,reason"
    for rel in first.written:
        back = pydicom.dcmread(out / rel)
        orig = originals[str(back.SOPInstanceUID)]
        for kw in (*PATIENT_KEYWORDS, *STUDY_KEYWORDS):
            if kw == "OtherPatientIDs" and orig.get(kw) == "":
                assert kw not in back  # the cat's empty Other Patient IDs: a retired attribute, not written back
            elif kw in orig:
                assert back[kw].value == orig[kw].value, kw
            else:
                assert kw not in back, kw
        assert not any(kw in back for kw in MARKERS)
        ui = {e.keyword: e.value for e in back if e.VR == "UI"}
        assert ui == {e.keyword: e.value for e in orig if e.VR == "UI" and e.keyword in ui}
        assert {"SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"} <= set(ui)
        assert back.file_meta.MediaStorageSOPInstanceUID == orig.SOPInstanceUID
        nested = {str(e.value) for e in back.iterall() if e.VR == "UI"}
        assert nested <= {str(e.value) for e in orig.iterall() if e.VR == "UI"} | {back.file_meta.TransferSyntaxUID}
    back_ct = pydicom.dcmread(out / next(p for p in first.written if "/CT_" in p))
    assert list(back_ct.IrradiationEventUID) == list(ct.IrradiationEventUID) and len(ct.IrradiationEventUID) == 2
    # a map entry that the key did not make: refused, with the message and hint a user sees
    doc = json.loads(map_path.read_text())
    pseudo = next(iter(doc["studies"]))
    doc["uids"][pseudo] = "1.2.3.4.5.6.7.8.9"
    map_path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=r"^the map's entry for UID " + re.escape(pseudo)
                       + r" does not match the key \(edited map, or another key\)$") as err:
        reidentify(results, tmp_path / "r2", key_path, map_path)
    assert err.value.hint == "use the map and key of the de-identification run"


def test_reidentified_file_names_are_safe() -> None:
    """The output path is built from the original Patient ID, Study UID, Modality and SOP Instance UID.

    Guards against: a path leaving OUT (".." or "/" in a Patient ID), letters (lower case, a leading X as in
    Modality XA) lost, runs of other characters not folded into one "_", names over 64 characters, an
    empty name.
    """
    from medpipe.deid.reidentify import _safe

    assert _safe("..") == _safe("") == _safe(" / ") == "unknown"
    assert _safe("../etc/passwd") == "etc_passwd"
    assert _safe("Mrn 0042 / b") == "Mrn_0042_b" and _safe("XA") == "XA" and _safe("_x_.") == "x"
    assert _safe("1.2.840." + "9" * 70) == ("1.2.840." + "9" * 70)[:64]

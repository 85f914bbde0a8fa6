"""dcmtk (movescu + storescp, getscu) as the DIMSE transfer engine of a pull (``engine: dcmtk``), real Orthanc.

The pulled files equal the uploaded ones, a second pull asks for nothing, missing instances are asked
for at IMAGE level, no staging folder is left; the failures are the same one-line causes as with
pynetdicom (unconfigured move destination: in ``test_pacs_failures.py``, for both engines).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medpipe.errors import ConfigError, PacsError
from medpipe.pacs.dcmtk import STAGING, DcmtkSession, dcmtk_tool, failure, find_tool
from medpipe.pacs.listing import Need, SeriesItem, list_series
from medpipe.pacs.nodes import PacsNode, nodes_from_dict
from medpipe.pacs.pull import pull
from medpipe.pacs.query import StudyQuery
from medpipe.pacs.store import InstanceStore
from tests.orthanc_server import LOOPBACK, Orthanc, free_port
from tests.pacs_support import Sample, dataset_bytes, node_settings, transfer_syntax

EXPLICIT_LE = "1.2.840.10008.1.2.1"


@pytest.fixture(scope="module", autouse=True)
def _dcmtk() -> None:
    for name in ("movescu", "storescp", "getscu"):
        found = find_tool(name)
        if isinstance(found, str):
            if os.environ.get("MEDPIPE_REQUIRE_ORTHANC") == "1":
                pytest.fail(f"MEDPIPE_REQUIRE_ORTHANC=1 but {found}")
            pytest.skip(found)


def _node(o: Orthanc, **overrides: object) -> PacsNode:
    # storescp listens on every interface (no bind address): fine in the test's loopback-only network namespace
    settings = node_settings(o, engine="dcmtk", bind=None, **overrides)
    return nodes_from_dict({"nodes": {"orthanc": settings}}).get("orthanc")


def test_dcmtk_tools_found_not_pynetdicom_apps(tmp_path: Path) -> None:
    """pynetdicom's Python apps of the same names (first on a venv's PATH) are not taken for dcmtk's."""
    path, version = find_tool("movescu")  # type: ignore[misc]
    assert version.startswith("movescu v3.") and "/.venv/" not in path
    settings = {"ae_title": "PACS", "host": LOOPBACK, "port": 104}
    node = nodes_from_dict({"nodes": {"p": settings}}).get("p")  # engine auto: dcmtk for C-MOVE only
    assert (dcmtk_tool(node, "move"), dcmtk_tool(node, "get"), dcmtk_tool(node, "wado")) == (path, None, None)
    node = nodes_from_dict({"nodes": {"p": {**settings, "engine": "pynetdicom"}}}).get("p")
    assert dcmtk_tool(node, "move") is None
    node = nodes_from_dict({"nodes": {"p": {**settings, "engine": "dcmtk", "tls": {"dimse": True}}}}).get("p")
    with pytest.raises(ConfigError, match="engine dcmtk has no DIMSE TLS"):
        dcmtk_tool(node, "move")
    # our storage SCP bound to one address: storescp cannot do that, so auto keeps pynetdicom and dcmtk says why
    node = nodes_from_dict({"nodes": {"p": {**settings, "bind": LOOPBACK}}}).get("p")
    assert dcmtk_tool(node, "move") is None
    node = nodes_from_dict({"nodes": {"p": {**settings, "bind": LOOPBACK, "engine": "dcmtk"}}}).get("p")
    with pytest.raises(ConfigError, match="cannot receive a C-MOVE on bind 127.0.0.1 only"):
        dcmtk_tool(node, "move")
    assert dcmtk_tool(node, "get") == find_tool("getscu")[0]


@pytest.mark.parametrize("method", ["move", "get"])
def test_pull_by_dcmtk_equals_upload_and_resumes(orthanc: Orthanc, pacs_sample: Sample, tmp_path: Path,
                                                 method: str) -> None:
    node = _node(orthanc)
    query = StudyQuery(study_uids=(pacs_sample.mr_study, pacs_sample.ct_study))
    report = pull(node, query, tmp_path, methods=(method,))
    n = len(pacs_sample.files)
    assert (report.expected, report.received, report.by_method) == (n, n, {method: n})
    assert not (tmp_path / STAGING).exists() and len(list(tmp_path.rglob("*"))) == len(list(tmp_path.rglob("*.dcm"))) \
        + len({p.parent for p in tmp_path.rglob("*.dcm")}) + len({p.parent.parent for p in tmp_path.rglob("*.dcm")})
    originals = pacs_sample.by_sop()
    for p in tmp_path.rglob("*.dcm"):
        original = originals[p.stem]
        if method == "get" and original in pacs_sample.ct_files:
            # getscu lets the PACS choose the syntax: Orthanc sends the RLE CT decompressed (why auto keeps
            # pynetdicom for C-GET); the pixels are the same
            assert transfer_syntax(p) == EXPLICIT_LE
            import pydicom

            assert (pydicom.dcmread(p).pixel_array == pydicom.dcmread(original).pixel_array).all()
        else:
            assert dataset_bytes(p.read_bytes()) == dataset_bytes(original.read_bytes()), p
            assert transfer_syntax(p) == transfer_syntax(original)

    again = pull(node, query, tmp_path, methods=(method,))
    assert (again.already, again.received) == (n, 0)
    ct = sorted((tmp_path / pacs_sample.ct_study).rglob("*.dcm"))
    for p in ct[:2]:
        p.unlink()
    third = pull(node, query, tmp_path, methods=(method,))  # the two missing ones, at IMAGE level
    assert (third.already, third.received) == (n - 2, 2) and len(list(tmp_path.rglob("*.dcm"))) == n


def test_find_tags_are_pydicoms() -> None:
    from pydicom.datadict import tag_for_keyword

    from medpipe.pacs.dcmtk import FIND_TAGS
    from medpipe.pacs.dimse import instance_keys, series_keys

    assert {k: tag_for_keyword(k) for k in FIND_TAGS} == FIND_TAGS
    keys = {*StudyQuery().study_identifier(), *series_keys("1.2", None), *instance_keys("1.2", "1.2.3")}
    assert keys <= set(FIND_TAGS)


def test_findscu_lists_what_pynetdicom_lists(orthanc: Orthanc, pacs_sample: Sample,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """engine dcmtk lists by findscu (no pynetdicom import in the pull, and no pydicom for plain answers: query by
    -k, answers read by hand): the same answers as DimseFinder, and the same one-line cause for an unknown
    calling AE."""
    import pydicom

    from medpipe.pacs.dcmtk import DcmtkFinder
    from medpipe.pacs.dimse import DimseFinder

    def no_pydicom(*args: object, **kwargs: object) -> None:
        raise AssertionError("findscu's ASCII answers are read without pydicom")

    monkeypatch.setattr(pydicom, "dcmread", no_pydicom)
    node = _node(orthanc)
    tool = dcmtk_tool(node, "find") or ""
    query = StudyQuery(patient_id=pacs_sample.ct_patient)
    with DcmtkFinder(node, tool) as ours, DimseFinder(node) as theirs:
        studies = ours.studies(query)
        assert [s.values for s in studies] == [s.values for s in theirs.studies(query)]
        assert [s["StudyInstanceUID"] for s in studies] == [pacs_sample.ct_study]
        assert [s.values for s in ours.series(pacs_sample.ct_study, "CT")] == \
            [s.values for s in theirs.series(pacs_sample.ct_study, "CT")]
        mine = ours.instances(pacs_sample.ct_study, pacs_sample.ct_series)
        assert sorted(i["SOPInstanceUID"] for i in mine) == \
            sorted(i["SOPInstanceUID"] for i in theirs.instances(pacs_sample.ct_study, pacs_sample.ct_series))
        assert len(mine) == len(pacs_sample.ct_files)
    stranger = _node(orthanc, our_ae_title="STRANGER")
    with DcmtkFinder(stranger, tool) as f, pytest.raises(PacsError) as err:
        f.studies(query)
    assert "C-FIND (study level)" in str(err.value) and "without any answer" in str(err.value)
    assert "calling AE title STRANGER" in str(err.value)


def test_dcmtk_unknown_calling_ae_and_refused_connection(orthanc: Orthanc, pacs_sample: Sample,
                                                         tmp_path: Path) -> None:
    node = _node(orthanc, our_ae_title="STRANGER", retries=0)
    items = list_series(node, StudyQuery(study_uids=(pacs_sample.ct_study,)), web=True)
    store = InstanceStore(tmp_path / "in")
    for way in ("move", "get"):
        with DcmtkSession(node, store, way, dcmtk_tool(node, way) or "") as s, pytest.raises(PacsError) as err:
            s.fetch(items[0], Need(whole=True))
        msg = str(err.value)
        assert "without any answer" in msg and "calling AE title STRANGER" in msg and not err.value.transient, msg
        assert f'"stranger": ["STRANGER", "{LOOPBACK}", {node.our_port}] in DicomModalities' in msg
    nobody = _node(orthanc, port=free_port())
    with DcmtkSession(nobody, store, "get", dcmtk_tool(nobody, "get") or "") as s, pytest.raises(PacsError) as err:
        s.fetch(items[0], Need(whole=True))
    assert "connection refused by orthanc" in str(err.value) and err.value.transient
    assert not list(store.root.rglob("*.dcm")) and not (store.root / STAGING).exists()


def test_dcmtk_timeout(tmp_path: Path) -> None:
    """A port that accepts connections and never answers: the same line as with pynetdicom, within the timeout."""
    import socket
    import time

    silent = socket.socket()
    silent.bind((LOOPBACK, 0))
    silent.listen(8)
    try:
        node = nodes_from_dict({"nodes": {"p": {"ae_title": "SILENT", "host": LOOPBACK, "port": silent.getsockname()[1],
                                                "timeout": 1, "engine": "dcmtk"}}}).get("p")
        item = SeriesItem("1.2.3", "1.2.3.4")
        t0 = time.monotonic()
        for way in ("get", "move"):
            with DcmtkSession(node, InstanceStore(tmp_path), way, dcmtk_tool(node, way) or "") as s, \
                    pytest.raises(PacsError) as err:
                s.fetch(item, Need(whole=True))
            assert "did not answer the association request within 1 s" in str(err.value) and err.value.transient
        assert time.monotonic() - t0 < 8
    finally:
        silent.close()


def test_dcmtk_failure_not_recognised_names_its_last_line() -> None:
    node = nodes_from_dict({"nodes": {"p": {"ae_title": "PACS", "host": LOOPBACK, "port": 104}}}).get("p")
    err = failure(node, "get", "C-GET of series 1.2 from p", "/usr/bin/getscu", 3,
                  "W: something\nE: a new kind of trouble\n", 0)
    assert str(err) == ("C-GET of series 1.2 from p: dcmtk's getscu failed (exit status 3) in a way medpipe does "
                        "not recognise; its last line: E: a new kind of trouble")


@pytest.mark.parametrize("name", ["Doe^John", "Müller^Jürgen"])
def test_answer_values_equal_pydicoms(tmp_path: Path, name: str) -> None:
    """findscu's answers read by hand (ASCII) or by pydicom (anything else) give what DimseFinder's text gives."""
    import pydicom
    from pydicom.dataset import FileMetaDataset

    from medpipe.pacs.dcmtk import answer_values
    from medpipe.pacs.dimse import _text

    ds = pydicom.Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = name
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SOPClassesInStudy = ["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"]
    ds.NumberOfStudyRelatedInstances = 12
    ds.StudyDescription = ""
    for implicit in (True, False):
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2" if implicit else EXPLICIT_LE
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.1"  # what findscu writes
        ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
        path = tmp_path / f"rsp{implicit}.dcm"
        ds.save_as(path, enforce_file_format=True, implicit_vr=implicit)
        keys = {"PatientName": "", "StudyInstanceUID": "", "SOPClassesInStudy": "",
                "NumberOfStudyRelatedInstances": "", "StudyDescription": "", "AccessionNumber": ""}
        read = pydicom.dcmread(path)
        assert answer_values(path, keys) == {k: _text(read, k) for k in keys}
        assert answer_values(path, keys)["SOPClassesInStudy"] == "1.2.840.10008.5.1.4.1.1.2\\1.2.840.10008.5.1.4.1.1.4"


def test_get_asks_for_a_fresh_study_in_one_request(orthanc: Orthanc, pacs_sample: Sample, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """getscu: a study nothing of which is on disk in one STUDY-level C-GET; with a modality filter (other series
    not wanted) or a study partly on disk, series by series; a transient failure of the study request goes on
    series by series; any other is the pull's one-line error."""
    levels: list[str] = []
    run = DcmtkSession._run

    def spy(self: DcmtkSession, keys: list[str], what: str) -> None:
        levels.append(keys[0].split("=")[1])
        run(self, keys, what)

    monkeypatch.setattr(DcmtkSession, "_run", spy)
    import medpipe.pacs.pull as pull_module

    early: list[bool] = []
    get_studies = pull_module._get_studies

    def spy_studies(*args: object, **kwargs: bool) -> None:
        early.append(bool(kwargs.get("early")))
        get_studies(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pull_module, "_get_studies", spy_studies)
    node = _node(orthanc)
    both = StudyQuery(study_uids=(pacs_sample.mr_study, pacs_sample.ct_study))
    n = len(pacs_sample.files)
    events: list[tuple[object, ...]] = []
    report = pull(node, both, tmp_path / "a", methods=("get",), on_listed=lambda e, t: events.append(("listed", e, t)),
                  on_instance=lambda path: events.append(("file",)))
    # a query of study UIDs: the C-GET starts with the listing; progress still hears of the listing first
    assert (report.received, report.already, report.by_method, levels, early) == \
        (n, 0, {"get": n}, ["STUDY", "STUDY"], [True])
    assert events == [("listed", n, n)] + [("file",)] * n
    nothing = pull(node, StudyQuery(study_uids=("1.2.3.999",)), tmp_path / "none", methods=("get",))
    assert (nothing.expected, nothing.received) == (0, 0)  # a study the PACS does not have: no error, no file
    early.clear()
    levels.clear()
    ct = pull(node, StudyQuery(study_uids=(pacs_sample.ct_study,), modality="CT"), tmp_path / "b", methods=("get",))
    assert ct.received == len(pacs_sample.ct_files) == len(list((tmp_path / "b").rglob("*.dcm")))
    assert set(levels) == {"SERIES"}

    def lost(self: DcmtkSession, study_uid: str) -> None:
        raise PacsError(f"C-GET of study {study_uid}: connection lost in the middle", transient=True)

    monkeypatch.setattr(DcmtkSession, "fetch_study", lost)
    levels.clear()
    again = pull(node, both, tmp_path / "c", methods=("get",))
    assert again.received == n == len(list((tmp_path / "c").rglob("*.dcm"))) and set(levels) == {"SERIES"}
    monkeypatch.undo()

    from medpipe.pacs.pull import _get_studies

    stranger = _node(orthanc, our_ae_title="STRANGER", retries=0)
    items = list_series(stranger, StudyQuery(study_uids=(pacs_sample.ct_study,)), web=True)  # QIDO: not restricted
    store = InstanceStore(tmp_path / "d")
    with pytest.raises(PacsError) as err:
        _get_studies(stranger, store, [items[0].study_uid])
    msg = str(err.value)
    assert msg.startswith(f"C-GET of study {pacs_sample.ct_study} from orthanc: ") and "\n" not in msg, msg
    assert "calling AE title STRANGER" in msg and not err.value.transient
    assert not list(store.root.rglob("*.dcm")) and not (store.root / STAGING).exists()

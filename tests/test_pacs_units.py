"""medpipe.pacs without a network: node files, pacs:// URLs, the instance store, retries, context budgets."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest

from medpipe.errors import ConfigError, PacsError
from medpipe.pacs.listing import Instance, SeriesItem, need
from medpipe.pacs.nodes import default_path, load_nodes, nodes_from_dict
from medpipe.pacs.query import StudyQuery, parse_pacs_url
from medpipe.pacs.retry import backoff, with_retries
from medpipe.pacs.store import InstanceStore, part10_header, safe_component

YAML = """
defaults:
  our_ae_title: MEDPIPE
  our_port: 11112
nodes:
  orthanc:
    ae_title: ORTHANC
    host: pacs.example.org
    port: 4242
    dicomweb: https://pacs.example.org/dicom-web/
    auth: {username: ai, password_env: PACS_PW}
    tls: {ca_file: /etc/ssl/ca.pem}
  web-only:
    dicomweb: http://127.0.0.1:8042/dicom-web
    retrieve: [wado]
"""

TOML = """
[defaults]
our_ae_title = "MEDPIPE"

[nodes.orthanc]
ae_title = "ORTHANC"
host = "127.0.0.1"
port = 4242
our_port = 11113
"""


def test_node_file_yaml_and_toml(tmp_path: Path) -> None:
    (tmp_path / "pacs.yaml").write_text(YAML)
    nf = load_nodes(tmp_path / "pacs.yaml")
    o = nf.get("orthanc")
    assert (o.ae_title, o.host, o.port, o.our_ae_title, o.our_port) == ("ORTHANC", "pacs.example.org", 4242,
                                                                         "MEDPIPE", 11112)
    assert o.dicomweb == "https://pacs.example.org/dicom-web" and o.retrieve == ("move", "get", "wado")
    web = nf.get("web-only")
    assert not web.has_dimse and web.retrieve == ("wado",)
    with pytest.raises(ConfigError, match="no DIMSE address"):
        web.dimse_address()
    (tmp_path / "pacs.toml").write_text(TOML)
    t = load_nodes(tmp_path / "pacs.toml").get("orthanc")
    assert (t.our_ae_title, t.our_port, t.dicomweb) == ("MEDPIPE", 11113, None)


def test_node_file_errors_name_file_and_field(tmp_path: Path) -> None:
    p = tmp_path / "pacs.yaml"
    cases = {
        "nodes: {a: {ae_title: A, host: h, port: 70000}}": "nodes.a.port: Input should be less than or equal to 65535",
        "nodes: {a: {ae_title: A, host: h, port: 1, ae_titel: X}}": "nodes.a.ae_titel: unknown setting 'ae_titel' "
                                                                   "(did you mean 'ae_title'?)",
        "nodes: {a: {ae_title: A, host: h}}": "nodes.a: Value error, DIMSE needs all of ae_title, host and port",
        "nodes: {a: {ae_title: 'A\\\\B', host: h, port: 1}}": "nodes.a.ae_title: Value error, an AE title is 1 to 16",
        "nodes: {a: {ae_title: A, host: h, port: 1, dicomweb: 'pacs:8042'}}": "nodes.a.dicomweb: Value error, "
                                                                             "expected an http:// or https:// URL",
        "defaults: {our_port: 0}\nnodes: {a: {ae_title: A, host: h, port: 1}}": "defaults.our_port: Input should be "
                                                                                "greater than or equal to 1",
        "nodes: {a: {dicomweb: 'http://x', auth: {username: u}}}": "nodes.a.auth: Value error, give exactly one of "
                                                                  "password and password_env",
        "nodes: {a: {}}": "nodes.a: Value error, give ae_title, host and port",
        "servers: {}": "expected a 'nodes' mapping",
        "nodes: [": "not valid YAML",
    }
    for text, expected in cases.items():
        p.write_text(text)
        with pytest.raises(ConfigError) as err:
            load_nodes(p)
        assert str(err.value).startswith(f"{p}: ") and expected in str(err.value), (text, str(err.value))
    p.write_text(YAML)
    with pytest.raises(ConfigError, match=r"no PACS node 'orthank' .*did you mean 'orthanc'\?"):
        load_nodes(p).get("orthank")
    with pytest.raises(ConfigError, match="not found"):
        load_nodes(tmp_path / "missing.yaml")


def test_default_node_file_and_password_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDPIPE_PACS", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    assert default_path() == tmp_path / "cfg" / "medpipe" / "pacs.yaml"
    (tmp_path / "cfg" / "medpipe").mkdir(parents=True)
    (tmp_path / "cfg" / "medpipe" / "pacs.toml").write_text(TOML)
    assert default_path().name == "pacs.toml" and load_nodes().get("orthanc").port == 4242
    monkeypatch.setenv("MEDPIPE_PACS", str(tmp_path / "elsewhere.yaml"))
    assert default_path() == tmp_path / "elsewhere.yaml"
    node = nodes_from_dict({"nodes": {"w": {"dicomweb": "http://x", "auth": {"username": "u",
                                                                            "password_env": "PACS_PW"}}}}).get("w")
    monkeypatch.delenv("PACS_PW", raising=False)
    with pytest.raises(ConfigError, match="PACS_PW, which is not set"):
        node.auth.resolve_password()  # type: ignore[union-attr]
    monkeypatch.setenv("PACS_PW", "s3cret")
    assert node.auth.resolve_password() == "s3cret"  # type: ignore[union-attr]


def test_pacs_url() -> None:
    src = parse_pacs_url("pacs://orthanc?StudyDate=20240101-20240131&Modality=MR&PatientID=P%201&via=get")
    assert src.node == "orthanc" and src.via == "get"
    assert (src.query.study_date, src.query.modality, src.query.patient_id) == ("20240101-20240131", "MR", "P 1")
    two = parse_pacs_url("pacs://n?StudyInstanceUID=1.2.3,1.2.4")
    assert two.query.study_uids == ("1.2.3", "1.2.4")
    assert two.query.study_identifier()["StudyInstanceUID"] == ["1.2.3", "1.2.4"]
    for bad, msg in [("pacs://orthanc", "without filters would pull the whole PACS"),
                     ("pacs://orthanc?Modalty=MR", "unknown query key 'Modalty' (did you mean 'Modality'?)"),
                     ("pacs://orthanc?StudyDate=2024-01-01", "expected YYYYMMDD or a range"),
                     ("pacs://orthanc?StudyDate=20240201-20240101", "ends before it starts"),
                     ("pacs://orthanc?StudyInstanceUID=../../etc", "is not a DICOM UID"),
                     ("pacs://orthanc?Modality=MR&via=ftp", "expected move, get or wado"),
                     ("pacs:///x?Modality=MR", "expected pacs://NODE?")]:
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
            parse_pacs_url(bad)
    assert StudyQuery(study_date="-20240101").study_date == "-20240101"


def test_store_is_atomic_and_names_are_safe(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path / "in")
    hostile = "../../../../etc/passwd"
    p = store.write(hostile, "1.2.3", "1.2.3.4", b"abc", b"def")
    assert p.resolve().is_relative_to(store.root) and p.read_bytes() == b"abcdef"
    assert safe_component(hostile).startswith("x") and "/" not in safe_component(hostile)
    assert safe_component("1.2.840.10008 \0") == "1.2.840.10008"
    assert store.write(hostile, "1.2.3", "1.2.3.4", b"other") == p and p.read_bytes() == b"abcdef"  # kept
    assert store.present(hostile, "1.2.3") == {"1.2.3.4"} and store.written == 1
    (p.parent / ".medpipe-tmp.xyz.tmp.1.2.3.5.dcm").write_bytes(b"half")  # what a killed writer leaves
    assert store.present(hostile, "1.2.3") == {"1.2.3.4"} and store.clean() == 1

    class Dies:  # the connection drops in the middle of writing an instance
        def __buffer__(self, flags: int) -> memoryview:
            raise ConnectionResetError("peer gone")

    with pytest.raises((ConnectionResetError, TypeError)):
        store.write(hostile, "1.2.3", "1.2.3.6", b"first half", Dies())  # type: ignore[arg-type]
    assert not store.has(hostile, "1.2.3", "1.2.3.6") and store.present(hostile, "1.2.3") == {"1.2.3.4"}
    assert [q.name for q in p.parent.iterdir()] == [p.name]  # no half file under any name


def test_part10_header_equals_pydicom() -> None:
    import io

    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    for version, ae in (("PYNETDICOM_304", "ORTHANC"), ("PYNETDICOM_304", ""), ("ODD", "AE1")):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = "1.2.3.45"
        meta.TransferSyntaxUID = "1.2.840.10008.1.2"
        meta.ImplementationClassUID = "1.2.826.0.1.3680043.9.3811.3.0.4"
        meta.ImplementationVersionName = version
        if ae:
            meta.SourceApplicationEntityTitle = ae
        ref = DicomBytesIO()
        ref.is_little_endian, ref.is_implicit_VR = True, False
        write_file_meta_info(ref, meta)
        ours = part10_header("1.2.840.10008.5.1.4.1.1.2", "1.2.3.45", "1.2.840.10008.1.2",
                             "1.2.826.0.1.3680043.9.3811.3.0.4", version, ae)
        assert ours == b"\0" * 128 + b"DICM" + ref.getvalue()
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3.45"
    body = io.BytesIO()
    ds.save_as(body, implicit_vr=True, little_endian=True, enforce_file_format=False)
    got = pydicom.dcmread(io.BytesIO(ours + body.getvalue()))
    assert got.SOPInstanceUID == "1.2.3.45" and got.file_meta.SourceApplicationEntityTitle == "AE1"


def test_retries_back_off_and_reset_on_progress() -> None:
    assert [backoff(a, 0.5) for a in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0] and backoff(20, 1.0) == 60.0
    waits: list[float] = []
    calls = [0]

    def flaky() -> str:
        calls[0] += 1
        if calls[0] < 3:
            raise PacsError("connection refused", transient=True)
        return "done"

    assert with_retries(flaky, retries=2, first_delay=0.1, what="x", sleep=waits.append) == "done"
    assert waits == [0.1, 0.2]
    calls[0] = 0
    with pytest.raises(PacsError, match="refused"):
        with_retries(flaky, retries=1, first_delay=0.1, what="x", sleep=waits.append)
    with pytest.raises(PacsError, match="permanent"):  # never retried
        with_retries(lambda: (_ for _ in ()).throw(PacsError("permanent")), retries=5, first_delay=1, what="x",
                     sleep=lambda s: pytest.fail("slept"))
    # an attempt that made progress resets the count: 4 failures with 1 retry allowed still succeed
    calls[0] = -2
    progress = iter([True, True, True, True])
    waits.clear()
    assert with_retries(flaky, retries=1, first_delay=0.1, what="x", sleep=waits.append,
                        progressed=lambda: next(progress)) == "done"
    assert waits == [0.1] * 4


def test_get_contexts_stay_within_128_and_groups_split() -> None:
    from medpipe.pacs.retrieve import GET_SYNTAX_TIERS, get_contexts, get_groups

    for n in (1, 3, 7, 8, 21, 22, 63, 64, 127):
        classes = [f"1.2.3.{i}" for i in range(n)]
        contexts, roles = get_contexts(classes)
        assert len(contexts) <= 128 and len(roles) == n
        assert {str(c.abstract_syntax) for c in contexts[1:]} == set(classes)
        if n * len(GET_SYNTAX_TIERS[0]) <= 127:  # few classes: one context per (class, syntax): no transcoding
            assert len(contexts) == 1 + n * len(GET_SYNTAX_TIERS[0])
    with pytest.raises(ValueError, match="split with get_groups"):
        get_contexts([f"1.2.3.{i}" for i in range(128)])
    items = [SeriesItem("1", f"2.{k}", instances=[Instance(f"3.{k}.{i}", f"1.2.3.{k * 50 + i}") for i in range(50)])
             for k in range(5)]
    groups = get_groups(items)
    assert [len(g) for g in groups] == [2, 2, 1]
    assert all(len(set().union(*(i.sop_classes for i in g))) <= 127 for g in groups)


def test_push_batches_stay_within_128_contexts(tmp_path: Path) -> None:
    from medpipe.pacs.push import PushResult, _batches, _contexts

    todo = [(PushResult(tmp_path / f"{i}", f"9.{i}", f"1.2.3.{i}"), (f"1.2.3.{i}", f"9.{i}", "1.2.840.10008.1.2.4.50"))
            for i in range(100)]
    batches = _batches(todo)
    assert sum(len(b) for b in batches) == 100
    assert all(len(_contexts(b)) <= 128 for b in batches) and len(batches) == 2


def test_need_whole_partial_complete(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path)
    listed = SeriesItem("1.2", "1.2.3", instances=[Instance("1.2.3.1", "c"), Instance("1.2.3.2", "c")])
    assert need(store, listed).whole
    store.write("1.2", "1.2.3", "1.2.3.1", b"x")
    partial = need(store, listed)
    assert not partial.whole and [i.sop_uid for i in partial.instances] == ["1.2.3.2"]
    counted = SeriesItem("1.2", "1.2.3", count=1)
    assert need(store, counted).empty  # as many files as the PACS says it has
    assert need(store, SeriesItem("1.2", "1.2.3", count=5)).whole  # fewer: fetched whole again (kept files stay)
    assert os.listdir(tmp_path / "1.2" / "1.2.3") == ["1.2.3.1.dcm"]


def _data_set(path: Path) -> tuple[bytes, Any]:
    """A Part 10 file's data set bytes and its transfer syntax."""
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.uid import UID

    data = path.read_bytes()
    fh = io.BytesIO(data)
    read_preamble(fh, False)
    meta = _read_file_meta_info(fh)
    return data[fh.tell():], UID(meta.TransferSyntaxUID)


def _pydicom_uids(body: bytes, implicit: bool) -> tuple[str, str, str]:
    from pydicom.filereader import read_dataset

    ds = read_dataset(io.BytesIO(body), implicit, True, stop_when=lambda tag, vr, length: tag > 0x0020000E)
    return tuple(str(ds.get(k, "") or "").strip().rstrip("\0")  # type: ignore[return-value]
                 for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))


def test_scan_uids_equals_pydicom_on_real_files(shared_data: Path) -> None:
    """The storage SCP reads the three UIDs from element headers; on real vendor files it agrees with pydicom,
    and hands what it cannot walk by lengths (undefined-length sequences) to pydicom."""
    from types import SimpleNamespace

    from medpipe.pacs.scp import _uids, scan_uids

    scanned = handed_over = 0
    from pydicom.misc import is_dicom

    for path in sorted(p for p in shared_data.rglob("*") if p.is_file() and is_dicom(p)):
        body, ts = _data_set(path)
        if not ts.is_little_endian or ts.is_deflated:
            continue
        expected = _pydicom_uids(body, ts.is_implicit_VR)
        got = scan_uids(body, ts.is_implicit_VR)
        if got is None:
            handed_over += 1
        else:
            scanned += 1
            assert got == expected, path
        event = SimpleNamespace(request=SimpleNamespace(DataSet=io.BytesIO(body)),
                                context=SimpleNamespace(transfer_syntax=str(ts)))
        assert _uids(event) == expected, path  # what the handler uses, fallback included
    assert scanned >= 20 and handed_over >= 1, (scanned, handed_over)


def test_scan_uids_implicit_vr_and_broken_headers() -> None:
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    from medpipe.pacs.scp import scan_uids

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.3.4.5"  # odd length: padded with a NUL
    ds.Modality = "CT"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.InstanceNumber = 7
    for implicit in (True, False):
        fh = DicomBytesIO()
        fh.is_little_endian, fh.is_implicit_VR = True, implicit
        write_dataset(fh, ds)
        body = fh.getvalue()
        assert scan_uids(body, implicit) == ("1.2.3", "1.2.3.4", "1.2.3.4.5") == _pydicom_uids(body, implicit)
        assert scan_uids(body[:30], implicit) is None  # an element running past the end
    assert scan_uids(b"\x08\x00\x18\x00ZZ\x04\x001.2\x00", False) is None  # not a VR


class _FakeResponse:
    """A streamed multipart/related WADO-RS answer, handed out in chunks of ``size`` bytes."""

    def __init__(self, body: bytes, size: int) -> None:
        from requests.structures import CaseInsensitiveDict

        self.headers = CaseInsensitiveDict({"Content-Type": 'multipart/related; type="application/dicom"; boundary=XyZ'})
        self.body, self.size = body, size

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def iter_content(self, chunk_size: int | None = None) -> Any:
        for a in range(0, len(self.body), self.size):
            yield self.body[a:a + self.size]


@pytest.mark.parametrize("size", [1, 7, 4096])
def test_wado_answer_cut_off_never_gives_a_truncated_instance(size: int) -> None:
    """dicomweb-client hands out what follows the last boundary when a response ends early: medpipe drops it and
    says the transfer was cut (transient), wherever the chunks split the closing boundary."""
    from dicomweb_client.api import DICOMwebClient

    from medpipe.pacs.web import iter_stored

    node = nodes_from_dict({"nodes": {"web": {"dicomweb": "http://127.0.0.1:9/dicom-web"}}}).get("web")
    one, two = b"DICM-one" * 50, b"DICM-two" * 50
    head = b"--XyZ\r\nContent-Type: application/dicom\r\n\r\n"
    whole = head + one + b"\r\n" + head + two + b"\r\n--XyZ--\r\n"
    client = DICOMwebClient(url="http://127.0.0.1:9/dicom-web")
    for body, complete in ((whole, True), (whole[:-len(b"--XyZ--\r\n")], False), (whole[:-200], False)):
        client._http_get = lambda url, headers=None, stream=False, body=body: _FakeResponse(body, size)  # type: ignore[method-assign]
        got: list[bytes] = []
        if complete:
            got = list(iter_stored(node, client, "studies/1"))
            assert got == [one, two]
            continue
        with pytest.raises(PacsError) as err:
            for part in iter_stored(node, client, "studies/1"):
                got.append(part)
        assert got == [one] and err.value.transient and "closing multipart boundary" in str(err.value)


def test_file_uids_past_the_head(tmp_path: Path) -> None:
    """A received file whose UIDs come after more than the bytes read first (a long private element): the rest is
    read, the UIDs found by hand as pydicom finds them."""
    import pydicom

    from medpipe.pacs.dcmtk import HEAD_BYTES, file_uids
    from tests.dicom_factory import pattern, write_series

    write_series(tmp_path / "src", pattern((8, 8, 1), seed=5), patient_id="LONG", tag="long", seed=5)
    src = next((tmp_path / "src").rglob("*.dcm"))
    ds = pydicom.dcmread(src)
    block = ds.private_block(0x0007, "MEDPIPE TEST", create=True)
    block.add_new(0x00, "OB", b"\1" * (HEAD_BYTES + 10))
    ds.save_as(tmp_path / "long.dcm")
    assert file_uids(tmp_path / "long.dcm") == (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)


def test_dcmtk_staged_files_placed_atomically(tmp_path: Path) -> None:
    """What dcmtk received goes into the layout by its UIDs; present ones, unreadable ones and (after a run that
    did not end cleanly) the newest, possibly cut-off, file never do; a killed pull's staging folder is cleaned."""
    import shutil

    from medpipe.pacs.dcmtk import file_uids, new_staging, place_staged
    from tests.dicom_factory import pattern, write_series

    w = write_series(tmp_path / "src", pattern((8, 8, 4), seed=4), patient_id="STAGE", tag="stage", seed=4)
    files = sorted((tmp_path / "src").rglob("*.dcm"))
    store = InstanceStore(tmp_path / "out")
    staging = new_staging(store)
    for f in files[:2]:
        shutil.copy(f, staging / f"MR.{f.stem}")
    (staging / "MR.garbage").write_bytes(b"\0" * 200)
    first = file_uids(staging / f"MR.{files[0].stem}")
    assert first is not None and first[:2] == (w.study_uid, w.series_uid)
    store.write(*first, files[0].read_bytes())  # already present: kept, the staged copy dropped
    assert place_staged(store, staging, clean=True) == 1 and not list(staging.iterdir())
    assert store.present(w.study_uid, w.series_uid) == {first[2], file_uids(files[1])[2]}  # type: ignore[index]

    for i, f in enumerate(files[2:]):
        shutil.copy(f, staging / f.name)
        os.utime(staging / f.name, ns=(10**18 + i, 10**18 + i))
    assert place_staged(store, staging, clean=False) == 1  # the newest (files[3]) dropped
    assert len(store.present(w.study_uid, w.series_uid)) == 3 and not list(staging.iterdir())

    # while the tool runs, the file it may still be writing (the latest time; times are coarse: ties count) waits
    w2 = write_series(tmp_path / "src2", pattern((8, 8, 3), seed=6), patient_id="STAGE", tag="stage2", seed=6)
    more = sorted((tmp_path / "src2").rglob("*.dcm"))
    for f, t in zip(more, (1, 2, 2), strict=True):
        shutil.copy(f, staging / f.name)
        os.utime(staging / f.name, ns=(10**18 + t, 10**18 + t))
    assert place_staged(store, staging, clean=True, running=True) == 1
    assert sorted(p.name for p in staging.iterdir()) == sorted(f.name for f in more[1:])
    assert place_staged(store, staging, clean=False) == 0 and not list(staging.iterdir())  # both possibly cut off
    assert len(store.present(w2.study_uid, w2.series_uid)) == 1
    (staging / "MR.left").write_bytes(b"half")  # a killed pull's leftover
    assert store.clean() == 1 and not staging.parent.exists()

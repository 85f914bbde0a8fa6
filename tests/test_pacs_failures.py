"""The failures users meet with a PACS, each one line naming the cause and the fix (real Orthanc, loopback only).

Unknown calling AE (Orthanc aborts C-FIND / C-MOVE without a status), a move destination the PACS
does not know (Orthanc: 0xC000; the standard 0xA801 from pynetdicom's own Q/R SCP), a refused SOP
class, a timeout, a refused connection (retried with back-off), a wrong DICOMweb root, and Orthanc
stopped in the middle of a pull, then started again: the pull resumes and the files equal the upload.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from medpipe.cli import app
from medpipe.errors import PacsError
from medpipe.pacs.nodes import nodes_from_dict
from medpipe.pacs.pull import pull
from medpipe.pacs.push import push
from medpipe.pacs.query import StudyQuery
from tests.orthanc_server import LOOPBACK, Orthanc, free_port
from tests.pacs_support import Sample, dataset_bytes, node_settings, write_nodes

runner = CliRunner()


def _node(o: Orthanc, **overrides: object):  # type: ignore[no-untyped-def]
    return nodes_from_dict({"nodes": {"pacs": node_settings(o, **overrides)}}).get("pacs")


def _fails(tmp_path: Path, settings: dict[str, object], *args: str) -> str:
    nodes = write_nodes(tmp_path / "pacs.yaml", {"pacs": settings})
    result = runner.invoke(app, [*args[:2], "pacs", *args[2:], "--pacs", str(nodes)])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output  # one line
    return errors[0]


@pytest.fixture(scope="module")
def open_orthanc(private_network: object, tmp_path_factory: pytest.TempPathFactory, pacs_sample: Sample):  # type: ignore[no-untyped-def]
    """An Orthanc that answers C-FIND / C-GET / C-MOVE from anyone but knows no move destination."""
    o = Orthanc(tmp_path_factory.mktemp("open-orthanc"), aet="OPENPACS",
                extra={"DicomAlwaysAllowFind": True, "DicomAlwaysAllowGet": True, "DicomAlwaysAllowMove": True}).start()
    try:
        o.upload(pacs_sample.ct_files)
        yield o
    finally:
        o.stop()


def test_unknown_calling_ae(orthanc: Orthanc, pacs_sample: Sample, tmp_path: Path) -> None:
    settings = node_settings(orthanc, our_ae_title="STRANGER")
    # Orthanc answers C-ECHO from anyone ...
    ok = runner.invoke(app, ["pacs", "echo", "pacs", "--via", "dimse", "--pacs",
                             str(write_nodes(tmp_path / "n.yaml", {"pacs": settings}))])
    assert ok.exit_code == 0, ok.output
    # ... but ends the association on a C-FIND from an AE it does not know: no status at all
    line = _fails(tmp_path, settings, "pacs", "find", "--modality", "MR")
    assert "without any answer" in line and "calling AE title STRANGER" in line
    assert f'"stranger": ["STRANGER", "{LOOPBACK}", {settings["our_port"]}] in DicomModalities' in line
    # the same for the C-MOVE itself (listing by QIDO-RS, which Orthanc does not restrict)
    node = _node(orthanc, our_ae_title="STRANGER", retries=0)
    from medpipe.pacs.listing import Need, list_series

    items = list_series(node, StudyQuery(study_uids=(pacs_sample.ct_study,)), web=True)
    from medpipe.pacs.retrieve import MoveSession
    from medpipe.pacs.scp import StorageSCP
    from medpipe.pacs.store import InstanceStore

    with StorageSCP(InstanceStore(tmp_path / "in"), "STRANGER", node.our_port, LOOPBACK) as scp, \
            MoveSession(node, scp.handler) as s, pytest.raises(PacsError) as err:
        s.fetch(items[0], Need(whole=True))
    assert "C-MOVE" in str(err.value) and "without any answer" in str(err.value) and not err.value.transient


@pytest.mark.parametrize("engine", ["pynetdicom", "dcmtk"])
def test_move_destination_not_configured(open_orthanc: Orthanc, pacs_sample: Sample, tmp_path: Path,
                                         engine: str) -> None:
    port = free_port()
    bind = None if engine == "dcmtk" else LOOPBACK  # storescp listens on every interface (loopback only here)
    settings = node_settings(open_orthanc, our_port=port, our_ae_title="MEDPIPE", engine=engine, bind=bind)
    line = _fails(tmp_path, settings, "pacs", "pull", "--study", pacs_sample.ct_study, "--via", "move",
                  "--out", str(tmp_path / "out"))
    assert "status 0xC000" in line and "move destination MEDPIPE is not configured" in line
    assert f'"medpipe": ["MEDPIPE", "{LOOPBACK}", {port}] in DicomModalities' in line
    assert not list((tmp_path / "out").rglob("*.dcm"))
    # auto: C-MOVE fails, C-GET takes over, and the warning still carries the fix
    report = pull(_node(open_orthanc, our_port=port, engine=engine, bind=bind), StudyQuery(study_uids=(pacs_sample.ct_study,)),
                  tmp_path / "auto")
    assert report.by_method == {"move": 0, "get": len(pacs_sample.ct_files)}
    assert any("DicomModalities" in w for w in report.warnings) and report.warnings[-1] == "pulled by C-GET instead"


@pytest.mark.parametrize("engine", ["pynetdicom", "dcmtk"])
def test_move_destination_unknown_standard_status(private_network: object, tmp_path: Path, engine: str) -> None:
    """0xA801 (the standard's answer) from pynetdicom's own Query/Retrieve SCP."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

    def on_move(event):  # type: ignore[no-untyped-def]
        yield None, None  # "I do not know this destination"

    ae = AE("QRSCP")
    ae.add_supported_context(MOVE)
    port = free_port()
    server = ae.start_server((LOOPBACK, port), block=False, evt_handlers=[(evt.EVT_C_MOVE, on_move)])
    try:
        node = nodes_from_dict({"nodes": {"qr": {"ae_title": "QRSCP", "host": LOOPBACK, "port": port,
                                                 "our_port": free_port(), "retries": 0,
                                                 "engine": engine}}}).get("qr")
        from medpipe.pacs.dcmtk import DcmtkSession, dcmtk_tool
        from medpipe.pacs.listing import Instance, Need, SeriesItem
        from medpipe.pacs.retrieve import MoveSession
        from medpipe.pacs.scp import StoreHandler
        from medpipe.pacs.store import InstanceStore

        item = SeriesItem("1.2.3", "1.2.3.4", instances=[Instance("1.2.3.4.5", "1.2.840.10008.5.1.4.1.1.2")])
        tool = dcmtk_tool(node, "move")
        session = DcmtkSession(node, InstanceStore(tmp_path), "move", tool) if tool else \
            MoveSession(node, StoreHandler(InstanceStore(tmp_path)))
        with session as s, pytest.raises(PacsError) as err:
            s.fetch(item, Need(instances=item.instances or []))
        assert "does not know the move destination MEDPIPE (status 0xA801)" in str(err.value)
        assert "in DicomModalities" in str(err.value)
    finally:
        server.shutdown()


def test_refused_sop_class(orthanc: Orthanc, tmp_path: Path) -> None:
    from tests.dicom_factory import pattern, write_series

    private = "1.2.826.0.1.3680043.8.498.99.1"
    write_series(tmp_path / "odd", pattern((8, 8, 2), seed=2), patient_id="ODD", tag="odd", seed=2)
    for p in sorted((tmp_path / "odd").rglob("*.dcm")):
        ds = pydicom.dcmread(p)
        ds.SOPClassUID = private
        ds.file_meta.MediaStorageSOPClassUID = private
        ds.save_as(p, enforce_file_format=True)
    line = _fails(tmp_path, node_settings(orthanc), "pacs", "push", str(tmp_path / "odd"))
    assert f"refused SOP class {private}" in line and "enable it at the PACS" in line
    report = push(_node(orthanc), sorted((tmp_path / "odd").rglob("*.dcm")))
    assert [r.status for r in report.results] == ["failed", "failed"]


def test_timeout(private_network: object, tmp_path: Path) -> None:
    """A port that accepts connections and never answers (a firewall appliance, a wrong service)."""
    silent = socket.socket()
    silent.bind((LOOPBACK, 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    try:
        settings = {"ae_title": "SILENT", "host": LOOPBACK, "port": port, "timeout": 1, "retries": 0}
        t0 = time.monotonic()
        line = _fails(tmp_path, settings, "pacs", "echo")
        assert "did not answer the association request within 1 s" in line and "raise timeout" in line
        assert time.monotonic() - t0 < 8
    finally:
        silent.close()


def test_connection_refused_retried_with_backoff(private_network: object, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens there
    settings = {"ae_title": "NOBODY", "host": LOOPBACK, "port": port, "retries": 2, "retry_delay": 0.05}
    with caplog.at_level(logging.WARNING, logger="medpipe.pacs"):
        line = _fails(tmp_path, settings, "pacs", "pull", "--patient-id", "X", "--out", str(tmp_path / "o"))
    assert f"connection refused by pacs ({LOOPBACK}:{port})" in line and "check host and port" in line
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 2 and "retry 1 of 2 in 0.1 s" in retries[0] and "retry 2 of 2 in 0.1 s" in retries[1]


def test_wrong_dicomweb_root(orthanc: Orthanc, tmp_path: Path) -> None:
    settings = node_settings(orthanc, dicomweb=orthanc.url)  # Orthanc's root, not its DICOMweb root
    line = _fails(tmp_path, settings, "pacs", "find", "--via", "dicomweb", "--modality", "MR")
    assert "is " + orthanc.url + " the DICOMweb root?" in line and "Orthanc's is http://HOST:8042/dicom-web" in line


def _kill_after(o: Orthanc, n: int, sig: int) -> tuple[list[Path], threading.Event, Callable[[Path], None]]:
    arrived: list[Path] = []
    done = threading.Event()
    lock = threading.Lock()

    def on_instance(path: Path) -> None:
        with lock:
            arrived.append(path)
            if len(arrived) == n:
                threading.Thread(target=lambda: (o.stop(sig), done.set()), daemon=True).start()

    return arrived, done, on_instance


@pytest.mark.parametrize("method", ["move", "wado"])
def test_orthanc_stopped_mid_pull_then_resumed(private_network: object, pacs_sample: Sample, tmp_path: Path,
                                               method: str) -> None:
    port = free_port()
    o = Orthanc(tmp_path / "orthanc", modalities={"medpipe": ("MEDPIPE", port)}).start()
    try:
        o.upload(pacs_sample.files)
        node = _node(o, our_port=port, retries=1, retry_delay=0.2)
        query = StudyQuery(study_uids=(pacs_sample.mr_study, pacs_sample.ct_study))
        # SIGKILL: on SIGTERM Orthanc finishes the C-MOVEs under way before it stops (the pull then succeeds)
        _, stopped, on_instance = _kill_after(o, 10, signal.SIGKILL)
        with pytest.raises(PacsError) as err:
            pull(node, query, tmp_path / "out", methods=(method,), on_instance=on_instance)
        assert stopped.wait(30)
        msg = str(err.value)
        assert err.value.transient and "not pulled" in msg and ("refused" in msg or "went away" in msg), msg
        got = sorted((tmp_path / "out").rglob("*.dcm"))
        assert 10 <= len(got) < len(pacs_sample.files)
        assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file() and p.suffix != ".dcm"]  # no half file

        o.start()  # same storage: Orthanc comes back with everything
        again = pull(node, query, tmp_path / "out", methods=(method,))
        assert again.already == len(got) and again.received == len(pacs_sample.files) - len(got)
        originals = pacs_sample.by_sop()
        files = sorted((tmp_path / "out").rglob("*.dcm"))
        assert len(files) == len(pacs_sample.files)
        for p in files:
            assert dataset_bytes(p.read_bytes()) == dataset_bytes(originals[p.stem].read_bytes())
    finally:
        o.stop()


def test_orthanc_back_within_the_retries(private_network: object, pacs_sample: Sample, tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """Orthanc killed mid-pull and started again during the back-off: one pull call finishes the job."""
    port = free_port()
    o = Orthanc(tmp_path / "orthanc", modalities={"medpipe": ("MEDPIPE", port)}).start()
    try:
        o.upload(pacs_sample.files)
        # pynetdicom's storage SCP: on_instance runs inside its C-STORE (dcmtk's engine places files after each run)
        node = _node(o, our_port=port, retries=6, retry_delay=0.5, engine="pynetdicom")
        tenth = threading.Event()
        count = [0]

        def on_instance(path: Path) -> None:
            count[0] += 1
            if count[0] == 10:
                tenth.set()
                time.sleep(1.0)  # hold this C-STORE: Orthanc dies in the middle of the C-MOVE

        result: list[object] = []
        query = StudyQuery(study_uids=(pacs_sample.mr_study, pacs_sample.ct_study))
        worker = threading.Thread(target=lambda: result.append(_try(lambda: pull(
            node, query, tmp_path / "out", methods=("move",), on_instance=on_instance))))
        with caplog.at_level(logging.WARNING, logger="medpipe.pacs"):
            worker.start()
            assert tenth.wait(60)
            o.stop(signal.SIGKILL)  # started again from this (the main) thread, which outlives it
            time.sleep(0.3)
            o.start()
            worker.join(120)
        report = result[0]
        assert not isinstance(report, BaseException), report
        assert report.received == len(pacs_sample.files) == report.expected  # type: ignore[attr-defined]
        assert any("retry 1 of 6" in r.getMessage() for r in caplog.records)
    finally:
        o.stop()


def _try(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except BaseException as exc:  # handed to the test thread
        return exc

"""dcmtk's ``movescu`` / ``storescp`` / ``getscu`` as the DIMSE transfer engine of a pull (``engine:`` in the
node file).

pynetdicom costs 2-3 ms of CPU per received instance in pure Python; dcmtk's C++ tools a fraction of
that (benchmarks/README.md, PACS section). With ``engine: auto`` (the default) C-MOVE runs through
dcmtk when it is installed; ``engine: dcmtk`` also uses ``getscu`` for C-GET (see below) and fails
when the tools are missing; ``engine: pynetdicom`` never uses them.

What medpipe plans stays the same (the series and missing instances from C-FIND); per series (for
C-GET, per study nothing of which is on disk: :func:`medpipe.pacs.pull.pull`) one tool run fetches
them into a staging folder under the output (same file system), and every received file is moved
(``os.replace``) to its place in the layout while the tool runs and at its end, instances already
there skipped; the staging folder is removed. dcmtk writes bit-preserving (``+B``: the data set as
received; the tools then write to their working folder whatever ``-od`` says, so they run in the
staging folder). The tools receive one instance at a time, so only the newest staged file can be
incomplete: it waits for the run's end, and after a run that did not end cleanly it is dropped, so
the layout never holds a partial file. dcmtk's exit status and error lines become
the same one-line causes as the pynetdicom path (:mod:`medpipe.pacs.dimse`).

* C-MOVE: ``storescp`` runs for the whole pull on ``our_port`` as our AE (the move destination),
  accepting every transfer syntax (``+xa``): the PACS sends what it stores; ``movescu`` (without a
  port of its own: with one, movescu 3.6.7 idles about a second per run) sends one C-MOVE per series.
  storescp takes one association at a time and writes under the final names, so series are moved one
  after another. It listens on every interface (no bind address: a node with ``bind`` keeps pynetdicom).
* ``getscu`` (dcmtk 3.6.7) proposes one storage context per SOP class with several transfer syntaxes
  and lets the PACS choose: Orthanc then sends compressed instances transcoded to Explicit VR Little
  Endian. Hence ``auto`` keeps pynetdicom for C-GET (one context per syntax: nothing transcoded);
  ``engine: dcmtk`` uses getscu where uncompressed copies are acceptable.
* The pull's listing (C-FIND) runs through ``findscu`` with ``engine: dcmtk`` (:class:`DcmtkFinder`), so such
  a pull never imports pynetdicom (nor pydicom, for plain ASCII queries and answers); ``auto`` lists with pynetdicom, as ``medpipe pacs find`` always does.
* dcmtk has no TLS in these tools: a node with DIMSE TLS uses pynetdicom (``engine: dcmtk`` is an error).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from medpipe.errors import ConfigError, PacsError
from medpipe.pacs.dimse import DimseFinder, Found, _text, _unreachable, identifier, probe, register_line
from medpipe.pacs.nodes import PacsNode
from medpipe.pacs.store import STAGING, InstanceStore

if TYPE_CHECKING:  # pragma: no cover
    from medpipe.pacs.listing import Need, SeriesItem

#: seconds between placing what a running tool has received so far (the layout fills while it runs)
PLACE_EVERY = 0.05
#: dcmtk leaves Nagle's algorithm on unless TCP_NODELAY is set: each small PDU then waits for a delayed ACK
NODELAY = {"TCP_NODELAY": "1"}
#: dcmtk's names of C-MOVE / C-GET failure statuses (DU_cmoveStatusString) -> the status code
STATUS_NAMES = {
    "MoveDestinationUnknown": 0xA801,
    "OutOfResourcesNumberOfMatches": 0xA701,
    "OutOfResourcesSubOperations": 0xA702,
    "OutOfResources": 0xA700,
    "IdentifierDoesNotMatchSOPClass": 0xA900,
    "UnableToProcess": 0xC000,
    "SOPClassNotSupported": 0x0122,
}


@functools.cache
def find_tool(name: str) -> tuple[str, str] | str:
    """(path, version) of dcmtk's ``name`` (``movescu``, ``getscu``), or why there is none.

    pynetdicom installs Python apps of the same names next to the interpreter, and a virtual
    environment's bin folder usually comes first on PATH: each candidate on PATH (then /usr/bin) is
    asked for its version, and only one that says ``$dcmtk`` counts.
    """
    dirs = [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin", "/usr/local/bin"]
    for d in dict.fromkeys(d for d in dirs if d):
        path = shutil.which(name, path=d)
        if path is None or not _native(path):  # pynetdicom's are Python scripts: not run (each would import it)
            continue
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        first = out.strip().splitlines()[0] if out.strip() else ""
        if first.startswith("$dcmtk"):
            return path, first.strip("$ ").removeprefix("dcmtk: ")
    return f"dcmtk's {name} is not installed (apt-get install dcmtk); a {name} that is not dcmtk's does not count"


def _native(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(2) != b"#!"
    except OSError:
        return False


def dcmtk_tool(node: PacsNode, way: str) -> str | None:
    """The dcmtk tool that runs ``way`` ("move", "get", "find": the listing) for ``node``, or None for pynetdicom."""
    names = {"move": ("movescu", "storescp"), "get": ("getscu",), "find": ("findscu",)}.get(way)
    if names is None or node.engine == "pynetdicom" or (node.engine == "auto" and way in ("get", "find")):
        return None
    tls = node.tls is not None and node.tls.dimse
    bound = way == "move" and node.bind not in ("", "0.0.0.0", "::")
    tools = [find_tool(name) for name in names]
    found = next((t for t in tools if isinstance(t, str)), tools[0])
    if node.engine == "dcmtk":
        if tls:
            raise ConfigError(f"PACS node {node.name}: engine dcmtk has no DIMSE TLS",
                              hint="use engine: pynetdicom (or auto) for a node with tls: dimse: true")
        if bound:
            raise ConfigError(f"PACS node {node.name}: engine dcmtk cannot receive a C-MOVE on bind {node.bind} "
                              "only (storescp listens on every interface)",
                              hint="remove bind from the node, or use engine: pynetdicom (or auto)")
        if isinstance(found, str):
            raise ConfigError(f"PACS node {node.name}: engine dcmtk, but {found}",
                              hint="install dcmtk, or use engine: auto / pynetdicom in the node file")
    if tls or bound or isinstance(found, str):
        return None
    return found[0]


class DcmtkSession:
    """``fetch(series, missing)`` by one movescu / getscu run per series and identifier."""

    def __init__(self, node: PacsNode, store: InstanceStore, way: str, tool: str,
                 staging: Path | None = None) -> None:
        self.node = node
        self.store = store
        self.way = way
        self.tool = tool
        self.method = way
        self.label = "C-MOVE" if way == "move" else "C-GET"
        self.staging = staging  # C-MOVE: the receiver's folder; C-GET: one of its own
        self._own = staging is None

    def __enter__(self) -> Self:
        if self._own:
            self.staging = new_staging(self.store)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._own and self.staging is not None:
            drop_staging(self.staging)
            self.staging = None

    def fetch(self, item: SeriesItem, need: Need) -> None:
        what = (f"C-MOVE of series {item.series_uid} from {self.node.name} to {self.node.our_ae_title}"
                if self.way == "move" else f"C-GET of series {item.series_uid} from {self.node.name}")
        for keys in identifier_keys(item, need):
            self._run(keys, what)

    def fetch_study(self, study_uid: str) -> None:
        """The whole study by one STUDY-level request (one association): what a pull asks for a study nothing of
        which is on disk yet (:func:`medpipe.pacs.pull.pull`)."""
        what = (f"C-MOVE of study {study_uid} from {self.node.name} to {self.node.our_ae_title}"
                if self.way == "move" else f"C-GET of study {study_uid} from {self.node.name}")
        self._run(["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}"], what)

    def _run(self, keys: list[str], what: str) -> None:
        """One tool run; what it received is placed while it runs (all but the file being written) and at the end."""
        assert self.staging is not None, "use the session as a context manager"
        arrived = 0
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(self.command(keys), stdout=subprocess.DEVNULL, stderr=err,
                                    env={**os.environ, **NODELAY}, cwd=self.staging)
            try:
                while True:
                    try:
                        proc.wait(PLACE_EVERY)
                        break
                    except subprocess.TimeoutExpired:
                        arrived += place_staged(self.store, self.staging, clean=False, running=True)
            finally:
                if proc.poll() is None:  # interrupted here: the tool does not outlive the pull
                    proc.kill()
                    proc.wait()
            err.seek(0)
            stderr = err.read().decode("utf-8", "replace")
        clean = proc.returncode == 0 and not _errors(stderr)
        arrived += place_staged(self.store, self.staging, clean=clean)
        if not clean:
            raise failure(self.node, self.way, what, self.tool, proc.returncode, stderr, arrived)

    def command(self, keys: list[str]) -> list[str]:
        node = self.node
        host, port, aet = node.dimse_address()
        seconds, pdu = _limits(node)
        cmd = [self.tool, "-S", "-aet", node.our_ae_title, "-aec", aet, "-to", seconds, "-ta", seconds, "-td",
               seconds, "-pdu", pdu]
        cmd += ["-aem", node.our_ae_title] if self.way == "move" else ["+B", "-od", "."]
        for k in keys:
            cmd += ["-k", k]
        return [*cmd, host, str(port)]


class DcmtkFinder(DimseFinder):
    """C-FIND (Study Root) by dcmtk's ``findscu`` (``engine: dcmtk``): the query as a file, the answers extracted
    to files and read by pydicom; the same levels and return keys as :class:`~medpipe.pacs.dimse.DimseFinder`,
    without importing pynetdicom (0.3-0.5 s of a pull's listing on a busy machine)."""

    def __init__(self, node: PacsNode, tool: str) -> None:
        super().__init__(node)
        self.tool = tool
        self.folder: Path | None = None

    def __enter__(self) -> Self:
        self.folder = Path(tempfile.mkdtemp(prefix="medpipe-findscu-"))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def find(self, level: str, keys: dict[str, Any]) -> list[Found]:
        assert self.folder is not None, "use the finder as a context manager"
        node = self.node
        host, port, aet = node.dimse_address()
        what = f"C-FIND ({level.lower()} level) at {node.name}"
        run = self.folder / uuid.uuid4().hex
        run.mkdir()
        seconds, _ = _limits(node)
        proc = subprocess.run([self.tool, "-S", "-aet", node.our_ae_title, "-aec", aet, "-to", seconds, "-ta",
                               seconds, "-td", seconds, "-X", "-od", str(run), host, str(port),
                               *_query(run, level, keys)],
                              capture_output=True, text=True, check=False, env={**os.environ, **NODELAY})
        answers = sorted(run.glob("rsp*.dcm"))
        if proc.returncode != 0 or _errors(proc.stderr):
            raise failure(node, "find", what, self.tool, proc.returncode, proc.stderr, len(answers))
        out = [Found(answer_values(path, keys)) for path in answers]
        shutil.rmtree(run, ignore_errors=True)
        return out


#: tags of the keywords medpipe's C-FIND identifiers use (a test holds them equal to pydicom's dictionary), so
#: that findscu's query and answers need no pydicom (importing it is most of a fresh pull's listing time)
FIND_TAGS = {
    "PatientName": 0x00100010, "PatientID": 0x00100020, "StudyDate": 0x00080020, "StudyTime": 0x00080030,
    "AccessionNumber": 0x00080050, "ModalitiesInStudy": 0x00080061, "SOPClassesInStudy": 0x00080062,
    "StudyDescription": 0x00081030, "StudyInstanceUID": 0x0020000D, "NumberOfStudyRelatedSeries": 0x00201206,
    "NumberOfStudyRelatedInstances": 0x00201208, "SeriesInstanceUID": 0x0020000E, "Modality": 0x00080060,
    "SeriesNumber": 0x00200011, "SeriesDescription": 0x0008103E, "NumberOfSeriesRelatedInstances": 0x00201209,
    "SOPInstanceUID": 0x00080018, "SOPClassUID": 0x00080016, "InstanceNumber": 0x00200013,
}


def _query(run: Path, level: str, keys: dict[str, Any]) -> list[str]:
    """findscu's query: ``-k`` options for plain ASCII values, else a query file written by pydicom."""
    values = {k: "\\".join(v) if isinstance(v, (list, tuple)) else str(v) for k, v in keys.items()}
    if all(v.isascii() and "\n" not in v for v in values.values()):
        return [x for k, v in {"QueryRetrieveLevel": level, **values}.items() for x in ("-k", f"{k}={v}")]
    query = run / "query.dcm"
    identifier(level, keys).save_as(query, implicit_vr=True, little_endian=True)
    return [str(query)]


def answer_values(path: Path, keys: dict[str, Any]) -> dict[str, str]:
    """The ``keys`` of one findscu answer file as text (what :func:`~medpipe.pacs.dimse._text` gives): read by
    hand where every value is plain ASCII in a little endian data set without nested items, else by pydicom."""
    from medpipe.pacs.scp import scan_values

    data = path.read_bytes()
    found = part10_body(data)
    tags = {k: FIND_TAGS.get(k) for k in keys}
    if found is not None and None not in tags.values() and found[1] in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1"):
        raw = scan_values(memoryview(data)[found[0]:], found[1] == "1.2.840.10008.1.2",
                          [t for t in tags.values() if t is not None])
        if raw is not None and all(v.isascii() for v in raw.values()):
            parts = {k: [x.strip(" \0") for x in raw.get(t, b"").decode("ascii").split("\\")]  # type: ignore[arg-type]
                     for k, t in tags.items()}
            if all(x == x.lstrip() for xs in parts.values() for x in xs):  # pydicom keeps some leading spaces
                return {k: "\\".join(xs) if any(xs) else "" for k, xs in parts.items()}
    import pydicom

    ds = pydicom.dcmread(path, force=True)
    return {k: _text(ds, k) for k in keys}


def _limits(node: PacsNode) -> tuple[str, str]:
    """The node's timeout in whole seconds and its PDU size within what dcmtk accepts (4096..131072)."""
    return str(max(1, math.ceil(node.timeout))), str(min(max(node.max_pdu or 131072, 4096), 131072))


def _errors(stderr: str) -> bool:
    """Whether a dcmtk tool logged an error or a fatal error (``E:`` / ``F:`` lines; it may still exit with 0)."""
    return any(line[:2] in ("E:", "F:") for line in stderr.splitlines())


def new_staging(store: InstanceStore) -> Path:
    staging = store.root / STAGING / uuid.uuid4().hex
    for _ in range(100):
        try:
            staging.mkdir(parents=True)
            return staging
        except FileNotFoundError:  # a session that just finished removed the (then empty) parent: again
            continue
    raise OSError(f"cannot create the staging folder {staging}")


def drop_staging(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(OSError):
        staging.parent.rmdir()  # only when no other session stages there


class MoveReceiver:
    """dcmtk's ``storescp`` as our C-MOVE destination for one pull: ``our_port``, our AE title, every transfer
    syntax, bit-preserving, into a staging folder (:attr:`staging`) that the C-MOVE sessions place from."""

    def __init__(self, node: PacsNode, store: InstanceStore) -> None:
        self.node = node
        self.store = store
        self.staging: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def __enter__(self) -> Self:
        tool = find_tool("storescp")
        if isinstance(tool, str):
            raise ConfigError(f"PACS node {self.node.name}: engine dcmtk, but {tool}")
        node = self.node
        self.staging = new_staging(self.store)
        seconds, pdu = _limits(node)
        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen([tool[0], "-aet", node.our_ae_title, "+xa", "+B", "-od", ".", "-pdu", pdu,
                                       "-ta", seconds, "-td", seconds, str(node.our_port)], cwd=self.staging,
                                      stdout=subprocess.DEVNULL, stderr=self._log, env={**os.environ, **NODELAY})
        deadline = time.monotonic() + 10.0
        while self._proc.poll() is None and time.monotonic() < deadline:
            if probe("127.0.0.1", node.our_port, 1.0) is None:
                return self
            time.sleep(0.02)
        self._log.seek(0)
        lines = [x.strip() for x in self._log.read().decode("utf-8", "replace").splitlines() if x.strip()]
        self.__exit__(None, None, None)
        if any("Address already in use" in x for x in lines):
            raise PacsError(f"cannot receive on *:{node.our_port}: the port is in use (another medpipe pull or "
                            "listener, or another DICOM server); choose another port (our_port in the node file)")
        raise PacsError(f"dcmtk's storescp could not receive on port {node.our_port}"
                        f"{'; its last line: ' + lines[-1][:300] if lines else ' (it did not start listening)'}")

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.staging is not None:
            drop_staging(self.staging)
            self.staging = None


def identifier_keys(item: SeriesItem, need: Need) -> Iterator[list[str]]:
    """The ``-k`` keys of each request: SERIES level for a whole series, else IMAGE level in chunks of UIDs."""
    from medpipe.pacs.retrieve import UIDS_PER_REQUEST

    base = [f"StudyInstanceUID={item.study_uid}", f"SeriesInstanceUID={item.series_uid}"]
    if need.whole:
        yield ["QueryRetrieveLevel=SERIES", *base]
        return
    uids = [i.sop_uid for i in need.instances]
    for a in range(0, len(uids), UIDS_PER_REQUEST):
        yield ["QueryRetrieveLevel=IMAGE", *base, "SOPInstanceUID=" + "\\".join(uids[a:a + UIDS_PER_REQUEST])]


def place_staged(store: InstanceStore, staging: Path, *, clean: bool, running: bool = False) -> int:
    """Move each file dcmtk received into the layout (atomically; one already there is kept); return how many
    were placed.

    The tools receive one instance at a time, so only the newest file can be incomplete: while they run
    (``running``) it is left for later, and after a run that did not end cleanly it is dropped (asked again,
    or reported). "Newest" is every file with the latest modification time, as file systems stamp times
    coarsely (a complete file and the one begun after it can share a time).
    """
    files = [(p, p.stat().st_mtime_ns) for p in staging.iterdir() if p.is_file()]
    if files and (running or not clean):
        latest = max(t for _, t in files)
        if not running:
            for p, t in files:
                if t == latest:
                    p.unlink()
        files = [(p, t) for p, t in files if t != latest]
    placed = 0
    for path, _ in files:
        uids = file_uids(path)
        if uids is None or not all(uids):
            path.unlink()  # not a file dcmtk could have written from a valid instance: asked again, or reported
            continue
        if store.place(*uids, path):
            placed += 1
    return placed


_META = struct.Struct("<HH2s")
#: bytes of a received file read first for its UIDs (the rest only when its header is longer)
HEAD_BYTES = 65536


def part10_body(data: bytes) -> tuple[int, str] | None:
    """Where the data set of a Part 10 file starts and its transfer syntax (the meta group read by hand); None
    without the ``DICM`` prefix."""
    if data[128:132] != b"DICM":
        return None
    pos, syntax = 132, ""
    while pos + 8 <= len(data):
        group, elem, vr = _META.unpack_from(data, pos)
        if group != 0x0002:
            break
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
            length, head = struct.unpack_from("<I", data, pos + 8)[0], 12
        else:
            length, head = struct.unpack_from("<H", data, pos + 6)[0], 8
        if elem == 0x0010:
            syntax = data[pos + head:pos + head + length].decode("ascii", "replace").strip(" \0")
        pos += head + length
    return pos, syntax


def file_uids(path: Path) -> tuple[str, str, str] | None:
    """(Study, Series, SOP Instance UID) of a Part 10 file: its meta group read by hand, the data set by
    :func:`~medpipe.pacs.scp.scan_uids` (little endian), else by pydicom. None for an unreadable file."""
    from medpipe.pacs.scp import scan_uids

    with open(path, "rb") as fh:
        data = fh.read(HEAD_BYTES)  # the UIDs come before the pixels: most files need no more
        found = part10_body(data)
        if found is None:
            return None
        pos, syntax = found
        if syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1") or syntax.startswith("1.2.840.10008.1.2.4") or \
                syntax == "1.2.840.10008.1.2.5":
            uids = scan_uids(memoryview(data)[pos:], syntax == "1.2.840.10008.1.2")
            if (uids is None or not all(uids)) and len(data) == HEAD_BYTES:  # cut off by the head: all of it
                data += fh.read()
                uids = scan_uids(memoryview(data)[pos:], syntax == "1.2.840.10008.1.2")
            if uids is not None:
                return uids
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SeriesInstanceUID",
                                                                             "SOPInstanceUID"])
    except Exception:  # noqa: BLE001 - any parse error: not placed
        return None
    return tuple(str(ds.get(k, "") or "").strip() for k in  # type: ignore[return-value]
                 ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))


def our_address(node: PacsNode) -> str | None:
    """Our address towards the PACS (for the line to add there), or None when it cannot be reached."""
    host, port, _ = node.dimse_address()
    try:
        with socket.create_connection((host, port), timeout=min(node.timeout, 5.0)) as sock:
            return str(sock.getsockname()[0])
    except OSError:
        return None


def failure(node: PacsNode, way: str, what: str, tool: str, rc: int, stderr: str, arrived: int) -> PacsError:
    """dcmtk's exit status and error lines as medpipe's one-line cause (see :mod:`medpipe.pacs.dimse`)."""
    from medpipe.pacs.dimse import status_text
    from medpipe.pacs.retrieve import move_refused

    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    text = "\n".join(lines)
    host, port, aet = node.dimse_address()
    if "Connection refused" in text:
        return _unreachable(node, ConnectionRefusedError(), what)
    if "timed out" in text.lower() and "TCP Initialization Error" in text:
        return _unreachable(node, TimeoutError(), what)
    if "Name or service not known" in text or "unknown host" in text.lower():
        return _unreachable(node, socket.gaierror(), what)
    if "Association Rejected" in text:
        if "Calling AE Title Not Recognized" in text:
            return PacsError(f"{what}: {node.name} rejected the association: it does not know our calling AE "
                             f"title {node.our_ae_title}; {register_line(node, our_address(node))}")
        if "Called AE Title Not Recognized" in text:
            return PacsError(f"{what}: {node.name} rejected the association: '{aet}' is not its AE title; fix "
                             "ae_title in the node file")
        transient = "Transient" in text
        return PacsError(f"{what}: {node.name} rejected the association ({lines[-1]})", transient=transient)
    code = next((c for name, c in STATUS_NAMES.items() if f": {name}" in text), None)
    if code is not None:
        if way == "move" and code == 0xA801:
            return move_refused(node, what, code, our_address(node), sent_nothing=False)
        if way == "move" and 0xC000 <= code <= 0xCFFF and arrived == 0:
            return move_refused(node, what, code, our_address(node), sent_nothing=True)
        if 0xA700 <= code <= 0xA7FF:
            return PacsError(f"{what}: {node.name} is out of resources (status 0x{code:04X}); try again later",
                             transient=True)
        return PacsError(f"{what}: status 0x{code:04X} ({status_text(code)})", transient=arrived > 0)
    if "timeout" in text.lower() and ("negotiate association" in text or "Association Request Failed" in text):
        return PacsError(f"{what}: {node.name} ({host}:{port}) accepted the connection but did not answer the "
                         f"association request within {node.timeout:g} s: is this a DICOM port (TLS expected?); "
                         "check port and tls in the node file, or raise timeout", transient=True)
    if "timeout" in text.lower():
        return PacsError(f"{what}: {node.name} sent no response within {node.timeout:g} s (DIMSE timeout): the PACS "
                         "may be overloaded; raise timeout in the node file or try again", transient=True)
    if "Peer aborted Association" in text or "Association Aborted" in text:
        down = probe(host, port, node.timeout)
        if isinstance(down, ConnectionRefusedError):
            return PacsError(f"{what}: {node.name} went away (connection lost, and {host}:{port} now refuses "
                             "connections); run the same command again when the PACS is back: what arrived is kept",
                             transient=True)
        if down is not None:
            return _unreachable(node, down, what)
        if arrived == 0:
            return PacsError(f"{what}: {node.name} ended the association without any answer: it does not accept "
                             f"this request from our calling AE title {node.our_ae_title}; "
                             f"{register_line(node, our_address(node))}")
        return PacsError(f"{what}: connection to {node.name} lost in the middle; run the command again: what "
                         "arrived is kept", transient=True)
    last = lines[-1] if lines else "no error output"
    return PacsError(f"{what}: dcmtk's {Path(tool).name} failed (exit status {rc}) in a way medpipe does not "
                     f"recognise; its last line: {last[:300]}")

"""medpipe's storage SCP: receives C-STORE requests and writes each instance, unchanged, into an InstanceStore.

Used as the C-MOVE destination of a pull (started for the pull only), by ``medpipe listen``, and (the
handler alone) for the C-STORE sub-operations that arrive on a C-GET association.

Each instance is written as pynetdicom received it (``Event.encoded_dataset()``: the data set bytes as
sent, in the negotiated transfer syntax, behind a fresh file meta header), never decoded and
re-encoded; every storage SOP class is accepted in every transfer syntax pynetdicom knows, so the
sender never has to transcode. An object without Study / Series / SOP Instance UIDs, or whose SOP
Instance UID differs from the request's, is refused with a failure status and counted; a failing
disk answers "out of resources". Nothing a peer sends can stop the server.

With an :class:`AllowList` (``medpipe listen --allow AE --allow-node NODE``) only the calling AE titles
it names may associate at all (a node also pins the address the association must come from); any
other association is rejected (A-ASSOCIATE-RJ: permanent, calling AE title not recognised) and
logged in one line with the reason and the fix.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medpipe.errors import ConfigError, PacsError
from medpipe.pacs.nodes import PacsNode, check_ae_title
from medpipe.pacs.store import InstanceStore

log = logging.getLogger("medpipe.pacs")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000


@dataclass(frozen=True)
class Stored:
    """One instance received and written (or already there)."""

    study_uid: str
    series_uid: str
    sop_uid: str
    path: Path
    calling_ae: str
    new: bool


@dataclass(frozen=True)
class AllowList:
    """The calling AE titles that may associate with our storage SCP.

    ``addresses[ae]`` is the set of peer IP addresses an AE title must come from (the resolved host of
    the node it was taken from), or empty for any address; ``origin[ae]`` says where the entry came
    from, for the log line.
    """

    addresses: dict[str, frozenset[str]] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, ae_titles: Iterable[str] = (), nodes: Iterable[PacsNode] = ()) -> AllowList:
        """From ``--allow`` AE titles (any address) and ``--allow-node`` nodes (their AE title from their host)."""
        addresses: dict[str, frozenset[str]] = {}
        origin: dict[str, str] = {}
        for node in nodes:
            if node.ae_title is None or node.host is None:
                raise ConfigError(f"--allow-node {node.name}: the node has no DIMSE ae_title and host, so its "
                                  "associations cannot be recognised", hint="add ae_title, host and port to the "
                                  "node, or use --allow AE_TITLE")
            ips = _resolve(node.host, f"--allow-node {node.name}")
            addresses[node.ae_title] = addresses.get(node.ae_title, frozenset()) | ips
            origin[node.ae_title] = f"node {node.name} at {node.host}"
        for title in ae_titles:
            try:
                title = check_ae_title(title)
            except ValueError as exc:
                raise ConfigError(f"--allow {title!r}: {exc}") from None
            addresses[title] = frozenset()  # from anywhere: wins over a node's host
            origin[title] = "--allow"
        return cls(addresses, origin)

    def __bool__(self) -> bool:
        return bool(self.addresses)

    def refusal(self, calling: str, address: str) -> str | None:
        """None when ``calling`` from ``address`` may associate; else the reason and the fix, one line."""
        calling = calling.strip()
        if calling not in self.addresses:
            return (f"calling AE title {calling!r} is not allowed to store here (allowed: "
                    f"{', '.join(sorted(self.addresses))}); to accept it, add --allow {calling} (or --allow-node "
                    "with its node)")
        ips = self.addresses[calling]
        if ips and _plain_ip(address) not in ips:
            return (f"calling AE title {calling!r} is allowed from {self.origin[calling]} ({', '.join(sorted(ips))}) "
                    f"but came from {address}: fix host of that node in the node file, or --allow {calling} to "
                    "accept it from any address")
        return None


def _plain_ip(address: str) -> str:
    """An IPv4-mapped IPv6 peer address (``::ffff:10.0.0.5``) as the IPv4 address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


def _resolve(host: str, what: str) -> frozenset[str]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise ConfigError(f"{what}: cannot resolve host {host!r} ({exc.strerror or exc})",
                          hint="fix host in the node file, or use --allow AE_TITLE") from None
    return frozenset(_plain_ip(str(info[4][0])) for info in infos)


class AssociationGate:
    """EVT_REQUESTED handler: reject associations the :class:`AllowList` does not allow, with a log line."""

    def __init__(self, allow: AllowList) -> None:
        self.allow = allow
        self.lock = threading.Lock()
        self.rejected: list[str] = []  # the reasons, newest last (at most 100 kept)

    def __call__(self, event: Any) -> None:
        assoc = event.assoc
        calling = str(getattr(assoc.requestor.primitive, "calling_ae_title", "") or "").strip()
        address = str(assoc.requestor.address or "?")
        why = self.allow.refusal(calling, address)
        if why is None:
            return
        with self.lock:
            self.rejected = [*self.rejected[-99:], why]
        log.warning("rejected an association from %s: %s", address, why)
        # what pynetdicom does for its own require_calling_aet: A-ASSOCIATE-RJ (rejected permanent,
        # service user, calling AE title not recognised), then end the association
        assoc.acse.send_reject(0x01, 0x01, 0x03)
        assoc.kill()


class StoreHandler:
    """The EVT_C_STORE handler: validate the UIDs, write the bytes, answer with a status."""

    def __init__(self, store: InstanceStore, on_stored: Callable[[Stored], None] | None = None) -> None:
        self.store = store
        self.on_stored = on_stored
        self.lock = threading.Lock()
        self.received = 0
        self.by_series: dict[str, int] = {}  # instances received per Series Instance UID
        self.refused = 0
        self.refusals: list[str] = []

    def _refuse(self, status: int, why: str, calling: str) -> int:
        with self.lock:
            self.refused += 1
            if len(self.refusals) < 100:
                self.refusals.append(why)
        log.warning("refused an instance from %s: %s", calling, why)
        return status

    def __call__(self, event: Any) -> int:
        calling = _calling_ae(event)
        try:
            sop = str(event.request.AffectedSOPInstanceUID or "").strip()
            study, series, own = _uids(event)
        except Exception as exc:  # a data set pydicom cannot parse: refuse it, keep serving
            return self._refuse(CANNOT_UNDERSTAND, f"data set cannot be decoded ({type(exc).__name__}: {exc})"[:200],
                                calling)
        if not (study and series and sop):
            return self._refuse(CANNOT_UNDERSTAND, "no Study, Series or SOP Instance UID", calling)
        if own != sop:
            return self._refuse(DOES_NOT_MATCH, f"SOP Instance UID {own!r} differs from the request's {sop!r}",
                                calling)
        new = not self.store.has(study, series, sop)
        try:
            if new:
                with event.request.DataSet.getbuffer() as data:  # no copy of the data set
                    path = self.store.write(study, series, sop, _header(event, calling), data)
            else:
                path = self.store.path_for(study, series, sop)
        except OSError as exc:
            log.error("cannot write instance %s: %s", sop, exc)
            return self._refuse(OUT_OF_RESOURCES, f"cannot be written: {exc.strerror or exc}", calling)
        with self.lock:
            self.received += 1
            self.by_series[series] = self.by_series.get(series, 0) + 1
        if self.on_stored is not None:
            try:
                self.on_stored(Stored(study, series, sop, path, calling, new))
            except Exception:  # the callback's problem must not fail the sender's C-STORE
                log.exception("on_stored callback failed for %s", sop)
        return SUCCESS

    def series_count(self, series_uid: str) -> int:
        with self.lock:
            return self.by_series.get(series_uid, 0)


_UID_TAGS = (0x00080018, 0x0020000D, 0x0020000E)
_SOP, _STUDY, _SERIES = _UID_TAGS
#: explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2); the other valid ones have a 2-byte length
_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"))
_SHORT_VRS = frozenset((b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN",
                        b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"))
_HEAD = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


def _uids(event: Any) -> tuple[str, str, str]:
    """(Study, Series, SOP Instance UID) of the received data set, reading its elements only up to (0020,000E).

    Little endian data sets are read from the element headers directly (:func:`scan_uids`, a tenth of
    pydicom's time, which is a large part of receiving an instance); anything else, or an element of
    undefined length before (0020,000E), is read by pydicom.
    """
    from pydicom.filereader import read_dataset

    ts = _syntax(event)
    if ts.is_deflated:  # the data set must be inflated first: let pynetdicom decode it
        ds = event.dataset
    else:
        fh = event.request.DataSet
        if ts.is_little_endian:
            with fh.getbuffer() as buf:
                found = scan_uids(buf, ts.is_implicit_VR)
            if found is not None:
                return found
        fh.seek(0)
        ds = read_dataset(fh, ts.is_implicit_VR, ts.is_little_endian, stop_when=lambda tag, vr, length: tag > 0x0020000E,
                          specific_tags=list(_UID_TAGS))
        fh.seek(0)
    return tuple(str(ds.get(k, "") or "").strip().rstrip("\0") for k in  # type: ignore[return-value]
                 ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))


def scan_uids(buf: bytes | memoryview, implicit: bool) -> tuple[str, str, str] | None:
    """(Study, Series, SOP Instance UID) from the element headers of a little endian data set, up to (0020,000E).

    None when the walk cannot go on by lengths alone (an element of undefined length, an unknown explicit
    VR, a truncated header): the caller then asks pydicom, which also reads nested items.
    """
    values = scan_values(buf, implicit, _UID_TAGS)
    if values is None:
        return None
    return tuple(values.get(t, b"").decode("ascii", "replace").strip(" \0")  # type: ignore[return-value]
                 for t in (_STUDY, _SERIES, _SOP))


def scan_values(buf: bytes | memoryview, implicit: bool, tags: Iterable[int]) -> dict[int, bytes] | None:
    """The raw values of ``tags`` (``group << 16 | element``) found at the top level of a little endian data set,
    walking element headers up to the largest of them; None where lengths alone cannot tell (see :func:`scan_uids`).
    """
    wanted = frozenset(tags)
    last = max(wanted)
    values: dict[int, bytes] = {}
    pos, end = 0, len(buf)
    while pos + 8 <= end:
        group, elem = _HEAD.unpack_from(buf, pos)
        tag = group << 16 | elem
        if tag > last:
            break
        if implicit:
            length = _U32.unpack_from(buf, pos + 4)[0]
            pos += 8
        else:
            vr = bytes(buf[pos + 4:pos + 6])
            if vr in _SHORT_VRS:
                length = _U16.unpack_from(buf, pos + 6)[0]
                pos += 8
            elif vr in _LONG_VRS and pos + 12 <= end:
                length = _U32.unpack_from(buf, pos + 8)[0]
                pos += 12
            else:
                return None
        if length == 0xFFFFFFFF or pos + length > end:
            return None
        if tag in wanted:
            values[tag] = bytes(buf[pos:pos + length])
        pos += length
    return values


def _syntax(event: Any) -> Any:
    """The transfer syntax of the presentation context the data set came in (a pydicom UID)."""
    from pydicom.uid import UID

    ts = event.context.transfer_syntax  # pynetdicom: a str (the accepted syntax), lists elsewhere
    return UID(ts[0] if isinstance(ts, (list, tuple)) else ts)


def _header(event: Any, calling: str) -> bytes:
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

    from medpipe.pacs.store import part10_header

    req = event.request
    return part10_header(str(req.AffectedSOPClassUID), str(req.AffectedSOPInstanceUID),
                         str(_syntax(event)), str(PYNETDICOM_IMPLEMENTATION_UID),
                         PYNETDICOM_IMPLEMENTATION_VERSION, calling if calling != "?" else "")


def _calling_ae(event: Any) -> str:
    try:
        return str(event.assoc.requestor.ae_title).strip()
    except AttributeError:  # pragma: no cover
        return "?"


def storage_contexts(sop_classes: Iterable[str] | None = None) -> list[Any]:
    """Storage contexts (plus Verification) in every transfer syntax pynetdicom supports: for ``sop_classes``,
    or for every storage SOP class when None (building all ~170 takes a noticeable fraction of a second)."""
    from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, build_context
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    classes = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts] if sop_classes is None \
        else sorted(set(sop_classes))
    out = [build_context(c, ALL_TRANSFER_SYNTAXES) for c in classes]
    out.append(build_context(Verification))
    return out


class StorageSCP:
    """A storage SCP on ``bind:port`` answering to ``ae_title``; a context manager (start / stop)."""

    def __init__(self, store: InstanceStore, ae_title: str, port: int, bind: str = "", *,
                 on_stored: Callable[[Stored], None] | None = None, max_pdu: int = 1 << 20,
                 timeout: float = 60.0, ssl_context: Any = None, max_associations: int = 16,
                 sop_classes: Iterable[str] | None = None, allow: AllowList | None = None) -> None:
        self.store = store
        self.ae_title = ae_title
        self.port = port
        self.bind = bind
        self.handler = StoreHandler(store, on_stored)
        self.max_pdu = max_pdu
        self.timeout = timeout
        self.ssl_context = ssl_context
        self.max_associations = max_associations
        self.sop_classes = None if sop_classes is None else sorted(set(sop_classes))
        self.gate = AssociationGate(allow) if allow else None
        self._server: Any = None

    def start(self) -> StorageSCP:
        from pynetdicom import AE, evt

        from medpipe.pacs.dimse import no_delay, quiet_pynetdicom

        quiet_pynetdicom()
        ae = AE(self.ae_title)
        ae.supported_contexts = storage_contexts(self.sop_classes)
        ae.maximum_pdu_size = self.max_pdu
        ae.acse_timeout = self.timeout
        ae.dimse_timeout = self.timeout
        ae.network_timeout = self.timeout
        ae.maximum_associations = self.max_associations
        handlers = [(evt.EVT_C_STORE, self.handler), (evt.EVT_CONN_OPEN, no_delay)]
        if self.gate is not None:
            handlers.append((evt.EVT_REQUESTED, self.gate))
        try:
            self._server = ae.start_server((self.bind, self.port), block=False, ssl_context=self.ssl_context,
                                           evt_handlers=handlers)
        except OSError as exc:
            where = f"{self.bind or '*'}:{self.port}"
            if exc.errno == errno.EADDRINUSE:
                raise PacsError(f"cannot receive on {where}: the port is in use (another medpipe pull or listener, "
                                "or another DICOM server); choose another port (our_port in the node file, or "
                                "--port)") from None
            if exc.errno == errno.EACCES:
                raise PacsError(f"cannot receive on {where}: ports below 1024 need privileges; use a port above "
                                "1024") from None
            raise PacsError(f"cannot receive on {where}: {exc.strerror or exc}") from None
        if self.port == 0:
            self.port = int(self._server.server_address[1])
        log.info("storage SCP %s listening on %s:%d", self.ae_title, self.bind or "*", self.port)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> StorageSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def received(self) -> int:
        return self.handler.received

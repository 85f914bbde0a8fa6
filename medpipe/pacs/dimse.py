"""DIMSE with pynetdicom: associations, C-ECHO and C-FIND, and every failure as one line naming cause and fix.

pynetdicom reports a failed association as flags (``is_rejected``, ``is_aborted``) and an empty status
dataset when a request gets no answer. :func:`connect` and :func:`lost` turn those into a
:class:`~medpipe.errors.PacsError` that says what happened and what to change, telling apart:

* connection refused / unknown host / no answer (a probe connection after the failure classifies it);
* the association rejected because the PACS does not know our calling AE title, or the called AE
  title is wrong, or the PACS is busy (transient);
* a request answered by an abort: Orthanc accepts associations from any AE but aborts C-FIND / C-MOVE
  / C-GET from an AE title not in its ``DicomModalities`` (no status at all), so an abort right after
  the request while the PACS still accepts connections means "unknown calling AE";
* the PACS going away in the middle (the probe is refused now): transient, retried by the callers;
* a SOP class the PACS refused during negotiation.

pynetdicom's own log lines carry identifiers (patient data) and repeat what our errors say; they are
kept at CRITICAL unless medpipe runs with ``--verbose``.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from medpipe.errors import PacsError
from medpipe.pacs.nodes import PacsNode

if TYPE_CHECKING:  # pragma: no cover
    from pydicom.dataset import Dataset
    from pynetdicom.association import Association

log = logging.getLogger("medpipe.pacs")

#: the status codes users meet, with what they mean (PS3.4 Annex C and Orthanc's habits)
STATUS_TEXT = {
    0x0000: "success",
    0x0001: "success (warning: requested optional attributes not supported)",
    0x0107: "warning: attribute list error",
    0x0122: "SOP class not supported",
    0xA700: "refused: out of resources",
    0xA701: "refused: out of resources (unable to calculate number of matches)",
    0xA702: "refused: out of resources (unable to perform sub-operations)",
    0xA801: "refused: move destination unknown",
    0xA900: "identifier does not match SOP class",
    0xB000: "warning: sub-operations complete, one or more failures",
    0xC000: "unable to process",
    0xFE00: "cancelled",
}


def status_text(code: int) -> str:
    if code in STATUS_TEXT:
        return STATUS_TEXT[code]
    if 0xA700 <= code <= 0xA7FF:
        return "refused: out of resources"
    if 0xA900 <= code <= 0xA9FF:
        return "error: data set does not match SOP class"
    if 0xC000 <= code <= 0xCFFF:
        return "error: cannot understand / unable to process"
    if 0xB000 <= code <= 0xBFFF:
        return "warning"
    return "unknown status"


def quiet_pynetdicom() -> None:
    """pynetdicom's logs only with ``--verbose``: its INFO / DEBUG lines carry identifiers (patient data).

    Without debug logging its standard event handlers are not bound either (``LOG_HANDLER_LEVEL =
    "none"``, its documented switch): they format every message for the log even when nothing is
    logged, and copy each received data set to say whether it is present, a third of a storage SCP's
    time per instance.
    """
    from pynetdicom import _config

    debug = logging.getLogger().isEnabledFor(logging.DEBUG)
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if debug else logging.CRITICAL)
    _config.LOG_HANDLER_LEVEL = "standard" if debug else "none"
    _config.LOG_REQUEST_IDENTIFIERS = debug
    _config.LOG_RESPONSE_IDENTIFIERS = debug


def no_delay(event: Any) -> None:
    """EVT_CONN_OPEN handler: TCP_NODELAY on the association's socket.

    Every DIMSE exchange is a small request answered by a small response; with Nagle's algorithm on, a
    small write can wait for the peer's delayed ACK (tens of milliseconds) and a transfer of many
    instances crawls. (dcmtk, inside most PACS, reads the environment variable TCP_NODELAY for this.)
    """
    try:
        sock = event.assoc.dul.socket.socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):  # pragma: no cover - not a TCP socket
        pass


def make_ae(node: PacsNode, ae_title: str | None = None) -> Any:
    """A pynetdicom AE with our AE title and the node's timeouts and PDU size."""
    from pynetdicom import AE

    quiet_pynetdicom()
    ae = AE(ae_title or node.our_ae_title)
    ae.acse_timeout = node.timeout
    ae.dimse_timeout = node.timeout
    ae.network_timeout = node.timeout
    ae.connection_timeout = node.timeout
    ae.maximum_pdu_size = node.max_pdu
    return ae


def tls_context(node: PacsNode, *, server: bool = False) -> ssl.SSLContext | None:
    """The SSL context for DIMSE TLS with ``node``: as client (our associations), or as server (our C-MOVE SCP,
    which needs our certificate and, with a CA file, requires the PACS's certificate signed by it)."""
    from medpipe.errors import ConfigError

    tls = node.tls
    if tls is None:
        return None
    purpose = ssl.Purpose.CLIENT_AUTH if server else ssl.Purpose.SERVER_AUTH
    try:
        ctx = ssl.create_default_context(purpose, cafile=str(tls.ca_file) if tls.ca_file else None)
        if server:
            if tls.cert_file is None:
                raise ConfigError(f"PACS node {node.name}: DIMSE TLS for a C-MOVE pull needs our certificate "
                                  "(tls: cert_file and key_file): the PACS connects to our storage SCP")
            if tls.ca_file is not None and tls.verify:
                ctx.verify_mode = ssl.CERT_REQUIRED
        elif not tls.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if tls.cert_file is not None:
            ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"PACS node {node.name}: tls: cannot use the certificate files "
                          f"({getattr(exc, 'strerror', None) or exc}): check ca_file, cert_file and key_file") from None
    return ctx


def register_line(node: PacsNode, local_host: str | None = None) -> str:
    """The line that makes us known at the PACS (the fix for unknown calling AE / move destination)."""
    host = node.our_host or local_host or "<this machine's address>"
    key = node.our_ae_title.lower().replace(" ", "_")
    return (f"register AE title {node.our_ae_title}, host {host}, port {node.our_port} at {node.name} "
            f"(Orthanc: \"{key}\": [\"{node.our_ae_title}\", \"{host}\", {node.our_port}] in DicomModalities)")


def probe(host: str, port: int, timeout: float, ctx: ssl.SSLContext | None = None) -> OSError | None:
    """Open and close a TCP (with ``ctx``: TLS) connection: None when it works, else the error (refused,
    timeout, unknown host, TLS handshake)."""
    try:
        with socket.create_connection((host, port), timeout=min(timeout, 10.0)) as sock:
            if ctx is not None:
                with ctx.wrap_socket(sock, server_hostname=host):
                    pass
            return None
    except OSError as exc:
        return exc


def _unreachable(node: PacsNode, exc: OSError | None, what: str) -> PacsError:
    host, port, _ = node.dimse_address()
    where = f"{node.name} ({host}:{port})"
    if isinstance(exc, ConnectionRefusedError):
        return PacsError(f"{what}: connection refused by {where}: nothing listens there; check host and port in "
                         "the node file and that the PACS is running", transient=True)
    if isinstance(exc, socket.gaierror):
        return PacsError(f"{what}: unknown host '{host}' for {node.name}: fix host in the node file")
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return PacsError(f"{what}: no answer from {where} within {node.timeout:g} s (connection timed out): check "
                         "host, port and firewalls, or raise timeout in the node file", transient=True)
    if isinstance(exc, ssl.SSLError):
        return PacsError(f"{what}: TLS handshake with {where} failed ({exc.reason or exc}): check tls: in the node "
                         "file (CA file, client certificate) against the PACS's certificate")
    if exc is None:
        return PacsError(f"{what}: could not connect to {where} (it accepts connections again now)", transient=True)
    return PacsError(f"{what}: cannot connect to {where}: {exc.strerror or exc}; check host and port in the node "
                     "file and the network", transient=True)


def connect(node: PacsNode, contexts: Sequence[Any], *, what: str, ext_neg: list[Any] | None = None,
            handlers: list[Any] | None = None) -> Association:
    """An established association with ``node`` (its AE title) offering ``contexts``, or a :class:`PacsError`."""
    from pynetdicom import evt

    host, port, aet = node.dimse_address()
    if len(contexts) > 128:  # PS3.8: context ids are odd numbers 1..255
        raise PacsError(f"{what}: {len(contexts)} presentation contexts; an association holds at most 128")
    ae = make_ae(node)
    connected = threading.Event()
    hs = list(handlers or []) + [(evt.EVT_CONN_OPEN, lambda event: (connected.set(), no_delay(event)))]
    ctx = tls_context(node) if node.tls is not None and node.tls.dimse else None
    t0 = time.monotonic()
    try:
        assoc = ae.associate(host, port, contexts=list(contexts), ae_title=aet, max_pdu=node.max_pdu,
                             ext_neg=ext_neg, tls_args=(ctx, host) if ctx is not None else None, evt_handlers=hs)
    except OSError as exc:  # e.g. our bind address is wrong
        raise _unreachable(node, exc, what) from None
    if assoc.is_established:
        return assoc
    raise _association_failure(node, assoc, connected.is_set(), time.monotonic() - t0, what)


def _association_failure(node: PacsNode, assoc: Any, connected: bool, elapsed: float, what: str) -> PacsError:
    host, port, aet = node.dimse_address()
    if not connected:
        tls = tls_context(node) if node.tls is not None and node.tls.dimse else None
        return _unreachable(node, probe(host, port, node.timeout, tls), what)
    local = _local_host(assoc)
    if assoc.is_rejected:
        prim = assoc.acceptor.primitive
        result, source, diag = (getattr(prim, "result", None), getattr(prim, "result_source", None),
                                getattr(prim, "diagnostic", None))
        transient = result == 0x02
        if source == 0x01 and diag == 0x03:
            return PacsError(f"{what}: {node.name} rejected the association: it does not know our calling AE "
                             f"title {node.our_ae_title}; {register_line(node, local)}")
        if source == 0x01 and diag == 0x07:
            return PacsError(f"{what}: {node.name} rejected the association: '{aet}' is not its AE title; fix "
                             "ae_title in the node file")
        if source == 0x03 or (source == 0x02 and diag in (0x01, 0x02)):
            return PacsError(f"{what}: {node.name} is busy (association rejected: too many associations or "
                             "temporary congestion); try again later", transient=True)
        return PacsError(f"{what}: {node.name} rejected the association ({'transient' if transient else 'permanent'},"
                         f" no specific reason): it may not know our AE title {node.our_ae_title} or our address; "
                         f"{register_line(node, local)}", transient=transient)
    refused = [str(cx.abstract_syntax) for cx in (getattr(assoc, "rejected_contexts", None) or [])]
    if refused and not assoc.accepted_contexts:  # accepted, but with none of our presentation contexts
        return PacsError(f"{what}: {node.name} refused SOP class "
                         f"{', '.join(sop_name(u) for u in dict.fromkeys(refused))}: enable it at the PACS (or use "
                         "DICOMweb for this node)")
    if elapsed >= node.timeout * 0.9:
        return PacsError(f"{what}: {node.name} ({host}:{port}) accepted the connection but did not answer the "
                         f"association request within {node.timeout:g} s: is this a DICOM port (TLS expected?); "
                         "check port and tls in the node file, or raise timeout", transient=True)
    if node.tls is not None and node.tls.dimse and node.tls.cert_file is None:
        return PacsError(f"{what}: {node.name} ({host}:{port}) aborted the association request after the TLS "
                         "handshake: it probably requires our client certificate: add cert_file and key_file to tls: "
                         "in the node file")
    return PacsError(f"{what}: {node.name} ({host}:{port}) aborted the association request: check ae_title, port "
                     "and tls in the node file", transient=True)


def _local_host(assoc: Any) -> str | None:
    try:
        addr = assoc.requestor.address_info.address
    except AttributeError:  # pragma: no cover - pynetdicom internals
        return None
    return str(addr) if addr and addr not in ("0.0.0.0", "::") else None


def lost(node: PacsNode, assoc: Any, what: str, *, answered: bool, started: float) -> PacsError:
    """The error for a request that got no (further) response: timeout, PACS gone, or unknown calling AE."""
    host, port, _ = node.dimse_address()
    elapsed = time.monotonic() - started
    if assoc.is_established and not assoc.is_aborted:
        assoc.abort()
    if elapsed >= node.timeout * 0.9:
        return PacsError(f"{what}: {node.name} sent no response within {node.timeout:g} s (DIMSE timeout): the PACS "
                         "may be overloaded; raise timeout in the node file or try again", transient=True)
    down = probe(host, port, node.timeout)
    if isinstance(down, ConnectionRefusedError):
        return PacsError(f"{what}: {node.name} went away (connection lost, and {host}:{port} now refuses "
                         "connections); run the same command again when the PACS is back: what arrived is kept",
                         transient=True)
    if down is not None:
        return _unreachable(node, down, what)
    if not answered:
        return PacsError(f"{what}: {node.name} ended the association without any answer: it does not accept this "
                         f"request from our calling AE title {node.our_ae_title}; "
                         f"{register_line(node, _local_host(assoc))}")
    return PacsError(f"{what}: connection to {node.name} lost in the middle; run the command again: what arrived "
                     "is kept", transient=True)


def refused_contexts(assoc: Any, wanted: Sequence[str]) -> list[str]:
    """Abstract syntaxes of ``wanted`` with no accepted presentation context."""
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    return [uid for uid in dict.fromkeys(str(w) for w in wanted) if uid not in accepted]


def sop_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return f"{name} ({uid})" if name != uid else uid


@contextmanager
def association(node: PacsNode, contexts: Sequence[Any], *, what: str, required: Sequence[str] = (),
                ext_neg: list[Any] | None = None, handlers: list[Any] | None = None) -> Iterator[Association]:
    """:func:`connect`, check that the ``required`` SOP classes were accepted, release at the end."""
    assoc = connect(node, contexts, what=what, ext_neg=ext_neg, handlers=handlers)
    try:
        refused = refused_contexts(assoc, required)
        if refused:
            raise PacsError(f"{what}: {node.name} refused SOP class {', '.join(sop_name(u) for u in refused)}: "
                            "enable it at the PACS (or use DICOMweb for this node)")
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


# -- C-ECHO -----------------------------------------------------------------------------------------


def echo(node: PacsNode) -> float:
    """C-ECHO; returns the round trip in milliseconds (association included)."""
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    what = f"C-ECHO to {node.name}"
    t0 = time.monotonic()
    with association(node, [_context(Verification)], what=what, required=[Verification]) as assoc:
        started = time.monotonic()
        status = assoc.send_c_echo()
        if "Status" not in status:
            raise lost(node, assoc, what, answered=False, started=started)
        if status.Status != 0x0000:
            raise PacsError(f"{what}: status 0x{status.Status:04X} ({status_text(status.Status)})")
    return (time.monotonic() - t0) * 1000.0


def _context(abstract: str, syntaxes: Sequence[str] | None = None) -> Any:
    from pynetdicom import build_context

    return build_context(abstract, list(syntaxes) if syntaxes else None)


# -- C-FIND -----------------------------------------------------------------------------------------


def identifier(level: str, keys: dict[str, Any]) -> Dataset:
    """A query identifier: ``QueryRetrieveLevel`` plus keywords (``""``: return key; list: several values)."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = level
    utf8 = False
    for k, v in keys.items():
        setattr(ds, k, v)
        if isinstance(v, str) and not v.isascii():
            utf8 = True
    if utf8:
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


@dataclass
class Found:
    """One C-FIND match as plain text values."""

    values: dict[str, str]

    def __getitem__(self, key: str) -> str:
        return self.values.get(key, "")


def _text(ds: Dataset, keyword: str) -> str:
    v = ds.get(keyword)
    if v is None:
        return ""
    if isinstance(v, (list, tuple)) or v.__class__.__name__ == "MultiValue":
        return "\\".join(str(x) for x in v)
    return str(v)


class DimseFinder:
    """C-FIND (Study Root) over one association, kept open for many queries."""

    def __init__(self, node: PacsNode) -> None:
        self.node = node
        self._cm: Any = None
        self.assoc: Any = None

    def __enter__(self) -> DimseFinder:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND  # type: ignore[attr-defined]

        self._cm = association(self.node, [_context(FIND)], what=f"C-FIND at {self.node.name}", required=[FIND])
        self.assoc = self._cm.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._cm is not None:
            self._cm.__exit__(*exc)
            self._cm = None

    def find(self, level: str, keys: dict[str, Any]) -> list[Found]:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND  # type: ignore[attr-defined]

        what = f"C-FIND ({level.lower()} level) at {self.node.name}"
        started = time.monotonic()
        out: list[Found] = []
        answered = False
        wanted = list(keys)
        for status, ident in self.assoc.send_c_find(identifier(level, keys), FIND):
            if "Status" not in status:
                raise lost(self.node, self.assoc, what, answered=answered, started=started)
            answered = True
            code = int(status.Status)
            if code in (0xFF00, 0xFF01):
                if ident is not None:
                    out.append(Found({k: _text(ident, k) for k in wanted}))
                continue
            if code in (0x0000, 0x0001):
                return out
            if 0xA700 <= code <= 0xA7FF:
                raise PacsError(f"{what}: {node_busy(self.node)} (status 0x{code:04X})", transient=True)
            if code == 0x0122:
                raise PacsError(f"{what}: {self.node.name} does not support Study Root C-FIND (status 0x0122): use "
                                "DICOMweb for this node")
            raise PacsError(f"{what}: status 0x{code:04X} ({status_text(code)}); the PACS log says why")
        raise lost(self.node, self.assoc, what, answered=answered, started=started)

    # the three levels medpipe needs -------------------------------------------------------------------

    def studies(self, query: Any) -> list[Found]:
        return self.find("STUDY", query.study_identifier())

    def series(self, study_uid: str, modality: str | None = None) -> list[Found]:
        return self.find("SERIES", series_keys(study_uid, modality))

    def instances(self, study_uid: str, series_uid: str) -> list[Found]:
        return self.find("IMAGE", instance_keys(study_uid, series_uid))


def node_busy(node: PacsNode) -> str:
    return f"{node.name} is out of resources (busy); try again later"


def series_keys(study_uid: str, modality: str | None) -> dict[str, Any]:
    return {"StudyInstanceUID": study_uid, "SeriesInstanceUID": "", "Modality": modality or "",
            "SeriesNumber": "", "SeriesDescription": "", "NumberOfSeriesRelatedInstances": ""}


def instance_keys(study_uid: str, series_uid: str) -> dict[str, Any]:
    return {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid, "SOPInstanceUID": "",
            "SOPClassUID": "", "InstanceNumber": ""}

"""Three ways to bring a series' missing instances into an InstanceStore: C-MOVE, C-GET, WADO-RS.

Each is a session (a context manager holding one association or HTTP session) with
``fetch(series, missing)``; failures are :class:`~medpipe.errors.PacsError` lines (transient ones are
retried by :mod:`medpipe.pacs.pull`).

* **C-MOVE** asks the PACS to open an association *to us*: medpipe's storage SCP must be running on
  ``our_port`` and the PACS must know our AE title with that host and port. When it does not,
  the standard answer is 0xA801; Orthanc answers 0xC000 with nothing sent: both become the line to add
  at the PACS.
* **C-GET** receives the instances on our own association, as C-STORE sub-operations: we must propose
  a storage presentation context for each SOP class, with SCP/SCU role selection (we act as SCP). An
  association holds at most 128 contexts: with few SOP classes each gets one context per transfer
  syntax (so the PACS sends what it stores, untranscoded); with more, fewer syntaxes per class; past
  127 classes the caller splits the series into groups (:func:`get_groups`).
* **WADO-RS** streams ``multipart/related`` with ``transfer-syntax=*`` and writes each part's bytes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

from medpipe.errors import PacsError
from medpipe.pacs.dimse import association, identifier, lost, register_line, status_text
from medpipe.pacs.listing import Need, SeriesItem
from medpipe.pacs.nodes import PacsNode
from medpipe.pacs.scp import StoreHandler
from medpipe.pacs.store import InstanceStore

log = logging.getLogger("medpipe.pacs")

#: UIDs per IMAGE-level identifier (a UI value list is at most 64 KiB in explicit VR)
UIDS_PER_REQUEST = 200
MAX_CONTEXTS = 128

#: transfer syntaxes offered per SOP class for C-GET, most faithful tier first
GET_SYNTAX_TIERS: tuple[tuple[str, ...], ...] = (
    ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",
     "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
     "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1.99",
     "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"),
    ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.90",
     "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.5"),
    ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2"),
)

#: offered for C-GET when the PACS did not return SOP Class UIDs at image level
COMMON_STORAGE = (
    "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.4",
    "1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.130",
    "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.2",
    "1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.66.4",
    "1.2.840.10008.5.1.4.1.1.30", "1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.88.22",
    "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.481.3",
    "1.2.840.10008.5.1.4.1.1.20", "1.2.840.10008.5.1.4.1.1.12.1",
)


def identifiers(item: SeriesItem, need: Need) -> Iterator[Any]:
    """SERIES level when the whole series is missing, else IMAGE level with the missing UIDs in chunks."""
    if need.whole:
        yield identifier("SERIES", {"StudyInstanceUID": item.study_uid, "SeriesInstanceUID": item.series_uid})
        return
    uids = [i.sop_uid for i in need.instances]
    for a in range(0, len(uids), UIDS_PER_REQUEST):
        chunk = uids[a:a + UIDS_PER_REQUEST]
        yield identifier("IMAGE", {"StudyInstanceUID": item.study_uid, "SeriesInstanceUID": item.series_uid,
                                   "SOPInstanceUID": chunk if len(chunk) > 1 else chunk[0]})


def _final(node: PacsNode, assoc: Any, responses: Any, what: str) -> Any:
    """Consume C-MOVE / C-GET responses; return the final status data set (or raise for no answer)."""
    started = time.monotonic()
    answered = False
    for status, _ in responses:
        if "Status" not in status:
            raise lost(node, assoc, what, answered=answered, started=started)
        answered = True
        if int(status.Status) not in (0xFF00, 0xFF01):
            return status
    raise lost(node, assoc, what, answered=answered, started=started)


def _counts(status: Any) -> tuple[int, int, int]:
    return (int(status.get("NumberOfCompletedSuboperations", 0) or 0),
            int(status.get("NumberOfFailedSuboperations", 0) or 0),
            int(status.get("NumberOfWarningSuboperations", 0) or 0))


class MoveSession:
    """C-MOVE to our own storage SCP (which the caller runs); one association for all series."""

    method = "move"
    label = "C-MOVE"

    def __init__(self, node: PacsNode, handler: StoreHandler) -> None:
        self.node = node
        self.handler = handler
        self._cm: Any = None
        self.assoc: Any = None

    def __enter__(self) -> MoveSession:
        from pynetdicom import build_context
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE  # type: ignore[attr-defined]

        self._cm = association(self.node, [build_context(MOVE)], what=f"C-MOVE from {self.node.name}",
                               required=[MOVE])
        self.assoc = self._cm.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._cm is not None:
            self._cm.__exit__(*exc)
            self._cm = None

    def fetch(self, item: SeriesItem, need: Need) -> None:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE  # type: ignore[attr-defined]

        node = self.node
        what = f"C-MOVE of series {item.series_uid} from {node.name} to {node.our_ae_title}"
        for ident in identifiers(item, need):
            before = self.handler.series_count(item.series_uid)
            status = _final(node, self.assoc, self.assoc.send_c_move(ident, node.our_ae_title, MOVE), what)
            code = int(status.Status)
            done, failed, _ = _counts(status)
            arrived = self.handler.series_count(item.series_uid) - before
            local = _local(self.assoc)
            if code == 0xA801:
                raise move_refused(node, what, code, local, sent_nothing=False)
            if 0xA700 <= code <= 0xA7FF:
                raise PacsError(f"{what}: {node.name} is out of resources (status 0x{code:04X}); try again later",
                                transient=True)
            if 0xC000 <= code <= 0xCFFF and arrived == 0 and done == 0:
                raise move_refused(node, what, code, local, sent_nothing=True)
            if done > 0 and arrived == 0:
                raise PacsError(f"{what}: {node.name} says it sent {done} instance(s) to {node.our_ae_title} but none "
                                f"arrived here: its entry for {node.our_ae_title} points to another machine or port; "
                                f"{register_line(node, local)}")
            if code == 0xB000 or failed:
                ours = f"our SCP refused one: {self.handler.refusals[-1]}" if self.handler.refusals else \
                    "see the PACS's log"
                raise PacsError(f"{what}: {failed} instance(s) could not be sent to us (status 0x{code:04X}, "
                                f"{status_text(code)}); {ours}", transient=bool(arrived))
            if code != 0x0000:
                raise PacsError(f"{what}: status 0x{code:04X} ({status_text(code)})")


def move_refused(node: PacsNode, what: str, code: int, local: str | None, *, sent_nothing: bool) -> PacsError:
    """The C-MOVE refusal that means "the PACS does not know (where to reach) our AE": 0xA801, or Orthanc's 0xC000
    with nothing sent; the line to add at the PACS. Shared by the pynetdicom and dcmtk engines."""
    if not sent_nothing:
        return PacsError(f"{what}: the PACS does not know the move destination {node.our_ae_title} "
                         f"(status 0x{code:04X}); {register_line(node, local)}")
    return PacsError(f"{what}: {node.name} refused the C-MOVE (status 0x{code:04X}, nothing sent): the move "
                     f"destination {node.our_ae_title} is not configured at the PACS, or its entry points where we "
                     f"do not listen; {register_line(node, local)}")


def _local(assoc: Any) -> str | None:
    from medpipe.pacs.dimse import _local_host

    return _local_host(assoc)


def get_contexts(sop_classes: Sequence[str]) -> tuple[list[Any], list[Any]]:
    """Presentation contexts (the GET model first) and SCP role items for receiving ``sop_classes``."""
    from pynetdicom import build_context, build_role
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET  # type: ignore[attr-defined]

    classes = sorted(set(sop_classes)) or list(COMMON_STORAGE)
    room = MAX_CONTEXTS - 1
    if len(classes) > room:
        raise ValueError(f"{len(classes)} SOP classes do not fit one association; split with get_groups")
    tier = next((t for t in GET_SYNTAX_TIERS if len(t) * len(classes) <= room), None)
    contexts = [build_context(GET)]
    if tier is not None:
        contexts += [build_context(c, [ts]) for c in classes for ts in tier]
    else:  # one context per class offering both uncompressed syntaxes: the PACS transcodes the rest
        contexts += [build_context(c, list(GET_SYNTAX_TIERS[-1])) for c in classes]
    roles = [build_role(c, scp_role=True) for c in classes]
    return contexts, roles


def get_groups(items: Sequence[SeriesItem]) -> list[list[SeriesItem]]:
    """Split series so that each group's SOP classes fit one C-GET association (127 storage contexts)."""
    groups: list[list[SeriesItem]] = []
    classes: set[str] = set()
    current: list[SeriesItem] = []
    for item in items:
        if current and len(classes | item.sop_classes) > MAX_CONTEXTS - 1:
            groups.append(current)
            current, classes = [], set()
        current.append(item)
        classes |= item.sop_classes
    if current:
        groups.append(current)
    return groups


class GetSession:
    """C-GET with storage SCP roles negotiated for the SOP classes of the series it will fetch."""

    method = "get"
    label = "C-GET"

    def __init__(self, node: PacsNode, handler: StoreHandler, sop_classes: Sequence[str]) -> None:
        self.node = node
        self.handler = handler
        self.sop_classes = sorted(set(sop_classes))
        self._cm: Any = None
        self.assoc: Any = None

    def __enter__(self) -> GetSession:
        from pynetdicom import evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET  # type: ignore[attr-defined]

        contexts, roles = get_contexts(self.sop_classes)
        what = f"C-GET from {self.node.name}"
        self._cm = association(self.node, contexts, what=what, required=[GET], ext_neg=roles,
                               handlers=[(evt.EVT_C_STORE, self.handler)])
        self.assoc = self._cm.__enter__()
        as_scp = {str(cx.abstract_syntax) for cx in self.assoc.accepted_contexts if cx.as_scp}
        missing = [c for c in self.sop_classes if c not in as_scp]
        if self.sop_classes and len(missing) == len(self.sop_classes):
            self.__exit__(None, None, None)
            raise PacsError(f"{what}: {self.node.name} accepted none of our storage contexts with us as SCP (SCP/SCU "
                            "role selection refused), so it cannot send instances on this association; use C-MOVE "
                            "or WADO-RS for this node (retrieve: [move, wado] in the node file)")
        if missing:
            log.warning("%s: no storage context accepted for %s; those instances will fail", what, ", ".join(missing))
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._cm is not None:
            cm, self._cm = self._cm, None
            cm.__exit__(*exc)

    def fetch(self, item: SeriesItem, need: Need) -> None:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET  # type: ignore[attr-defined]

        node = self.node
        what = f"C-GET of series {item.series_uid} from {node.name}"
        for ident in identifiers(item, need):
            before = self.handler.series_count(item.series_uid)
            status = _final(node, self.assoc, self.assoc.send_c_get(ident, GET), what)
            code = int(status.Status)
            _, failed, _ = _counts(status)
            arrived = self.handler.series_count(item.series_uid) - before
            if 0xA700 <= code <= 0xA7FF:
                raise PacsError(f"{what}: {node.name} is out of resources (status 0x{code:04X}); try again later",
                                transient=True)
            if code == 0xB000 or failed:
                classes = ", ".join(sorted(item.sop_classes - {str(c) for c in self.sop_classes})) or \
                    "see the PACS's log"
                raise PacsError(f"{what}: {failed} instance(s) were not delivered (status 0x{code:04X}): no "
                                f"storage context for their SOP class / transfer syntax on the association "
                                f"({classes})", transient=bool(arrived))
            if code != 0x0000:
                raise PacsError(f"{what}: status 0x{code:04X} ({status_text(code)})")


class WadoSession:
    """WADO-RS: a whole series in one multipart response, or the missing instances one by one."""

    method = "wado"
    label = "WADO-RS"

    def __init__(self, node: PacsNode, store: InstanceStore) -> None:
        self.node = node
        self.store = store
        self.client: Any = None
        self.received = 0

    def __enter__(self) -> WadoSession:
        from medpipe.pacs.web import client

        self.client = client(self.node)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.client = None

    def fetch(self, item: SeriesItem, need: Need) -> None:
        from medpipe.pacs.web import iter_stored, part_uids

        base = f"studies/{item.study_uid}/series/{item.series_uid}"
        if need.whole or len(need.instances) * 2 >= (item.expected or 0):
            paths = [base]  # one request; instances already here are not written again
        else:
            paths = [f"{base}/instances/{i.sop_uid}" for i in need.instances]
        for path in paths:
            for data in iter_stored(self.node, self.client, path):
                study, series, sop = part_uids(data)
                if not (study and series and sop):
                    raise PacsError(f"WADO-RS from {self.node.name}: a part without Study / Series / SOP Instance "
                                    "UID; is the dicomweb URL the DICOMweb root?")
                if not self.store.has(study, series, sop):
                    self.store.write(study, series, sop, data)
                    self.received += 1

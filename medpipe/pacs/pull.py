"""Pull studies from a PACS into a folder: list, skip what is there, fetch the rest, check that all arrived.

::

    query -> studies -> series (C-FIND, or QIDO-RS for a DICOMweb-only node or --via wado)
          -> per series: nothing on disk yet -> fetched whole; partly on disk -> its instances listed,
             only the missing ones asked for; complete -> skipped (C-GET by getscu: a study nothing of
             which is on disk first in one STUDY-level request, for a pull of study UIDs started
             together with the listing; the series passes then ask for what is still missing)
          -> the node's retrieve methods in order (default C-MOVE, then C-GET, then WADO-RS), each on
             up to ``parallel`` associations / HTTP requests at once (one series at a time each), DIMSE
             by dcmtk's movescu / getscu or by pynetdicom (the node's ``engine``, medpipe.pacs.dcmtk):
             a method that fails for a reason retrying cannot fix hands what is left to the next
          -> every instance on disk (the listing, or the PACS's instance count per series), or a
             PacsError saying how many are missing and why

Transient failures (connection refused or lost, timeouts, a busy PACS) are retried with exponential
back-off (``retries`` / ``retry_delay`` of the node) in a new association, asking only for what is still
missing; an attempt that brought new instances resets the count. Files are written under a temporary
name and renamed, so an interrupted pull leaves only complete files, and running it again finishes
the job.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medpipe.errors import ConfigError, PacsError
from medpipe.pacs.listing import SeriesItem, list_series, missing_count, need
from medpipe.pacs.nodes import PacsNode
from medpipe.pacs.query import StudyQuery
from medpipe.pacs.retry import with_retries
from medpipe.pacs.store import InstanceStore

log = logging.getLogger("medpipe.pacs")

LABELS = {"move": "C-MOVE", "get": "C-GET", "wado": "WADO-RS"}


@dataclass
class PullReport:
    out: Path
    series: list[SeriesItem]
    expected: int  # instances at the PACS (listed, or its per-series counts)
    already: int  # of those, on disk before this pull
    received: int  # written by this pull
    by_method: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    bytes: int = 0

    @property
    def studies(self) -> list[str]:
        return list(dict.fromkeys(s.study_uid for s in self.series))


def usable_methods(node: PacsNode, methods: Sequence[str] | None) -> tuple[str, ...]:
    wanted = tuple(methods or node.retrieve)
    for m in wanted:
        if m not in LABELS:
            raise ConfigError(f"retrieve method '{m}': expected move, get or wado")
    usable = tuple(m for m in wanted if (m == "wado" and node.dicomweb) or (m != "wado" and node.has_dimse))
    if not usable:
        need_ = "a dicomweb URL" if wanted == ("wado",) else "ae_title, host and port (DIMSE)"
        raise ConfigError(f"PACS node {node.name} cannot be pulled from with {', '.join(LABELS[m] for m in wanted)}: "
                          f"it has no {need_}", hint="complete the node in the node file, or choose another --via")
    return usable


def pull(node: PacsNode, query: StudyQuery, out: Path | str, *, methods: Sequence[str] | None = None,
         on_listed: Callable[[int, int], None] | None = None,
         on_instance: Callable[[Path], None] | None = None) -> PullReport:
    """Bring every instance of the studies matching ``query`` into ``out``; return what happened.

    ``on_listed(expected, to_fetch)`` is called once the series are known, ``on_instance(path)`` for
    each file written (from the receiving thread).
    """
    if query.empty:
        raise ConfigError("a pull without any filter would fetch the whole PACS: give --study, or a query "
                          "(--patient-id, --study-date, --modality, --accession)")
    ways = usable_methods(node, methods)
    store = InstanceStore(out, on_write=on_instance)
    stale = store.clean()
    if stale:
        log.info("removed %d partial file(s) an interrupted pull left in %s", stale, store.root)
    t0 = time.perf_counter()
    web_listing = not node.has_dimse or ways == ("wado",)
    from medpipe.pacs.dcmtk import DcmtkFinder, dcmtk_tool

    findscu = None if web_listing else dcmtk_tool(node, "find")  # engine: dcmtk
    early = _early_studies(node, query, ways, store)
    held: list[Path] = []  # files the early C-GET wrote before the listing is known
    with ThreadPoolExecutor(1, thread_name_prefix="medpipe-C-GET") as pool:
        started = None
        if early:
            store.on_write = held.append
            started = pool.submit(_get_studies, node, store, early, early=True)
        items = with_retries(lambda: list_series(node, query, web=web_listing, store=store,
                                                 need_classes="get" in ways,
                                                 dimse_finder=DcmtkFinder(node, findscu) if findscu else None),
                             retries=node.retries, first_delay=node.retry_delay, what=f"listing at {node.name}")
        t_list = time.perf_counter()  # the early C-GET, if any, counts as transfer from here
    if started is not None:
        started.result()  # its PacsErrors are left to the passes below; anything else is a bug to show
    store.on_write = on_instance
    expected = sum(i.expected or 0 for i in items)
    to_fetch = sum(max(missing_count(store, i), 0) for i in items) + store.written
    report = PullReport(store.root, items, expected, max(expected - to_fetch, 0), 0)
    if store.written:
        report.by_method[ways[0]] = store.written  # the early C-GET
    if on_listed is not None:
        on_listed(expected, to_fetch)
    if on_instance is not None:
        for path in held:
            on_instance(path)
    errors: list[tuple[str, PacsError]] = []
    for way in ways:
        pending = [i for i in items if not need(store, i).empty]
        if not pending:
            break
        before = store.written
        try:
            _run_method(way, node, store, pending, whole_studies=not query.modality)
        except PacsError as exc:
            errors.append((way, exc))  # reported in the error or the report's warnings
            log.info("%s: %s", LABELS[way], exc)
        report.by_method[way] = report.by_method.get(way, 0) + store.written - before
    t_end = time.perf_counter()
    report.received = store.written
    report.bytes = store.bytes
    report.seconds = {"list": t_list - t0, "transfer": t_end - t_list, "total": t_end - t0}
    left = [missing_count(store, i) for i in items]
    if any(left):
        n = sum(x for x in left if x > 0)
        what = f"{n} of {expected}" if n else "some"
        if errors:
            first = errors[0][1]
            others = "; ".join(f"{LABELS[w]}: {e}" for w, e in errors[1:])
            raise PacsError(f"{what} instance(s) not pulled. {first}",
                            hint=(f"also failed: {others}" if others else None) or first.hint,
                            transient=first.transient)
        raise PacsError(f"{what} instance(s) of {node.name} did not arrive although the PACS reported success; "
                        "run the pull again, and check the PACS's log")
    if errors:
        used = [LABELS[w] for w, k in report.by_method.items() if k]
        report.warnings = [f"{LABELS[w]} failed: {e}" for w, e in errors]
        if used:
            report.warnings.append(f"pulled by {', '.join(used)} instead")
    return report


def _run_method(way: str, node: PacsNode, store: InstanceStore, pending: list[SeriesItem], *,
                whole_studies: bool) -> None:
    """Fetch what ``pending`` lacks by ``way``; ``whole_studies``: the series listed are all of their studies'
    (no modality filter), so a study not on disk at all may be asked for at STUDY level."""
    from medpipe.pacs.dcmtk import DcmtkSession, MoveReceiver, dcmtk_tool
    from medpipe.pacs.scp import StoreHandler

    tool = dcmtk_tool(node, way)
    if tool is not None and way == "move":  # storescp takes one association at a time: one C-MOVE at a time
        with MoveReceiver(node, store) as receiver:
            _drive(node, store, pending, lambda: DcmtkSession(node, store, way, tool, receiver.staging), "C-MOVE",
                   workers=1)
    elif tool is not None:
        fresh = [u for u in dict.fromkeys(i.study_uid for i in pending) if not store.study_folder(u).exists()]
        if whole_studies and fresh:
            _get_studies(node, store, fresh)
            pending = [i for i in pending if not need(store, i).empty]
        if pending:
            _drive(node, store, pending, lambda: DcmtkSession(node, store, way, tool), "C-GET")
    elif way == "move":
        from medpipe.pacs.dimse import tls_context
        from medpipe.pacs.retrieve import MoveSession
        from medpipe.pacs.scp import StorageSCP

        classes = set().union(*(i.sop_classes for i in pending))
        ssl_ctx = tls_context(node, server=True) if node.tls is not None and node.tls.dimse else None
        with StorageSCP(store, node.our_ae_title, node.our_port, node.bind, max_pdu=node.max_pdu,
                        timeout=node.timeout, ssl_context=ssl_ctx, sop_classes=classes or None,
                        max_associations=max(4, 2 * node.parallel)) as scp:
            _drive(node, store, pending, lambda: MoveSession(node, scp.handler), "C-MOVE")
    elif way == "get":
        from medpipe.pacs.retrieve import GetSession, get_groups

        handler = StoreHandler(store)
        for group in get_groups(pending):
            classes = sorted(set().union(*(i.sop_classes for i in group)))
            _drive(node, store, group, lambda classes=classes: GetSession(node, handler, classes), "C-GET")
    else:
        from medpipe.pacs.retrieve import WadoSession

        _drive(node, store, pending, lambda: WadoSession(node, store), "WADO-RS")


def _early_studies(node: PacsNode, query: StudyQuery, ways: Sequence[str], store: InstanceStore) -> list[str]:
    """The studies a pull may fetch while it lists them: C-GET by getscu first, a query of study UIDs and nothing
    else (each of those studies is wanted whole), and nothing of the study on disk yet."""
    from medpipe.pacs.dcmtk import dcmtk_tool
    from medpipe.pacs.query import valid_uid

    if ways[0] != "get" or not node.has_dimse or query.patient_id or query.study_date or query.modality or \
            query.accession or query.description or dcmtk_tool(node, "get") is None:
        return []
    return [u for u in dict.fromkeys(query.study_uids) if valid_uid(u) and not store.study_folder(u).exists()]


def _get_studies(node: PacsNode, store: InstanceStore, study_uids: Sequence[str], *, early: bool = False) -> None:
    """getscu: each study in one STUDY-level C-GET (one association and one process for the study, instead of
    one per series), up to ``node.parallel`` studies at once.

    A transient failure (connection lost, timeout) is not retried here: what arrived is kept, and the
    series-by-series pass that follows asks only for what is missing, with its retries. Any other failure
    is the pull's error as it stands (the same cause would fail every series); ``early`` (started before the
    listing, which may yet show that a study is not there): every failure is left to the passes after it.
    """
    from medpipe.pacs.dcmtk import DcmtkSession, dcmtk_tool

    tool = dcmtk_tool(node, "get")
    assert tool is not None, "only for engine dcmtk"

    def one(study_uid: str) -> None:
        with DcmtkSession(node, store, "get", tool) as session:
            try:
                session.fetch_study(study_uid)
            except PacsError as exc:
                if not (exc.transient or early):
                    raise
                log.info("%s; going on series by series", exc)

    with ThreadPoolExecutor(max(1, min(node.parallel, len(study_uids))), thread_name_prefix="medpipe-C-GET") as pool:
        for future in [pool.submit(one, uid) for uid in study_uids]:
            future.result()


def _drive(node: PacsNode, store: InstanceStore, items: list[SeriesItem], session: Callable[[], Any],
           label: str, workers: int | None = None) -> None:
    """Fetch what ``items`` lack on up to ``workers`` (default ``node.parallel``) sessions at once, one series at a
    time each.

    Each worker retries its transient failures in a new session; a series it was fetching goes back
    to the shared queue first. The first error of a worker that gave up is raised once all are done.
    """
    work: queue.Queue[SeriesItem] = queue.Queue()
    for item in sorted(items, key=lambda i: -(i.expected or 0)):  # big series first: they finish together
        work.put(item)
    workers = max(1, min(workers or node.parallel, len(items)))

    def worker() -> None:
        last = [store.written]

        def attempt() -> None:
            with session() as s:
                while True:
                    try:
                        item = work.get_nowait()
                    except queue.Empty:
                        return
                    try:
                        todo = need(store, item)
                        if not todo.empty:
                            s.fetch(item, todo)
                    except BaseException:
                        work.put(item)  # another attempt (or worker) takes it again
                        raise

        def progressed() -> bool:
            moved = store.written != last[0]
            last[0] = store.written
            return moved

        with_retries(attempt, retries=node.retries, first_delay=node.retry_delay,
                     what=f"{label} from {node.name}", progressed=progressed)

    if workers == 1:
        worker()
        return
    with ThreadPoolExecutor(workers, thread_name_prefix=f"medpipe-{label}") as pool:
        futures = [pool.submit(worker) for _ in range(workers)]
        errors = [f.exception() for f in futures]
    failed = [e for e in errors if e is not None]
    if failed:
        raise failed[0]

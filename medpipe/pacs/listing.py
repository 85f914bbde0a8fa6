"""What a pull fetches: the studies matching a query, their series, and (where needed) their instances.

A series nothing of which is on disk yet is fetched whole (SERIES-level C-MOVE / C-GET, one WADO-RS
request) and checked against the PACS's ``NumberOfSeriesRelatedInstances``: listing its instances one
C-FIND response at a time would cost more than the transfer. A series partly on disk (an interrupted
pull) is listed at IMAGE level, so that only the missing instances are asked for. C-GET needs the SOP
classes to negotiate storage roles: ``SOPClassesInStudy`` from the study-level answer, else the
instances' SOP Class UIDs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from medpipe.pacs.nodes import PacsNode
from medpipe.pacs.query import StudyQuery, valid_uid
from medpipe.pacs.store import InstanceStore, safe_component


@dataclass(frozen=True)
class Instance:
    sop_uid: str
    sop_class: str


@dataclass
class SeriesItem:
    study_uid: str
    series_uid: str
    patient_id: str = ""
    modality: str = ""
    description: str = ""
    count: int | None = None  # NumberOfSeriesRelatedInstances, when the PACS says
    instances: list[Instance] | None = None  # None: not listed (fetched whole)
    study_sop_classes: frozenset[str] = field(default_factory=frozenset)  # SOPClassesInStudy

    @property
    def expected(self) -> int | None:
        return len(self.instances) if self.instances is not None else self.count

    @property
    def sop_classes(self) -> set[str]:
        if self.instances is not None:
            known = {i.sop_class for i in self.instances if i.sop_class}
            if known:
                return known
        return set(self.study_sop_classes)


@dataclass
class Need:
    """What a series still lacks on disk: all of it (``whole``), some listed instances, or nothing."""

    whole: bool = False
    instances: list[Instance] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.whole and not self.instances


def need(store: InstanceStore, item: SeriesItem) -> Need:
    have = store.present(item.study_uid, item.series_uid)
    if item.instances is not None:
        missing = [i for i in item.instances if safe_component(i.sop_uid) not in have]
        return Need(whole=bool(missing) and len(missing) == len(item.instances), instances=missing)
    if item.count is not None and len(have) >= item.count:
        return Need()
    return Need(whole=True)


def missing_count(store: InstanceStore, item: SeriesItem) -> int:
    """Instances of the series not on disk (by the listing, else by the PACS's count); -1 when unknown."""
    n = need(store, item)
    if n.empty:
        return 0
    if not n.whole:
        return len(n.instances)
    if item.expected is None:
        return -1
    return max(item.expected - len(store.present(item.study_uid, item.series_uid)), 0)


def finder(node: PacsNode, web: bool) -> Any:
    """DIMSE C-FIND when the node has a DIMSE address (and ``web`` is false), else QIDO-RS."""
    if node.has_dimse and not web:
        from medpipe.pacs.dimse import DimseFinder

        return DimseFinder(node)
    from medpipe.pacs.web import WebFinder

    node.dicomweb_url()  # a node with neither is a ConfigError naming the fix
    return WebFinder(node)


def _int(text: str) -> int | None:
    try:
        return int(str(text).strip())
    except ValueError:
        return None


def list_series(node: PacsNode, query: StudyQuery, *, web: bool = False, store: InstanceStore | None = None,
                need_classes: bool = False, dimse_finder: Any = None) -> list[SeriesItem]:
    """The series of the studies matching ``query`` (only ``query.modality``'s series, when given).

    Instances are listed for a series when ``store`` holds part of it, when the PACS gives no
    instance count, or (``need_classes``) when the SOP classes are not known from the study level.
    Without ``store`` every series is listed. ``dimse_finder``: a finder to use instead of pynetdicom's
    for DIMSE (a pull with ``engine: dcmtk`` passes dcmtk's).
    """
    items: list[SeriesItem] = []
    use_dimse = node.has_dimse and not web
    with (dimse_finder if dimse_finder is not None and use_dimse else finder(node, web)) as f:
        for st in f.studies(query):
            study_uid = st["StudyInstanceUID"]
            if not valid_uid(study_uid):
                continue
            classes = frozenset(c for c in st["SOPClassesInStudy"].split("\\") if valid_uid(c))
            for se in f.series(study_uid, query.modality):
                series_uid = se["SeriesInstanceUID"]
                if not valid_uid(series_uid):
                    continue
                if query.modality and se["Modality"] and se["Modality"] != query.modality:
                    continue  # a PACS that ignores the Modality key at series level
                item = SeriesItem(study_uid, series_uid, st["PatientID"], se["Modality"], se["SeriesDescription"],
                                  _int(se["NumberOfSeriesRelatedInstances"]), None, classes)
                if store is None or item.count is None or (need_classes and not classes) or \
                        store.present(study_uid, series_uid):
                    item.instances = _instances(f, study_uid, series_uid)
                items.append(item)
    return items


def _instances(f: Any, study_uid: str, series_uid: str) -> list[Instance]:
    return [Instance(i["SOPInstanceUID"], i["SOPClassUID"]) for i in f.instances(study_uid, series_uid)
            if valid_uid(i["SOPInstanceUID"])]


def total(items: Iterable[SeriesItem]) -> int:
    return sum(i.expected or 0 for i in items)

"""What a pull fetches: the studies matching a query, their series, and every instance (UID and SOP class).

Listing instances first is what makes a pull resumable and checkable: instances already on disk are
not asked for again, C-GET proposes storage contexts for exactly the SOP classes found, and after the
transfer every listed instance must be on disk, or the pull says how many are missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from medpipe.pacs.nodes import PacsNode
from medpipe.pacs.query import StudyQuery, valid_uid


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
    instances: list[Instance] = field(default_factory=list)

    @property
    def sop_classes(self) -> set[str]:
        return {i.sop_class for i in self.instances if i.sop_class}


def finder(node: PacsNode, web: bool) -> Any:
    """DIMSE C-FIND when the node has a DIMSE address (and ``web`` is false), else QIDO-RS."""
    if node.has_dimse and not web:
        from medpipe.pacs.dimse import DimseFinder

        return DimseFinder(node)
    from medpipe.pacs.web import WebFinder

    node.dicomweb_url()  # a node with neither is a ConfigError naming the fix
    return WebFinder(node)


def list_series(node: PacsNode, query: StudyQuery, *, web: bool = False) -> list[SeriesItem]:
    """Every series (with its instances) of the studies matching ``query`` (only ``query.modality``'s series)."""
    items: list[SeriesItem] = []
    with finder(node, web) as f:
        studies = f.studies(query)
        for st in studies:
            study_uid = st["StudyInstanceUID"]
            if not valid_uid(study_uid):
                continue
            for se in f.series(study_uid, query.modality):
                series_uid = se["SeriesInstanceUID"]
                if not valid_uid(series_uid):
                    continue
                if query.modality and se["Modality"] and se["Modality"] != query.modality:
                    continue  # a PACS that ignores the Modality key at series level
                insts = [Instance(i["SOPInstanceUID"], i["SOPClassUID"]) for i in f.instances(study_uid, series_uid)
                         if valid_uid(i["SOPInstanceUID"])]
                items.append(SeriesItem(study_uid, series_uid, st["PatientID"], se["Modality"],
                                        se["SeriesDescription"], insts))
    return items

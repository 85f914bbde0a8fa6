"""``pacs://NODE?StudyDate=...&Modality=MR`` as the source of ``medpipe ingest`` and ``medpipe score``.

The studies matching the query are pulled (resumably) into ``DEST/<node>/`` and that folder is the
source: ``ingest`` indexes it, ``score`` ingests and scores it. The folder accumulates across queries;
instances already there are not fetched again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from medpipe.errors import PacsError
from medpipe.pacs.nodes import load_nodes
from medpipe.pacs.pull import PullReport, pull
from medpipe.pacs.query import is_pacs_url, parse_pacs_url
from medpipe.pacs.store import safe_component

__all__ = ["is_pacs_url", "pull_source"]


def pull_source(url: str, dest: Path | str, nodes_file: Path | str | None = None, *,
                on_listed: Callable[[int, int], None] | None = None,
                on_instance: Callable[[Path], None] | None = None) -> tuple[Path, PullReport]:
    """Pull what ``url`` asks for into ``dest/<node>``; return that folder and the pull report (``on_listed``
    and ``on_instance`` as for :func:`~medpipe.pacs.pull.pull`)."""
    src = parse_pacs_url(url)
    node = load_nodes(nodes_file).get(src.node)
    folder = Path(dest) / safe_node_folder(node.name)
    report = pull(node, src.query, folder, methods=(src.via,) if src.via else None, on_listed=on_listed,
                  on_instance=on_instance)
    if report.expected == 0:
        raise PacsError(f"no study at {node.name} matches {src.query.describe()}: nothing to process",
                        hint=f"check the query with: medpipe pacs find {node.name} ...")
    return report.out, report


def safe_node_folder(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._")
    return keep or safe_component(name)

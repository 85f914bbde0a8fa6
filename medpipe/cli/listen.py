"""``medpipe listen --port P --model MODEL --out DIR [--push NODE]``: the scoring router next to a PACS."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import typer


def listen_command(
    port: int = typer.Option(..., "--port", "-p", min=1, max=65535, help="TCP port of the storage SCP."),
    model: Path = typer.Option(..., "--model", "-m", help="Model package folder (as for `medpipe score`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder: incoming/, ingest/, results/, scores.csv, "
                                                      "listener.sqlite."),
    push: str = typer.Option(None, "--push", help="Node (of the node file) the results are sent to."),
    push_via: str = typer.Option(None, "--push-via", help="dimse (C-STORE) or dicomweb (STOW-RS)."),
    ae_title: str = typer.Option("MEDPIPE", "--ae-title", help="Our AE title."),
    bind: str = typer.Option("", "--bind", help="Address to listen on (default: every interface)."),
    idle: float = typer.Option(30.0, "--idle", min=0.0, help="Seconds without a new instance after which a study "
                                                             "is complete and scored."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    explain: bool = typer.Option(False, "--explain", help="Also a Parametric Map and overlays (pushed too)."),
    seg_type: str = typer.Option("binary", "--seg-type", help="binary or labelmap."),
    cpu_threads: int = typer.Option(None, "--cpu-threads", min=1, max=1024, help="torch CPU threads."),
    pacs: Path = typer.Option(None, "--pacs", help="PACS node file (for --push and --allow-node)."),
    allow: list[str] = typer.Option(None, "--allow", help="Calling AE title that may store here (repeat for more); "
                                                          "with --allow / --allow-node, every other is rejected."),
    allow_node: list[str] = typer.Option(None, "--allow-node", help="Node (of the node file) that may store here: its "
                                                                    "ae_title, from its host only (repeatable)."),
) -> None:
    """Receive studies (C-STORE), score each once nothing arrived for --idle seconds, push SEG/SR back. Ctrl-C stops."""
    from medpipe.errors import ConfigError
    from medpipe.pacs.listener import Listener, ListenerSettings
    from medpipe.pacs.nodes import check_ae_title, load_nodes
    from medpipe.pacs.scp import AllowList
    from medpipe.scoring.engine import ScoreOptions

    if seg_type not in ("binary", "labelmap"):
        raise ConfigError(f"--seg-type {seg_type}: expected binary or labelmap")
    if push_via not in (None, "dimse", "dicomweb"):
        raise ConfigError(f"--push-via {push_via}: expected dimse or dicomweb")
    try:
        ae_title = check_ae_title(ae_title)
    except ValueError as exc:
        raise ConfigError(f"--ae-title {ae_title!r}: {exc}") from None
    nodes = load_nodes(pacs) if push or allow_node else None
    node = nodes.get(push) if nodes is not None and push else None
    allowed = AllowList.build(allow or (), [nodes.get(n) for n in allow_node or ()] if nodes is not None else ())
    options = ScoreOptions(device=device, explain=explain, seg_type=seg_type,  # type: ignore[arg-type]
                           cpu_threads=cpu_threads)
    logging.getLogger("medpipe.pacs").setLevel(logging.INFO)
    if not logging.getLogger().isEnabledFor(logging.INFO):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logging.getLogger("medpipe.pacs").addHandler(handler)
    listener = Listener(ListenerSettings(model=model, out=out, port=port, ae_title=ae_title, bind=bind, idle=idle,
                                         push=node, push_via=push_via, options=options,
                                         allow=allowed or None))

    def stop(signum: int, frame: object) -> None:
        listener.request_stop()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        listener.run()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def register(app: typer.Typer) -> None:
    app.command("listen")(listen_command)

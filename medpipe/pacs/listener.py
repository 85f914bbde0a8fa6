"""``medpipe listen``: the AI router next to a PACS. Receive studies, score each once it is complete, push back.

::

    PACS / modality --C-STORE--> storage SCP --> OUT/incoming/<study>/<series>/<sop>.dcm
                                     |                 (atomic files; bad objects refused, counted)
                                     v
                     OUT/listener.sqlite: per study  receiving -> scoring -> pushing -> done
                                     |                 (or skipped / failed, with the reason)
          no instance for ``idle`` s |
                                     v
        medpipe score OUT/incoming/<study> (ingest into OUT/ingest, results in OUT/results, scores.csv)
                                     v
        push the SEG / SR (/ maps) to the PACS (C-STORE or STOW-RS), retried with back-off

A study is complete when nothing arrived for it for ``idle`` seconds. Instances arriving later (a
late series) put it back to ``receiving``; it is scored again, and scoring's own bookkeeping decides
whether anything changed (same inputs and model: the earlier results are kept). The state lives in
SQLite and the instances on disk, so a restarted listener resumes every study that was receiving,
being scored or waiting to be pushed. One study's failure (unreadable files, no matching series,
the PACS down while pushing) is recorded with its reason and never stops the listener.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medpipe.errors import MedpipeError, PacsError
from medpipe.pacs.nodes import PacsNode
from medpipe.pacs.retry import backoff
from medpipe.pacs.scp import AllowList, StorageSCP, Stored
from medpipe.pacs.store import InstanceStore, safe_component

log = logging.getLogger("medpipe.pacs.listen")

BOOK = "listener.sqlite"
INCOMING = "incoming"
SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    state TEXT NOT NULL,            -- receiving | scoring | pushing | done | skipped | failed
    instances INTEGER NOT NULL DEFAULT 0,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    calling_ae TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    updated REAL NOT NULL
)
"""


class StudyBook:
    """The listener's per-study state (thread-safe: SCP threads write ``received``, the worker the rest)."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, timeout=30, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(SCHEMA)
        self.db.commit()
        self.lock = threading.Lock()

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def received(self, study_uid: str, calling_ae: str, new: bool, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.lock:
            self.db.execute(
                "INSERT INTO studies (study_uid, state, instances, first_received, last_received, calling_ae, "
                "updated) VALUES (?, 'receiving', ?, ?, ?, ?, ?) ON CONFLICT(study_uid) DO UPDATE SET "
                "state = 'receiving', instances = instances + excluded.instances, last_received = excluded.last_received,"
                " calling_ae = excluded.calling_ae, attempts = 0, reason = '', updated = excluded.updated",
                (study_uid, int(new), now, now, calling_ae, now))
            self.db.commit()

    def recover(self) -> int:
        """After a restart: studies caught mid-scoring are scored again; pushes are tried at once."""
        with self.lock:
            n = self.db.execute("UPDATE studies SET state = 'receiving' WHERE state = 'scoring'").rowcount
            self.db.execute("UPDATE studies SET next_try = 0 WHERE state = 'pushing'")
            self.db.commit()
        return int(n)

    def due(self, idle: float, now: float | None = None) -> list[tuple[str, str, float]]:
        """(study, state, last_received) of studies idle long enough to score, or whose push is due."""
        now = time.time() if now is None else now
        with self.lock:
            rows = self.db.execute(
                "SELECT study_uid, state, last_received FROM studies WHERE (state = 'receiving' AND "
                "last_received <= ?) OR (state = 'pushing' AND next_try <= ?) ORDER BY last_received",
                (now - idle, now)).fetchall()
        return [(str(a), str(b), float(c)) for a, b, c in rows]

    def move(self, study_uid: str, state: str, reason: str = "", *, unless_received_after: float | None = None,
             attempts: int | None = None, next_try: float | None = None) -> bool:
        """Set a study's state; with ``unless_received_after``, not if an instance arrived after that time."""
        sql = "UPDATE studies SET state = ?, reason = ?, updated = ?"
        args: list[Any] = [state, reason[:500], time.time()]
        if attempts is not None:
            sql += ", attempts = ?"
            args.append(attempts)
        if next_try is not None:
            sql += ", next_try = ?"
            args.append(next_try)
        sql += " WHERE study_uid = ?"
        args.append(study_uid)
        if unless_received_after is not None:
            sql += " AND last_received <= ?"
            args.append(unless_received_after)
        with self.lock:
            n = self.db.execute(sql, args).rowcount
            self.db.commit()
        return bool(n)

    def get(self, study_uid: str) -> dict[str, Any] | None:
        with self.lock:
            cur = self.db.execute("SELECT * FROM studies WHERE study_uid = ?", (study_uid,))
            row = cur.fetchone()
            names = [d[0] for d in cur.description]
        return None if row is None else dict(zip(names, row, strict=True))

    def all(self) -> list[dict[str, Any]]:
        with self.lock:
            cur = self.db.execute("SELECT * FROM studies ORDER BY first_received")
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


@dataclass
class ListenerSettings:
    model: Path
    out: Path
    port: int
    ae_title: str = "MEDPIPE"
    bind: str = ""
    idle: float = 30.0  # seconds without a new instance after which a study is complete
    push: PacsNode | None = None
    push_via: str | None = None  # dimse | dicomweb (default: the node's DIMSE when it has one)
    push_attempts: int = 8  # pushes of one study before it is marked failed
    poll: float = 0.5
    options: Any = None  # ScoreOptions
    allow: AllowList | None = None  # calling AE titles (and nodes' addresses) that may store; None: anyone
    events: list[str] = field(default_factory=list)  # what happened, newest last (for tests and the CLI)


class Listener:
    """Run with :meth:`run` (blocks until ``stop`` is set) or :meth:`start` / :meth:`stop` around a thread."""

    def __init__(self, settings: ListenerSettings) -> None:
        self.s = settings
        self.out = Path(settings.out).expanduser().resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.store = InstanceStore(self.out / INCOMING)
        self.book = StudyBook(self.out / BOOK)
        self.scp: StorageSCP | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.package: Any = None
        self.ready = threading.Event()

    # -- life cycle ----------------------------------------------------------------------------------

    def start(self) -> Listener:
        """Run in a background thread; returns once the SCP is listening (or raises what stopped it)."""
        errors: list[BaseException] = []

        def main() -> None:
            try:
                self.run()
            except BaseException as exc:  # reported to the caller of start()
                errors.append(exc)
                self.ready.set()

        self._thread = threading.Thread(target=main, name="medpipe-listener", daemon=True)
        self._thread.start()
        self.ready.wait()
        if errors:
            raise errors[0]
        return self

    def stop(self, timeout: float = 120.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def run(self) -> None:
        self.package = _networks_once(self.s.model)
        self.store.clean()
        resumed = self.book.recover()
        pending = [r for r in self.book.all() if r["state"] in ("receiving", "scoring", "pushing")]
        if pending:
            log.info("resuming %d pending stud%s (%d caught mid-scoring)", len(pending),
                     "y" if len(pending) == 1 else "ies", resumed)
        self.scp = StorageSCP(self.store, self.s.ae_title, self.s.port, self.s.bind, on_stored=self._on_stored,
                              allow=self.s.allow)
        self.scp.start()
        self.s.port = self.scp.port
        allowed = self.s.allow.addresses if self.s.allow else {}
        log.info("listening as %s on %s:%d; model %s; results in %s%s; %s", self.s.ae_title, self.s.bind or "*",
                 self.s.port, self.package.name, self.out,
                 f"; pushing to {self.s.push.name}" if self.s.push else "",
                 f"accepting only {', '.join(sorted(allowed))}" if allowed else "accepting any calling AE title")
        self.ready.set()
        try:
            while not self._stop.is_set():
                for study, state, _ in self.book.due(self.s.idle):
                    if self._stop.is_set():
                        break
                    if state == "receiving":
                        self._score(study)
                    else:
                        self._push(study)
                self._stop.wait(self.s.poll)
        finally:
            self.scp.stop()
            self.book.close()
            log.info("listener stopped")

    def request_stop(self) -> None:
        self._stop.set()

    # -- receiving -----------------------------------------------------------------------------------

    def _on_stored(self, item: Stored) -> None:
        self.book.received(item.study_uid, item.calling_ae, item.new)

    # -- scoring -------------------------------------------------------------------------------------

    def _event(self, text: str) -> None:
        self.s.events.append(text)
        log.info("%s", text)

    def _score(self, study: str) -> None:
        from medpipe.scoring.engine import ScoreOptions, score

        started = time.time()
        self.book.move(study, "scoring")
        folder = self.store.root / safe_component(study)
        row: dict[str, Any] | None = None
        reason = ""
        try:
            report = score(folder, self.package, self.out, self.s.options or ScoreOptions())
            row = next((r for r in report.rows if r["study_uid"] == study), None)
            if row is None:
                reason = "no usable image series in the study (see ingest/rejected.csv)"
        except MedpipeError as exc:
            reason = str(exc).splitlines()[0]
        except Exception as exc:  # one study never stops the listener
            log.exception("scoring study %s failed", study)
            reason = f"{type(exc).__name__}: {exc}"[:300]
        if row is None or row["status"] != "ok":
            state = "failed" if row is None or row["status"] == "failed" else "skipped"
            reason = reason or str(row.get("reason") if row else "")
            if self.book.move(study, state, reason, unless_received_after=started):
                self._event(f"study {study}: {state}: {reason}")
            return
        nxt = "pushing" if self.s.push is not None else "done"
        if self.book.move(study, nxt, unless_received_after=started, attempts=0, next_try=0):
            self._event(f"study {study}: scored ({', '.join(f'{k}={v}' for k, v in row.items() if k.endswith('_ml'))})")
            if nxt == "pushing":
                self._push(study)
        else:
            log.info("study %s: more instances arrived while it was scored; scoring again when idle", study)

    def _push(self, study: str) -> None:
        from medpipe.pacs.push import push_scored
        from medpipe.scoring.engine import SCORES_CSV

        node = self.s.push
        if node is None:  # pragma: no cover - only pushing studies get here
            return
        rec = self.book.get(study) or {}
        attempts = int(rec.get("attempts", 0)) + 1
        rows = _rows_of(self.out / SCORES_CSV, study)
        try:
            report = push_scored(node, self.out, rows, via=self.s.push_via)  # type: ignore[arg-type]
            report.raise_for_failures()
        except PacsError as exc:
            if exc.transient and attempts < self.s.push_attempts:
                delay = backoff(attempts, max(node.retry_delay, 1.0), cap=600.0)
                self.book.move(study, "pushing", f"push failed: {exc}", attempts=attempts,
                               next_try=time.time() + delay)
                self._event(f"study {study}: push failed ({exc}); next try in {delay:.0f} s")
            else:
                self.book.move(study, "failed", f"push failed: {exc}", attempts=attempts)
                self._event(f"study {study}: push failed for good: {exc}")
            return
        self.book.move(study, "done", attempts=attempts)
        self._event(f"study {study}: pushed {len(report.results)} file(s) to {node.name}")


def _networks_once(folder: Path) -> Any:
    """The model package, whose networks are loaded by the first study scored and kept for the next ones."""
    from medpipe.inference.package import ModelPackage

    class KeptNetworks(ModelPackage):
        def load_model(self, device: str = "cpu", amp: bool = False) -> Any:
            key = (device, amp)
            if getattr(self, "_kept", (None, None))[0] != key:
                self._kept = (key, super().load_model(device, amp))
            return self._kept[1]

    pkg = ModelPackage.load(folder)
    return KeptNetworks(pkg.path, pkg.manifest)


def _rows_of(scores_csv: Path, study: str) -> list[dict[str, Any]]:
    import csv

    try:
        with open(scores_csv, newline="", encoding="utf-8") as fh:
            return [r for r in csv.DictReader(fh) if r.get("study_uid") == study]
    except FileNotFoundError:
        return []

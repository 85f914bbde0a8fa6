"""The per-study scoring status: what was scored, with which model, from which inputs, with what result.

One SQLite table (``score_status.sqlite`` in the output folder; the ingest catalog stays the
source's index, possibly shared by several scoring runs). A study is *done* for a model when its
row has status ``ok`` or ``skipped`` for that model id and the same input fingerprint: a re-run (or
``--resume`` after a kill) skips it; a changed input or model scores it again. The row is written
only after every output file of the study is in place, so a killed run never records half a study.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS scores (
    study_uid TEXT NOT NULL,
    model_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    status TEXT NOT NULL,          -- ok | skipped | failed
    row TEXT NOT NULL,             -- the scores.csv row as JSON
    PRIMARY KEY (study_uid, model_id)
)
"""


class ScoreStatus:
    """The status table of one output folder (single writer: the scoring driver)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.db = sqlite3.connect(path, timeout=30)
            self.db.execute(SCHEMA)
            self.db.commit()
        except sqlite3.DatabaseError:  # a damaged status file is a cache: start it again
            self.db.close()
            path.unlink(missing_ok=True)
            self.db = sqlite3.connect(path, timeout=30)
            self.db.execute(SCHEMA)
            self.db.commit()

    def close(self) -> None:
        self.db.close()

    def done(self, study_uid: str, model_id: str, fingerprint: str) -> dict[str, Any] | None:
        """The recorded row when the study is finished for this model and these inputs, else None."""
        got = self.db.execute("SELECT fingerprint, status, row FROM scores WHERE study_uid = ? AND model_id = ?",
                              (study_uid, model_id)).fetchone()
        if got is None or got[0] != fingerprint or got[1] not in ("ok", "skipped"):
            return None
        row: dict[str, Any] = json.loads(got[2])
        return row

    def record(self, study_uid: str, model_id: str, fingerprint: str, status: str, row: dict[str, Any]) -> None:
        self.db.execute("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?)",
                        (study_uid, model_id, fingerprint, status, json.dumps(row, default=str)))
        self.db.commit()

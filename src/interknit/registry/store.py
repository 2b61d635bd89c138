"""Where the registry's state survives a restart: the interface, and the embedded SQLite store.

The registry applies a change to its in-memory state, hands the resulting events to the store,
and acknowledges the request only after ``commit`` returns. The embedded store keeps one row per
instance plus the revision, in SQLite's WAL mode with ``synchronous=FULL``: a commit has reached
the disk when it returns, so ``kill -9`` right after an acknowledgement loses nothing. The
registry batches the events of all writes that arrived while the previous commit was on the
disk into the next commit, so concurrent writers share one fsync instead of weakening it.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from interknit.registry.model import Event, Instance


class StoreError(Exception):
    """The store cannot be read or written; the registry answers 503 and changes nothing."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    instances: list[Instance]
    revision: int


class Store(Protocol):
    """Blocking calls; the registry runs them on a thread of their own, one at a time."""

    def load(self) -> Snapshot: ...

    def commit(self, events: Sequence[Event], revision: int) -> None: ...

    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    service TEXT NOT NULL,
    id TEXT NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (service, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
"""


class SqliteStore:
    """The embedded store: one SQLite file under the node's data directory."""

    FILENAME = "registry.db"

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.path = Path(data_dir) / self.FILENAME
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                # FULL, not NORMAL: in WAL mode NORMAL may lose the last commits on power loss,
                # and an acknowledged registration must survive anything short of the disk.
                db.execute("PRAGMA synchronous=FULL")
                db.executescript(_SCHEMA)
            except (sqlite3.Error, OSError) as exc:
                raise StoreError(f"cannot open the store at {self.path}: {exc}") from exc
            self._db = db
        return self._db

    def load(self) -> Snapshot:
        db = self._connect()
        try:
            rows = db.execute("SELECT record FROM instances").fetchall()
            rev_row = db.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the store at {self.path}: {exc}") from exc
        instances = [Instance.from_record(row[0]) for row in rows]
        revision = int(rev_row[0]) if rev_row else 0
        return Snapshot(instances=instances, revision=revision)

    def commit(self, events: Sequence[Event], revision: int) -> None:
        if not events:
            return
        db = self._connect()
        # Only the last event per instance matters for the rows.
        last: dict[tuple[str, str], Event] = {}
        for event in events:
            last[event.instance.key] = event
        upserts = [
            (e.instance.service, e.instance.id, e.instance.to_record())
            for e in last.values()
            if e.type == "put"
        ]
        deletes = [e.instance.key for e in last.values() if e.type == "delete"]
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                if upserts:
                    db.executemany(
                        "INSERT OR REPLACE INTO instances (service, id, record) VALUES (?, ?, ?)",
                        upserts,
                    )
                if deletes:
                    db.executemany("DELETE FROM instances WHERE service = ? AND id = ?", deletes)
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('revision', ?)", (revision,)
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write the store at {self.path}: {exc}") from exc

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

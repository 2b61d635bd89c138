"""Where the registry's state survives a restart: the interface, and the embedded SQLite store.

The registry applies a change to its in-memory state, hands the resulting events to the store,
and acknowledges the request only after ``commit`` returns. The embedded store keeps one row per
instance plus the revision, in SQLite's WAL mode with ``synchronous=FULL``: a commit has reached
the disk when it returns, so ``kill -9`` right after an acknowledgement loses nothing. The
registry batches the events of all writes that arrived while the previous commit was on the
disk into the next commit, so concurrent writers share one fsync instead of weakening it.

A commit that only puts instances (the usual one: registrations, heartbeats that change a
status) is one ``INSERT`` statement, its own transaction, and does not write the revision: the
last event of such a batch is a put, so the newest ``mod_revision`` among the rows is the
revision, and ``load`` takes the larger of the two. Four statements per commit (begin, rows,
revision, commit) cost the store's thread four waits for the GIL from a busy event loop;
registrations went up about 10% with one.
"""

from __future__ import annotations

import functools
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from interknit.registry.model import Instance


class StoreError(Exception):
    """The store cannot be read or written; the registry answers 503 and changes nothing."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    instances: list[Instance]
    revision: int


@dataclass(frozen=True, slots=True)
class Batch:
    """The rows of one commit (the last word per instance), their records encoded on the event
    loop: the store's thread then runs little Python between SQLite calls."""

    upserts: list[tuple[str, str, bytes]]
    deletes: list[tuple[str, str]]
    # The revision of the batch's last event. When the batch deletes nothing, that event was a
    # put and one of the upserts carries it as its ``mod_revision``.
    revision: int


class Store(Protocol):
    """Blocking calls; the registry runs them on a thread of their own, one at a time."""

    def load(self) -> Snapshot: ...

    def commit(self, batch: Batch) -> None: ...

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


# Far below SQLite's limit on bound parameters (32,766 since 3.32), three per row.
_ROWS_PER_STATEMENT = 256


@functools.lru_cache(maxsize=_ROWS_PER_STATEMENT)
def _upsert_sql(rows: int) -> str:
    values = ",".join(["(?, ?, ?)"] * rows)
    return f"INSERT OR REPLACE INTO instances (service, id, record) VALUES {values}"


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
        revision = max([int(rev_row[0]) if rev_row else 0, *(i.mod_revision for i in instances)])
        return Snapshot(instances=instances, revision=revision)

    def commit(self, batch: Batch) -> None:
        db = self._connect()
        rows = batch.upserts
        if not batch.deletes and 0 < len(rows) <= _ROWS_PER_STATEMENT:
            try:
                db.execute(_upsert_sql(len(rows)), [v for row in rows for v in row])
            except sqlite3.Error as exc:
                raise StoreError(f"cannot write the store at {self.path}: {exc}") from exc
            return
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                # One statement for many rows: each statement step gives the GIL away and must
                # win it back from a busy event loop, so steps are what a commit costs.
                for start in range(0, len(rows), _ROWS_PER_STATEMENT):
                    chunk = rows[start : start + _ROWS_PER_STATEMENT]
                    db.execute(_upsert_sql(len(chunk)), [v for row in chunk for v in row])
                for key in batch.deletes:
                    db.execute("DELETE FROM instances WHERE service = ? AND id = ?", key)
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('revision', ?)",
                    (batch.revision,),
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

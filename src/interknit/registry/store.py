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

Rows are keyed by the instance's ``create_revision``, not by its (service, id): the revision at
which it was registered, unique and fixed while it lives. New instances are appended at the end
of the table's b-tree (three or four pages for a commit of sixteen), where a key of (service,
id) scattered them over the whole tree (about nine pages); an update or a removal finds its row
by the same number. Registrations went up about 5%. A store written with the old table is
moved into the new one the first time it opens.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from interknit.logs import os_error
from interknit.registry.model import Instance


class StoreError(Exception):
    """The store cannot be read or written; the registry answers 503 and changes nothing."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    instances: list[Instance]
    revision: int


@dataclass(frozen=True, slots=True)
class Batch:
    """The rows of one commit (the last word per instance, by its ``create_revision``), their
    records encoded on the event loop: the store's thread then runs little Python between
    SQLite calls."""

    upserts: list[tuple[int, bytes]]
    deletes: list[int]
    # The revision of the batch's last event. When the batch deletes nothing, that event was a
    # put and one of the upserts carries it as its ``mod_revision``.
    revision: int


class Store(Protocol):
    """Blocking calls; the registry runs them on a thread of their own, one at a time."""

    def load(self) -> Snapshot: ...

    def commit(self, batch: Batch) -> None: ...

    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    created INTEGER PRIMARY KEY,  -- the instance's create_revision
    record BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
"""


# Far below SQLite's limit on bound parameters (32,766 since 3.32), two per row.
_ROWS_PER_STATEMENT = 256


@functools.lru_cache(maxsize=_ROWS_PER_STATEMENT)
def _upsert_sql(rows: int) -> str:
    values = ",".join(["(?, ?)"] * rows)
    return f"INSERT OR REPLACE INTO records (created, record) VALUES {values}"


def _upsert(db: sqlite3.Connection, rows: list[tuple[int, bytes]]) -> None:
    """Write up to ``_ROWS_PER_STATEMENT`` rows in one statement."""
    db.execute(_upsert_sql(len(rows)), [v for row in rows for v in row])


class SqliteStore:
    """The embedded store: one SQLite file under the node's data directory."""

    FILENAME = "registry.db"

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.path = Path(data_dir) / self.FILENAME
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            directory = self.path.parent
            try:
                directory.mkdir(parents=True, exist_ok=True)
                # SQLite says only "unable to open database file"; a file of our own says why
                # (permission denied, read-only file system) and the store then needs its -wal
                # and -shm files beside it anyway.
                with tempfile.TemporaryFile(dir=directory):
                    pass
            except OSError as exc:
                raise StoreError(
                    f"cannot write in the data directory {directory} (node.data_dir):"
                    f" {os_error(exc)}"
                ) from exc
            try:
                db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                # FULL, not NORMAL: in WAL mode NORMAL may lose the last commits on power loss,
                # and an acknowledged registration must survive anything short of the disk.
                db.execute("PRAGMA synchronous=FULL")
                db.executescript(_SCHEMA)
                _move_old_table(db)
            except (sqlite3.Error, OSError) as exc:
                raise StoreError(f"cannot open the store at {self.path}: {exc}") from exc
            self._db = db
        return self._db

    def load(self) -> Snapshot:
        db = self._connect()
        try:
            rows = db.execute("SELECT created, record FROM records").fetchall()
            rev_row = db.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read the store at {self.path}: {exc}") from exc
        newest: dict[tuple[str, str], tuple[int, Instance]] = {}
        stale: list[int] = []
        for created, record in rows:
            inst = Instance.from_record(record)
            if inst.create_revision != created:
                # Moved from the old table without a usable create_revision: the number that
                # later writes of this instance will use is its create_revision.
                inst = inst.evolve(create_revision=created)
            seen = newest.get(inst.key)
            if seen is None or seen[1].mod_revision < inst.mod_revision:
                if seen is not None:
                    stale.append(seen[0])
                newest[inst.key] = (created, inst)
            else:
                stale.append(created)
        if stale:
            self._delete_rows(db, stale)
        instances = [inst for _, inst in newest.values()]
        revision = max([int(rev_row[0]) if rev_row else 0, *(i.mod_revision for i in instances)])
        return Snapshot(instances=instances, revision=revision)

    def _delete_rows(self, db: sqlite3.Connection, keys: list[int]) -> None:
        # A repair: this store writes one row per instance, but rows moved from the old table
        # could name an instance twice. The newest record of each instance wins.
        try:
            with _transaction(db):
                db.executemany("DELETE FROM records WHERE created = ?", [(k,) for k in keys])
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write the store at {self.path}: {exc}") from exc

    def commit(self, batch: Batch) -> None:
        db = self._connect()
        rows = batch.upserts
        if not batch.deletes and 0 < len(rows) <= _ROWS_PER_STATEMENT:
            try:
                _upsert(db, rows)
            except sqlite3.Error as exc:
                raise StoreError(f"cannot write the store at {self.path}: {exc}") from exc
            return
        try:
            with _transaction(db):
                # One statement for many rows: each statement step gives the GIL away and must
                # win it back from a busy event loop, so steps are what a commit costs.
                for start in range(0, len(rows), _ROWS_PER_STATEMENT):
                    _upsert(db, rows[start : start + _ROWS_PER_STATEMENT])
                for created in batch.deletes:
                    db.execute("DELETE FROM records WHERE created = ?", (created,))
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('revision', ?)",
                    (batch.revision,),
                )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write the store at {self.path}: {exc}") from exc

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _move_old_table(db: sqlite3.Connection) -> None:
    """Move the rows of a store written before rows were keyed by ``create_revision``."""
    if not db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'instances'"
    ).fetchone():
        return
    with _transaction(db):
        used: set[int] = set()
        spare = 0
        for (record,) in db.execute("SELECT record FROM instances").fetchall():
            created = Instance.from_record(record).create_revision
            if created <= 0 or created in used:
                spare -= 1  # below any revision; load makes it the instance's number
                created = spare
            used.add(created)
            db.execute("INSERT INTO records (created, record) VALUES (?, ?)", (created, record))
        db.execute("DROP TABLE instances")


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise

"""The embedded store's rows: keyed by each instance's create_revision, moved from the old table."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from interknit.registry.model import Instance, InstanceSpec
from interknit.registry.registry import Registry
from interknit.registry.store import Batch, SqliteStore
from tests.registry.test_committer import Disk, started

SPEC = InstanceSpec(address="10.0.0.1", port=80)


def rows(path: Path) -> int:
    with sqlite3.connect(path / SqliteStore.FILENAME) as db:
        return int(db.execute("SELECT count(*) FROM records").fetchone()[0])


async def test_an_update_rewrites_its_row_and_a_return_after_removal_is_one_row(
    tmp_path: Path,
) -> None:
    registry, disk = await started(tmp_path)
    await registry.register("api", "a", SPEC)
    await registry.register("api", "a", InstanceSpec(address="10.0.0.1", port=81))
    assert rows(tmp_path) == 1
    disk.gate.clear()
    gone = asyncio.create_task(registry.deregister("api", "a"))
    await asyncio.sleep(0.05)  # the committer holds the removal at the gate
    again = asyncio.create_task(
        registry.register("api", "a", InstanceSpec(address="10.0.0.2", port=82))
    )
    await asyncio.sleep(0.05)
    disk.gate.set()
    await asyncio.gather(gone, again)
    await registry.close()
    reopened, _ = await started(tmp_path)
    (inst,) = reopened.state.instances("api")
    assert (inst.address, inst.port) == ("10.0.0.2", 82)
    assert rows(tmp_path) == 1
    await reopened.close()


async def test_a_delete_and_a_new_registration_of_one_name_in_one_commit(tmp_path: Path) -> None:
    # The old "a" and the new one are two rows (two create_revisions): the one commit must
    # delete the first and write the second, not keep only its last word about the name "a".
    registry, disk = await started(tmp_path)
    await registry.register("api", "a", SPEC)
    disk.gate.clear()
    first = asyncio.create_task(registry.register("api", "other", SPEC))
    await asyncio.sleep(0.05)  # held at the gate; what follows shares the next commit
    gone = asyncio.create_task(registry.deregister("api", "a"))
    again = asyncio.create_task(
        registry.register("api", "a", InstanceSpec(address="10.0.0.2", port=82))
    )
    await asyncio.sleep(0.05)
    disk.gate.set()
    await asyncio.gather(first, gone, again)
    assert disk.commits[-1].deletes and disk.commits[-1].upserts
    await registry.close()
    reopened, _ = await started(tmp_path)
    assert sorted((i.id, i.port) for i in reopened.state.instances("api")) == [
        ("a", 82),
        ("other", 80),
    ]
    assert rows(tmp_path) == 2
    await reopened.close()


def test_new_instances_are_appended_a_few_pages_a_commit(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path)
    db = store._connect()
    db.execute("PRAGMA wal_autocheckpoint=0")  # count every page the commits write
    revision = 0
    for _ in range(200):
        upserts = []
        for _ in range(16):
            revision += 1
            # Names that sort all over the table, as real ids do; a record of about 400 bytes.
            inst = Instance("api", f"i{revision * 7919 % 100_003}", SPEC, create_revision=revision)
            upserts.append((revision, inst.to_record() + b" " * 100))
        store.commit(Batch(upserts, [], revision))
    _, frames, _ = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    # 6.4 KiB of records: two pages of rows, the last page again and the b-tree above them.
    # Keyed by (service, id), each commit wrote about nine.
    assert frames / 200 < 5
    store.close()


async def test_a_store_with_the_old_table_is_moved_over(tmp_path: Path) -> None:
    old = sqlite3.connect(tmp_path / SqliteStore.FILENAME)
    old.executescript(
        "CREATE TABLE instances (service TEXT NOT NULL, id TEXT NOT NULL, record BLOB NOT NULL,"
        " PRIMARY KEY (service, id)) WITHOUT ROWID;"
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;"
        "INSERT INTO meta VALUES ('revision', 9);"
    )
    a = Instance("api", "a", SPEC, create_revision=3, mod_revision=7)
    b = Instance("api", "b", SPEC, create_revision=0, mod_revision=8)  # none recorded
    c = Instance("web", "c", SPEC, create_revision=0, mod_revision=9)
    for inst in (a, b, c):
        old.execute(
            "INSERT INTO instances VALUES (?, ?, ?)", (inst.service, inst.id, inst.to_record())
        )
    old.commit()
    old.close()
    registry = Registry(Disk(tmp_path))
    await registry.start()
    assert registry.state.revision == 9
    assert {i.id for i in registry.state.all_instances()} == {"a", "b", "c"}
    # Each moved instance is written back to its own row, not beside it.
    for inst in registry.state.all_instances():
        await registry.register(inst.service, inst.id, InstanceSpec(address="10.0.0.9", port=9))
    await registry.close()
    assert rows(tmp_path) == 3
    reopened, _ = await started(tmp_path)
    assert {(i.id, i.port) for i in reopened.state.all_instances()} == {
        ("a", 9),
        ("b", 9),
        ("c", 9),
    }
    await reopened.close()

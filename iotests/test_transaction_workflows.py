"""Whole incremental-backup workflows built on `transaction` (issue 11), each checked by
restoring the chain and comparing it with a frozen copy of the source (qemu-img compare), by
bitmap counts and sha256 (`x-debug-block-dirty-bitmap-sha256`) and by the job events.

Every expectation was observed on qemu-storage-daemon 10.0.2; the same test runs on blockd.
Drives are small qcow2 images on tmpfs exported over NBD (see txn_helpers.py).
"""

from __future__ import annotations

import pytest

import data_nbd
from backup_helpers import MiB, add_qcow2, close, compare, count, qcow2, raw, snapshot
from test_backup_errors import blkdebug_raw
from txn_helpers import SIZE, SLOTS, GenWriter, act, add_drives, job_log, of_job, tmpfs_dir

#: Bytes per second per job when a job must still be running while something else happens.
SPEED = 2 * MiB
KiB = 1024


@pytest.fixture
def make_daemon(make_daemon):
    return data_nbd.ready_factory(make_daemon)


@pytest.fixture
def shm():
    yield from tmpfs_dir()


def write(d, node, *specs, pattern=0x5a):
    """qemu-io writes into ``node`` (offset length pairs as "off len")."""
    data_nbd.node_io(d, node, *[f"write -P {pattern:#x} {s}" for s in specs])


def full_targets(d, where, names, tag):
    for n in names:
        add_qcow2(d, f"{n}-{tag}", qcow2(where / f"{n}-{tag}.qcow2", SIZE))


def inc_targets(d, where, names, tag, base_tag):
    """qcow2 targets ``<n>-<tag>`` backed (in the file only) by ``<n>-<base_tag>``."""
    for n in names:
        img = qcow2(where / f"{n}-{tag}.qcow2", SIZE, backing=where / f"{n}-{base_tag}.qcow2")
        add_qcow2(d, f"{n}-{tag}", img, backing=None)


def backups(names, tag, sync, **kw):
    return [act("blockdev-backup", job_id=f"j{n}-{tag}", device=n, target=f"{n}-{tag}", sync=sync, **kw)
            for n in names]


def succeeded(d, names, tag):
    jobs = {f"j{n}-{tag}" for n in names}
    log = job_log(d, jobs)
    done = {j: err for ev, j, err in log if ev == "BLOCK_JOB_COMPLETED"}
    assert done == {j: None for j in jobs}, log
    return log


def restored_equals_frozen(d, where, names, tag, frozen, *also_close):
    """Closes the targets ``<n>-<tag>`` (and the nodes ``also_close``: the older targets of
    the chain, whose metadata is complete on disk only once closed) and compares each chain
    with the frozen copy."""
    close(d, *[f"{n}-{tag}" for n in names], *also_close)
    for n in names:
        compare(where / f"{n}-{tag}.qcow2", frozen[n], "qcow2", "raw")


def freeze(d, where, names, tag):
    return {n: snapshot(d, n, where / f"{n}-frozen-{tag}.raw") for n in names}


def test_new_chain_then_incrementals_of_two_drives_then_a_new_chain(make_daemon, shm):
    """[add bitmap, full backup] per drive in one transaction while a writer writes both:
    the bitmap starts exactly at the full's instant, so full + incremental restores the
    source. Then [clear bitmap, full backup] starts a new chain the same way."""
    names = ["a", "b"]
    d = make_daemon()
    exports = add_drives(d, shm, names)
    for chain in (0, 1):
        full_targets(d, shm, names, f"f{chain}")
        w = GenWriter(d, [exports[n] for n in names], first=1 + chain * 1000).start()
        w.wait_for(1 + chain * 1000 + SLOTS)
        mark = [act("block-dirty-bitmap-add", node=n, name="b0") for n in names] if chain == 0 else \
            [act("block-dirty-bitmap-clear", node=n, name="b0") for n in names]
        d.ok("transaction", actions=mark + backups(names, f"f{chain}", "full", speed=SPEED))
        replied = w.done
        succeeded(d, names, f"f{chain}")
        assert w.stop() - replied >= 20
        # The writes after the instant are in the bitmap (at least the writer's slots).
        for n in names:
            assert count(d, n, "b0") >= SLOTS * 64 * KiB
        write(d, "a", "100k 8k", "3M 64k")
        write(d, "b", "2M 1k")
        frozen = freeze(d, shm, names, f"i{chain}")
        inc_targets(d, shm, names, f"i{chain}", f"f{chain}")
        d.ok("transaction", actions=backups(names, f"i{chain}", "incremental", bitmap="b0"))
        succeeded(d, names, f"i{chain}")
        for n in names:
            assert count(d, n, "b0") == 0
        restored_equals_frozen(d, shm, names, f"i{chain}", frozen, *[f"{n}-f{chain}" for n in names])


def test_failed_incremental_then_a_good_one_covers_everything(make_daemon, shm):
    """Incrementals of a and b in one transaction; a's target fails with ENOSPC: a's job
    fails and its bitmap keeps every dirty cluster (plus later writes), b's succeeds. The next
    incremental of a covers both rounds of writes; b's covers only the second."""
    names = ["a", "b"]
    d = make_daemon()
    add_drives(d, shm, names)
    full_targets(d, shm, names, "f")
    d.ok("transaction", actions=[act("block-dirty-bitmap-add", node=n, name="b0") for n in names]
         + backups(names, "f", "full"))
    succeeded(d, names, "f")
    for n in names:
        write(d, n, "0 64k", "1M 192k", pattern=0x31)
    assert count(d, "a", "b0") == count(d, "b", "b0") == 256 * KiB
    sha_a = d.sha256("a", "b0")
    blkdebug_raw(d, "a-bad", raw(shm / "a-bad.raw", SIZE), "write_aio", 28, False)
    inc_targets(d, shm, ["b"], "i1", "f")
    d.ok("transaction", actions=[
        act("blockdev-backup", job_id="ja", device="a", target="a-bad", sync="incremental", bitmap="b0"),
        act("blockdev-backup", job_id="jb", device="b", target="b-i1", sync="incremental", bitmap="b0"),
    ])
    log = job_log(d, {"ja", "jb"})
    assert of_job(log, "ja")[-3:] == [("BLOCK_JOB_COMPLETED", "No space left on device"), "concluded", "null"]
    assert of_job(log, "jb")[-3:] == [("BLOCK_JOB_COMPLETED", None), "concluded", "null"]
    assert count(d, "a", "b0") == 256 * KiB and d.sha256("a", "b0") == sha_a
    assert count(d, "b", "b0") == 0
    assert not d.bitmap("a", "b0")["busy"]
    for n in names:
        write(d, n, "3M 64k", pattern=0x32)
    assert count(d, "a", "b0") == 320 * KiB and count(d, "b", "b0") == 64 * KiB
    frozen = freeze(d, shm, names, "2")
    inc_targets(d, shm, ["a"], "i2", "f")
    inc_targets(d, shm, ["b"], "i2", "i1")
    close(d, "b-i1")
    d.ok("transaction", actions=backups(names, "i2", "incremental", bitmap="b0"))
    succeeded(d, names, "i2")
    restored_equals_frozen(d, shm, names, "i2", frozen, "a-f", "b-f")


def test_external_snapshot_of_several_drives_at_once(make_daemon, shm):
    """blockdev-snapshot-sync of a, b and c in one transaction: every export now serves the
    overlay, whose backing is the old image; writes go to the overlays only."""
    names = ["a", "b", "c"]
    d = make_daemon()
    add_drives(d, shm, names)
    d.ok("transaction", actions=[
        act("blockdev-snapshot-sync", node_name=n, snapshot_file=str(shm / f"{n}-o.qcow2"),
            snapshot_node_name=f"{n}-o", format="qcow2")
        for n in names
    ])
    # QSD has no guest devices: query-block lists nothing, on both daemons.
    assert d.ok("query-block") == []
    exports = {e["id"]: e["node-name"] for e in d.ok("query-block-exports")}
    assert exports == {f"e{n}": f"{n}-o" for n in names}
    tree = {n["node-name"]: n for n in d.ok("query-named-block-nodes")}
    for n in names:
        top = tree[f"{n}-o"]
        assert top["file"] == str(shm / f"{n}-o.qcow2")
        assert top["backing_file"] == str(shm / f"{n}.qcow2")
        assert top["image"]["backing-image"]["filename"] == str(shm / f"{n}.qcow2")
        assert top["backing_file_depth"] == 1
        assert tree[n]["ro"] is True and top["ro"] is False
    for n in names:
        out = data_nbd.qemu_io_uri(data_nbd.uri(d.nbd_sock, f"e{n}"), "write -P 0x77 0 64k")
        data_nbd.assert_io_ok(out.stdout)
    d.shutdown()
    for n in names:
        base = data_nbd.qemu_io_uri(str(shm / f"{n}.qcow2"), "read -P 0x01 0 64k", read_only=True,
                                    fmt="qcow2")
        assert "Pattern verification failed" not in base.stdout, base.stdout
        top = data_nbd.qemu_io_uri(str(shm / f"{n}-o.qcow2"), "read -P 0x77 0 64k", "read -P 0x01 64k 64k",
                                   read_only=True, fmt="qcow2")
        assert "Pattern verification failed" not in top.stdout, top.stdout


# x-debug-block-dirty-bitmap-sha256 of the libvirt test's bitmaps (4 MiB, 64 KiB granularity),
# as qemu-storage-daemon 10.0.2 reports them.
SHA_EMPTY = "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"
SHA_C1 = "a87d7dadce44da08f06da54f970e1f30f497c928912601d2e66117db2ac7f186"
SHA_C2 = "36ebffba4beef2e8712c48442368b4afc4b649d22b3a47394ec39997dd5ff21b"
SHA_C3 = "01acecb507abfe1a354aa8064f4af5d3f1acd019e37db3c11c97523b71c76e9d"
SHA_C1_C2 = "582af898372c354190d0820757db1f7fd2bcb868307b3d79b15af112020f3f1a"
SHA_C1_C2_C3_W = "34a3824a10eb6152bfdbe9ef17f4dbbe560c43025a9362a461f6eb5158f87d0c"


def bitmap_state(d, node):
    """{name: (count, recording, persistent, sha256)} of the node's named bitmaps."""
    return {b["name"]: (b["count"], b["recording"], b["persistent"], d.sha256(node, b["name"]))
            for b in d.bitmaps(node) if "name" in b}


def test_libvirt_push_backup_and_checkpoint_delete(make_daemon, shm):
    """libvirt's sequences on one disk: checkpoint c1 with a full backup; checkpoint c2
    (disable c1, add c2); a push backup since c1 that also creates checkpoint c3 (disable c2,
    add c3, add a disabled temporary bitmap, merge c1 and c2 into it, back up with it); then
    deleting checkpoint c2 (merge into c1, remove) and the current checkpoint c3 (merge into
    c1, enable c1, remove)."""
    d = make_daemon()
    add_drives(d, shm, ["a"])
    full_targets(d, shm, ["a"], "f")
    d.ok("transaction", actions=[act("block-dirty-bitmap-add", node="a", name="c1", persistent=True)]
         + backups(["a"], "f", "full"))
    succeeded(d, ["a"], "f")
    write(d, "a", "0 64k", "1M 128k", pattern=0x41)
    d.ok("transaction", actions=[
        act("block-dirty-bitmap-disable", node="a", name="c1"),
        act("block-dirty-bitmap-add", node="a", name="c2", persistent=True),
    ])
    write(d, "a", "512k 64k", "1M 64k", "3M 4k", pattern=0x42)
    frozen = freeze(d, shm, ["a"], "push")
    inc_targets(d, shm, ["a"], "i", "f")
    d.ok("transaction", actions=[
        act("block-dirty-bitmap-disable", node="a", name="c2"),
        act("block-dirty-bitmap-add", node="a", name="c3", persistent=True),
        act("block-dirty-bitmap-add", node="a", name="backup-a", persistent=False, disabled=True),
        act("block-dirty-bitmap-merge", node="a", target="backup-a", bitmaps=["c1", "c2"]),
        act("blockdev-backup", job_id="ja-i", device="a", target="a-i", sync="incremental",
            bitmap="backup-a"),
    ])
    succeeded(d, ["a"], "i")
    write(d, "a", "2M 64k", pattern=0x43)
    # The temporary bitmap was cleared by the successful job and stays disabled; c1 and c2
    # are untouched, c3 has the write after the backup.
    assert bitmap_state(d, "a") == {
        "backup-a": (0, False, False, SHA_EMPTY),
        "c1": (3 * 64 * KiB, False, True, SHA_C1),
        "c2": (3 * 64 * KiB, False, True, SHA_C2),
        "c3": (64 * KiB, True, True, SHA_C3),
    }
    d.ok("block-dirty-bitmap-remove", node="a", name="backup-a")
    restored_equals_frozen(d, shm, ["a"], "i", frozen, "a-f")
    # Delete checkpoint c2 (its parent c1 takes its changes), then the current one, c3.
    d.ok("transaction", actions=[
        act("block-dirty-bitmap-merge", node="a", target="c1", bitmaps=["c2"]),
        act("block-dirty-bitmap-remove", node="a", name="c2"),
    ])
    assert bitmap_state(d, "a") == {
        "c1": (5 * 64 * KiB, False, True, SHA_C1_C2),
        "c3": (64 * KiB, True, True, SHA_C3),
    }
    d.ok("transaction", actions=[
        act("block-dirty-bitmap-merge", node="a", target="c1", bitmaps=["c3"]),
        act("block-dirty-bitmap-enable", node="a", name="c1"),
        act("block-dirty-bitmap-remove", node="a", name="c3"),
    ])
    write(d, "a", "3584k 64k", pattern=0x44)
    assert bitmap_state(d, "a") == {"c1": (7 * 64 * KiB, True, True, SHA_C1_C2_C3_W)}
    d.shutdown()
    assert data_nbd.on_disk_bitmaps(shm / "a.qcow2") == {"c1": {"flags": ["auto"], "granularity": 64 * KiB}}


def grouped_failure(make_daemon, shm):
    """Grouped incrementals of a, b and c; b's target fails (EIO) at 1.5 MiB while a and c
    are still copying (slow: one 64 KiB copy at a time, else QEMU copies everything in one
    burst of parallel requests and only then waits for the rate limit). Writes land on every
    drive while the jobs run. Returns the daemon, the job events and the clusters written
    meanwhile per drive."""
    names = ["a", "b", "c"]
    d = make_daemon()
    exports = add_drives(d, shm, names)
    for n in names:
        d.ok("block-dirty-bitmap-add", node=n, name="b0")
        write(d, n, "0 3M", pattern=0x51)
        assert count(d, n, "b0") == 3 * MiB
    for n in ("a", "c"):
        add_qcow2(d, f"{n}-t", qcow2(shm / f"{n}-t.qcow2", SIZE))
    bad = raw(shm / "b-bad.raw", SIZE)
    d.blockdev_add(driver="raw", node_name="b-t", file={
        "driver": "blkdebug", "image": {"driver": "file", "filename": str(bad)},
        "inject-error": [{"event": "write_aio", "errno": 5, "sector": (3 * MiB // 2) // 512}]})
    clients = {}
    for n in names:
        clients[n] = data_nbd.WireClient(d.nbd_sock)
        clients[n].go(exports[n])
    d.ok("transaction", actions=[
        act("blockdev-backup", job_id=f"j{n}", device=n, target=f"{n}-t", sync="incremental",
            bitmap="b0", speed=MiB, x_perf={"max-workers": 1, "max-chunk": 64 * KiB})
        for n in names
    ], properties={"completion-mode": "grouped"})
    # New writes while the jobs run, outside the dirty area: a 4 clusters, b 2, c 1.
    new = {"a": 4, "b": 2, "c": 1}
    for n, k in new.items():
        for i in range(k):
            assert clients[n].write(3 * MiB + i * 64 * KiB, b"\x52" * 4096)[0] == 0
    running = {j["id"]: j["status"] for j in d.ok("query-jobs")}
    assert running == {"ja": "running", "jb": "running", "jc": "running"}
    log = job_log(d, {"ja", "jb", "jc"})
    for c in clients.values():
        c.disconnect()
    return d, log, new


def test_grouped_one_failing_job_cancels_the_others_and_restores_every_bitmap(make_daemon, shm):
    d, log, new = grouped_failure(make_daemon, shm)
    start = ["created", "running", "paused", "running"]
    end = ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]
    assert of_job(log, "ja") == start + end
    assert of_job(log, "jc") == start + end
    assert of_job(log, "jb") == start + ["BLOCK_JOB_ERROR", "aborting",
                                         ("BLOCK_JOB_COMPLETED", "Input/output error"), "concluded", "null"]
    for n, k in new.items():
        b = d.bitmap(n, "b0")
        assert (b["count"], b["recording"], b["busy"]) == (3 * MiB + k * 64 * KiB, True, False)
        assert [x.get("name") for x in d.bitmaps(n)] == ["b0"]
    assert d.ok("query-jobs") == []


def test_grouped_failure_events_come_in_qemus_order(make_daemon, shm):
    """QEMU commits newest first (c, b, a start, each pausing in the transaction's drained
    section), resumes them in that order, moves every member to aborting once one failed, then
    ends them newest first."""
    _, log, _ = grouped_failure(make_daemon, shm)
    seq = [(j, detail if ev == "JOB_STATUS_CHANGE" else ev) for ev, j, detail in log]
    assert seq == [
        ("ja", "created"), ("jb", "created"), ("jc", "created"),
        ("jc", "running"), ("jc", "paused"), ("jb", "running"), ("jb", "paused"),
        ("ja", "running"), ("ja", "paused"),
        ("jc", "running"), ("jb", "running"), ("ja", "running"),
        ("jb", "BLOCK_JOB_ERROR"), ("jb", "aborting"), ("jc", "aborting"), ("ja", "aborting"),
        ("jc", "BLOCK_JOB_CANCELLED"), ("jc", "concluded"), ("jc", "null"),
        ("jb", "BLOCK_JOB_COMPLETED"), ("jb", "concluded"), ("jb", "null"),
        ("ja", "BLOCK_JOB_CANCELLED"), ("ja", "concluded"), ("ja", "null"),
    ]

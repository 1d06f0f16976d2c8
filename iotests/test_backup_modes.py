"""Backups restore exactly: every sync mode compared (`qemu-img compare`, backing chains
included) with a copy of the source taken at the job's start while a writer writes through
NBD into the running (speed-limited) job; the classic chain of incrementals made with
`qemu-img create -b prev` + drive-backup mode=existing; differential backups; drive-backup
creating its target; bitmaps after each job. Run on blockd and qemu-storage-daemon.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import iotests
import data_nbd
from backup_helpers import (MiB, add_qcow2, backup, close, compare, count, fill, finish_writer,
                            job_events, nbd, qcow2, raw, snapshot, statuses, wait_status, writer)

SIZE = 8 * MiB
K64 = 64 * 1024

#: Writes made while a job runs: (pattern, offset, length); 5 granules of 64 KiB.
DURING = [(0x44, 0, K64), (0x45, MiB + 32 * 1024, K64), (0x46, 7 * MiB, 2 * K64)]
DURING_BYTES = 5 * K64
#: Writes between a full backup and the next one.
PRE = [(0x33, MiB, 3 * K64), (0x34, 4 * MiB, MiB), (0x35, SIZE - K64, K64)]


def granules(writes):
    return {g for _, off, n in writes for g in range(off // K64, (off + n - 1) // K64 + 1)}


@pytest.fixture
def make_daemon(make_daemon):
    return data_nbd.ready_factory(make_daemon)


def chain(tmp: Path) -> Path:
    """base.qcow2 (data everywhere in the first half) under src.qcow2 (own data, zeros)."""
    base = qcow2(tmp / "base.qcow2", SIZE)
    fill(base, "write -P 0x01 0 4M", "write -P 0x07 6M 1M")
    src = qcow2(tmp / "src.qcow2", SIZE, backing=base)
    fill(src, "write -P 0x02 512k 1M", "write -z 3M 256k", "write -P 0x03 5M 1M")
    return src


def finished(d, job):
    seq = statuses(job_events(d, job))
    assert "BLOCK_JOB_COMPLETED" in seq and seq[-2:] == ["concluded", "null"], seq
    return seq


def run_during(d, job, uri):
    """Writes DURING while `job` runs (held back by speed 1), then lets it finish."""
    finish_writer(writer(uri, DURING))
    assert wait_status(d, job, "running")["current-progress"] < SIZE
    d.ok("block-job-set-speed", device=job, speed=0)


@pytest.mark.parametrize("sync", ["full", "top", "incremental", "bitmap-never", "bitmap-always"])
def test_sync_mode_restores_the_point_in_time_while_a_writer_writes(make_daemon, tmp_path, sync):
    src = chain(tmp_path)
    d = make_daemon()
    add_qcow2(d, "src", src)
    d.ok("block-dirty-bitmap-add", node="src", name="b")
    uri = nbd(d, "src", "w", writable=True)
    extra = {}
    if sync == "top":
        tgt = qcow2(tmp_path / "tgt.qcow2", SIZE, backing=tmp_path / "base.qcow2")
    elif sync == "full":
        tgt = qcow2(tmp_path / "tgt.qcow2", SIZE)
    else:
        # A full backup first (the bitmap counts from before it), then changes.
        full = qcow2(tmp_path / "full.qcow2", SIZE)
        add_qcow2(d, "full", full)
        assert backup(d, "f", "src", "full", "full")["return"] == {}
        finished(d, "f")
        close(d, "full")
        finish_writer(writer(uri, PRE))
        tgt = qcow2(tmp_path / "tgt.qcow2", SIZE, backing=full)
        mode = sync.split("-")[1] if "-" in sync else None
        extra = {"bitmap": "b"} if mode is None else {"bitmap": "b", "bitmap-mode": mode}
    before = count(d, "src", "b")
    add_qcow2(d, "tgt", tgt)
    ref = snapshot(d, "src", tmp_path / "ref.raw")
    job_sync = sync.split("-")[0]
    assert backup(d, "j", "src", "tgt", job_sync, speed=1, **extra)["return"] == {}
    run_during(d, "j", uri)
    finished(d, "j")
    close(d, "tgt")
    compare(tgt, ref)
    after = count(d, "src", "b")
    if sync in ("full", "top"):
        assert after == before + DURING_BYTES
    elif sync == "bitmap-never":
        # Unchanged except for the writes made during the job (granules 16, 17 overlap).
        assert after == (granules(PRE) | granules(DURING)).__len__() * K64
        assert before == len(granules(PRE)) * K64
    else:
        # on-success / always after success: exactly the writes made during the job.
        assert after == DURING_BYTES
    assert [b.get("name") for b in d.bitmaps("src")] == ["b"]


def test_sync_none_is_a_point_in_time_view_of_the_source(make_daemon, tmp_path):
    src = chain(tmp_path)
    d = make_daemon()
    add_qcow2(d, "src", src)
    uri = nbd(d, "src", "w", writable=True)
    qcow2(tmp_path / "fleece.qcow2", SIZE)
    add_qcow2(d, "fl", tmp_path / "fleece.qcow2", backing="src")
    ref = snapshot(d, "src", tmp_path / "ref.raw")
    assert backup(d, "j", "src", "fl", "none")["return"] == {}
    finish_writer(writer(uri, DURING))
    view = snapshot(d, "fl", tmp_path / "view.raw")
    compare(view, ref, "raw", "raw")
    # The source did change.
    now = snapshot(d, "src", tmp_path / "now.raw")
    out = iotests.qemu_img("compare", "-f", "raw", "-F", "raw", str(now), str(ref), check=False)
    assert "Content mismatch" in out
    assert wait_status(d, "j", "running")
    d.ok("job-cancel", id="j")
    seq = statuses(job_events(d, "j"))
    assert seq[-4:] == ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]


def drive_backup(d, job, target, sync, **kw):
    args = {"job-id": job, "device": "src", "target": str(target), "sync": sync}
    args.update({k.replace("_", "-"): v for k, v in kw.items()})
    return d.cmd("drive-backup", args)


def test_chain_of_three_incrementals_each_a_complete_point_in_time(make_daemon, tmp_path):
    src = qcow2(tmp_path / "src.qcow2", SIZE)
    fill(src, "write -P 0x10 0 2M", "write -P 0x11 5M 512k")
    d = make_daemon()
    add_qcow2(d, "src", src)
    d.ok("block-dirty-bitmap-add", node="src", name="b")
    uri = nbd(d, "src", "w", writable=True)
    refs = [snapshot(d, "src", tmp_path / "ref0.raw")]
    full = tmp_path / "full.qcow2"
    assert drive_backup(d, "j0", full, "full", format="qcow2")["return"] == {}
    finished(d, "j0")
    images = [full]
    rounds = [
        [(0x21, 0, K64), (0x22, 3 * MiB, 300 * 1024)],
        [(0x31, 64 * 1024, 2 * K64), (0x32, 3 * MiB, K64), (0x33, SIZE - 512, 512)],
        [(0x41, 6 * MiB, MiB)],
    ]
    for i, writes in enumerate(rounds, start=1):
        finish_writer(writer(uri, writes))
        refs.append(snapshot(d, "src", tmp_path / f"ref{i}.raw"))
        inc = tmp_path / f"inc{i}.qcow2"
        iotests.qemu_img("create", "-q", "-f", "qcow2", "-b", str(images[-1]), "-F", "qcow2", str(inc))
        r = drive_backup(d, f"j{i}", inc, "incremental", bitmap="b", mode="existing", format="qcow2")
        assert r["return"] == {}
        finished(d, f"j{i}")
        images.append(inc)
        assert count(d, "src", "b") == 0
    for img, ref in zip(images, refs):
        compare(img, ref)
    # Each incremental holds only what changed in its round.
    sizes = [int(iotests.qemu_img("info", "-U", "--output=json", str(p)).split('"actual-size": ')[1].split(",")[0])
             for p in images[1:]]
    assert all(s < 2 * MiB for s in sizes), sizes


def test_differential_backups_keep_the_bitmap(make_daemon, tmp_path):
    src = qcow2(tmp_path / "src.qcow2", SIZE)
    fill(src, "write -P 0x10 0 8M")
    d = make_daemon()
    add_qcow2(d, "src", src)
    d.ok("block-dirty-bitmap-add", node="src", name="b")
    uri = nbd(d, "src", "w", writable=True)
    full = tmp_path / "full.qcow2"
    assert drive_backup(d, "j0", full, "full", format="qcow2")["return"] == {}
    finished(d, "j0")
    for i, writes in enumerate([[(0x21, 0, 2 * K64)], [(0x22, 4 * MiB, K64)]], start=1):
        finish_writer(writer(uri, writes))
        before = count(d, "src", "b")
        ref = snapshot(d, "src", tmp_path / f"ref{i}.raw")
        diff = tmp_path / f"diff{i}.qcow2"
        iotests.qemu_img("create", "-q", "-f", "qcow2", "-b", str(full), "-F", "qcow2", str(diff))
        r = drive_backup(d, f"j{i}", diff, "bitmap", bitmap="b", bitmap_mode="never",
                         mode="existing", format="qcow2")
        assert r["return"] == {}
        finished(d, f"j{i}")
        assert count(d, "src", "b") == before
        compare(diff, ref)
    assert count(d, "src", "b") == 3 * K64


@pytest.mark.parametrize("fmt", ["qcow2", "raw", None])
def test_drive_backup_creates_its_target(make_daemon, tmp_path, fmt):
    src = qcow2(tmp_path / "src.qcow2", SIZE)
    fill(src, "write -P 0x10 0 1M", "write -P 0x12 7M 1M")
    d = make_daemon()
    add_qcow2(d, "src", src)
    ref = snapshot(d, "src", tmp_path / "ref.raw")
    tgt = tmp_path / "new.img"
    extra = {} if fmt is None else {"format": fmt}
    assert drive_backup(d, "j", tgt, "full", **extra)["return"] == {}
    finished(d, "j")
    info = iotests.qemu_img("info", "-U", "--output=json", str(tgt))
    assert f'"format": "{fmt or "qcow2"}"' in info
    compare(tgt, ref, fmt or "qcow2")
    # The target was closed with the job: no node left behind.
    assert [n["node-name"] for n in d.nodes() if n["node-name"] == "src"] == ["src"]
    assert all(n["image"]["filename"] != str(tgt) for n in d.nodes())


def test_drive_backup_into_existing_image_probes_its_format(make_daemon, tmp_path):
    src = qcow2(tmp_path / "src.qcow2", SIZE)
    fill(src, "write -P 0x10 0 1M")
    raw(tmp_path / "pre.raw", SIZE)
    d = make_daemon()
    add_qcow2(d, "src", src)
    ref = snapshot(d, "src", tmp_path / "ref.raw")
    assert drive_backup(d, "j", tmp_path / "pre.raw", "full", mode="existing")["return"] == {}
    finished(d, "j")
    compare(tmp_path / "pre.raw", ref, "raw")


def test_drive_backup_top_bases_the_new_image_on_the_source_backing(make_daemon, tmp_path):
    src = chain(tmp_path)
    d = make_daemon()
    add_qcow2(d, "src", src)
    ref = snapshot(d, "src", tmp_path / "ref.raw")
    tgt = tmp_path / "top.qcow2"
    assert drive_backup(d, "j", tgt, "top", format="qcow2")["return"] == {}
    finished(d, "j")
    info = iotests.qemu_img("info", "-U", "--output=json", str(tgt))
    assert str(tmp_path / "base.qcow2") in info
    compare(tgt, ref)


def test_discard_source_frees_what_was_copied(make_daemon, tmp_path):
    src = qcow2(tmp_path / "src.qcow2", SIZE)
    fill(src, "write -P 0x10 0 2M", "write -P 0x11 5M 1M")
    d = make_daemon()
    add_qcow2(d, "src", src, discard="unmap")
    ref = snapshot(d, "src", tmp_path / "ref.raw")
    tgt = qcow2(tmp_path / "tgt.qcow2", SIZE)
    add_qcow2(d, "tgt", tgt)
    assert backup(d, "j", "src", "tgt", "full", discard_source=True)["return"] == {}
    finished(d, "j")
    close(d, "tgt")
    compare(tgt, ref)
    after = snapshot(d, "src", tmp_path / "after.raw")
    assert after.read_bytes() == bytes(SIZE), "copied regions were not discarded"


def test_speed_limit_and_set_speed_are_followed(make_daemon, tmp_path):
    src = qcow2(tmp_path / "src.qcow2", 64 * MiB)
    fill(src, "write -P 0x10 0 64M")
    tgt = qcow2(tmp_path / "tgt.qcow2", 64 * MiB)
    d = make_daemon()
    add_qcow2(d, "src", src)
    add_qcow2(d, "tgt", tgt)
    speed = 4 * MiB
    assert backup(d, "j", "src", "tgt", "full", speed=speed)["return"] == {}

    def measure(seconds):
        import time
        a = wait_status(d, "j", "running")["current-progress"]
        t0 = time.monotonic()
        time.sleep(seconds)
        b = wait_status(d, "j", "running")["current-progress"]
        return (b - a) / (time.monotonic() - t0)

    measure(0.5)
    rate = measure(3)
    assert abs(rate - speed) / speed < 0.10 + MiB / (3 * speed), rate
    d.ok("block-job-set-speed", device="j", speed=2 * speed)
    measure(0.5)
    rate = measure(3)
    assert abs(rate - 2 * speed) / (2 * speed) < 0.10 + MiB / (6 * speed), rate
    d.ok("job-cancel", id="j")
    finished_or_cancelled = statuses(job_events(d, "j"))
    assert "BLOCK_JOB_CANCELLED" in finished_or_cancelled


def test_compressed_backup_into_qcow2(make_daemon, tmp_path):
    src = qcow2(tmp_path / "src.qcow2", SIZE)
    fill(src, "write -P 0x10 0 2M", "write -z 3M 1M")
    d = make_daemon()
    add_qcow2(d, "src", src)
    ref = snapshot(d, "src", tmp_path / "ref.raw")
    tgt = qcow2(tmp_path / "tgt.qcow2", SIZE)
    add_qcow2(d, "tgt", tgt)
    assert backup(d, "j", "src", "tgt", "full", compress=True)["return"] == {}
    seq = finished(d, "j")
    assert "BLOCK_JOB_ERROR" not in seq
    close(d, "tgt")
    compare(tgt, ref)
    check = iotests.qemu_img("check", "--output=json", str(tgt))
    assert '"compressed-clusters": 32' in check, check


@pytest.mark.parametrize("args,desc", [
    ({"target": "/nonexistent/x.qcow2"}, "Could not create '/nonexistent/x.qcow2': No such file or directory"),
    ({"target": "/nonexistent/x.qcow2", "mode": "existing"},
     "Could not open '/nonexistent/x.qcow2': No such file or directory"),
    ({"target": "TMP/x.img", "format": "nosuch"}, "Unknown file format 'nosuch'"),
    ({"target": "TMP/x.raw", "format": "raw", "compress": True}, "Compression is not supported for this drive "),
])
def test_drive_backup_refusals(make_daemon, tmp_path, args, desc):
    src = qcow2(tmp_path / "src.qcow2", SIZE)
    d = make_daemon()
    add_qcow2(d, "src", src)
    a = {"job-id": "j", "device": "src", "sync": "full"}
    a.update({k: (v.replace("TMP", str(tmp_path)) if isinstance(v, str) else v) for k, v in args.items()})
    assert d.err("drive-backup", a) == {"class": "GenericError", "desc": desc}
    assert d.ok("query-jobs") == []
    # Nothing left open: the source and its file node only.
    assert len(d.nodes()) == 2


def test_sync_none_filter_serves_snapshot_access_while_the_source_is_written(make_daemon, tmp_path):
    """Fleecing through a backup job (what blockd-backup does): snapshot-access over the
    job's filter reads the start's data while a writer changes the exported source."""
    src = chain(tmp_path)
    d = make_daemon()
    add_qcow2(d, "src", src)
    uri = nbd(d, "src", "w", writable=True)
    qcow2(tmp_path / "scratch.qcow2", SIZE)
    add_qcow2(d, "scratch", tmp_path / "scratch.qcow2")
    ref = snapshot(d, "src", tmp_path / "ref.raw")
    assert backup(d, "j", "src", "scratch", "none", filter_node_name="flt")["return"] == {}
    d.blockdev_add(driver="snapshot-access", node_name="acc", file="flt")
    finish_writer(writer(uri, DURING))
    compare(snapshot(d, "acc", tmp_path / "view.raw"), ref, "raw", "raw")
    now = snapshot(d, "src", tmp_path / "now.raw")
    out = iotests.qemu_img("compare", "-f", "raw", "-F", "raw", str(now), str(ref), check=False)
    assert "Content mismatch" in out
    d.ok("blockdev-del", node_name="acc")
    d.ok("job-cancel", id="j")
    seq = statuses(job_events(d, "j"))
    assert seq[-4:] == ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]


def test_sync_none_job_ends_as_soon_as_it_is_cancelled(make_daemon, tmp_path):
    """A fleecing job (sync=none) has nothing to finish: job-cancel ends it at once. Fleecing
    teardown waits for it before removing the scratch node, so a job that noticed the cancel
    only at a periodic tick (blockd: every 50 ms, 25 ms on average) slowed every pull backup.
    Median over 7 cancels, so one scheduling hiccup on a loaded machine does not decide."""
    import statistics
    import time
    src = qcow2(tmp_path / "src.qcow2", SIZE)
    qcow2(tmp_path / "scratch.qcow2", SIZE)
    d = make_daemon()
    add_qcow2(d, "src", src)
    add_qcow2(d, "scratch", tmp_path / "scratch.qcow2")
    waits = []
    for i in range(7):
        assert backup(d, f"j{i}", "src", "scratch", "none", filter_node_name="flt")["return"] == {}
        wait_status(d, f"j{i}", "running")
        time.sleep(0.06)  # past a first periodic tick, so a tick-driven job would wait its share
        t = time.monotonic()
        d.ok("job-cancel", id=f"j{i}")
        d.event_wait("BLOCK_JOB_CANCELLED", match={"device": f"j{i}"})
        waits.append(time.monotonic() - t)
        seq = statuses(job_events(d, f"j{i}"))
        assert seq[-2:] == ["concluded", "null"], seq
    assert statistics.median(waits) < 0.012, waits

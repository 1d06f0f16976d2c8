"""blockdev-backup / drive-backup: every refusal with QEMU's class and text, and the job's
event sequences (start blip, success with and without auto-finalize/-dismiss, pause, resume,
cancel, verbs refused by state). Texts and sequences observed on qemu-storage-daemon 10.0.2.
"""

from __future__ import annotations

import pytest

import iotests
import data_nbd
from backup_helpers import (MiB, add_qcow2, add_raw, backup, block_job, close, collapse_blips, compare,
                            count, fill, finish_writer, job_events, nbd, qcow2, raw, statuses,
                            wait_status, writer)

SIZE = 4 * MiB


@pytest.fixture
def make_daemon(make_daemon):
    return data_nbd.ready_factory(make_daemon)


@pytest.fixture
def env(make_daemon, tmp_path):
    """A daemon with qcow2 source `src` (bitmap `b`), qcow2 target `tgt`, raw targets `traw`
    and `small` (half the size)."""
    src = qcow2(tmp_path / "src.qcow2", SIZE)
    fill(src, "write -P 0x11 0 1M", "write -z 2M 64k", "write -P 0x22 3M 64k")
    qcow2(tmp_path / "tgt.qcow2", SIZE)
    raw(tmp_path / "tgt.raw", SIZE)
    raw(tmp_path / "small.raw", SIZE // 2)
    d = make_daemon()
    add_qcow2(d, "src", src)
    add_qcow2(d, "tgt", tmp_path / "tgt.qcow2")
    add_raw(d, "traw", tmp_path / "tgt.raw")
    add_raw(d, "small", tmp_path / "small.raw")
    d.ok("block-dirty-bitmap-add", node="src", name="b")
    return d


REFUSALS = [
    ({"sync": "incremental"}, "must provide a valid bitmap name for 'incremental' sync mode"),
    ({"sync": "bitmap"}, "must provide a valid bitmap name for 'bitmap' sync mode"),
    ({"sync": "full", "bitmap-mode": "never"}, "Cannot specify bitmap sync mode without a bitmap"),
    ({"sync": "full", "bitmap": "b"}, "Bitmap sync mode must be given when providing a bitmap"),
    ({"sync": "incremental", "bitmap": "b", "bitmap-mode": "never"},
     "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"),
    ({"sync": "incremental", "bitmap": "b", "bitmap-mode": "always"},
     "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"),
    ({"sync": "full", "bitmap": "b", "bitmap-mode": "never"},
     "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode 'full'"),
    ({"sync": "top", "bitmap": "b", "bitmap-mode": "never"},
     "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode 'top'"),
    ({"sync": "none", "bitmap": "b", "bitmap-mode": "never"},
     "sync mode 'none' does not produce meaningful bitmap outputs"),
    ({"sync": "none", "bitmap": "b", "bitmap-mode": "on-success"},
     "sync mode 'none' does not produce meaningful bitmap outputs"),
    ({"sync": "bitmap", "bitmap": "nosuch", "bitmap-mode": "never"}, "Bitmap 'nosuch' could not be found"),
    ({"sync": "full", "target": "src"}, "Source and target cannot be the same"),
    ({"sync": "full", "target": "small"}, "Source and target image have different sizes"),
    ({"sync": "full", "target": "nosuch"}, "Cannot find device='nosuch' nor node-name='nosuch'"),
    ({"sync": "full", "device": "nosuch"}, "Cannot find device='nosuch' nor node-name='nosuch'"),
    ({"sync": "full", "job-id": "bad id!"}, "Invalid job ID 'bad id!'"),
    ({"sync": "full", "job-id": None}, "Invalid job ID ''"),
    ({"sync": "full", "x-perf": {"max-workers": 0}}, "max-workers must be between 1 and 2147483647"),
    ({"sync": "full", "x-perf": {"max-workers": -1}}, "max-workers must be between 1 and 2147483647"),
    ({"sync": "full", "x-perf": {"max-chunk": -1}}, "max-chunk must be zero (which means no limit) or positive"),
    ({"sync": "full", "x-perf": {"max-chunk": 1000}},
     "Required max-chunk (1000) is less than backup cluster size (65536)"),
    ({"sync": "full", "x-perf": {"min-cluster-size": 1000}},
     "Could not create node: Cannot create block-copy-state: min-cluster-size needs to be a power of 2"),
    ({"sync": "full", "compress": True, "target": "traw"}, "Compression is not supported for this drive "),
    ({"sync": "full", "filter-node-name": "bad name"}, "Could not create node: Invalid node-name: 'bad name'"),
    ({"sync": "full", "filter-node-name": "src"}, "Could not create node: Duplicate nodes with node-name='src'"),
]


@pytest.mark.parametrize("args,desc", REFUSALS, ids=[d for _, d in REFUSALS])
def test_refusal_has_qemus_class_and_text_and_changes_nothing(env, args, desc):
    a = {"job-id": "j", "device": "src", "target": "tgt"}
    a.update(args)
    a = {k: v for k, v in a.items() if v is not None}
    before = env.bitmaps("src")
    err = env.err("blockdev-backup", a)
    assert err == {"class": "GenericError", "desc": desc}
    assert env.ok("query-jobs") == []
    assert env.bitmaps("src") == before


def test_negative_speed_is_refused_after_the_job_was_created(env):
    err = env.err("blockdev-backup", {"job-id": "j", "device": "src", "target": "tgt",
                                      "sync": "full", "speed": -1})
    assert err == {"class": "GenericError", "desc": "Parameter 'speed' expects a non-negative value"}
    evs = [(e["event"], e["data"]) for e in env.get_events(wait=0.3)]
    assert evs == [("JOB_STATUS_CHANGE", {"status": "created", "id": "j"}),
                   ("JOB_STATUS_CHANGE", {"status": "null", "id": "j"})]
    assert env.ok("query-jobs") == []


@iotests.qsd_crashes
def test_huge_min_cluster_size_is_refused(env):
    err = env.err("blockdev-backup", {"job-id": "j", "device": "src", "target": "tgt",
                                      "sync": "full", "x-perf": {"min-cluster-size": 1 << 40}})
    assert err["class"] == "GenericError"
    assert env.ok("query-jobs") == []


def test_busy_target_duplicate_id_and_busy_bitmap_are_refused(env):
    data_nbd.node_io(env, "src", "write -P 0x33 0 3M")
    assert backup(env, "j", "src", "tgt", "bitmap", bitmap="b", bitmap_mode="never", speed=1) == {"return": {}}
    err = env.err("blockdev-backup", {"job-id": "j2", "device": "src", "target": "tgt", "sync": "full"})
    assert err == {"class": "GenericError",
                   "desc": "Node 'tgt' is busy: block device is in use by block job: backup"}
    err = env.err("blockdev-backup", {"job-id": "j", "device": "src", "target": "traw", "sync": "full"})
    assert err == {"class": "GenericError", "desc": "Job ID 'j' already in use"}
    err = env.err("blockdev-backup", {"job-id": "j2", "device": "src", "target": "traw",
                                      "sync": "incremental", "bitmap": "b"})
    assert err == {"class": "GenericError",
                   "desc": "Bitmap 'b' is currently in use by another operation and cannot be used"}
    busy = env.bitmap("src", "b")
    assert busy["busy"] is True and busy["recording"] is True
    env.ok("job-cancel", id="j")
    job_events(env, "j")
    assert env.bitmap("src", "b")["busy"] is False


def test_full_backup_events_progress_and_data(env, tmp_path):
    assert backup(env, "j", "src", "tgt", "full") == {"return": {}}
    evs = job_events(env, "j")
    assert statuses(evs) == ["created", "running", "paused", "running", "waiting", "pending",
                             "BLOCK_JOB_COMPLETED", "concluded", "null"]
    done = evs[6][1]
    assert done == {"device": "j", "len": SIZE, "offset": SIZE, "speed": 0, "type": "backup"}
    close(env, "tgt", "src")
    compare(tmp_path / "tgt.qcow2", tmp_path / "src.qcow2", "qcow2", "qcow2")


@pytest.mark.parametrize("perf", [{"use-copy-range": True}, {"use-copy-range": False, "max-workers": 1},
                                  {"max-workers": 200, "max-chunk": 65536}])
@pytest.mark.parametrize("target", ["tgt", "traw"])
def test_x_perf_settings_copy_the_same_data(env, tmp_path, perf, target):
    """Copy offloading on and off, one worker, many workers with cluster-sized requests: the
    same backup, into a qcow2 and a raw target."""
    assert backup(env, "j", "src", target, "full", x_perf=perf) == {"return": {}}
    evs = job_events(env, "j")
    done = [data for ev, data in evs if ev == "BLOCK_JOB_COMPLETED"]
    assert done == [{"device": "j", "len": SIZE, "offset": SIZE, "speed": 0, "type": "backup"}]
    close(env, target, "src")
    path, fmt = (tmp_path / "tgt.qcow2", "qcow2") if target == "tgt" else (tmp_path / "tgt.raw", "raw")
    compare(path, tmp_path / "src.qcow2", fmt, "qcow2")


def test_manual_finalize_and_dismiss(env, tmp_path):
    assert backup(env, "j", "src", "traw", "full", auto_finalize=False, auto_dismiss=False) == {"return": {}}
    evs = job_events(env, "j", until="pending")
    assert statuses(evs)[-2:] == ["waiting", "pending"]
    # BLOCK_JOB_PENDING follows the status change (only without auto-finalize).
    evs = [("BLOCK_JOB_PENDING", e["data"]) for e in env.get_events(wait=0.5)
           if e["event"] == "BLOCK_JOB_PENDING"]
    assert evs == [("BLOCK_JOB_PENDING", {"type": "backup", "id": "j"})]
    err = env.err("job-dismiss", id="j")
    assert err["desc"] == "Job 'j' in state 'pending' cannot accept command verb 'dismiss'"
    env.ok("job-finalize", id="j")
    evs = job_events(env, "j", until="concluded")
    assert statuses(evs) == ["BLOCK_JOB_COMPLETED", "concluded"]
    [info] = env.ok("query-jobs")
    assert info == {"id": "j", "type": "backup", "status": "concluded",
                    "current-progress": SIZE, "total-progress": SIZE}
    env.ok("job-dismiss", id="j")
    assert statuses(job_events(env, "j")) == ["null"]
    close(env, "traw", "src")
    compare(tmp_path / "tgt.raw", tmp_path / "src.qcow2", "raw", "qcow2")


def test_pause_resume_cancel_sequence_and_bitmap_kept(env):
    data_nbd.node_io(env, "src", "write -P 0x33 1M 3M")
    before = count(env, "src", "b")
    assert before == 3 * MiB
    assert backup(env, "j", "src", "tgt", "incremental", bitmap="b", speed=1) == {"return": {}}
    err = env.err("job-finalize", id="j")
    assert err["desc"] == "Job 'j' in state 'running' cannot accept command verb 'finalize'"
    env.ok("job-pause", id="j")
    wait_status(env, "j", "paused")
    assert block_job(env, "j")["paused"] is True
    assert env.err("job-pause", id="j")["desc"] == "Job is already paused"
    env.ok("job-resume", id="j")
    wait_status(env, "j", "running")
    assert env.err("job-resume", id="j")["desc"] == "Can't resume a job that was not paused"
    env.ok("job-cancel", id="j")
    seq = statuses(job_events(env, "j"))
    assert seq == ["created", "running", "paused", "running", "paused", "running",
                   "aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]
    b = env.bitmap("src", "b")
    assert b["busy"] is False and b["count"] == before
    assert len([x for x in env.bitmaps("src") if "name" not in x]) == 0


def test_cancel_keeps_writes_made_during_the_job_in_the_bitmap(env):
    # Writers write through an export made before the job (QEMU puts its filter under it).
    uri = nbd(env, "src", "w", writable=True)
    finish_writer(writer(uri, [(0x33, 0, 2 * MiB)]))
    assert backup(env, "j", "src", "tgt", "incremental", bitmap="b", speed=1) == {"return": {}}
    finish_writer(writer(uri, [(0x44, 3 * MiB, 64 * 1024)]))
    # While the job runs the original is frozen and the nameless successor records.
    assert count(env, "src", "b") == 2 * MiB
    succ = [x for x in env.bitmaps("src") if "name" not in x]
    assert 64 * 1024 in [s["count"] for s in succ]
    env.ok("job-cancel", id="j")
    job_events(env, "j")
    assert count(env, "src", "b") == 2 * MiB + 64 * 1024


def test_unknown_job_for_verbs(env):
    assert env.err("job-cancel", id="nosuch") == {"class": "GenericError", "desc": "Job not found"}
    assert env.err("block-job-cancel", device="nosuch") == {
        "class": "DeviceNotActive", "desc": "Block job 'nosuch' not found"}


def test_query_block_jobs_while_running(env):
    assert backup(env, "j", "src", "tgt", "full", speed=1, auto_dismiss=False) == {"return": {}}
    import time
    for _ in range(100):
        info = block_job(env, "j")
        if info["offset"] > 0:
            break
        time.sleep(0.05)
    time.sleep(0.2)
    info = block_job(env, "j")
    # Sleeping for the speed limit after the first chunk: not busy.
    assert info["busy"] is False and info["offset"] == MiB
    assert {k: info[k] for k in ("type", "device", "len", "speed", "io-status", "ready",
                                 "status", "auto-finalize", "auto-dismiss", "paused")} == {
        "type": "backup", "device": "j", "len": SIZE, "speed": 1, "io-status": "ok",
        "ready": False, "status": "running", "auto-finalize": True, "auto-dismiss": False,
        "paused": False}
    env.ok("block-job-set-speed", device="j", speed=0)
    wait_status(env, "j", "concluded")
    [info] = env.ok("query-jobs")
    assert info["current-progress"] == SIZE and "error" not in info
    env.ok("job-dismiss", id="j")


def test_cancelled_concluded_job_reports_operation_canceled(env):
    assert backup(env, "j", "src", "tgt", "full", speed=1, auto_dismiss=False) == {"return": {}}
    env.ok("job-cancel", id="j")
    wait_status(env, "j", "concluded")
    [info] = env.ok("query-jobs")
    assert info["error"] == "Operation canceled"
    env.ok("job-dismiss", id="j")


def slow_incremental_backup_with_writes(make_daemon, tmp_path):
    """A daemon running a slow incremental backup of src (bitmap b, 2 MiB written before) to
    tgt, with 64 KiB written through an NBD export since it started; returns (daemon, src)."""
    src = qcow2(tmp_path / "src.qcow2", SIZE)
    iotests.qemu_img("bitmap", "--add", str(src), "b")
    qcow2(tmp_path / "tgt.qcow2", SIZE)
    d = make_daemon()
    add_qcow2(d, "src", src)
    add_qcow2(d, "tgt", tmp_path / "tgt.qcow2")
    uri = nbd(d, "src", "w", writable=True)
    finish_writer(writer(uri, [(0x11, 0, 2 * MiB)]))
    assert backup(d, "j", "src", "tgt", "incremental", bitmap="b", speed=1)["return"] == {}
    finish_writer(writer(uri, [(0x12, 3 * MiB, 64 * 1024)]))
    return d, src


@iotests.blockd_only
def test_checkpoint_during_a_backup_stores_the_successors_writes(make_daemon, tmp_path, monkeypatch):
    """blockd stores persistent bitmaps while running (checkpoints): during a backup the stored
    bitmap is the frozen one plus its successor, so a crash loses no write."""
    monkeypatch.setenv("BLOCKD_BITMAP_CHECKPOINT_SECS", "1")
    d, src = slow_incremental_backup_with_writes(make_daemon, tmp_path)
    import time
    time.sleep(2.5)
    d.kill()
    info = iotests.qemu_img("info", "--output=json", str(src))
    assert '"in-use"' not in info, info
    d2 = make_daemon()
    add_qcow2(d2, "src", src)
    assert count(d2, "src", "b") == 2 * MiB + 64 * 1024


def test_nodes_of_a_running_backup_cannot_be_deleted_or_reused(env):
    assert backup(env, "j", "src", "tgt", "full", speed=1) == {"return": {}}
    assert env.err("blockdev-del", node_name="src") == {
        "class": "GenericError", "desc": "Block device src is in use"}
    assert env.err("blockdev-del", node_name="tgt") == {
        "class": "GenericError",
        "desc": "Node 'tgt' is busy: block device is in use by block job: backup"}
    err = env.err("blockdev-backup", {"job-id": "j2", "device": "tgt", "target": "traw", "sync": "full"})
    assert err == {"class": "GenericError",
                   "desc": "Node 'tgt' is busy: block device is in use by block job: backup"}
    err = env.err("blockdev-backup", {"job-id": "j3", "device": "traw", "target": "src", "sync": "full"})
    assert err["desc"].startswith("Could not create node: Permission conflict on node 'src': ")
    env.ok("job-cancel", id="j")
    job_events(env, "j")
    env.ok("blockdev-del", node_name="tgt")


def test_quit_during_a_backup_keeps_every_dirty_bit_on_disk(make_daemon, tmp_path):
    d, src = slow_incremental_backup_with_writes(make_daemon, tmp_path)
    d.cmd("quit")
    assert d.wait_exit() == 0
    info = iotests.qemu_img("info", "--output=json", str(src))
    assert '"in-use"' not in info, info
    d2 = make_daemon()
    add_qcow2(d2, "src", src)
    assert count(d2, "src", "b") == 2 * MiB + 64 * 1024


@pytest.mark.parametrize("name", ["cbw0", None])
def test_filter_node_shows_while_the_job_runs(env, name):
    extra = {"filter_node_name": name} if name else {}
    before = {n["node-name"] for n in env.nodes()}
    assert backup(env, "j", "src", "tgt", "full", speed=1, **extra) == {"return": {}}
    new = [n for n in env.nodes() if n["node-name"] not in before]
    assert [n["drv"] for n in new] == ["copy-before-write"]
    if name:
        assert new[0]["node-name"] == name
        err = env.err("blockdev-add", {"driver": "null-co", "node-name": name})
        assert err == {"class": "GenericError", "desc": f"Duplicate nodes with node-name='{name}'"}
    else:
        assert new[0]["node-name"].startswith("#block")
    env.ok("job-cancel", id="j")
    job_events(env, "j")
    assert {n["node-name"] for n in env.nodes()} == before


def test_a_running_backup_holds_its_nodes_through_its_filter(env, tmp_path):
    """The job's copy-before-write filter takes over the source's parents and lets nobody
    else write the source; the job blocks its filter and target; QSD's texts. When the job
    ends the filter is gone and the exports it took are back on the source."""
    assert backup(env, "j", "src", "tgt", "full", speed=1, filter_node_name="bf") == {"return": {}}
    err = env.err("blockdev-backup", {"job-id": "j3", "device": "traw", "target": "src", "sync": "full",
                                      "filter-node-name": "bf3"})
    assert err["desc"] == (
        "Could not create node: Permission conflict on node 'src': permissions 'write' are both "
        "required by node 'bf3' (uses node 'src' as 'target' child) and unshared by node 'bf' "
        "(uses node 'src' as 'file' child).")
    err = env.err("blockdev-backup", {"job-id": "j4", "device": "traw", "target": "bf", "sync": "full"})
    assert err["desc"] == "Node 'bf' is busy: block device is in use by block job: backup"
    sock = data_nbd.start_unix_server(env, "bk")
    err = env.err("block-export-add", {"type": "nbd", "id": "w", "node-name": "src", "writable": True})
    assert err["desc"] == (
        "Permission conflict on node 'src': permissions 'write' are both required by an unnamed "
        "block device (uses node 'src' as 'root' child) and unshared by node 'bf' (uses node 'src' "
        "as 'file' child).")
    data_nbd.export(env, "src", "r", "r")
    data_nbd.export(env, "bf", "wf", "wf", writable=True)
    assert sorted((e["id"], e["node-name"]) for e in env.ok("query-block-exports")) == [
        ("r", "src"), ("wf", "bf")]
    assert env.err("blockdev-del", node_name="bf")["desc"] == "Node bf is in use"
    assert env.err("blockdev-del", node_name="tgt")["desc"] == \
        "Node 'tgt' is busy: block device is in use by block job: backup"
    # writes through the filter land on the source; the backup keeps the point in time
    finish_writer(writer(data_nbd.uri(sock, "wf"), [(0x5a, 0, 64 * 1024)]))
    out = data_nbd.qemu_io_uri(data_nbd.uri(sock, "r"), "read -P 0x5a 0 64k", read_only=True)
    assert out.returncode == 0 and "Pattern verification failed" not in out.stdout, out.stdout
    env.ok("job-cancel", id="j")
    job_events(env, "j")
    nodes = [n["node-name"] for n in env.ok("query-named-block-nodes", flat=True)]
    assert "bf" not in nodes
    assert sorted((e["id"], e["node-name"]) for e in env.ok("query-block-exports")) == [
        ("r", "src"), ("wf", "src")]
    # with the filter gone, the source may be written by others again
    data_nbd.export(env, "src", "w2", "w2", writable=True)
    for eid in ("r", "wf", "w2"):
        data_nbd.unexport(env, eid)


def test_writers_keep_going_while_a_transaction_inserts_and_a_job_removes_filters(make_daemon, tmp_path):
    """A writer through an export of the source runs while a transaction starts a backup (its
    filter inserted above the exported source with every source held off) and while the job
    ends (the filter removed): nothing hangs, every write lands in order, and the target is
    the source at the transaction's instant in the half the writer never touches."""
    src = qcow2(tmp_path / "src.qcow2", SIZE)
    fill(src, "write -P 0x11 0 4M")
    qcow2(tmp_path / "tgt.qcow2", SIZE)
    expect = tmp_path / "expect.raw"
    iotests.qemu_img("convert", "-f", "qcow2", "-O", "raw", str(src), str(expect))
    writes = [(0x20 + i % 0x50, 2 * MiB + (i % 32) * 65536, 65536) for i in range(400)]
    fill(expect, *[f"write -P {p:#x} {o} {n}" for p, o, n in writes], fmt="raw")
    d = make_daemon()
    add_qcow2(d, "src", src)
    add_qcow2(d, "tgt", tmp_path / "tgt.qcow2")
    uri = nbd(d, "src", "guest", writable=True)
    w = writer(uri, writes)
    d.ok("transaction", actions=[
        {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b"}},
        {"type": "blockdev-backup", "data": {"job-id": "j", "device": "src", "target": "tgt",
                                             "sync": "full", "filter-node-name": "bf"}}])
    job_events(d, "j")
    finish_writer(w)
    assert d.ok("query-block-exports")[0]["node-name"] == "src"
    data_nbd.unexport(d, "guest")
    close(d, "src", "tgt")
    compare(src, expect)
    head = tmp_path / "head.raw"
    iotests.qemu_img("convert", "-f", "qcow2", "-O", "raw", str(tmp_path / "tgt.qcow2"), str(head))
    with open(head, "rb") as f:
        assert f.read(2 * MiB) == b"\x11" * (2 * MiB)



def test_an_aborted_transaction_takes_the_filter_out_again(env):
    """The backup action's filter is inserted at prepare (QEMU creates the job there): when a
    later action fails, the abort takes it out and the source's export is back on the source,
    with nothing left behind (no job, no filter node, the target free)."""
    sock = data_nbd.start_unix_server(env, "bk")
    data_nbd.export(env, "src", "guest", "guest", writable=True)
    err = env.err("transaction", actions=[
        {"type": "blockdev-backup", "data": {"job-id": "j", "device": "src", "target": "tgt",
                                             "sync": "full", "filter-node-name": "bf"}},
        {"type": "abort", "data": {}}])
    assert err["desc"] == "Transaction aborted using Abort action"
    assert [(e["id"], e["node-name"]) for e in env.ok("query-block-exports")] == [("guest", "src")]
    assert "bf" not in [n["node-name"] for n in env.ok("query-named-block-nodes", flat=True)]
    assert env.ok("query-jobs") == []
    finish_writer(writer(data_nbd.uri(sock, "guest"), [(0x3c, 0, 64 * 1024)]))
    data_nbd.unexport(env, "guest")
    env.ok("blockdev-del", node_name="tgt")


def test_a_read_only_source_can_be_backed_up(make_daemon, tmp_path):
    src = qcow2(tmp_path / "src.qcow2", SIZE)
    fill(src, "write -P 0x11 0 1M")
    qcow2(tmp_path / "tgt.qcow2", SIZE)
    d = make_daemon()
    add_qcow2(d, "src", src, read_only=True)
    add_qcow2(d, "tgt", tmp_path / "tgt.qcow2")
    nbd(d, "src", "ro")
    assert backup(d, "j", "src", "tgt", "full", filter_node_name="bf") == {"return": {}}
    job_events(d, "j")
    assert [(e["id"], e["node-name"]) for e in d.ok("query-block-exports")] == [("ro", "src")]
    data_nbd.unexport(d, "ro")
    close(d, "src", "tgt")
    compare(tmp_path / "tgt.qcow2", src, "qcow2", "qcow2")

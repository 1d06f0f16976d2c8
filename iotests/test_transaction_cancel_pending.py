"""Cancelling one pending member (auto-finalize off) of a grouped transaction aborts the whole
group, as QEMU's job transaction does: every member ends cancelled, nothing is committed (each
incremental's bitmap keeps its dirty clusters), and the events come in QEMU's order.

Observed on qemu-storage-daemon 10.0.2; the same test runs on blockd.
"""

from __future__ import annotations

from iotests import create_image
from txn_helpers import act, job_log, of_job

MiB = 1 << 20
NAMES = ["a", "b", "c"]


def pending_group(make_daemon, tmp_path, auto=()):
    args = []
    for n in NAMES:
        src = create_image(tmp_path / f"{n}.qcow2", 4 * MiB, "qcow2")
        dst = create_image(tmp_path / f"{n}-t.qcow2", 4 * MiB, "qcow2")
        args += ["--blockdev", f"file,node-name={n}-f,filename={src}",
                 "--blockdev", f"qcow2,node-name={n},file={n}-f",
                 "--blockdev", f"file,node-name={n}-tf,filename={dst}",
                 "--blockdev", f"qcow2,node-name={n}-t,file={n}-tf"]
    d = make_daemon(*args)
    for n in NAMES:
        d.ok("block-dirty-bitmap-add", node=n, name="b0")
        d.node_io(n, "write -P 0x5a 0 1M")
    d.ok("transaction", actions=[
        act("blockdev-backup", job_id=f"j{n}", device=n, target=f"{n}-t", sync="incremental",
            bitmap="b0", auto_finalize=n in auto)
        for n in NAMES
    ], properties={"completion-mode": "grouped"})
    for n in NAMES:
        if n not in auto:
            d.event_wait("BLOCK_JOB_PENDING")
    assert {j["id"]: j["status"] for j in d.ok("query-jobs")} == {f"j{n}": "pending" for n in NAMES}
    return d


def assert_whole_group_cancelled(d):
    """Every member ended cancelled, nothing committed: each bitmap keeps its clusters."""
    log = job_log(d, {f"j{n}" for n in NAMES})
    for n in NAMES:
        assert of_job(log, f"j{n}")[-3:] == ["BLOCK_JOB_CANCELLED", "concluded", "null"], log
        b = d.bitmap(n, "b0")
        assert (b["count"], b["recording"], b["busy"]) == (MiB, True, False)
    assert d.ok("query-jobs") == []


def test_cancelling_one_pending_member_cancels_the_whole_group(make_daemon, tmp_path):
    d = pending_group(make_daemon, tmp_path)

    d.ok("job-cancel", id="jb")

    assert_whole_group_cancelled(d)


def test_cancelling_a_pending_member_ends_the_group_in_qemus_order(make_daemon, tmp_path):
    d = pending_group(make_daemon, tmp_path)
    d.get_events(wait=0.1)

    d.ok("job-cancel", id="jb")

    log = job_log(d, {f"j{n}" for n in NAMES})
    seq = [(j, detail if ev == "JOB_STATUS_CHANGE" else ev) for ev, j, detail in log]
    # Newest first, each member all the way to null before the next (the cancelled member
    # is not singled out).
    assert seq == [(j, x) for j in ("jc", "jb", "ja")
                   for x in ("aborting", "BLOCK_JOB_CANCELLED", "concluded", "null")]


def test_a_member_with_auto_finalize_waits_for_the_group_and_is_cancelled_with_it(
        make_daemon, tmp_path):
    # While any member needs a manual job-finalize, no member of the group finalizes on its
    # own: the auto-finalize member waits in pending too, so cancelling another member still
    # aborts it and its bitmap keeps its clusters.
    d = pending_group(make_daemon, tmp_path, auto=("a",))

    d.ok("job-cancel", id="jb")

    assert_whole_group_cancelled(d)

"""Backup error policies (`on-target-error`, `on-source-error`) with blkdebug fault injection:
for each policy the event sequence (BLOCK_JOB_ERROR, pause, io-status), the bitmap after a
failed or cancelled job still holding every dirty region, and a retry (or the resumed job)
producing a backup equal to the source. Needs the blkdebug driver (QSD has it; blockd gets it
from the blkdebug work).
"""

from __future__ import annotations

import time

import pytest

import data_nbd
from backup_helpers import (MiB, add_raw, backup, block_job, close, compare, count, fill,
                            job_events, raw, snapshot, statuses, wait_status)

SIZE = 4 * MiB


@pytest.fixture
def make_daemon(make_daemon):
    return data_nbd.ready_factory(make_daemon)


def blkdebug_raw(d, name, path, event, errno, once, iotype=None):
    rule = {"event": event, "errno": errno, "once": once}
    if iotype:
        rule["iotype"] = iotype
    d.blockdev_add(driver="raw", node_name=name, file={
        "driver": "blkdebug", "inject-error": [rule],
        "image": {"driver": "file", "filename": str(path)}})


@pytest.fixture
def setup(make_daemon, tmp_path):
    """Source `src` (raw, data in every MiB, bitmap `b` dirty over 3 MiB) and a factory for
    failing targets."""
    src = raw(tmp_path / "src.raw", SIZE)
    fill(src, "write -P 0x21 0 4M", fmt="raw")
    d = make_daemon()
    add_raw(d, "src", src)
    d.ok("block-dirty-bitmap-add", node="src", name="b")
    data_nbd.node_io(d, "src", "write -P 0x22 512k 3M")
    ref = snapshot(d, "src", tmp_path / "ref.raw")

    def target(name, errno=5, once=True, event="write_aio"):
        raw(tmp_path / f"{name}.raw", SIZE)
        blkdebug_raw(d, name, tmp_path / f"{name}.raw", event, errno, once)
        return tmp_path / f"{name}.raw"

    return d, ref, target


def stopped(d, job):
    """Events up to the job's pause after an error (past the start's pause blip)."""
    evs = job_events(d, job, until="paused")
    assert statuses(evs)[:3] == ["created", "running", "paused"], evs
    return evs + job_events(d, job, until="paused")


def error_events(evs):
    return [data for ev, data in evs if ev == "BLOCK_JOB_ERROR"]


def test_report_fails_the_job_and_keeps_the_bitmap_then_a_retry_succeeds(setup, tmp_path):
    d, ref, target = setup
    target("bad", once=False)
    before = count(d, "src", "b")
    assert backup(d, "j", "src", "bad", "incremental", bitmap="b")["return"] == {}
    evs = job_events(d, "j")
    assert error_events(evs) == [{"device": "j", "operation": "write", "action": "report"}]
    seq = statuses(evs)
    assert seq[-5:] == ["BLOCK_JOB_ERROR", "aborting", "BLOCK_JOB_COMPLETED", "concluded", "null"]
    done = [data for ev, data in evs if ev == "BLOCK_JOB_COMPLETED"][0]
    assert done["error"] == "Input/output error"
    assert count(d, "src", "b") == before
    # A retry into a good target (full chain: the previous full is all zeros here) works.
    good = raw(tmp_path / "good.raw", SIZE)
    fill(good, "write -P 0x21 0 4M", fmt="raw")
    add_raw(d, "good", good)
    assert backup(d, "j2", "src", "good", "incremental", bitmap="b")["return"] == {}
    assert "BLOCK_JOB_COMPLETED" in statuses(job_events(d, "j2"))
    assert count(d, "src", "b") == 0
    close(d, "good")
    compare(good, ref, "raw")


@pytest.mark.parametrize("policy,errno", [("stop", 5), ("enospc", 28), ("auto", 28)])
def test_stop_pauses_with_io_status_until_resumed(setup, tmp_path, policy, errno):
    d, ref, target = setup
    tgt = target("t", errno=errno)
    assert backup(d, "j", "src", "t", "full", on_target_error=policy)["return"] == {}
    evs = stopped(d, "j")
    assert error_events(evs) == [{"device": "j", "operation": "write", "action": "stop"}]
    info = block_job(d, "j")
    assert info["paused"] is True and info["status"] == "paused"
    assert info["io-status"] == ("nospace" if errno == 28 else "failed")
    d.ok("job-resume", id="j")
    evs = job_events(d, "j")
    assert statuses(evs)[0] == "running" and "BLOCK_JOB_COMPLETED" in statuses(evs)
    assert all("error" not in data for ev, data in evs if ev == "BLOCK_JOB_COMPLETED")
    close(d, "t")
    compare(tgt, ref, "raw")


def test_enospc_policy_reports_other_errors(setup):
    d, _, target = setup
    target("t", errno=5)
    assert backup(d, "j", "src", "t", "full", on_target_error="enospc")["return"] == {}
    evs = job_events(d, "j")
    assert error_events(evs) == [{"device": "j", "operation": "write", "action": "report"}]


def test_stopped_job_can_be_cancelled_and_the_bitmap_keeps_everything(setup):
    d, _, target = setup
    target("t", once=False)
    before = count(d, "src", "b")
    assert backup(d, "j", "src", "t", "incremental", bitmap="b", on_target_error="stop")["return"] == {}
    stopped(d, "j")
    assert block_job(d, "j")["io-status"] == "failed"
    d.ok("job-cancel", id="j")
    seq = statuses(job_events(d, "j"))
    assert seq == ["running", "aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]
    assert count(d, "src", "b") == before


def test_ignore_retries_the_region_and_completes(setup):
    d, ref, target = setup
    tgt = target("t")
    assert backup(d, "j", "src", "t", "full", on_target_error="ignore")["return"] == {}
    evs = job_events(d, "j")
    assert error_events(evs)[0] == {"device": "j", "operation": "write", "action": "ignore"}
    assert [data.get("error") for ev, data in evs if ev == "BLOCK_JOB_COMPLETED"] == [None]
    close(d, "t")
    compare(tgt, ref, "raw")


def test_source_read_error_is_reported_as_a_read(make_daemon, tmp_path):
    src = raw(tmp_path / "src.raw", SIZE)
    fill(src, "write -P 0x21 0 4M", fmt="raw")
    raw(tmp_path / "t.raw", SIZE)
    d = make_daemon()
    blkdebug_raw(d, "src", src, "read_aio", 5, False)
    add_raw(d, "t", tmp_path / "t.raw")
    assert backup(d, "j", "src", "t", "full")["return"] == {}
    evs = job_events(d, "j")
    assert error_events(evs) == [{"device": "j", "operation": "read", "action": "report"}]
    assert [data.get("error") for ev, data in evs if ev == "BLOCK_JOB_COMPLETED"] == ["Input/output error"]


def test_always_mode_failure_leaves_exactly_the_uncopied_regions(setup):
    d, _, target = setup
    target("t", once=False)
    assert backup(d, "j", "src", "t", "bitmap", bitmap="b", bitmap_mode="always")["return"] == {}
    evs = job_events(d, "j")
    assert "BLOCK_JOB_ERROR" in statuses(evs)
    done = [data for ev, data in evs if ev == "BLOCK_JOB_COMPLETED"][0]
    # Nothing was written: every dirty region is still dirty.
    assert count(d, "src", "b") == done["len"] - done["offset"] == 3 * MiB


def test_ignore_moves_past_a_region_that_always_fails_and_retries_it_each_pass(make_daemon, tmp_path):
    """A write error at 1 MiB that never clears, `ignore`: the job copies everything else
    (QEMU's 1 MiB tasks: progress stops at exactly 3 of 4 MiB), retries the bad region on every
    pass with one BLOCK_JOB_ERROR each (QEMU retries as fast as it fails, no delay), never
    concludes on its own, and a cancel ends it."""
    src = raw(tmp_path / "src.raw", SIZE)
    fill(src, "write -P 0x21 0 4M", fmt="raw")
    d = make_daemon()
    add_raw(d, "src", src)
    raw(tmp_path / "t.raw", SIZE)
    rule = {"event": "write_aio", "errno": 5, "once": False, "sector": 2048}
    d.blockdev_add(driver="raw", node_name="t", file={
        "driver": "blkdebug", "inject-error": [rule],
        "image": {"driver": "file", "filename": str(tmp_path / "t.raw")}})
    assert backup(d, "j", "src", "t", "full", on_target_error="ignore")["return"] == {}
    # Both daemons fail hundreds of times a second on an idle machine; a loaded one is slower.
    deadline = time.monotonic() + 10
    evs: list = []
    progress = None
    while time.monotonic() < deadline:
        evs += d.get_events(wait=0.1)
        job = wait_status(d, "j", "running")
        progress = (job["current-progress"], job["total-progress"])
        if progress == (3 * MiB, 4 * MiB) and len([e for e in evs if e["event"] == "BLOCK_JOB_ERROR"]) >= 20:
            break
    errors = [e["data"] for e in evs if e["event"] == "BLOCK_JOB_ERROR"]
    assert len(errors) >= 20, len(errors)
    assert all(e == {"device": "j", "operation": "write", "action": "ignore"} for e in errors)
    assert "BLOCK_JOB_COMPLETED" not in [e["event"] for e in evs]
    assert progress == (3 * MiB, 4 * MiB)
    d.ok("job-cancel", id="j")
    seq = [s for s in statuses(job_events(d, "j")) if s != "BLOCK_JOB_ERROR"]
    assert seq[-4:] == ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]

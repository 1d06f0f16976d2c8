"""One `transaction` backs up several drives at one instant, even while a writer keeps
writing to all of them (issue 11).

Three qcow2 drives on tmpfs, each exported writable over NBD. One writer writes generation
g into a block of drive a, then b, then c, each write acknowledged before the next; so at
any instant the drives hold (g, g, g), (g, g-1, g-1) or (g, g, g-1) and nothing else. Slow
backup jobs (``speed``) copy while the writer goes on. A backup taken at one instant must
decode to one of those shapes; backups whose points in time lie apart (the writer having
written to a drive after another drive's point in time) show a later generation on b or c
than on a, which the second test provokes with plain commands to prove the check can fail.
"""

from __future__ import annotations

import pytest

import data_nbd
from backup_helpers import add_raw, close, raw
from txn_helpers import (SIZE, SLOTS, GenWriter, act, add_drives, generation, job_log, one_instant,
                         tmpfs_dir)

DRIVES = ["a", "b", "c"]
#: Bytes per second per job: a full copy of one drive takes about 2 s.
SPEED = 2 * 1024 * 1024
#: Bitmap actions between two backup actions of one transaction: wide enough that a daemon
#: letting writes through between two backup actions is caught (a blockd changed to hold each
#: source off only during its own action failed this test in all 9 runs at 1,000 and 1,500,
#: in 1 of 3 at 500). 3,000 actions stay under blockd's 65,536-token message bound.
GAP = 1500


@pytest.fixture
def make_daemon(make_daemon):
    return data_nbd.ready_factory(make_daemon)


@pytest.fixture
def shm():
    yield from tmpfs_dir()


@pytest.fixture
def setup(make_daemon, shm):
    """Daemon with drives a, b, c (exported), raw targets <n>-t, and a running writer that
    has covered every slot at least once."""
    d = make_daemon()
    exports = add_drives(d, shm, DRIVES, pattern=None)
    for n in DRIVES:
        add_raw(d, f"{n}-t", raw(shm / f"{n}-t.raw", SIZE))
    w = GenWriter(d, [exports[n] for n in DRIVES]).start()
    w.wait_for(SLOTS + 4)
    yield d, w
    if w._thread.is_alive():  # pylint: disable=protected-access
        w.stop()


def finish(d, w, shm, jobs):
    """Waits for the jobs, stops the writer; returns (generations of the backups, the job
    events, the writer's last generation)."""
    log = job_log(d, set(jobs))
    last = w.stop()
    close(d, *[f"{n}-t" for n in DRIVES])
    gens = [generation(shm / f"{n}-t.raw", i) for i, n in enumerate(DRIVES)]
    return gens, log, last


def completed_ok(log, jobs):
    done = {j: err for ev, j, err in log if ev == "BLOCK_JOB_COMPLETED"}
    assert done == {j: None for j in jobs}, log


def test_one_transaction_backs_up_every_drive_at_one_instant(setup, shm):
    """Between two backup actions, GAP bitmap actions on another node: a daemon that took
    each drive's point in time at its own action and let writes through in between gives
    the writer time for several generations there, and the check sees it."""
    d, w = setup
    d.ok("blockdev-add", driver="null-co", node_name="scratch", size=SIZE)
    actions = []
    for i, n in enumerate(DRIVES):
        if i:
            actions += [act("block-dirty-bitmap-add", node="scratch", name=f"g{i}-{k}")
                        for k in range(GAP)]
        actions.append(act("blockdev-backup", job_id=f"j{n}", device=n, target=f"{n}-t", sync="full",
                           speed=SPEED))
    before = w.done
    d.ok("transaction", actions=actions)
    replied = w.done
    jobs = [f"j{n}" for n in DRIVES]
    gens, log, last = finish(d, w, shm, jobs)
    completed_ok(log, jobs)
    # The writer went on while the jobs copied: the point in time had to be kept.
    assert last - replied >= 20, (replied, last)
    assert before <= gens[0] <= replied + 1, (before, gens, replied)
    assert one_instant(gens), f"torn backup: generations {gens} (writer at {before}..{replied})"


def test_drive_backup_actions_are_at_one_instant_too(setup, shm):
    d, w = setup
    for n in DRIVES:
        d.ok("blockdev-del", node_name=f"{n}-t")
    before = w.done
    d.ok("transaction", actions=[
        act("drive-backup", job_id=f"j{n}", device=n, target=str(shm / f"{n}-t.raw"), format="raw",
            mode="existing", sync="full", speed=SPEED)
        for n in DRIVES
    ])
    replied = w.done
    jobs = [f"j{n}" for n in DRIVES]
    log = job_log(d, set(jobs))
    last = w.stop()
    completed_ok(log, jobs)
    gens = [generation(shm / f"{n}-t.raw", i) for i, n in enumerate(DRIVES)]
    assert last - replied >= 20, (replied, last)
    assert before <= gens[0] <= replied + 1, (before, gens, replied)
    assert one_instant(gens), f"torn backup: generations {gens} (writer at {before}..{replied})"


def test_backups_started_one_after_another_are_torn_and_the_check_sees_it(setup, shm):
    """The same jobs started by three plain commands, with the writer writing every drive a
    few times between one start and the next: each backup's point in time is its own start,
    so b and c hold later generations than a."""
    d, w = setup
    starts = []
    for n in DRIVES:
        pre = w.done
        d.ok("blockdev-backup", job_id=f"j{n}", device=n, target=f"{n}-t", sync="full", speed=SPEED)
        starts.append((pre, w.done))
        w.wait_for(w.done + 5)
    jobs = [f"j{n}" for n in DRIVES]
    gens, log, _ = finish(d, w, shm, jobs)
    completed_ok(log, jobs)
    # Each backup holds the generation of its own start (give or take the write in flight).
    for g, (pre, post) in zip(gens, starts):
        assert pre <= g <= post + 1, (gens, starts)
    assert gens[1] > gens[0] and gens[2] > gens[1], gens
    assert not one_instant(gens)

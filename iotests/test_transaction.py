"""`transaction` with dirty-bitmap actions: all or nothing, in list order.

Texts and outcomes observed on qemu-storage-daemon 10.0.2 (see
shared/reference/transactions.md). Job and snapshot actions are tested with the
backup tests.
"""

from __future__ import annotations

import pytest

import time

import backup_helpers
import iotests
from iotests import create_image, is_qsd, qemu_img

MiB = 1 << 20
SIZE = 8 * MiB


@pytest.fixture
def disk(daemon, tmp_path):
    """Daemon with qcow2 node ``d0`` over file node ``f0`` (SIZE bytes)."""
    img = create_image(tmp_path / "d0.qcow2", SIZE, "qcow2")
    daemon.ok("blockdev-add", driver="file", node_name="f0", filename=str(img))
    daemon.ok("blockdev-add", driver="qcow2", node_name="d0", file="f0")
    daemon.image = img
    return daemon


def act(kind, **data):
    return {"type": kind, "data": {k.replace("_", "-"): v for k, v in data.items()}}


def names(d, node="d0"):
    return sorted(b.get("name", "") for b in d.bitmaps(node))


def write(d, spec):
    d.node_io("d0", f"write -P 0x11 {spec}")


def test_empty_action_list_succeeds_and_changes_nothing(disk):
    assert disk.ok("transaction", actions=[]) == {}
    assert names(disk) == []


def test_add_then_merge_then_disable_sees_earlier_actions(disk):
    disk.ok("block-dirty-bitmap-add", node="d0", name="b0")
    write(disk, "0 64k")
    disk.ok("transaction", actions=[
        act("block-dirty-bitmap-add", node="d0", name="t1"),
        act("block-dirty-bitmap-merge", node="d0", target="t1", bitmaps=["b0"]),
        act("block-dirty-bitmap-disable", node="d0", name="t1"),
    ])
    t1 = disk.bitmap("d0", "t1")
    assert t1["count"] == 65536 and t1["recording"] is False
    write(disk, "1M 64k")
    assert disk.bitmap("d0", "t1")["count"] == 65536
    assert disk.bitmap("d0", "b0")["count"] == 2 * 65536


def test_abort_undoes_every_bitmap_action_before_it(disk):
    disk.ok("block-dirty-bitmap-add", node="d0", name="keep")
    disk.ok("block-dirty-bitmap-add", node="d0", name="off")
    disk.ok("block-dirty-bitmap-add", node="d0", name="on", disabled=True)
    disk.ok("block-dirty-bitmap-add", node="d0", name="into", disabled=True)
    write(disk, "0 64k")
    before = {b["name"]: (b["count"], b["recording"], b["busy"]) for b in disk.bitmaps("d0")}
    sha = {n: disk.sha256("d0", n) for n in before}
    err = disk.err("transaction", actions=[
        act("block-dirty-bitmap-add", node="d0", name="new"),
        act("block-dirty-bitmap-clear", node="d0", name="keep"),
        act("block-dirty-bitmap-disable", node="d0", name="off"),
        act("block-dirty-bitmap-enable", node="d0", name="on"),
        act("block-dirty-bitmap-merge", node="d0", target="into", bitmaps=["keep"]),
        act("block-dirty-bitmap-remove", node="d0", name="keep"),
        act("abort"),
    ])
    assert err == {"class": "GenericError", "desc": "Transaction aborted using Abort action"}
    after = {b["name"]: (b["count"], b["recording"], b["busy"]) for b in disk.bitmaps("d0")}
    assert after == before
    assert {n: disk.sha256("d0", n) for n in before} == sha


def test_duplicate_add_fails_the_second_and_undoes_the_first(disk):
    err = disk.err("transaction", actions=[
        act("block-dirty-bitmap-add", node="d0", name="t1"),
        act("block-dirty-bitmap-add", node="d0", name="t1"),
    ])
    assert err["desc"] == "Bitmap already exists: t1"
    assert names(disk) == []


def test_action_on_a_bitmap_an_earlier_action_removes_is_refused(disk):
    disk.ok("block-dirty-bitmap-add", node="d0", name="b")
    err = disk.err("transaction", actions=[
        act("block-dirty-bitmap-remove", node="d0", name="b"),
        act("block-dirty-bitmap-clear", node="d0", name="b"),
    ])
    assert err["class"] == "GenericError"
    assert "currently in use by another operation" in err["desc"]
    b = disk.bitmap("d0", "b")
    assert b["busy"] is False


def test_remove_commits(disk):
    disk.ok("block-dirty-bitmap-add", node="d0", name="b")
    disk.ok("transaction", actions=[act("block-dirty-bitmap-remove", node="d0", name="b")])
    assert names(disk) == []


def test_persistent_remove_then_abort_keeps_the_bitmap_through_a_restart(disk, tmp_path, make_daemon):
    disk.ok("block-dirty-bitmap-add", node="d0", name="p", persistent=True)
    write(disk, "0 64k")
    disk.err("transaction", actions=[
        act("block-dirty-bitmap-remove", node="d0", name="p"),
        act("abort"),
    ])
    assert disk.bitmap("d0", "p")["count"] == 65536
    disk.shutdown()
    info = qemu_img("info", "--output=human", str(disk.image))
    assert "name: p" in info


def test_missing_node_is_the_plain_commands_error(disk):
    err = disk.err("transaction", actions=[act("block-dirty-bitmap-clear", node="nope", name="b")])
    assert err == {"class": "GenericError", "desc": "Node 'nope' not found"}
    err = disk.err("transaction", actions=[act("block-dirty-bitmap-add", node="nope", name="b")])
    assert err["desc"] == "Cannot find device='nope' nor node-name='nope'"


@pytest.mark.parametrize("kind,data", [
    ("block-dirty-bitmap-add", {"node": "d0", "name": "g"}),
    ("block-dirty-bitmap-clear", {"node": "d0", "name": "b"}),
    ("abort", {}),
])
def test_grouped_refuses_actions_that_start_no_job_and_changes_nothing(disk, kind, data):
    disk.ok("block-dirty-bitmap-add", node="d0", name="b")
    write(disk, "0 64k")
    err = disk.err("transaction", actions=[
        act("block-dirty-bitmap-add", node="d0", name="first"),
        act(kind, **data),
    ], properties={"completion-mode": "grouped"})
    assert err == {
        "class": "GenericError",
        "desc": "Action 'block-dirty-bitmap-add' does not support transaction property "
                "completion-mode = grouped",
    }
    assert names(disk) == ["b"]
    assert disk.bitmap("d0", "b")["count"] == 65536


@pytest.mark.parametrize("actions,fragment", [
    ([{"type": "no-such-action", "data": {}}], "type"),
    ([{"type": "abort"}], "data"),
    ([{"data": {}}], "type"),
])
def test_malformed_actions_are_refused_and_the_daemon_goes_on(disk, actions, fragment):
    err = disk.err("transaction", actions=actions)
    assert err["class"] == "GenericError"
    assert fragment in err["desc"]
    disk.ok("block-dirty-bitmap-add", node="d0", name="after")


def test_thousands_of_actions_fail_cleanly(disk):
    actions = [act("block-dirty-bitmap-add", node="d0", name=f"b{i}") for i in range(2000)]
    actions.append(act("abort"))
    err = disk.err("transaction", actions=actions)
    assert err["desc"] == "Transaction aborted using Abort action"
    assert names(disk) == []


def test_ten_thousand_actions_are_refused_cleanly(disk):
    actions = [act("block-dirty-bitmap-add", node="d0", name=f"b{i}") for i in range(10000)]
    actions.append(act("abort"))
    if is_qsd():
        # QSD parses and runs them all (about 12 s here) and fails at the abort.
        pytest.skip("QSD's answer is the abort's error after ~12 s; checked with 2,000 above")
    # blockd bounds one message at 65,536 JSON tokens: the command is refused before parsing
    # finishes, nothing is changed and the connection goes on.
    err = disk.err("transaction", actions=actions)
    assert err == {"class": "GenericError", "desc": "JSON token count limit exceeded"}
    assert names(disk) == []
    disk.ok("block-dirty-bitmap-add", node="d0", name="after")


# ------------------------------------------------------------ job and snapshot actions

def _drives(d, tmp_path, names, size=SIZE):
    """qcow2 nodes ``names`` over files, each with 0x11 at 0 and 0x22 at 1 MiB, plus a qcow2
    target ``<name>-t`` of the same size for each."""
    for n in names:
        img = create_image(tmp_path / f"{n}.qcow2", size, "qcow2")
        backup_helpers.fill(img, "write -P 0x11 0 64k", "write -P 0x22 1M 64k")
        backup_helpers.add_qcow2(d, n, img)
        tgt = create_image(tmp_path / f"{n}-t.qcow2", size, "qcow2")
        backup_helpers.add_qcow2(d, f"{n}-t", tgt)


def test_bitmap_add_and_full_backup_start_one_chain(daemon, tmp_path):
    _drives(daemon, tmp_path, ["a"])
    daemon.ok("transaction", actions=[
        act("block-dirty-bitmap-add", node="a", name="b0"),
        act("blockdev-backup", job_id="j", device="a", target="a-t", sync="full"),
    ])
    seq = backup_helpers.statuses(backup_helpers.job_events(daemon, "j"))
    assert "BLOCK_JOB_COMPLETED" in seq and seq[-1] == "null"
    assert daemon.bitmap("a", "b0")["count"] == 0
    backup_helpers.close(daemon, "a-t", "a")
    backup_helpers.compare(tmp_path / "a-t.qcow2", tmp_path / "a.qcow2", "qcow2", "qcow2")


def test_backup_then_abort_creates_no_job_and_sends_no_block_job_event(daemon, tmp_path):
    _drives(daemon, tmp_path, ["a"])
    daemon.ok("block-dirty-bitmap-add", node="a", name="b0")
    daemon.node_io("a", "write -P 0x33 2M 64k")
    err = daemon.err("transaction", actions=[
        act("blockdev-backup", job_id="j", device="a", target="a-t", sync="incremental",
            bitmap="b0"),
        act("abort"),
    ])
    assert err["desc"] == "Transaction aborted using Abort action"
    seq = backup_helpers.statuses(backup_helpers.job_events(daemon, "j"))
    assert seq == ["created", "aborting", "concluded", "null"]
    assert daemon.ok("query-jobs") == []
    b0 = daemon.bitmap("a", "b0")
    assert b0["count"] == 65536 and b0["busy"] is False
    assert [b.get("name") for b in daemon.bitmaps("a")] == ["b0"]


def _completed(d, jobs, timeout=30):
    """BLOCK_JOB_COMPLETED's error (None when it succeeded) of every job in ``jobs``, once
    all of them are gone."""
    done, gone = {}, set()
    deadline = time.monotonic() + timeout
    while gone != jobs and time.monotonic() < deadline:
        for ev in d.get_events(wait=0.2):
            data = ev.get("data", {})
            if ev["event"] == "BLOCK_JOB_COMPLETED" and data.get("device") in jobs:
                done[data["device"]] = data.get("error")
            if ev["event"] == "JOB_STATUS_CHANGE" and data.get("status") == "null":
                gone.add(data.get("id"))
    assert gone == jobs, f"jobs left: {jobs - gone}"
    return done


def test_incremental_backups_of_two_drives_grouped_complete_together(daemon, tmp_path):
    _drives(daemon, tmp_path, ["a", "b"])
    for n in ("a", "b"):
        daemon.ok("block-dirty-bitmap-add", node=n, name="b0")
        daemon.node_io(n, "write -P 0x44 3M 64k")
    daemon.ok("transaction", actions=[
        act("blockdev-backup", job_id="ja", device="a", target="a-t", sync="incremental",
            bitmap="b0"),
        act("blockdev-backup", job_id="jb", device="b", target="b-t", sync="incremental",
            bitmap="b0"),
    ], properties={"completion-mode": "grouped"})
    completed = _completed(daemon, {"ja", "jb"})
    assert completed == {"ja": None, "jb": None}
    for n in ("a", "b"):
        assert daemon.bitmap(n, "b0")["count"] == 0
    backup_helpers.close(daemon, "a-t", "b-t")
    for n in ("a", "b"):
        out = iotests.qemu_io("-f", "qcow2", "-c", "read -P 0x44 3M 64k",
                              str(tmp_path / f"{n}-t.qcow2"))
        assert "Pattern verification failed" not in out and "read 65536/65536" in out


def test_snapshot_sync_of_two_drives_at_once_and_abort_undoes_both(daemon, tmp_path):
    _drives(daemon, tmp_path, ["a", "b"])
    err = daemon.err("transaction", actions=[
        act("blockdev-snapshot-sync", node_name="a", snapshot_file=str(tmp_path / "a-o.qcow2"),
            snapshot_node_name="a-o", format="qcow2"),
        act("blockdev-snapshot-sync", node_name="b", snapshot_file=str(tmp_path / "b-o.qcow2"),
            snapshot_node_name="b-o", format="qcow2"),
        act("abort"),
    ])
    assert err["desc"] == "Transaction aborted using Abort action"
    names = {n["node-name"] for n in daemon.nodes()}
    assert "a-o" not in names and "b-o" not in names
    assert daemon.node("a")["ro"] is False
    # Without the abort both overlays go on top (kept: exported, so they have a user).
    for n in ("a", "b"):
        backup_helpers.nbd(daemon, n, f"e{n}", writable=True)
    daemon.ok("transaction", actions=[
        act("blockdev-snapshot-sync", node_name="a", snapshot_file=str(tmp_path / "a-o.qcow2"),
            snapshot_node_name="a-o", format="qcow2", mode="absolute-paths"),
        act("blockdev-snapshot-sync", node_name="b", snapshot_file=str(tmp_path / "b-o.qcow2"),
            snapshot_node_name="b-o", format="qcow2", mode="absolute-paths"),
    ])
    for n in ("a", "b"):
        info = daemon.node(f"{n}-o")
        assert info["backing_file"].endswith(f"{n}.qcow2")
        assert daemon.node(n)["ro"] is True


def test_job_finalize_on_one_member_finalizes_the_whole_group(daemon, tmp_path):
    _drives(daemon, tmp_path, ["a", "b"])
    daemon.ok("transaction", actions=[
        act("blockdev-backup", job_id="ja", device="a", target="a-t", sync="full",
            auto_finalize=False),
        act("blockdev-backup", job_id="jb", device="b", target="b-t", sync="full",
            auto_finalize=False),
    ], properties={"completion-mode": "grouped"})
    for j in ("ja", "jb"):
        backup_helpers.wait_status(daemon, j, "pending")
    daemon.ok("job-finalize", id="ja")
    assert _completed(daemon, {"ja", "jb"}) == {"ja": None, "jb": None}
    backup_helpers.close(daemon, "a-t", "b-t", "a", "b")
    for n in ("a", "b"):
        backup_helpers.compare(tmp_path / f"{n}-t.qcow2", tmp_path / f"{n}.qcow2", "qcow2", "qcow2")

"""`transaction` with dirty-bitmap actions: all or nothing, in list order.

Texts and outcomes observed on qemu-storage-daemon 10.0.2 (see
shared/reference/transactions.md). Job and snapshot actions are tested with the
backup tests.
"""

from __future__ import annotations

import pytest

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


def test_ten_thousand_actions_fail_cleanly(disk):
    # QSD needs ~12 s for 10,000 (it looks bitmaps up by a linear scan); 2,000 keeps its run
    # inside the QMP timeout while still checking the same outcome.
    n = 2000 if is_qsd() else 10000
    actions = [act("block-dirty-bitmap-add", node="d0", name=f"b{i}") for i in range(n)]
    actions.append(act("abort"))
    err = disk.err("transaction", actions=actions)
    assert err["desc"] == "Transaction aborted using Abort action"
    assert names(disk) == []

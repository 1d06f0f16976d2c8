"""A command that attaches to a node (block-export-add's export, blockdev-backup's filter and
target) racing another monitor's blockdev-del of that node: blockd runs both beside each other
(QSD one after the other). Each time one of the two orders QEMU could give must result — the
attach first (the delete then fails: the node is in use) or the delete first (the attach then
finds no node) — never both succeeding, which would leave an export or a job on a closed node.
The two orders run one after the other pin each daemon's texts."""

from __future__ import annotations

import json

import iotests
from backup_helpers import MiB

SIZE = 1 * MiB
ROUNDS = 40
# What blockdev-del of a running backup's source / target answers (QSD 10 and blockd).
SOURCE_IN_USE = "Block device {s} is in use"
TARGET_IN_USE = "Node '{t}' is busy: block device is in use by block job: backup"


def _monitor(d, i: int) -> iotests.RawQmp:
    m = iotests.RawQmp(d.monitor_paths[i])
    m.greeting()
    assert m.negotiate() == {"return": {}}
    return m


def _add_file(d, tmp_path, name: str) -> None:
    img = iotests.create_image(tmp_path / f"{name}.raw", SIZE)
    d.blockdev_add(driver="file", node_name=name, filename=str(img))


def _names(d) -> set:
    return {n["node-name"] for n in d.nodes()}


def _both_at_once(d, a: dict, b: dict) -> tuple:
    """Send `a` on monitor 1 and `b` on monitor 2 without waiting, then read both replies."""
    with _monitor(d, 1) as m1, _monitor(d, 2) as m2:
        m1.send(json.dumps(a))
        m2.send(json.dumps(b))
        return m1.reply(timeout=30), m2.reply(timeout=30)


def _cancel(d, job: str) -> None:
    d.ok("block-job-cancel", device=job, force=True)
    d.event_wait("BLOCK_JOB_CANCELLED", match={"device": job})
    for _ in range(100):
        if not d.ok("query-jobs"):
            return
        d.get_events(wait=0.05)
    raise AssertionError(f"job {job} did not go away")


def test_export_then_delete_and_delete_then_export(make_daemon, tmp_path):
    d = make_daemon()
    d.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(d.sock("nbd"))}})
    _add_file(d, tmp_path, "n")
    d.ok("block-export-add", type="nbd", id="e", node_name="n")
    assert d.err("blockdev-del", node_name="n")["desc"] == "Node n is in use"
    d.ok("block-export-del", id="e")
    d.event_wait("BLOCK_EXPORT_DELETED", match={"id": "e"})
    d.ok("blockdev-del", node_name="n")
    r = d.err("block-export-add", type="nbd", id="e", node_name="n")
    assert r["desc"] == "Cannot find device='' nor node-name='n'"


def test_backup_then_delete_and_delete_then_backup(make_daemon, tmp_path):
    d = make_daemon()
    _add_file(d, tmp_path, "s")
    _add_file(d, tmp_path, "t")
    d.ok("blockdev-backup", job_id="j", device="s", target="t", sync="full", speed=1)
    src = d.err("blockdev-del", node_name="s")["desc"]
    tgt = d.err("blockdev-del", node_name="t")["desc"]
    assert (src, tgt) == (SOURCE_IN_USE.format(s="s"), TARGET_IN_USE.format(t="t"))
    _cancel(d, "j")
    d.ok("blockdev-del", node_name="s")
    r = d.err("blockdev-backup", job_id="j", device="s", target="t", sync="full")
    assert r["desc"] == "Cannot find device='s' nor node-name='s'"
    _add_file(d, tmp_path, "s")
    d.ok("blockdev-del", node_name="t")
    r = d.err("blockdev-backup", job_id="j", device="s", target="t", sync="full")
    assert r["desc"] == "Cannot find device='t' nor node-name='t'"


@iotests.blockd_only
def test_export_add_racing_blockdev_del_gives_one_order(make_daemon, tmp_path):
    d = make_daemon(monitors=3)
    d.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(d.sock("nbd"))}})
    orders = {"export": 0, "delete": 0}
    for i in range(ROUNDS):
        n, e = f"n{i}", f"e{i}"
        _add_file(d, tmp_path, n)
        exp, dele = _both_at_once(
            d,
            {"execute": "block-export-add",
             "arguments": {"type": "nbd", "id": e, "node-name": n}},
            {"execute": "blockdev-del", "arguments": {"node-name": n}},
        )
        if "return" in exp:
            assert dele["error"]["desc"] == f"Node {n} is in use", (i, exp, dele)
            assert n in _names(d)
            # The export works on a live node: a write lands in its file.
            d.node_io(n, "write -P 0x5a 0 4k")
            d.ok("block-export-del", id=e)
            d.event_wait("BLOCK_EXPORT_DELETED", match={"id": e})
            d.ok("blockdev-del", node_name=n)
            iotests.qemu_io("-f", "raw", "-c", "read -P 0x5a 0 4k", str(tmp_path / f"{n}.raw"))
            orders["export"] += 1
        else:
            assert exp["error"]["desc"] == f"Cannot find device='' nor node-name='{n}'", (i, exp)
            assert dele == {"return": {}}, (i, exp, dele)
            assert d.ok("query-block-exports") == []
            assert n not in _names(d)
            orders["delete"] += 1
        # Nothing of ours holds the file any more.
        iotests.qemu_io("-f", "raw", "-c", "write 0 4k", str(tmp_path / f"{n}.raw"))
    print("orders", orders)


@iotests.blockd_only
def test_blockdev_backup_racing_blockdev_del_gives_one_order(make_daemon, tmp_path):
    d = make_daemon(monitors=3)
    orders = {"backup": 0, "delete": 0}
    for i in range(ROUNDS):
        s, t, j = f"s{i}", f"t{i}", f"j{i}"
        _add_file(d, tmp_path, s)
        _add_file(d, tmp_path, t)
        victim = s if i % 2 == 0 else t
        bak, dele = _both_at_once(
            d,
            {"execute": "blockdev-backup", "arguments": {
                "job-id": j, "device": s, "target": t, "sync": "full", "speed": 1}},
            {"execute": "blockdev-del", "arguments": {"node-name": victim}},
        )
        if "return" in bak:
            want = SOURCE_IN_USE if victim == s else TARGET_IN_USE
            assert dele["error"]["desc"] == want.format(s=s, t=t), (i, bak, dele)
            assert {s, t} <= _names(d)
            _cancel(d, j)
            d.ok("blockdev-del", node_name=s)
            d.ok("blockdev-del", node_name=t)
            orders["backup"] += 1
        else:
            assert bak["error"]["desc"] == (
                f"Cannot find device='{victim}' nor node-name='{victim}'"), (i, bak, dele)
            assert dele == {"return": {}}, (i, bak, dele)
            assert d.ok("query-jobs") == []
            assert victim not in _names(d)
            d.ok("blockdev-del", node_name=s if victim == t else t)
            orders["delete"] += 1
        for n in (s, t):
            iotests.qemu_io("-f", "raw", "-c", "write 0 4k", str(tmp_path / f"{n}.raw"))
    print("orders", orders)

"""Internal (qcow2) snapshots: blockdev-snapshot-internal-sync,
blockdev-snapshot-delete-internal-sync and the transaction action.

Behaviour and texts observed on qemu-storage-daemon 10.0.2: a snapshot is the
image's state at that instant, even while an NBD client writes; ids are the next
number after the highest; QSD records no instruction count (no `icount`) and a
guest clock equal to the wall clock; `image.snapshots` lists them (the key is
absent without snapshots); a transaction's abort deletes the snapshots its
prepare took; a refused command changes nothing.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Dict, List

import pytest

import data_nbd
import iotests

SIZE = 8 << 20
BLOCK = 64 << 10
BLOCKS = SIZE // BLOCK


@pytest.fixture
def make_daemon(make_daemon):
    return data_nbd.ready_factory(make_daemon)


def qcow2(node: str, path: Path, **extra) -> dict:
    args = {"driver": "qcow2", "node-name": node,
            "file": {"driver": "file", "filename": str(path)}}
    args.update({k.replace("_", "-"): v for k, v in extra.items()})
    return args


def new_image(path: Path, size: int = SIZE) -> Path:
    iotests.qemu_img("create", "-q", "-f", "qcow2", str(path), str(size))
    return path


def act(kind: str, **data) -> dict:
    return {"type": kind, "data": data}


def snapshots(d, node: str) -> List[dict]:
    """image.snapshots of a node in query-named-block-nodes (absent: [])."""
    for n in d.ok("query-named-block-nodes"):
        if n["node-name"] == node:
            return n["image"].get("snapshots", [])
    raise AssertionError(f"no node {node}")


def qemu_list(image: Path) -> List[tuple]:
    """(id, tag) rows of qemu-img snapshot -l."""
    out = iotests.qemu_img("snapshot", "-l", str(image))
    rows = []
    for line in out.splitlines()[2:]:
        w = line.split()
        rows.append((w[0], w[1]))
    return rows


def snapshot_raw(image: Path, name: str, out: Path) -> bytes:
    iotests.qemu_img("convert", "-f", "qcow2", "-O", "raw", "-l", f"snapshot.name={name}",
                     str(image), str(out))
    return out.read_bytes()


def assert_check_clean(image: Path) -> None:
    out = iotests.qemu_img("check", str(image))
    assert "No errors were found on the image." in out, out
    assert "leaked" not in out, out


def prefix_written(data: bytes) -> int:
    """How many leading blocks hold their writer pattern (block k: byte k+1); every block
    after them must be all zeros, every block before them whole."""
    k = 0
    while k < BLOCKS and data[k * BLOCK:(k + 1) * BLOCK] == bytes([k + 1]) * BLOCK:
        k += 1
    rest = data[k * BLOCK:]
    assert rest == bytes(len(rest)), f"block {k} is neither written whole nor untouched"
    return k


def test_snapshots_under_a_writer_hold_the_writes_before_them(make_daemon, tmp_path):
    """An NBD client writes block after block while one snapshot is taken by the
    command and one by a transaction: each snapshot holds exactly the blocks written
    before it (whole), later writes do not change it, QEMU reads it back."""
    img = new_image(tmp_path / "w.qcow2")
    d = make_daemon()
    d.ok("blockdev-add", qcow2("n", img))
    sock = data_nbd.start_unix_server(d)
    data_nbd.export(d, "n", "e", "e", writable=True)
    cmds = []
    for k in range(BLOCKS):
        cmds += ["-c", f"write -P {k + 1} {k * BLOCK} {BLOCK}"]
    writer = subprocess.Popen(["qemu-io", "-f", "raw", *cmds, data_nbd.uri(sock, "e")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(0.15)
        assert d.cmd("blockdev-snapshot-internal-sync", device="n", name="s1") == {"return": {}}
        assert d.cmd("transaction", actions=[
            act("blockdev-snapshot-internal-sync", device="n", name="s2")]) == {"return": {}}
    finally:
        _, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err
    listed = snapshots(d, "n")
    assert [(s["id"], s["name"], s["vm-state-size"]) for s in listed] == [
        ("1", "s1", 0), ("2", "s2", 0)]
    for s in listed:
        assert "icount" not in s
        assert (s["vm-clock-sec"], s["vm-clock-nsec"]) == (s["date-sec"], s["date-nsec"])
        assert abs(s["date-sec"] - time.time()) < 60
    data_nbd.unexport(d, "e")
    assert d.shutdown() == 0
    assert_check_clean(img)
    assert qemu_list(img) == [("1", "s1"), ("2", "s2")]
    k1 = prefix_written(snapshot_raw(img, "s1", tmp_path / "s1.raw"))
    k2 = prefix_written(snapshot_raw(img, "s2", tmp_path / "s2.raw"))
    assert k1 <= k2
    iotests.qemu_img("convert", "-O", "raw", str(img), str(tmp_path / "a.raw"))
    assert prefix_written((tmp_path / "a.raw").read_bytes()) == BLOCKS


def test_delete_returns_the_snapshot_and_frees_it(make_daemon, tmp_path):
    img = new_image(tmp_path / "d.qcow2", 1 << 20)
    iotests.qemu_io("-c", "write -P 0x11 0 256k", str(img))
    d = make_daemon()
    d.ok("blockdev-add", qcow2("n", img))
    d.ok("blockdev-snapshot-internal-sync", device="n", name="a")
    data_nbd.nbd_io(d, "n", "write -P 0x22 0 128k")
    d.ok("blockdev-snapshot-internal-sync", device="n", name="b")
    data_nbd.nbd_io(d, "n", "write -P 0x33 64k 128k")
    listed = snapshots(d, "n")
    gone = d.ok("blockdev-snapshot-delete-internal-sync", device="n", name="a")
    assert d.get_events(wait=0.1) == []
    assert gone == listed[0]
    assert snapshots(d, "n") == listed[1:]
    d.ok("blockdev-snapshot-internal-sync", device="n", name="c")
    assert [s["id"] for s in snapshots(d, "n")] == ["2", "3"]
    gone = d.ok("blockdev-snapshot-delete-internal-sync", device="n", id="3", name="c")
    assert gone["name"] == "c"
    assert d.shutdown() == 0
    assert_check_clean(img)
    assert qemu_list(img) == [("2", "b")]
    b = snapshot_raw(img, "b", tmp_path / "b.raw")
    assert b[:128 << 10] == b"\x22" * (128 << 10)
    assert b[128 << 10:256 << 10] == b"\x11" * (128 << 10)
    iotests.qemu_io("-c", "read -P 0x33 64k 128k", "-c", "read -P 0x22 0 64k", str(img))
    # All gone: the image is as clean as one that never had snapshots.
    d = make_daemon()
    d.ok("blockdev-add", qcow2("n", img))
    d.ok("blockdev-snapshot-delete-internal-sync", device="n", name="b")
    assert snapshots(d, "n") == []
    assert d.shutdown() == 0
    assert_check_clean(img)
    assert qemu_list(img) == []


def test_qemu_img_snapshots_are_listed_and_deleted(make_daemon, tmp_path):
    """A snapshot qemu-img made (icount 0, guest clock 0) shows and deletes; ours
    made beside it reads back in QEMU."""
    img = new_image(tmp_path / "q.qcow2", 1 << 20)
    iotests.qemu_io("-c", "write -P 0x44 0 512k", str(img))
    iotests.qemu_img("snapshot", "-c", "theirs", str(img))
    iotests.qemu_io("-c", "write -P 0x55 0 64k", str(img))
    d = make_daemon()
    d.ok("blockdev-add", qcow2("n", img))
    [theirs] = snapshots(d, "n")
    assert (theirs["id"], theirs["name"], theirs["icount"]) == ("1", "theirs", 0)
    assert (theirs["vm-clock-sec"], theirs["vm-clock-nsec"]) == (0, 0)
    d.ok("blockdev-snapshot-internal-sync", device="n", name="ours")
    assert d.ok("blockdev-snapshot-delete-internal-sync", device="n", id="1") == theirs
    assert d.shutdown() == 0
    assert_check_clean(img)
    ours = snapshot_raw(img, "ours", tmp_path / "o.raw")
    assert ours[:64 << 10] == b"\x55" * (64 << 10)
    assert ours[64 << 10:512 << 10] == b"\x44" * (448 << 10)
    iotests.qemu_img("snapshot", "-d", "ours", str(img))
    assert_check_clean(img)


def test_transaction_abort_deletes_the_snapshots_it_took(make_daemon, tmp_path):
    a = new_image(tmp_path / "a.qcow2", 1 << 20)
    b = new_image(tmp_path / "b.qcow2", 1 << 20)
    iotests.qemu_io("-c", "write -P 0x66 0 128k", str(a))
    d = make_daemon()
    d.ok("blockdev-add", qcow2("a", a))
    d.ok("blockdev-add", qcow2("b", b))
    d.ok("blockdev-snapshot-internal-sync", device="b", name="keep")
    kept = snapshots(d, "b")
    err = d.err("transaction", actions=[
        act("blockdev-snapshot-internal-sync", device="a", name="t"),
        act("blockdev-snapshot-internal-sync", device="b", name="t"),
        act("abort"),
    ])
    assert err == {"class": "GenericError", "desc": "Transaction aborted using Abort action"}
    assert snapshots(d, "a") == []
    assert snapshots(d, "b") == kept
    # A later action failing undoes the earlier ones too.
    err = d.err("transaction", actions=[
        act("blockdev-snapshot-internal-sync", device="a", name="t"),
        act("blockdev-snapshot-internal-sync", device="b", name="keep"),
    ])
    assert err["desc"] == "Snapshot with name 'keep' already exists on device 'b'"
    assert snapshots(d, "a") == []
    # Both drives at once; the ids continue where the aborted ones left none.
    d.ok("transaction", actions=[
        act("blockdev-snapshot-internal-sync", device="a", name="both"),
        act("blockdev-snapshot-internal-sync", device="b", name="both"),
    ])
    assert [s["id"] for s in snapshots(d, "a")] == ["1"]
    assert [s["id"] for s in snapshots(d, "b")] == ["1", "2"]
    assert d.shutdown() == 0
    for img in (a, b):
        assert_check_clean(img)
    assert qemu_list(a) == [("1", "both")]
    assert qemu_list(b) == [("1", "keep"), ("2", "both")]


def test_grouped_completion_mode_is_refused(make_daemon, tmp_path):
    img = new_image(tmp_path / "g.qcow2", 1 << 20)
    d = make_daemon()
    d.ok("blockdev-add", qcow2("n", img))
    err = d.err("transaction", actions=[act("blockdev-snapshot-internal-sync", device="n", name="x")],
                properties={"completion-mode": "grouped"})
    assert err["desc"] == ("Action 'blockdev-snapshot-internal-sync' does not support "
                           "transaction property completion-mode = grouped")
    assert snapshots(d, "n") == []


def test_through_a_raw_node_on_top_and_root_only(make_daemon, tmp_path):
    """A raw node over the qcow2 node takes and lists the snapshots of the image
    below; the qcow2 node itself, now under a parent, is refused."""
    img = new_image(tmp_path / "r.qcow2", 1 << 20)
    d = make_daemon()
    d.ok("blockdev-add", qcow2("q", img))
    d.ok("blockdev-add", driver="raw", **{"node-name": "top"}, file="q")
    assert d.err("blockdev-snapshot-internal-sync", device="q", name="x")["desc"] == \
        "Need a root block node"
    assert d.err("blockdev-snapshot-delete-internal-sync", device="q")["desc"] == \
        "Need a root block node"
    d.ok("blockdev-snapshot-internal-sync", device="top", name="x")
    assert [s["name"] for s in snapshots(d, "top")] == ["x"]
    assert [s["name"] for s in snapshots(d, "q")] == ["x"]
    assert d.ok("blockdev-snapshot-delete-internal-sync", device="top", name="x")["id"] == "1"
    assert d.shutdown() == 0
    assert_check_clean(img)
    assert qemu_list(img) == []


REFUSALS = [
    ("blockdev-snapshot-internal-sync", {"device": "nope", "name": "s"},
     "Cannot find device='nope' nor node-name='nope'"),
    ("blockdev-snapshot-internal-sync", {"device": "raw", "name": "s"},
     "Block format 'raw' used by device 'raw' does not support internal snapshots"),
    ("blockdev-snapshot-internal-sync", {"device": "rawfile", "name": "s"},
     "Need a root block node"),
    ("blockdev-snapshot-internal-sync", {"device": "ro", "name": "s"},
     "Device 'ro' is read only"),
    ("blockdev-snapshot-internal-sync", {"device": "n", "name": ""}, "Name is empty"),
    ("blockdev-snapshot-internal-sync", {"device": "n", "name": "have"},
     "Snapshot with name 'have' already exists on device 'n'"),
    ("blockdev-snapshot-internal-sync", {"device": "n"}, "Parameter 'name' is missing"),
    ("blockdev-snapshot-delete-internal-sync", {"device": "nope", "name": "s"},
     "Cannot find device='nope' nor node-name='nope'"),
    ("blockdev-snapshot-delete-internal-sync", {"device": "raw", "name": "s"},
     "Failed to get a snapshot list: Operation not supported"),
    ("blockdev-snapshot-delete-internal-sync", {"device": "n"}, "Name or id must be provided"),
    ("blockdev-snapshot-delete-internal-sync", {"device": "n", "name": "zz"},
     "Snapshot with id 'null' and name 'zz' does not exist on device 'n'"),
    ("blockdev-snapshot-delete-internal-sync", {"device": "n", "id": "7"},
     "Snapshot with id '7' and name 'null' does not exist on device 'n'"),
    ("blockdev-snapshot-delete-internal-sync", {"device": "n", "id": "1", "name": "zz"},
     "Snapshot with id '1' and name 'zz' does not exist on device 'n'"),
    ("blockdev-snapshot-delete-internal-sync", {"device": "ro", "name": "nothere"},
     "Snapshot with id 'null' and name 'nothere' does not exist on device 'ro'"),
    ("blockdev-snapshot-delete-internal-sync", {"device": "ro", "name": "old"},
     "Failed to remove snapshot from snapshot list: Operation not permitted"),
]


@pytest.mark.parametrize("cmd,args,desc", REFUSALS,
                         ids=[f"{c.split('-')[2]}-{i}" for i, (c, _, _) in enumerate(REFUSALS)])
def test_refusals_change_nothing(make_daemon, tmp_path, cmd, args, desc):
    n = new_image(tmp_path / "n.qcow2", 1 << 20)
    ro = new_image(tmp_path / "ro.qcow2", 1 << 20)
    iotests.qemu_img("snapshot", "-c", "old", str(ro))
    raw = tmp_path / "r.img"
    raw.write_bytes(bytes(1 << 20))
    d = make_daemon()
    d.ok("blockdev-add", qcow2("n", n))
    d.ok("blockdev-snapshot-internal-sync", device="n", name="have")
    d.ok("blockdev-add", qcow2("ro", ro, **{"read-only": True}))
    d.ok("blockdev-add", driver="raw", **{"node-name": "raw"},
         file={"driver": "file", "filename": str(raw), "node-name": "rawfile"})
    files = {p: p.read_bytes() for p in (n, ro, raw)}
    before: Dict[str, list] = {x: snapshots(d, x) for x in ("n", "ro")}
    assert d.err(cmd, args) == {"class": "GenericError", "desc": desc}
    if iotests.is_qsd() and desc.startswith("Failed to remove"):
        # QSD drops the snapshot from its in-memory list before the write fails, so
        # it no longer lists it although the file keeps it; blockd keeps listing it.
        before["ro"] = []
    assert {x: snapshots(d, x) for x in ("n", "ro")} == before
    assert d.shutdown() == 0
    assert raw.read_bytes() == files[raw]
    assert ro.read_bytes() == files[ro]
    assert qemu_list(n) == [("1", "have")]
    assert_check_clean(n)


def test_nodes_of_a_running_backup_are_not_roots(make_daemon, tmp_path):
    """While a backup job holds them, neither its source nor its target takes or
    deletes internal snapshots: "Need a root block node" on both daemons."""
    src = new_image(tmp_path / "src.qcow2")
    iotests.qemu_io("-c", f"write -P 0x77 0 {SIZE}", str(src))
    tgt = new_image(tmp_path / "tgt.qcow2")
    d = make_daemon()
    d.ok("blockdev-add", qcow2("src", src))
    d.ok("blockdev-add", qcow2("tgt", tgt))
    d.ok("blockdev-backup", device="src", target="tgt", sync="full", speed=1, **{"job-id": "j"})
    for node in ("src", "tgt"):
        assert d.err("blockdev-snapshot-internal-sync", device=node, name="x")["desc"] == \
            "Need a root block node"
        assert d.err("blockdev-snapshot-delete-internal-sync", device=node, name="x")["desc"] == \
            "Need a root block node"
    d.ok("block-job-cancel", device="j", force=True)
    d.event_wait("BLOCK_JOB_CANCELLED")
    assert d.shutdown() == 0
    assert qemu_list(src) == [] and qemu_list(tgt) == []


def test_one_bit_refcounts_refuse_with_qemus_text(make_daemon, tmp_path):
    """refcount_bits=1 cannot count a second reference: both daemons refuse with
    EINVAL's text. blockd checks before writing anything; QSD leaves a leaked cluster."""
    img = tmp_path / "one.qcow2"
    iotests.qemu_img("create", "-q", "-f", "qcow2", "-o", "refcount_bits=1", str(img), "1M")
    iotests.qemu_io("-c", "write -P 0x12 0 64k", str(img))
    before = img.read_bytes()
    d = make_daemon()
    d.ok("blockdev-add", qcow2("n", img))
    assert d.err("blockdev-snapshot-internal-sync", device="n", name="x") == {
        "class": "GenericError",
        "desc": "Failed to create snapshot 'x' on device 'n': Invalid argument"}
    assert snapshots(d, "n") == []
    assert d.shutdown() == 0
    assert qemu_list(img) == []
    if iotests.is_qsd():
        out = iotests.qemu_img("check", str(img), check=False)
        assert "1 leaked clusters were found" in out, out
    else:
        assert img.read_bytes() == before
        assert_check_clean(img)

"""External snapshots: blockdev-snapshot (an existing overlay node put on top of a
node) and blockdev-snapshot-sync (the overlay file created or opened, then the same).

Behaviour and texts observed on qemu-storage-daemon 10.0.2: after the snapshot every
user of the node (exports, parent nodes) uses the overlay, writes land in the overlay,
unwritten regions read from the old node, which QEMU reopens read-only.  A refused
snapshot changes nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, List

import pytest

import data_nbd
import iotests
from iotests import Daemon

SIZE = 1 << 20


@pytest.fixture
def make_daemon(make_daemon):
    """The harness factory, returning daemons whose monitor already answers."""
    return data_nbd.ready_factory(make_daemon)


def qcow2(node: str, path: Path, **extra) -> dict:
    args = {"driver": "qcow2", "node-name": node,
            "file": {"driver": "file", "filename": str(path), "node-name": f"{node}-f"}}
    args.update({k.replace("_", "-"): v for k, v in extra.items()})
    return args


def new_image(path: Path, *extra: str, size: int = SIZE) -> Path:
    iotests.qemu_img("create", "-q", "-f", "qcow2", *extra, str(path), str(size))
    return path


def chain_nodes(d: Daemon) -> Dict[str, dict]:
    """query-named-block-nodes (not flat) by node name."""
    return {n["node-name"]: n for n in d.ok("query-named-block-nodes")}


def wiring(d: Daemon) -> List[tuple]:
    """What a refused command must leave as it was: nodes, their chains, modes, exports."""
    nodes = sorted((n["node-name"], n.get("backing_file"), n["backing_file_depth"], n["ro"])
                   for n in d.ok("query-named-block-nodes"))
    exports = sorted((e["id"], e["node-name"]) for e in d.ok("query-block-exports"))
    return nodes + exports


def io(target: str, *commands: str) -> str:
    proc = data_nbd.qemu_io_uri(target, *commands)
    data_nbd.assert_io_ok(proc.stdout + proc.stderr)
    return proc.stdout


def backing_chain(image: Path) -> List[dict]:
    out = iotests.qemu_img("info", "-U", "--backing-chain", "--output=json", str(image))
    return json.loads(out)


def test_export_of_the_node_writes_into_the_overlay(make_daemon, tmp_path):
    """The export of the snapshotted node follows it onto the overlay: data written
    after the snapshot reads back, unwritten data comes from the base, and the base
    image is byte-for-byte what it was."""
    base = new_image(tmp_path / "base.qcow2")
    iotests.qemu_io("-c", "write -P 0x11 0 128k", str(base))
    ov = new_image(tmp_path / "ov.qcow2")
    d = make_daemon()
    d.ok("blockdev-add", qcow2("base", base))
    sock = data_nbd.start_unix_server(d)
    data_nbd.export(d, "base", "e", "e", writable=True)
    d.ok("blockdev-add", qcow2("ov", ov, backing=None))
    shutil.copy(base, tmp_path / "base-before.qcow2")

    assert d.cmd("blockdev-snapshot", node="base", overlay="ov") == {"return": {}}

    assert d.ok("query-block-exports") == [
        {"node-name": "ov", "shutting-down": False, "type": "nbd", "id": "e"}]
    target = data_nbd.uri(sock, "e")
    io(target, "write -P 0x22 64k 64k")
    io(target, "read -P 0x11 0 64k", "read -P 0x22 64k 64k", "read -P 0 128k 64k")
    data_nbd.unexport(d, "e")
    assert d.shutdown() == 0
    iotests.qemu_img("compare", "-f", "qcow2", "-F", "qcow2",
                     str(tmp_path / "base-before.qcow2"), str(base))
    # QEMU records no backing file in an overlay it did not create.
    info = backing_chain(ov)
    assert len(info) == 1 and "backing-filename" not in info[0]
    iotests.qemu_io("-c", "read -P 0x22 64k 64k", "-c", "read -P 0 0 64k", str(ov))


def test_overlay_exported_after_the_snapshot(make_daemon, tmp_path):
    base = new_image(tmp_path / "base.qcow2")
    iotests.qemu_io("-c", "write -P 0x33 0 64k", str(base))
    shutil.copy(base, tmp_path / "base-before.qcow2")
    ov = new_image(tmp_path / "ov.qcow2")
    d = make_daemon()
    d.ok("blockdev-add", qcow2("base", base))
    d.ok("blockdev-add", qcow2("ov", ov, backing=None))

    d.ok("blockdev-snapshot", node="base", overlay="ov")

    data_nbd.nbd_io(d, "ov", "write -P 0x44 32k 64k", "read -P 0x33 0 32k",
                    "read -P 0x44 32k 64k", "read -P 0 96k 32k")
    nodes = chain_nodes(d)
    assert nodes["ov"]["backing_file"] == str(base)
    assert nodes["ov"]["backing_file_depth"] == 1
    assert nodes["ov"]["image"]["backing-image"]["filename"] == str(base)
    assert nodes["ov"]["ro"] is False
    assert nodes["base"]["ro"] is True
    assert nodes["base"]["backing_file_depth"] == 0
    assert d.shutdown() == 0
    iotests.qemu_img("compare", str(tmp_path / "base-before.qcow2"), str(base))
    assert "No errors" in iotests.qemu_img("check", str(ov))


def test_refusals_change_nothing(make_daemon, tmp_path):
    base = new_image(tmp_path / "base.qcow2")
    other = new_image(tmp_path / "other.qcow2")
    hasb = new_image(tmp_path / "hasb.qcow2", "-b", str(other), "-F", "qcow2")
    raw = iotests.create_image(tmp_path / "r.raw", SIZE)
    d = make_daemon()
    data_nbd.start_unix_server(d)
    d.ok("blockdev-add", qcow2("base", base))
    d.ok("blockdev-add", qcow2("hasb", hasb))
    d.ok("blockdev-add", {"driver": "raw", "node-name": "raw",
                          "file": {"driver": "file", "filename": str(raw)}})
    d.ok("blockdev-add", qcow2("exp", new_image(tmp_path / "exp.qcow2"), backing=None))
    data_nbd.export(d, "exp", "x")
    d.ok("blockdev-add", qcow2("ro", new_image(tmp_path / "ro.qcow2"), backing=None, read_only=True))
    before = wiring(d)

    def refused(node: str, overlay: str) -> str:
        e = d.err("blockdev-snapshot", node=node, overlay=overlay)
        assert e["class"] == "GenericError"
        return e["desc"]

    assert refused("nope", "hasb") == "Cannot find device='nope' nor node-name='nope'"
    assert refused("base", "nope") == "Cannot find device='nope' nor node-name='nope'"
    assert refused("base", "base") == "Making 'base' a backing child of 'base' would create a cycle"
    assert refused("base", "base-f") == "The overlay is already in use"
    assert refused("base", "exp") == "The overlay is already in use"
    assert refused("base", "hasb") == "The overlay already has a backing image"
    assert refused("base", "raw") == "The overlay does not support backing images"
    assert wiring(d) == before
    # A read-only overlay is accepted (as QEMU does) while nothing writes to the node: then
    # the base is some overlay's backing child and cannot be snapshotted again.
    d.ok("blockdev-snapshot", node="base", overlay="ro")
    d.ok("blockdev-add", qcow2("ov2", new_image(tmp_path / "ov2.qcow2"), backing=None))
    before = wiring(d)
    assert refused("base", "ov2") == "Node 'base' is busy: node is used as backing hd of 'ro'"
    assert refused("base", "nope") == "Node 'base' is busy: node is used as backing hd of 'ro'"
    e = d.err("blockdev-del", node_name="base")
    assert e["class"] == "GenericError"
    assert wiring(d) == before


def test_read_only_overlay_under_a_writer_is_refused(make_daemon, tmp_path):
    base = new_image(tmp_path / "base.qcow2")
    d = make_daemon()
    data_nbd.start_unix_server(d)
    d.ok("blockdev-add", qcow2("base", base))
    d.ok("blockdev-add", qcow2("ro", new_image(tmp_path / "ro.qcow2"), backing=None, read_only=True))
    data_nbd.export(d, "base", "w", writable=True)
    before = wiring(d)

    e = d.err("blockdev-snapshot", node="base", overlay="ro")

    assert e == {"class": "GenericError", "desc": "Block node is read-only"}
    assert wiring(d) == before


def test_snapshot_sync_creates_the_overlay_with_the_base_as_backing_file(make_daemon, tmp_path):
    """The export of the node follows it onto the created overlay, whose image names the
    node's image as its backing file."""
    base = new_image(tmp_path / "base.qcow2")
    iotests.qemu_io("-c", "write -P 0x55 0 64k", str(base))
    shutil.copy(base, tmp_path / "base-before.qcow2")
    snap = tmp_path / "snap.qcow2"
    d = make_daemon()
    d.ok("blockdev-add", qcow2("base", base))
    sock = data_nbd.start_unix_server(d)
    data_nbd.export(d, "base", "e", "e", writable=True)

    assert d.cmd("blockdev-snapshot-sync", node_name="base", snapshot_file=str(snap),
                 snapshot_node_name="snap") == {"return": {}}

    assert [e["node-name"] for e in d.ok("query-block-exports")] == ["snap"]
    nodes = chain_nodes(d)
    assert nodes["snap"]["backing_file"] == str(base)
    assert nodes["snap"]["backing_file_depth"] == 1
    assert nodes["snap"]["image"]["backing-filename"] == str(base)
    assert nodes["snap"]["image"]["backing-filename-format"] == "qcow2"
    assert nodes["snap"]["image"]["virtual-size"] == SIZE
    assert nodes["base"]["ro"] is True
    target = data_nbd.uri(sock, "e")
    io(target, "write -P 0x66 64k 64k")
    io(target, "read -P 0x55 0 64k", "read -P 0x66 64k 64k")
    assert d.shutdown() == 0
    chain = backing_chain(snap)
    assert [c["filename"] for c in chain] == [str(snap), str(base)]
    assert chain[0]["backing-filename"] == str(base)
    assert chain[0]["backing-filename-format"] == "qcow2"
    iotests.qemu_img("compare", str(tmp_path / "base-before.qcow2"), str(base))
    iotests.qemu_io("-c", "read -P 0x55 0 64k", "-c", "read -P 0x66 64k 64k", str(snap))
    assert "No errors" in iotests.qemu_img("check", str(snap))


def test_snapshot_sync_of_an_unused_node_keeps_only_the_file(make_daemon, tmp_path):
    """The created overlay belongs to the node's users: with none, QEMU drops it at
    once; the file stays, created with the node's image as backing file, and the node
    was made read-only."""
    base = new_image(tmp_path / "base.qcow2")
    snap = tmp_path / "snap.qcow2"
    d = make_daemon()
    d.ok("blockdev-add", qcow2("base", base))

    d.ok("blockdev-snapshot-sync", node_name="base", snapshot_file=str(snap),
         snapshot_node_name="snap")

    nodes = chain_nodes(d)
    assert sorted(nodes) == ["base", "base-f"]
    assert nodes["base"]["ro"] is True
    assert d.shutdown() == 0
    assert backing_chain(snap)[0]["backing-filename"] == str(base)


def test_snapshot_sync_existing_opens_the_file(make_daemon, tmp_path):
    base = new_image(tmp_path / "base.qcow2")
    iotests.qemu_io("-c", "write -P 0x77 0 64k", str(base))
    ex = new_image(tmp_path / "ex.qcow2")
    before = ex.read_bytes()
    d = make_daemon()
    d.ok("blockdev-add", qcow2("base", base))
    sock = data_nbd.start_unix_server(d)
    data_nbd.export(d, "base", "e", "e", writable=True)

    d.ok("blockdev-snapshot-sync", node_name="base", snapshot_file=str(ex),
         snapshot_node_name="ex", mode="existing")

    nodes = chain_nodes(d)
    assert nodes["ex"]["backing_file"] == str(base)
    assert "backing-filename" not in nodes["ex"]["image"]
    io(data_nbd.uri(sock, "e"), "read -P 0x77 0 64k", "write -P 0x78 64k 4k")
    assert d.shutdown() == 0
    assert ex.read_bytes() != before
    assert "backing-filename" not in backing_chain(ex)[0]
    iotests.qemu_io("-c", "read -P 0x78 64k 4k", str(ex))


def test_snapshot_sync_refusals(make_daemon, tmp_path):
    base = new_image(tmp_path / "base.qcow2")
    d = make_daemon()
    d.ok("blockdev-add", qcow2("base", base))
    before = wiring(d)

    def refused(**args) -> str:
        e = d.err("blockdev-snapshot-sync", **args)
        assert e["class"] == "GenericError"
        return e["desc"]

    f = str(tmp_path / "x.qcow2")
    assert refused(snapshot_file=f) == "Cannot find device='' nor node-name=''"
    assert refused(device="nope", snapshot_file=f) == "Cannot find device='nope' nor node-name=''"
    assert refused(node_name="nope", snapshot_file=f) == "Cannot find device='' nor node-name='nope'"
    assert refused(node_name="base", snapshot_file=f) == "New overlay node-name missing"
    assert refused(node_name="base", snapshot_file=f,
                   snapshot_node_name="base-f") == "New overlay node-name already in use"
    assert refused(node_name="base", snapshot_file=f, snapshot_node_name="x",
                   format="raw") == "Backing file not supported for file format 'raw'"
    assert refused(node_name="base", snapshot_file=f, snapshot_node_name="x",
                   format="bogus") == "Unknown file format 'bogus'"
    nodir = tmp_path / "nodir" / "x.qcow2"
    assert refused(node_name="base", snapshot_file=str(nodir), snapshot_node_name="x") == \
        f"Could not create '{nodir}': No such file or directory"
    missing = tmp_path / "missing.qcow2"
    assert refused(node_name="base", snapshot_file=str(missing), snapshot_node_name="x",
                   mode="existing") == f"Could not open '{missing}': No such file or directory"
    assert not Path(f).exists() and not missing.exists()
    # The node name is checked when the overlay opens: the file was created (and stays).
    assert refused(node_name="base", snapshot_file=f, snapshot_node_name="1bad") == \
        "Invalid node-name: '1bad'"
    assert Path(f).exists()
    assert wiring(d) == before
    assert d.shutdown() == 0
    iotests.qemu_img("check", str(base))


def test_chain_of_three_snapshots(make_daemon, tmp_path):
    base = new_image(tmp_path / "base.qcow2")
    iotests.qemu_io("-c", "write -P 0x01 0 64k", str(base))
    d = make_daemon()
    d.ok("blockdev-add", qcow2("base", base))
    sock = data_nbd.start_unix_server(d)
    data_nbd.export(d, "base", "e", "e", writable=True)
    target = data_nbd.uri(sock, "e")
    top = "base"
    for i in (1, 2, 3):
        io(target, f"write -P 0x{i + 1:02x} {i * 64}k 64k")
        d.ok("blockdev-snapshot-sync", node_name=top, snapshot_file=str(tmp_path / f"s{i}.qcow2"),
             snapshot_node_name=f"s{i}")
        top = f"s{i}"
    io(target, "write -P 0x09 0 4k")

    assert [e["node-name"] for e in d.ok("query-block-exports")] == ["s3"]
    nodes = chain_nodes(d)
    assert [nodes[f"s{i}"]["backing_file_depth"] for i in (1, 2, 3)] == [1, 2, 3]
    assert nodes["s3"]["backing_file"] == str(tmp_path / "s2.qcow2")
    assert nodes["s1"]["backing_file"] == str(base)
    img = nodes["s3"]["image"]
    names = []
    while img:
        names.append(img["filename"])
        img = img.get("backing-image")
    assert names == [str(tmp_path / f"{n}.qcow2") for n in ("s3", "s2", "s1", "base")]
    assert [nodes[n]["ro"] for n in ("base", "s1", "s2", "s3")] == [True, True, True, False]
    io(target, "read -P 0x09 0 4k", "read -P 0x01 4k 60k", "read -P 0x02 64k 64k",
       "read -P 0x03 128k 64k", "read -P 0x04 192k 64k", "read -P 0 256k 64k")
    assert d.shutdown() == 0
    chain = backing_chain(tmp_path / "s3.qcow2")
    assert [c["filename"] for c in chain] == [str(tmp_path / f"{n}.qcow2") for n in ("s3", "s2", "s1", "base")]
    for n in ("s3", "s2", "s1", "base"):
        assert "No errors" in iotests.qemu_img("check", str(tmp_path / f"{n}.qcow2"))
    iotests.qemu_io("-c", "read -P 0x04 192k 64k", "-c", "read -P 0x01 4k 60k", str(tmp_path / "s3.qcow2"))


@iotests.blockd_only
def test_device_follows_the_snapshot_in_query_block(tmp_path):
    """blockd's short form has a device (drive0), which QSD lacks: the device names the
    overlay after blockdev-snapshot-sync, query-block shows the chain, and writes through
    the device land in the overlay."""
    import subprocess
    import tempfile
    import time

    img = new_image(tmp_path / "disk.qcow2")
    iotests.qemu_io("-c", "write -P 0x12 0 64k", str(img))
    shutil.copy(img, tmp_path / "disk-before.qcow2")
    sockdir = Path(tempfile.mkdtemp(prefix="iot-snap-"))
    qmp_sock, nbd_sock = sockdir / "qmp.sock", sockdir / "nbd.sock"
    proc = subprocess.Popen([iotests.daemon_binary(), "--image", str(img), "--qmp", str(qmp_sock),
                             "--nbd", str(nbd_sock)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not qmp_sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        qmp = iotests.RawQmp(qmp_sock)
        qmp.greeting()
        qmp.negotiate()
        e = qmp.execute("blockdev-snapshot", {"node": "drive0", "overlay": "nope"})["error"]
        assert e["desc"] == "Cannot find device='nope' nor node-name='nope'"
        snap = tmp_path / "snap.qcow2"
        assert qmp.execute("blockdev-snapshot-sync", {
            "device": "drive0", "snapshot-file": str(snap), "snapshot-node-name": "snap"}) == {"return": {}}

        # The short form's writable export follows the device onto the overlay too.
        [exp] = qmp.execute("query-block-exports")["return"]
        assert (exp["id"], exp["node-name"]) == ("drive0", "snap")
        io(data_nbd.uri(nbd_sock, "drive0"), "write -P 0x56 128k 64k", "read -P 0x12 0 64k")

        [dev] = qmp.execute("query-block")["return"]
        assert dev["device"] == "drive0"
        assert dev["inserted"]["node-name"] == "snap"
        assert dev["inserted"]["backing_file"] == str(img)
        assert dev["inserted"]["backing_file_depth"] == 1
        assert dev["inserted"]["image"]["backing-image"]["filename"] == str(img)
        out = qmp.execute("human-monitor-command", {"command-line": 'qemu-io drive0 "write -P 0x34 64k 64k"'})
        assert out["return"].startswith("wrote 65536/65536 bytes at offset 65536")
        assert qmp.execute("quit") == {"return": {}}
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    iotests.qemu_img("compare", str(tmp_path / "disk-before.qcow2"), str(img))
    iotests.qemu_io("-c", "read -P 0x12 0 64k", "-c", "read -P 0x34 64k 64k",
                    "-c", "read -P 0x56 128k 64k", str(snap))

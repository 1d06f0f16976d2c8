"""blockdev-reopen of read-only qcow2 nodes to read-write, as QEMU 10 does it (texts checked on
qemu-storage-daemon 10.0.2): a node with a persistent bitmap goes read-write and flags the
bitmap in use; a list naming the format and its named file switches them whatever the list
order; a format going read-write over a named file that stays read-only is refused
("Block node is read-only") and leaves the image untouched, as is blockdev-add of a
read-write qcow2 over a read-only named file."""

from __future__ import annotations

import hashlib

import pytest

import iotests
import data_nbd
from backup_helpers import MiB

SIZE = 4 * MiB


def image(tmp_path, bitmap: bool = True):
    img = iotests.create_image(tmp_path / "r.qcow2", SIZE, "qcow2")
    if bitmap:
        iotests.qemu_img("bitmap", "--add", str(img), "b")
    return img


def file_sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def qcow2_opts(name: str, file: str, read_only: bool) -> dict:
    return {"driver": "qcow2", "node-name": name, "file": file, "read-only": read_only}


def writes_and_reads_back(d, node: str) -> None:
    data_nbd.node_io(d, node, "write -P 0x5a 0 64k")
    data_nbd.node_io(d, node, "read -P 0x5a 0 64k")


def clean_after_shutdown(d, img) -> None:
    assert d.shutdown() == 0
    data_nbd.image_check(img)
    assert data_nbd.on_disk_bitmaps(img) == {"b": {"flags": ["auto"], "granularity": 65536}}
    assert "read 65536/65536 bytes" in iotests.qemu_io(
        "-f", "qcow2", "-c", "read -P 0x5a 0 64k", str(img))


def test_read_only_node_with_bitmap_goes_read_write(make_daemon, tmp_path):
    """The inline file child's writable descriptor is what the format writes its header and
    the bitmap's in-use flag through."""
    img = image(tmp_path)
    d = data_nbd.ready(make_daemon())
    d.blockdev_add(driver="qcow2", node_name="r", read_only=True,
                   file={"driver": "file", "filename": str(img)})
    fnode = next(n["node-name"] for n in d.nodes() if n["drv"] == "file")
    assert d.cmd("blockdev-reopen", options=[qcow2_opts("r", fnode, False)]) == {"return": {}}
    assert d.node("r")["ro"] is False
    assert d.node(fnode)["ro"] is False
    assert data_nbd.on_disk_bitmaps(img, force_share=True)["b"]["flags"] == ["in-use", "auto"]
    writes_and_reads_back(d, "r")
    assert d.bitmap("r", "b")["count"] == 65536
    clean_after_shutdown(d, img)


@pytest.mark.parametrize("order", ["format-first", "file-first"])
def test_format_and_named_file_go_read_write_in_any_order(make_daemon, tmp_path, order):
    img = image(tmp_path)
    d = data_nbd.ready(make_daemon())
    d.blockdev_add(driver="file", node_name="f", filename=str(img), read_only=True)
    d.blockdev_add(driver="qcow2", node_name="q", file="f", read_only=True)
    q = qcow2_opts("q", "f", False)
    f = {"driver": "file", "node-name": "f", "filename": str(img), "read-only": False}
    opts = [q, f] if order == "format-first" else [f, q]
    assert d.cmd("blockdev-reopen", options=opts) == {"return": {}}
    assert (d.node("q")["ro"], d.node("f")["ro"]) == (False, False)
    assert data_nbd.on_disk_bitmaps(img, force_share=True)["b"]["flags"] == ["in-use", "auto"]
    writes_and_reads_back(d, "q")
    clean_after_shutdown(d, img)


@pytest.mark.parametrize("bitmap", [False, True], ids=["plain", "bitmap"])
def test_format_read_write_over_read_only_named_file_refused(make_daemon, tmp_path, bitmap):
    img = image(tmp_path, bitmap)
    before = file_sha(img)
    d = data_nbd.ready(make_daemon())
    d.blockdev_add(driver="file", node_name="f", filename=str(img), read_only=True)
    d.blockdev_add(driver="qcow2", node_name="q", file="f", read_only=True)
    e = d.err("blockdev-reopen", options=[qcow2_opts("q", "f", False)])
    assert e == {"class": "GenericError", "desc": "Block node is read-only"}
    assert (d.node("q")["ro"], d.node("f")["ro"]) == (True, True)
    assert file_sha(img) == before
    # Refused again the same way: nothing was left half switched.
    e = d.err("blockdev-reopen", options=[qcow2_opts("q", "f", False)])
    assert e["desc"] == "Block node is read-only"
    assert d.shutdown() == 0
    assert file_sha(img) == before


def test_add_read_write_format_over_read_only_named_file_refused(make_daemon, tmp_path):
    img = image(tmp_path)
    before = file_sha(img)
    d = data_nbd.ready(make_daemon())
    d.blockdev_add(driver="file", node_name="f", filename=str(img), read_only=True)
    e = d.err("blockdev-add", driver="qcow2", node_name="q", file="f")
    assert e == {"class": "GenericError", "desc": "Block node is read-only"}
    assert not any(n["node-name"] == "q" for n in d.nodes())
    # A read-only one over it still opens, and refuses a writable export with QEMU's text.
    d.blockdev_add(driver="qcow2", node_name="q2", file="f", read_only=True)
    d.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(tmp_path / "n.sock")}})
    e = d.err("block-export-add", type="nbd", id="e", node_name="q2", writable=True)
    assert e["desc"] == "Cannot export read-only node as writable"
    assert d.shutdown() == 0
    assert file_sha(img) == before


def test_same_node_twice_last_wins(make_daemon, tmp_path):
    """Regression: a list naming a node twice (read-only, then read-write) ends read-write
    with its bitmap, as on QEMU."""
    img = image(tmp_path)
    d = data_nbd.ready(make_daemon())
    d.blockdev_add(driver="file", node_name="f", filename=str(img))
    d.blockdev_add(driver="qcow2", node_name="q", file="f")
    q = {"driver": "qcow2", "node-name": "q", "file": "f"}
    r = d.cmd("blockdev-reopen", options=[{**q, "read-only": True}, {**q, "read-only": False}])
    assert r == {"return": {}}
    assert d.node("q")["ro"] is False
    writes_and_reads_back(d, "q")
    clean_after_shutdown(d, img)

"""blockdev-reopen switches a node between read-only and read-write with no disk I/O under the
graph lock: a switch whose image reopen hangs (a FUSE-served file whose server is stopped) leaves
other monitors' graph commands answering; the switch then completes (blockd-only: QSD runs every
command under one lock and would hang here as well). A list whose later entry is refused puts
the switches before it back (both daemons)."""

from __future__ import annotations

import json
import os
import time

import iotests
import data_nbd
from backup_helpers import MiB

SIZE = 4 * MiB


def q(read_only: bool) -> dict:
    return {"driver": "qcow2", "node-name": "sq", "file": "sf", "read-only": read_only}


@iotests.blockd_only
def test_a_stalled_switch_to_read_write_does_not_block_other_graph_commands(make_daemon, tmp_path):
    from fleece_helpers import StallableFile

    stall = StallableFile(tmp_path, SIZE)
    try:
        # The image written into the served file (which cannot be truncated or recreated).
        img = iotests.create_image(tmp_path / "img.qcow2", MiB, "qcow2")
        fd = os.open(stall.path, os.O_WRONLY)
        try:
            os.pwrite(fd, img.read_bytes(), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        d = make_daemon(monitors=2)
        d.blockdev_add(driver="file", node_name="sf", filename=str(stall.path))
        d.blockdev_add(driver="qcow2", node_name="sq", file="sf")
        d.blockdev_add(driver="null-co", node_name="other", size=SIZE)
        d.ok("block-dirty-bitmap-add", node="sq", name="b", persistent=True)
        d.node_io("sq", "write -P 0x5a 0 64k")
        d.ok("blockdev-reopen", options=[q(True)])
        stall.stop()
        with iotests.RawQmp(d.monitor_paths[1]) as m:
            m.greeting()
            assert m.negotiate() == {"return": {}}
            m.send(json.dumps({"execute": "blockdev-reopen", "arguments": {"options": [q(False)]}}))
            time.sleep(2)  # the image opens for writing and flags its bitmap in use: it waits there
            assert m.no_message(), "the reopen did not stall"
            # Each answers within the QMP timeout although the image is still being reopened.
            # (blockdev-add and -del: the other commands still wait for the QMP command lock.)
            r = d.cmd("blockdev-add", driver="null-co", node_name="sq", size=SIZE)
            assert r["error"]["desc"] == "Duplicate nodes with node-name='sq'", r
            d.blockdev_add(driver="null-co", node_name="n2", size=SIZE)
            d.ok("blockdev-del", node_name="other")
            stall.cont()
            assert m.reply(timeout=30) == {"return": {}}
        sq = next(n for n in d.nodes() if n["node-name"] == "sq")
        assert sq["ro"] is False
        d.node_io("sq", "write -P 0x6b 64k 64k")
        d.ok("blockdev-del", node_name="sq")
        d.ok("blockdev-del", node_name="sf")
        iotests.qemu_img("check", str(stall.path))
        out = iotests.qemu_io("-f", "qcow2", str(stall.path), "-c", "read -P 0x5a 0 64k",
                              "-c", "read -P 0x6b 64k 64k")
        assert "verification failed" not in out and "error" not in out.lower(), out
    finally:
        stall.close()


def test_a_refused_entry_puts_the_read_only_switch_before_it_back(make_daemon, tmp_path):
    imgs = {n: iotests.create_image(tmp_path / f"{n}.qcow2", SIZE, "qcow2") for n in ("a", "b")}
    d = data_nbd.ready(make_daemon())
    data_nbd.start_unix_server(d)
    for n, img in imgs.items():
        d.blockdev_add(driver="file", node_name=f"{n}f", filename=str(img))
        d.blockdev_add(driver="qcow2", node_name=n, file=f"{n}f")
    d.ok("block-dirty-bitmap-add", node="a", name="ba", persistent=True)
    data_nbd.node_io(d, "a", "write -P 0x11 0 64k")
    data_nbd.export(d, "b", "w", "w", writable=True)

    opts = [{"driver": "qcow2", "node-name": n, "file": f"{n}f", "read-only": True} for n in ("a", "b")]
    err = d.err("blockdev-reopen", options=opts)

    assert err == {"class": "GenericError",
                   "desc": "Read-only block node 'b' cannot support read-write users"}
    assert d.node("a")["ro"] is False
    if iotests.is_qsd():
        # QEMU 10 leaves a's persistent bitmap read-only after the aborted switch: its writes
        # fail until it is reopened. blockd gives the bitmap back with the write access.
        out = data_nbd.node_io(d, "a", "write -P 0x22 64k 64k", check=False)
        assert "write failed: Operation not permitted" in out, out
        d.ok("blockdev-reopen", options=opts[:1])
        d.ok("blockdev-reopen", options=[{**opts[0], "read-only": False}])
    data_nbd.node_io(d, "a", "write -P 0x22 64k 64k")
    # a holds its write lock again: another writer is refused.
    out = iotests.qemu_io("-f", "qcow2", str(imgs["a"]), "-c", "read 0 512", check=False)
    assert 'Failed to get "write" lock' in out, out
    bitmaps = [b["name"] for b in d.node("a")["dirty-bitmaps"]]
    assert bitmaps == ["ba"], bitmaps
    assert d.shutdown() == 0
    data_nbd.image_check(imgs["a"])
    out = iotests.qemu_io("-f", "qcow2", str(imgs["a"]), "-c", "read -P 0x11 0 64k",
                          "-c", "read -P 0x22 64k 64k")
    assert "verification failed" not in out, out
    info = iotests.qemu_img("info", str(imgs["a"]))
    assert "ba" in info and "in-use" not in info, info


def test_a_node_opened_read_only_goes_read_write_and_back(make_daemon, tmp_path):
    img = iotests.create_image(tmp_path / "r.qcow2", SIZE, "qcow2")
    d = data_nbd.ready(make_daemon())
    data_nbd.start_unix_server(d)
    d.blockdev_add(driver="qcow2", node_name="r", read_only=True,
                   file={"driver": "file", "filename": str(img)})
    # Its file child was opened inline (read-only, auto-named): it follows the reopen.
    fnode = next(n["node-name"] for n in d.nodes() if n["drv"] == "file" and n["file"] == str(img))
    opts = {"driver": "qcow2", "node-name": "r", "file": fnode}
    ro = d.node("r")
    assert ro["ro"] is True

    d.ok("blockdev-reopen", options=[{**opts, "read-only": False}])

    assert d.node("r")["ro"] is False
    data_nbd.node_io(d, "r", "write -P 0x77 0 64k")
    out = iotests.qemu_io("-f", "qcow2", str(img), "-c", "read 0 512", check=False)
    assert 'Failed to get "write" lock' in out, out
    d.ok("blockdev-reopen", options=[{**opts, "read-only": True}])
    assert d.node("r")["ro"] is True
    out = iotests.qemu_io("-r", "-U", "-f", "qcow2", str(img), "-c", "read -P 0x77 0 64k")
    assert "verification failed" not in out, out
    assert d.shutdown() == 0
    data_nbd.image_check(img)

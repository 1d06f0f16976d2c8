"""blockd opens the files of a `blockdev-add` without holding the graph lock: an add stalled
in the middle of its tree (a backing file that is a FIFO nobody writes to yet) leaves other
monitors' graph commands answering, keeps its node-name reserved and the existing node it names
pinned. blockd-only: QSD runs every command under one lock and would hang here as well."""

from __future__ import annotations

import json
import os
import signal
import time

import iotests
from backup_helpers import MiB, qcow2

SIZE = 4 * MiB


@iotests.blockd_only
def test_a_stalled_blockdev_add_does_not_block_other_graph_commands(make_daemon, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    img = qcow2(tmp_path / "a.qcow2", SIZE)
    d = make_daemon(monitors=2)
    d.blockdev_add(driver="file", node_name="af", filename=str(img))
    d.blockdev_add(driver="null-co", node_name="other", size=SIZE)
    with iotests.RawQmp(d.monitor_paths[1]) as m:
        m.greeting()
        assert m.negotiate() == {"return": {}}
        m.send(json.dumps({"execute": "blockdev-add", "arguments": {
            "driver": "qcow2", "node-name": "slow", "read-only": True, "file": "af",
            "backing": {"driver": "raw", "read-only": True,
                        "file": {"driver": "file", "read-only": True, "filename": str(fifo)}}}}))
        time.sleep(2)  # the add reaches the FIFO's open(2) and waits there
        assert m.no_message(), "the add did not stall"
        # Each answers within the QMP timeout although the add is still opening files.
        names = {n["node-name"] for n in d.nodes()}
        assert names == {"af", "other"}
        r = d.cmd("blockdev-add", driver="null-co", node_name="slow", size=SIZE)
        assert r["error"]["desc"] == "Duplicate nodes with node-name='slow'", r
        d.blockdev_add(driver="null-co", node_name="n2", size=SIZE)
        d.ok("blockdev-del", node_name="other")
        r = d.cmd("blockdev-del", node_name="af")
        assert r["error"]["desc"] == "Node af is in use", r
        # Let the open go on: a writer that writes nothing (an empty raw backing).
        os.close(os.open(fifo, os.O_WRONLY))
        assert m.reply() == {"return": {}}
    slow = next(n for n in d.nodes() if n["node-name"] == "slow")
    assert slow["backing_file"] == str(fifo)
    assert {n["node-name"] for n in d.nodes()} >= {"af", "n2", "slow"}
    r = d.cmd("blockdev-del", node_name="af")
    assert r["error"]["desc"] == "Block device af is in use", r
    d.ok("blockdev-del", node_name="slow")
    d.ok("blockdev-del", node_name="af")
    iotests.qemu_img("check", str(img))


@iotests.blockd_only
def test_a_delete_with_a_stalled_flush_does_not_block_other_graph_commands(make_daemon, tmp_path):
    """blockdev-del stores and flushes without the graph lock (and off the command lock): a
    flush that hangs (a FUSE-served file whose server is stopped) leaves the other monitors'
    commands answering; the delete then completes and the file is closed."""
    from test_fleecing import StallableFile

    stall = StallableFile(tmp_path, SIZE)
    try:
        d = make_daemon(monitors=2)
        d.blockdev_add(driver="file", node_name="sf", filename=str(stall.path))
        d.blockdev_add(driver="null-co", node_name="other", size=SIZE)
        d.node_io("sf", "write -P 0x5a 0 64k")
        stall.stop()
        with iotests.RawQmp(d.monitor_paths[1]) as m:
            m.greeting()
            assert m.negotiate() == {"return": {}}
            m.send(json.dumps({"execute": "blockdev-del", "arguments": {"node-name": "sf"}}))
            time.sleep(2)  # the delete reaches fsync(2) and waits there
            assert m.no_message(), "the delete did not stall"
            # Each answers within the QMP timeout although the delete is still flushing.
            # (Not query-named-block-nodes: it stats every node's file, and a stat of the
            # stopped FUSE file hangs in the kernel whoever asks; the Rust test
            # close::del_does_not_hold_the_graph_over_a_flush lists the graph meanwhile.)
            assert d.ok("query-block") == []
            r = d.cmd("blockdev-add", driver="null-co", node_name="sf", size=SIZE)
            assert r["error"]["desc"] == "Duplicate nodes with node-name='sf'", r
            d.blockdev_add(driver="null-co", node_name="n2", size=SIZE)
            d.ok("blockdev-del", node_name="other")
            stall.cont()
            assert m.reply(timeout=30) == {"return": {}}
        assert {n["node-name"] for n in d.nodes()} == {"n2"}
        # Closed when blockdev-del returned: blockd holds no descriptor of it any more.
        fds = [os.readlink(f"/proc/{d.proc.pid}/fd/{f}") for f in os.listdir(f"/proc/{d.proc.pid}/fd")]
        assert str(stall.path) not in fds, fds
        iotests.qemu_img("info", str(stall.path))
        with open(stall.path, "rb") as f:
            assert f.read(65536) == b"\x5a" * 65536
    finally:
        stall.close()


@iotests.blockd_only
def test_sigterm_during_a_stalled_blockdev_add_closes_its_node(make_daemon, tmp_path):
    """Shutdown refuses new adds, waits for one still opening files and closes its nodes with
    the rest: after exit the image's bitmap is stored, not in use, and the image is clean."""
    from test_startup_signals import _bitmap_flags

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    img = qcow2(tmp_path / "a.qcow2", SIZE)
    iotests.qemu_img("bitmap", "--add", str(img), "b0")
    d = make_daemon(monitors=2)
    with iotests.RawQmp(d.monitor_paths[1]) as m:
        m.greeting()
        assert m.negotiate() == {"return": {}}
        m.send(json.dumps({"execute": "blockdev-add", "arguments": {
            "driver": "qcow2", "node-name": "q",
            "file": {"driver": "file", "filename": str(img)},
            "backing": {"driver": "raw", "read-only": True,
                        "file": {"driver": "file", "read-only": True, "filename": str(fifo)}}}}))
        time.sleep(2)  # the add reaches the FIFO's open(2) and waits there
        assert m.no_message(), "the add did not stall"
        d.signal(signal.SIGTERM)
        time.sleep(0.3)
        os.close(os.open(fifo, os.O_WRONLY))
        assert d.wait_exit() == 0, d.log()
    assert _bitmap_flags(img) == [("b0", ["auto"])]
    iotests.qemu_img("check", str(img))

"""blockd opens the files of a `blockdev-add` without holding the graph lock: an add stalled
in the middle of its tree (a backing file that is a FIFO nobody writes to yet) leaves other
monitors' graph commands answering, keeps its node-name reserved and the existing node it names
pinned. blockd-only: QSD runs every command under one lock and would hang here as well."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

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
    from fleece_helpers import StallableFile

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


@iotests.blockd_only
@pytest.mark.parametrize("in_transaction", [False, True])
def test_a_stalled_snapshot_sync_overlay_open_does_not_block_other_graph_commands(
        make_daemon, tmp_path, in_transaction):
    """blockdev-snapshot-sync (alone or as a transaction action) opens its overlay as a staged
    blockdev-add does: while the overlay's open(2) waits (a FIFO nobody writes to yet) other
    monitors' blockdev-add and blockdev-del (the graph commands that run beside the one-at-a-
    time monitor commands) answer and the overlay's node-name is reserved; the overlay,
    refused once open (raw has no backing), is closed again and the graph is as before."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    img = qcow2(tmp_path / "a.qcow2", SIZE)
    d = make_daemon(monitors=2)
    d.blockdev_add(driver="qcow2", node_name="base", read_only=True,
                   file={"driver": "file", "node-name": "bf", "read-only": True,
                         "filename": str(img)})
    d.blockdev_add(driver="null-co", node_name="other", size=SIZE)
    with iotests.RawQmp(d.monitor_paths[1]) as m:
        m.greeting()
        assert m.negotiate() == {"return": {}}
        snap = {"node-name": "base", "snapshot-file": str(fifo), "snapshot-node-name": "ov",
                "format": "raw", "mode": "existing"}
        if in_transaction:
            m.send(json.dumps({"execute": "transaction", "arguments": {"actions": [
                {"type": "block-dirty-bitmap-add",
                 "data": {"node": "other", "name": "tb"}},
                {"type": "blockdev-snapshot-sync", "data": snap}]}}))
        else:
            m.send(json.dumps({"execute": "blockdev-snapshot-sync", "arguments": snap}))
        time.sleep(2)  # the overlay's open reaches the FIFO's open(2) and waits there
        assert m.no_message(), "the snapshot did not stall"
        # Each answers within the QMP timeout although the overlay is still opening.
        r = d.cmd("blockdev-add", driver="null-co", node_name="ov", size=SIZE)
        assert r["error"]["desc"] == "Duplicate nodes with node-name='ov'", r
        d.blockdev_add(driver="null-co", node_name="n2", size=SIZE)
        d.ok("blockdev-del", node_name="n2")
        os.close(os.open(fifo, os.O_WRONLY))
        r = m.reply(timeout=30)
        assert r["error"]["desc"] == "The overlay does not support backing images", r
    assert {n["node-name"] for n in d.nodes()} == {"base", "bf", "other"}
    # The transaction's bitmap was added and taken out again.
    assert [b["name"] for n in d.nodes() for b in n.get("dirty-bitmaps", [])] == []
    # The refused overlay is closed: blockd holds no descriptor of the FIFO.
    fds = [os.readlink(f"/proc/{d.proc.pid}/fd/{f}") for f in os.listdir(f"/proc/{d.proc.pid}/fd")]
    assert str(fifo) not in fds, fds
    d.blockdev_add(driver="null-co", node_name="ov", size=SIZE)
    d.ok("blockdev-del", node_name="base")
    iotests.qemu_img("check", str(img))


@iotests.blockd_only
def test_a_transaction_bitmap_action_holds_its_node_until_the_transaction_ends(
        make_daemon, tmp_path):
    """A prepared bitmap action of a transaction holds its node, as the plain bitmap commands
    do: a blockdev-del of that node from another monitor, sent while a later action of the
    transaction is stalled (its overlay's open(2) on a FIFO), waits until the transaction
    ended (here: aborted, the cleared bits put back on the node still open) and then
    deletes it."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    img = qcow2(tmp_path / "a.qcow2", SIZE)
    bimg = qcow2(tmp_path / "b.qcow2", SIZE)
    d = make_daemon(monitors=3)
    d.blockdev_add(driver="qcow2", node_name="q",
                   file={"driver": "file", "filename": str(img)})
    d.ok("block-dirty-bitmap-add", node="q", name="b", persistent=True)
    d.node_io("q", "write -P 0x11 0 64k")
    d.blockdev_add(driver="qcow2", node_name="base", read_only=True,
                   file={"driver": "file", "node-name": "bf", "read-only": True,
                         "filename": str(bimg)})
    with iotests.RawQmp(d.monitor_paths[1]) as m, iotests.RawQmp(d.monitor_paths[2]) as m2:
        for c in (m, m2):
            c.greeting()
            assert c.negotiate() == {"return": {}}
        m.send(json.dumps({"execute": "transaction", "arguments": {"actions": [
            {"type": "block-dirty-bitmap-clear", "data": {"node": "q", "name": "b"}},
            {"type": "blockdev-snapshot-sync", "data": {
                "node-name": "base", "snapshot-file": str(fifo),
                "snapshot-node-name": "ov", "format": "raw", "mode": "existing"}}]}}))
        time.sleep(2)  # the clear is prepared; the overlay's open waits on the FIFO
        assert m.no_message(), "the transaction did not stall"
        m2.send(json.dumps({"execute": "blockdev-del", "arguments": {"node-name": "q"}}))
        time.sleep(1)
        assert m2.no_message(), "blockdev-del did not wait for the transaction's hold"
        os.close(os.open(fifo, os.O_WRONLY))
        r = m.reply(timeout=30)
        assert r["error"]["desc"] == "The overlay does not support backing images", r
        assert m2.reply(timeout=30) == {"return": {}}
    assert {n["node-name"] for n in d.nodes()} == {"base", "bf"}
    iotests.qemu_img("check", str(img))
    # The abort put the cleared bits back before the delete stored the bitmap.
    d.blockdev_add(driver="qcow2", node_name="q",
                   file={"driver": "file", "filename": str(img)})
    q = next(n for n in d.nodes() if n["node-name"] == "q")
    assert [(b["name"], b["count"]) for b in q["dirty-bitmaps"]] == [("b", 65536)], q


@iotests.blockd_only
def test_an_aborted_snapshot_sync_closes_its_overlay_without_the_graph_lock(
        make_daemon, tmp_path):
    """A transaction's abort takes the overlay its blockdev-snapshot-sync opened out under the
    graph lock and closes it after: while that close's flush hangs (a FUSE-served image whose
    server is stopped), another monitor's blockdev-add and blockdev-del answer."""
    from fleece_helpers import StallableFile

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    img = qcow2(tmp_path / "a.qcow2", SIZE)
    bimg = qcow2(tmp_path / "b.qcow2", SIZE)
    src = qcow2(tmp_path / "ov-src.qcow2", SIZE)
    stall = StallableFile(tmp_path, SIZE)
    try:
        with open(stall.path, "r+b") as f:
            f.write(src.read_bytes())
        d = make_daemon(monitors=2)
        d.blockdev_add(driver="qcow2", node_name="base",
                       file={"driver": "file", "node-name": "bf", "filename": str(img)})
        d.blockdev_add(driver="qcow2", node_name="base2", read_only=True,
                       file={"driver": "file", "node-name": "bf2", "read-only": True,
                             "filename": str(bimg)})
        with iotests.RawQmp(d.monitor_paths[1]) as m:
            m.greeting()
            assert m.negotiate() == {"return": {}}
            m.send(json.dumps({"execute": "transaction", "arguments": {"actions": [
                {"type": "blockdev-snapshot-sync", "data": {
                    "node-name": "base", "snapshot-file": str(stall.path),
                    "snapshot-node-name": "ov", "format": "qcow2", "mode": "existing"}},
                {"type": "blockdev-snapshot-sync", "data": {
                    "node-name": "base2", "snapshot-file": str(fifo),
                    "snapshot-node-name": "ov2", "format": "raw", "mode": "existing"}}]}}))
            time.sleep(2)  # "ov" is in place; "ov2"'s open waits on the FIFO
            assert m.no_message(), "the transaction did not stall"
            stall.stop()
            os.close(os.open(fifo, os.O_WRONLY))  # "ov2" is refused: the abort begins
            time.sleep(1)  # the abort's close of "ov" flushes to the stopped server
            assert m.no_message(), "the overlay's close did not stall"
            d.blockdev_add(driver="null-co", node_name="n2", size=SIZE)
            d.ok("blockdev-del", node_name="n2")
            stall.cont()
            r = m.reply(timeout=30)
            assert r["error"]["desc"] == "The overlay does not support backing images", r
        assert {n["node-name"] for n in d.nodes()} == {"base", "bf", "base2", "bf2"}
        fds = [os.readlink(f"/proc/{d.proc.pid}/fd/{f}")
               for f in os.listdir(f"/proc/{d.proc.pid}/fd")]
        assert str(stall.path) not in fds, fds
        d.ok("blockdev-del", node_name="base")
        d.ok("blockdev-del", node_name="base2")
    finally:
        stall.close()
    iotests.qemu_img("check", str(img))

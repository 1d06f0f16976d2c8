"""blockd runs `blockdev-snapshot-sync`, `blockdev-snapshot` and `blockdev-reopen` beside other
monitors' commands (QSD runs every command under one lock): while one of them waits on a disk
(a FUSE-served file whose server is stopped), other monitors' commands answer, and the stalled
command then completes as it would have alone. Two snapshots of one base sent at once from two
monitors run one after the other: one wins, the other gets QEMU's error and creates no file.
blockd-only: QSD would hang in the stalls."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import iotests
from backup_helpers import MiB, qcow2
from fleece_helpers import StallableFile

SIZE = 4 * MiB


def _monitor(d, i: int) -> iotests.RawQmp:
    m = iotests.RawQmp(d.monitor_paths[i])
    m.greeting()
    assert m.negotiate() == {"return": {}}
    return m


def _others_answer(d) -> None:
    """Commands of another monitor that answer while a graph command is stalled: each within
    the QMP timeout (the harness's client fails otherwise)."""
    assert "qemu" in d.ok("query-version")
    assert d.ok("query-block") == []
    d.ok("block-dirty-bitmap-add", node="other", name="meanwhile")
    # (Not query-named-block-nodes: it stats every node's file, and a stat of a stopped
    # FUSE file hangs in the kernel whoever asks.)
    assert d.ok("x-debug-block-dirty-bitmap-sha256", node="other", name="meanwhile")["sha256"]
    d.ok("block-dirty-bitmap-remove", node="other", name="meanwhile")


def _stall_qcow2(stall: StallableFile, src: Path) -> None:
    """Put a qcow2 image into the FUSE-served file."""
    with open(stall.path, "r+b") as f:
        f.write(src.read_bytes())


def _daemon_over_stall(make_daemon, stall, tmp_path, monitors, pattern, bitmaps=("b",),
                       file_node=None):
    """A daemon with `monitors` monitors, a qcow2 `q` over the FUSE-served file (its file node
    named `file_node` if given), a null `other`, persistent `bitmaps` on `q` and 64 KiB of
    `pattern` written at 0."""
    _stall_qcow2(stall, qcow2(tmp_path / "src.qcow2", SIZE))
    d = make_daemon(monitors=monitors)
    file = {"driver": "file", "filename": str(stall.path)}
    if file_node:
        file["node-name"] = file_node
    d.blockdev_add(driver="qcow2", node_name="q", file=file)
    d.blockdev_add(driver="null-co", node_name="other", size=SIZE)
    for b in bitmaps:
        d.ok("block-dirty-bitmap-add", node="q", name=b, persistent=True)
    d.node_io("q", f"write -P {pattern} 0 64k")
    return d


def _export(d, node: str) -> None:
    """An NBD export on `node`: a user that follows it onto an overlay, so the overlay stays."""
    d.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(d.sock("nbd"))}})
    d.ok("block-export-add", type="nbd", id="e", node_name=node)


def _named_nodes(d) -> set:
    """The nodes given a name (not the auto-named file children)."""
    return {n["node-name"] for n in d.nodes() if not n["node-name"].startswith("#")}


def _exported_node(d) -> str:
    return d.ok("query-block-exports")[0]["node-name"]


@iotests.blockd_only
def test_a_stalled_snapshot_sync_leaves_other_monitors_answering(make_daemon, tmp_path):
    """The overlay's open hangs (its file's server is stopped): another monitor's
    query-version, query-block and bitmap commands answer meanwhile; once the server runs
    again the snapshot completes: the export follows the overlay, the base is read-only,
    data written through the overlay lands in the overlay."""
    img = qcow2(tmp_path / "base.qcow2", SIZE)
    stall = StallableFile(tmp_path, SIZE)
    try:
        _stall_qcow2(stall, qcow2(tmp_path / "ov-src.qcow2", SIZE))
        d = make_daemon(monitors=2)
        d.blockdev_add(driver="qcow2", node_name="base",
                       file={"driver": "file", "filename": str(img)})
        d.blockdev_add(driver="null-co", node_name="other", size=SIZE)
        d.node_io("base", "write -P 0x11 0 64k")
        _export(d, "base")
        stall.stop()
        with _monitor(d, 1) as m:
            m.send(json.dumps({"execute": "blockdev-snapshot-sync", "arguments": {
                "node-name": "base", "snapshot-file": str(stall.path),
                "snapshot-node-name": "ov", "format": "qcow2", "mode": "existing"}}))
            time.sleep(2)  # the overlay's open reads its header from the stopped server
            assert m.no_message(), "the snapshot did not stall"
            _others_answer(d)
            # Its overlay's node-name is reserved meanwhile.
            r = d.cmd("blockdev-add", driver="null-co", node_name="ov", size=SIZE)
            assert r["error"]["desc"] == "Duplicate nodes with node-name='ov'", r
            stall.cont()
            assert m.reply(timeout=30) == {"return": {}}
        assert _exported_node(d) == "ov"
        nodes = {n["node-name"]: n for n in d.nodes()}
        assert nodes["base"]["ro"] is True
        assert nodes["ov"]["backing_file"] == str(img)
        d.node_io("ov", "write -P 0x22 64k 64k")
        out = d.node_io("ov", "read -P 0x11 0 64k", "read -P 0x22 64k 64k")
        assert "Pattern verification failed" not in out, out
        d.ok("block-export-del", id="e")
        d.ok("blockdev-del", node_name="ov")
        d.ok("blockdev-del", node_name="base")
        iotests.qemu_img("check", str(stall.path))
        # The overlay's write is in the overlay, not in the base.
        iotests.qemu_io("-f", "qcow2", "-c", "read -P 0 64k 64k", str(img))
    finally:
        stall.close()
    iotests.qemu_img("check", str(img))


@iotests.blockd_only
def test_a_stalled_snapshot_flush_leaves_other_monitors_answering(make_daemon, tmp_path):
    """blockdev-snapshot flushes its base without the graph lock and beside other commands:
    a flush that hangs leaves another monitor's commands answering; then the overlay is in
    place and the base read-only."""
    stall = StallableFile(tmp_path, SIZE)
    try:
        _stall_qcow2(stall, qcow2(tmp_path / "base-src.qcow2", SIZE))
        ov = qcow2(tmp_path / "ov.qcow2", SIZE)
        d = make_daemon(monitors=2)
        d.blockdev_add(driver="qcow2", node_name="base",
                       file={"driver": "file", "filename": str(stall.path)})
        d.blockdev_add(driver="qcow2", node_name="ov", backing=None,
                       file={"driver": "file", "filename": str(ov)})
        d.blockdev_add(driver="null-co", node_name="other", size=SIZE)
        d.node_io("base", "write -P 0x33 0 64k")
        _export(d, "base")
        stall.stop()
        with _monitor(d, 1) as m:
            m.send(json.dumps({"execute": "blockdev-snapshot",
                               "arguments": {"node": "base", "overlay": "ov"}}))
            time.sleep(2)  # the base's flush waits for the stopped server
            assert m.no_message(), "the snapshot did not stall"
            _others_answer(d)
            stall.cont()
            assert m.reply(timeout=30) == {"return": {}}
        assert _exported_node(d) == "ov"
        nodes = {n["node-name"]: n for n in d.nodes()}
        assert nodes["base"]["ro"] is True
        out = d.node_io("ov", "read -P 0x33 0 64k")
        assert "Pattern verification failed" not in out, out
        d.ok("block-export-del", id="e")
        d.ok("blockdev-del", node_name="ov")
        d.ok("blockdev-del", node_name="base")
        iotests.qemu_img("check", str(stall.path))
        iotests.qemu_io("-f", "qcow2", "-c", "read -P 0x33 0 64k", str(stall.path))
    finally:
        stall.close()
    iotests.qemu_img("check", str(ov))


@iotests.blockd_only
def test_a_stalled_reopen_leaves_other_monitors_answering(make_daemon, tmp_path):
    """blockdev-reopen to read-only stores the node's persistent bitmap and flushes it without
    the graph lock and beside other commands: while that hangs, another monitor's commands
    answer; then the node is read-only, its data and bitmap on disk."""
    stall = StallableFile(tmp_path, SIZE)
    try:
        d = _daemon_over_stall(make_daemon, stall, tmp_path, 2, "0x44", file_node="qf")
        stall.stop()
        with _monitor(d, 1) as m:
            m.send(json.dumps({"execute": "blockdev-reopen", "arguments": {"options": [{
                "driver": "qcow2", "node-name": "q", "read-only": True,
                "file": "qf"}]}}))
            time.sleep(2)  # the bitmap's store waits for the stopped server
            assert m.no_message(), "the reopen did not stall"
            _others_answer(d)
            stall.cont()
            assert m.reply(timeout=30) == {"return": {}}
        nodes = {n["node-name"]: n for n in d.nodes()}
        assert nodes["q"]["ro"] is True
        r = d.cmd("human-monitor-command", {"command-line": 'qemu-io q "write 0 512"'})
        assert r == {"return": "write failed: Operation not permitted\r\n"}, r
        out = d.node_io("q", "read -P 0x44 0 64k")
        assert "Pattern verification failed" not in out, out
        assert [(b["name"], b["count"]) for b in d.bitmaps("q")] == [("b", 65536)]
        d.ok("blockdev-del", node_name="q")
        iotests.qemu_img("check", str(stall.path))
        info = json.loads(iotests.qemu_img("info", "--output=json", str(stall.path)))
        bitmaps = info["format-specific"]["data"]["bitmaps"]
        assert [(b["name"], b["flags"]) for b in bitmaps] == [("b", ["auto"])], bitmaps
    finally:
        stall.close()


@iotests.blockd_only
def test_a_snapshot_of_a_base_being_snapshotted_waits_and_gets_qemus_error(
        make_daemon, tmp_path):
    """Two blockdev-snapshot-sync of one base from two monitors: the second, sent while the
    first's overlay open hangs, waits for it (it does not snapshot the base beside it), then
    finds the base busy with QEMU's error and creates no file."""
    img = qcow2(tmp_path / "base.qcow2", SIZE)
    ov2 = tmp_path / "ov2.qcow2"
    stall = StallableFile(tmp_path, SIZE)
    try:
        _stall_qcow2(stall, qcow2(tmp_path / "ov-src.qcow2", SIZE))
        d = make_daemon(monitors=3)
        d.blockdev_add(driver="qcow2", node_name="base",
                       file={"driver": "file", "filename": str(img)})
        d.blockdev_add(driver="null-co", node_name="other", size=SIZE)
        _export(d, "base")
        stall.stop()
        with _monitor(d, 1) as m1, _monitor(d, 2) as m2:
            m1.send(json.dumps({"execute": "blockdev-snapshot-sync", "arguments": {
                "node-name": "base", "snapshot-file": str(stall.path),
                "snapshot-node-name": "ov1", "format": "qcow2", "mode": "existing"}}))
            time.sleep(2)
            assert m1.no_message(), "the first snapshot did not stall"
            m2.send(json.dumps({"execute": "blockdev-snapshot-sync", "arguments": {
                "node-name": "base", "snapshot-file": str(ov2),
                "snapshot-node-name": "ov2"}}))
            time.sleep(1)
            assert m2.no_message(), "the second snapshot did not wait for the first"
            assert not ov2.exists()
            _others_answer(d)
            stall.cont()
            assert m1.reply(timeout=30) == {"return": {}}
            r = m2.reply(timeout=30)
            assert r["error"] == {
                "class": "GenericError",
                "desc": "Node 'base' is busy: node is used as backing hd of 'ov1'"}, r
        assert not ov2.exists()
        assert _exported_node(d) == "ov1"
        assert _named_nodes(d) == {"base", "ov1", "other"}
        d.ok("block-export-del", id="e")
        d.ok("blockdev-del", node_name="ov1")
        iotests.qemu_img("check", str(stall.path))
    finally:
        stall.close()
    iotests.qemu_img("check", str(img))


@iotests.blockd_only
def test_two_snapshots_of_one_base_sent_at_once_one_wins(make_daemon, tmp_path):
    """Sent at the same instant from two monitors (no stall): exactly one snapshot wins; the
    other gets QEMU's busy error naming the winner's overlay and leaves no file; the winner's
    overlay is a clean qcow2 over the base. Repeated to give the race its chances."""
    d = make_daemon(monitors=3)
    for round_ in range(5):
        img = qcow2(tmp_path / f"base{round_}.qcow2", SIZE)
        files = [tmp_path / f"r{round_}-ov{i}.qcow2" for i in (1, 2)]
        d.blockdev_add(driver="qcow2", node_name="base",
                       file={"driver": "file", "filename": str(img)})
        _export(d, "base")
        mons = [_monitor(d, 1), _monitor(d, 2)]
        try:
            barrier = threading.Barrier(2)
            replies = [None, None]

            def snap(i: int) -> None:
                barrier.wait()
                mons[i].send(json.dumps({"execute": "blockdev-snapshot-sync", "arguments": {
                    "node-name": "base", "snapshot-file": str(files[i]),
                    "snapshot-node-name": f"ov{i + 1}"}}))
                replies[i] = mons[i].reply(timeout=30)

            threads = [threading.Thread(target=snap, args=(i,)) for i in (0, 1)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            for m in mons:
                m.close()
        won = [i for i in (0, 1) if replies[i] == {"return": {}}]
        assert len(won) == 1, replies
        w, lost = won[0], 1 - won[0]
        assert replies[lost]["error"]["desc"] == (
            f"Node 'base' is busy: node is used as backing hd of 'ov{w + 1}'"), replies
        assert not files[lost].exists()
        assert _exported_node(d) == f"ov{w + 1}"
        assert _named_nodes(d) == {"base", f"ov{w + 1}"}
        d.ok("nbd-server-stop")
        d.ok("blockdev-del", node_name=f"ov{w + 1}")
        d.ok("blockdev-del", node_name="base")
        iotests.qemu_img("check", str(files[w]))
        info = json.loads(iotests.qemu_img("info", "--output=json", str(files[w])))
        assert info["backing-filename"] == str(img), info
        iotests.qemu_img("check", str(img))


@iotests.blockd_only
def test_a_stalled_persistent_bitmap_removal_leaves_other_monitors_answering(
        make_daemon, tmp_path):
    """block-dirty-bitmap-remove of a persistent bitmap deletes it from the image at once:
    while that write hangs, another monitor's commands (bitmap commands on another node
    included) answer; then the bitmap is gone, from the node and from the image."""
    stall = StallableFile(tmp_path, SIZE)
    try:
        d = _daemon_over_stall(make_daemon, stall, tmp_path, 2, "0x55", bitmaps=("b", "keep"))
        d.node_io("q", "flush")  # stores both bitmaps (a checkpoint at flush)
        stall.stop()
        with _monitor(d, 1) as m:
            m.send(json.dumps({"execute": "block-dirty-bitmap-remove",
                               "arguments": {"node": "q", "name": "b"}}))
            time.sleep(2)  # the removal's write waits for the stopped server
            assert m.no_message(), "the removal did not stall"
            _others_answer(d)
            stall.cont()
            assert m.reply(timeout=30) == {"return": {}}
        assert [b["name"] for b in d.bitmaps("q")] == ["keep"]
        d.ok("blockdev-del", node_name="q")
        iotests.qemu_img("check", str(stall.path))
        info = json.loads(iotests.qemu_img("info", "--output=json", str(stall.path)))
        bitmaps = info["format-specific"]["data"]["bitmaps"]
        assert [b["name"] for b in bitmaps] == ["keep"], bitmaps
    finally:
        stall.close()


@iotests.blockd_only
def test_a_bitmap_command_on_a_node_being_reopened_waits_for_the_reopen(make_daemon, tmp_path):
    """A bitmap command on the node a stalled blockdev-reopen switches to read-only does not
    slip in between the reopen's store and its switch: it waits, then answers as it would
    after the reopen (a persistent bitmap cannot be added to a read-only node)."""
    stall = StallableFile(tmp_path, SIZE)
    try:
        d = _daemon_over_stall(make_daemon, stall, tmp_path, 3, "0x66", file_node="qf")
        stall.stop()
        with _monitor(d, 1) as m1, _monitor(d, 2) as m2:
            m1.send(json.dumps({"execute": "blockdev-reopen", "arguments": {"options": [{
                "driver": "qcow2", "node-name": "q", "read-only": True, "file": "qf"}]}}))
            time.sleep(2)
            assert m1.no_message(), "the reopen did not stall"
            m2.send(json.dumps({"execute": "block-dirty-bitmap-add", "arguments": {
                "node": "q", "name": "late", "persistent": True}}))
            time.sleep(1)
            assert m2.no_message(), "the bitmap command did not wait for the reopen"
            _others_answer(d)
            stall.cont()
            assert m1.reply(timeout=30) == {"return": {}}
            r = m2.reply(timeout=30)
            assert r["error"]["desc"] == (
                "Can't make bitmap 'late' persistent in 'q': Image is read-only"), r
        assert [b["name"] for b in d.bitmaps("q")] == ["b"]
        d.ok("blockdev-del", node_name="q")
        iotests.qemu_img("check", str(stall.path))
    finally:
        stall.close()


@iotests.blockd_only
def test_a_reopen_of_a_base_being_snapshotted_comes_after_the_snapshot(make_daemon, tmp_path):
    """While a blockdev-snapshot-sync of `base` is stalled (its overlay's open), a
    blockdev-reopen of `base` from another monitor waits (the snapshot claimed `base`), then
    answers as after the snapshot: `base` is read-only already, and stays the overlay's
    backing."""
    img = qcow2(tmp_path / "base.qcow2", SIZE)
    stall = StallableFile(tmp_path, SIZE)
    try:
        _stall_qcow2(stall, qcow2(tmp_path / "ov-src.qcow2", SIZE))
        d = make_daemon(monitors=3)
        d.blockdev_add(driver="qcow2", node_name="base",
                       file={"driver": "file", "node-name": "bf", "filename": str(img)})
        d.blockdev_add(driver="null-co", node_name="other", size=SIZE)
        d.node_io("base", "write -P 0x77 0 64k")
        _export(d, "base")
        stall.stop()
        with _monitor(d, 1) as m1, _monitor(d, 2) as m2:
            m1.send(json.dumps({"execute": "blockdev-snapshot-sync", "arguments": {
                "node-name": "base", "snapshot-file": str(stall.path),
                "snapshot-node-name": "ov", "format": "qcow2", "mode": "existing"}}))
            time.sleep(2)
            assert m1.no_message(), "the snapshot did not stall"
            m2.send(json.dumps({"execute": "blockdev-reopen", "arguments": {"options": [{
                "driver": "qcow2", "node-name": "base", "read-only": True, "file": "bf"}]}}))
            time.sleep(1)
            assert m2.no_message(), "the reopen did not wait for the snapshot"
            _others_answer(d)
            stall.cont()
            assert m1.reply(timeout=30) == {"return": {}}
            assert m2.reply(timeout=30) == {"return": {}}
        assert _exported_node(d) == "ov"
        nodes = {n["node-name"]: n for n in d.nodes()}
        assert nodes["base"]["ro"] is True
        assert nodes["ov"]["backing_file"] == str(img)
        out = d.node_io("ov", "read -P 0x77 0 64k")
        assert "Pattern verification failed" not in out, out
        d.ok("block-export-del", id="e")
        d.ok("blockdev-del", node_name="ov")
        d.ok("blockdev-del", node_name="base")
        iotests.qemu_img("check", str(stall.path))
    finally:
        stall.close()
    iotests.qemu_img("check", str(img))


@iotests.blockd_only
def test_a_delete_of_a_base_being_snapshotted_comes_after_the_snapshot(make_daemon, tmp_path):
    """A blockdev-del of a base whose blockdev-snapshot-sync is stalled waits (the snapshot
    holds the base), then runs after it: the overlay had no user, so (as QEMU does) it was
    dropped once made and only its file stays, backed by the base's image; the base is then
    free and deleted."""
    img = qcow2(tmp_path / "base.qcow2", SIZE)
    stall = StallableFile(tmp_path, SIZE)
    try:
        _stall_qcow2(stall, qcow2(tmp_path / "ov-src.qcow2", SIZE))
        d = make_daemon(monitors=3)
        d.blockdev_add(driver="qcow2", node_name="base",
                       file={"driver": "file", "node-name": "bf", "filename": str(img)})
        d.blockdev_add(driver="null-co", node_name="other", size=SIZE)
        stall.stop()
        with _monitor(d, 1) as m1, _monitor(d, 2) as m2:
            m1.send(json.dumps({"execute": "blockdev-snapshot-sync", "arguments": {
                "node-name": "base", "snapshot-file": str(stall.path),
                "snapshot-node-name": "ov", "format": "qcow2", "mode": "existing"}}))
            time.sleep(2)
            assert m1.no_message(), "the snapshot did not stall"
            m2.send(json.dumps({"execute": "blockdev-del", "arguments": {"node-name": "base"}}))
            time.sleep(1)
            assert m2.no_message(), ("the delete did not wait for the snapshot", m2.reply())
            _others_answer(d)
            stall.cont()
            assert m1.reply(timeout=30) == {"return": {}}
            assert m2.reply(timeout=30) == {"return": {}}
        assert _named_nodes(d) == {"other"}
        fds = [os.readlink(f"/proc/{d.proc.pid}/fd/{f}")
               for f in os.listdir(f"/proc/{d.proc.pid}/fd")]
        assert str(stall.path) not in fds and str(img) not in fds, fds
        iotests.qemu_img("check", str(stall.path))
    finally:
        stall.close()
    iotests.qemu_img("check", str(img))


@iotests.blockd_only
def test_a_bitmap_command_waits_for_a_transaction_acting_on_its_node(make_daemon, tmp_path):
    """Bitmap commands run beside the serialised ones, but never inside a transaction: one on a
    node a stalled transaction has a bitmap action on waits for the transaction's end (here
    an abort, which takes the added bitmap out again) and then answers as after it; one on
    another node answers meanwhile."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    img = qcow2(tmp_path / "a.qcow2", SIZE)
    bimg = qcow2(tmp_path / "b.qcow2", SIZE)
    d = make_daemon(monitors=3)
    d.blockdev_add(driver="qcow2", node_name="q",
                   file={"driver": "file", "filename": str(img)})
    d.blockdev_add(driver="qcow2", node_name="base", read_only=True,
                   file={"driver": "file", "node-name": "bf", "read-only": True,
                         "filename": str(bimg)})
    d.blockdev_add(driver="null-co", node_name="other", size=SIZE)
    with _monitor(d, 1) as m1, _monitor(d, 2) as m2:
        m1.send(json.dumps({"execute": "transaction", "arguments": {"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "q", "name": "tb"}},
            {"type": "blockdev-snapshot-sync", "data": {
                "node-name": "base", "snapshot-file": str(fifo),
                "snapshot-node-name": "ov", "format": "raw", "mode": "existing"}}]}}))
        time.sleep(2)  # "tb" is added; the overlay's open waits on the FIFO
        assert m1.no_message(), "the transaction did not stall"
        m2.send(json.dumps({"execute": "block-dirty-bitmap-remove",
                            "arguments": {"node": "q", "name": "tb"}}))
        time.sleep(1)
        assert m2.no_message(), ("the removal did not wait for the transaction", m2.reply())
        d.ok("block-dirty-bitmap-add", node="other", name="meanwhile")
        os.close(os.open(fifo, os.O_WRONLY))
        r = m1.reply(timeout=30)
        assert r["error"]["desc"] == "The overlay does not support backing images", r
        assert m2.reply(timeout=30) == {
            "error": {"class": "GenericError", "desc": "Dirty bitmap 'tb' not found"}}
    assert d.bitmaps("q") == []
    assert [b["name"] for b in d.bitmaps("other")] == ["meanwhile"]
    d.ok("blockdev-del", node_name="q")
    iotests.qemu_img("check", str(img))


@iotests.blockd_only
def test_a_stalled_internal_snapshot_leaves_other_monitors_answering(make_daemon, tmp_path):
    """blockdev-snapshot-internal-sync writes the image's snapshot table beside other
    commands: while its writes hang, another monitor's commands answer and a blockdev-del of
    the node waits (the command holds it); then the snapshot is in the image and the delete
    goes through."""
    stall = StallableFile(tmp_path, SIZE)
    try:
        d = _daemon_over_stall(make_daemon, stall, tmp_path, 3, "0x12", bitmaps=())
        stall.stop()
        with _monitor(d, 1) as m1, _monitor(d, 2) as m2:
            m1.send(json.dumps({"execute": "blockdev-snapshot-internal-sync",
                                "arguments": {"device": "q", "name": "s1"}}))
            time.sleep(2)  # the snapshot's writes wait for the stopped server
            assert m1.no_message(), "the snapshot did not stall"
            m2.send(json.dumps({"execute": "blockdev-del", "arguments": {"node-name": "q"}}))
            time.sleep(1)
            assert m2.no_message(), ("the delete did not wait for the snapshot", m2.reply())
            _others_answer(d)
            stall.cont()
            assert m1.reply(timeout=30) == {"return": {}}
            assert m2.reply(timeout=30) == {"return": {}}
        assert _named_nodes(d) == {"other"}
        iotests.qemu_img("check", str(stall.path))
        listed = iotests.qemu_img("snapshot", "-l", str(stall.path))
        assert " s1 " in listed, listed
        iotests.qemu_io("-f", "qcow2", "-c", "read -P 0x12 0 64k", str(stall.path))
    finally:
        stall.close()


@iotests.blockd_only
def test_a_node_a_create_job_writes_cannot_be_deleted(make_daemon, tmp_path):
    """blockdev-create writing a qcow2 into a file node (stalled on a stopped FUSE server)
    holds it in use: a blockdev-del of the node meanwhile is refused with QEMU's "in use"
    (QEMU's create holds a backend on it); once the job has ended the node is deleted."""
    stall = StallableFile(tmp_path, SIZE)
    try:
        d = make_daemon(monitors=2)
        d.blockdev_add(driver="file", node_name="f", filename=str(stall.path))
        stall.stop()
        d.ok("blockdev-create", {"job-id": "c", "options": {
            "driver": "qcow2", "file": "f", "size": SIZE}})
        time.sleep(1)  # the job's first write waits for the stopped server
        assert d.ok("query-jobs")[0]["status"] == "running"
        err = d.err("blockdev-del", node_name="f")
        assert err["desc"] == "Node f is in use", err
        stall.cont()
        d.event_wait("JOB_STATUS_CHANGE", match={"id": "c", "status": "concluded"})
        # (The FUSE export cannot be resized, so the create itself ends in an I/O error; what
        # is checked is that the node stayed in place and usable while it ran.)
        d.ok("job-dismiss", id="c")
        assert "f" in {n["node-name"] for n in d.nodes()}
        d.node_io("f", "write -P 0x5c 0 64k", "read -P 0x5c 0 64k")
        d.ok("blockdev-del", node_name="f")
    finally:
        stall.close()

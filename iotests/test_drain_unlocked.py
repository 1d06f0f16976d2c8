"""Drained sections wait for requests in flight without the graph lock: a re-wiring (a backup
start inserting its filter, a transaction's drain of its backups' sources, blockdev-reopen
changing a child, blockdev-snapshot putting its overlay on) that waits for an export's read
stalled on a slow disk (a FUSE-served file whose server is stopped) leaves other monitors'
graph commands (blockdev-add, blockdev-del) answering; once the read is let go, the command
succeeds, the read returns what it read on the old wiring and the next write goes through the
new one. blockd-only: QSD runs every monitor's commands one at a time, so they would wait there
behind the stalled command.
"""

from __future__ import annotations

import json
import subprocess
import time

import iotests
from backup_helpers import MiB, qcow2

SIZE = 4 * MiB


def _stalled_read(d, stall, node):
    """Export `node`, stop the FUSE server and start a read of a range nobody read yet
    through the export: it waits in the stopped server. Returns (url, reader process)."""
    sock = d.sock("nbd")
    d.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    d.ok("block-export-add", type="nbd", id="e", node_name=node, name="e", writable=True)
    url = f"nbd+unix:///e?socket={sock}"
    stall.stop()
    reader = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "read -P 0 1M 64k", url],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    time.sleep(1)
    assert reader.poll() is None, "the read did not stall"
    return url, reader


def _waits_while_graph_answers(d, stall, reader, command, arguments):
    """Send `command` on the second monitor: it must wait for the stalled read while the
    first monitor's graph commands answer; once the read is let go it succeeds and the read
    returns the zeros it read."""
    with iotests.RawQmp(d.monitor_paths[1]) as m:
        m.greeting()
        assert m.negotiate() == {"return": {}}
        m.send(json.dumps({"execute": command, "arguments": arguments}))
        time.sleep(2)
        assert m.no_message(), f"{command} did not wait for the read in flight"
        d.blockdev_add(driver="null-co", node_name="n2", size=SIZE)
        d.ok("blockdev-del", node_name="n2")
        assert reader.poll() is None, "the read finished while the server was stopped"
        stall.cont()
        assert m.reply(timeout=30) == {"return": {}}
    out, _ = reader.communicate(timeout=30)
    assert reader.returncode == 0 and b"read 65536/65536" in out, out
    assert b"verification failed" not in out, out


@iotests.blockd_only
def test_a_backup_start_over_a_stalled_read_leaves_graph_commands_answering(make_daemon, tmp_path):
    from fleece_helpers import StallableFile

    stall = StallableFile(tmp_path, SIZE)
    reader = None
    try:
        d = make_daemon(monitors=2)
        d.blockdev_add(driver="file", node_name="sf", filename=str(stall.path))
        d.blockdev_add(driver="null-co", node_name="tgt", size=SIZE)
        url, reader = _stalled_read(d, stall, "sf")
        _waits_while_graph_answers(d, stall, reader, "blockdev-backup", {
            "job-id": "j", "device": "sf", "target": "tgt", "sync": "none",
            "filter-node-name": "cbw"})
        # The export is on the filter now; a write through it reaches the file.
        assert any(n["node-name"] == "cbw" for n in d.nodes())
        out = iotests.qemu_io("-f", "raw", "-c", "write -P 0x77 0 64k", url)
        assert "wrote 65536/65536" in out, out
        d.ok("block-job-cancel", device="j")
        d.event_wait("BLOCK_JOB_CANCELLED", match={"device": "j"})
        assert not any(n["node-name"] == "cbw" for n in d.nodes())
        out = iotests.qemu_io("-f", "raw", "-c", "read -P 0x77 0 64k", url)
        assert "read 65536/65536" in out and "verification failed" not in out, out
    finally:
        if reader is not None and reader.poll() is None:
            reader.kill()
            reader.wait()
        stall.close()


@iotests.blockd_only
def test_a_reopen_file_change_over_a_stalled_read_leaves_graph_commands_answering(make_daemon, tmp_path):
    """blockdev-reopen moving a raw node's `file` to another node drains the node: its wait
    for an export's read stalled on the old file runs without the graph lock. The read
    finishes on the old wiring; the next write goes to the new file only."""
    from fleece_helpers import StallableFile

    stall = StallableFile(tmp_path, SIZE)
    r2 = tmp_path / "r2.raw"
    r2.write_bytes(b"\0" * SIZE)
    reader = None
    try:
        d = make_daemon(monitors=2)
        d.blockdev_add(driver="file", node_name="sf", filename=str(stall.path))
        d.blockdev_add(driver="file", node_name="rf2", filename=str(r2))
        d.blockdev_add(driver="raw", node_name="rr", file="sf")
        url, reader = _stalled_read(d, stall, "rr")
        _waits_while_graph_answers(d, stall, reader, "blockdev-reopen", {"options": [
            {"driver": "raw", "node-name": "rr", "file": "rf2"}]})
        out = iotests.qemu_io("-f", "raw", "-c", "write -P 0x77 0 64k", url)
        assert "wrote 65536/65536" in out, out
        rr = d.node("rr")
        assert rr["file"] == str(r2), rr
        with open(r2, "rb") as f:
            assert f.read(65536) == b"\x77" * 65536
        with open(stall.backing, "rb") as f:
            assert f.read(65536) == b"\0" * 65536, "a write went to the old file"
    finally:
        if reader is not None and reader.poll() is None:
            reader.kill()
            reader.wait()
        stall.close()


@iotests.blockd_only
def test_a_transaction_backup_over_a_stalled_read_leaves_graph_commands_answering(make_daemon, tmp_path):
    """A transaction drains its backups' sources first; that wait runs without the graph
    lock too."""
    from fleece_helpers import StallableFile

    stall = StallableFile(tmp_path, SIZE)
    reader = None
    try:
        d = make_daemon(monitors=2)
        d.blockdev_add(driver="file", node_name="sf", filename=str(stall.path))
        d.blockdev_add(driver="null-co", node_name="tgt", size=SIZE)
        url, reader = _stalled_read(d, stall, "sf")
        _waits_while_graph_answers(d, stall, reader, "transaction", {"actions": [
            {"type": "blockdev-backup", "data": {"job-id": "j", "device": "sf", "target": "tgt",
                                                 "sync": "none", "filter-node-name": "cbw"}}]})
        assert any(n["node-name"] == "cbw" for n in d.nodes())
        out = iotests.qemu_io("-f", "raw", "-c", "write -P 0x77 0 64k", url)
        assert "wrote 65536/65536" in out, out
        d.ok("block-job-cancel", device="j")
        d.event_wait("BLOCK_JOB_CANCELLED", match={"device": "j"})
        with open(stall.backing, "rb") as f:
            assert f.read(65536) == b"\x77" * 65536
    finally:
        if reader is not None and reader.poll() is None:
            reader.kill()
            reader.wait()
        stall.close()


@iotests.blockd_only
def test_a_snapshot_over_a_stalled_read_leaves_graph_commands_answering(make_daemon, tmp_path):
    """blockdev-snapshot puts its overlay on in a drained section whose wait (and the base's
    flush) runs without the graph lock; the export then writes into the overlay."""
    from fleece_helpers import StallableFile

    stall = StallableFile(tmp_path, SIZE)
    ov = qcow2(tmp_path / "ov.qcow2", SIZE)
    reader = None
    try:
        d = make_daemon(monitors=2)
        d.blockdev_add(driver="file", node_name="sf", filename=str(stall.path))
        d.blockdev_add(driver="raw", node_name="base", file="sf")
        d.blockdev_add(driver="qcow2", node_name="ov", backing=None,
                       file={"driver": "file", "filename": str(ov)})
        url, reader = _stalled_read(d, stall, "base")
        _waits_while_graph_answers(d, stall, reader, "blockdev-snapshot",
                                   {"node": "base", "overlay": "ov"})
        out = iotests.qemu_io("-f", "raw", "-c", "write -P 0x77 0 64k", url)
        assert "wrote 65536/65536" in out, out
        out = iotests.qemu_io("-f", "raw", "-c", "read -P 0x77 0 64k", url)
        assert "verification failed" not in out, out
        with open(stall.backing, "rb") as f:
            assert f.read(65536) == b"\0" * 65536, "a write went to the base"
        assert d.node("base")["ro"] is True
    finally:
        if reader is not None and reader.poll() is None:
            reader.kill()
            reader.wait()
        stall.close()

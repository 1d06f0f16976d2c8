"""Drained sections wait for requests in flight without the graph lock: a backup start whose
filter insertion waits for an export's read stalled on a slow disk (a FUSE-served file whose
server is stopped) leaves other monitors' graph commands answering; once the read is let go,
the backup starts, the read returns the right data and the export writes through the filter.
blockd-only: QSD waits in its drained section with the whole monitor stalled."""

from __future__ import annotations

import json
import subprocess
import time

import iotests
from backup_helpers import MiB

SIZE = 4 * MiB


@iotests.blockd_only
def test_a_backup_start_over_a_stalled_read_leaves_graph_commands_answering(make_daemon, tmp_path):
    from test_fleecing import StallableFile

    stall = StallableFile(tmp_path, SIZE)
    reader = None
    try:
        d = make_daemon(monitors=2)
        d.blockdev_add(driver="file", node_name="sf", filename=str(stall.path))
        d.blockdev_add(driver="null-co", node_name="tgt", size=SIZE)
        sock = d.sock("nbd")
        d.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
        d.ok("block-export-add", type="nbd", id="e", node_name="sf", name="e", writable=True)
        url = f"nbd+unix:///e?socket={sock}"
        stall.stop()
        # A read of a range nobody read yet goes to the stopped FUSE server and waits there.
        reader = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "read -P 0 1M 64k", url],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        time.sleep(1)
        assert reader.poll() is None, "the read did not stall"
        with iotests.RawQmp(d.monitor_paths[1]) as m:
            m.greeting()
            assert m.negotiate() == {"return": {}}
            m.send(json.dumps({"execute": "blockdev-backup", "arguments": {
                "job-id": "j", "device": "sf", "target": "tgt", "sync": "none",
                "filter-node-name": "cbw"}}))
            time.sleep(2)  # the filter insertion waits for the export's read
            assert m.no_message(), "the backup did not wait for the read in flight"
            # Graph commands answer meanwhile (blockdev-add/-del run beside other commands
            # and take the graph lock).
            d.blockdev_add(driver="null-co", node_name="n2", size=SIZE)
            d.ok("blockdev-del", node_name="n2")
            r = d.cmd("blockdev-del", node_name="tgt")
            assert "error" in r, r  # in use by the backup being started
            assert reader.poll() is None, "the read finished while the server was stopped"
            stall.cont()
            assert m.reply(timeout=30) == {"return": {}}
        out, _ = reader.communicate(timeout=30)
        assert reader.returncode == 0 and b"read 65536/65536" in out, out
        assert b"verification failed" not in out, out
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
    from test_fleecing import StallableFile

    stall = StallableFile(tmp_path, SIZE)
    r2 = tmp_path / "r2.raw"
    r2.write_bytes(b"\0" * SIZE)
    reader = None
    try:
        d = make_daemon(monitors=2)
        d.blockdev_add(driver="file", node_name="sf", filename=str(stall.path))
        d.blockdev_add(driver="file", node_name="rf2", filename=str(r2))
        d.blockdev_add(driver="raw", node_name="rr", file="sf")
        sock = d.sock("nbd")
        d.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
        d.ok("block-export-add", type="nbd", id="e", node_name="rr", name="e", writable=True)
        url = f"nbd+unix:///e?socket={sock}"
        stall.stop()
        reader = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "read -P 0 1M 64k", url],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        time.sleep(1)
        assert reader.poll() is None, "the read did not stall"
        with iotests.RawQmp(d.monitor_paths[1]) as m:
            m.greeting()
            assert m.negotiate() == {"return": {}}
            m.send(json.dumps({"execute": "blockdev-reopen", "arguments": {"options": [
                {"driver": "raw", "node-name": "rr", "file": "rf2"}]}}))
            time.sleep(2)  # the reopen's drained section waits for the export's read
            assert m.no_message(), "the reopen did not wait for the read in flight"
            d.blockdev_add(driver="null-co", node_name="n2", size=SIZE)
            d.ok("blockdev-del", node_name="n2")
            r = d.cmd("blockdev-del", node_name="rr")
            assert r["error"]["desc"] == "Node rr is in use", r
            assert reader.poll() is None, "the read finished while the server was stopped"
            stall.cont()
            assert m.reply(timeout=30) == {"return": {}}
        out, _ = reader.communicate(timeout=30)
        assert reader.returncode == 0 and b"read 65536/65536" in out, out
        assert b"verification failed" not in out, out
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

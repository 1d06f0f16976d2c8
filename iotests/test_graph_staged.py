"""blockd opens the files of a `blockdev-add` without holding the graph lock: an add stalled
in the middle of its tree (a backing file that is a FIFO nobody writes to yet) leaves other
monitors' graph commands answering, keeps its node-name reserved and the existing node it names
pinned. blockd-only: QSD runs every command under one lock and would hang here as well."""

from __future__ import annotations

import json
import os
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

#!/usr/bin/env python3
"""A 2 GiB full pull: the hand-run sequence against blockd-backup's default mode, in one daemon.

A benchmark, not a test. Per rep, in alternating order: `backup_tool.hand_pull_full` (the
fleecing QMP + `qemu-img convert` of the export into a new qcow2) and `blockd-backup full`
(pull: the same fleecing, the tool's NBD copy with its hashing, manifest and bitmaps). Each
output is deleted before the next run and the bitmaps the tool added are removed, so the run
holds the source and one backup at a time (fresh memory is slow on some VMs: bench/README.md).
Prints per row the wall times, min and median, and the medians of client and daemon CPU.

    python3 bench/pull_full.py [--daemon blockd|qsd] [--reps 6] [--size-gib 2] [--dir /dev/shm]
"""

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import backup_tool as bt  # noqa: E402
from benchlib import Qmp  # noqa: E402


def main():
    args, size, work, d = bt.one_daemon(__doc__, 6)
    rows = {"hand": [], "tool": []}
    repo = os.path.join(work, "repo")

    def tool():
        bt.tool(d, repo, "full")
        shutil.rmtree(repo)

    def remove_bitmaps():
        q = Qmp(d.qmp_sock)
        try:
            for n in q.execute("query-named-block-nodes", flat=True):
                if n["node-name"] == d.node:
                    for b in n.get("dirty-bitmaps", []):
                        q.execute("block-dirty-bitmap-remove", node=d.node, name=b["name"])
        finally:
            q.close()

    try:
        for rep in range(args.reps):
            order = [("hand", lambda: bt.hand_pull_full(d, work, f"p{rep}", True)), ("tool", tool)]
            if rep % 2:
                order.reverse()
            for key, fn in order:
                rows[key].append(bt.timed(d, fn))
                remove_bitmaps()
    finally:
        d.stop()
        shutil.rmtree(work, ignore_errors=True)
    bt.print_rows(args.daemon, rows)


if __name__ == "__main__":
    main()

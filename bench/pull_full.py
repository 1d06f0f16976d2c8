#!/usr/bin/env python3
"""A 2 GiB full pull: the hand-run sequence against blockd-backup's default mode, in one daemon.

A benchmark, not a test. Per rep, in alternating order: `backup_tool.hand_pull_full` (the
fleecing QMP + `qemu-img convert` of the export into a new qcow2) and `blockd-backup full`
(pull: the same fleecing, the tool's NBD copy with its hashing, manifest and bitmaps). Each
output is deleted before the next run and the bitmaps the tool added are removed, so the run
holds the source and one backup at a time (fresh memory is slow on some VMs: bench/README.md).
Prints per row the wall times, min and median, and the medians of client and daemon CPU.
With --old-tool, a third row runs another blockd-backup binary the same way (an A/B of two
builds in one run; keep --reps a multiple of 3 so each row starts each position equally).

    python3 bench/pull_full.py [--daemon blockd|qsd] [--reps 6] [--size-gib 2] [--dir /dev/shm]
                              [--old-tool PATH]
"""

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import backup_tool as bt  # noqa: E402


def main():
    args, size, work, d = bt.one_daemon(__doc__, 6, old_tool=True)
    repo = os.path.join(work, "repo")

    def tool(binary=None):
        bt.tool(d, repo, "full", binary=binary)
        shutil.rmtree(repo)

    def rows(rep):
        out = [("hand", lambda: bt.hand_pull_full(d, work, f"p{rep}", True)), ("tool", tool)]
        if args.old_tool:
            out.append(("old", lambda: tool(args.old_tool)))
        return out

    bt.run_rotating(args, d, work, rows)


if __name__ == "__main__":
    main()

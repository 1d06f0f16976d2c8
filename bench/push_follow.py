#!/usr/bin/env python3
"""A 2 GiB full push: the hand-run QMP sequence against blockd-backup, with and without its
follower (which hashes the new file while the daemon's job writes it; see
crates/blockd-backup/src/follow.rs), in one daemon.

A benchmark, not a test. Per rep, in rotating order: `backup_tool.hand_push` (transaction
[bitmap-add, blockdev-backup sync=full] + wait), `blockd-backup full --push`, and the same with
BLOCKD_BACKUP_NO_FOLLOW=1. Each output is deleted before the next run and the bitmaps the
runs added are removed, so the run holds the source and one backup at a time (fresh memory is
slow on some VMs: bench/README.md). Prints per row the wall times, min and median, and the
medians of client and daemon CPU seconds.

    python3 bench/push_follow.py [--daemon blockd|qsd] [--reps 6] [--size-gib 2] [--dir /dev/shm]
"""

import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import backup_tool as bt  # noqa: E402


def main():
    args, size, work, d = bt.one_daemon(__doc__, 6)

    def tool(env):
        repo = os.path.join(work, "repo")
        p = subprocess.run([bt.TOOL, "--repo", repo, "--machine", "m", "full", "--push", "--qmp", d.qmp_sock,
                            "--nbd-socket", d.nbd_sock, "--disk", d.node], env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(p.stderr)
        if os.environ.get("BLOCKD_BACKUP_DEBUG"):
            sys.stderr.write(p.stderr)
        shutil.rmtree(repo)

    def hand(rep):
        bt.hand_push(d, work, f"f{rep}", size)
        os.unlink(os.path.join(work, f"hand-f{rep}.qcow2"))

    bt.run_rotating(args, d, work, lambda rep: [
        ("hand", lambda: hand(rep)),
        ("tool", lambda: tool(dict(os.environ))),
        ("tool, no follower", lambda: tool(dict(os.environ, BLOCKD_BACKUP_NO_FOLLOW="1")))])


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""A 1 % incremental push of a 2 GiB disk: the hand-run QMP sequence against blockd-backup,
many reps in one daemon, with the tool's phase times.

A benchmark, not a test. One tool full push first (the chain's base, unmeasured) and one
tracking bitmap for the hand script; then per rep: 1 % scattered 64 KiB writes through NBD
(`backup_tool.writes_1pct`), and in alternating order, each after touching 256 MiB of memory, `backup_tool.hand_push` (incremental from
its previous bitmap) and `blockd-backup inc --push` with BLOCKD_BACKUP_DEBUG (its phase lines
give where the tool's time goes). Prints the wall times (min and median), client and daemon
CPU, the ratio tool / hand of the medians and the median time of each tool phase (ms from the
process start).

    python3 bench/push_inc.py [--daemon blockd|qsd] [--reps 12] [--size-gib 2] [--dir /dev/shm]
"""

import os
import re
import shutil
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import backup_tool as bt  # noqa: E402
from benchlib import Qmp  # noqa: E402


def main():
    args, size, work, d = bt.one_daemon(__doc__, 12)
    repo = os.path.join(work, "repo")
    rows = {"hand": [], "tool": []}
    phases = {}
    runs = []  # per tool run: its phases

    def tool():
        p = subprocess.run([bt.TOOL, "--repo", repo, "--machine", "bench", "inc", "--push", "--qmp", d.qmp_sock,
                            "--nbd-socket", d.nbd_sock, "--disk", d.node],
                           env=dict(os.environ, BLOCKD_BACKUP_DEBUG="1"), capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(p.stderr)
        got = re.findall(r"phase (\S+) at ([0-9.]+) ms", p.stderr)
        for name, ms in got:
            phases.setdefault(name, []).append(float(ms))
        runs.append(got)

    try:
        bt.tool(d, repo, "full", "--push")
        q = Qmp(d.qmp_sock)
        try:
            q.execute("block-dirty-bitmap-add", node=d.node, name="hb-base")
        finally:
            q.close()
        for rep in range(args.reps):
            bt.writes_1pct(d, size, rep)
            prev = "hb-base" if rep == 0 else f"hb-i{rep - 1}"
            order = [("hand", lambda: bt.hand_push(d, work, f"i{rep}", size, src_bitmap=prev)),
                     ("tool", tool)]
            if rep % 2:
                order.reverse()
            for key, fn in order:
                # 256 MiB: a 1 % run writes ~20 MB.
                bt.prewarm(work, 256 << 20)
                rows[key].append(bt.timed(d, fn))
            q = Qmp(d.qmp_sock)
            try:
                q.execute("block-dirty-bitmap-remove", node=d.node, name=prev)
            finally:
                q.close()
            out = os.path.join(work, f"hand-i{rep}.qcow2")
            if os.stat(out).st_blocks * 512 < size // 100 * 9 // 10:
                raise RuntimeError(f"{out}: not the 1 % written")
            os.unlink(out)
    finally:
        d.stop()
        shutil.rmtree(work, ignore_errors=True)
    bt.print_rows(args.daemon, rows, ms=True)
    print(f"{args.daemon:6} tool phases (median ms from start): " +
          ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in phases.items()))
    fastest = min(range(len(rows["tool"])), key=lambda i: rows["tool"][i][0])
    print(f"{args.daemon:6} fastest tool run ({rows['tool'][fastest][0] * 1e3:.1f} ms) phases: " +
          ", ".join(f"{k} {float(v):.1f}" for k, v in runs[fastest]))


if __name__ == "__main__":
    main()

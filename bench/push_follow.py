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

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import backup_tool as bt  # noqa: E402
import benchlib  # noqa: E402
from benchlib import Daemon, Qmp  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--daemon", default="blockd", choices=["blockd", "qsd"])
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--size-gib", type=int, default=2)
    ap.add_argument("--dir", default="/dev/shm")
    args = ap.parse_args()
    size = args.size_gib << 30
    binary = {"blockd": os.path.join(bt.REPO, "target", "release", "blockd"),
              "qsd": shutil.which("qemu-storage-daemon")}[args.daemon]
    if not binary or not os.path.exists(binary):
        sys.exit(f"no {args.daemon} binary")
    work = tempfile.mkdtemp(prefix="pf-", dir=args.dir)
    raw = os.path.join(work, "src.raw")
    benchlib.random_raw(raw, size)
    img = os.path.join(work, "disk.qcow2")
    benchlib.qcow2_from_raw(raw, img)
    os.unlink(raw)
    d = Daemon(args.daemon, binary, work, [f"driver=file,node-name=f0,filename={img}",
                                          "driver=qcow2,node-name=disk0,file=f0"], "disk0").start()
    d.qmp.close()  # the tool and the hand script take the monitor in turn
    d.qmp = None
    rows = {"hand": [], "tool": [], "tool, no follower": []}

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
            order = [("hand", lambda: hand(rep)),
                     ("tool", lambda: tool(dict(os.environ))),
                     ("tool, no follower", lambda: tool(dict(os.environ, BLOCKD_BACKUP_NO_FOLLOW="1")))]
            order = order[rep % 3:] + order[:rep % 3]
            for key, fn in order:
                t0, c0, r0 = time.time(), d.cpu_seconds(), os.times()
                fn()
                r1 = os.times()
                client = r1.children_user + r1.children_system - r0.children_user - r0.children_system
                rows[key].append((time.time() - t0, client, d.cpu_seconds() - c0))
                remove_bitmaps()
    finally:
        d.stop()
        shutil.rmtree(work, ignore_errors=True)
    hand_med = statistics.median(x[0] for x in rows["hand"])
    for k, v in rows.items():
        med = statistics.median(x[0] for x in v)
        print(f"{args.daemon:6} {k:18} wall {' '.join('%.2f' % x[0] for x in v)} | min {min(x[0] for x in v):.3f}"
              f" med {med:.3f} ({med / hand_med:.2f} of hand) | client CPU {statistics.median(x[1] for x in v):.2f}"
              f" daemon CPU {statistics.median(x[2] for x in v):.2f}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Latency of 4 KiB guest writes (qemu-io over the NBD export, random clusters) while a hand
push backup of a 2 GiB random qcow2 runs: most of them make the copy-before-write hook copy
their cluster to the target first.

    python3 bench/push_guest_latency.py --dir /dev/shm --reps 3 blockd=target/release/blockd qsd=qemu-storage-daemon

Each `label=binary` is started fresh per rep (label `qsd*` runs as QSD), the labels take turns
within each rep. Latency per write is 1 / qemu-io's ops/sec of that write. Prints per-rep and
pooled median / p90 / p99; never asserts.
"""

import argparse
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
import backup_tool as bt  # noqa: E402
from benchlib import Daemon  # noqa: E402

SIZE = 2 << 30
WRITES = 150


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/dev/shm", help="where the images live")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("daemons", nargs="+", help="label=binary")
    a = ap.parse_args()
    kinds = [(lbl, shutil.which(b) or b) for lbl, b in (d.split("=", 1) for d in a.daemons)]
    work = tempfile.mkdtemp(prefix="push-lat-", dir=a.dir)
    res = {}
    try:
        blockdevs = benchlib.random_qcow2_disk(work, SIZE)
        for rep in range(a.reps):
            for label, binary in kinds:
                kind = "qsd" if label.startswith("qsd") else "blockd"
                d = Daemon(kind, binary, work, blockdevs, "disk0").start()
                d.qmp.close()
                d.qmp = None
                try:
                    rnd = random.Random(rep)
                    cmds = []
                    for i in range(WRITES):
                        off = rnd.randrange(SIZE // 65536) * 65536 + 4096 * rnd.randrange(16)
                        cmds += ["-c", f"write -P {i % 200 + 1} {off} 4k"]
                    push = threading.Thread(target=bt.hand_push, args=(d, work, f"{label}{rep}", SIZE))
                    push.start()
                    time.sleep(0.15)
                    out = subprocess.run(["qemu-io", "-f", "raw", *cmds, d.uri],
                                         capture_output=True, text=True, check=True).stdout
                    push.join()
                    ops = [float(x) for x in re.findall(r"and ([0-9.]+) ops/sec", out)]
                    lat = sorted(1000.0 / o for o in ops if o > 0)
                    res.setdefault(label, []).extend(lat)
                    print(f"{label:10s} rep {rep} median {statistics.median(lat):.3f} ms "
                          f"p90 {lat[int(len(lat) * 0.9)]:.3f} ms max {lat[-1]:.3f} ms", flush=True)
                    os.unlink(os.path.join(work, f"hand-{label}{rep}.qcow2"))
                finally:
                    d.stop()
        for label, lat in res.items():
            lat.sort()
            print(f"pooled {label:10s} n {len(lat)} median {statistics.median(lat):.3f} "
                  f"p90 {lat[int(len(lat) * 0.9)]:.3f} p99 {lat[int(len(lat) * 0.99)]:.3f} ms")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Wall time and daemon CPU of one hand-made push backup (the QMP a script sends:
blockdev-add of a new qcow2 target, blockdev-backup sync=full, wait, blockdev-del) of a 2 GiB
random qcow2, for several daemons side by side.

    python3 bench/push_cpu.py --dir /dev/shm --reps 5 blockd=target/release/blockd qsd=qemu-storage-daemon
    python3 bench/push_cpu.py --dir /var/tmp ... --perf      # perf record of the last rep

Each `label=binary` is started fresh per push (label `qsd*` runs as QSD); the labels take
turns within each rep (A B C, A B C, ...), so load drifts hit all of them; `sync` runs before
each push so no one pays for another's writeback. Source and targets live in --dir (tmpfs
/dev/shm or a disk file system). Prints each push and the medians; never asserts.
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
import benchlib  # noqa: E402
import backup_tool as bt  # noqa: E402
from benchlib import Daemon  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/dev/shm", help="where the images live")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--size", type=int, default=2 << 30, help="source size in bytes")
    ap.add_argument("--perf", action="store_true", help="perf record the last rep (/tmp/perf-LABEL.data)")
    ap.add_argument("daemons", nargs="+", help="label=binary")
    a = ap.parse_args()
    kinds = []
    for d in a.daemons:
        label, binary = d.split("=", 1)
        kinds.append((label, shutil.which(binary) or binary))
    work = tempfile.mkdtemp(prefix="push-cpu-", dir=a.dir)
    res = {}
    try:
        blockdevs = benchlib.random_qcow2_disk(work, a.size)
        for rep in range(a.reps):
            for label, binary in kinds:
                kind = "qsd" if label.startswith("qsd") else "blockd"
                d = Daemon(kind, binary, work, blockdevs, "disk0").start()
                d.qmp.close()
                d.qmp = None
                try:
                    perf = None
                    if a.perf and rep == a.reps - 1:
                        perf = subprocess.Popen(
                            ["perf", "record", "-g", "-o", f"/tmp/perf-{label}.data", "-p", str(d.proc.pid)],
                            stderr=subprocess.DEVNULL)
                        time.sleep(0.5)
                    subprocess.run(["sync"], check=True)
                    c0, t0 = d.cpu_seconds(), time.time()
                    bt.hand_push(d, work, f"{label}{rep}", a.size)
                    wall, cpu = time.time() - t0, d.cpu_seconds() - c0
                    if perf:
                        perf.send_signal(2)
                        perf.wait()
                    load = os.getloadavg()[0]
                    print(f"{label:10s} rep {rep} wall {wall:.3f} s  daemon cpu {cpu:.3f} s  load {load:.1f}", flush=True)
                    res.setdefault(label, []).append((wall, cpu))
                    os.unlink(os.path.join(work, f"hand-{label}{rep}.qcow2"))
                finally:
                    d.stop()
        for label, v in res.items():
            w = statistics.median(x[0] for x in v)
            c = statistics.median(x[1] for x in v)
            print(f"median {a.dir} {label:10s} wall {w:.3f} s  daemon cpu {c:.3f} s  (n={len(v)})")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()

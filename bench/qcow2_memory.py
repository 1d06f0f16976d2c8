#!/usr/bin/env python3
"""Resident memory of blockd beside qemu-storage-daemon on a large, sparsely written qcow2.

For each configuration (number of recording persistent bitmaps x amount of scattered writes)
both daemons get a fresh empty qcow2 of --disk-gib (default 1 TiB, 64 KiB clusters) with N
persistent dirty bitmaps (64 KiB granularity), exported writable over NBD. The script writes
--written-gib of data in 64 KiB pieces at pseudo-random cluster-aligned offsets (the same
offsets for both daemons) through `qemu-io` on the NBD export, flushes, waits --settle seconds,
then reads VmRSS and VmHWM (peak) from /proc. Both daemons' metadata caches run with their
defaults (QEMU's: L2 cache up to 32 MiB, 4 refcount blocks).

Reported per configuration: RSS and peak per daemon in MiB, and the ratio blockd/QSD
(below 1: blockd uses less). Idle RSS (after start, before any write) is reported too.

    python3 bench/qcow2_memory.py --quick      # 1 and 8 bitmaps x 1 GiB on 1 TiB
    python3 bench/qcow2_memory.py              # 1/8/64 bitmaps x 1/64 GiB (needs ~130 GiB of --dir)
"""

import argparse
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

CLUSTER = 64 << 10


def proc_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def make_image(path, disk_gib, bitmaps):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, f"{disk_gib}G"], check=True)
    for i in range(bitmaps):
        subprocess.run(["qemu-img", "bitmap", "--add", "-g", str(CLUSTER), path, f"b{i}"], check=True)


def offsets(disk_gib, written_gib, seed=7):
    """Distinct cluster-aligned offsets, `written_gib` worth of 64 KiB pieces, sorted."""
    clusters = (disk_gib << 30) // CLUSTER
    n = (written_gib << 30) // CLUSTER
    rng = random.Random(seed)
    return sorted(rng.sample(range(clusters), n))


def scatter_writes(d, offs, jobs=1):
    """Write 64 KiB at each offset through qemu-io on the NBD export, then flush; with
    `jobs` > 1 the offsets are dealt round-robin to that many qemu-io clients at once."""
    procs = []
    for j in range(jobs):
        part = offs[j::jobs]
        script = "".join(f"write -P 0x5a {c * CLUSTER} {CLUSTER}\n" for c in part) + "flush\nquit\n"
        p = subprocess.Popen(["qemu-io", "-f", "raw", d.uri], stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append((p, script.encode()))
    # Feed each client in a thread so no pipe blocks the others.
    errs = []

    def run(p, data):
        _, err = p.communicate(data)
        if p.returncode != 0:
            errs.append(err.decode(errors="replace"))

    threads = [threading.Thread(target=run, args=pd) for pd in procs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errs:
        raise RuntimeError(f"qemu-io failed on {d.kind}: {errs[0]}")


def measure(kind, binary, work, a, bitmaps, offs):
    img = os.path.join(work, f"{kind}.qcow2")
    make_image(img, a.disk_gib, bitmaps)
    d = benchlib.Daemon(kind, binary, work,
                        [f"file,node-name=f,filename={img}", "qcow2,node-name=n,file=f"], "n")
    d.start()
    try:
        time.sleep(0.5)
        idle = proc_kib(d.proc.pid, "VmRSS")
        scatter_writes(d, offs, a.jobs)
        time.sleep(a.settle)
        rss = proc_kib(d.proc.pid, "VmRSS")
        hwm = proc_kib(d.proc.pid, "VmHWM")
    finally:
        d.stop()
        os.unlink(img)
    return idle / 1024, rss / 1024, hwm / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blockd", default=benchlib.DEFAULT_BLOCKD)
    ap.add_argument("--qsd", default=benchlib.DEFAULT_QSD)
    ap.add_argument("--dir", default="/var/tmp", help="where the images live (default /var/tmp)")
    ap.add_argument("--disk-gib", type=int, default=1024)
    ap.add_argument("--bitmaps", default="1,8,64")
    ap.add_argument("--written-gib", default="1,64")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds between the flush and the reading")
    ap.add_argument("--jobs", type=int, default=1,
                    help="qemu-io clients writing at once (default 1; the offsets are the same)")
    ap.add_argument("--quick", action="store_true", help="1 and 8 bitmaps, 1 GiB written")
    a = ap.parse_args()
    if a.quick:
        a.bitmaps, a.written_gib = "1,8", "1"
    benchlib.check_tools("qemu-img", "qemu-io")
    benchlib.install_cleanup()
    print(benchlib.machine_line())
    print(f"# {a.disk_gib} GiB qcow2, 64 KiB clusters, bitmaps at 64 KiB granularity, "
          f"64 KiB writes at random offsets ({a.jobs} client(s)), default cache options; MiB")
    rows = []
    for written in [int(x) for x in a.written_gib.split(",")]:
        offs = offsets(a.disk_gib, written)
        for n in [int(x) for x in a.bitmaps.split(",")]:
            work = tempfile.mkdtemp(prefix="mem-", dir=a.dir)
            try:
                b = measure("blockd", a.blockd, work, a, n, offs)
                q = measure("qsd", a.qsd, work, a, n, offs)
            finally:
                subprocess.run(["rm", "-rf", work])
            rows.append([f"{n}", f"{written} GiB", f"{b[0]:.1f}", f"{q[0]:.1f}",
                         f"{b[1]:.1f}", f"{q[1]:.1f}", f"{b[2]:.1f}", f"{q[2]:.1f}",
                         f"**{b[1] / q[1]:.2f}**"])
            print(f"# done: {' | '.join(rows[-1])}", flush=True)
    benchlib.print_table(["bitmaps", "written", "idle blockd", "idle QSD", "RSS blockd",
                          "RSS QSD", "peak blockd", "peak QSD", "RSS blockd/QSD"], rows)


if __name__ == "__main__":
    main()

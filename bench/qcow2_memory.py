#!/usr/bin/env python3
"""Resident memory of blockd beside qemu-storage-daemon on a large, sparsely written qcow2.

For each configuration (number of recording persistent bitmaps x amount of scattered writes)
both daemons get a fresh empty qcow2 of --disk-gib (default 1 TiB, 64 KiB clusters) with N
persistent dirty bitmaps (64 KiB granularity), exported writable over NBD. The script writes
--written-gib of data in 64 KiB pieces on the NBD export, flushes, waits --settle seconds,
then reads VmRSS and VmHWM (peak) from /proc. Both daemons' metadata caches run with their
defaults (QEMU's: L2 cache up to 32 MiB, 4 refcount blocks).

Two writers (--writer; `auto`, the default, takes `random` up to 1 GiB and `stride` above):
- `random`: pseudo-random distinct cluster-aligned offsets (the same for both daemons) through
  `qemu-io` commands, ~5 MiB/s (minutes per GiB);
- `stride`: `qemu-img bench -w` with 16 requests in flight, one 64 KiB piece every N clusters
  (N = disk / written), hundreds of MiB/s. The pattern is a uniform stride, NOT random; the
  memory shape is the same (every L2 table gets the same share of entries, every bitmap the
  same share of dirty 64-bit words: e.g. 4 GiB on 1 TiB, one granule in 256, dirties 25% of the
  words against ~22% for random offsets). bench/README.md has a 4 GiB row measured both ways.

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


def stride_writes(d, disk_gib, written_gib):
    """Write `written_gib` in 64 KiB pieces, one every disk/written clusters, with
    `qemu-img bench` (16 requests in flight), then flush."""
    count = (written_gib << 30) // CLUSTER
    step = (disk_gib << 30) // CLUSTER // count * CLUSTER
    r = subprocess.run(["qemu-img", "bench", "-q", "-w", "-f", "raw", "-t", "none", "-d", "16",
                        "-c", str(count), "-s", str(CLUSTER), "-S", str(step),
                        "--pattern", "0x5a", d.uri], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"qemu-img bench failed on {d.kind}: {r.stderr}")
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "flush", d.uri], capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise RuntimeError(f"qemu-io flush failed on {d.kind}: {r.stderr}")


def measure(kind, binary, work, a, bitmaps, written, offs):
    img = os.path.join(work, f"{kind}.qcow2")
    make_image(img, a.disk_gib, bitmaps)
    d = benchlib.Daemon(kind, binary, work,
                        [f"file,node-name=f,filename={img}", "qcow2,node-name=n,file=f"], "n")
    d.start()
    try:
        time.sleep(0.5)
        idle = proc_kib(d.proc.pid, "VmRSS")
        if offs is None:
            stride_writes(d, a.disk_gib, written)
        else:
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
    ap.add_argument("--writer", choices=["auto", "random", "stride"], default="auto",
                    help="random offsets via qemu-io, or a uniform stride via qemu-img bench "
                         "(auto: random up to 1 GiB written, stride above)")
    ap.add_argument("--quick", action="store_true", help="1 and 8 bitmaps, 1 GiB written")
    a = ap.parse_args()
    if a.quick:
        a.bitmaps, a.written_gib = "1,8", "1"
    benchlib.check_tools("qemu-img", "qemu-io")
    if a.disk_gib << 30 < max(int(x) for x in a.written_gib.split(",")) << 30:
        ap.error("--written-gib exceeds --disk-gib")
    benchlib.install_cleanup()
    print(benchlib.machine_line())
    print(f"# {a.disk_gib} GiB qcow2, 64 KiB clusters, bitmaps at 64 KiB granularity, "
          f"64 KiB writes (writer {a.writer}), default cache options; MiB")
    rows = []
    for written in [int(x) for x in a.written_gib.split(",")]:
        stride = a.writer == "stride" or (a.writer == "auto" and written > 1)
        offs = None if stride else offsets(a.disk_gib, written)
        for n in [int(x) for x in a.bitmaps.split(",")]:
            work = tempfile.mkdtemp(prefix="mem-", dir=a.dir)
            try:
                b = measure("blockd", a.blockd, work, a, n, written, offs)
                q = measure("qsd", a.qsd, work, a, n, written, offs)
            finally:
                subprocess.run(["rm", "-rf", work])
            how = "stride" if stride else "random"
            rows.append([f"{n}", f"{written} GiB", how, f"{b[0]:.1f}", f"{q[0]:.1f}",
                         f"{b[1]:.1f}", f"{q[1]:.1f}", f"{b[2]:.1f}", f"{q[2]:.1f}",
                         f"**{b[1] / q[1]:.2f}**"])
            print(f"# done: {' | '.join(rows[-1])}", flush=True)
    benchlib.print_table(["bitmaps", "written", "writer", "idle blockd", "idle QSD", "RSS blockd",
                          "RSS QSD", "peak blockd", "peak QSD", "RSS blockd/QSD"], rows)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Small-block qcow2 I/O over NBD, blockd vs qemu-storage-daemon, measured with fio.

Each daemon exports a qcow2 node (over a file node) on a Unix socket. fio's `nbd` engine (libnbd,
one connection, queue depth 16 by default) runs for a fixed time each of:
- seq/rand x read/write x 4 KiB/64 KiB on a fully allocated image (random, non-zero contents;
  writes overwrite allocated clusters), the daemons staying up for the whole series;
- "alloc" writes (rand 4 KiB, seq 64 KiB) into a freshly created empty image, so every new
  cluster goes through allocation (and, for 4 KiB, copy-on-write padding of the 64 KiB cluster);
  the daemon is restarted on a new image before each of these measurements.
Every measurement is repeated --reps times, alternating which daemon goes first.

Prints medians of IOPS and MiB/s per daemon, the ratio blockd/QSD (> 1: blockd faster), the
mean and 99th-percentile completion latency, and the daemon's CPU time (user + system, all
threads) per I/O, which a busy machine disturbs less than wall time. Never asserts on timings.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

import benchlib as bl

# (label, fio rw, block size, needs a fresh empty image)
JOBS = [
    ("seq read 4k", "read", "4k", False),
    ("rand read 4k", "randread", "4k", False),
    ("seq read 64k", "read", "64k", False),
    ("rand read 64k", "randread", "64k", False),
    ("seq write 4k", "write", "4k", False),
    ("rand write 4k", "randwrite", "4k", False),
    ("seq write 64k", "write", "64k", False),
    ("rand write 64k", "randwrite", "64k", False),
    ("alloc rand write 4k", "randwrite", "4k", True),
    ("alloc seq write 64k", "write", "64k", True),
]


def fio(d, rw, bs, opts, out):
    uri = d.uri
    cpu0 = d.cpu_seconds()
    args = [
        "fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
        f"--iodepth={opts.iodepth}", f"--runtime={int(opts.runtime * 1000)}ms", "--time_based",
        f"--ramp_time={int(opts.ramp * 1000)}ms", "--norandommap", "--randrepeat=0",
        "--output-format=json", f"--output={out}",
    ]
    subprocess.run(args, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    with open(out) as f:
        text = f.read()
    job = json.loads(text[text.index("{"):])["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio error {job['error']} for {rw} {bs}")
    cpu = d.cpu_seconds() - cpu0
    side = job["read"] if "read" in rw else job["write"]
    clat = side["clat_ns"]
    return {
        # Counts the ramp's CPU but not its I/Os: keep --ramp 0 for exact figures.
        "cpu_us": cpu * 1e6 / max(side["total_ios"], 1),
        "iops": side["iops"],
        "mibs": side["bw_bytes"] / bl.MiB,
        "lat_us": clat["mean"] / 1000,
        "p99_us": clat.get("percentile", {}).get("99.000000", 0) / 1000,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="128 MiB, 2 reps of 0.75 s, no ramp (< 60 s)")
    p.add_argument("--size", type=int, help="image size in MiB (default 1024)")
    p.add_argument("--reps", type=int, help="repetitions per daemon (default 3)")
    p.add_argument("--runtime", type=float, help="seconds per fio run (default 3)")
    p.add_argument("--ramp", type=float, help="fio ramp time, not counted (default 0)")
    p.add_argument("--iodepth", type=int, default=16)
    p.add_argument(
        "--format", choices=("qcow2", "raw"), default="qcow2",
        help="raw: a raw file node instead, as a baseline for the NBD layer (no alloc jobs)",
    )
    p.add_argument("--jobs", default="", help="comma list of job labels to run (default all)")
    bl.add_daemon_args(p)
    opts = p.parse_args()
    # --quick changes only the values not given explicitly.
    for name, full, quick in (("size", 1024, 128), ("reps", 3, 2), ("runtime", 3, 0.75), ("ramp", 0, 0)):
        if getattr(opts, name) is None:
            setattr(opts, name, quick if opts.quick else full)
    size = opts.size * bl.MiB
    jobs = [j for j in JOBS if not opts.jobs or j[0] in opts.jobs.split(",")]
    if opts.format == "raw":
        jobs = [j for j in jobs if not j[3]]
    bl.check_tools(opts.blockd, opts.qsd, "fio", "qemu-img")
    bl.install_cleanup()
    bins = {"blockd": opts.blockd, "qsd": opts.qsd}

    print(
        f"# qcow2_io  {bl.machine_line()}  size={opts.size}MiB reps={opts.reps} "
        f"runtime={opts.runtime}s iodepth={opts.iodepth} format={opts.format} dir={opts.dir}"
    )
    samples = {}  # (label, kind) -> [result dict]
    daemons = {}
    with bl.work_dir(opts.dir) as work:
        src = os.path.join(work, "src.raw")
        bl.random_raw(src, size)
        for kind in ("blockd", "qsd"):
            img = os.path.join(work, f"{kind}.{opts.format}")
            if opts.format == "raw":
                shutil.copyfile(src, img)
            else:
                bl.qcow2_from_raw(src, img)
            blockdevs, node = bl.blockdevs_for(opts.format, img)
            daemons[kind] = bl.Daemon(kind, bins[kind], work, blockdevs, node).start()
        os.unlink(src)
        out = os.path.join(work, "fio.json")
        for rep in range(opts.reps):
            for label, rw, bs, fresh in jobs:
                for kind in bl.alternate(rep):
                    if fresh:
                        img = os.path.join(work, f"{kind}-empty.qcow2")
                        if os.path.exists(img):
                            os.unlink(img)
                        bl.empty_qcow2(img, size)
                        blockdevs, node = bl.blockdevs_for("qcow2", img)
                        d = bl.Daemon(kind, bins[kind], work, blockdevs, node).start()
                    else:
                        d = daemons[kind]
                    try:
                        r = fio(d, rw, bs, opts, out)
                    finally:
                        if fresh:
                            d.stop()
                    samples.setdefault((label, kind), []).append(r)
                    if opts.verbose:
                        print(
                            f"  {label} {kind}: {r['iops']:.0f} IOPS {r['mibs']:.0f} MiB/s "
                            f"lat {r['lat_us']:.0f} us p99 {r['p99_us']:.0f} us "
                            f"CPU {r['cpu_us']:.1f} us/IO",
                            flush=True,
                        )

    def med(label, kind, key):
        return bl.median([s[key] for s in samples[(label, kind)]])

    rows = []
    for label, _, _, _ in jobs:
        b_iops, q_iops = med(label, "blockd", "iops"), med(label, "qsd", "iops")
        rows.append([
            label,
            f"{b_iops:.0f}", f"{q_iops:.0f}",
            f"{med(label, 'blockd', 'mibs'):.0f}", f"{med(label, 'qsd', 'mibs'):.0f}",
            f"{bl.ratio(b_iops, q_iops):.2f}",
            f"{med(label, 'blockd', 'lat_us'):.0f}/{med(label, 'blockd', 'p99_us'):.0f}",
            f"{med(label, 'qsd', 'lat_us'):.0f}/{med(label, 'qsd', 'p99_us'):.0f}",
            f"{med(label, 'blockd', 'cpu_us'):.1f}", f"{med(label, 'qsd', 'cpu_us'):.1f}",
        ])
    print()
    bl.print_table(
        ["job", "blockd IOPS", "QSD IOPS", "blockd MiB/s", "QSD MiB/s", "blockd/QSD",
         "blockd lat/p99 us", "QSD lat/p99 us", "blockd CPU us/IO", "QSD CPU us/IO"],
        rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

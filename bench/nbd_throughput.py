#!/usr/bin/env python3
"""NBD streaming throughput, blockd vs qemu-storage-daemon, with 0 and N dirty bitmaps.

For each node kind (a raw file node; a qcow2 node over a file node) both daemons export their own
copy of the same image over NBD on a Unix socket. `nbdcopy` then
- reads the whole export to `null:` (with nbdcopy's default extent queries), and
- writes a random source file over the whole export (`--no-extents --flush`: every byte is sent,
  the source has no zero blocks, and the copy ends with a flush),
repeated --reps times, alternating which daemon goes first, once with no dirty bitmap on the
exported node and once with --bitmaps recording bitmaps added through QMP (removed again after
each repetition, so every write starts with clean bitmaps). Images are fully allocated, so writes
overwrite (no qcow2 cluster allocation).

Prints medians in MiB/s, the ratio blockd/QSD (> 1: blockd faster), the daemons' CPU time per GiB
moved (user + system, all threads; less sensitive to a busy machine than wall time), and each
daemon's bitmap overhead (throughput with N bitmaps / without). Never asserts on timings.
"""

import argparse
import os
import shutil
import subprocess
import sys
import time

import benchlib as bl


def nbdcopy(args):
    t0 = time.perf_counter()
    subprocess.run(["nbdcopy", *args], check=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - t0


def measure(d, op, src, size):
    """(MiB/s, daemon CPU seconds per GiB moved)."""
    cpu0 = d.cpu_seconds()
    if op == "read":
        secs = nbdcopy([d.uri, "null:"])
    else:
        secs = nbdcopy(["--no-extents", "--flush", src, d.uri])
    cpu = d.cpu_seconds() - cpu0
    return size / bl.MiB / secs, cpu / (size / (1 << 30))


def run_format(fmt, opts, work, src):
    daemons = {}
    bins = {"blockd": opts.blockd, "qsd": opts.qsd}
    for kind in ("blockd", "qsd"):
        img = os.path.join(work, f"{kind}.{fmt}")
        if fmt == "raw":
            shutil.copyfile(src, img)
        else:
            bl.qcow2_from_raw(src, img)
        blockdevs, node = bl.blockdevs_for(fmt, img)
        daemons[kind] = bl.Daemon(kind, bins[kind], work, blockdevs, node).start()
    # samples[(op, nbitmaps, kind)] -> [MiB/s]; samples[(op, nbitmaps, kind, "cpu")] -> [CPU s/GiB]
    samples = {}
    try:
        for rep in range(opts.reps):
            counts = (0, opts.bitmaps) if rep % 2 == 0 else (opts.bitmaps, 0)
            for nb in counts:
                for d in daemons.values():
                    d.add_bitmaps(nb)
                for op in ("read", "write"):
                    for kind in bl.alternate(rep):
                        v, cpu = measure(daemons[kind], op, src, opts.size)
                        samples.setdefault((op, nb, kind), []).append(v)
                        samples.setdefault((op, nb, kind, "cpu"), []).append(cpu)
                        if opts.verbose:
                            print(
                                f"  {fmt} {op} bitmaps={nb} {kind}: {v:.0f} MiB/s, "
                                f"CPU {cpu:.2f} s/GiB",
                                flush=True,
                            )
                for d in daemons.values():
                    d.remove_bitmaps(nb)
    finally:
        for d in daemons.values():
            d.stop()
    return samples


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="128 MiB, 3 repetitions (< 60 s)")
    p.add_argument("--size", type=int, help="image size in MiB (default 256)")
    p.add_argument("--reps", type=int, help="repetitions per daemon (default 5)")
    p.add_argument("--bitmaps", type=int, default=8, help="bitmaps in the second series (default 8)")
    p.add_argument("--formats", default="raw,qcow2", help="comma list of raw,qcow2")
    bl.add_daemon_args(p)
    opts = p.parse_args()
    quick = opts.quick
    opts.size = opts.size or (128 if quick else 256)
    opts.reps = opts.reps or (3 if quick else 5)
    opts.size *= bl.MiB
    bl.check_tools(opts.blockd, opts.qsd, "nbdcopy", "qemu-img")
    bl.install_cleanup()

    print(f"# nbd_throughput  {bl.machine_line()}  size={opts.size // bl.MiB}MiB reps={opts.reps} dir={opts.dir}")
    results = {}
    with bl.work_dir(opts.dir) as work:
        src = os.path.join(work, "src.raw")
        bl.random_raw(src, opts.size)
        for fmt in opts.formats.split(","):
            results[fmt] = run_format(fmt, opts, work, src)

    nb = opts.bitmaps
    rows = []
    for fmt, s in results.items():
        for op in ("read", "write"):
            for n in (0, nb):
                b = bl.median(s[(op, n, "blockd")])
                q = bl.median(s[(op, n, "qsd")])
                bc = bl.median(s[(op, n, "blockd", "cpu")])
                qc = bl.median(s[(op, n, "qsd", "cpu")])
                rows.append([
                    f"{fmt} {op}", n, f"{b:.0f}", f"{q:.0f}", f"{bl.ratio(b, q):.2f}",
                    f"{bc:.2f}", f"{qc:.2f}",
                ])
    print()
    bl.print_table(
        ["node/op", "bitmaps", "blockd MiB/s", "QSD MiB/s", "blockd/QSD",
         "blockd CPU s/GiB", "QSD CPU s/GiB"],
        rows,
    )

    rows = []
    for fmt, s in results.items():
        for op in ("read", "write"):
            cells = [f"{fmt} {op}"]
            for kind in ("blockd", "qsd"):
                r = bl.ratio(bl.median(s[(op, nb, kind)]), bl.median(s[(op, 0, kind)]))
                cells.append(f"{r:.2f}")
            rows.append(cells)
    print()
    print(f"bitmap overhead: throughput with {nb} bitmaps / with 0 (1.00 = none, < 1 = slower)")
    bl.print_table(["node/op", "blockd", "QSD"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

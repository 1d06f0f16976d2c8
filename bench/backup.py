#!/usr/bin/env python3
"""Backup jobs, blockd vs qemu-storage-daemon, side by side in one run (ratios, no asserts).

Workloads (images on tmpfs by default):
  * full: `blockdev-backup sync=full` of a SIZE image (raw source and qcow2 source, random data)
    into an empty qcow2 target, beside `cp` of the same bytes (the machine's copy limit, once
    per repetition between the daemons' runs);
  * incremental: `blockdev-backup sync=incremental` of an INC_SIZE qcow2 image whose persistent
    bitmap marks 0.1 %, 1 % and 10 % scattered dirty 64 KiB clusters, into an empty qcow2,
    beside the copy floor of those bytes (their host ranges copied in the kernel into a new
    file, no metadata; same run).
Reported: seconds (median), throughput, blockd/QSD speed ratio, CPU seconds per GiB (daemons:
all threads, from /proc/PID/task/*/schedstat; cp and the floor: this process).
Every run's target is checked with `qemu-img compare` against the source (point in time).

  python3 bench/backup.py --quick     # 256 MiB full, 1 GiB incremental, 1 rep
  python3 bench/backup.py             # 2 GiB full, 8 GiB incremental, 3 reps
  python3 bench/backup.py --only incremental --blockd2 /path/to/older/blockd
                                      # a second blockd build in the same run (before/after)
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

MiB = benchlib.MiB
CLUSTER = 64 * 1024


def cpu_ns(d):
    """CPU time of the daemon's live threads, nanoseconds (`/proc/PID/task/*/schedstat`: exact,
    unlike the 10 ms ticks of `/proc/PID/stat`; both daemons' worker threads outlive a job by
    seconds, so none of a job's CPU leaves with an exited thread)."""
    total = 0
    base = f"/proc/{d.proc.pid}/task"
    for t in os.listdir(base):
        try:
            with open(f"{base}/{t}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
            pass
    return total


def run_job(d, target_path, sync, bitmap=None):
    """Add the target, run the backup, return (seconds, cpu seconds)."""
    d.qmp.execute("blockdev-add", **{
        "driver": "qcow2", "node-name": "t",
        "file": {"driver": "file", "filename": target_path}})
    args = {"job-id": "j", "device": d.node, "target": "t", "sync": sync, "auto-dismiss": False}
    if bitmap:
        args["bitmap"] = bitmap
    cpu0 = cpu_ns(d)
    t0 = time.perf_counter()
    d.qmp.execute("blockdev-backup", **args)
    while True:
        jobs = d.qmp.execute("query-jobs")
        if jobs and jobs[0]["status"] == "concluded":
            break
        # Short polls: a 0.1 % incremental takes a few milliseconds.
        time.sleep(0.002)
    dt = time.perf_counter() - t0
    cpu = (cpu_ns(d) - cpu0) / 1e9
    if "error" in jobs[0]:
        raise RuntimeError(f"{d.kind}: backup failed: {jobs[0]['error']}")
    d.qmp.execute("job-dismiss", id="j")
    d.qmp.execute("blockdev-del", **{"node-name": "t"})
    return dt, cpu


def order(kinds, rep):
    """Daemon order for repetition `rep`: rotated, so none always goes first."""
    k = rep % len(kinds)
    return kinds[k:] + kinds[:k]


def compare(a, fa, b, fb):
    r = subprocess.run(["qemu-img", "compare", "-U", "-f", fa, "-F", fb, a, b],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise RuntimeError(f"backup differs from source: {r.stdout.decode()}")


def full(args, work, binaries):
    rows = []
    raw = os.path.join(work, "src.raw")
    benchlib.random_raw(raw, args.size * MiB)
    qc = os.path.join(work, "src.qcow2")
    benchlib.qcow2_from_raw(raw, qc)
    gib = args.size / 1024
    cps = []

    def copy_limit():
        """cp of the same bytes, tmpfs to tmpfs, between the daemons' runs: seconds, CPU s."""
        dst = os.path.join(work, "cp.out")
        t0, c0 = time.perf_counter(), time.process_time()
        shutil.copyfile(raw, dst)
        cps.append((time.perf_counter() - t0, time.process_time() - c0))
        os.unlink(dst)

    for fmt, src in (("raw", raw), ("qcow2", qc)):
        res = {k: [] for k in binaries}
        for rep in range(args.reps):
            copy_limit()
            for kind in order(list(binaries), rep):
                img = os.path.join(work, f"{kind}.{fmt}")
                shutil.copyfile(src, img)
                devs, node = benchlib.blockdevs_for(fmt, img)
                d = benchlib.Daemon(kind, binaries[kind], work, devs, node).start()
                tgt = os.path.join(work, f"{kind}-tgt.qcow2")
                benchlib.empty_qcow2(tgt, args.size * MiB)
                try:
                    res[kind].append(run_job(d, tgt, "full"))
                finally:
                    d.stop()
                compare(tgt, "qcow2", src, fmt)
                os.unlink(tgt)
                os.unlink(img)
        t = {k: benchlib.median([x[0] for x in v]) for k, v in res.items()}
        c = {k: benchlib.median([x[1] for x in v]) for k, v in res.items()}
        for k in binaries:
            rows.append([f"full {fmt} {k}", f"{t[k]:.2f}", f"{args.size / t[k]:.0f}",
                         f"{c[k] / gib:.2f}", f"{benchlib.ratio(t['qsd'], t[k]):.2f}" if k != "qsd" else ""])
    cp = benchlib.median([x[0] for x in cps])
    cp_cpu = benchlib.median([x[1] for x in cps])
    rows.insert(0, ["cp (copy limit)", f"{cp:.2f}", f"{args.size / cp:.0f}", f"{cp_cpu / gib:.2f}", ""])
    print(f"\nfull backup, {args.size} MiB, qcow2 target")
    benchlib.print_table(["run", "s", "MiB/s", "cpu s/GiB", "blockd/QSD speed"], rows)


def make_incremental_source(path, size, fraction, seed=7):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", path, "b"], check=True)
    clusters = size // CLUSTER
    n = max(1, int(clusters * fraction))
    picks = sorted(random.Random(seed).sample(range(clusters), n))
    cmds = []
    for c in picks:
        cmds += ["-c", f"write -P {c % 251 + 1} {c * CLUSTER} {CLUSTER}"]
    # qemu-io marks the persistent bitmap (recording) and stores it at close.
    for i in range(0, len(cmds), 4000):
        subprocess.run(["qemu-io", "-f", "qcow2", *cmds[i:i + 4000], path],
                       check=True, stdout=subprocess.DEVNULL)
    return n * CLUSTER


def host_extents(path):
    """The host-file ranges (offset, length) holding the data of a qcow2 image, in guest
    order, adjacent ones merged (`qemu-img map`)."""
    out = subprocess.run(["qemu-img", "map", "-U", "--output=json", "-f", "qcow2", path],
                         check=True, stdout=subprocess.PIPE).stdout
    ext = []
    for e in json.loads(out):
        if not e.get("data") or "offset" not in e:
            continue
        if ext and ext[-1][0] + ext[-1][1] == e["offset"]:
            ext[-1] = (ext[-1][0], ext[-1][1] + e["length"])
        else:
            ext.append((e["offset"], e["length"]))
    return ext


def copy_floor(src, extents, dst):
    """Seconds to copy the given host ranges of `src` back to back into a new file `dst` in the
    kernel (`copy_file_range`, which tmpfs serves by splicing: one page copy, as the backup's
    copy), with no metadata: what any backup of these bytes must at least spend here."""
    t0, c0 = time.perf_counter(), time.process_time()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        at = 0
        for off, n in extents:
            done = 0
            while done < n:
                k = os.copy_file_range(fi.fileno(), fo.fileno(), n - done, off + done, at + done)
                if k <= 0:
                    raise RuntimeError("copy_file_range made no progress")
                done += k
            at += n
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    os.unlink(dst)
    return dt, cpu


def incremental(args, work, binaries):
    rows = []
    size = args.inc_size * MiB
    fractions = [float(x) for x in args.fractions.split(",")] if args.fractions else [0.001, 0.01, 0.1]
    for fraction in fractions:
        src = os.path.join(work, "inc-src.qcow2")
        dirty = make_incremental_source(src, size, fraction)
        res = {k: [] for k in binaries}
        extents = host_extents(src)
        floors = []
        for rep in range(args.reps):
            # The copy floor of these dirty bytes, in the same run as the daemons.
            floors.append(copy_floor(src, extents, os.path.join(work, "floor.out")))
            for kind in order(list(binaries), rep):
                img = os.path.join(work, f"{kind}-inc.qcow2")
                shutil.copyfile(src, img)
                devs, node = benchlib.blockdevs_for("qcow2", img)
                d = benchlib.Daemon(kind, binaries[kind], work, devs, node).start()
                tgt = os.path.join(work, f"{kind}-inc-tgt.qcow2")
                benchlib.empty_qcow2(tgt, size)
                try:
                    res[kind].append(run_job(d, tgt, "incremental", "b"))
                finally:
                    d.stop()
                # Only dirty clusters were written into an empty target; the rest of the source
                # is unallocated too, so the two compare equal.
                compare(tgt, "qcow2", img, "qcow2")
                os.unlink(tgt)
                os.unlink(img)
        os.unlink(src)
        t = {k: benchlib.median([x[0] for x in v]) for k, v in res.items()}
        c = {k: benchlib.median([x[1] for x in v]) for k, v in res.items()}
        floor = benchlib.median([x[0] for x in floors])
        floor_cpu = benchlib.median([x[1] for x in floors])
        rows.append([f"{fraction * 100:g} % copy floor", f"{dirty / MiB:.0f}", f"{floor:.3f}",
                     f"{floor_cpu / (dirty / (1 << 30)):.2f}", f"(QSD/3: {t['qsd'] / 3:.3f} s)"])
        for k in binaries:
            rows.append([f"{fraction * 100:g} % {k}", f"{dirty / MiB:.0f}", f"{t[k]:.3f}",
                         f"{c[k] / (dirty / (1 << 30)):.2f}",
                         f"{benchlib.ratio(t[k], t['qsd']):.2f}" if k != "qsd" else ""])
    print(f"\nincremental backup, {args.inc_size} MiB qcow2, scattered 64 KiB clusters")
    benchlib.print_table(["dirty", "MiB", "s", "cpu s/GiB", "blockd/QSD time"], rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, help="full backup image size, MiB (2048)")
    p.add_argument("--inc-size", type=int, help="incremental image size, MiB (8192)")
    p.add_argument("--reps", type=int, help="repetitions (3)")
    p.add_argument("--dir", default="/dev/shm")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", choices=["full", "incremental"])
    p.add_argument("--blockd", default=benchlib.DEFAULT_BLOCKD)
    p.add_argument("--qsd", default=benchlib.DEFAULT_QSD)
    p.add_argument("--blockd2", action="append", default=[], metavar="[NAME=]PATH",
                   help="another blockd binary measured in the same run (repeatable; NAME "
                        "defaults to blockd-old, blockd-old2, ...)")
    p.add_argument("--fractions", help="incremental dirty fractions, comma-separated (0.001,0.01,0.1)")
    args = p.parse_args()
    q = args.quick
    args.size = args.size or (256 if q else 2048)
    args.inc_size = args.inc_size or (1024 if q else 8192)
    args.reps = args.reps or (1 if q else 3)
    others = {}
    for i, spec in enumerate(args.blockd2):
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = f"blockd-old{i + 1 if i else ''}", spec
        if name in ("blockd", "qsd") or name in others:
            sys.exit(f"--blockd2: name {name!r} taken")
        others[name] = path
    benchlib.check_tools(args.blockd, args.qsd, "qemu-img", "qemu-io", *others.values())
    benchlib.install_cleanup()
    print(benchlib.machine_line())
    binaries = {"blockd": args.blockd, "qsd": args.qsd}
    binaries.update(others)
    work = tempfile.mkdtemp(prefix="bench-backup-", dir=args.dir)
    try:
        if args.only in (None, "full"):
            full(args, work, binaries)
        if args.only in (None, "incremental"):
            incremental(args, work, binaries)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Cost of crash-safe persistent bitmaps (blockd's dirty-region log), beside QSD, in one run.

1. NBD write throughput on a fully allocated qcow2 image, sequential 64 KiB (nbdcopy, 16
   requests in flight) and random 4 KiB (a pipelined client, queue depth 16, a flush every
   1024 writes), for:
     blockd 0      no bitmaps
     blockd 8      8 persistent bitmaps, dirty-region log on (default 4 MiB regions)
     blockd 8 nolog  8 persistent bitmaps, log off (BLOCKD_DIRTY_LOG_REGION_BYTES=0)
     QSD 0 / QSD 8 the same image in qemu-storage-daemon
   Each repetition alternates the order. Reported: medians of throughput and of the daemon's
   CPU time per unit of work (less sensitive to a busy machine), blockd 8 / blockd 0 (the
   target is >= 0.97) and blockd 8 / QSD 8 (>= 1).
2. Extra dirty bytes after kill -9: random 4 KiB writes into N regions after a checkpoint, the
   exact count read before the kill, the recovered count after restart; the surplus per
   touched region, per granularity.
3. Recovery time at open of a 1 TiB image with 8 persistent bitmaps: `blockdev-add` of the
   qcow2 node after a clean shutdown vs after kill -9 with 4096 marked regions.

Images live in --dir (default /dev/shm, where a flush is nearly free: on a real disk every
mark costs one sync, see the module docs of qcow2::dirty_log). Never asserts on timings.
"""

import argparse
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import time

import benchlib as bl

REQ_MAGIC, REPLY_MAGIC = 0x25609513, 0x67446698
CMD_WRITE, CMD_FLUSH = 1, 3


def nbd_open(path, name="x"):
    """Fixed-newstyle handshake with NBD_OPT_GO; simple replies only. Returns the socket."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)

    def recv(n):
        buf = b""
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("NBD server closed")
            buf += chunk
        return buf

    recv(18)
    s.sendall(struct.pack(">I", 3))
    raw = name.encode()
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, 4 + len(raw) + 2)
              + struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
    while True:
        _magic, _opt, rtype, length = struct.unpack(">QIII", recv(20))
        recv(length)
        if rtype == 1:
            return s, recv
        if rtype & 0x80000000:
            raise RuntimeError(f"NBD_OPT_GO refused: {rtype:#x}")


def random_writes(path, size, count, qd=16, bs=4096, seed=7):
    """Seconds for `count` random `bs` writes at queue depth `qd` (flush every 1024)."""
    s, recv = nbd_open(path)
    rng = random.Random(seed)
    payload = rng.randbytes(bs)
    blocks = size // bs
    inflight = 0
    sent = 0
    t0 = time.perf_counter()
    while sent < count or inflight:
        while inflight < qd and sent < count:
            cmd = CMD_FLUSH if sent % 1024 == 1023 else CMD_WRITE
            off = rng.randrange(blocks) * bs
            if cmd == CMD_WRITE:
                s.sendall(struct.pack(">IHHQQI", REQ_MAGIC, 0, cmd, sent, off, bs) + payload)
            else:
                s.sendall(struct.pack(">IHHQQI", REQ_MAGIC, 0, cmd, sent, 0, 0))
            sent += 1
            inflight += 1
        magic, err, _handle = struct.unpack(">IIQ", recv(16))
        if magic != REPLY_MAGIC or err:
            raise RuntimeError(f"write failed: magic {magic:#x} errno {err}")
        inflight -= 1
    dt = time.perf_counter() - t0
    s.close()
    return dt


def seq_writes(uri, src):
    t0 = time.perf_counter()
    subprocess.run(["nbdcopy", "--no-extents", "--flush", "--connections=1", "--requests=16",
                    "--request-size=65536", src, uri], check=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - t0


def start(kind, binary, work, img, nbitmaps, log_region=None):
    if log_region is None:
        os.environ.pop("BLOCKD_DIRTY_LOG_REGION_BYTES", None)
    else:
        os.environ["BLOCKD_DIRTY_LOG_REGION_BYTES"] = str(log_region)
    blockdevs, node = bl.blockdevs_for("qcow2", img)
    d = bl.Daemon(kind, binary, work, blockdevs, node).start()
    nodes = d.qmp.execute("query-named-block-nodes", flat=True)
    have = {b["name"] for n in nodes if n["node-name"] == node for b in n.get("dirty-bitmaps", [])}
    for i in range(nbitmaps):
        if f"p{i}" not in have:  # stored in the image by an earlier repetition
            d.qmp.execute("block-dirty-bitmap-add", node=node, name=f"p{i}", persistent=True)
    return d


CONFIGS = [("blockd", 0, None), ("blockd", 8, None), ("blockd", 8, 0), ("qsd", 0, None), ("qsd", 8, None)]


def label(c):
    kind, nb, region = c
    return f"{'QSD' if kind == 'qsd' else 'blockd'} {nb}" + (" nolog" if region == 0 else "")


def throughput(opts, work):
    src = os.path.join(work, "src.raw")
    bl.random_raw(src, opts.size)
    imgs = {}
    for c in CONFIGS:
        imgs[c] = os.path.join(work, f"{label(c).replace(' ', '_')}.qcow2")
        bl.qcow2_from_raw(src, imgs[c])
    bins = {"blockd": opts.blockd, "qsd": opts.qsd}
    res = {}
    for rep in range(opts.reps):
        order = CONFIGS if rep % 2 == 0 else CONFIGS[::-1]
        for c in order:
            d = start(c[0], bins[c[0]], work, imgs[c], c[1], c[2])
            try:
                cpu0 = d.cpu_seconds()
                seq = opts.size / bl.MiB / seq_writes(d.uri, src)
                cpu1 = d.cpu_seconds()
                rnd = opts.count / random_writes(d.nbd_sock, opts.size, opts.count)
                cpu2 = d.cpu_seconds()
            finally:
                d.stop()
            res.setdefault((c, "seq"), []).append(seq)
            res.setdefault((c, "rnd"), []).append(rnd)
            res.setdefault((c, "seq-cpu"), []).append((cpu1 - cpu0) / (opts.size / (1 << 30)))
            res.setdefault((c, "rnd-cpu"), []).append((cpu2 - cpu1) / opts.count * 1e6)
            if opts.verbose:
                print(f"  {label(c)}: seq {seq:.0f} MiB/s, rand {rnd:.0f} IOPS", flush=True)
    rows = [[label(c), f"{bl.median(res[(c, 'seq')]):.0f}", f"{bl.median(res[(c, 'rnd')]):.0f}",
             f"{bl.median(res[(c, 'seq-cpu')]):.2f}", f"{bl.median(res[(c, 'rnd-cpu')]):.1f}"]
            for c in CONFIGS]
    print()
    bl.print_table(["config", "seq 64K MiB/s", "rand 4K QD16 IOPS", "seq CPU s/GiB",
                    "rand CPU us/write"], rows)
    m = {k: bl.median(v) for k, v in res.items()}
    b0, b8, bn, q8 = CONFIGS[0], CONFIGS[1], CONFIGS[2], CONFIGS[4]
    print()
    bl.print_table(["ratio", "seq 64K", "rand 4K"], [
        ["blockd 8 / blockd 0", f"{m[(b8, 'seq')] / m[(b0, 'seq')]:.3f}", f"{m[(b8, 'rnd')] / m[(b0, 'rnd')]:.3f}"],
        ["blockd 8 / blockd 8 nolog", f"{m[(b8, 'seq')] / m[(bn, 'seq')]:.3f}",
         f"{m[(b8, 'rnd')] / m[(bn, 'rnd')]:.3f}"],
        ["blockd 8 / QSD 8", f"{m[(b8, 'seq')] / m[(q8, 'seq')]:.3f}", f"{m[(b8, 'rnd')] / m[(q8, 'rnd')]:.3f}"],
    ])


def kill9(d):
    d.proc.kill()
    d.proc.wait()
    if d in bl._LIVE:
        bl._LIVE.remove(d)
    shutil.rmtree(d.dir, ignore_errors=True)


def counts(d):
    nodes = d.qmp.execute("query-named-block-nodes", flat=True)
    n = next(x for x in nodes if x["node-name"] == d.node)
    return {b["name"]: b for b in n.get("dirty-bitmaps", [])}


def extra_dirty(opts, work):
    img = os.path.join(work, "extra.qcow2")
    size = 4 << 30
    bl.empty_qcow2(img, size)
    region = 4 << 20
    grans = [512, 4096, 65536, 1 << 20]
    d = start("blockd", opts.blockd, work, img, 0)
    for g in grans:
        d.qmp.execute("block-dirty-bitmap-add", node=d.node, name=f"g{g}", persistent=True, granularity=g)
    d.stop()  # stored cleanly: the log starts empty at the next claim
    d = start("blockd", opts.blockd, work, img, 0)
    rng = random.Random(3)
    regions = rng.sample(range(size // region), 64)
    for r in regions:
        for _ in range(4):
            off = r * region + rng.randrange(region // 4096) * 4096
            d.qmp.execute("human-monitor-command", **{"command-line": f'qemu-io n0 "write {off} 4k"'})
    before = {k: v["count"] for k, v in counts(d).items()}
    kill9(d)
    d = start("blockd", opts.blockd, work, img, 0)
    after = counts(d)
    d.stop()
    print()
    print(f"extra dirty bytes after kill -9: 4 random 4 KiB writes in each of {len(regions)} "
          f"regions of {region >> 20} MiB")
    bl.print_table(["granularity", "exact", "recovered", "extra per touched region"], [
        [g, before[f"g{g}"], after[f"g{g}"]["count"],
         (after[f"g{g}"]["count"] - before[f"g{g}"]) // len(regions)]
        for g in grans
    ])


def recovery_time(opts, work):
    img = os.path.join(work, "tib.qcow2")
    bl.empty_qcow2(img, 1 << 40)
    d = start("blockd", opts.blockd, work, img, 8)
    d.stop()

    def open_time():
        """A daemon without the image; returns it and the seconds `blockdev-add` of the qcow2
        node (which loads, and after a crash recovers, the bitmaps) takes."""
        os.environ.pop("BLOCKD_DIRTY_LOG_REGION_BYTES", None)
        d = bl.Daemon("blockd", opts.blockd, work, ["driver=null-co,node-name=dummy"], "dummy").start()
        d.qmp.execute("blockdev-add", driver="file", **{"node-name": "f0", "filename": img})
        t0 = time.perf_counter()
        d.qmp.execute("blockdev-add", driver="qcow2", **{"node-name": "n0", "file": "f0"})
        dt = time.perf_counter() - t0
        d.node = "n0"
        return d, dt

    d, clean = open_time()
    rng = random.Random(5)
    n_regions = 4096
    nregions_total = (1 << 40) // (4 << 20)
    for r in rng.sample(range(nregions_total), n_regions):
        off = r * (4 << 20)
        d.qmp.execute("human-monitor-command", **{"command-line": f'qemu-io n0 "write {off} 512"'})
    kill9(d)
    d, crashed = open_time()
    recovered = all("inconsistent" not in b for b in counts(d).values())
    d.stop()
    print()
    print("open of a 1 TiB qcow2 with 8 persistent bitmaps (64 KiB granularity): blockdev-add")
    bl.print_table(["after", "seconds"], [
        ["clean shutdown", f"{clean:.3f}"],
        [f"kill -9, {n_regions} marked regions ({'recovered' if recovered else 'NOT recovered'})",
         f"{crashed:.3f}"],
    ])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="256 MiB, 20000 random writes, 2 repetitions")
    p.add_argument("--size", type=int, help="image size in MiB (default 1024)")
    p.add_argument("--count", type=int, help="random writes per measurement (default 100000)")
    p.add_argument("--reps", type=int, help="repetitions (default 3)")
    p.add_argument("--only", default="throughput,extra,recovery")
    bl.add_daemon_args(p)
    opts = p.parse_args()
    opts.size = (opts.size or (256 if opts.quick else 1024)) * bl.MiB
    opts.count = opts.count or (20000 if opts.quick else 100000)
    opts.reps = opts.reps or (2 if opts.quick else 3)
    bl.check_tools(opts.blockd, opts.qsd, "nbdcopy", "qemu-img")
    bl.install_cleanup()
    print(f"# dirty_log  {bl.machine_line()}  size={opts.size // bl.MiB}MiB reps={opts.reps} dir={opts.dir}")
    with bl.work_dir(opts.dir, prefix="blockd-dlog-") as work:
        parts = opts.only.split(",")
        if "throughput" in parts:
            throughput(opts, work)
        if "extra" in parts:
            extra_dirty(opts, work)
        if "recovery" in parts:
            recovery_time(opts, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""blockd-backup against the same QMP sequence scripted by hand, on QSD and blockd.

A benchmark, not a test. For each daemon: a 2 GiB fully allocated qcow2 (random data) served
with a writable NBD export; then

* full backup: the tool (pull: fleecing + NBD, several connections) and the tool in push mode,
  against the hand-written sequence: push = `transaction [bitmap-add, blockdev-backup sync=full]`
  + wait for the job; pull = the same fleecing QMP + `qemu-img convert` of the export;
* 1 % incremental (328 scattered 64 KiB writes through NBD): the tool in push mode against the
  hand-written push sequence `transaction [bitmap-add new, add+merge frozen copy,
  blockdev-backup sync=incremental]`, and the tool in pull mode against a hand-written pull:
  the same fleecing QMP as the tool with the frozen bitmap on the export, then libnbd reads the
  dirty extents (block status on `qemu:dirty-bitmap:...`) and writes them into a qcow2 overlay
  of the previous backup served by qemu-nbd (needs python3-libnbd).

Both blockd and QSD have backup jobs, so both run live (fleecing / push). A daemon without them
(an old blockd) runs the tool with `--offline` (no fleecing) and the hand sequence "export +
qemu-img convert" for the full only.

The tool does more than the hand script: it checksums the new file (BLAKE3) and every 64 KiB of
the point's content (hashed while copying in pull mode, read back after a push), writes and
fsyncs a manifest, and cleans up and retires bitmaps. The hand script waits for jobs and
exports by polling every 1 ms.

    python3 bench/backup_tool.py [--size-gib 2] [--reps 3] [--interleave] [--daemons qsd,blockd]
                                 [--dir /dev/shm]

Prints per daemon: the median over --reps of wall seconds, CPU seconds of the client (the tool,
or the hand script with its qemu-img) and of the daemon, for each row; then tool / hand ratios
of wall time and of CPU (client + daemon) with the 10 % verdict on wall time, for the push pairs
the CPU floor (the lowest wall ratio the machine's cores allow: the hand run's CPU plus the tool's
extra client CPU over all cores, against the hand run's wall; see `cpu_floor`), and the load average before
and after. With --interleave the order of tool and hand flips every rep (the
three 1 % incrementals rotate), so neither always runs first on a machine whose load changes.
"""

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

try:
    import nbd  # libnbd's Python binding (Debian: python3-libnbd)
except ImportError:  # a Python of its own (pyenv) does not see the distribution's packages
    sys.path.append("/usr/lib/python3/dist-packages")
    import nbd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import MiB, Daemon, Qmp  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.environ.get("BLOCKD_BACKUP", os.path.join(REPO, "target", "release", "blockd-backup"))


class Sample:
    """Wall seconds and CPU seconds of the client (this process and its children, e.g. the tool
    or qemu-img) and of the daemon, over one run."""

    def __init__(self, d):
        self.d = d

    def __enter__(self):
        self.t = time.monotonic()
        self.c = _client_cpu()
        self.dc = self.d.cpu_seconds()
        return self

    def __exit__(self, *exc):
        self.wall = time.monotonic() - self.t
        self.client = _client_cpu() - self.c
        self.daemon = self.d.cpu_seconds() - self.dc
        return False


def _client_cpu():
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def measure(rows, key, d, fn):
    with Sample(d) as s:
        fn()
    rows.setdefault(key, []).append(s)


def tool(d, repo, *args, binary=None):
    argv = [binary or TOOL, "--repo", repo, "--machine", "bench", *args, "--qmp", d.qmp_sock,
            "--nbd-socket", d.nbd_sock, "--disk", d.node]
    p = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"blockd-backup {' '.join(args)}: exit {p.returncode}: {p.stderr.strip()}")


def writes_1pct(d, size, seed):
    rng = random.Random(seed)
    n = size // 100 // (64 * 1024)
    cmds = []
    for _ in range(n):
        off = rng.randrange(0, size // 65536) * 65536
        cmds += ["-c", f"write -P {rng.randrange(1, 255)} {off} 64k"]
    subprocess.run(["qemu-io", "-f", "raw", *cmds, d.uri], check=True, stdout=subprocess.DEVNULL)


def wait_job(q, job):
    while True:
        jobs = q.execute("query-jobs")
        j = [x for x in jobs if x["id"] == job]
        if not j:
            return
        if j[0]["status"] == "concluded":
            if j[0].get("error"):
                raise RuntimeError(j[0]["error"])
            q.execute("job-dismiss", id=job)
            return
        time.sleep(0.001)


def hand_push(d, work, tag, size, src_bitmap=None):
    """The QMP sequence a script would send for a push backup into a new qcow2."""
    tgt = os.path.join(work, f"hand-{tag}.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", tgt, str(size)], check=True)
    q = Qmp(d.qmp_sock)
    try:
        q.execute("blockdev-add", driver="qcow2", **{"node-name": f"ht-{tag}"},
                  file={"driver": "file", "filename": tgt})
        acts = [{"type": "block-dirty-bitmap-add", "data": {"node": d.node, "name": f"hb-{tag}"}}]
        backup = {"job-id": f"hj-{tag}", "device": d.node, "target": f"ht-{tag}", "sync": "full",
                  "auto-dismiss": False}
        if src_bitmap:
            acts += [{"type": "block-dirty-bitmap-add", "data": {"node": d.node, "name": f"hx-{tag}", "disabled": True}},
                     {"type": "block-dirty-bitmap-merge", "data": {"node": d.node, "target": f"hx-{tag}", "bitmaps": [src_bitmap]}}]
            backup.update(sync="incremental", bitmap=f"hx-{tag}")
        acts.append({"type": "blockdev-backup", "data": backup})
        q.execute("transaction", actions=acts)
        wait_job(q, f"hj-{tag}")
        q.execute("blockdev-del", **{"node-name": f"ht-{tag}"})
        if src_bitmap:
            q.execute("block-dirty-bitmap-remove", node=d.node, name=f"hx-{tag}")
    finally:
        q.close()


def hand_pull_full(d, work, tag, live):
    """Fleecing (or a plain export when offline) + qemu-img convert of the export."""
    q = Qmp(d.qmp_sock)
    scratch = os.path.join(work, f"scratch-{tag}.qcow2")
    out = os.path.join(work, f"handpull-{tag}.qcow2")
    try:
        node = d.node
        if live:
            size = q.execute("query-named-block-nodes", flat=True)
            size = [n for n in size if n["node-name"] == d.node][0]["image"]["virtual-size"]
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", scratch, str(size)], check=True)
            q.execute("blockdev-add", driver="qcow2", **{"node-name": f"hs-{tag}"},
                      file={"driver": "file", "filename": scratch})
            q.execute("transaction", actions=[{"type": "blockdev-backup", "data": {
                "job-id": f"hf-{tag}", "device": d.node, "target": f"hs-{tag}", "sync": "none",
                "filter-node-name": f"hfl-{tag}"}}])
            q.execute("blockdev-add", driver="snapshot-access", **{"node-name": f"ha-{tag}"}, file=f"hfl-{tag}")
            node = f"ha-{tag}"
        q.execute("block-export-add", type="nbd", id=f"he-{tag}", **{"node-name": node}, name=f"he-{tag}")
        subprocess.run(["qemu-img", "convert", "-W", "-m", "4", "-f", "raw", "-O", "qcow2",
                        f"nbd+unix:///he-{tag}?socket={d.nbd_sock}", out], check=True)
        q.execute("block-export-del", id=f"he-{tag}")
        while any(e["id"] == f"he-{tag}" for e in q.execute("query-block-exports")):
            time.sleep(0.001)
        if live:
            q.execute("blockdev-del", **{"node-name": f"ha-{tag}"})
            q.execute("job-cancel", id=f"hf-{tag}")
            wait_job(q, f"hf-{tag}")
            q.execute("blockdev-del", **{"node-name": f"hs-{tag}"})
    finally:
        q.close()
        for p in (scratch, out):
            if os.path.exists(p):
                os.unlink(p)


def hand_pull_inc(d, work, tag, size, src_bitmap):
    """A pull incremental as a person would script it with libnbd: the same fleecing QMP as the
    tool (scratch node, one transaction [new bitmap, frozen copy of `src_bitmap`, backup
    sync=none with a filter], snapshot-access, an export carrying the frozen bitmap), then read
    the dirty extents (NBD block status on `qemu:dirty-bitmap:...`) and write them into a qcow2
    overlay (served by qemu-nbd, started by libnbd), then tear the fleecing down and drop the
    frozen copy. The overlay's backing stands in for the previous backup: an empty qcow2 of the
    disk's size (whole 64 KiB clusters are written, so nothing of it is read; keeping a real
    2 GiB full around for it would only cost memory)."""
    scratch = os.path.join(work, f"scratch-{tag}.qcow2")
    out = os.path.join(work, f"handinc-{tag}.qcow2")
    base = os.path.join(work, f"handbase-{tag}.qcow2")
    frozen = f"hx-{tag}"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", scratch, str(size)], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, str(size)], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", out],
                   check=True)
    q = Qmp(d.qmp_sock)
    try:
        q.execute("blockdev-add", driver="qcow2", **{"node-name": f"hs-{tag}"},
                  file={"driver": "file", "filename": scratch})
        q.execute("transaction", actions=[
            {"type": "block-dirty-bitmap-add", "data": {"node": d.node, "name": f"hb-{tag}"}},
            {"type": "block-dirty-bitmap-add", "data": {"node": d.node, "name": frozen, "disabled": True}},
            {"type": "block-dirty-bitmap-merge", "data": {"node": d.node, "target": frozen, "bitmaps": [src_bitmap]}},
            {"type": "blockdev-backup", "data": {"job-id": f"hf-{tag}", "device": d.node,
                                                 "target": f"hs-{tag}", "sync": "none",
                                                 "filter-node-name": f"hfl-{tag}"}}])
        q.execute("blockdev-add", driver="snapshot-access", **{"node-name": f"ha-{tag}"}, file=f"hfl-{tag}")
        q.execute("block-export-add", type="nbd", id=f"he-{tag}", **{"node-name": f"ha-{tag}"},
                  name=f"he-{tag}", bitmaps=[{"node": d.node, "name": frozen}])
        ctx = f"qemu:dirty-bitmap:{frozen}"
        src = nbd.NBD()
        src.add_meta_context(ctx)
        src.set_export_name(f"he-{tag}")
        src.connect_unix(d.nbd_sock)
        dirty = []
        reached = [0]

        def extent(metacontext, offset, entries, err):
            if metacontext == ctx:
                for i in range(0, len(entries), 2):
                    if entries[i + 1] & 1:
                        dirty.append((offset, entries[i]))
                    offset += entries[i]
                reached[0] = offset
            return 0

        while reached[0] < size:  # the server may answer for less than asked: go on from there
            src.block_status(min(size - reached[0], 1 << 30), reached[0], extent)
        dirty = [(o, min(n, size - o)) for o, n in dirty]
        dst = nbd.NBD()
        dst.connect_systemd_socket_activation(["qemu-nbd", "-f", "qcow2", out])
        for o, n in dirty:
            while n:
                m = min(n, 32 << 20)
                dst.pwrite(src.pread(m, o), o)
                o += m
                n -= m
        dst.flush()
        dst.shutdown()
        src.shutdown()
        q.execute("block-export-del", id=f"he-{tag}")
        while any(e["id"] == f"he-{tag}" for e in q.execute("query-block-exports")):
            time.sleep(0.001)
        q.execute("blockdev-del", **{"node-name": f"ha-{tag}"})
        q.execute("job-cancel", id=f"hf-{tag}")
        wait_job(q, f"hf-{tag}")
        q.execute("blockdev-del", **{"node-name": f"hs-{tag}"})
        q.execute("block-dirty-bitmap-remove", node=d.node, name=frozen)
    finally:
        q.close()
        for p in (scratch, base):
            if os.path.exists(p):
                os.unlink(p)


def one_daemon(doc, default_reps, old_tool=False):
    """Shared start of the one-daemon benchmarks (pull_full.py, push_follow.py, push_inc.py):
    their arguments (--daemon, --reps, --size-gib, --dir, and with `old_tool` --old-tool), a
    work folder holding a fully allocated qcow2 of random data served by the daemon (monitor
    closed: the tool and the hand script take it in turn). Returns (args, size in bytes, work
    folder, daemon)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--daemon", default="blockd", choices=["blockd", "qsd"])
    ap.add_argument("--reps", type=int, default=default_reps)
    ap.add_argument("--size-gib", type=int, default=2)
    ap.add_argument("--dir", default="/dev/shm")
    if old_tool:
        ap.add_argument("--old-tool", metavar="PATH",
                        help="another blockd-backup binary, run as row 'old' beside 'tool' (A/B)")
    args = ap.parse_args()
    size = args.size_gib << 30
    binary = {"blockd": os.path.join(REPO, "target", "release", "blockd"),
              "qsd": shutil.which("qemu-storage-daemon")}[args.daemon]
    if not binary or not os.path.exists(binary):
        sys.exit(f"no {args.daemon} binary")
    work = tempfile.mkdtemp(prefix=f"{args.daemon}-", dir=args.dir)
    raw = os.path.join(work, "src.raw")
    benchlib.random_raw(raw, size)
    img = os.path.join(work, "disk.qcow2")
    benchlib.qcow2_from_raw(raw, img)
    os.unlink(raw)
    d = Daemon(args.daemon, binary, work, [f"driver=file,node-name=f0,filename={img}",
                                          "driver=qcow2,node-name=disk0,file=f0"], "disk0").start()
    d.qmp.close()
    d.qmp = None
    return args, size, work, d


def print_rows(daemon, rows, ms=False):
    """One line per row of (wall, client CPU, daemon CPU) samples: the walls, min and median,
    the median against the "hand" row's, and the CPU medians; in ms or s."""
    k_ = 1e3 if ms else 1.0
    unit = "ms" if ms else "s"
    hand_med = statistics.median(x[0] for x in next(iter(rows.values())))
    width = max(len(k) for k in rows)
    for k, v in rows.items():
        m = statistics.median(x[0] for x in v)
        print(f"{daemon:6} {k:{width}} wall {unit} {' '.join('%.3g' % (x[0] * k_) for x in v)}"
              f" | min {min(x[0] for x in v) * k_:.4g} med {m * k_:.4g} ({m / hand_med:.2f} of hand)"
              f" | client CPU {statistics.median(x[1] for x in v) * k_:.3g}"
              f" daemon CPU {statistics.median(x[2] for x in v) * k_:.3g} {unit}")


def remove_all_bitmaps(d):
    """Remove every bitmap of the disk (the one-daemon benchmarks start each run clean)."""
    q = Qmp(d.qmp_sock)
    try:
        for n in q.execute("query-named-block-nodes", flat=True):
            if n["node-name"] == d.node:
                for b in n.get("dirty-bitmaps", []):
                    q.execute("block-dirty-bitmap-remove", node=d.node, name=b["name"])
    finally:
        q.close()


def prewarm(work, nbytes):
    """Touch `nbytes` of fresh memory (a file in `work`) and free it, so that the next run gets
    pages the host has just faulted in (see bench/README.md: on some VMs fresh memory is slow).
    Before each 2 GiB run of pull_full.py it made the runs noisier (2026-12-04 07:07: twice the
    memory churned), so the one-daemon full benchmarks do without."""
    path = os.path.join(work, "prewarm")
    with open(path, "wb") as f:
        chunk = b"\x01" * (8 * MiB)
        for _ in range(max(1, nbytes // len(chunk))):
            f.write(chunk)
    os.unlink(path)


def run_rotating(args, d, work, order_of):
    """The one-daemon benchmarks' loop: per rep the runs `order_of(rep)` gives as (row, fn),
    rotated by one every rep, each timed and followed by removing every bitmap; then the daemon
    stopped, the work folder removed and the rows printed (the first row is the reference)."""
    rows = {}
    try:
        for rep in range(args.reps):
            order = order_of(rep)
            k = rep % len(order)
            for key, fn in order[k:] + order[:k]:
                rows.setdefault(key, []).append(timed(d, fn))
                remove_all_bitmaps(d)
    finally:
        d.stop()
        shutil.rmtree(work, ignore_errors=True)
    print_rows(args.daemon, rows)


def timed(d, fn):
    """Run fn(); its `Sample` as (wall s, client CPU s, daemon CPU s)."""
    with Sample(d) as s:
        fn()
    return s.wall, s.client, s.daemon


def has_backup(d):
    q = Qmp(d.qmp_sock)
    try:
        return any(e.get("name") == "blockdev-backup" for e in q.execute("query-qmp-schema"))
    finally:
        q.close()


def bench_daemon(kind, binary, args, raw):
    work = tempfile.mkdtemp(prefix=f"bb-{kind}-", dir=args.dir)
    img = os.path.join(work, "disk.qcow2")
    benchlib.qcow2_from_raw(raw, img)
    d = Daemon(kind, binary, work, [f"driver=file,node-name=f0,filename={img}",
                                    "driver=qcow2,node-name=disk0,file=f0"], "disk0").start()
    d.qmp.close()  # the tool and the hand script take the (single-client) monitor in turn
    d.qmp = None
    size = args.size_gib << 30
    live = has_backup(d)
    extra = [] if live else ["--offline"]
    rows = {}

    def bitmaps():
        q = Qmp(d.qmp_sock)
        try:
            nodes = q.execute("query-named-block-nodes", flat=True)
            return {b["name"] for n in nodes if n["node-name"] == d.node for b in n.get("dirty-bitmaps", [])}
        finally:
            q.close()

    def remove_bitmaps(names):
        q = Qmp(d.qmp_sock)
        try:
            for name in names:
                q.execute("block-dirty-bitmap-remove", node=d.node, name=name)
        finally:
            q.close()

    def pair(rep, a, b):
        """Run the two (key, fn, output) in turn; with --interleave the order flips every rep.
        A full's output (file or repository) and the bitmaps it added are removed right after
        it is measured, so a rep holds at most one new full besides the bases."""
        for key, fn, out in ((a, b) if not (args.interleave and rep % 2) else (b, a)):
            before = bitmaps()
            prewarm(work, size)
            measure(rows, key, d, fn)
            if os.path.isdir(out):
                shutil.rmtree(out)
            elif os.path.exists(out):
                os.unlink(out)
            remove_bitmaps(bitmaps() - before)

    # The incrementals' bases, made once and unmeasured: a full in each tool repository and,
    # for the hand scripts, their first tracking bitmaps (no write in between, so all start
    # from the same instant). Each rep's incrementals then go on top of the last ones, so the
    # bench holds the source, these bases and one full's output at a time.
    repo = os.path.join(work, "repo")
    prepo = os.path.join(work, "prepo")
    tool(d, repo, "full", *extra)
    if live:
        tool(d, prepo, "full", "--push")
        q = Qmp(d.qmp_sock)
        try:
            q.execute("transaction", actions=[
                {"type": "block-dirty-bitmap-add", "data": {"node": d.node, "name": n}}
                for n in ("hb-i-base", "hb-pi-base")])
        finally:
            q.close()
    try:
        for rep in range(args.reps):
            frepo = os.path.join(work, "frepo")
            fprepo = os.path.join(work, "fprepo")
            pair(rep, (FULL_TOOL_PULL, lambda: tool(d, frepo, "full", *extra), frepo),
                 (FULL_HAND_PULL, lambda: hand_pull_full(d, work, f"p{rep}", live), ""))
            if live:
                pair(rep, (FULL_TOOL_PUSH, lambda: tool(d, fprepo, "full", "--push"), fprepo),
                     (FULL_HAND_PUSH, lambda: hand_push(d, work, f"f{rep}", size),
                      os.path.join(work, f"hand-f{rep}.qcow2")))
            writes_1pct(d, size, rep)
            if live:
                # The hand sequences and both tool modes each back up the same 1 % of changes;
                # each hand sequence goes on from the bitmap its previous run added.
                hb_i = "hb-i-base" if rep == 0 else f"hb-i{rep - 1}"
                hb_pi = "hb-pi-base" if rep == 0 else f"hb-pi{rep - 1}"
                order = [(INC_TOOL_PULL, lambda: tool(d, repo, "inc", *extra)),
                         (INC_TOOL_PUSH, lambda: tool(d, prepo, "inc", "--push")),
                         (INC_HAND_PUSH, lambda: hand_push(d, work, f"i{rep}", size, src_bitmap=hb_i)),
                         (INC_HAND_PULL, lambda: hand_pull_inc(d, work, f"pi{rep}", size, hb_pi))]
                if args.interleave:
                    order = order[rep % 4:] + order[:rep % 4]
                for key, fn in order:
                    measure(rows, key, d, fn)
                remove_bitmaps([hb_i, hb_pi])
                for f in (f"hand-i{rep}.qcow2", f"handinc-pi{rep}.qcow2"):
                    st = os.stat(os.path.join(work, f))
                    if st.st_blocks * 512 < size // 100 * 9 // 10:
                        raise RuntimeError(f"{f}: {st.st_blocks * 512} bytes, not the 1 % written")
            else:
                measure(rows, INC_TOOL_PULL, d, lambda: tool(d, repo, "inc", *extra))
            for f in (f"hand-i{rep}.qcow2", f"handinc-pi{rep}.qcow2"):
                if os.path.exists(os.path.join(work, f)):
                    os.unlink(os.path.join(work, f))
    finally:
        d.stop()
        shutil.rmtree(work, ignore_errors=True)
    return rows, live


FULL_TOOL_PULL = "full: tool pull"
FULL_HAND_PULL = "full: hand pull (fleece + qemu-img convert)"
FULL_TOOL_PUSH = "full: tool push"
FULL_HAND_PUSH = "full: hand push"
INC_TOOL_PULL = "1% inc: tool pull"
INC_TOOL_PUSH = "1% inc: tool push"
INC_HAND_PUSH = "1% inc: hand push"
INC_HAND_PULL = "1% inc: hand pull (fleece + libnbd + qemu-nbd)"
PAIRS = [(FULL_TOOL_PULL, FULL_HAND_PULL), (FULL_TOOL_PUSH, FULL_HAND_PUSH),
         (INC_TOOL_PULL, INC_HAND_PULL), (INC_TOOL_PUSH, INC_HAND_PUSH)]


def med(samples, attr):
    return statistics.median(getattr(s, attr) for s in samples)


def cpu_floor(tool_rows, hand_rows):
    """For a push pair (the tool waits for the same daemon job as the hand script): the lowest
    wall ratio tool / hand this machine allows, whatever the tool overlaps: the hand run's CPU
    (client + daemon) plus the CPU the tool spends beyond the hand script's client, spread over
    every core, against the hand run's wall (at least 1). A push's extra CPU is its hashing pass
    over the new file, which the daemon's job leaves few idle cycles to hide in."""
    cores = os.cpu_count() or 1
    hand = med(hand_rows, "client") + med(hand_rows, "daemon")
    extra = max(0.0, med(tool_rows, "client") - med(hand_rows, "client"))
    return max(1.0, (hand + extra) / cores / med(hand_rows, "wall"))


def report(kind, rows, live, goal):
    print(f"\n{kind} ({'live: fleecing / push' if live else 'offline: no backup jobs in this daemon'}),"
          f" medians of {max(len(v) for v in rows.values())}")
    print(f"  {'':46s} {'wall s':>7s} {'client CPU':>10s} {'daemon CPU':>10s}")
    for k, v in rows.items():
        print(f"  {k:46s} {med(v, 'wall'):7.3f} {med(v, 'client'):10.2f} {med(v, 'daemon'):10.2f}")
    out = {}
    for a, b in PAIRS:
        if a in rows and b in rows:
            wall = med(rows[a], "wall") / med(rows[b], "wall")
            cpu = (med(rows[a], "client") + med(rows[a], "daemon")) / \
                (med(rows[b], "client") + med(rows[b], "daemon"))
            met = "met" if wall <= goal else "NOT met"
            line = f"  {a} / {b}: wall {wall:.2f}, CPU (client + daemon) {cpu:.2f}: " \
                f"{(goal - 1) * 100:.0f} % {met}"
            out[f"{a} / {b}"] = {"wall": round(wall, 3), "cpu": round(cpu, 3)}
            if b in (FULL_HAND_PUSH, INC_HAND_PUSH):
                floor = cpu_floor(rows[a], rows[b])
                line += f"; CPU floor {floor:.2f}"
                out[f"{a} / {b}"]["floor"] = round(floor, 3)
            print(line)
    print(json.dumps({"daemon": kind, "ratios": out, "samples": {
        k: [[round(s.wall, 3), round(s.client, 3), round(s.daemon, 3)] for s in v]
        for k, v in rows.items()}}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--interleave", action="store_true",
                    help="alternate which of tool and hand runs first in each rep")
    ap.add_argument("--daemons", default="qsd,blockd")
    ap.add_argument("--dir", default="/dev/shm")
    args = ap.parse_args()
    benchlib.install_cleanup()
    raw = os.path.join(args.dir, f"bb-bench-{os.getpid()}.raw")  # own name: benches may overlap
    benchlib.random_raw(raw, args.size_gib << 30)
    bins = {"qsd": benchlib.DEFAULT_QSD, "blockd": benchlib.DEFAULT_BLOCKD}
    print(benchlib.machine_line())
    try:
        for kind in args.daemons.split(","):
            rows, live = bench_daemon(kind, bins[kind], args, raw)
            report(kind, rows, live, 1.10)
            print(benchlib.machine_line())
    finally:
        os.unlink(raw)


if __name__ == "__main__":
    main()

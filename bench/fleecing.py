#!/usr/bin/env python3
"""Pull-mode backup (image fleecing) under a busy writer, blockd vs qemu-storage-daemon.

Per repetition and daemon (fresh daemon, fresh copy of a fully allocated qcow2 disk of --size):
- the libvirt pull graph: disk (qcow2) <- cbw (copy-before-write, target = scratch, a qcow2
  overlay backed by the disk) <- access (snapshot-access); the view (access) is exported
  read-only, the writer's export sits on cbw;
- at once: a reader pulls the whole view with `nbdcopy VIEW null:` and a writer rewrites 25 % of
  the disk through the cbw export (`qemu-img bench -w`: 64 KiB writes every 256 KiB, depth 16);
- measured: reader MiB/s (view size / nbdcopy time), writer MiB/s (bytes written / bench time),
  scratch space used (allocated bytes of the scratch file afterwards), daemon CPU seconds.

Prints medians and the ratios blockd/QSD (throughput: > 1 means blockd faster; scratch: < 1
means blockd used less). Never asserts on timings. Daemons run one at a time, alternating order.
"""

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time

import benchlib as bl

WRITE = 64 * 1024
STEP = 256 * 1024


def fleece_blockdevs(disk, scratch):
    return [
        f"driver=file,node-name=df,filename={disk}",
        "driver=qcow2,node-name=disk,file=df",
        f"driver=file,node-name=sf,filename={scratch}",
        "driver=qcow2,node-name=scratch,file=sf,backing=disk",
        "driver=copy-before-write,node-name=cbw,file=disk,target=scratch",
        "driver=snapshot-access,node-name=access,file=cbw",
    ]


def timed(argv, out):
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    out.append(time.perf_counter() - t0)


def one_run(kind, binary, work, base, size, with_writer=True):
    disk = os.path.join(work, f"{kind}-disk.qcow2")
    scratch = os.path.join(work, f"{kind}-scratch.qcow2")
    shutil.copyfile(base, disk)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", disk, scratch, str(size)],
                   check=True)
    # The daemon's own export "x" is the writer's: on cbw, writable.
    d = bl.Daemon(kind, binary, work, fleece_blockdevs(disk, scratch), "cbw").start()
    try:
        d.qmp.execute("block-export-add", type="nbd", id="v", **{"node-name": "access"}, name="view")
        view = f"nbd+unix:///view?socket={d.nbd_sock}"
        count = size // STEP if with_writer else 1
        reader, writer = [], []
        cpu0 = d.cpu_seconds()
        w = threading.Thread(target=timed, args=(
            ["qemu-img", "bench", "-w", "-f", "raw", "-t", "none", "-c", str(count), "-d", "16",
             "-s", str(WRITE), "-S", str(STEP), d.uri], writer))
        w.start()
        timed(["nbdcopy", view, "null:"], reader)
        w.join()
        cpu = d.cpu_seconds() - cpu0
        used = os.stat(scratch).st_blocks * 512
        return {
            "read": size / bl.MiB / reader[0],
            "write": count * WRITE / bl.MiB / writer[0],
            "scratch": used / bl.MiB,
            "cpu": cpu,
        }
    finally:
        d.stop()
        for p in (disk, scratch):
            if os.path.exists(p):
                os.unlink(p)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="256 MiB, 1 repetition")
    p.add_argument("--size", type=int, help="disk size in MiB (default 2048)")
    p.add_argument("--reps", type=int, help="repetitions per daemon (default 3)")
    p.add_argument("--no-writer", action="store_true", help="reader alone (one 64 KiB write)")
    bl.add_daemon_args(p)
    opts = p.parse_args()
    opts.size = (opts.size or (256 if opts.quick else 2048)) * bl.MiB
    opts.reps = opts.reps or (1 if opts.quick else 3)
    bl.check_tools(opts.blockd, opts.qsd, "nbdcopy", "qemu-img")
    bl.install_cleanup()

    print(f"# fleecing  {bl.machine_line()}  size={opts.size // bl.MiB}MiB reps={opts.reps} dir={opts.dir}")
    samples = {}
    with bl.work_dir(opts.dir) as work:
        src = os.path.join(work, "src.raw")
        bl.random_raw(src, opts.size)
        base = os.path.join(work, "base.qcow2")
        bl.qcow2_from_raw(src, base)
        os.unlink(src)
        bins = {"blockd": opts.blockd, "qsd": opts.qsd}
        for rep in range(opts.reps):
            for kind in bl.alternate(rep):
                r = one_run(kind, bins[kind], work, base, opts.size, not opts.no_writer)
                for k, v in r.items():
                    samples.setdefault((k, kind), []).append(v)
                if opts.verbose:
                    print(f"  {kind}: read {r['read']:.0f} MiB/s, write {r['write']:.0f} MiB/s, "
                          f"scratch {r['scratch']:.0f} MiB, CPU {r['cpu']:.2f} s", flush=True)

    rows = []
    for key, label in (("read", "reader MiB/s"), ("write", "writer MiB/s"), ("scratch", "scratch MiB"),
                       ("cpu", "daemon CPU s")):
        b = bl.median(samples[(key, "blockd")])
        q = bl.median(samples[(key, "qsd")])
        rows.append([label, f"{b:.1f}", f"{q:.1f}", f"{bl.ratio(b, q):.2f}"])
    print()
    bl.print_table(["measure", "blockd", "QSD", "blockd/QSD"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Cost of blockd's persistent-bitmap checkpoints (a blockd-only feature: QEMU stores
persistent bitmaps only at close, so there is no QSD figure to compare with).

Measures, on a qcow2 image with N persistent bitmaps (64 KiB granularity):
  * checkpoint: `flush` right after a write (bitmaps changed: flush + checkpoint) minus
    `flush` with nothing changed (flush alone), median over repetitions;
  * claim: the first write after a checkpoint flags the bitmaps in use (directory rewrite +
    sync) before landing; its latency minus a plain write's;
  * steady state: 4 KiB writes with a flush every 100 writes, checkpoints on (every 1 s,
    and at flush, rate-limited to one a second) vs off (BLOCKD_BITMAP_CHECKPOINT_SECS=0,
    QEMU's behaviour), as a throughput ratio.
All through HMP `qemu-io`, so absolute times include a QMP round trip; the differences don't.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402


def hmp(d, cmd):
    t = time.perf_counter()
    out = d.qmp.execute("human-monitor-command", **{"command-line": f'qemu-io n "{cmd}"'})
    dt = time.perf_counter() - t
    if "failed" in out:
        raise RuntimeError(out)
    return dt


def start(blockd, workdir, img, checkpoint_secs):
    os.environ["BLOCKD_BITMAP_CHECKPOINT_SECS"] = str(checkpoint_secs)
    d = benchlib.Daemon("blockd", blockd, workdir,
                        [f"file,node-name=f,filename={img}", "qcow2,node-name=n,file=f"], "n")
    return d.start()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blockd", default=benchlib.DEFAULT_BLOCKD)
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--disk-gib", type=int, default=1024, help="virtual disk size (default 1 TiB)")
    ap.add_argument("--bitmaps", type=int, default=8)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.reps = 5
    benchlib.install_cleanup()
    work = tempfile.mkdtemp(prefix="ckpt-", dir=a.dir)
    img = os.path.join(work, "disk.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, f"{a.disk_gib}G"], check=True)
    print(benchlib.machine_line())
    print(f"# disk {a.disk_gib} GiB, {a.bitmaps} persistent bitmaps at 64 KiB granularity "
          f"({a.disk_gib * 16 // 1024} MiB of bitmap data each when fully dirty)")

    d = start(a.blockd, work, img, 3600)  # flush-triggered checkpoints only
    for i in range(a.bitmaps):
        d.qmp.execute("block-dirty-bitmap-add", node="n", name=f"p{i}", persistent=True)
    # Dirty 1% of the granules spread over the disk (sparse bitmaps, as after a day of use).
    step = 100 * 65536
    offsets = list(range(0, min(a.disk_gib << 30, 4096 * step), step))
    for off in offsets:
        hmp(d, f"write {off} 4k")
    hmp(d, "flush")
    time.sleep(1.1)
    changed, idle, first, plain = [], [], [], []
    for r in range(a.reps):
        hmp(d, f"write {(r + 1) * 7 * 65536} 4k")  # claim happens here after the last checkpoint
        time.sleep(1.05)  # let the flush rate limit pass
        changed.append(hmp(d, "flush"))  # flush + checkpoint
        idle.append(hmp(d, "flush"))  # nothing changed: flush only
        first.append(hmp(d, f"write {(r + 1) * 11 * 65536} 4k"))  # first write: claims
        plain.append(hmp(d, f"write {(r + 1) * 11 * 65536 + 4096} 4k"))
    d.stop()

    def ms(xs):
        return statistics.median(xs) * 1000

    print(f"checkpoint (flush+checkpoint minus flush): {ms(changed) - ms(idle):8.2f} ms"
          f"   [flush+checkpoint {ms(changed):.2f} ms, flush {ms(idle):.2f} ms]")
    print(f"claim (first write after a checkpoint):      {ms(first) - ms(plain):8.2f} ms"
          f"   [first {ms(first):.2f} ms, next {ms(plain):.2f} ms]")

    rates = {}
    for secs in ([0, 1] * (1 if a.quick else 2)):
        d = start(a.blockd, work, img, secs)
        n = 2000 if a.quick else 5000
        t = time.perf_counter()
        for i in range(n):
            hmp(d, f"write {(i * 13 % 100000) * 65536} 4k")
            if i % 100 == 99:
                hmp(d, "flush")
        rates.setdefault(secs, []).append(n / (time.perf_counter() - t))
        d.stop()
    on, off = statistics.median(rates[1]), statistics.median(rates[0])
    print(f"steady 4 KiB writes, flush every 100: checkpoints on {on:.0f}/s, "
          f"off {off:.0f}/s, ratio on/off {on / off:.3f}")


if __name__ == "__main__":
    main()

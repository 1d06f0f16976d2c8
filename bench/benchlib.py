"""Shared pieces of the blockd-vs-QSD benchmarks (Python 3 standard library only).

Layout:
- `Daemon`: one blockd or qemu-storage-daemon process exporting one node over NBD on a Unix
  socket, with a QMP monitor; stopped on exit, on Ctrl-C and on SIGTERM.
- `Qmp`: a tiny QMP client (greeting, qmp_capabilities, commands; events skipped).
- `alternate()`: the A/B/A/B order of measurements, `median()` and table printing.
- image helpers: random raw files and fully allocated qcow2 copies of them.

Benchmarks report ratios blockd/QSD measured side by side in one run; they never assert.
"""

import atexit
import contextlib
import json
import os
from pathlib import Path
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

# Override with $BLOCKD / $QSD or --blockd / --qsd.
DEFAULT_BLOCKD = os.environ.get(
    "BLOCKD", str(Path(__file__).resolve().parent.parent / "target" / "release" / "blockd"))
DEFAULT_QSD = os.environ.get("QSD", shutil.which("qemu-storage-daemon") or "qemu-storage-daemon")

MiB = 1 << 20

_LIVE = []  # daemons still running; stopped by _cleanup()


def _cleanup():
    while _LIVE:
        _LIVE[-1].stop()


def _on_signal(signum, _frame):
    # Turn SIGTERM/SIGHUP into the same path as Ctrl-C: unwind, stop daemons, exit.
    raise KeyboardInterrupt(f"signal {signum}")


def install_cleanup():
    """Stop every daemon at exit, on Ctrl-C, SIGTERM and SIGHUP."""
    atexit.register(_cleanup)
    # Explicit, so Ctrl-C also works when started from a shell that ignores SIGINT (`cmd &`).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _on_signal)


class Qmp:
    """A minimal QMP client: one command at a time, replies read line by line, events skipped."""

    def __init__(self, path, timeout=10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.rfile = self.sock.makefile("rb")
        greeting = self._line()
        if "QMP" not in greeting:
            raise RuntimeError(f"no QMP greeting: {greeting}")
        self.execute("qmp_capabilities")

    def _line(self):
        raw = self.rfile.readline()
        if not raw:
            raise RuntimeError("QMP connection closed")
        return json.loads(raw)

    def execute(self, command, **arguments):
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._line()
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeError(f"{command}: {reply['error']}")
            return reply.get("return")

    def close(self):
        try:
            self.rfile.close()
            self.sock.close()
        except OSError:
            pass


class Daemon:
    """blockd or QSD exporting node `node` (last of `blockdevs`) as NBD export `x`."""

    def __init__(self, kind, binary, workdir, blockdevs, node):
        self.kind = kind
        self.binary = binary
        self.dir = tempfile.mkdtemp(prefix=f"{kind}-", dir=workdir)
        self.nbd_sock = os.path.join(self.dir, "nbd.sock")
        self.qmp_sock = os.path.join(self.dir, "qmp.sock")
        self.blockdevs = blockdevs
        self.node = node
        self.proc = None
        self.qmp = None
        self.stderr_path = os.path.join(self.dir, "stderr.log")

    @property
    def uri(self):
        return f"nbd+unix:///x?socket={self.nbd_sock}"

    def start(self):
        args = [self.binary]
        for b in self.blockdevs:
            args += ["--blockdev", b]
        args += [
            "--chardev", f"socket,id=m,path={self.qmp_sock},server=on,wait=off",
            "--monitor", "chardev=m",
            "--nbd-server", f"addr.type=unix,addr.path={self.nbd_sock}",
            "--export", f"type=nbd,id=e,node-name={self.node},name=x,writable=on",
        ]
        err = open(self.stderr_path, "wb")
        # Own session: a terminal Ctrl-C reaches only us; we stop the daemons in order.
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True
        )
        err.close()
        _LIVE.append(self)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                with open(self.stderr_path, "rb") as f:
                    msg = f.read().decode(errors="replace")
                raise RuntimeError(f"{self.kind} exited at start: {msg.strip()}")
            if os.path.exists(self.nbd_sock) and os.path.exists(self.qmp_sock):
                try:
                    self.qmp = Qmp(self.qmp_sock)
                    break
                except (OSError, RuntimeError):
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind} did not start")
            time.sleep(0.05)
        return self

    def cpu_seconds(self):
        """User + system CPU time used so far by the daemon (all its threads)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # After "pid (comm)": state is field 3; utime and stime are fields 14 and 15.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def add_bitmaps(self, count):
        for i in range(count):
            self.qmp.execute("block-dirty-bitmap-add", node=self.node, name=f"bench{i}")

    def remove_bitmaps(self, count):
        for i in range(count):
            self.qmp.execute("block-dirty-bitmap-remove", node=self.node, name=f"bench{i}")

    def stop(self):
        if self in _LIVE:
            _LIVE.remove(self)
        if self.qmp:
            self.qmp.close()
            self.qmp = None
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def random_raw(path, size, seed=1):
    """Write `size` bytes of non-zero pseudo-random data: a 16 MiB random block repeated."""
    block = random.Random(seed).randbytes(16 * MiB)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n


def qcow2_from_raw(raw, path):
    """A fully allocated qcow2 (64 KiB clusters) with the contents of `raw`."""
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path],
        check=True,
    )


def random_qcow2_disk(work, size):
    """A fully allocated qcow2 `work`/disk.qcow2 of `size` random bytes; returns the
    --blockdev values of node "disk0" over file node "f0"."""
    raw = os.path.join(work, "src.raw")
    random_raw(raw, size)
    img = os.path.join(work, "disk.qcow2")
    qcow2_from_raw(raw, img)
    os.unlink(raw)
    return [f"driver=file,node-name=f0,filename={img}", "driver=qcow2,node-name=disk0,file=f0"]


def empty_qcow2(path, size):
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)], check=True
    )


def blockdevs_for(fmt, path):
    """--blockdev values and node name for a raw file node or a qcow2 node over a file."""
    if fmt == "raw":
        return [f"driver=file,node-name=n0,filename={path}"], "n0"
    return [
        f"driver=file,node-name=f0,filename={path}",
        "driver=qcow2,node-name=n0,file=f0",
    ], "n0"


def alternate(rep):
    """Daemon order for repetition `rep`: A,B then B,A, so neither always goes first."""
    return ("blockd", "qsd") if rep % 2 == 0 else ("qsd", "blockd")


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def ratio(a, b):
    return a / b if b else float("nan")


def print_table(headers, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(str(h).ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))))


def check_tools(*tools):
    missing = [t for t in tools if not (os.path.exists(t) or shutil.which(t))]
    if missing:
        sys.exit(f"missing: {', '.join(missing)}")


def machine_line():
    load = os.getloadavg()
    return (
        f"{time.strftime('%Y-%m-%d %H:%M')}  cpus={os.cpu_count()}  "
        f"load={load[0]:.1f},{load[1]:.1f},{load[2]:.1f}"
    )


def add_daemon_args(p):
    """The options every blockd-vs-QSD benchmark takes: --dir, --blockd, --qsd, -v."""
    p.add_argument("--dir", default="/dev/shm", help="where images live (default /dev/shm)")
    p.add_argument("--blockd", default=DEFAULT_BLOCKD)
    p.add_argument("--qsd", default=DEFAULT_QSD)
    p.add_argument("-v", "--verbose", action="store_true", help="print every sample")


@contextlib.contextmanager
def work_dir(where, prefix="blockd-bench-"):
    """A scratch directory under `where`. Leaving it stops every daemon started and removes the
    directory; Ctrl-C ends the benchmark with status 130."""
    work = tempfile.mkdtemp(prefix=prefix, dir=where)
    try:
        yield work
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        _cleanup()
        shutil.rmtree(work, ignore_errors=True)

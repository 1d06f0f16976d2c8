"""Helpers shared by the fleecing iotests (not a test module): images, the copy-before-write
+ snapshot-access setup and teardown, guest writers, comparisons."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import List, Tuple

import iotests
from data_nbd import (
    WireClient,
    check_run,
    export,
    qcow2_node_args,
    run,
    start_unix_server,
)


ENOTSUP = 95
CLUSTER = 64 << 10


def filled_qcow2(path: Path, size: int, *writes: str) -> Path:
    """A qcow2 image of ``size`` with qemu-io ``writes`` applied."""
    iotests.create_image(path, size, "qcow2")
    for w in writes:
        iotests.qemu_io("-c", w, str(path))
    return path


def sparse_raw(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def allocated(path: Path) -> int:
    """Bytes a file occupies on its host filesystem."""
    return os.stat(path).st_blocks * 512


def client(sock: Path, name: str) -> WireClient:
    c = WireClient(sock)
    c.go(name)
    return c


def read_ok(c: WireClient, offset: int, length: int) -> bytes:
    err, data = c.read(offset, length)
    assert err == 0, (offset, length, err)
    return data


def setup_fleece(d, tmp_path: Path, *, scratch: dict, bitmap=None, access_opts=None, cbw_opts=None):
    """scratch node, cbw over ``disk`` and ``access`` over cbw."""
    d.ok("blockdev-add", scratch)
    cbw = {"driver": "copy-before-write", "node-name": "cbw", "file": "disk", "target": scratch["node-name"]}
    if bitmap:
        cbw["bitmap"] = bitmap
    cbw.update(cbw_opts or {})
    d.ok("blockdev-add", cbw)
    d.ok("blockdev-add", {"driver": "snapshot-access", "node-name": "access", "file": "cbw", **(access_opts or {})})


def raw_scratch(path: Path, size: int, **opts) -> dict:
    sparse_raw(path, size)
    return {"driver": "file", "node-name": "scratch", "filename": str(path), **opts}


def overlay_scratch(tmp_path: Path, disk: Path, size: int) -> dict:
    """libvirt's scratch: a qcow2 overlay whose backing is the disk node."""
    fleece = tmp_path / "fleece.qcow2"
    iotests.qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", str(disk), str(fleece), str(size))
    return {"driver": "qcow2", "node-name": "scratch",
            "file": {"driver": "file", "filename": str(fleece)}, "backing": "disk"}


def writer_commands(size: int, seed: int, fraction: float = 0.25) -> List[Tuple[str, int, int]]:
    """Guest writes covering about ``fraction`` of the disk: whole and partial clusters,
    some write-zeroes; (kind, offset, length) with kind "w" (pattern 0x77) or "z"."""
    rnd = random.Random(seed)
    out, covered = [], 0
    while covered < size * fraction:
        length = rnd.choice([4096, 65536, 3 * 65536, 256 << 10])
        offset = rnd.randrange(0, size - length, 512)
        out.append(("z" if rnd.random() < 0.15 else "w", offset, length))
        covered += length
    return out


def io_args(cmds) -> List[str]:
    argv = []
    for kind, off, length in cmds:
        argv += ["-c", f"write -P 0x77 {off} {length}" if kind == "w" else f"write -z {off} {length}"]
    return argv


def frozen_plus_writes(tmp_path, frozen, cmds):
    """A raw copy of the frozen content with the writer's `cmds` applied: what the disk must
    hold once the writer is done."""
    expect = tmp_path / "expect.raw"
    check_run(["cp", str(frozen), str(expect)])
    iotests.qemu_io("-f", "raw", *io_args(cmds), str(expect))
    return expect


def assert_frozen_plus_writes(tmp_path, disk, frozen, cmds) -> None:
    """The qcow2 `disk` holds exactly the frozen data plus what the writer wrote."""
    compare(disk, frozen_plus_writes(tmp_path, frozen, cmds), "qcow2", "raw")


def start_writer(target: str, cmds) -> subprocess.Popen:
    return subprocess.Popen(["qemu-io", "-f", "raw", *io_args(cmds), target],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish_writer(p: subprocess.Popen) -> None:
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0 and "failed" not in out, out


def compare(a: Path, b: Path, fmt_a: str = "raw", fmt_b: str = "raw") -> None:
    proc = run(["qemu-img", "compare", "-U", "-f", fmt_a, "-F", fmt_b, str(a), str(b)], timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def unexport_idle(d, eid: str) -> None:
    """block-export-del once the last client's disconnect has reached the server (a client
    that just sent NBD_CMD_DISC may still count for a moment)."""
    deadline = time.monotonic() + 5
    while True:
        r = d.cmd("block-export-del", id=eid)
        if "return" in r:
            break
        assert r["error"]["desc"] == f"export '{eid}' still in use", r
        assert time.monotonic() < deadline, r
        time.sleep(0.05)
    d.event_wait("BLOCK_EXPORT_DELETED", match={"id": eid})


def teardown_fleece(d, *exports: str, keep_disk: bool = False) -> None:
    """The order QSD accepts: exports, access, cbw, scratch, disk (``keep_disk``: only
    access and cbw)."""
    for e in exports:
        unexport_idle(d, e)
    for node in ("access", "cbw") + (() if keep_disk else ("scratch", "disk")):
        d.ok("blockdev-del", node_name=node)


def disk_args(image: Path) -> List[str]:
    return qcow2_node_args(image, "disk", "disk-file")


def small_fleece(make_daemon, tmp_path, scratch_opts=None, access_opts=None, cbw_opts=None):
    size = 4 << 20
    disk = filled_qcow2(tmp_path / "disk.qcow2", size, "write -P 0x11 0 1M", "write -P 0x22 1M 1M",
                        "write -P 0x44 2M 1M")
    d = make_daemon(*disk_args(disk))
    sock = start_unix_server(d)
    scratch = raw_scratch(tmp_path / "scratch.raw", size, **(scratch_opts or {}))
    setup_fleece(d, tmp_path, scratch=scratch, access_opts=access_opts, cbw_opts=cbw_opts)
    export(d, "access", "view", "view", writable=True, allocation_depth=True)
    export(d, "cbw", "guest", "guest", writable=True)
    return d, sock, tmp_path / "scratch.raw"


def data_extents(path: Path) -> List[Tuple[int, int]]:
    """Data extents of a raw file (what copy-before-write wrote into a sparse scratch)."""
    out = check_run(["qemu-img", "map", "-U", "-f", "raw", "--output=json", str(path)])
    return [(e["start"], e["length"]) for e in json.loads(out) if e["data"]]


class StallableFile:
    """A raw file served over FUSE by a helper qemu-storage-daemon (the same for both daemons
    under test): stopping the helper (SIGSTOP) makes every write to the file hang until it is
    continued, a copy-before-write target whose copies take as long as the test wants."""

    def __init__(self, tmp_path: Path, size: int):
        self.backing = sparse_raw(tmp_path / "stall-backing.raw", size)
        self.path = tmp_path / "stall.raw"
        self.path.touch()
        log = open(tmp_path / "stall-qsd.log", "wb")
        self.proc = subprocess.Popen(
            ["qemu-storage-daemon",
             "--blockdev", f"driver=file,node-name=f,filename={self.backing}",
             "--export", f"type=fuse,id=e,node-name=f,mountpoint={self.path},writable=on"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 10
        while os.stat(self.path).st_size != size:
            assert self.proc.poll() is None, (tmp_path / "stall-qsd.log").read_text()
            assert time.monotonic() < deadline, "the FUSE export did not come up"
            time.sleep(0.05)
        self.stopped = False

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)
        self.stopped = True

    def cont(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.stopped = False

    def close(self) -> None:
        if self.stopped:
            self.cont()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        run(["umount", "-l", str(self.path)])

"""Helpers shared by the backup iotests (not a test module).

* images: :func:`qcow2`, :func:`raw`, :func:`fill` (offline qemu-io writes)
* nodes: :func:`add_qcow2`, :func:`add_raw`
* NBD: :func:`nbd` (server + export of a node), :func:`snapshot` (a raw copy of a node read
  through the daemon, the reference "copy of the source taken at job start"),
  :func:`writer` (qemu-io writes into a node through an export, in the background)
* jobs: :func:`backup`, :func:`job_events` (every event of one job until it is gone),
  :func:`wait_status`, :func:`compare`
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import iotests
import data_nbd
from iotests import Daemon

MiB = 1 << 20


def qcow2(path: Path, size: int, backing: Optional[Path] = None, cluster: int = 65536) -> Path:
    argv = ["create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}"]
    if backing is not None:
        argv += ["-b", str(backing), "-F", "qcow2"]
    iotests.qemu_img(*argv, str(path), str(size))
    return path


def raw(path: Path, size: int) -> Path:
    iotests.qemu_img("create", "-q", "-f", "raw", str(path), str(size))
    return path


def fill(path: Path, *commands: str, fmt: str = "qcow2") -> None:
    argv = ["-f", fmt]
    for c in commands:
        argv += ["-c", c]
    data_nbd.assert_io_ok(iotests.qemu_io(*argv, str(path)))


def add_qcow2(d: Daemon, name: str, path: Path, **opts: Any) -> None:
    d.blockdev_add(driver="qcow2", node_name=name,
                   file={"driver": "file", "filename": str(path)}, **opts)


def add_raw(d: Daemon, name: str, path: Path) -> None:
    d.blockdev_add(driver="raw", node_name=name, file={"driver": "file", "filename": str(path)})


def nbd(d: Daemon, node: str, eid: str, writable: bool = False) -> str:
    """Exports ``node`` (starting the server if needed); returns the export's URI."""
    sock = d.nbd_sock or data_nbd.start_unix_server(d, "bk")
    data_nbd.export(d, node, eid, eid, writable=writable)
    return data_nbd.uri(sock, eid)


def snapshot(d: Daemon, node: str, dest: Path) -> Path:
    """A raw copy of ``node`` as the daemon serves it now."""
    uri = nbd(d, node, f"snap-{node}-{dest.stem}")
    iotests.qemu_img("convert", "-f", "raw", "-O", "raw", uri, str(dest))
    data_nbd.unexport(d, f"snap-{node}-{dest.stem}")
    return dest


def writer(uri: str, writes: Sequence[Tuple[int, int, int]]) -> subprocess.Popen:
    """qemu-io ``write -P pattern off len`` for each write, through ``uri``, in the background."""
    argv = ["qemu-io", "-f", "raw"]
    for pat, off, length in writes:
        argv += ["-c", f"write -P {pat:#x} {off} {length}"]
    argv.append(uri)
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish_writer(p: subprocess.Popen) -> None:
    out, _ = p.communicate(timeout=60)
    data_nbd.assert_io_ok(out.decode(errors="replace"))
    assert p.returncode == 0, out


def backup(d: Daemon, job: str, device: str, target: str, sync: str, **kw: Any) -> dict:
    args = {"job-id": job, "device": device, "target": target, "sync": sync}
    args.update({k.replace("_", "-"): v for k, v in kw.items()})
    return d.cmd("blockdev-backup", args)


def job_events(d: Daemon, job: str, timeout: float = 30, until: str = "null") -> List[Tuple[str, Any]]:
    """Events of ``job`` as (event, status-or-data) until its status reaches ``until``."""
    out: List[Tuple[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = d.get_events(wait=0.2)
        for i, ev in enumerate(batch):
            data = ev.get("data", {})
            if ev["event"] == "JOB_STATUS_CHANGE" and data.get("id") == job:
                out.append((ev["event"], data["status"]))
                if data["status"] == until:
                    # Keep what came after for the next call.
                    d._events[0] = batch[i + 1:] + d._events[0]  # pylint: disable=protected-access
                    return out
            elif data.get("device") == job or data.get("id") == job:
                out.append((ev["event"], data))
    raise AssertionError(f"job {job} did not reach {until}: {out}")


def statuses(events: List[Tuple[str, Any]]) -> List[str]:
    """The event names, with JOB_STATUS_CHANGE replaced by its status."""
    return [s if e == "JOB_STATUS_CHANGE" else e for e, s in events]


def collapse_blips(seq: List[str]) -> List[str]:
    """Drops "paused","running" pairs that a drained graph change causes (QSD emits one for
    every export added or removed while a job runs)."""
    out: List[str] = []
    i = 0
    while i < len(seq):
        if seq[i] == "paused" and i + 1 < len(seq) and seq[i + 1] == "running" and out[-1:] == ["running"]:
            i += 2
            continue
        out.append(seq[i])
        i += 1
    return out


def wait_status(d: Daemon, job: str, status: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for j in d.ok("query-jobs"):
            if j["id"] == job and j["status"] == status:
                return j
        time.sleep(0.05)
    raise AssertionError(f"job {job} never reached {status}: {d.ok('query-jobs')}")


def block_job(d: Daemon, job: str) -> Dict[str, Any]:
    for j in d.ok("query-block-jobs"):
        if j["device"] == job:
            return j
    raise AssertionError(f"no block job {job}: {d.ok('query-block-jobs')}")


def compare(a: Path, b: Path, fa: str = "qcow2", fb: str = "raw") -> None:
    out = iotests.qemu_img("compare", "-U", "-f", fa, "-F", fb, str(a), str(b), check=False)
    assert "Images are identical." in out, out


def count(d: Daemon, node: str, name: str) -> int:
    return d.bitmap(node, name)["count"]


def close(d: Daemon, *nodes: str) -> None:
    """blockdev-del each node (its image is then complete on disk for qemu-img)."""
    for n in nodes:
        d.ok("blockdev-del", node_name=n)

"""Helpers for the transaction workflow iotests (not a test module).

* :func:`act`: one ``TransactionAction``
* :func:`tmpfs_dir`: a scratch directory on tmpfs (``/dev/shm``) for the drives
* :func:`add_drives`: qcow2 drives, each exported writable over NBD
* :class:`GenWriter`: one thread writing "generations" into every drive in a fixed order
* :func:`generation`, :func:`one_instant`: decode a backup and judge consistency across drives
* :func:`job_log`: every event of a set of jobs, in arrival order, until all of them are gone
"""

from __future__ import annotations

import shutil
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import data_nbd
from backup_helpers import MiB, add_qcow2, fill, nbd, qcow2
from iotests import Daemon

#: Size of every drive (small: the suite must stay fast).
SIZE = 4 * MiB
#: The generation writer's block: 4 KiB holding (generation, drive index) repeated.
BLOCK = 4096
#: Slots the writer rotates through: generation g goes to slot g % SLOTS of every drive.
SLOTS = 16
STRIDE = SIZE // SLOTS


def act(kind: str, **data: Any) -> dict:
    """``{"type": kind, "data": {...}}`` with ``_`` -> ``-`` in the data keys."""
    return {"type": kind, "data": {k.replace("_", "-"): v for k, v in data.items()}}


def tmpfs_dir() -> Iterator[Path]:
    """Generator for a fixture: a fresh directory on /dev/shm, removed afterwards."""
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    path = Path(tempfile.mkdtemp(prefix="blockd-txn-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def add_drives(d: Daemon, where: Path, names: Sequence[str], pattern: Optional[int] = 0x01) -> Dict[str, str]:
    """qcow2 drives ``names`` of SIZE bytes in ``where`` (every byte written with ``pattern``
    unless it is None, so a full backup has data to copy everywhere), each exported writable
    as ``e<name>``. Returns the export names by drive."""
    exports = {}
    for n in names:
        img = qcow2(where / f"{n}.qcow2", SIZE)
        if pattern is not None:
            fill(img, f"write -P {pattern:#x} 0 {SIZE}")
        add_qcow2(d, n, img)
        nbd(d, n, f"e{n}", writable=True)
        exports[n] = f"e{n}"
    return exports


def gen_block(gen: int, drive: int) -> bytes:
    return struct.pack("<QQ", gen, drive) * (BLOCK // 16)


class GenWriter:
    """Writes generation g = first, first+1, ... : the block of g goes to slot g % SLOTS of
    drive 0, then drive 1, ... in list order, each write acknowledged before the next is
    sent. At any instant every drive therefore holds generation g or g-1, with the g's first
    in list order; ``done`` is the last generation written to every drive."""

    def __init__(self, d: Daemon, exports: Sequence[str], first: int = 1):
        assert d.nbd_sock is not None
        self.clients = []
        for e in exports:
            c = data_nbd.WireClient(d.nbd_sock)
            c.go(e)
            self.clients.append(c)
        self.next = first
        self.done = first - 1
        self.error: Optional[str] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                g = self.next
                for i, c in enumerate(self.clients):
                    err, msg = c.write((g % SLOTS) * STRIDE, gen_block(g, i))
                    if err:
                        self.error = f"write of generation {g} to drive {i}: errno {err} {msg!r}"
                        return
                self.done = g
                self.next = g + 1
        except Exception as e:  # pylint: disable=broad-except
            if not self._stop.is_set():
                self.error = repr(e)

    def start(self) -> "GenWriter":
        self._thread.start()
        return self

    def wait_for(self, gen: int, timeout: float = 20) -> None:
        """Waits until generation ``gen`` is on every drive."""
        deadline = time.monotonic() + timeout
        while self.done < gen:
            assert self.error is None, self.error
            assert time.monotonic() < deadline, f"writer stuck at generation {self.done}"
            time.sleep(0.002)

    def stop(self) -> int:
        """Stops after the generation in progress; returns the last complete generation."""
        self._stop.set()
        self._thread.join(20)
        assert not self._thread.is_alive(), "writer did not stop"
        for c in self.clients:
            c.disconnect()
        assert self.error is None, self.error
        return self.done


def generation(image: Path, drive: int) -> int:
    """The generation a raw copy of drive ``drive`` holds: the newest one in any slot. Checks
    that every slot holds exactly what the writer left there at that generation (no torn or
    lost block inside one drive). Slots the writer never reached must hold zeros."""
    data = image.read_bytes()
    found = []
    for k in range(SLOTS):
        block = data[k * STRIDE:k * STRIDE + BLOCK]
        gen, idx = struct.unpack("<QQ", block[:16])
        if gen == 0:
            found.append(0)
            continue
        assert idx == drive and block == gen_block(gen, drive), f"slot {k} of drive {drive} is torn"
        assert gen % SLOTS == k, f"slot {k} of drive {drive} holds generation {gen}"
        found.append(gen)
    newest = max(found)
    for k, gen in enumerate(found):
        want = newest - ((newest - k) % SLOTS)
        want = want if want > 0 else 0
        assert gen == want, f"drive {drive}: slot {k} holds {gen}, expected {want} at {newest}"
    return newest


def one_instant(gens: Sequence[int]) -> bool:
    """Whether per-drive generations (in the writer's drive order) are what one instant can
    show: some prefix of the drives at g, the rest at g-1."""
    return all(a >= b for a, b in zip(gens, gens[1:])) and gens[0] - gens[-1] <= 1


def job_log(d: Daemon, jobs: Set[str], timeout: float = 30) -> List[Tuple[str, str, Any]]:
    """(event, job, detail) of every event of ``jobs`` in arrival order until all reached
    status null. detail: the status of JOB_STATUS_CHANGE, the ``error`` (None when absent) of
    BLOCK_JOB_COMPLETED, None otherwise."""
    out: List[Tuple[str, str, Any]] = []
    gone: Set[str] = set()
    deadline = time.monotonic() + timeout
    while gone != jobs:
        assert time.monotonic() < deadline, f"jobs left: {jobs - gone}; events {out}"
        for ev in d.get_events(wait=0.2):
            data = ev.get("data", {})
            job = data.get("id", data.get("device"))
            if job not in jobs:
                continue
            if ev["event"] == "JOB_STATUS_CHANGE":
                out.append((ev["event"], job, data["status"]))
                if data["status"] == "null":
                    gone.add(job)
            elif ev["event"] == "BLOCK_JOB_COMPLETED":
                out.append((ev["event"], job, data.get("error")))
            else:
                out.append((ev["event"], job, None))
    return out


def of_job(log: List[Tuple[str, str, Any]], job: str) -> List[Any]:
    """One job's part of a :func:`job_log`: statuses and event names (COMPLETED with its
    error as ``("BLOCK_JOB_COMPLETED", error)``)."""
    seq: List[Any] = []
    for ev, j, detail in log:
        if j != job:
            continue
        if ev == "JOB_STATUS_CHANGE":
            seq.append(detail)
        elif ev == "BLOCK_JOB_COMPLETED":
            seq.append((ev, detail))
        else:
            seq.append(ev)
    return seq

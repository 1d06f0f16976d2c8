"""A termination signal during start-up ends the daemon cleanly: the monitor sockets and the
pid file already created are removed and the images already opened are closed with their
persistent bitmaps stored (not left "in-use"), exit status 0. blockd-only: observed on QSD
10.0.2, a signal that interrupts an image's open fails that option ("Interrupted system
call", exit status 1) and QSD exits leaving its monitor socket behind and the earlier image's
bitmap marked in-use; blockd does better.

The signal is made to arrive at a known point of start-up with a FIFO as an image: opening
it read-only blocks until a writer appears, so the daemon is held inside ``--blockdev``
(after the monitor socket, the pid file and an earlier qcow2 image exist) while the test
sends SIGTERM, then lets the open finish.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from pathlib import Path

import pytest

from iotests import Daemon, blockd_only, create_image, qemu_img


def _wait_for(cond, what: str, d: Daemon, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if d.proc is not None and d.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {d.proc.returncode} before {what}:\n{d.log()}")
        time.sleep(0.01)
    raise AssertionError(f"no {what} within {timeout}s:\n{d.log()}")


def _blocked_in_open(pid: int) -> bool:
    """True once some thread of ``pid`` waits for a FIFO writer."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for t in tasks:
        try:
            if Path(f"/proc/{pid}/task/{t}/wchan").read_text() == "wait_for_partner":
                return True
        except OSError:
            pass
    return False


def _release_fifo(path: Path) -> None:
    """Open ``path`` for writing without blocking (lets a reader's open finish), then close."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as e:
        # ENXIO: no reader (the daemon is gone already).
        assert e.errno == errno.ENXIO, e
        return
    os.close(fd)


def _bitmap_flags(img: Path) -> list:
    info = json.loads(qemu_img("info", "-U", "--output=json", str(img)))
    return [(b["name"], b["flags"]) for b in info["format-specific"]["data"].get("bitmaps", [])]


@blockd_only
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["TERM", "INT", "HUP"])
def test_signal_while_an_image_opens_exits_cleanly(tmp_path, sig):
    img = create_image(tmp_path / "a.qcow2", 1 << 20, "qcow2")
    qemu_img("bitmap", "--add", str(img), "b0")
    fifo = tmp_path / "slow.fifo"
    os.mkfifo(fifo)
    pid = tmp_path / "d.pid"
    d = Daemon(tmp_path)
    d.start("--pidfile", pid,
            "--blockdev", f"file,node-name=f,filename={img}",
            "--blockdev", "qcow2,node-name=q,file=f",
            "--blockdev", f"file,node-name=slow,filename={fifo},read-only=on",
            wait=False)
    try:
        _wait_for(lambda: _blocked_in_open(d.proc.pid), "open of the FIFO", d)
        assert d.monitor_paths[0].is_socket() and pid.exists()
        # The qcow2 image is open for writing: its bitmap is marked in use.
        assert _bitmap_flags(img) == [("b0", ["in-use", "auto"])]

        d.signal(sig)
        time.sleep(0.2)
        _release_fifo(fifo)

        assert d.wait_exit() == 0, d.log()
    finally:
        if d.running():
            _release_fifo(fifo)
            d.kill()
    assert not d.monitor_paths[0].exists()
    assert not pid.exists()
    assert _bitmap_flags(img) == [("b0", ["auto"])]
    qemu_img("check", str(img))


@blockd_only
@pytest.mark.parametrize("delay_ms", [0, 1, 2, 5, 10, 20, 40])
def test_sigterm_early_in_start_up_exits_cleanly(tmp_path, delay_ms):
    # SIGTERM at a few moments from just after exec on: whatever the daemon had created is
    # removed again and the image is left closed cleanly. If the signal comes before the
    # daemon's first instruction (before its main can hold it) the process dies the default
    # way having created nothing; from the moment its pid file exists, it must exit with 0.
    img = create_image(tmp_path / "a.qcow2", 1 << 20, "qcow2")
    qemu_img("bitmap", "--add", str(img), "b0")
    pid = tmp_path / "d.pid"
    for i in range(5):
        d = Daemon(tmp_path, name=f"d{i}")
        d.start("--pidfile", pid,
                "--blockdev", f"file,node-name=f,filename={img}",
                "--blockdev", "qcow2,node-name=q,file=f",
                wait=False)
        time.sleep(delay_ms / 1000)
        created = pid.exists()
        d.signal(signal.SIGTERM)
        status = d.wait_exit()
        if created:
            assert status == 0, d.log()
        else:
            assert status in (0, -signal.SIGTERM), d.log()
        assert not d.monitor_paths[0].exists(), d.log()
        assert not pid.exists(), d.log()
        assert _bitmap_flags(img) == [("b0", ["auto"])]
        qemu_img("check", str(img))

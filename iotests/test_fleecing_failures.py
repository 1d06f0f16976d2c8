"""Fleecing when copy-before-write cannot copy: a scratch that fills up (ENOSPC) and one slower
than ``cbw-timeout``, with the default policy (the guest write fails) and with
``on-cbw-error=break-snapshot`` (the view breaks, the guest write goes through). Observed on
qemu-storage-daemon 10.0.2 (see /work/shared/reference/fleecing.md); both daemons."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Tuple

import pytest

import data_nbd
from data_nbd import (
    EINVAL,
    ENOSPC,
    export,
    run,
    start_unix_server,
    uri,
)
from fleece_helpers import (
    StallableFile,
    CLUSTER,
    filled_qcow2,
    sparse_raw,
    client,
    read_ok,
    setup_fleece,
    raw_scratch,
    teardown_fleece,
    disk_args,
)


@pytest.fixture
def make_daemon(make_daemon):
    """The harness factory, returning daemons whose monitor already answers."""
    return data_nbd.ready_factory(make_daemon)


# ------------------------------------------------------------------ a scratch that fills up


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 256 KiB tmpfs (needs root; a missing mount fails the test)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    proc = run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)])
    assert proc.returncode == 0, f"cannot mount a tmpfs: {proc.stderr}"
    yield mnt
    run(["umount", "-l", str(mnt)])


def fill_through_guest(sock: Path, count: int) -> List[int]:
    """Writes 0x33 over one cluster every 512 KiB; returns each write's errno."""
    c = client(sock, "guest")
    errs = [c.write(i * 512 * 1024, b"\x33" * 65536)[0] for i in range(count)]
    c.disconnect()
    return errs


def test_full_scratch_breaks_guest_writes_by_default(make_daemon, tmp_path, tiny_tmpfs):
    size = 4 << 20
    disk = filled_qcow2(tmp_path / "disk.qcow2", size, "write -P 0x11 0 4M")
    d = make_daemon(*disk_args(disk))
    sock = start_unix_server(d)
    setup_fleece(d, tmp_path, scratch=raw_scratch(tiny_tmpfs / "scratch.raw", size))
    export(d, "access", "view", "view")
    export(d, "cbw", "guest", "guest", writable=True)
    errs = fill_through_guest(sock, 8)
    ok = errs.index(ENOSPC)
    assert ok >= 1 and errs[ok:] == [ENOSPC] * (8 - ok), errs
    c = client(sock, "guest")
    for i, e in enumerate(errs):
        want = 0x33 if e == 0 else 0x11
        assert read_ok(c, i * 512 * 1024, 65536) == bytes([want]) * 65536, i
    c.disconnect()
    v = client(sock, "view")
    assert read_ok(v, 0, size) == b"\x11" * size
    v.disconnect()
    assert [e for e in d.get_events(wait=0.3) if e["event"] != "BLOCK_EXPORT_DELETED"] == []
    teardown_fleece(d, "view", "guest")


def test_full_scratch_breaks_the_snapshot_when_asked(make_daemon, tmp_path, tiny_tmpfs):
    size = 4 << 20
    disk = filled_qcow2(tmp_path / "disk.qcow2", size, "write -P 0x11 0 4M")
    d = make_daemon(*disk_args(disk))
    sock = start_unix_server(d)
    setup_fleece(d, tmp_path, scratch=raw_scratch(tiny_tmpfs / "scratch.raw", size),
                 cbw_opts={"on-cbw-error": "break-snapshot"})
    export(d, "access", "view", "view")
    export(d, "cbw", "guest", "guest", writable=True)
    v = client(sock, "view")
    assert read_ok(v, 0, 65536) == b"\x11" * 65536
    assert fill_through_guest(sock, 8) == [0] * 8
    c = client(sock, "guest")
    for i in range(8):
        assert read_ok(c, i * 512 * 1024, 65536) == b"\x33" * 65536
    c.disconnect()
    # every read of the view fails now, also of clusters copied before the failure
    assert v.read(0, 65536)[0] == EINVAL
    assert v.read(65536, 512)[0] == EINVAL
    v.disconnect()
    assert run(["nbdinfo", "--map", uri(sock, "view")]).returncode != 0
    assert [e for e in d.get_events(wait=0.3) if e["event"] != "BLOCK_EXPORT_DELETED"] == []
    teardown_fleece(d, "view", "guest")


# ------------------------------------------------------------------ a copy slower than cbw-timeout


@pytest.fixture
def stallable(tmp_path):
    """A FUSE-served raw file of 4 MiB (needs root and /dev/fuse; without them the test fails)."""
    f = StallableFile(tmp_path, 4 << 20)
    yield f
    f.close()


def timed_guest_write(sock: Path, offset: int, data: bytes) -> Tuple[int, float]:
    c = client(sock, "guest")
    t0 = time.monotonic()
    err = c.write(offset, data)[0]
    elapsed = time.monotonic() - t0
    c.disconnect()
    return err, elapsed


def fleece_on_stallable(make_daemon, tmp_path: Path, stallable: StallableFile, cbw_opts: dict):
    size = 4 << 20
    disk = filled_qcow2(tmp_path / "disk.qcow2", size, "write -P 0x11 0 4M")
    d = make_daemon(*disk_args(disk))
    sock = start_unix_server(d)
    setup_fleece(d, tmp_path, cbw_opts={"cbw-timeout": 1, **cbw_opts},
                 scratch={"driver": "file", "node-name": "scratch", "filename": str(stallable.path)})
    export(d, "access", "view", "view")
    export(d, "cbw", "guest", "guest", writable=True)
    return d, sock


def test_cbw_timeout_breaks_the_snapshot_when_asked(make_daemon, tmp_path, stallable):
    """QEMU: a copy that outlasts cbw-timeout fails with ETIMEDOUT; with break-snapshot the
    guest write then goes on (after about the timeout) and the view is broken for good."""
    d, sock = fleece_on_stallable(make_daemon, tmp_path, stallable, {"on-cbw-error": "break-snapshot"})
    # A copy while the target answers: the view keeps the old data.
    assert timed_guest_write(sock, 0, b"\x22" * CLUSTER)[0] == 0
    v = client(sock, "view")
    assert read_ok(v, 0, 2 * CLUSTER) == b"\x11" * (2 * CLUSTER)
    stallable.stop()
    err, elapsed = timed_guest_write(sock, 1 << 20, b"\x33" * CLUSTER)
    assert err == 0
    assert 0.9 <= elapsed < 10, elapsed
    c = client(sock, "guest")
    assert read_ok(c, 1 << 20, CLUSTER) == b"\x33" * CLUSTER
    # Later writes do not copy at all: no wait, though the target still hangs.
    assert timed_guest_write(sock, 2 << 20, b"\x44" * CLUSTER)[1] < 0.9
    # Every read of the view fails, also of the cluster copied before.
    assert v.read(0, CLUSTER)[0] == EINVAL
    assert v.read(1 << 20, 512)[0] == EINVAL
    stallable.cont()
    assert v.read(3 << 20, 512)[0] == EINVAL
    v.disconnect()
    c.disconnect()
    assert [e for e in d.get_events(wait=0.3) if e["event"] != "BLOCK_EXPORT_DELETED"] == []
    teardown_fleece(d, "view", "guest")
    d.ok("blockdev-del", node_name="disk-file")
    p = run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x22 0 64k", "-c", "read -P 0x33 1M 64k",
             "-c", "read -P 0x44 2M 64k", "-c", "read -P 0x11 3M 1M", str(tmp_path / "disk.qcow2")])
    assert p.returncode == 0 and "fail" not in p.stdout, p.stdout


def test_cbw_timeout_fails_the_guest_write_by_default(make_daemon, tmp_path, stallable):
    """QEMU: with break-guest-write (the default) a copy that outlasts cbw-timeout fails the
    guest write (ETIMEDOUT, EINVAL on the NBD wire); the disk keeps its old data and the view
    stays intact, the abandoned copy finishing in the background once the target answers."""
    d, sock = fleece_on_stallable(make_daemon, tmp_path, stallable, {})
    stallable.stop()
    err, elapsed = timed_guest_write(sock, 1 << 20, b"\x33" * CLUSTER)
    assert err == EINVAL
    assert 0.9 <= elapsed < 10, elapsed
    stallable.cont()
    c = client(sock, "guest")
    assert read_ok(c, 1 << 20, CLUSTER) == b"\x11" * CLUSTER
    c.disconnect()
    # The target answers again: the same write copies in time and lands.
    err, elapsed = timed_guest_write(sock, 1 << 20, b"\x55" * CLUSTER)
    assert (err, elapsed < 0.9) == (0, True), (err, elapsed)
    v = client(sock, "view")
    assert read_ok(v, 0, 4 << 20) == b"\x11" * (4 << 20)
    v.disconnect()
    assert [e for e in d.get_events(wait=0.3) if e["event"] != "BLOCK_EXPORT_DELETED"] == []
    teardown_fleece(d, "view", "guest")
    d.ok("blockdev-del", node_name="disk-file")
    p = run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x11 0 1M", "-c", "read -P 0x55 1M 64k",
             "-c", "read -P 0x11 1088k 3008k", str(tmp_path / "disk.qcow2")])
    assert p.returncode == 0 and "fail" not in p.stdout, p.stdout

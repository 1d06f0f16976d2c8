"""Data through NBD exports: reads and writes at edge offsets that really land
in the image, zeroing and trimming, whole-disk copies with qemu-img and
nbdcopy, what nbdinfo sees, and the errors for bad requests.

Error texts and errno values were observed on qemu-storage-daemon 10.0.2.
"""

from __future__ import annotations

import os

import pytest

import iotests
import data_nbd
from data_nbd import (
    CMD_CACHE,
    CMD_FLUSH,
    CMD_TRIM,
    CMD_WRITE_ZEROES,
    EINVAL,
    ENOSPC,
    EPERM,
    WireClient,
    assert_io_ok,
    check_run,
    export,
    image_check,
    image_map_flags,
    nbdinfo_list,
    nbdinfo_map,
    qcow2_node_args,
    qemu_io_uri,
    start_unix_server,
    uri,
)


#: Where QSD deviates from the NBD spec, blockd follows the spec; each daemon is held to its
#: own answer. Writes to a read-only export: QSD EINVAL, the spec (blockd) EPERM.
READ_ONLY_ERRNO = EINVAL if iotests.is_qsd() else EPERM
#: Writes and write-zeroes past the end: QSD EINVAL, the spec (blockd) ENOSPC.
PAST_END_WRITE_ERRNO = EINVAL if iotests.is_qsd() else ENOSPC


@pytest.fixture
def make_daemon(make_daemon):
    """The harness factory, returning daemons whose monitor already answers."""
    return data_nbd.ready_factory(make_daemon)

SIZE = 4 << 20

# (pattern, offset, length): first bytes, a cluster-crossing unaligned write,
# a long unaligned run, the last bytes of the disk and the very last byte.
EDGE_WRITES = [
    (0x11, 0, 512),
    (0x22, 65535, 3),
    (0x33, 1000001, 70001),
    (0x44, SIZE - 4096 - 7, 4096),
    (0x55, SIZE - 1, 1),
]


def edge_write_cmds():
    return [f"write -P {p:#x} {off} {length}" for p, off, length in EDGE_WRITES]


def edge_read_cmds():
    cmds = [f"read -P {p:#x} {off} {length}" for p, off, length in EDGE_WRITES]
    # untouched neighbours stay zero
    cmds += ["read -P 0 512 65023", f"read -P 0 {1000001 + 70001} 4096", "read -P 0 65538 1000"]
    return cmds


def io_ok(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_io_ok(proc.stdout + proc.stderr)
    return proc.stdout


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_edge_offset_writes_land_in_the_image(make_daemon, tmp_path, fmt):
    img = tmp_path / f"disk.{fmt}"
    iotests.create_image(img, SIZE, fmt)
    d = make_daemon(start=False)
    sock = d.sock("nbd")
    if fmt == "qcow2":
        nodes = qcow2_node_args(img)
    else:
        nodes = ["--blockdev", f"file,node-name=n,filename={img}"]
    d.start(*nodes, "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e0,node-name=n,name=x,writable=on")
    data_nbd.ready(d)

    out = io_ok(qemu_io_uri(uri(sock, "x"), *edge_write_cmds(), "flush", "write -f -P 0x66 2M 512",
                            *edge_read_cmds(), "read -P 0x66 2M 512"))
    assert f"wrote 1/1 bytes at offset {SIZE - 1}" in out

    assert d.shutdown() == 0
    io_ok(qemu_io_uri(str(img), *edge_read_cmds(), "read -P 0x66 2M 512", fmt=fmt))
    if fmt == "qcow2":
        image_check(img)
    else:
        assert os.path.getsize(img) == SIZE


def test_write_zeroes_and_trim_land(make_daemon, tmp_path):
    img = tmp_path / "disk.qcow2"
    iotests.create_image(img, SIZE, "qcow2")
    iotests.qemu_io("-c", "write -P 0x66 0 2M", str(img))
    d = make_daemon(*qcow2_node_args(img, extra="discard=unmap"))
    sock = start_unix_server(d)
    export(d, "n", "e0", "x", writable=True)

    io_ok(qemu_io_uri(uri(sock, "x"), "write -z 64k 64k", "write -z 300001 999", "discard 1M 128k",
                      "read -P 0 64k 64k", "read -P 0 300001 999", "read -P 0x66 300000 1",
                      "read -P 0x66 301000 1", "read -P 0 1M 128k", "read -P 0x66 1179648 4096"))
    assert d.shutdown() == 0

    io_ok(qemu_io_uri(str(img), "read -P 0x66 0 64k", "read -P 0 64k 64k", "read -P 0x66 128k 168929",
                      "read -P 0 300001 999", "read -P 0x66 301000 747576", "read -P 0 1M 128k",
                      "read -P 0x66 1179648 917504", "read -P 0 2M 2M", fmt="qcow2"))
    # whole zeroed or trimmed clusters hold no data any more
    assert image_map_flags(img) == [
        (0, 65536, 0), (65536, 65536, 3), (131072, 917504, 0), (1048576, 131072, 3),
        (1179648, 917504, 0), (2097152, 2097152, 3),
    ]
    image_check(img)


def test_trim_on_node_with_discard_ignore_keeps_data(make_daemon, tmp_path):
    # blockdev's default is discard=ignore: NBD TRIM succeeds but changes nothing.
    img = tmp_path / "disk.qcow2"
    iotests.create_image(img, SIZE, "qcow2")
    iotests.qemu_io("-c", "write -P 0x66 0 2M", str(img))
    d = make_daemon(*qcow2_node_args(img))
    sock = start_unix_server(d)
    export(d, "n", "e0", "x", writable=True)

    io_ok(qemu_io_uri(uri(sock, "x"), "discard 1M 128k", "read -P 0x66 1M 128k"))


def make_source_image(tmp_path):
    """A 4 MiB qcow2 with data, a zero cluster and unallocated clusters."""
    img = tmp_path / "src.qcow2"
    iotests.create_image(img, SIZE, "qcow2")
    iotests.qemu_io("-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 1049088 1000", "-c", "write -z 2M 128k",
                    "-c", "write -P 0x33 4190208 4096", "-c", "write -P 0 3M 64k", str(img))
    return img


def test_convert_from_export_equals_source(make_daemon, tmp_path):
    img = make_source_image(tmp_path)
    d = make_daemon(*qcow2_node_args(img))
    sock = start_unix_server(d)
    export(d, "n", "e0", "x")
    out = tmp_path / "out.qcow2"

    iotests.qemu_img("convert", "-f", "raw", "-O", "qcow2", uri(sock, "x"), str(out))

    assert "Images are identical." in iotests.qemu_img("compare", "-f", "qcow2", "-F", "qcow2", "-U", str(img), str(out))
    assert "Images are identical." in iotests.qemu_img("compare", "-f", "raw", "-F", "qcow2", "-U", uri(sock, "x"), str(img))
    # holes stay holes in the copy (convert used block status), the data is where it was
    assert image_map_flags(out)[0] == (0, 65536, 0)
    io_ok(qemu_io_uri(str(out), "read -P 0x11 0 64k", "read -P 0x22 1049088 1000", "read -P 0x33 4190208 4096",
                      fmt="qcow2"))


def test_nbdcopy_to_file_and_into_writable_export(make_daemon, tmp_path):
    img = make_source_image(tmp_path)
    dst = tmp_path / "dst.qcow2"
    iotests.create_image(dst, SIZE, "qcow2")
    d = make_daemon(*qcow2_node_args(img), *qcow2_node_args(dst, "m", "g"))
    sock = start_unix_server(d)
    export(d, "n", "e0", "src")
    export(d, "m", "e1", "dst", writable=True)
    copy = tmp_path / "copy.raw"
    upload = tmp_path / "upload.raw"
    upload.write_bytes(os.urandom(1 << 20) + b"\0" * (2 << 20) + os.urandom(1 << 20))

    check_run(["nbdcopy", uri(sock, "src"), str(copy)])
    check_run(["nbdcopy", str(upload), uri(sock, "dst")])

    assert copy.stat().st_size == SIZE
    assert "Images are identical." in iotests.qemu_img("compare", "-f", "qcow2", "-F", "raw", "-U", str(img), str(copy))
    assert d.shutdown() == 0
    assert "Images are identical." in iotests.qemu_img("compare", "-f", "raw", "-F", "qcow2", str(upload), str(dst))
    image_check(dst)


def test_nbdinfo_list_shows_names_descriptions_sizes_and_flags(make_daemon, tmp_path):
    img = make_source_image(tmp_path)
    d = make_daemon(*qcow2_node_args(img))
    sock = start_unix_server(d)
    export(d, "n", "e0", "ro", description="read-only view")
    export(d, "n", "e1", "rw", writable=True)

    exports = nbdinfo_list(uri(sock))

    assert set(exports) == {"ro", "rw"}
    ro, rw = exports["ro"], exports["rw"]
    assert ro["description"] == "read-only view"
    assert "description" not in rw
    for e in (ro, rw):
        assert e["export-size"] == SIZE
        assert e["contexts"] == ["base:allocation"]
        assert (e["block_size_minimum"], e["block_size_preferred"], e["block_size_maximum"]) == (1, 4096, 33554432)
        assert e["can_flush"] and e["can_fua"] and e["can_cache"] and e["can_df"] and e["can_multi_conn"]
        assert not e["is_rotational"]
    assert ro["is_read_only"] and not ro["can_trim"] and not ro["can_zero"] and not ro["can_fast_zero"]
    assert not rw["is_read_only"] and rw["can_trim"] and rw["can_zero"] and rw["can_fast_zero"]


def test_single_connection_server_does_not_advertise_multi_conn(make_daemon, tmp_path):
    img = make_source_image(tmp_path)
    d = make_daemon(*qcow2_node_args(img))
    sock = start_unix_server(d, max_connections=1)
    export(d, "n", "e0", "rw", writable=True)

    assert nbdinfo_list(uri(sock))["rw"]["can_multi_conn"] is False


def test_base_allocation_map_matches_qemu_img_map(make_daemon, tmp_path):
    img = make_source_image(tmp_path)
    d = make_daemon(*qcow2_node_args(img))
    sock = start_unix_server(d)
    export(d, "n", "e0", "x")

    nbd_map = nbdinfo_map(uri(sock, "x"))

    assert nbd_map == image_map_flags(img, "-U")
    # spelled out: data, holes; zero clusters count as holes too
    assert nbd_map == [
        (0, 65536, 0), (65536, 983040, 3), (1048576, 65536, 0), (1114112, 2031616, 3),
        (3145728, 65536, 0), (3211264, 917504, 3), (4128768, 65536, 0),
    ]


def test_read_only_export_refuses_writes(make_daemon, tmp_path):
    img = make_source_image(tmp_path)
    d = make_daemon(*qcow2_node_args(img))
    sock = start_unix_server(d)
    export(d, "n", "e0", "x")

    p = qemu_io_uri(uri(sock, "x"), "write 0 512")
    assert p.returncode == 1
    assert "Could not open image: Permission denied" in p.stderr, p.stderr
    p = qemu_io_uri(uri(sock, "x"), "write 0 512", read_only=True)
    assert "Block node is read-only" in p.stdout + p.stderr

    # QSD answers EINVAL with "Export is read-only"; the NBD spec (and blockd) says EPERM.
    c = WireClient(sock)
    c.go("x", structured=True)
    for errno_, msg in (c.write(0, b"x" * 512), c.request(CMD_WRITE_ZEROES, 0, 512), c.request(CMD_TRIM, 0, 512)):
        assert (errno_, msg) == (READ_ONLY_ERRNO, b"Export is read-only")
    assert c.read(0, 512) == (0, b"\x11" * 512)
    c.disconnect()

    c = WireClient(sock)
    c.go("x")
    assert c.write(0, b"x" * 512)[0] == READ_ONLY_ERRNO
    assert c.read(0, 4) == (0, b"\x11" * 4)
    c.disconnect()
    assert d.shutdown() == 0
    io_ok(qemu_io_uri(str(img), "read -P 0x11 0 64k", fmt="qcow2"))


def test_past_end_access_is_refused_and_connection_survives(make_daemon, tmp_path):
    img = tmp_path / "disk.raw"
    iotests.create_image(img, 1 << 20)
    d = make_daemon("--blockdev", f"file,node-name=f,filename={img}")
    sock = start_unix_server(d)
    export(d, "f", "e0", "x", writable=True)
    end = 1 << 20

    # qemu-io's NBD client checks the size itself and reports EIO
    p = qemu_io_uri(uri(sock, "x"), f"read {end} 512", f"write {end - 1} 2")
    assert p.stdout.splitlines() == ["read failed: Input/output error", "write failed: Input/output error"]

    c = WireClient(sock)
    c.go("x", structured=True)
    assert c.read(end, 512) == (EINVAL, f"operation past EOF; From: {end}, Len: 512, Size: {end}".encode())
    # Writes past the end: QSD says EINVAL, the NBD spec (and blockd) ENOSPC.
    errno_, msg = c.write(end - 1, b"xy")
    assert errno_ == PAST_END_WRITE_ERRNO
    assert msg == f"operation past EOF; From: {end - 1}, Len: 2, Size: {end}".encode()
    assert c.request(CMD_WRITE_ZEROES, end - 1, 2)[0] == PAST_END_WRITE_ERRNO
    assert c.request(CMD_TRIM, end, 512)[0] == EINVAL
    assert c.request(CMD_CACHE, end, 512)[0] == EINVAL
    assert c.write(end - 1, b"z") == (0, b"")
    assert c.read(end - 1, 1) == (0, b"z")
    assert c.request(CMD_FLUSH, 0, 0) == (0, b"")
    c.disconnect()

    c = WireClient(sock)
    c.go("x")
    assert c.read(end, 512) == (EINVAL, b"")
    assert c.request(99, 0, 0)[0] == EINVAL
    assert c.read(end - 1, 1) == (0, b"z")
    c.disconnect()

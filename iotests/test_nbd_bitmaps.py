"""Dirty bitmaps and allocation depth over NBD, and pull-mode backup (fleecing).

Counts, extents and error texts were observed on qemu-storage-daemon 10.0.2.
"""

from __future__ import annotations

import json

import pytest

import iotests
import data_nbd
from data_nbd import (
    bitmap_add,
    bitmap_cmd,
    bitmaps_by_name,
    dirty_ranges,
    export,
    merge_extents,
    nbd_io,
    nbdinfo_list,
    nbdinfo_map,
    qcow2_node_args,
    qemu_io_uri,
    start_unix_server,
    unexport,
    uri,
)


@pytest.fixture
def make_daemon(make_daemon):
    """The harness factory, returning daemons whose monitor already answers."""
    return data_nbd.ready_factory(make_daemon)

SIZE = 16 << 20
BUSY = "Bitmap '{}' is currently in use by another operation and cannot be used"



def needs_backup(fn):
    """Marks a test ``needs_backup`` (select with ``-m``); it runs on both daemons (blockd
    has backup jobs since the merge)."""
    return pytest.mark.needs_backup(fn)


def granules(writes, gran):
    """Set of granule indexes touched by (offset, length) writes."""
    out = set()
    for off, length in writes:
        out.update(range(off // gran, (off + length - 1) // gran + 1))
    return out


def extents_of(granule_set, gran, size):
    """Expected dirty-bitmap extents [(off, len, 0|1)] covering the whole disk."""
    ext = []
    nbits = (size + gran - 1) // gran
    for i in range(nbits):
        length = min(gran, size - i * gran)
        ext.append((i * gran, length, 1 if i in granule_set else 0))
    return merge_extents(ext)


@pytest.fixture
def qcow2_daemon(make_daemon, tmp_path):
    """A daemon with a 16 MiB qcow2 node ``n`` (64 KiB clusters) and an NBD server."""
    img = tmp_path / "disk.qcow2"
    iotests.create_image(img, SIZE, "qcow2")
    d = make_daemon(*qcow2_node_args(img, extra="discard=unmap"))
    d.nbd_sock = start_unix_server(d)
    d.image = img
    return d


# writes used by several tests: first byte, a cluster, 1 byte at 10 MiB,
# 2 bytes across a 64 KiB boundary, an unaligned write-zeroes
WRITES = [(0, 1), (131072, 65536), (10485760, 1), (196607, 2), (4194304 + 1000, 5000)]
WRITE_CMDS = ["write -P 0x55 0 1", "write -P 0x55 131072 65536", "write -P 0x66 10485760 1",
              "write -P 0x77 196607 2", "write -z 4195304 5000"]


def test_recording_bitmap_is_refused_on_read_only_export(qcow2_daemon):
    d = qcow2_daemon
    bitmap_add(d, "n", "b")

    err = d.err("block-export-add", {"type": "nbd", "id": "e0", "node-name": "n", "name": "x", "bitmaps": ["b"]})

    assert err == {"class": "GenericError", "desc": "Enabled bitmap 'b' incompatible with readonly export"}
    assert d.ok("query-block-exports") == []
    assert d.bitmap("n", "b")["busy"] is False


def test_disabled_bitmap_export_maps_granularity_aligned_dirty_extents(qcow2_daemon):
    d = qcow2_daemon
    bitmap_add(d, "n", "b")
    bitmap_add(d, "n", "g", granularity=4096)
    nbd_io(d, "n", *WRITE_CMDS)
    bitmap_cmd(d, "disable", "n", "b")
    bitmap_cmd(d, "disable", "n", "g")

    export(d, "n", "e0", "x", bitmaps=["b", "g"])
    export_uri = uri(d.nbd_sock, "x")

    assert nbdinfo_list(uri(d.nbd_sock))["x"]["contexts"] == [
        "base:allocation", "qemu:dirty-bitmap:b", "qemu:dirty-bitmap:g"]
    for name, gran in (("b", 65536), ("g", 4096)):
        got = nbdinfo_map(export_uri, f"qemu:dirty-bitmap:{name}")
        assert got == extents_of(granules(WRITES, gran), gran, SIZE)
        assert sum(length for _, length in dirty_ranges(got)) == d.bitmap("n", name)["count"]
    # spelled out for the 64 KiB bitmap
    assert dirty_ranges(nbdinfo_map(export_uri, "qemu:dirty-bitmap:b")) == [
        (0, 65536), (131072, 131072), (4194304, 65536), (10485760, 65536)]


def test_qemu_img_map_sees_dirty_bitmap_inverted(qcow2_daemon):
    # QEMU's NBD client maps x-dirty-bitmap's "dirty" bit onto its hole flag:
    # dirty areas come out as data=false.
    d = qcow2_daemon
    bitmap_add(d, "n", "b")
    nbd_io(d, "n", "write 131072 65536", "write 1M 1")
    bitmap_cmd(d, "disable", "n", "b")
    export(d, "n", "e0", "x", bitmaps=["b"])

    out = json.loads(iotests.qemu_img(
        "map", "--output=json", "--image-opts",
        f"driver=nbd,server.type=unix,server.path={d.nbd_sock},export=x,x-dirty-bitmap=qemu:dirty-bitmap:b"))

    dirty = [(e["start"], e["length"]) for e in out if not e["data"]]
    assert dirty == [(131072, 65536), (1048576, 65536)]


def test_exported_bitmap_is_busy_until_export_is_deleted(qcow2_daemon):
    d = qcow2_daemon
    bitmap_add(d, "n", "b", disabled=True)
    bitmap_add(d, "n", "other")
    export(d, "n", "e0", "x", bitmaps=["b"])

    assert d.bitmap("n", "b") == {"name": "b", "recording": False, "persistent": False, "busy": True,
                                  "granularity": 65536, "count": 0}
    busy = {"class": "GenericError", "desc": BUSY.format("b")}
    for verb in ("remove", "enable", "disable", "clear"):
        assert bitmap_cmd(d, verb, "n", "b") == {"error": busy}, verb
    assert d.err("block-dirty-bitmap-merge", node="n", target="b", bitmaps=["other"]) == busy
    assert d.err("block-dirty-bitmap-merge", node="n", target="other", bitmaps=["b"]) == busy
    assert d.err("block-export-add", {"type": "nbd", "id": "e1", "node-name": "n", "name": "y",
                                      "bitmaps": ["b"]}) == busy
    d.sha256("n", "b")

    unexport(d, "e0")

    assert d.bitmap("n", "b")["busy"] is False
    assert bitmap_cmd(d, "remove", "n", "b") == {"return": {}}
    assert "b" not in bitmaps_by_name(d, "n")


def test_writable_export_may_carry_a_recording_bitmap(qcow2_daemon):
    d = qcow2_daemon
    bitmap_add(d, "n", "b")
    export(d, "n", "e0", "x", writable=True, bitmaps=["b"])
    export_uri = uri(d.nbd_sock, "x")

    assert qemu_io_uri(export_uri, "write 2M 64k", "write 5M 1").returncode == 0

    assert d.bitmap("n", "b")["busy"] is True
    assert d.bitmap("n", "b")["recording"] is True
    assert dirty_ranges(nbdinfo_map(export_uri, "qemu:dirty-bitmap:b")) == [(2097152, 65536), (5242880, 65536)]
    assert d.bitmap("n", "b")["count"] == 131072


def test_writes_over_nbd_mark_every_recording_bitmap(qcow2_daemon):
    d = qcow2_daemon
    bitmap_add(d, "n", "b64k")
    bitmap_add(d, "n", "b4k", granularity=4096)
    bitmap_add(d, "n", "b512", granularity=512)
    bitmap_add(d, "n", "b1m", granularity=1 << 20)
    bitmap_add(d, "n", "off", disabled=True)
    export(d, "n", "e0", "x", writable=True)

    assert qemu_io_uri(uri(d.nbd_sock, "x"), *WRITE_CMDS).returncode == 0

    counts = {name: b["count"] for name, b in bitmaps_by_name(d, "n").items()}
    assert counts == {"b64k": 327680, "b4k": 86016, "b512": 72704, "b1m": 3145728, "off": 0}
    for name, gran in (("b64k", 65536), ("b4k", 4096), ("b512", 512), ("b1m", 1 << 20)):
        assert counts[name] == len(granules(WRITES, gran)) * gran


def test_trim_marks_bitmaps_only_when_the_node_unmaps(make_daemon, tmp_path):
    # With discard=unmap the requested range (unaligned too) is marked; with
    # the default discard=ignore NBD TRIM is a no-op and marks nothing.
    counts = {}
    for mode in ("unmap", "ignore"):
        img = tmp_path / f"{mode}.qcow2"
        iotests.create_image(img, SIZE, "qcow2")
        d = make_daemon(*qcow2_node_args(img, extra=f"discard={mode}"), name=mode)
        bitmap_add(d, "n", "b64k")
        bitmap_add(d, "n", "b512", granularity=512)
        nbd_io(d, "n", "discard 1M 128k", "discard 3M 4k", "discard 5000000 10000")
        counts[mode] = {name: b["count"] for name, b in bitmaps_by_name(d, "n").items()}
    assert counts["unmap"] == {"b64k": 262144, "b512": 145920}
    assert counts["ignore"] == {"b64k": 0, "b512": 0}


def test_write_to_partial_last_granule_counts_a_whole_granule(make_daemon, tmp_path):
    img = tmp_path / "odd.qcow2"
    iotests.create_image(img, SIZE + 512, "qcow2")
    d = make_daemon(*qcow2_node_args(img))
    bitmap_add(d, "n", "b")
    nbd_io(d, "n", f"write -P 0x1 {SIZE} 512", f"write -P 0x2 {SIZE + 511} 1")
    bitmap_cmd(d, "disable", "n", "b")

    assert d.bitmap("n", "b")["count"] == 65536
    export(d, "n", "e0", "x", bitmaps=["b"])  # nbd_io started the server
    assert nbdinfo_map(uri(d.nbd_sock, "x"), "qemu:dirty-bitmap:b") == [(0, SIZE, 0), (SIZE, 512, 1)]


def test_allocation_depth_reports_backing_layers(make_daemon, tmp_path):
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    iotests.create_image(base, 4 << 20, "qcow2")
    iotests.qemu_io("-c", "write -P 0x11 0 1M", str(base))
    iotests.qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    iotests.qemu_io("-c", "write -P 0x22 512k 64k", "-c", "write -z 2M 64k", str(top))
    d = make_daemon(*qcow2_node_args(top))
    sock = start_unix_server(d)
    export(d, "n", "e0", "x", allocation_depth=True)
    export(d, "n", "e1", "plain")

    lists = nbdinfo_list(uri(sock))
    assert lists["x"]["contexts"] == ["base:allocation", "qemu:allocation-depth"]
    assert lists["plain"]["contexts"] == ["base:allocation"]
    # 0 = absent, 1 = top image, 2 = first backing file
    assert nbdinfo_map(uri(sock, "x"), "qemu:allocation-depth") == [
        (0, 524288, 2), (524288, 65536, 1), (589824, 458752, 2), (1048576, 1048576, 0),
        (2097152, 65536, 1), (2162688, 2031616, 0)]
    assert nbdinfo_map(uri(sock, "x")) == [(0, 1048576, 0), (1048576, 3145728, 3)]
    p = qemu_io_uri(uri(sock, "x"), "read -P 0x11 0 512k", "read -P 0x22 512k 64k", "read -P 0x11 576k 448k",
                    "read -P 0 1M 3M", read_only=True)
    assert "verification" not in p.stdout and p.returncode == 0, p.stdout


@needs_backup
def test_fleecing_export_serves_point_in_time_data(make_daemon, tmp_path):
    src = tmp_path / "src.qcow2"
    fleece = tmp_path / "fleece.qcow2"
    iotests.create_image(src, 4 << 20, "qcow2")
    iotests.qemu_io("-c", "write -P 0x11 0 4M", str(src))
    iotests.create_image(fleece, 4 << 20, "qcow2")
    d = make_daemon(*qcow2_node_args(src, "src", "f"))
    sock = start_unix_server(d)
    bitmap_add(d, "src", "b")
    export(d, "src", "w", "w", writable=True)
    assert qemu_io_uri(uri(sock, "w"), "write -P 0x22 1M 64k").returncode == 0

    # freeze the point in time: stop the bitmap, put a copy-before-write overlay in place
    d.ok("transaction", actions=[{"type": "block-dirty-bitmap-disable", "data": {"node": "src", "name": "b"}}])
    d.ok("blockdev-add", {"driver": "qcow2", "node-name": "tmp", "file": {"driver": "file", "filename": str(fleece)},
                          "backing": "src"})
    d.ok("blockdev-backup", {"job-id": "fl", "device": "src", "target": "tmp", "sync": "none"})
    export(d, "tmp", "fe", "fleece", bitmaps=[{"node": "src", "name": "b"}])
    assert nbdinfo_list(uri(sock))["fleece"]["contexts"] == ["base:allocation", "qemu:dirty-bitmap:b"]

    # the guest keeps writing to the source
    p = qemu_io_uri(uri(sock, "w"), "write -P 0x33 0 2M", "write -P 0x44 1M 4k", "read -P 0x33 0 1M",
                    "read -P 0x44 1M 4k")
    assert p.returncode == 0 and "verification" not in p.stdout, p.stdout

    # the fleecing export still shows the old data and the frozen bitmap
    p = qemu_io_uri(uri(sock, "fleece"), "read -P 0x11 0 1M", "read -P 0x22 1M 64k", "read -P 0x11 1088k 960k",
                    "read -P 0x11 2M 2M", read_only=True)
    assert p.returncode == 0 and "verification" not in p.stdout, p.stdout
    assert dirty_ranges(nbdinfo_map(uri(sock, "fleece"), "qemu:dirty-bitmap:b")) == [(1048576, 65536)]
    assert d.bitmap("src", "b") == {"name": "b", "recording": False, "persistent": False, "busy": True,
                                    "granularity": 65536, "count": 65536}

    # cleanup as a backup client does
    unexport(d, "fe")
    d.ok("job-cancel", id="fl")
    d.event_wait("BLOCK_JOB_CANCELLED", match={"device": "fl"})
    d.ok("blockdev-del", node_name="tmp")
    assert d.bitmap("src", "b")["busy"] is False
    assert d.ok("query-block-jobs") == []
    p = qemu_io_uri(uri(sock, "w"), "read -P 0x33 0 1M", "read -P 0x44 1M 4k", "read -P 0x11 2M 2M")
    assert p.returncode == 0 and "verification" not in p.stdout, p.stdout


def test_read_only_node_exports_its_recording_bitmap(make_daemon, tmp_path):
    # Observed on QSD 10.0.2: an enabled bitmap cannot change under a read-only export of a
    # read-only node, so it may be exported (only a writable node's is refused).
    img = tmp_path / "ro.qcow2"
    iotests.create_image(img, SIZE, "qcow2")
    iotests.qemu_img("bitmap", "--add", str(img), "b")
    iotests.qemu_io("-f", "qcow2", "-c", "write -P 0x5a 64k 64k", str(img))
    d = make_daemon("--blockdev", f"file,node-name=f,filename={img},read-only=on",
                    "--blockdev", "qcow2,node-name=n,file=f,read-only=on")
    sock = start_unix_server(d)
    assert d.bitmap("n", "b")["recording"] is True
    export(d, "n", "e0", "x", bitmaps=["b"])
    assert nbdinfo_list(uri(sock))["x"]["contexts"] == ["base:allocation", "qemu:dirty-bitmap:b"]
    assert dirty_ranges(nbdinfo_map(uri(sock, "x"), "qemu:dirty-bitmap:b")) == [(65536, 65536)]

    # A read-write node's recording bitmap stays refused, with or without a writer.
    d.ok("blockdev-add", driver="null-co", node_name="rw")
    d.ok("block-dirty-bitmap-add", node="rw", name="b")
    err = d.err("block-export-add", {"type": "nbd", "id": "e1", "node-name": "rw", "name": "y",
                                     "bitmaps": ["b"]})
    assert err == {"class": "GenericError", "desc": "Enabled bitmap 'b' incompatible with readonly export"}

"""Pull-mode backup (image fleecing): copy-before-write + snapshot-access over NBD.

Sequences follow libvirt's pull backup and QEMU's image-fleecing iotest; error texts,
errno values and content semantics were observed on qemu-storage-daemon 10.0.2
(see /work/shared/reference/fleecing.md). Every test runs on both daemons unless marked.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import iotests
import data_nbd
from data_nbd import (
    EINVAL,
    bitmap_add,
    check_run,
    dirty_ranges,
    export,
    nbdinfo_list,
    qemu_io_uri,
    run,
    start_unix_server,
    unexport,
    uri,
)
from fleece_helpers import (
    ENOTSUP,
    CLUSTER,
    filled_qcow2,
    allocated,
    client,
    read_ok,
    setup_fleece,
    raw_scratch,
    overlay_scratch,
    writer_commands,
    frozen_plus_writes,
    assert_frozen_plus_writes,
    start_writer,
    finish_writer,
    compare,
    unexport_idle,
    teardown_fleece,
    disk_args,
    small_fleece,
    data_extents,
)


@pytest.fixture
def make_daemon(make_daemon):
    """The harness factory, returning daemons whose monitor already answers."""
    return data_nbd.ready_factory(make_daemon)


# ------------------------------------------------------------------ libvirt's pull sequence


def prepare_pull(make_daemon, tmp_path: Path, size: int):
    """Disk with a recording bitmap b0 and changes since; returns (daemon, sock, frozen copy)."""
    disk = filled_qcow2(tmp_path / "disk.qcow2", size, f"write -P 0x11 0 {size // 2}",
                        f"write -P 0x22 {size - (1 << 20)} 1M")
    base = tmp_path / "base.raw"
    check_run(["qemu-img", "convert", "-O", "raw", str(disk), str(base)])
    d = make_daemon(*disk_args(disk))
    sock = start_unix_server(d)
    bitmap_add(d, "disk", "b0")
    export(d, "disk", "pre", "pre", writable=True)
    p = qemu_io_uri(uri(sock, "pre"), "write -P 0x33 0 64k", "write -P 0x44 1M 4k", "write -z 3M 192k",
                    f"write -P 0x55 {size - 512 * 1024} 128k")
    assert p.returncode == 0 and "failed" not in p.stdout, p.stdout
    frozen = tmp_path / "frozen.raw"
    check_run(["nbdcopy", uri(sock, "pre"), str(frozen)], timeout=60)
    unexport(d, "pre")
    # the checkpoint: a new bitmap starts, b0 is frozen (nothing writes meanwhile, so no
    # transaction is needed)
    bitmap_add(d, "disk", "b1")
    d.ok("block-dirty-bitmap-disable", node="disk", name="b0")
    return d, sock, disk, base, frozen


def test_pull_incremental_with_bitmap_while_writer_busy(make_daemon, tmp_path):
    size = 16 << 20
    d, sock, disk, base, frozen = prepare_pull(make_daemon, tmp_path, size)
    setup_fleece(d, tmp_path, scratch=overlay_scratch(tmp_path, disk, size), bitmap={"node": "disk", "name": "b0"})
    export(d, "access", "view", "view", bitmaps=[{"node": "disk", "name": "b0"}], allocation_depth=True)
    export(d, "cbw", "guest", "guest", writable=True)
    contexts = nbdinfo_list(uri(sock))["view"]["contexts"]
    assert contexts == ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"]

    cmds = writer_commands(size, seed=12)
    writer = start_writer(uri(sock, "guest"), cmds)
    try:
        dirty = dirty_ranges(data_nbd.nbdinfo_map(uri(sock, "view"), "qemu:dirty-bitmap:b0"))
        assert dirty == [(0, 65536), (1 << 20, 65536), (3 << 20, 196608), (size - 512 * 1024, 131072)]
        c = client(sock, "view")
        with open(base, "r+b") as out:
            for off, length in dirty:
                for pos in range(off, off + length, 1 << 20):
                    n = min(1 << 20, off + length - pos)
                    out.seek(pos)
                    out.write(read_ok(c, pos, n))
        # a clean cluster is not part of the view: the whole request fails
        assert c.read(2 << 20, 4096)[0] == EINVAL
        assert c.read(0, 2 * 65536)[0] == EINVAL
        c.disconnect()
    finally:
        finish_writer(writer)
    compare(base, frozen)
    # whole-disk map and copy of a bitmap-limited view fail (clean areas are unreadable)
    assert run(["nbdinfo", "--map", uri(sock, "view")]).returncode != 0

    # writes through the filter marked the disk's new bitmap
    expected = set()
    for _kind, off, length in cmds:
        expected.update(range(off // CLUSTER, (off + length - 1) // CLUSTER + 1))
    assert d.bitmap("disk", "b1")["count"] == len(expected) * CLUSTER
    assert d.bitmap("disk", "b0")["busy"] is True

    unexport_idle(d, "view")
    unexport_idle(d, "guest")
    # the disk is the filter's file and the scratch overlay's backing: QEMU names the backing
    busy = "Node 'disk' is busy: node is used as backing hd of 'scratch'"
    assert d.err("blockdev-del", node_name="disk")["desc"] == busy
    teardown_fleece(d, keep_disk=True)
    assert d.err("blockdev-del", node_name="disk")["desc"] == busy
    d.ok("blockdev-del", node_name="scratch")
    assert d.bitmap("disk", "b0")["busy"] is False
    d.ok("blockdev-del", node_name="disk")
    d.ok("blockdev-del", node_name="disk-file")
    # the disk holds exactly the frozen data plus what the writer wrote
    assert_frozen_plus_writes(tmp_path, disk, frozen, cmds)


def test_pull_full_view_with_nbdcopy_while_writer_busy(make_daemon, tmp_path):
    size = 16 << 20
    d, sock, disk, _base, frozen = prepare_pull(make_daemon, tmp_path, size)
    setup_fleece(d, tmp_path, scratch=overlay_scratch(tmp_path, disk, size))
    export(d, "access", "view", "view")
    export(d, "cbw", "guest", "guest", writable=True)
    cmds = writer_commands(size, seed=7)
    writer = start_writer(uri(sock, "guest"), cmds)
    try:
        view_map = data_nbd.nbdinfo_map(uri(sock, "view"))
        pulled = tmp_path / "pulled.raw"
        check_run(["nbdcopy", uri(sock, "view"), str(pulled)], timeout=60)
    finally:
        finish_writer(writer)
    compare(pulled, frozen)
    # the view's map is the old allocation: data where the frozen disk had data
    data = [(o, n) for o, n, f in view_map if f & 1 == 0]
    assert data[0] == (0, 3 << 20) and data[-1][0] + data[-1][1] == size
    # the guest export shows the new data, the view still the old
    expect = frozen_plus_writes(tmp_path, frozen, cmds)
    now = tmp_path / "now.raw"
    check_run(["nbdcopy", uri(sock, "guest"), str(now)], timeout=60)
    compare(now, expect)
    teardown_fleece(d, "view", "guest")
    d.ok("blockdev-del", node_name="disk-file")
    compare(disk, expect, "qcow2", "raw")


# ------------------------------------------------------------------ view semantics


def test_view_keeps_old_data_under_partial_zero_and_new_writes(make_daemon, tmp_path):
    d, sock, scratch = small_fleece(make_daemon, tmp_path)
    p = qemu_io_uri(uri(sock, "guest"), "write -P 0x33 0 64k", "write -P 0x55 1M 4k", "write -z 2M 64k",
                    "write -P 0x66 3M 64k")
    assert p.returncode == 0 and "failed" not in p.stdout, p.stdout
    # exactly the touched clusters were copied, whole (checked before any read: reading a
    # zeroed range through the page cache makes it look like data to SEEK_DATA)
    assert data_extents(scratch) == [(0, 65536), (1 << 20, 65536), (2 << 20, 65536)]
    # the view's map is the old allocation (copied zeros stay zeros), every byte at depth 1
    assert data_nbd.nbdinfo_map(uri(sock, "view")) == [(0, 3 << 20, 0), (3 << 20, 1 << 20, 3)]
    assert data_nbd.nbdinfo_map(uri(sock, "view"), "qemu:allocation-depth") == [(0, 4 << 20, 1)]
    assert data_nbd.nbdinfo_map(uri(sock, "guest")) == [(0, 2 << 20, 0), (2 << 20, 65536, 3),
                                                         (2162688, 1 << 20, 0), (3211264, 983040, 3)]
    p = qemu_io_uri(uri(sock, "view"), "read -P 0x11 0 1M", "read -P 0x22 1M 1M", "read -P 0x44 2M 1M",
                    "read -P 0 3M 1M", read_only=True)
    assert p.returncode == 0 and "verification" not in p.stdout and "failed" not in p.stdout, p.stdout
    p = qemu_io_uri(uri(sock, "guest"), "read -P 0x33 0 64k", "read -P 0x55 1M 4k", "read -P 0x22 1028k 60k",
                    "read -P 0 2M 64k", "read -P 0x66 3M 64k")
    assert p.returncode == 0 and "verification" not in p.stdout, p.stdout
    nodes = {n["node-name"]: n for n in d.nodes()}
    disk_file = str(tmp_path / "disk.qcow2")
    assert (nodes["cbw"]["drv"], nodes["cbw"]["file"]) == ("copy-before-write", disk_file)
    assert (nodes["access"]["drv"], nodes["access"]["file"], nodes["access"]["ro"]) == \
        ("snapshot-access", disk_file, False)
    disk_image = nodes["disk"]["image"]
    assert nodes["access"]["image"] == {"filename": disk_file, "format": "snapshot-access", "virtual-size": 4 << 20,
                                        "actual-size": disk_image["actual-size"]}
    assert nodes["cbw"]["image"] == {"filename": disk_file, "format": "copy-before-write", "virtual-size": 4 << 20,
                                     "actual-size": disk_image["actual-size"], "cluster-size": 65536,
                                     "dirty-flag": False}
    # writes to the view are refused
    c = client(sock, "view")
    assert c.write(0, b"x" * 512)[0] == ENOTSUP
    assert read_ok(c, 0, 512) == b"\x11" * 512
    c.disconnect()
    teardown_fleece(d, "view", "guest")


def test_min_cluster_size_widens_the_copy(make_daemon, tmp_path):
    d, sock, scratch = small_fleece(make_daemon, tmp_path, cbw_opts={"min-cluster-size": 262144})
    assert qemu_io_uri(uri(sock, "guest"), "write -P 0x33 1028k 4k").returncode == 0
    assert data_extents(scratch) == [(1 << 20, 262144)]
    teardown_fleece(d, "view", "guest")


def test_bitmap_limits_protected_and_readable_regions(make_daemon, tmp_path):
    size = 4 << 20
    disk = filled_qcow2(tmp_path / "disk.qcow2", size, "write -P 0x11 0 4M")
    d = make_daemon(*disk_args(disk))
    sock = start_unix_server(d)
    bitmap_add(d, "disk", "b0")
    export(d, "disk", "pre", "pre", writable=True)
    assert qemu_io_uri(uri(sock, "pre"), "write -P 0x22 64k 64k").returncode == 0
    unexport(d, "pre")
    d.ok("block-dirty-bitmap-disable", node="disk", name="b0")
    setup_fleece(d, tmp_path, scratch=raw_scratch(tmp_path / "scratch.raw", size),
                 bitmap={"node": "disk", "name": "b0"})
    # names are looked up from the exported node: snapshot-access is no filter over the disk
    err = d.err("block-export-add", {"type": "nbd", "id": "v", "node-name": "access", "bitmaps": ["b0"]})
    assert err["desc"] == "Bitmap 'b0' is not found"
    # ... while the filter is one: the name form finds the disk's bitmap below it
    export(d, "cbw", "filtered", "filtered", bitmaps=["b0"])
    assert nbdinfo_list(uri(sock))["filtered"]["contexts"] == ["base:allocation", "qemu:dirty-bitmap:b0"]
    assert dirty_ranges(data_nbd.nbdinfo_map(uri(sock, "filtered"), "qemu:dirty-bitmap:b0")) == [(65536, 65536)]
    # an exported bitmap is busy for a second export
    err = d.err("block-export-add", {"type": "nbd", "id": "v", "node-name": "access",
                                     "bitmaps": [{"node": "disk", "name": "b0"}]})
    assert err["desc"] == "Bitmap 'b0' is currently in use by another operation and cannot be used"
    unexport_idle(d, "filtered")
    export(d, "access", "view", "view", bitmaps=[{"node": "disk", "name": "b0"}])
    export(d, "cbw", "guest", "guest", writable=True)
    p = qemu_io_uri(uri(sock, "guest"), "write -P 0x33 0 256k")
    assert p.returncode == 0 and "failed" not in p.stdout, p.stdout
    # only the dirty cluster was copied
    assert data_extents(tmp_path / "scratch.raw") == [(65536, 65536)]
    c = client(sock, "view")
    assert read_ok(c, 65536, 65536) == b"\x22" * 65536
    assert c.read(0, 4096)[0] == EINVAL
    assert c.read(65536, 65537)[0] == EINVAL
    c.disconnect()
    teardown_fleece(d, "view", "guest")


def test_reader_discard_frees_scratch_and_stops_protection(make_daemon, tmp_path):
    d, sock, scratch = small_fleece(make_daemon, tmp_path, scratch_opts={"discard": "unmap"},
                                    access_opts={"discard": "unmap"})
    assert qemu_io_uri(uri(sock, "guest"), "write -P 0x33 0 1M").returncode == 0
    full = allocated(scratch)
    assert full >= 1 << 20
    c = client(sock, "view")
    # unaligned: only the whole clusters inside are released
    assert c.request(data_nbd.CMD_TRIM, 4096, 512 * 1024 - 4096)[0] == 0
    assert allocated(scratch) <= full - (448 << 10)
    assert c.read(65536, 4096)[0] == EINVAL
    assert read_ok(c, 0, 4096) == b"\x11" * 4096
    assert read_ok(c, 512 * 1024, 65536) == b"\x11" * 65536
    # released before the guest writes there: nothing is copied any more
    assert c.request(data_nbd.CMD_TRIM, 2 << 20, 1 << 20)[0] == 0
    before = allocated(scratch)
    assert qemu_io_uri(uri(sock, "guest"), "write -P 0x55 2M 1M").returncode == 0
    assert allocated(scratch) == before
    assert c.read(2 << 20, 512)[0] == EINVAL
    c.disconnect()
    # the filter's own bitmaps, newest first: readable, needing no copy any more (copied or
    # written after release), still to copy
    counts = [(b["count"], b["granularity"], b["recording"], "name" in b) for b in d.bitmaps("cbw")]
    readable = (4 << 20) - (448 << 10) - (1 << 20)
    assert counts == [(readable, CLUSTER, False, False), (2 << 20, CLUSTER, False, False),
                      ((4 << 20) - (1 << 20) - (1 << 20), CLUSTER, False, False)]
    teardown_fleece(d, "view", "guest")


def test_view_discard_is_ignored_without_discard_unmap(make_daemon, tmp_path):
    d, sock, scratch = small_fleece(make_daemon, tmp_path, scratch_opts={"discard": "unmap"})
    assert qemu_io_uri(uri(sock, "guest"), "write -P 0x33 0 1M").returncode == 0
    full = allocated(scratch)
    c = client(sock, "view")
    assert c.request(data_nbd.CMD_TRIM, 0, 1 << 20)[0] == 0
    assert read_ok(c, 0, 1 << 20) == b"\x11" * (1 << 20)
    assert allocated(scratch) == full
    c.disconnect()
    teardown_fleece(d, "view", "guest")


# ------------------------------------------------------------------ options, graph rules


def test_option_errors_use_qemu_texts(make_daemon, tmp_path):
    size = 4 << 20
    disk = filled_qcow2(tmp_path / "disk.qcow2", size)
    d = make_daemon(*disk_args(disk), "--blockdev", "null-co,node-name=small,size=2097152")
    d.ok("blockdev-add", raw_scratch(tmp_path / "scratch.raw", size))
    bitmap_add(d, "small", "sb")

    def cbw_err(**extra):
        args = {"driver": "copy-before-write", "node-name": "cbw", "file": "disk", "target": "scratch", **extra}
        return d.err("blockdev-add", args)["desc"]

    assert cbw_err(bitmap={"node": "nosuch", "name": "b"}) == "Node 'nosuch' not found"
    assert cbw_err(bitmap={"node": "disk", "name": "b"}) == "Dirty bitmap 'b' not found"
    assert cbw_err(file="nosuch") == "Cannot find device='nosuch' nor node-name='nosuch'"
    assert cbw_err(**{"min-cluster-size": 100000}) == \
        "Cannot create block-copy-state: min-cluster-size needs to be a power of 2"
    assert cbw_err(**{"min-cluster-size": "256k"}) == "Parameter 'min-cluster-size' expects uint64"
    assert cbw_err(**{"on-cbw-error": "bogus"}) == "Parameter 'on-cbw-error' does not accept value 'bogus'"
    assert cbw_err(bitmap={"node": "small", "name": "sb"}) == (
        "Cannot create block-copy-state: Failed to merge bitmap 'sb' to internal copy-bitmap: Bitmaps are of "
        f"different sizes (destination size is {size}, source size is 2097152) and can't be merged")
    assert [n["node-name"] for n in d.nodes() if n["node-name"] == "cbw"] == []


@iotests.blockd_only
def test_target_of_another_length_is_refused(make_daemon, tmp_path):
    # QSD 10.0.2 accepts it and aborts on the first copy past the target's end.
    disk = filled_qcow2(tmp_path / "disk.qcow2", 4 << 20)
    d = make_daemon(*disk_args(disk))
    d.ok("blockdev-add", raw_scratch(tmp_path / "scratch.raw", 2 << 20))
    err = d.err("blockdev-add", {"driver": "copy-before-write", "node-name": "cbw", "file": "disk",
                                 "target": "scratch"})
    assert err["desc"] == "Cannot create block-copy-state: target size (2097152) differs from source size (4194304)"


def test_delete_refusals_and_teardown_leave_the_disk_as_written(make_daemon, tmp_path):
    d, sock, _scratch = small_fleece(make_daemon, tmp_path)
    assert qemu_io_uri(uri(sock, "guest"), "write -P 0x33 512k 1M").returncode == 0
    assert d.err("blockdev-del", node_name="access")["desc"] == "Node access is in use"
    assert d.err("blockdev-del", node_name="cbw")["desc"] == "Node cbw is in use"
    assert d.err("blockdev-del", node_name="scratch")["desc"] == "Block device scratch is in use"
    assert d.err("blockdev-del", node_name="disk")["desc"] == "Block device disk is in use"
    unexport_idle(d, "guest")
    assert d.err("blockdev-del", node_name="cbw")["desc"] == "Block device cbw is in use"
    unexport_idle(d, "view")
    d.ok("blockdev-del", node_name="access")
    d.ok("blockdev-del", node_name="cbw")
    d.ok("blockdev-del", node_name="scratch")
    d.ok("blockdev-del", node_name="disk")
    d.ok("blockdev-del", node_name="disk-file")
    disk = tmp_path / "disk.qcow2"
    p = qemu_io_uri(str(disk), "read -P 0x11 0 512k", "read -P 0x33 512k 1M", "read -P 0x22 1536k 512k",
                    "read -P 0x44 2M 1M", "read -P 0 3M 1M", fmt="qcow2")
    assert p.returncode == 0 and "verification" not in p.stdout, p.stdout


def test_snapshot_access_over_a_plain_node_reads_enotsup(make_daemon, tmp_path):
    disk = filled_qcow2(tmp_path / "disk.qcow2", 4 << 20, "write -P 0x11 0 1M")
    d = make_daemon(*disk_args(disk))
    sock = start_unix_server(d)
    d.ok("blockdev-add", {"driver": "snapshot-access", "node-name": "access", "file": "disk"})
    export(d, "access", "view", "view")
    c = client(sock, "view")
    assert c.read(0, 512)[0] == ENOTSUP
    c.disconnect()
    unexport_idle(d, "view")
    d.ok("blockdev-del", node_name="access")


# ------------------------------------------------------------------ the older job-based pattern


def test_sync_none_backup_into_overlay_exported_read_only(make_daemon, tmp_path):
    size = 4 << 20
    disk = filled_qcow2(tmp_path / "disk.qcow2", size, "write -P 0x11 0 2M", "write -P 0x22 2M 1M")
    frozen = tmp_path / "frozen.raw"
    check_run(["qemu-img", "convert", "-O", "raw", str(disk), str(frozen)])
    fleece = tmp_path / "fleece.qcow2"
    iotests.qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", str(disk), str(fleece), str(size))
    d = make_daemon(*disk_args(disk))
    sock = start_unix_server(d)
    export(d, "disk", "guest", "guest", writable=True)
    d.ok("blockdev-add", {"driver": "qcow2", "node-name": "scratch",
                          "file": {"driver": "file", "filename": str(fleece)}, "backing": "disk"})
    d.ok("blockdev-backup", {"job-id": "fl", "device": "disk", "target": "scratch", "sync": "none",
                             "filter-node-name": "bf"})
    export(d, "scratch", "view", "view")
    cmds = writer_commands(size, seed=3)
    writer = start_writer(uri(sock, "guest"), cmds)
    try:
        pulled = tmp_path / "pulled.raw"
        check_run(["nbdcopy", uri(sock, "view"), str(pulled)], timeout=60)
    finally:
        finish_writer(writer)
    compare(pulled, frozen)
    assert d.err("blockdev-del", node_name="scratch")["desc"] == "Node scratch is in use"
    unexport_idle(d, "view")
    busy = "Node 'scratch' is busy: block device is in use by block job: backup"
    assert d.err("blockdev-del", node_name="scratch")["desc"] == busy
    # the job's filter took over the writer's export
    assert d.ok("query-block-exports") == [{"type": "nbd", "id": "guest", "node-name": "bf",
                                            "shutting-down": False}]
    d.ok("job-cancel", id="fl")
    d.event_wait("BLOCK_JOB_CANCELLED", match={"device": "fl"})
    d.ok("blockdev-del", node_name="scratch")
    unexport_idle(d, "guest")
    d.ok("blockdev-del", node_name="disk")
    d.ok("blockdev-del", node_name="disk-file")
    assert_frozen_plus_writes(tmp_path, disk, frozen, cmds)


def test_filter_with_a_user_unshares_write_on_the_disk(make_daemon, tmp_path):
    size = 4 << 20
    disk = filled_qcow2(tmp_path / "disk.qcow2", size, "write -P 0x11 0 1M")
    d = make_daemon(*disk_args(disk))
    sock = start_unix_server(d)
    conflict = ("Permission conflict on node 'disk': permissions 'write' are both required by an unnamed block "
                "device (uses node 'disk' as 'root' child) and unshared by node 'cbw' (uses node 'disk' as "
                "'file' child).")
    export(d, "disk", "side", "side", writable=True)
    d.ok("blockdev-add", raw_scratch(tmp_path / "scratch.raw", size))
    # a filter without parents takes nothing yet
    d.ok("blockdev-add", {"driver": "copy-before-write", "node-name": "cbw", "file": "disk", "target": "scratch"})
    err = d.err("blockdev-add", {"driver": "snapshot-access", "node-name": "access", "file": "cbw"})
    assert err["desc"] == conflict
    err = d.err("block-export-add", {"type": "nbd", "id": "guest", "node-name": "cbw", "writable": True})
    assert err["desc"] == conflict
    unexport_idle(d, "side")
    d.ok("blockdev-add", {"driver": "snapshot-access", "node-name": "access", "file": "cbw"})
    err = d.err("block-export-add", {"type": "nbd", "id": "side", "node-name": "disk", "writable": True})
    assert err["desc"] == conflict
    # readers of the disk stay possible
    export(d, "disk", "ro", "ro")
    assert qemu_io_uri(uri(sock, "ro"), "read -P 0x11 0 1M", read_only=True).returncode == 0
    unexport_idle(d, "ro")
    teardown_fleece(d)


def test_two_filters_on_one_disk_conflict_once_used(make_daemon, tmp_path):
    size = 4 << 20
    disk = filled_qcow2(tmp_path / "disk.qcow2", size)
    d = make_daemon(*disk_args(disk))
    start_unix_server(d)
    for i in (1, 2):
        d.ok("blockdev-add", raw_scratch(tmp_path / f"s{i}.raw", size) | {"node-name": f"s{i}"})
        d.ok("blockdev-add", {"driver": "copy-before-write", "node-name": f"c{i}", "file": "disk",
                              "target": f"s{i}"})

    def conflict(writer, unsharer):
        return (f"Permission conflict on node 'disk': permissions 'write' are both required by node '{writer}' "
                f"(uses node 'disk' as 'file' child) and unshared by node '{unsharer}' (uses node 'disk' as "
                "'file' child).")

    d.ok("blockdev-add", {"driver": "snapshot-access", "node-name": "a1", "file": "c1"})
    err = d.err("block-export-add", {"type": "nbd", "id": "w2", "node-name": "c2", "writable": True})
    assert err["desc"] == conflict("c2", "c1")
    d.ok("blockdev-del", node_name="a1")
    export(d, "c1", "w1", "w1", writable=True)
    err = d.err("block-export-add", {"type": "nbd", "id": "w2", "node-name": "c2", "writable": True})
    assert err["desc"] == conflict("c1", "c2")
    err = d.err("blockdev-add", {"driver": "snapshot-access", "node-name": "a2", "file": "c2"})
    assert err["desc"] == conflict("c1", "c2")
    unexport_idle(d, "w1")

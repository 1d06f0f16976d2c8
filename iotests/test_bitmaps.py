"""Dirty bitmaps: add/remove/clear/enable/disable/merge/sha256 and what writes mark.

Every number and text below was observed on qemu-storage-daemon 10.0.2.
Writes go through :meth:`Daemon.node_io` (HMP qemu-io on blockd, a temporary
NBD export + qemu-io on QSD), so the bitmaps see exactly the guest requests.
"""

from __future__ import annotations

import hashlib
import struct

import pytest

from iotests import blockd_only, create_image, qemu_img, qemu_io

MiB = 1 << 20
#: Disk size used by the counting tests: not a multiple of 64 KiB or 1 MiB,
#: so the last granule is partial for every granularity above 4 KiB.
SIZE = 3 * MiB + 4096
BITMAP_KEYS = ["name", "recording", "persistent", "busy", "granularity", "count"]


@pytest.fixture
def disk(daemon, tmp_path):
    """Daemon with raw node ``r`` (discard=unmap) over a SIZE-byte raw file node ``f``."""
    img = create_image(tmp_path / "disk.raw", SIZE)
    daemon.ok("blockdev-add", driver="file", node_name="f", filename=str(img), discard="unmap")
    daemon.ok("blockdev-add", driver="raw", node_name="r", file="f", discard="unmap")
    return daemon


def add(d, name, node="r", **kw):
    d.ok("block-dirty-bitmap-add", node=node, name=name, **kw)


def count(d, name, node="r"):
    return d.bitmap(node, name)["count"]


def level0_sha256(size: int, granularity: int, bits) -> str:
    """What x-debug-block-dirty-bitmap-sha256 returns: SHA-256 of the bitmap's
    bits as little-endian 64-bit words, ceil(ceil(size/granularity)/64) words."""
    nbits = -(-size // granularity)
    words = [0] * (-(-nbits // 64))
    for b in bits:
        words[b // 64] |= 1 << (b % 64)
    return hashlib.sha256(b"".join(struct.pack("<Q", w) for w in words)).hexdigest()


# ------------------------------------------------------------ add: granularity


@pytest.mark.parametrize("cluster,granularity", [("512", 4096), ("4k", 4096), ("64k", 65536), ("2M", 65536)])
def test_default_granularity_follows_qcow2_cluster_size_clamped(daemon, tmp_path, cluster, granularity):
    img = create_image(tmp_path / "c.qcow2", 4 * MiB, "qcow2", cluster_size=cluster)
    daemon.ok("blockdev-add", driver="qcow2", node_name="q", file={"driver": "file", "filename": str(img)})
    add(daemon, "b", node="q")
    assert daemon.bitmap("q", "b")["granularity"] == granularity


@pytest.mark.parametrize("node", ["f", "r"])
def test_default_granularity_without_cluster_size_is_64k(disk, node):
    add(disk, "b", node=node)
    assert disk.bitmap(node, "b")["granularity"] == 65536


def test_default_granularity_on_null_node_is_64k(daemon):
    daemon.ok("blockdev-add", driver="null-co", node_name="n", size=MiB)
    add(daemon, "b", node="n")
    assert daemon.bitmap("n", "b")["granularity"] == 65536


@pytest.mark.parametrize("granularity", [512, 1024, 4096, 1 << 20, 1 << 31])
def test_explicit_power_of_two_granularity_is_kept(disk, granularity):
    add(disk, "b", granularity=granularity)
    assert disk.bitmap("r", "b")["granularity"] == granularity


@pytest.mark.parametrize("granularity", [0, 256, 511, 513, 1000, 3 * MiB])
def test_bad_granularity_is_refused(disk, granularity):
    err = disk.err("block-dirty-bitmap-add", node="r", name="b", granularity=granularity)
    assert err == {"class": "GenericError", "desc": "Granularity must be power of 2 and at least 512"}
    assert disk.bitmaps("r") == []


@pytest.mark.parametrize("granularity", [1 << 32, -1])
def test_granularity_outside_uint32_is_refused(disk, granularity):
    err = disk.err("block-dirty-bitmap-add", node="r", name="b", granularity=granularity)
    assert err == {"class": "GenericError", "desc": "Parameter 'granularity' expects uint32_t"}


# ------------------------------------------------------------ add: names and nodes


def test_empty_name_is_refused(disk):
    err = disk.err("block-dirty-bitmap-add", node="r", name="")
    assert err == {"class": "GenericError", "desc": "Bitmap name cannot be empty"}


@pytest.mark.parametrize("name", ["x" * 1023, "\u00e9" * 511 + "x", " ", "a b", "#x", "\u00e9"],
                         ids=["1023-ascii", "1023-bytes-utf8", "space", "inner-space", "hash", "utf8"])
def test_name_up_to_1023_bytes_is_accepted(disk, name):
    add(disk, name)
    assert disk.bitmap("r", name)["name"] == name


@pytest.mark.parametrize("name", ["x" * 1024, "\u00e9" * 512], ids=["1024-ascii", "1024-bytes-utf8"])
def test_name_of_1024_bytes_is_refused(disk, name):
    err = disk.err("block-dirty-bitmap-add", node="r", name=name)
    assert err == {"class": "GenericError", "desc": f"Bitmap name too long: {name}"}


def test_duplicate_name_on_same_node_is_refused(disk):
    add(disk, "b")
    err = disk.err("block-dirty-bitmap-add", node="r", name="b", granularity=512)
    assert err == {"class": "GenericError", "desc": "Bitmap already exists: b"}
    assert disk.bitmap("r", "b")["granularity"] == 65536


def test_same_name_on_two_nodes_is_allowed(disk):
    add(disk, "b", node="r")
    add(disk, "b", node="f")
    assert disk.bitmap("r", "b") and disk.bitmap("f", "b")


def test_add_on_unknown_node_is_refused(daemon):
    err = daemon.err("block-dirty-bitmap-add", node="nosuch", name="b")
    assert err == {"class": "GenericError", "desc": "Cannot find device='nosuch' nor node-name='nosuch'"}


@pytest.mark.parametrize("node", ["f", "r"])
def test_persistent_on_raw_is_refused(disk, node):
    err = disk.err("block-dirty-bitmap-add", node=node, name="p", persistent=True)
    assert err == {"class": "GenericError", "desc": f"Can't store persistent bitmaps to {node}: Operation not supported"}
    assert disk.bitmaps(node) == []


def test_persistent_on_qcow2_is_accepted(daemon, tmp_path):
    img = create_image(tmp_path / "p.qcow2", MiB, "qcow2")
    daemon.ok("blockdev-add", driver="qcow2", node_name="q", file={"driver": "file", "filename": str(img)})
    add(daemon, "p", node="q", persistent=True)
    assert daemon.bitmap("q", "p")["persistent"] is True


def test_disabled_bitmap_is_born_not_recording(disk):
    add(disk, "b", disabled=True)
    assert disk.bitmap("r", "b")["recording"] is False
    disk.node_io("r", "write 0 64k")
    assert count(disk, "b") == 0


# ------------------------------------------------------------ query shape


def test_new_bitmap_has_qemu10_fields_in_order(disk):
    add(disk, "b")
    info = disk.bitmap("r", "b")
    assert list(info) == BITMAP_KEYS
    assert info == {"name": "b", "recording": True, "persistent": False, "busy": False,
                    "granularity": 65536, "count": 0}


def test_bitmaps_are_listed_newest_first(disk):
    for name in ("first", "second", "third"):
        add(disk, name)
    assert [b["name"] for b in disk.bitmaps("r")] == ["third", "second", "first"]


def test_node_without_bitmaps_has_no_dirty_bitmaps_key(disk):
    assert "dirty-bitmaps" not in disk.node("r")
    add(disk, "b")
    disk.ok("block-dirty-bitmap-remove", node="r", name="b")
    assert "dirty-bitmaps" not in disk.node("r")


def test_inconsistent_appears_only_when_true(make_daemon, tmp_path):
    img = create_image(tmp_path / "p.qcow2", MiB, "qcow2")
    qemu_img("bitmap", "--add", str(img), "pb")
    first = make_daemon(name="first")
    first.ok("blockdev-add", driver="qcow2", node_name="q", file={"driver": "file", "filename": str(img)})
    assert "inconsistent" not in first.bitmap("q", "pb")
    first.kill()  # the in-use flag stays set in the image
    # a writable open by QEMU: blockd's dirty-region log is no longer trusted either
    qemu_io("-f", "qcow2", "-c", "flush", str(img))
    second = make_daemon(name="second")
    second.ok("blockdev-add", driver="qcow2", node_name="q", file={"driver": "file", "filename": str(img)})
    info = second.bitmap("q", "pb")
    assert list(info) == BITMAP_KEYS + ["inconsistent"]
    assert info["inconsistent"] is True and info["recording"] is False and info["persistent"] is True


# ------------------------------------------------------------ counting writes
#
# (qemu-io command, {granularity: expected count}) on a SIZE-byte disk.

E = SIZE  # end of disk
COUNT_CASES = [
    ("one-byte-at-0", lambda g: "write 0 1", {512: 512, 65536: 65536, MiB: MiB}),
    ("two-bytes-across-granule-boundary", lambda g: f"write {g - 1} 2", {512: 1024, 65536: 131072, MiB: 2 * MiB}),
    ("spanning-three-granules", lambda g: f"write {g // 2} {2 * g}", {512: 1536, 65536: 196608, MiB: 3 * MiB}),
    ("last-sector", lambda g: f"write {E - 512} 512", {512: 512, 65536: 65536, MiB: MiB}),
    ("last-byte", lambda g: f"write {E - 1} 1", {512: 512, 65536: 65536, MiB: MiB}),
    ("into-partial-last-granule", lambda g: f"write {E - 8192} 8192", {512: 8192, 65536: 131072, MiB: 2 * MiB}),
    ("whole-disk", lambda g: f"write 0 {E}", {512: SIZE, 65536: 49 * 65536, MiB: 4 * MiB}),
]


@pytest.mark.parametrize("granularity", [512, 65536, MiB], ids=["512", "64k", "1M"])
@pytest.mark.parametrize("make_cmd,expected", [c[1:] for c in COUNT_CASES], ids=[c[0] for c in COUNT_CASES])
def test_write_marks_every_touched_granule(disk, granularity, make_cmd, expected):
    add(disk, "b", granularity=granularity)
    disk.node_io("r", make_cmd(granularity))
    assert count(disk, "b") == expected[granularity]


def test_one_write_marks_all_bitmaps_of_the_node(disk):
    add(disk, "g512", granularity=512)
    add(disk, "g64k", granularity=65536)
    add(disk, "g1m", granularity=MiB)
    disk.node_io("r", "write 1048575 2")
    assert {b["name"]: b["count"] for b in disk.bitmaps("r")} == {"g512": 1024, "g64k": 131072, "g1m": 2 * MiB}


def test_overlapping_writes_count_once(disk):
    add(disk, "b")
    disk.node_io("r", "write 0 4k", "write 0 64k", "write 100 1")
    assert count(disk, "b") == 65536


def test_write_zeroes_marks_bitmap(disk):
    add(disk, "b", granularity=512)
    assert disk.node_io("r", "write -z 100 4000") == "wrote 4000/4000 bytes at offset 100\n"
    assert count(disk, "b") == 4608


def test_write_zeroes_with_unmap_marks_bitmap(disk):
    add(disk, "b", granularity=512)
    disk.node_io("r", "write -z -u 0 64k")
    assert count(disk, "b") == 65536


def test_discard_marks_bitmap(disk):
    add(disk, "b", granularity=512)
    assert disk.node_io("r", "discard 100 1000") == "discard 1000/1000 bytes at offset 100\n"
    assert count(disk, "b") == 1536


def test_discard_on_node_with_discard_ignore_marks_nothing(daemon, tmp_path):
    # QEMU drops discards before they reach the dirty bitmaps when the node
    # was opened with discard=ignore (the default).
    img = create_image(tmp_path / "d.raw", MiB)
    daemon.ok("blockdev-add", driver="raw", node_name="r", file={"driver": "file", "filename": str(img)})
    add(daemon, "b")
    daemon.node_io("r", "discard 0 64k")
    assert count(daemon, "b") == 0


def test_read_marks_nothing(disk):
    add(disk, "b")
    disk.node_io("r", "read 0 64k")
    assert count(disk, "b") == 0


def test_bitmap_on_protocol_child_sees_host_offsets(daemon, tmp_path):
    img = create_image(tmp_path / "disk.raw", MiB)
    daemon.ok("blockdev-add", driver="file", node_name="f", filename=str(img))
    daemon.ok("blockdev-add", driver="raw", node_name="r", file="f", offset=65536, size=65536)
    add(daemon, "guest", node="r", granularity=512)
    add(daemon, "host", node="f", granularity=512)
    daemon.node_io("r", "write 0 512")
    assert daemon.sha256("r", "guest") == level0_sha256(65536, 512, [0])
    assert daemon.sha256("f", "host") == level0_sha256(MiB, 512, [128])


# ------------------------------------------------------------ enable / disable / clear / remove


def test_disable_stops_recording(disk):
    add(disk, "b")
    disk.node_io("r", "write 0 1")
    disk.ok("block-dirty-bitmap-disable", node="r", name="b")
    assert disk.bitmap("r", "b")["recording"] is False
    disk.node_io("r", "write 1M 1")
    assert count(disk, "b") == 65536


def test_enable_resumes_recording(disk):
    add(disk, "b", disabled=True)
    disk.ok("block-dirty-bitmap-enable", node="r", name="b")
    assert disk.bitmap("r", "b")["recording"] is True
    disk.node_io("r", "write 1M 1")
    assert count(disk, "b") == 65536


@pytest.mark.parametrize("verb", ["enable", "disable"])
def test_enable_and_disable_are_idempotent(disk, verb):
    add(disk, "b")
    disk.ok(f"block-dirty-bitmap-{verb}", node="r", name="b")
    disk.ok(f"block-dirty-bitmap-{verb}", node="r", name="b")
    assert disk.bitmap("r", "b")["recording"] is (verb == "enable")


def test_clear_empties_bitmap(disk):
    add(disk, "b")
    empty = disk.sha256("r", "b")
    disk.node_io("r", "write 0 1M")
    disk.ok("block-dirty-bitmap-clear", node="r", name="b")
    assert count(disk, "b") == 0
    assert disk.sha256("r", "b") == empty


def test_clear_keeps_recording_state(disk):
    add(disk, "b", disabled=True)
    disk.ok("block-dirty-bitmap-clear", node="r", name="b")
    assert disk.bitmap("r", "b")["recording"] is False


def test_remove_deletes_bitmap(disk):
    add(disk, "b")
    add(disk, "c")
    disk.ok("block-dirty-bitmap-remove", node="r", name="b")
    assert [b["name"] for b in disk.bitmaps("r")] == ["c"]


def test_removed_name_can_be_added_again(disk):
    add(disk, "b")
    disk.node_io("r", "write 0 1")
    disk.ok("block-dirty-bitmap-remove", node="r", name="b")
    add(disk, "b", granularity=512)
    assert disk.bitmap("r", "b")["count"] == 0 and disk.bitmap("r", "b")["granularity"] == 512


@pytest.mark.parametrize("verb", ["remove", "clear", "enable", "disable"])
def test_verb_on_unknown_bitmap_is_refused(disk, verb):
    err = disk.err(f"block-dirty-bitmap-{verb}", node="r", name="nosuch")
    assert err == {"class": "GenericError", "desc": "Dirty bitmap 'nosuch' not found"}


@pytest.mark.parametrize("verb", ["remove", "clear", "enable", "disable"])
def test_verb_on_unknown_node_is_refused(daemon, verb):
    err = daemon.err(f"block-dirty-bitmap-{verb}", node="nosuch", name="b")
    assert err == {"class": "GenericError", "desc": "Node 'nosuch' not found"}


def test_clear_on_read_only_node_in_memory_bitmap_is_allowed(daemon, tmp_path):
    img = create_image(tmp_path / "ro.raw", MiB)
    daemon.ok("blockdev-add", driver="raw", node_name="ro", read_only=True,
              file={"driver": "file", "filename": str(img), "read-only": True})
    add(daemon, "b", node="ro")
    daemon.ok("block-dirty-bitmap-clear", node="ro", name="b")


@pytest.fixture
def ro_qcow2_with_bitmap(daemon, tmp_path):
    """Read-only qcow2 node ``q`` carrying persistent bitmap ``pb`` with 64 KiB dirty."""
    img = create_image(tmp_path / "p.qcow2", MiB, "qcow2")
    qemu_img("bitmap", "--add", str(img), "pb")
    qemu_img("bitmap", "--enable", str(img), "pb")
    qemu_io("-c", "write 0 64k", str(img))
    daemon.ok("blockdev-add", driver="qcow2", node_name="q", read_only=True,
              file={"driver": "file", "filename": str(img)})
    assert daemon.bitmap("q", "pb")["count"] == 65536
    return daemon


@pytest.mark.parametrize("verb", ["clear", "remove"])
def test_bitmap_loaded_from_read_only_image_cannot_be_modified(ro_qcow2_with_bitmap, verb):
    d = ro_qcow2_with_bitmap
    err = d.err(f"block-dirty-bitmap-{verb}", node="q", name="pb")
    assert err == {"class": "GenericError", "desc": "Bitmap 'pb' is readonly and cannot be modified"}
    assert d.bitmap("q", "pb")["count"] == 65536


def test_merge_into_bitmap_of_read_only_image_is_refused(ro_qcow2_with_bitmap):
    d = ro_qcow2_with_bitmap
    add(d, "t", node="q")
    err = d.err("block-dirty-bitmap-merge", node="q", target="pb", bitmaps=["t"])
    assert err == {"class": "GenericError", "desc": "Bitmap 'pb' is readonly and cannot be modified"}


def test_bitmap_of_read_only_image_can_be_merged_from(ro_qcow2_with_bitmap):
    d = ro_qcow2_with_bitmap
    add(d, "t", node="q")
    d.ok("block-dirty-bitmap-merge", node="q", target="t", bitmaps=["pb"])
    assert count(d, "t", node="q") == 65536


# ------------------------------------------------------------ merge


def test_merge_on_same_node_is_union(disk):
    add(disk, "a")
    disk.node_io("r", "write 0 1")
    add(disk, "b")
    disk.node_io("r", "write 1M 1")
    add(disk, "t", disabled=True)
    disk.ok("block-dirty-bitmap-merge", node="r", target="t", bitmaps=["a", "b"])
    assert count(disk, "t") == 2 * 65536
    assert disk.sha256("r", "t") == disk.sha256("r", "a")
    assert count(disk, "a") == 2 * 65536 and count(disk, "b") == 65536  # sources unchanged


def test_merge_across_nodes_with_object_form(daemon, tmp_path):
    for i in (1, 2):
        img = create_image(tmp_path / f"d{i}.raw", MiB)
        daemon.ok("blockdev-add", driver="raw", node_name=f"r{i}", file={"driver": "file", "filename": str(img)})
    add(daemon, "src", node="r1")
    add(daemon, "dst", node="r2")
    daemon.node_io("r1", "write 0 1")
    daemon.node_io("r2", "write 512k 1")
    daemon.ok("block-dirty-bitmap-merge", node="r2", target="dst", bitmaps=[{"node": "r1", "name": "src"}])
    assert daemon.sha256("r2", "dst") == level0_sha256(MiB, 65536, [0, 8])


def test_merge_mixes_string_and_object_forms(disk):
    add(disk, "a", granularity=512)
    add(disk, "b", granularity=4096)
    add(disk, "t", disabled=True)
    disk.node_io("r", "write 0 1")
    disk.ok("block-dirty-bitmap-merge", node="r", target="t", bitmaps=["a", {"node": "r", "name": "b"}])
    assert count(disk, "t") == 65536


def test_merge_of_finer_granularities_into_64k(disk):
    add(disk, "t", disabled=True)  # 64 KiB
    add(disk, "a512", granularity=512)
    add(disk, "b4k", granularity=4096)
    disk.node_io("r", "write 0 1")
    disk.ok("block-dirty-bitmap-disable", node="r", name="b4k")
    disk.node_io("r", "write 200000 1")
    disk.ok("block-dirty-bitmap-merge", node="r", target="t", bitmaps=["a512", "b4k"])
    assert count(disk, "t") == 2 * 65536
    assert disk.sha256("r", "t") == level0_sha256(SIZE, 65536, [0, 3])


def test_merge_of_coarser_granularity_into_512(disk):
    add(disk, "t", granularity=512, disabled=True)
    add(disk, "c", granularity=65536)
    disk.node_io("r", "write 70000 1")
    disk.ok("block-dirty-bitmap-merge", node="r", target="t", bitmaps=["c"])
    assert count(disk, "t") == 65536
    assert disk.sha256("r", "t") == level0_sha256(SIZE, 512, range(128, 256))


def test_merge_into_disabled_target_works_and_keeps_it_disabled(disk):
    add(disk, "t", disabled=True)
    add(disk, "s")
    disk.node_io("r", "write 0 1")
    disk.ok("block-dirty-bitmap-merge", node="r", target="t", bitmaps=["s"])
    info = disk.bitmap("r", "t")
    assert info["count"] == 65536 and info["recording"] is False


def test_merge_of_bitmap_into_itself_changes_nothing(disk):
    add(disk, "b")
    disk.node_io("r", "write 0 1")
    disk.ok("block-dirty-bitmap-merge", node="r", target="b", bitmaps=["b"])
    assert count(disk, "b") == 65536


def test_merge_with_unknown_source_is_refused_and_target_unchanged(disk):
    add(disk, "t")
    add(disk, "s")
    disk.node_io("r", "write 0 1")
    disk.ok("block-dirty-bitmap-disable", node="r", name="t")
    disk.ok("block-dirty-bitmap-clear", node="r", name="t")
    err = disk.err("block-dirty-bitmap-merge", node="r", target="t", bitmaps=["s", "nosuch"])
    assert err == {"class": "GenericError", "desc": "Dirty bitmap 'nosuch' not found"}
    assert count(disk, "t") == 0


def test_merge_with_source_on_unknown_node_is_refused(disk):
    add(disk, "t")
    err = disk.err("block-dirty-bitmap-merge", node="r", target="t", bitmaps=[{"node": "nosuch", "name": "b"}])
    assert err == {"class": "GenericError", "desc": "Node 'nosuch' not found"}


def test_merge_into_unknown_target_is_refused(disk):
    add(disk, "s")
    err = disk.err("block-dirty-bitmap-merge", node="r", target="nosuch", bitmaps=["s"])
    assert err == {"class": "GenericError", "desc": "Dirty bitmap 'nosuch' not found"}


def test_merge_on_unknown_node_is_refused(daemon):
    err = daemon.err("block-dirty-bitmap-merge", node="nosuch", target="t", bitmaps=["s"])
    assert err == {"class": "GenericError", "desc": "Node 'nosuch' not found"}


def test_merge_of_different_disk_sizes_is_refused(disk):
    disk.ok("blockdev-add", driver="null-co", node_name="n", size=MiB)
    add(disk, "t")
    add(disk, "s", node="n")
    err = disk.err("block-dirty-bitmap-merge", node="r", target="t", bitmaps=[{"node": "n", "name": "s"}])
    assert err == {"class": "GenericError",
                   "desc": f"Bitmaps are of different sizes (destination size is {SIZE}, source size is {MiB}) "
                           "and can't be merged"}


@blockd_only
def test_merge_with_empty_source_list_is_an_error(disk):
    # qemu-storage-daemon 10.0.2 crashes here; blockd refuses cleanly.
    add(disk, "t")
    err = disk.err("block-dirty-bitmap-merge", node="r", target="t", bitmaps=[])
    assert err["class"] == "GenericError"
    assert disk.ok("query-version")


# ------------------------------------------------------------ inconsistent bitmaps


@pytest.fixture
def inconsistent(make_daemon, tmp_path):
    """A daemon with qcow2 node ``q`` whose bitmap ``pb`` is inconsistent."""
    img = create_image(tmp_path / "p.qcow2", MiB, "qcow2")
    qemu_img("bitmap", "--add", str(img), "pb")
    first = make_daemon(name="crashed")
    first.ok("blockdev-add", driver="qcow2", node_name="q", file={"driver": "file", "filename": str(img)})
    first.kill()
    qemu_io("-f", "qcow2", "-c", "flush", str(img))  # invalidates blockd's dirty-region log
    d = make_daemon(name="after")
    d.ok("blockdev-add", driver="qcow2", node_name="q", file={"driver": "file", "filename": str(img)})
    return d


@pytest.mark.parametrize("verb", ["clear", "enable", "disable"])
def test_inconsistent_bitmap_cannot_be_used(inconsistent, verb):
    err = inconsistent.err(f"block-dirty-bitmap-{verb}", node="q", name="pb")
    assert err == {"class": "GenericError", "desc": "Bitmap 'pb' is inconsistent and cannot be used"}


def test_inconsistent_bitmap_cannot_be_merged_from(inconsistent):
    add(inconsistent, "t", node="q")
    err = inconsistent.err("block-dirty-bitmap-merge", node="q", target="t", bitmaps=["pb"])
    assert err == {"class": "GenericError", "desc": "Bitmap 'pb' is inconsistent and cannot be used"}


def test_inconsistent_bitmap_can_be_removed(inconsistent):
    inconsistent.ok("block-dirty-bitmap-remove", node="q", name="pb")
    assert inconsistent.bitmaps("q") == []


def test_inconsistent_bitmap_can_be_hashed(inconsistent):
    assert inconsistent.sha256("q", "pb") == level0_sha256(MiB, 65536, [])


# ------------------------------------------------------------ sha256


def test_sha256_of_equal_bitmaps_is_equal(disk):
    add(disk, "a")
    add(disk, "b")
    disk.node_io("r", "write 0 1", "write 2M 100k")
    assert disk.sha256("r", "a") == disk.sha256("r", "b")


def test_sha256_differs_when_bits_differ(disk):
    add(disk, "a")
    add(disk, "b")
    disk.node_io("r", "write 0 1")
    disk.ok("block-dirty-bitmap-disable", node="r", name="b")
    disk.node_io("r", "write 1M 1")
    assert disk.sha256("r", "a") != disk.sha256("r", "b")


def test_sha256_differs_between_granularities_even_when_empty(disk):
    add(disk, "a", granularity=512)
    add(disk, "b", granularity=65536)
    assert disk.sha256("r", "a") != disk.sha256("r", "b")


@pytest.mark.parametrize("granularity", [512, 65536, MiB], ids=["512", "64k", "1M"])
def test_sha256_is_hash_of_little_endian_64bit_words(disk, granularity):
    add(disk, "b", granularity=granularity)
    disk.node_io("r", "write 0 1", "write 70000 1", f"write {SIZE - 1} 1")
    bits = {0, 70000 // granularity, (SIZE - 1) // granularity}
    assert disk.sha256("r", "b") == level0_sha256(SIZE, granularity, bits)


def test_sha256_of_unknown_bitmap_is_refused(disk):
    err = disk.err("x-debug-block-dirty-bitmap-sha256", node="r", name="nosuch")
    assert err == {"class": "GenericError", "desc": "Dirty bitmap 'nosuch' not found"}


def test_sha256_on_unknown_node_is_refused(daemon):
    err = daemon.err("x-debug-block-dirty-bitmap-sha256", node="nosuch", name="b")
    assert err == {"class": "GenericError", "desc": "Node 'nosuch' not found"}


def test_persistent_bitmap_never_stored_can_be_removed(daemon, tmp_path):
    # Observed on QSD 10.0.2: removing a persistent bitmap before it was ever written to the
    # image succeeds and leaves no trace in the image.
    img = create_image(tmp_path / "p.qcow2", 1 << 20, "qcow2")
    daemon.ok("blockdev-add", driver="qcow2", node_name="q",
              file={"driver": "file", "filename": str(img)})
    daemon.ok("block-dirty-bitmap-add", node="q", name="b", persistent=True)
    daemon.ok("block-dirty-bitmap-remove", node="q", name="b")
    assert daemon.bitmaps("q") == []
    daemon.ok("blockdev-del", node_name="q")
    assert "bitmaps" not in qemu_img("info", "--output=json", str(img))

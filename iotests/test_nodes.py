"""Block nodes: blockdev-add / blockdev-del, query-named-block-nodes, query-block.

Texts observed on qemu-storage-daemon 10.0.2.
"""

from __future__ import annotations

import os
import re

import pytest

from iotests import create_image, is_qsd, qemu_img

MiB = 1 << 20

# Keys every BlockDeviceInfo carries (QEMU 10 order is irrelevant to clients).
NODE_KEYS = {
    "node-name", "drv", "file", "ro", "encrypted", "detect_zeroes", "active", "backing_file_depth",
    "bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr", "write_threshold", "cache", "image",
}


@pytest.fixture
def raw_img(tmp_path):
    return create_image(tmp_path / "a.raw", MiB)


@pytest.fixture
def qcow2_img(tmp_path):
    return create_image(tmp_path / "a.qcow2", 4 * MiB, "qcow2")


# ------------------------------------------------------------ adding nodes


def test_file_node_reports_protocol_fields(daemon, raw_img):
    daemon.ok("blockdev-add", driver="file", node_name="f0", filename=str(raw_img))
    n = daemon.node("f0")
    assert NODE_KEYS <= set(n)
    assert n["drv"] == "file" and n["file"] == str(raw_img) and n["ro"] is False
    assert n["encrypted"] is False and n["detect_zeroes"] == "off" and n["active"] is True
    assert n["backing_file_depth"] == 0 and n["write_threshold"] == 0
    assert n["cache"] == {"no-flush": False, "direct": False, "writeback": True}
    img = n["image"]
    assert img["filename"] == str(raw_img) and img["format"] == "file"
    assert img["virtual-size"] == MiB
    assert isinstance(img["actual-size"], int)
    assert img["dirty-flag"] is False
    assert img["format-specific"] == {"type": "file", "data": {}}
    assert "dirty-bitmaps" not in n


def test_virtual_size_counts_whole_sectors(daemon, tmp_path):
    # QEMU counts lengths in 512-byte sectors, rounded up: a 1000-byte file reports 1024.
    img = tmp_path / "odd.raw"
    img.write_bytes(b"\x01" * 1000)
    daemon.ok("blockdev-add", driver="raw", node_name="r0", file={
        "driver": "file", "filename": str(img), "node-name": "f0"})
    assert daemon.node("f0")["image"]["virtual-size"] == 1024
    assert daemon.node("r0")["image"]["virtual-size"] == 1024
    assert img.stat().st_size == 1000


def test_raw_node_with_offset_and_size_has_that_virtual_size(daemon, raw_img):
    daemon.ok("blockdev-add", driver="file", node_name="f0", filename=str(raw_img))
    daemon.ok("blockdev-add", driver="raw", node_name="r0", file="f0", offset=4096, size=65536)
    n = daemon.node("r0")
    assert n["drv"] == "raw" and n["image"]["virtual-size"] == 65536 and n["image"]["format"] == "raw"


def test_raw_node_without_options_has_file_size(daemon, raw_img):
    daemon.ok("blockdev-add", driver="raw", node_name="r0", file={"driver": "file", "filename": str(raw_img)})
    n = daemon.node("r0")
    assert n["image"]["virtual-size"] == MiB
    assert n["file"] == str(raw_img)


def test_raw_window_past_end_of_file_is_refused(daemon, raw_img):
    err = daemon.err("blockdev-add", driver="raw", node_name="r0",
                     file={"driver": "file", "filename": str(raw_img)}, offset=4096, size=MiB)
    assert err == {"class": "GenericError",
                   "desc": "The sum of offset (4096) and size (1048576) has to be smaller or equal to the  "
                           "actual size of the containing file (1048576)"}


def test_raw_size_not_multiple_of_512_is_refused(daemon, raw_img):
    err = daemon.err("blockdev-add", driver="raw", node_name="r0",
                     file={"driver": "file", "filename": str(raw_img)}, size=1000)
    assert err == {"class": "GenericError", "desc": "Specified size is not multiple of 512"}


def test_null_co_node_defaults_to_1GiB(daemon):
    daemon.ok("blockdev-add", driver="null-co", node_name="n0")
    n = daemon.node("n0")
    assert n["drv"] == "null-co" and n["image"]["virtual-size"] == 1 << 30
    assert n["file"] == "null-co://" and n["image"]["actual-size"] == 0


def test_null_co_node_takes_size(daemon):
    daemon.ok("blockdev-add", driver="null-co", node_name="n0", size=MiB)
    assert daemon.node("n0")["image"]["virtual-size"] == MiB


def test_qcow2_node_reports_cluster_size_and_format_data(daemon, qcow2_img):
    daemon.ok("blockdev-add", driver="qcow2", node_name="q0", file={"driver": "file", "filename": str(qcow2_img)})
    n = daemon.node("q0")
    assert n["drv"] == "qcow2" and n["file"] == str(qcow2_img)
    img = n["image"]
    assert img["virtual-size"] == 4 * MiB and img["cluster-size"] == 65536 and img["format"] == "qcow2"
    assert img["format-specific"]["type"] == "qcow2"
    data = img["format-specific"]["data"]
    assert data["compat"] == "1.1" and data["corrupt"] is False and data["refcount-bits"] == 16
    assert data["lazy-refcounts"] is False and data["extended-l2"] is False
    assert data["compression-type"] == "zlib"


def test_child_without_node_name_gets_generated_name(daemon, qcow2_img):
    daemon.ok("blockdev-add", driver="qcow2", node_name="q0", file={"driver": "file", "filename": str(qcow2_img)})
    names = [n["node-name"] for n in daemon.nodes()]
    others = [x for x in names if x != "q0"]
    assert len(others) == 1
    assert re.fullmatch(r"#block[0-9]{3,}", others[0]), others
    child = daemon.node(others[0])
    assert child["drv"] == "file" and child["file"] == str(qcow2_img)


def test_qcow2_over_child_by_reference(daemon, qcow2_img):
    daemon.ok("blockdev-add", driver="file", node_name="f0", filename=str(qcow2_img))
    daemon.ok("blockdev-add", driver="qcow2", node_name="q0", file="f0")
    assert daemon.node("q0")["image"]["virtual-size"] == 4 * MiB
    assert sorted(n["node-name"] for n in daemon.nodes()) == ["f0", "q0"]


def test_qcow2_over_raw_file_is_refused(daemon, raw_img):
    err = daemon.err("blockdev-add", driver="qcow2", node_name="q0", file={"driver": "file", "filename": str(raw_img)})
    assert err == {"class": "GenericError", "desc": "Image is not in qcow2 format"}


def test_read_only_node_reports_ro(daemon, raw_img):
    daemon.ok("blockdev-add", driver="file", node_name="f0", filename=str(raw_img), read_only=True)
    assert daemon.node("f0")["ro"] is True


def test_nodes_are_listed_newest_first(daemon):
    for name in ("n1", "n2", "n3"):
        daemon.ok("blockdev-add", driver="null-co", node_name=name)
    assert [n["node-name"] for n in daemon.nodes()] == ["n3", "n2", "n1"]


def test_flat_query_omits_backing_image_and_depth(daemon, tmp_path):
    base = create_image(tmp_path / "base.qcow2", MiB, "qcow2")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    daemon.ok("blockdev-add", driver="qcow2", node_name="top", file={"driver": "file", "filename": str(top)})
    deep = {n["node-name"]: n for n in daemon.ok("query-named-block-nodes")}["top"]
    flat = {n["node-name"]: n for n in daemon.ok("query-named-block-nodes", flat=True)}["top"]
    assert deep["image"]["backing-image"]["filename"] == str(base)
    assert deep["backing_file_depth"] == 1
    assert "backing-image" not in flat["image"]
    assert flat["backing_file_depth"] == 0
    assert flat["backing_file"] == str(base) and flat["image"]["backing-filename-format"] == "qcow2"
    assert len(daemon.nodes()) == 4  # top, its file, base, its file


def test_query_block_is_empty_for_blockdev_nodes(daemon, raw_img):
    daemon.ok("blockdev-add", driver="raw", node_name="r0", file={"driver": "file", "filename": str(raw_img)})
    assert daemon.ok("query-block") == []


# ------------------------------------------------------------ add errors


def test_root_node_without_node_name_is_refused(daemon):
    err = daemon.err("blockdev-add", driver="null-co")
    assert err == {"class": "GenericError", "desc": "'node-name' must be specified for the root node"}
    assert daemon.nodes() == []


def test_duplicate_node_name_is_refused(daemon):
    daemon.ok("blockdev-add", driver="null-co", node_name="n0")
    err = daemon.err("blockdev-add", driver="null-co", node_name="n0")
    assert err == {"class": "GenericError", "desc": "Duplicate nodes with node-name='n0'"}


@pytest.mark.parametrize("name,desc", [
    ("1bad", "Invalid node-name: '1bad'"),
    ("", "Invalid node-name: ''"),
    ("a b", "Invalid node-name: 'a b'"),
    ("#x", "Invalid node-name: '#x'"),
    ("x" * 32, "Node name too long"),
])
def test_invalid_node_name_is_refused(daemon, name, desc):
    err = daemon.err("blockdev-add", driver="null-co", node_name=name)
    assert err == {"class": "GenericError", "desc": desc}


@pytest.mark.parametrize("name", ["x" * 31, "a-b_c.d", "A9"])
def test_valid_node_name_is_accepted(daemon, name):
    daemon.ok("blockdev-add", driver="null-co", node_name=name)
    assert daemon.node(name)["node-name"] == name


def test_missing_file_is_refused_with_os_error(daemon, tmp_path):
    path = tmp_path / "nonexist"
    err = daemon.err("blockdev-add", driver="file", node_name="f0", filename=str(path))
    assert err == {"class": "GenericError", "desc": f"Could not open '{path}': No such file or directory"}


def test_unknown_driver_is_refused(daemon):
    err = daemon.err("blockdev-add", driver="nosuchdrv", node_name="x")
    assert err == {"class": "GenericError", "desc": "Parameter 'driver' does not accept value 'nosuchdrv'"}


def test_missing_filename_is_refused(daemon):
    err = daemon.err("blockdev-add", driver="file", node_name="x")
    assert err == {"class": "GenericError", "desc": "Parameter 'filename' is missing"}


def test_unknown_option_is_refused(daemon, raw_img):
    err = daemon.err("blockdev-add", driver="file", node_name="x", filename=str(raw_img), bogus=1)
    assert err == {"class": "GenericError", "desc": "Parameter 'bogus' is unexpected"}


def test_reference_to_unknown_child_is_refused(daemon):
    err = daemon.err("blockdev-add", driver="raw", node_name="r0", file="nosuch")
    assert err == {"class": "GenericError", "desc": "Cannot find device='nosuch' nor node-name='nosuch'"}


def test_failed_add_leaves_no_node(daemon, raw_img):
    daemon.err("blockdev-add", driver="qcow2", node_name="q0", file={"driver": "file", "filename": str(raw_img)})
    assert daemon.nodes() == []


# ------------------------------------------------------------ deleting nodes


def test_del_of_unknown_node_is_refused(daemon):
    err = daemon.err("blockdev-del", node_name="nosuch")
    assert err == {"class": "GenericError", "desc": "Failed to find node with node-name='nosuch'"}


def test_del_of_node_in_use_is_refused(daemon, raw_img):
    daemon.ok("blockdev-add", driver="file", node_name="f0", filename=str(raw_img))
    daemon.ok("blockdev-add", driver="raw", node_name="r0", file="f0")
    err = daemon.err("blockdev-del", node_name="f0")
    assert err == {"class": "GenericError", "desc": "Block device f0 is in use"}
    assert {n["node-name"] for n in daemon.nodes()} == {"f0", "r0"}


def test_del_parent_then_child_works(daemon, raw_img):
    daemon.ok("blockdev-add", driver="file", node_name="f0", filename=str(raw_img))
    daemon.ok("blockdev-add", driver="raw", node_name="r0", file="f0")
    daemon.ok("blockdev-del", node_name="r0")
    daemon.ok("blockdev-del", node_name="f0")
    assert daemon.nodes() == []


def test_del_removes_generated_children(daemon, qcow2_img):
    daemon.ok("blockdev-add", driver="qcow2", node_name="q0", file={"driver": "file", "filename": str(qcow2_img)})
    daemon.ok("blockdev-del", node_name="q0")
    assert daemon.nodes() == []


def test_del_of_child_with_generated_name_is_refused(daemon, qcow2_img):
    daemon.ok("blockdev-add", driver="qcow2", node_name="q0", file={"driver": "file", "filename": str(qcow2_img)})
    child = [n["node-name"] for n in daemon.nodes() if n["node-name"] != "q0"][0]
    err = daemon.err("blockdev-del", node_name=child)
    assert err == {"class": "GenericError", "desc": f"Node {child} is not owned by the monitor"}


def test_deleted_name_can_be_reused(daemon):
    daemon.ok("blockdev-add", driver="null-co", node_name="n0")
    daemon.ok("blockdev-del", node_name="n0")
    daemon.ok("blockdev-add", driver="null-co", node_name="n0", size=MiB)
    assert daemon.node("n0")["image"]["virtual-size"] == MiB


def test_deleting_node_releases_image_lock(daemon, qcow2_img):
    daemon.ok("blockdev-add", driver="qcow2", node_name="q0", file={"driver": "file", "filename": str(qcow2_img)})
    assert 'Failed to get shared "write" lock' in qemu_img("info", str(qcow2_img), check=False)
    daemon.ok("blockdev-del", node_name="q0")
    assert "virtual size: 4 MiB" in qemu_img("info", str(qcow2_img))


# ------------------------------------------------------------ deleting nodes (issue 15)


def _names(daemon):
    return [n["node-name"] for n in daemon.nodes()]


def test_blockdev_del_that_fails_changes_nothing(daemon, tmp_path):
    # qcow2 over a raw window exactly the image's size: the persistent bitmap stored at close
    # needs clusters past the window, so storing it fails.
    img = create_image(tmp_path / "w.qcow2", 64 * MiB, "qcow2")
    size = (img.stat().st_size + 511) // 512 * 512
    os.truncate(img, size)
    daemon.ok("blockdev-add", driver="file", node_name="f", filename=str(img))
    daemon.ok("blockdev-add", driver="raw", node_name="r", file="f", size=size)
    daemon.ok("blockdev-add", driver="qcow2", node_name="q", file="r")
    daemon.ok("block-dirty-bitmap-add", node="q", name="b", persistent=True)
    if is_qsd():
        # Observed: QSD 10.0.2 reports success, deletes the node and loses the bitmap.
        assert daemon.cmd("blockdev-del", node_name="q") == {"return": {}}
        assert _names(daemon) == ["r", "f"]
        assert "Lost persistent bitmaps during inactivation of node 'q'" in daemon.log()
        return
    # blockd: the command fails and changes nothing (node, bitmap, image).
    err = daemon.err("blockdev-del", node_name="q")
    assert err["class"] == "GenericError" and err["desc"].startswith("Could not store bitmaps: "), err
    assert _names(daemon) == ["q", "r", "f"]
    assert [b["name"] for b in daemon.bitmaps("q")] == ["b"]
    assert daemon.node("q")["file"] == str(img)
    # Still whole: without the bitmap it goes away cleanly, the image intact.
    daemon.ok("block-dirty-bitmap-remove", node="q", name="b")
    daemon.ok("blockdev-del", node_name="q")
    assert _names(daemon) == ["r", "f"]
    daemon.ok("blockdev-del", node_name="r")
    daemon.ok("blockdev-del", node_name="f")
    assert "No errors were found on the image." in qemu_img("check", str(img))


def test_inline_child_with_node_name_goes_with_its_parent(daemon, qcow2_img):
    # Observed on QSD 10.0.2: a node created inline belongs to its parent(s), even with an
    # explicit node-name: the monitor cannot delete it, the last parent's deletion does.
    file = {"driver": "file", "node-name": "f1", "filename": str(qcow2_img)}
    daemon.ok("blockdev-add", driver="qcow2", node_name="q", file=file)
    assert daemon.err("blockdev-del", node_name="f1") == {
        "class": "GenericError", "desc": "Node f1 is not owned by the monitor"}
    assert _names(daemon) == ["q", "f1"]
    daemon.ok("blockdev-del", node_name="q")
    assert _names(daemon) == []

    # With a second parent it stays until that one goes too.
    daemon.ok("blockdev-add", driver="qcow2", node_name="q", file=file)
    daemon.ok("blockdev-add", driver="raw", node_name="r2", file="f1")
    daemon.ok("blockdev-del", node_name="q")
    assert _names(daemon) == ["r2", "f1"]
    daemon.ok("blockdev-del", node_name="r2")
    assert _names(daemon) == []

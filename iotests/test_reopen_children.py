"""blockdev-reopen changing `backing` (another node, or null) and `file` (another node), as
QEMU 10 does: data read afterwards comes from the new child, QEMU's refusals and texts (checked
on qemu-storage-daemon 10.0.2), all or nothing over the list, and a backing node opened from
the image's header is dropped once replaced."""

from __future__ import annotations

import iotests
import data_nbd
from backup_helpers import MiB, add_qcow2, fill, qcow2, raw

SIZE = 4 * MiB


def q(name: str, **kw) -> dict:
    return {"driver": "qcow2", "node-name": name, **kw}


def reopen(d, *opts: dict) -> dict:
    return d.cmd("blockdev-reopen", options=list(opts))


def reads(d, node: str, pattern: int) -> None:
    data_nbd.node_io(d, node, f"read -P {pattern:#x} 0 64k")


def setup(make_daemon, tmp_path):
    base = qcow2(tmp_path / "base.qcow2", SIZE)
    fill(base, "write -P 0xa1 0 1M")
    base2 = qcow2(tmp_path / "base2.qcow2", SIZE)
    fill(base2, "write -P 0xb2 0 1M")
    ov = qcow2(tmp_path / "ov.qcow2", SIZE, backing=base)
    r1 = raw(tmp_path / "r1.raw", SIZE)
    fill(r1, "write -P 0xc3 0 1M", fmt="raw")
    r2 = raw(tmp_path / "r2.raw", SIZE)
    fill(r2, "write -P 0xd4 0 1M", fmt="raw")
    d = data_nbd.ready(make_daemon())
    add_qcow2(d, "base", base)
    add_qcow2(d, "base2", base2)
    d.blockdev_add(driver="qcow2", node_name="ov",
                   file={"driver": "file", "node-name": "ovf", "filename": str(ov)}, backing="base")
    d.blockdev_add(driver="file", node_name="rf1", filename=str(r1))
    d.blockdev_add(driver="file", node_name="rf2", filename=str(r2))
    d.blockdev_add(driver="raw", node_name="rr", file="rf1")
    return d


def test_backing_moves_to_another_node_to_none_and_back(make_daemon, tmp_path):
    d = setup(make_daemon, tmp_path)
    reads(d, "ov", 0xa1)
    assert reopen(d, q("ov", file="ovf", backing="base2")) == {"return": {}}
    reads(d, "ov", 0xb2)
    # base is free again: it can go
    d.ok("blockdev-del", node_name="base")
    assert reopen(d, q("ov", file="ovf", backing=None)) == {"return": {}}
    reads(d, "ov", 0)
    assert reopen(d, q("ov", file="ovf", backing="base2")) == {"return": {}}
    reads(d, "ov", 0xb2)


def test_raw_file_moves_to_another_node(make_daemon, tmp_path):
    d = setup(make_daemon, tmp_path)
    reads(d, "rr", 0xc3)
    assert reopen(d, {"driver": "raw", "node-name": "rr", "file": "rf2"}) == {"return": {}}
    reads(d, "rr", 0xd4)
    d.ok("blockdev-del", node_name="rf1")


def test_refusals_have_qemus_texts_and_change_nothing(make_daemon, tmp_path):
    d = setup(make_daemon, tmp_path)

    def refused(*opts):
        r = reopen(d, *opts)
        assert "error" in r, r
        return r["error"]["desc"]

    assert refused(q("ov", file="ovf")) == "backing is missing for 'ov'"
    assert refused(q("ov", file="ovf", backing="ov")) == \
        "Making 'ov' a backing child of 'ov' would create a cycle"
    assert refused(q("base", file="nosuch", backing="ov")) == \
        "Making 'ov' a backing child of 'base' would create a cycle"
    assert refused(q("ov", file="ovf", backing="nosuch")) == "Cannot find device='' nor node-name='nosuch'"
    assert refused(q("ov", file="ovf", backing={"driver": "null-co", "size": SIZE})) == \
        "Cannot change the option 'backing.driver'"
    # base2's image file is open read-write by base2: ov cannot take it as its file
    d.blockdev_add(driver="file", node_name="b2f", filename=str(tmp_path / "base2.qcow2"))
    assert refused(q("ov", file="b2f", backing="base")) == "Failed to get \"write\" lock"
    # all or nothing: the first entry's change is undone when the second is refused
    assert refused(q("ov", file="ovf", backing="base2"),
                   {"driver": "raw", "node-name": "rr", "file": "nosuch"}) == \
        "Cannot find device='' nor node-name='nosuch'"
    reads(d, "ov", 0xa1)
    reads(d, "rr", 0xc3)
    names = {n["node-name"] for n in d.ok("query-named-block-nodes", flat=True)}
    assert {"base", "base2", "ov", "ovf", "rr", "rf1", "rf2"} <= names


def test_a_backing_opened_from_the_header_is_dropped_once_replaced(make_daemon, tmp_path):
    base3 = qcow2(tmp_path / "base3.qcow2", SIZE)
    fill(base3, "write -P 0xe5 0 1M")
    ov2 = qcow2(tmp_path / "ov2.qcow2", SIZE, backing=base3)
    d = setup(make_daemon, tmp_path)
    d.blockdev_add(driver="qcow2", node_name="ov2",
                   file={"driver": "file", "node-name": "ov2f", "filename": str(ov2)})
    reads(d, "ov2", 0xe5)

    def files():
        return sorted(n["file"] for n in d.ok("query-named-block-nodes", flat=True)
                      if n["file"].endswith("base3.qcow2"))

    assert len(files()) == 2  # the qcow2 node and its file node
    assert reopen(d, q("ov2", file="ov2f", backing="base2")) == {"return": {}}
    reads(d, "ov2", 0xb2)
    assert files() == []
    # nothing holds base3.qcow2 any more
    iotests.qemu_img("check", str(tmp_path / "base3.qcow2"))


def test_backing_null_drops_backing_file_but_not_the_headers_name(make_daemon, tmp_path):
    """After `backing: null`, QEMU reports no `backing_file` for the node, while its image
    info still gives the name in the header (which the reopen leaves as it is); and, the
    header naming a backing file, a later reopen that leaves `backing` out is refused
    (checked on qemu-storage-daemon 10.0.2)."""
    d = setup(make_daemon, tmp_path)
    base = str(tmp_path / "base.qcow2")

    def ov_info():
        return next(n for n in d.ok("query-named-block-nodes", flat=True)
                    if n["node-name"] == "ov")

    assert ov_info()["backing_file"] == base
    assert reopen(d, q("ov", file="ovf", backing=None)) == {"return": {}}
    info = ov_info()
    assert "backing_file" not in info, info
    assert info["backing_file_depth"] == 0
    assert info["image"]["backing-filename"] == base
    assert info["image"]["full-backing-filename"] == base
    assert info["image"]["backing-filename-format"] == "qcow2"
    assert "backing-image" not in info["image"]
    reads(d, "ov", 0)
    r = reopen(d, q("ov", file="ovf"))
    assert r["error"]["desc"] == "backing is missing for 'ov'", r
    # the header is unchanged
    out = iotests.qemu_img("info", "--output=json", "-U", str(tmp_path / "ov.qcow2"))
    assert base in str(out)
    assert reopen(d, q("ov", file="ovf", backing="base2")) == {"return": {}}
    assert ov_info()["backing_file"] == str(tmp_path / "base2.qcow2")
    reads(d, "ov", 0xb2)

"""Permissions on the block graph: image locks taken before any byte is written,
conflicts inside one daemon reported with QEMU's texts, exports as graph edges.

Texts were observed on qemu-storage-daemon 10.0.2.  The holder of an image in
another process is always a real qemu-storage-daemon, for both runs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

import iotests
import data_nbd
from iotests import Daemon

SIZE = 1 << 20


@pytest.fixture
def make_daemon(make_daemon):
    """The harness factory, returning daemons whose monitor already answers."""
    return data_nbd.ready_factory(make_daemon)


def qsd_holder(tmp_path: Path) -> Daemon:
    """A qemu-storage-daemon whatever the daemon under test (missing: the test fails)."""
    qsd = shutil.which("qemu-storage-daemon")
    assert qsd, "qemu-storage-daemon is needed as the other process holding the image"
    d = Daemon(tmp_path, name="holder")
    d.binary = qsd
    d.start()
    return d


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def qcow2(node: str, path: Path, **extra) -> dict:
    args = {"driver": "qcow2", "node-name": node, "file": {"driver": "file", "filename": str(path)}}
    args.update({k.replace("_", "-"): v for k, v in extra.items()})
    return args


def bitmap_flags(path: Path) -> dict:
    info = json.loads(iotests.qemu_img("info", "-U", "--output=json", str(path)))
    bitmaps = info["format-specific"]["data"].get("bitmaps", [])
    return {b["name"]: b["flags"] for b in bitmaps}


def test_refused_read_write_open_writes_nothing(make_daemon, tmp_path):
    """The reported defect: an image with a persistent bitmap, open read-only in
    another process; a read-write blockdev-add is refused and must not have flagged
    the bitmap in use (or changed any other byte)."""
    img = tmp_path / "disk.qcow2"
    iotests.create_image(img, SIZE, "qcow2")
    iotests.qemu_img("bitmap", "--add", str(img), "b")
    iotests.qemu_io("-c", "write -P 0x5a 0 64k", str(img))
    assert bitmap_flags(img) == {"b": ["auto"]}
    holder = qsd_holder(tmp_path)
    assert holder.cmd("blockdev-add", qcow2("ro", img, read_only=True)) == {"return": {}}
    before = digest(img)
    d = make_daemon()

    reply = d.cmd("blockdev-add", qcow2("rw", img))

    assert reply == {"error": {"class": "GenericError", "desc": 'Failed to get "write" lock'}}
    assert digest(img) == before
    assert bitmap_flags(img) == {"b": ["auto"]}
    assert [n["node-name"] for n in d.nodes()] == []
    # Read-only alongside the holder works, and still writes nothing.
    assert d.cmd("blockdev-add", qcow2("ro2", img, read_only=True)) == {"return": {}}
    assert digest(img) == before
    assert holder.shutdown() == 0
    assert d.shutdown() == 0
    assert digest(img) == before


def test_refused_open_at_depth_two_writes_nothing(make_daemon, tmp_path):
    """The backing file two levels down is held by a writer that shares nothing:
    the whole add is refused, the top image (with its bitmap) is unchanged."""
    base, mid, top = (tmp_path / f"{n}.qcow2" for n in ("base", "mid", "top"))
    iotests.create_image(base, SIZE, "qcow2")
    iotests.qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(mid))
    iotests.qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", str(top))
    iotests.qemu_img("bitmap", "--add", str(top), "b")
    holder = qsd_holder(tmp_path)
    assert holder.cmd("blockdev-add", qcow2("w", base)) == {"return": {}}
    sums = [digest(p) for p in (base, mid, top)]
    d = make_daemon()

    reply = d.cmd("blockdev-add", qcow2("t", top))

    assert reply["error"]["class"] == "GenericError"
    assert 'Failed to get shared "write" lock' in reply["error"]["desc"]
    assert bitmap_flags(top) == {"b": ["auto"]}
    after = [digest(p) for p in (base, mid, top)]
    assert after[:2] == sums[:2]
    if iotests.is_qsd():
        # QSD 10.0.2 has already written to the top image (opened read-write before its
        # backing chain) when the chain fails; blockd writes nothing before every lock is held.
        assert after[2] != sums[2]
    else:
        assert after[2] == sums[2]
    assert d.nodes() == []


def test_second_format_on_one_file_node_conflicts_with_qemus_text(make_daemon, tmp_path):
    img = tmp_path / "b.qcow2"
    iotests.create_image(img, SIZE, "qcow2")
    d = make_daemon()
    d.ok("blockdev-add", {"driver": "file", "node-name": "f2", "filename": str(img)})
    assert d.cmd("blockdev-add", {"driver": "qcow2", "node-name": "q2", "file": "f2"}) == {"return": {}}

    for name, ro in (("q3", False), ("q4", True)):
        args = {"driver": "qcow2", "node-name": name, "file": "f2", "read-only": ro}
        assert d.err("blockdev-add", args) == {
            "class": "GenericError",
            "desc": f"Permission conflict on node 'f2': permissions 'write, resize' are both required by "
                    f"node 'q2' (uses node 'f2' as 'file' child) and unshared by node '{name}' "
                    f"(uses node 'f2' as 'file' child)."}
    # A raw filter over it needs nothing while unused.
    assert d.cmd("blockdev-add", {"driver": "raw", "node-name": "r2", "file": "f2"}) == {"return": {}}
    assert [n["node-name"] for n in d.nodes()] == ["r2", "q2", "f2"]


def test_exports_are_edges_with_qemus_permissions(make_daemon, tmp_path):
    img = tmp_path / "a.qcow2"
    iotests.create_image(img, SIZE, "qcow2")
    d = make_daemon()
    d.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(d.sock("nbd"))}})
    d.ok("blockdev-add", {"driver": "qcow2", "node-name": "q",
                          "file": {"driver": "file", "filename": str(img), "node-name": "qf"}})

    ro = d.err("block-export-add", type="nbd", id="e1", node_name="qf", writable=False)
    rw = d.err("block-export-add", type="nbd", id="e2", node_name="qf", writable=True)

    assert ro == {"class": "GenericError",
                  "desc": "Permission conflict on node 'qf': permissions 'resize' are both required by node 'q' "
                          "(uses node 'qf' as 'file' child) and unshared by an unnamed block device "
                          "(uses node 'qf' as 'root' child)."}
    assert rw == {"class": "GenericError",
                  "desc": "Permission conflict on node 'qf': permissions 'write' are both required by an unnamed "
                          "block device (uses node 'qf' as 'root' child) and unshared by node 'q' "
                          "(uses node 'qf' as 'file' child)."}
    assert d.ok("query-block-exports") == []
    assert d.cmd("block-export-add", type="nbd", id="e3", node_name="q", writable=True) == {"return": {}}


def test_raw_without_users_takes_no_lock_but_a_writable_export_does(make_daemon, tmp_path):
    """Both daemons: a raw node nobody uses holds no locks (another process may
    write); a writable export takes write and lets others write too (QEMU's
    exports share everything but resize)."""
    img = tmp_path / "a.raw"
    iotests.create_image(img, SIZE)
    d = make_daemon()
    d.ok("blockdev-add", {"driver": "raw", "node-name": "r",
                          "file": {"driver": "file", "filename": str(img)}})
    holder = qsd_holder(tmp_path)
    writer = {"driver": "raw", "node-name": "w", "file": {"driver": "file", "filename": str(img)}}
    assert holder.cmd("blockdev-add", writer) == {"return": {}}
    holder.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(holder.sock("nbd"))}})
    # The holder's writable export does not share resize: our export may not take it.
    assert holder.cmd("block-export-add", type="nbd", id="hw", node_name="w", writable=True) == {"return": {}}
    d.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(d.sock("nbd"))}})

    assert d.cmd("block-export-add", type="nbd", id="e", node_name="r", writable=True) == {"return": {}}
    out = iotests.qemu_io("-U", "-f", "raw", "-c", "write -P 0x11 0 4k", str(img), check=False)
    assert 'Failed to get "write" lock' not in out


@pytest.mark.parametrize("setting, zero", [("off", False), ("on", True)])
def test_detect_zeroes_applies_on_the_write_path(make_daemon, tmp_path, setting, zero):
    img = tmp_path / "d.qcow2"
    iotests.create_image(img, SIZE, "qcow2")
    iotests.qemu_io("-c", "write -P 0x11 0 128k", str(img))
    d = make_daemon()
    d.ok("blockdev-add", {"driver": "qcow2", "node-name": "n", "detect-zeroes": setting,
                          "file": {"driver": "file", "filename": str(img)}})

    data_nbd.node_io(d, "n", "write -P 0 0 64k")
    assert d.shutdown() == 0

    extents = json.loads(iotests.qemu_img("map", "--output=json", str(img)))
    first = extents[0]
    assert (first["start"], first["zero"], first["data"]) == (0, zero, not zero), extents
    iotests.qemu_io("-c", "read -P 0 0 64k", "-c", "read -P 0x11 64k 64k", str(img))


def test_detect_zeroes_unmap_needs_discard_unmap(make_daemon, tmp_path):
    img = tmp_path / "d.qcow2"
    iotests.create_image(img, SIZE, "qcow2")
    d = make_daemon()
    args = {"driver": "qcow2", "node-name": "n", "detect-zeroes": "unmap",
            "file": {"driver": "file", "filename": str(img)}}

    assert d.err("blockdev-add", args) == {
        "class": "GenericError",
        "desc": "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"}
    assert d.cmd("blockdev-add", dict(args, discard="unmap")) == {"return": {}}


def test_reopen_refuses_what_cannot_change_and_ignores_nothing(make_daemon, tmp_path):
    img = tmp_path / "a.qcow2"
    other = tmp_path / "b.raw"
    iotests.create_image(img, SIZE, "qcow2")
    iotests.create_image(other, SIZE)
    d = make_daemon()
    d.ok("blockdev-add", {"driver": "file", "node-name": "f", "filename": str(img)})
    d.ok("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "f"})

    for change, option in ((dict(filename=str(other)), "filename"), (dict(locking="off"), "locking")):
        opts = dict({"driver": "file", "node-name": "f", "filename": str(img)}, **change)
        assert d.err("blockdev-reopen", options=[opts]) == {
            "class": "GenericError", "desc": f"Cannot change the option '{option}'"}
    # All or nothing: the second entry is refused, the first (read-only) is not applied.
    both = [{"driver": "qcow2", "node-name": "q", "file": "f", "read-only": True},
            {"driver": "file", "node-name": "f", "filename": str(other)}]
    assert d.err("blockdev-reopen", options=both)["desc"] == "Cannot change the option 'filename'"
    assert d.node("q")["ro"] is False

    reply = d.cmd("blockdev-reopen", options=[{"driver": "qcow2", "node-name": "q", "file": "f",
                                               "detect-zeroes": "on"}])
    if iotests.is_qsd():
        assert reply == {"return": {}}
    else:
        # QEMU changes it; blockd cannot yet, and says so rather than ignoring it.
        assert reply == {"error": {"class": "GenericError",
                                   "desc": "blockd cannot change the option 'detect-zeroes' in blockdev-reopen"}}

"""qcow2 images that differ from the defaults or were crafted to hurt (issue 15).

* query-named-block-nodes reports the image's own refcount width, lazy refcounts and
  dirty bit (images made by qemu-img with non-default values), like QSD;
* defect 1: an in-use bitmap needing 256 GiB of memory is refused ("is too big") and the
  daemon keeps serving (QSD 10.0.2 aborts on it);
* defect 2: opening read-write an image whose guest data cluster has refcount 0 leaves
  that data intact (checked with qemu-io read -P after the daemon quits);
* defect 4: corruption found by a background bitmap checkpoint emits BLOCK_IMAGE_CORRUPTED
  and makes the node read-only; nothing more is written.
"""

from __future__ import annotations

import struct

import pytest

import iotests
import data_nbd
from iotests import blockd_only, create_image, qemu_img, qemu_io, qsd_crashes

MiB = 1 << 20


@pytest.fixture
def make_daemon(make_daemon):
    """The harness factory, returning daemons whose monitor already answers."""
    return data_nbd.ready_factory(make_daemon)


def qcow2_args(node, image, read_only=False):
    args = {"driver": "qcow2", "node-name": node,
            "file": {"driver": "file", "filename": str(image)}}
    if read_only:
        args["read-only"] = True
        args["file"]["read-only"] = True
    return args


def be64(b: bytes, off: int) -> int:
    return struct.unpack(">Q", b[off:off + 8])[0]


def dir_entry(b: bytes, name: str) -> int:
    """File offset of bitmap ``name``'s directory entry (24 bytes before its name)."""
    pos = b.rfind(name.encode())
    assert pos > 24, f"bitmap {name} not in the file"
    return pos - 24


# ---- image facts --------------------------------------------------------------------------

def dirty_image(path):
    """A lazy-refcounts image left with the dirty bit set (qemu-io aborts after a write)."""
    create_image(path, 4 * MiB, "qcow2", lazy_refcounts="on")
    qemu_io("-f", "qcow2", "-c", "write -P 0x11 0 64k", "-c", "abort", str(path), check=False)
    with open(path, "rb") as f:
        incompatible = be64(f.read(104), 72)
    assert incompatible & 1, "qemu-io abort must leave the dirty bit set"
    return path


@pytest.mark.parametrize(
    "opts, read_only, refcount_bits, lazy, dirty",
    [
        ({"refcount_bits": "1"}, False, 1, False, False),
        ({"refcount_bits": "64"}, False, 64, False, False),
        ({"lazy_refcounts": "on"}, False, 16, True, False),
        (None, True, 16, True, True),
        (None, False, 16, True, False),
    ],
    ids=["refcount-1", "refcount-64", "lazy", "dirty-read-only", "dirty-repaired"],
)
def test_node_reports_the_images_own_facts(make_daemon, tmp_path, opts, read_only, refcount_bits, lazy, dirty):
    img = tmp_path / "facts.qcow2"
    if opts is None:
        dirty_image(img)
    else:
        create_image(img, 4 * MiB, "qcow2", **opts)
    d = make_daemon()
    assert d.cmd("blockdev-add", qcow2_args("n", img, read_only)) == {"return": {}}

    image = d.node("n")["image"]
    specific = image["format-specific"]["data"]
    assert specific["refcount-bits"] == refcount_bits
    assert specific["lazy-refcounts"] is lazy
    assert image["dirty-flag"] is dirty
    assert d.shutdown() == 0
    if dirty and read_only:
        # Nothing was repaired: the file still has the dirty bit.
        assert '"dirty-flag": true' in qemu_img("info", "--output=json", "-U", str(img))


# ---- defect 1: a bitmap needing absurd memory ------------------------------------------------

def huge_bitmap_image(tmp_path):
    """1 PiB disk, 2 MiB clusters, bitmap 'b0' stored at 2 GiB granularity, then patched to
    in-use with granularity 512 B (2^41 bits: 256 GiB if allocated)."""
    img = tmp_path / "huge.qcow2"
    create_image(img, "1P", "qcow2", cluster_size=2 * MiB)
    qemu_img("bitmap", "--add", "-g", str(1 << 31), str(img), "b0")
    data = bytearray(img.read_bytes())
    e = dir_entry(data, "b0")
    data[e + 12:e + 16] = struct.pack(">I", 3)  # in_use | auto
    data[e + 17] = 9
    img.write_bytes(bytes(data))
    return img


@qsd_crashes
def test_bitmap_needing_absurd_memory_is_refused_and_daemon_serves_on(make_daemon, tmp_path):
    img = huge_bitmap_image(tmp_path)
    before = img.read_bytes()
    other = create_image(tmp_path / "ok.raw", MiB)
    d = make_daemon()

    r = d.cmd("blockdev-add", qcow2_args("n", img))

    assert r["error"]["class"] == "GenericError"
    assert "Bitmap 'b0' is too big" in r["error"]["desc"], r
    assert "n" not in [x["node-name"] for x in d.nodes()]
    d.blockdev_add(driver="raw", node_name="ok", file={"driver": "file", "filename": str(other)})
    assert d.node_io("ok", "write -P 0x33 0 4k", "read -P 0x33 0 4k").count("bytes at offset 0") == 2
    # The file is untouched: still in use, never claimed or rewritten.
    r = d.cmd("blockdev-add", qcow2_args("n", img, read_only=True))
    assert "Bitmap 'b0' is too big" in r["error"]["desc"], r
    assert d.shutdown() == 0
    assert img.read_bytes() == before  # (qemu-img check itself aborts on this image)


# ---- defect 2: refcount 0 under guest data -----------------------------------------------------

def unrefcounted_guest_data(tmp_path):
    """An image with guest data (0x5a) in guest cluster 0 whose refcount was zeroed, and a
    persistent bitmap; 64 KiB clusters, 16-bit refcounts."""
    img = create_image(tmp_path / "damaged.qcow2", 64 * MiB, "qcow2")
    qemu_io("-f", "qcow2", "-c", "write -P 0x5a 0 64k", str(img))
    qemu_img("bitmap", "--add", str(img), "b0")
    data = bytearray(img.read_bytes())
    l1 = be64(data, 40)
    l2 = be64(data, l1) & 0x00FF_FFFF_FFFF_FE00
    host = be64(data, l2) & 0x00FF_FFFF_FFFF_FE00
    block = be64(data, be64(data, 48)) & ~511
    i = block + (host >> 16) * 2
    assert data[i:i + 2] == b"\x00\x01"
    data[i:i + 2] = b"\x00\x00"
    img.write_bytes(bytes(data))
    assert "refcount=0 reference=1" in qemu_img("check", str(img), check=False)
    return img, host


@blockd_only
def test_opening_damaged_image_read_write_leaves_guest_data_intact(make_daemon, tmp_path):
    # QSD 10.0.2 writes bitmap metadata into the "free" cluster, over the guest's data.
    img, host = unrefcounted_guest_data(tmp_path)
    size = img.stat().st_size
    d = make_daemon()
    assert d.cmd("blockdev-add", qcow2_args("n", img)) == {"return": {}}
    # The in-use flag was written in place: nothing allocated, data still there.
    assert img.stat().st_size == size
    assert d.node("n")["image"]["format-specific"]["data"]["bitmaps"][0]["flags"] == ["in-use", "auto"]
    # Storing the bitmap at close needs a cluster: the "free" one is refused (image marked
    # corrupt) instead of being written over the guest's data.
    assert d.shutdown() == 0

    out = qemu_io("-f", "qcow2", "-r", "-c", "read -P 0x5a 0 64k", str(img))
    assert "Pattern verification failed" not in out and "read 65536/65536" in out, out
    with open(img, "rb") as f:
        f.seek(host)
        assert f.read(65536) == b"\x5a" * 65536


@blockd_only
def test_guest_write_needing_the_unrefcounted_cluster_marks_image_corrupt(make_daemon, tmp_path):
    img, host = unrefcounted_guest_data(tmp_path)
    d = make_daemon()
    assert d.cmd("blockdev-add", qcow2_args("n", img)) == {"return": {}}

    out = data_nbd.node_io(d, "n", "write -P 0x22 1M 64k", check=False)

    assert "write failed" in out
    ev = d.event_wait("BLOCK_IMAGE_CORRUPTED", match={"node-name": "n"})
    assert ev["data"]["fatal"] is True
    assert "refcount is 0" in ev["data"]["msg"]
    assert d.shutdown() == 0
    out = qemu_io("-f", "qcow2", "-r", "-U", "-c", "read -P 0x5a 0 64k", str(img))
    assert "read 65536/65536" in out and "Pattern verification failed" not in out, out


@blockd_only
def test_corruption_found_by_a_bitmap_checkpoint_stops_all_writing(make_daemon, tmp_path, monkeypatch):
    # Checkpoints are blockd's own (QEMU stores bitmaps only at close).
    monkeypatch.setenv("BLOCKD_BITMAP_CHECKPOINT_SECS", "1")
    img, host = unrefcounted_guest_data(tmp_path)
    d = make_daemon()
    assert d.cmd("blockdev-add", qcow2_args("n", img)) == {"return": {}}
    # An in-place write (no allocation) dirties the bitmap; the checkpoint that stores it
    # needs a cluster, and the only "free" one holds guest data.
    assert "wrote 4096/4096" in data_nbd.node_io(d, "n", "write -P 0x77 0 4k")

    ev = d.event_wait("BLOCK_IMAGE_CORRUPTED", match={"node-name": "n"})
    assert ev["data"]["fatal"] is True
    assert "refcount is 0" in ev["data"]["msg"]
    assert d.node("n")["ro"] is True
    out = data_nbd.node_io(d, "n", "write -P 0x88 0 4k", check=False)
    assert "write failed" in out, out
    assert d.shutdown() == 0

    assert '"corrupt": true' in qemu_img("info", "--output=json", "-U", str(img))
    out = qemu_io("-f", "qcow2", "-r", "-U", "-c", "read -P 0x77 0 4k", "-c", "read -P 0x5a 4k 60k", str(img))
    assert out.count("read ") == 2 and "Pattern verification failed" not in out, out

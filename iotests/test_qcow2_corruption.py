"""Corruption found while running: the image is marked corrupt, BLOCK_IMAGE_CORRUPTED
is emitted, the write fails, and the daemon keeps serving everything else.
(Later writes are refused too; QSD then drops the node entirely, so that part is
covered by the qcow2 crate's own tests.)"""

import struct

import iotests
from iotests import create_image, qemu_img, qemu_io

MiB = 1 << 20


def l2_entry_offset(img) -> int:
    """File offset of the first L2 entry of a qcow2 image with 64 KiB clusters."""
    with open(img, "rb") as f:
        header = f.read(104)
        l1_offset = struct.unpack(">Q", header[40:48])[0]
        f.seek(l1_offset)
        l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FF_FFFF_FFFF_FE00
    assert l2, "L1 entry 0 must point at an L2 table"
    return l2


def test_l2_entry_pointing_at_metadata_marks_image_corrupt(make_daemon, tmp_path):
    img = create_image(tmp_path / "c.qcow2", 4 * MiB, "qcow2")
    qemu_io("-f", "qcow2", "-c", "write -P 0x11 0 64k", str(img))
    # Make guest cluster 0 claim the refcount table's cluster, COPIED flag kept.
    with open(img, "rb") as f:
        reftable = struct.unpack(">Q", f.read(56)[48:56])[0]
    with open(img, "r+b") as f:
        f.seek(l2_entry_offset(img))
        f.write(struct.pack(">Q", (1 << 63) | reftable))
    other = create_image(tmp_path / "ok.raw", MiB)
    d = make_daemon("--blockdev", f"file,node-name=f,filename={img}",
                    "--blockdev", "qcow2,node-name=n,file=f",
                    "--blockdev", f"raw,node-name=ok,file.driver=file,file.filename={other}")

    out = d.node_io("n", "write -P 0x22 0 4k")

    assert "write failed" in out
    ev = d.event_wait("BLOCK_IMAGE_CORRUPTED", match={"node-name": "n"})
    assert ev["data"]["fatal"] is True
    assert d.node_io("ok", "write -P 0x33 0 4k") == "wrote 4096/4096 bytes at offset 0\n"
    d.shutdown()
    info = qemu_img("info", "--output=json", str(img))
    assert '"corrupt": true' in info

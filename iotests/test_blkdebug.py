"""blkdebug fault injection, on both daemons (shared/reference/blkdebug.md).

I/O goes through ``Daemon.node_io``: HMP ``qemu-io`` inside blockd, an NBD export plus the
real ``qemu-io`` on QSD.  Both print qemu-io's texts ("write failed: Input/output error").
A failing read with structured replies makes QSD drop the NBD connection (qemu-io still
prints "read failed: ..."), so every failing read is the last command of its qemu-io run.
"""

from __future__ import annotations

import pytest

from iotests import create_image, is_qsd, qemu_img, qemu_io

MiB = 1 << 20
EIO_W = "write failed: Input/output error"
EIO_R = "read failed: Input/output error"
ENOSPC_W = "write failed: No space left on device"


def blkdebug(img, **opts):
    o = {"driver": "blkdebug", "image": {"driver": "file", "filename": str(img)}}
    o.update({k.replace("_", "-") if k != "new_state" else k: v for k, v in opts.items()})
    return o


def raw_over(d, img, **opts):
    """Node ``r``: raw over an inline blkdebug over ``img``."""
    d.ok("blockdev-add", {"driver": "raw", "node-name": "r", "file": blkdebug(img, **opts)})


def failed(out: str) -> bool:
    return "failed:" in out


@pytest.fixture
def img(tmp_path):
    return create_image(tmp_path / "a.raw", MiB)


def test_node_shows_as_blkdebug_filter(daemon, img):
    daemon.ok("blockdev-add", {"node-name": "b", **blkdebug(
        img, inject_error=[{"event": "write_aio", "errno": 28}])})
    node = daemon.node("b")
    assert node["drv"] == "blkdebug"
    assert node["image"]["virtual-size"] == MiB
    daemon.ok("blockdev-add", {"driver": "raw", "node-name": "r", "file": "b"})
    assert daemon.err("blockdev-del", node_name="b")["desc"] == "Block device b is in use"
    daemon.ok("blockdev-del", node_name="r")
    daemon.ok("blockdev-del", node_name="b")


@pytest.mark.parametrize("opts,desc", [
    ({"inject_error": []}, "Block protocol 'blkdebug' doesn't support the option 'inject-error'"),
    ({"set_state": []}, "Block protocol 'blkdebug' doesn't support the option 'set-state'"),
    ({"align": 3000}, "Cannot meet constraints with align 3000"),
    ({"align": -1}, "Value '-1' is out of range for parameter 'align'"),
    ({"align": 512, "max_transfer": 1000}, "Cannot meet constraints with max-transfer 1000"),
    ({"max_transfer": -1}, "Value '-1' is out of range for parameter 'max-transfer'"),
    ({"align": 4096, "opt_write_zero": 1000}, "Cannot meet constraints with opt-write-zero 1000"),
    ({"opt_discard": 4096, "max_discard": 1000}, "Cannot meet constraints with max-discard 1000"),
])
def test_refusals_match_qemu(daemon, img, opts, desc):
    e = daemon.err("blockdev-add", {"node-name": "b", **blkdebug(img, **opts)})
    assert (e["class"], e["desc"]) == ("GenericError", desc)
    assert not any(n["node-name"] == "b" for n in daemon.nodes())


def test_config_file_refused(daemon, img, tmp_path):
    e = daemon.err("blockdev-add", {"node-name": "b", **blkdebug(img, config=str(tmp_path / "no"))})
    if is_qsd():
        assert e["desc"] == "Could not read blkdebug config file: No such file or directory"
    else:
        assert "'config'" in e["desc"] and "not supported by blockd" in e["desc"]


def test_accepted_limits(daemon, img):
    daemon.ok("blockdev-add", {"node-name": "b", **blkdebug(
        img, align=512, max_transfer=65536, opt_write_zero=4096, max_write_zero=65536,
        opt_discard=4096, max_discard=65536)})
    assert not failed(daemon.node_io("b", "write -P 0x5a 100 10000"))
    assert not failed(daemon.node_io("b", "read -P 0x5a 100 10000"))


def test_write_aio_eio_on_raw(daemon, img):
    raw_over(daemon, img, inject_error=[{"event": "write_aio"}])
    assert not failed(daemon.node_io("r", "read 0 64k"))
    assert EIO_W in daemon.node_io("r", "write -P 0x11 0 64k")
    # Armed rules stay armed, for reads too (default iotypes).
    assert EIO_W in daemon.node_io("r", "write -P 0x11 64k 64k")
    assert EIO_R in daemon.node_io("r", "read 0 64k")
    assert qemu_img("compare", "-f", "raw", "-F", "raw", str(img), str(img)).strip() == "Images are identical."
    assert open(img, "rb").read(128 * 1024) == bytes(128 * 1024)


def test_enospc_and_iotype_write_only(daemon, img):
    raw_over(daemon, img, inject_error=[{"event": "write_aio", "errno": 28, "iotype": "write"}])
    assert ENOSPC_W in daemon.node_io("r", "write -P 0x11 0 4k")
    assert not failed(daemon.node_io("r", "read -P 0 0 4k"))


def test_once_fails_one_write(daemon, img):
    raw_over(daemon, img, inject_error=[{"event": "write_aio", "errno": 28, "once": True}])
    assert ENOSPC_W in daemon.node_io("r", "write -P 0x22 0 4k")
    assert not failed(daemon.node_io("r", "write -P 0x22 0 4k"))
    assert not failed(daemon.node_io("r", "read -P 0x22 0 4k"))
    assert open(img, "rb").read(4096) == b"\x22" * 4096


def test_sector_limits_the_failure(daemon, img):
    raw_over(daemon, img, inject_error=[{"event": "write_aio", "sector": 16, "immediately": True}])
    assert not failed(daemon.node_io("r", "write -P 0x33 0 8k"))
    assert EIO_W in daemon.node_io("r", "write -P 0x33 8k 512")
    assert not failed(daemon.node_io("r", "write -P 0x33 8704 512"))
    assert not failed(daemon.node_io("r", "read -P 0x33 0 8k"))
    assert EIO_R in daemon.node_io("r", "read 4k 8k")
    data = open(img, "rb").read(9216)
    assert data[:8192] == b"\x33" * 8192 and data[8192:8704] == bytes(512)


def test_read_aio_fails_reads_only_after_a_read(daemon, img):
    raw_over(daemon, img, inject_error=[{"event": "read_aio", "iotype": "read"}])
    assert not failed(daemon.node_io("r", "write -P 0x44 0 4k"))
    assert EIO_R in daemon.node_io("r", "read 0 4k")
    assert not failed(daemon.node_io("r", "write -P 0x44 4k 4k"))


def test_set_state_transitions(daemon, img):
    # Writes fail only in state 2; a read moves 1 -> 2, a write in state 2 moves on to 3.
    raw_over(daemon, img,
             inject_error=[{"event": "write_aio", "state": 2, "errno": 28, "iotype": "write"}],
             set_state=[{"event": "read_aio", "state": 1, "new_state": 2},
                        {"event": "write_aio", "state": 2, "new_state": 3}])
    assert not failed(daemon.node_io("r", "write -P 0x55 0 4k"))
    assert not failed(daemon.node_io("r", "read -P 0x55 0 4k"))
    assert ENOSPC_W in daemon.node_io("r", "write -P 0x66 0 4k")
    # Armed in state 2, the rule keeps failing in state 3 until another event re-arms.
    assert ENOSPC_W in daemon.node_io("r", "write -P 0x66 0 4k")
    assert open(img, "rb").read(4096) == b"\x55" * 4096


def test_none_with_sector_on_exported_blkdebug(daemon, img):
    daemon.ok("blockdev-add", {"node-name": "b", **blkdebug(
        img, inject_error=[{"event": "none", "iotype": "read", "sector": 8}])})
    assert not failed(daemon.node_io("b", "write -P 0x77 0 8k"))
    assert not failed(daemon.node_io("b", "read -P 0x77 0 4k"))
    assert EIO_R in daemon.node_io("b", "read 4k 4k")


def test_pwritev_fails_writes_on_exported_blkdebug(daemon, img):
    daemon.ok("blockdev-add", {"node-name": "b", **blkdebug(
        img, inject_error=[{"event": "pwritev", "errno": 28, "iotype": "write"}])})
    assert not failed(daemon.node_io("b", "read 0 4k"))
    assert ENOSPC_W in daemon.node_io("b", "write -P 0x11 0 4k")
    assert ENOSPC_W in daemon.node_io("b", "write -P 0x11 3 5")


def test_first_listed_rule_wins(daemon, img):
    raw_over(daemon, img, inject_error=[{"event": "write_aio", "errno": 5, "once": True},
                                        {"event": "write_aio", "errno": 28}])
    assert EIO_W in daemon.node_io("r", "write 0 4k")
    assert ENOSPC_W in daemon.node_io("r", "write 0 4k")


def test_qcow2_cluster_alloc_fails_allocating_write(daemon, tmp_path):
    q = create_image(tmp_path / "a.qcow2", MiB, fmt="qcow2")
    daemon.ok("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": blkdebug(
        q, inject_error=[{"event": "cluster_alloc", "errno": 28, "once": True}])})
    assert ENOSPC_W in daemon.node_io("q", "write -P 0x12 0 64k")
    assert not failed(daemon.node_io("q", "write -P 0x12 0 64k"))
    assert not failed(daemon.node_io("q", "read -P 0x12 0 64k"))
    daemon.ok("blockdev-del", node_name="q")
    qemu_img("check", str(q))


def test_qcow2_over_none_cannot_open(daemon, tmp_path):
    q = create_image(tmp_path / "a.qcow2", MiB, fmt="qcow2")
    e = daemon.err("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": blkdebug(
        q, inject_error=[{"event": "none"}])})
    if is_qsd():
        assert e["desc"] == "Could not read qcow2 header: Input/output error"
    else:
        assert "Input/output error" in e["desc"]


def test_command_line_form(make_daemon, img):
    d = make_daemon(
        "--blockdev",
        f"driver=blkdebug,node-name=bd,image.driver=file,image.filename={img},"
        "inject-error.0.event=write_aio,inject-error.0.errno=28,inject-error.0.once=on,"
        "set-state.0.event=write_aio,set-state.0.new_state=2",
        "--blockdev", "driver=raw,node-name=r,file=bd")
    assert d.node("bd")["drv"] == "blkdebug"
    assert ENOSPC_W in d.node_io("r", "write 0 4k")
    assert not failed(d.node_io("r", "write 0 4k"))


def qcow2_over(d, tmp_path, **opts):
    q = create_image(tmp_path / "a.qcow2", MiB, fmt="qcow2")
    d.ok("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": blkdebug(q, **opts)})
    return q


def test_qcow2_read_aio_fails_reads_of_allocated_clusters(daemon, tmp_path):
    qcow2_over(daemon, tmp_path, inject_error=[{"event": "read_aio", "iotype": "read"}])
    assert not failed(daemon.node_io("q", "write -P 0x31 0 64k"))
    assert not failed(daemon.node_io("q", "read -P 0 128k 64k"))
    assert EIO_R in daemon.node_io("q", "read 0 64k")


def test_qcow2_l2_load_fails_first_access(daemon, tmp_path):
    q = create_image(tmp_path / "a.qcow2", MiB, fmt="qcow2")
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(create_image(tmp_path / "s.raw", MiB)),
             str(q))
    qemu_io("-f", "qcow2", "-c", "write -P 0x41 0 64k", str(q))
    daemon.ok("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": blkdebug(
        q, inject_error=[{"event": "l2_load", "errno": 28, "once": True}])})
    assert "read failed: No space left on device" in daemon.node_io("q", "read 0 64k")
    assert not failed(daemon.node_io("q", "read -P 0x41 0 64k"))


def test_align_read_modify_write_events(daemon, img):
    # Exported blkdebug with align 4096 and a rule armed by the head read-modify-write.
    # QSD advertises the alignment as the NBD minimum block size, so its qemu-io client pads
    # the request itself and the server never sees an unaligned write (no RMW event, the
    # write succeeds). blockd does not advertise it yet (minimum 1) and HMP writes directly:
    # the RMW happens on the blkdebug node, fires the event and fails the write.
    daemon.ok("blockdev-add", {"node-name": "b", **blkdebug(
        img, align=4096,
        inject_error=[{"event": "pwritev_rmw_head", "errno": 28, "iotype": "read"}])})
    assert not failed(daemon.node_io("b", "write -P 0x61 0 4k"))
    assert not failed(daemon.node_io("b", "write -P 0x62 4k 100"))
    out = daemon.node_io("b", "write -P 0x63 8193 100")
    data = open(img, "rb").read(12288)
    assert data[:4096] == b"\x61" * 4096
    assert data[4096:4196] == b"\x62" * 100 and data[4196:8192] == bytes(3996)
    if is_qsd():
        assert not failed(out)
        assert data[8193:8293] == b"\x63" * 100
    else:
        assert ENOSPC_W in out
        assert data[8192:] == bytes(4096)

"""Persistent dirty bitmaps in qcow2 images: storing at close, loading at open,
the in-use flag and unclean shutdowns, bitmaps made by ``qemu-img bitmap``.

The on-disk state is read with the local ``qemu-img info`` (``-U`` while the
daemon runs).  Texts and flags were observed on qemu-storage-daemon 10.0.2.
"""

from __future__ import annotations

import shutil
import signal

import pytest

import iotests
import data_nbd
from data_nbd import (
    bitmap_add,
    bitmap_cmd,
    bitmaps_by_name,
    image_check,
    node_io,
    on_disk_bitmaps,
    qcow2_node_args,
)

SIZE = 16 << 20
INCONSISTENT = "Bitmap '{}' is inconsistent and cannot be used"


@pytest.fixture
def make_daemon(make_daemon):
    """The harness factory, returning daemons whose monitor already answers."""
    return data_nbd.ready_factory(make_daemon)


@pytest.fixture
def image(tmp_path):
    img = tmp_path / "disk.qcow2"
    iotests.create_image(img, SIZE, "qcow2")
    return img


def open_image(make_daemon, img, name=""):
    return make_daemon(*qcow2_node_args(img), name=name)


def crash_after_io(make_daemon, image, *cmds):
    """The daemon opens `image`, adds the persistent bitmap p, runs `cmds` on the node and is
    killed (-9), leaving what a crash leaves."""
    d = open_image(make_daemon, image, "first")
    bitmap_add(d, "n", "p", persistent=True)
    node_io(d, "n", *cmds)
    d.kill()


def test_persistent_bitmap_is_stored_at_quit_with_auto(make_daemon, image):
    d = open_image(make_daemon, image)
    bitmap_add(d, "n", "p", persistent=True)
    node_io(d, "n", "write 0 1", "write 1M 128k")
    assert d.bitmap("n", "p") == {"name": "p", "recording": True, "persistent": True, "busy": False,
                                  "granularity": 65536, "count": 196608}

    assert d.shutdown() == 0

    assert on_disk_bitmaps(image) == {"p": {"flags": ["auto"], "granularity": 65536}}
    image_check(image)


def test_restart_loads_bitmap_with_same_count_and_recording(make_daemon, image):
    d = open_image(make_daemon, image, "first")
    bitmap_add(d, "n", "p", persistent=True)
    bitmap_add(d, "n", "p512", persistent=True, granularity=512)
    node_io(d, "n", "write 0 1", "write 1M 128k", f"write {SIZE - 1} 1")
    before = {name: (b["count"], d.sha256("n", name)) for name, b in bitmaps_by_name(d, "n").items()}
    assert d.shutdown() == 0

    d = open_image(make_daemon, image, "second")

    assert bitmaps_by_name(d, "n") == {
        "p": {"name": "p", "recording": True, "persistent": True, "busy": False, "granularity": 65536,
              "count": 262144},
        "p512": {"name": "p512", "recording": True, "persistent": True, "busy": False, "granularity": 512,
                 "count": 132096},
    }
    assert {name: (b["count"], d.sha256("n", name)) for name, b in bitmaps_by_name(d, "n").items()} == before
    # still recording after the reload
    node_io(d, "n", "write 4M 1")
    assert d.bitmap("n", "p")["count"] == 262144 + 65536


def test_running_daemon_marks_loaded_bitmaps_in_use(make_daemon, image):
    iotests.qemu_img("bitmap", "--add", str(image), "a")
    iotests.qemu_img("bitmap", "--add", "--disable", str(image), "off")
    assert on_disk_bitmaps(image) == {"a": {"flags": ["auto"], "granularity": 65536},
                                      "off": {"flags": [], "granularity": 65536}}

    d = open_image(make_daemon, image)

    assert on_disk_bitmaps(image, force_share=True) == {"a": {"flags": ["in-use", "auto"], "granularity": 65536},
                                                        "off": {"flags": ["in-use"], "granularity": 65536}}
    bitmaps = d.node("n")["image"]["format-specific"]["data"]["bitmaps"]
    assert sorted(bitmaps, key=lambda b: b["name"]) == [
        {"name": "a", "flags": ["in-use", "auto"], "granularity": 65536},
        {"name": "off", "flags": ["in-use"], "granularity": 65536},
    ]
    assert d.shutdown() == 0
    assert on_disk_bitmaps(image) == {"a": {"flags": ["auto"], "granularity": 65536},
                                      "off": {"flags": [], "granularity": 65536}}


@iotests.qsd_only
def test_new_persistent_bitmap_reaches_the_file_only_at_close(make_daemon, image):
    # QEMU writes new persistent bitmaps only at close; blockd may store them
    # earlier (see the blockd-only stub below), so this is QSD behaviour only.
    d = open_image(make_daemon, image)
    bitmap_add(d, "n", "p", persistent=True)
    node_io(d, "n", "write 0 64k")

    assert on_disk_bitmaps(image, force_share=True) == {}
    d.kill()
    assert on_disk_bitmaps(image) == {}


def test_sigterm_stores_bitmaps_cleanly(make_daemon, image):
    d = open_image(make_daemon, image)
    bitmap_add(d, "n", "p", persistent=True)
    node_io(d, "n", "write 0 64k")

    d.signal(signal.SIGTERM)
    d.wait_exit()

    assert on_disk_bitmaps(image) == {"p": {"flags": ["auto"], "granularity": 65536}}
    image_check(image)


def test_blockdev_del_stores_bitmaps(make_daemon, image):
    d = open_image(make_daemon, image)
    bitmap_add(d, "n", "p", persistent=True, granularity=131072)

    d.ok("blockdev-del", node_name="n")

    assert on_disk_bitmaps(image) == {"p": {"flags": ["auto"], "granularity": 131072}}


def qemu_opens_writable(image):
    """A writable open by QEMU's own code: it keeps in-use bitmaps in use and clears the
    autoclear bit of blockd's dirty-region log, so neither daemon can recover them."""
    iotests.qemu_io("-f", "qcow2", "-c", "flush", str(image))


def test_kill_leaves_loaded_bitmaps_inconsistent(make_daemon, image):
    iotests.qemu_img("bitmap", "--add", str(image), "a")
    iotests.qemu_img("bitmap", "--add", "--disable", str(image), "off")
    d = open_image(make_daemon, image, "first")
    node_io(d, "n", "write 0 64k")
    d.kill()

    assert on_disk_bitmaps(image) == {"a": {"flags": ["in-use", "auto"], "granularity": 65536},
                                      "off": {"flags": ["in-use"], "granularity": 65536}}
    image_check(image)  # in-use bitmaps are not errors for qemu-img check
    qemu_opens_writable(image)
    image_check(image)

    d = open_image(make_daemon, image, "second")
    assert bitmaps_by_name(d, "n") == {
        name: {"name": name, "recording": False, "persistent": True, "busy": False, "granularity": 65536,
               "count": 0, "inconsistent": True}
        for name in ("a", "off")
    }
    bitmap_add(d, "n", "t")
    err = {"class": "GenericError", "desc": INCONSISTENT.format("a")}
    for verb in ("enable", "disable", "clear"):
        assert bitmap_cmd(d, verb, "n", "a") == {"error": err}, verb
    assert d.err("block-dirty-bitmap-merge", node="n", target="t", bitmaps=["a"]) == err
    assert d.err("block-dirty-bitmap-merge", node="n", target="a", bitmaps=["t"]) == err
    assert d.err("block-dirty-bitmap-add", {"node": "n", "name": "a"}) == {
        "class": "GenericError", "desc": "Bitmap already exists: a"}
    d.sha256("n", "a")
    # still inconsistent after writes and a clean shutdown
    node_io(d, "n", "write 0 64k")
    assert d.bitmap("n", "a")["count"] == 0
    assert d.shutdown() == 0
    assert on_disk_bitmaps(image) == {"a": {"flags": ["in-use", "auto"], "granularity": 65536},
                                      "off": {"flags": ["in-use"], "granularity": 65536}}


def test_inconsistent_bitmap_can_be_removed_and_leaves_the_file(make_daemon, image):
    iotests.qemu_img("bitmap", "--add", str(image), "a")
    iotests.qemu_img("bitmap", "--add", str(image), "keep")
    open_image(make_daemon, image, "first").kill()
    qemu_opens_writable(image)
    d = open_image(make_daemon, image, "second")

    assert bitmap_cmd(d, "remove", "n", "a") == {"return": {}}

    assert set(bitmaps_by_name(d, "n")) == {"keep"}
    assert set(on_disk_bitmaps(image, force_share=True)) == {"keep"}
    assert d.shutdown() == 0
    assert set(on_disk_bitmaps(image)) == {"keep"}
    image_check(image)


def test_remove_of_persistent_bitmap_deletes_it_from_the_file_at_once(make_daemon, image):
    iotests.qemu_img("bitmap", "--add", str(image), "a")
    iotests.qemu_img("bitmap", "--add", str(image), "b")
    d = open_image(make_daemon, image)

    assert bitmap_cmd(d, "remove", "n", "a") == {"return": {}}

    assert on_disk_bitmaps(image, force_share=True) == {"b": {"flags": ["in-use", "auto"], "granularity": 65536}}
    d.kill()
    assert set(on_disk_bitmaps(image)) == {"b"}


def test_last_bitmap_removed_leaves_no_bitmaps_in_the_file(make_daemon, image):
    iotests.qemu_img("bitmap", "--add", str(image), "a")
    d = open_image(make_daemon, image)
    bitmap_cmd(d, "remove", "n", "a")
    assert d.shutdown() == 0

    assert on_disk_bitmaps(image) == {}
    image_check(image)


def test_bitmaps_made_by_qemu_img_load_with_their_state(make_daemon, image):
    iotests.qemu_img("bitmap", "--add", str(image), "a")
    iotests.qemu_img("bitmap", "--add", "-g", "4096", str(image), "g")
    iotests.qemu_img("bitmap", "--add", "--disable", "-g", "1M", str(image), "dis")

    d = open_image(make_daemon, image)

    assert bitmaps_by_name(d, "n") == {
        "a": {"name": "a", "recording": True, "persistent": True, "busy": False, "granularity": 65536, "count": 0},
        "g": {"name": "g", "recording": True, "persistent": True, "busy": False, "granularity": 4096, "count": 0},
        "dis": {"name": "dis", "recording": False, "persistent": True, "busy": False, "granularity": 1048576,
                "count": 0},
    }
    node_io(d, "n", "write 0 1", "write 2M 1M")
    counts = {name: b["count"] for name, b in bitmaps_by_name(d, "n").items()}
    assert counts == {"a": 1114112, "g": 1052672, "dis": 0}


def test_recording_state_is_stored_as_auto_flag(make_daemon, image):
    iotests.qemu_img("bitmap", "--add", str(image), "was-on")
    iotests.qemu_img("bitmap", "--add", "--disable", str(image), "was-off")
    d = open_image(make_daemon, image)
    bitmap_add(d, "n", "new-off", persistent=True, disabled=True)
    bitmap_cmd(d, "disable", "n", "was-on")
    bitmap_cmd(d, "enable", "n", "was-off")
    assert d.shutdown() == 0

    assert on_disk_bitmaps(image) == {
        "was-on": {"flags": [], "granularity": 65536},
        "was-off": {"flags": ["auto"], "granularity": 65536},
        "new-off": {"flags": [], "granularity": 65536},
    }
    image_check(image)


def test_bitmap_data_survives_a_round_trip_through_qemu_img(make_daemon, image, tmp_path):
    d = open_image(make_daemon, image)
    bitmap_add(d, "n", "p", persistent=True, granularity=4096)
    node_io(d, "n", "write 8k 4k", "write 5M 1")
    assert d.shutdown() == 0

    # qemu-img merges the stored bitmap into a new one: same bits
    iotests.qemu_img("bitmap", "--add", "-g", "4096", str(image), "copy")
    iotests.qemu_img("bitmap", "--merge", "p", str(image), "copy")
    d = open_image(make_daemon, image, "second")
    assert d.bitmap("n", "copy")["count"] == d.bitmap("n", "p")["count"] == 8192
    assert d.sha256("n", "copy") == d.sha256("n", "p")


def test_persistent_bitmap_on_v2_image_is_refused(make_daemon, tmp_path):
    img = tmp_path / "v2.qcow2"
    iotests.create_image(img, SIZE, "qcow2", compat="0.10")
    d = open_image(make_daemon, img)

    err = d.err("block-dirty-bitmap-add", {"node": "n", "name": "p", "persistent": True})

    assert err == {"class": "GenericError",
                   "desc": "Can't make bitmap 'p' persistent in 'n': Cannot store dirty bitmaps in qcow2 v2 files"}
    assert d.bitmaps("n") == []
    bitmap_add(d, "n", "t")  # a transient one is fine
    assert d.shutdown() == 0
    assert on_disk_bitmaps(img) == {}


def test_persistent_bitmap_on_raw_file_node_is_refused(make_daemon, image):
    d = open_image(make_daemon, image)
    err = d.err("block-dirty-bitmap-add", {"node": "f", "name": "p", "persistent": True})
    assert err == {"class": "GenericError", "desc": "Can't store persistent bitmaps to f: Operation not supported"}


def test_bitmaps_of_read_only_image_are_read_only(make_daemon, image):
    iotests.qemu_img("bitmap", "--add", str(image), "a")
    d = make_daemon(*qcow2_node_args(image, extra="read-only=on"))

    assert d.bitmap("n", "a") == {"name": "a", "recording": True, "persistent": True, "busy": False,
                                  "granularity": 65536, "count": 0}
    err = {"class": "GenericError", "desc": "Bitmap 'a' is readonly and cannot be modified"}
    assert bitmap_cmd(d, "clear", "n", "a") == {"error": err}
    assert bitmap_cmd(d, "remove", "n", "a") == {"error": err}
    # a read-only open does not mark the bitmaps in use
    assert on_disk_bitmaps(image, force_share=True) == {"a": {"flags": ["auto"], "granularity": 65536}}
    d.kill()
    assert on_disk_bitmaps(image) == {"a": {"flags": ["auto"], "granularity": 65536}}


@iotests.blockd_only
def test_bitmap_flushed_before_kill_is_exact_after_restart(make_daemon, image):
    """Beyond QEMU (which stores bitmaps only at close): a flush checkpoints the
    persistent bitmaps exactly, so after kill -9 they load consistent, recording,
    with every write made before the flush."""
    crash_after_io(make_daemon, image, "write 0 64k", "write 1M 1", "flush")

    d = open_image(make_daemon, image, "second")
    b = d.bitmap("n", "p")
    assert "inconsistent" not in b
    assert b["recording"] is True
    assert b["count"] == 2 * 65536


@iotests.blockd_only
def test_write_after_checkpoint_then_kill_recovers_bitmap_from_the_dirty_log(make_daemon, image):
    """A write after the last checkpoint first marks its 4 MiB region in the image's
    dirty-region log, so after kill -9 the bitmap loads consistent: the checkpointed bits
    plus every marked region (a superset of the true bitmap, never missing a write)."""
    d = open_image(make_daemon, image, "first")
    bitmap_add(d, "n", "p", persistent=True)
    bitmap_add(d, "n", "p512", persistent=True, granularity=512)
    node_io(d, "n", "write 12M 64k", "flush", "write 5M 64k")
    d.kill()
    assert on_disk_bitmaps(image)["p"]["flags"] == ["in-use", "auto"]  # what QEMU sees
    image_check(image)

    d = open_image(make_daemon, image, "second")
    for name in ("p", "p512"):
        b = d.bitmap("n", name)
        assert "inconsistent" not in b
        assert b["recording"] is True
        # [12M, 12M+64K) exact from the checkpoint; [4M, 8M) the region of the write at 5M
        assert b["count"] == 65536 + (4 << 20), name
    assert "recovered from the dirty-region log" in d.log()
    # it keeps working: a clean shutdown stores it exactly, not in use
    node_io(d, "n", "write 0 1")
    count = d.bitmap("n", "p")["count"]
    assert d.shutdown() == 0
    assert on_disk_bitmaps(image)["p"]["flags"] == ["auto"]
    d = open_image(make_daemon, image, "third")
    assert d.bitmap("n", "p")["count"] == count


@iotests.blockd_only
def test_crash_recovery_survives_a_second_crash_before_a_checkpoint(make_daemon, image):
    """After a recovery the log keeps its marks until the next checkpoint."""
    crash_after_io(make_daemon, image, "flush", "write 1M 1")
    d = open_image(make_daemon, image, "second")
    node_io(d, "n", "write 9M 1")
    d.kill()

    d = open_image(make_daemon, image, "third")
    b = d.bitmap("n", "p")
    assert "inconsistent" not in b
    assert b["count"] == 8 << 20  # regions [0, 4M) and [8M, 12M)


@iotests.blockd_only
def test_after_qemu_opened_a_crashed_image_writable_bitmaps_are_inconsistent(make_daemon, image):
    """QEMU clears the log's autoclear bit: blockd no longer trusts the log."""
    crash_after_io(make_daemon, image, "flush", "write 2M 64k")
    qemu_opens_writable(image)

    d = open_image(make_daemon, image, "second")
    b = d.bitmap("n", "p")
    assert b.get("inconsistent") is True
    assert b["recording"] is False


@iotests.blockd_only
def test_merge_into_persistent_bitmap_survives_kill(make_daemon, image):
    """Merged bits come from no write, so blockd stores them at once."""
    d = open_image(make_daemon, image, "first")
    bitmap_add(d, "n", "p", persistent=True)
    bitmap_add(d, "n", "t", granularity=65536)
    node_io(d, "n", "write 3M 64k", "flush")
    d.ok("block-dirty-bitmap-clear", node="n", name="p")
    node_io(d, "n", "flush")
    d.ok("block-dirty-bitmap-merge", node="n", target="p", bitmaps=["t"])
    d.kill()

    d = open_image(make_daemon, image, "second")
    b = d.bitmap("n", "p")
    assert "inconsistent" not in b
    assert b["count"] == 65536


@iotests.blockd_only
def test_qsd_on_an_image_blockd_crashed_on_sees_inconsistent_bitmaps_and_so_does_blockd_after(
        make_daemon, image, tmp_path):
    """QEMU's view of an image with a dirty-region log is what it always was: after a blockd
    crash QSD loads the bitmaps inconsistent and works normally; its writable open invalidates
    the log, so blockd then loads them inconsistent too (never wrong)."""
    crash_after_io(make_daemon, image, "flush", "write 2M 64k")
    image_check(image)
    qsd_bin = shutil.which("qemu-storage-daemon")
    assert qsd_bin, "qemu-storage-daemon is required for this test"
    q = iotests.Daemon(tmp_path, name="qsd")
    q.binary = qsd_bin
    try:
        q.start(*qcow2_node_args(image))
        data_nbd.ready(q)
        assert q.bitmap("n", "p") == {"name": "p", "recording": False, "persistent": True,
                                      "busy": False, "granularity": 65536, "count": 0,
                                      "inconsistent": True}
        data_nbd.nbd_io(q, "n", "write -P 7 8M 64k", "read -P 7 8M 64k")
        assert q.shutdown() == 0
    finally:
        q.kill()
    image_check(image)
    assert on_disk_bitmaps(image)["p"]["flags"] == ["in-use", "auto"]

    d = open_image(make_daemon, image, "second")
    b = d.bitmap("n", "p")
    assert b.get("inconsistent") is True and b["recording"] is False
    assert "recovered from the dirty-region log" not in d.log()

"""qcow2 metadata cache options on blockdev-add (cache-size, l2-cache-size,
l2-cache-entry-size, refcount-cache-size, cache-clean-interval): accepted and
refused as QSD does, with QSD's texts (observed on qemu-storage-daemon 10.0.2)."""

from __future__ import annotations

import pytest

import data_nbd
import iotests
from iotests import create_image

MiB = 1 << 20


@pytest.fixture
def make_daemon(make_daemon):
    return data_nbd.ready_factory(make_daemon)


def add(d, img, **opts):
    args = {"driver": "qcow2", "node-name": "n", "file": {"driver": "file", "filename": str(img)}}
    args.update({k.replace("_", "-"): v for k, v in opts.items()})
    return d.cmd("blockdev-add", args)


ENTRY = "L2 cache entry size must be a power of two between 512 and the cluster size (65536)"


@pytest.mark.parametrize("opts, error", [
    ({"cache_size": MiB, "l2_cache_size": MiB // 2, "refcount_cache_size": MiB // 4},
     "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time"),
    ({"cache_size": MiB, "l2_cache_size": 2 * MiB}, "l2-cache-size may not exceed cache-size"),
    ({"cache_size": MiB, "refcount_cache_size": 2 * MiB}, "refcount-cache-size may not exceed cache-size"),
    ({"l2_cache_size": -1}, "Value '-1' is out of range for parameter 'l2-cache-size'"),
    ({"refcount_cache_size": -5}, "Value '-5' is out of range for parameter 'refcount-cache-size'"),
    ({"cache_size": -1}, "Value '-1' is out of range for parameter 'cache-size'"),
    ({"refcount_cache_size": 1 << 62}, "Refcount cache size too big"),
    ({"cache_clean_interval": -1}, "Cache clean interval too big"),
    ({"cache_clean_interval": 1 << 32}, "Cache clean interval too big"),
    ({"l2_cache_entry_size": 1000}, ENTRY),
    ({"l2_cache_entry_size": 256}, ENTRY),
    ({"l2_cache_entry_size": 131072}, ENTRY),
])
def test_bad_cache_options_are_refused_with_qemus_text(make_daemon, tmp_path, opts, error):
    img = create_image(tmp_path / "a.qcow2", "1G", "qcow2")
    d = make_daemon()
    assert add(d, img, **opts) == {"error": {"class": "GenericError", "desc": error}}
    assert d.nodes() == []
    assert d.shutdown() == 0


@pytest.mark.parametrize("opts", [
    {"cache_size": MiB},
    {"cache_size": 4 * MiB, "l2_cache_size": MiB},
    {"cache_size": 4 * MiB, "refcount_cache_size": MiB},
    {"l2_cache_size": 0, "refcount_cache_size": 0},
    {"l2_cache_size": 1 << 62},
    {"l2_cache_entry_size": 65536, "cache_clean_interval": (1 << 32) - 1},
    {"cache_clean_interval": 0},
])
def test_cache_options_are_accepted_and_io_works(make_daemon, tmp_path, opts):
    img = create_image(tmp_path / "a.qcow2", "1G", "qcow2")
    d = make_daemon()
    assert add(d, img, **opts) == {"return": {}}
    data_nbd.node_io(d, "n", "write -P 0x42 0 64k", "write -P 0x43 900M 64k",
                     "read -P 0x42 0 64k", "read -P 0x43 900M 64k")
    assert d.shutdown() == 0


@pytest.mark.parametrize("opts", [
    {"l2_cache_entry_size": 512},
    {"l2_cache_entry_size": 4096},
    {"l2_cache_entry_size": 1024, "l2_cache_size": 2048},
    {"l2_cache_size": 8192},
])
def test_l2_cache_slices_are_accepted_and_data_is_right(make_daemon, tmp_path, opts):
    """Slices smaller than the cluster size (and a cache of two of them): scattered writes,
    zeroes and discards read back, and the image passes qemu-img check and compares equal to
    the same operations done by qemu-io on a plain image."""
    img = create_image(tmp_path / "a.qcow2", "1G", "qcow2")
    ref = create_image(tmp_path / "ref.qcow2", "1G", "qcow2")
    ops = ["write -P 0x42 0 192k", "write -P 0x43 900M 64k", "write -P 0x44 511M 2M",
           "write -z 64k 64k", "discard 900M 64k", "write -P 0x45 100M 4k",
           "read -P 0x42 0 64k", "read -P 0 64k 64k", "read -P 0x42 128k 64k",
           "read -P 0x44 511M 2M", "read -P 0 900M 64k", "read -P 0x45 100M 4k"]
    d = make_daemon()
    assert add(d, img, discard="unmap", **opts) == {"return": {}}
    data_nbd.node_io(d, "n", *ops)
    assert d.shutdown() == 0
    data_nbd.image_check(img)
    # The reference gets zeroes where the node had the (unmapping) discard.
    ref_ops = [op.replace("discard", "write -z") for op in ops]
    iotests.qemu_io("-f", "qcow2", *[a for op in ref_ops for a in ("-c", op)], str(ref))
    iotests.qemu_img("compare", "-q", str(img), str(ref))



"""qcow2 metadata cache options on blockdev-add (cache-size, l2-cache-size,
l2-cache-entry-size, refcount-cache-size, cache-clean-interval): accepted and
refused as QSD does, with QSD's texts (observed on qemu-storage-daemon 10.0.2)."""

from __future__ import annotations

import pytest

import data_nbd
from iotests import DAEMON_KIND, create_image

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


def test_l2_cache_entry_size_below_the_cluster_size(make_daemon, tmp_path):
    """QSD caches L2 slices of that size; blockd caches whole tables and refuses the value
    rather than accept it without honouring it (README, known gaps)."""
    img = create_image(tmp_path / "a.qcow2", "1G", "qcow2")
    d = make_daemon()
    r = add(d, img, l2_cache_entry_size=4096)
    if DAEMON_KIND == "qsd":
        assert r == {"return": {}}
        data_nbd.node_io(d, "n", "write -P 0x42 0 64k", "read -P 0x42 0 64k")
    else:
        assert r == {"error": {"class": "GenericError", "desc":
                     "l2-cache-entry-size other than the cluster size (65536) is not supported "
                     "by blockd: its L2 cache holds whole tables"}}
        assert d.nodes() == []
    assert d.shutdown() == 0

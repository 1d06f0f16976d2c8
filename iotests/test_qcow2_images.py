"""qcow2 images in the daemon: images made by qemu-img (v2/v3, cluster sizes
512 B..2 MiB), backing chains, blockdev-create as libvirt drives it,
blockdev-reopen, and corrupt images.

Data is checked after the daemon quits with the local qemu-io / qemu-img.
Texts were observed on qemu-storage-daemon 10.0.2.
"""

from __future__ import annotations

import os
import shutil
import struct

import pytest

import iotests
import data_nbd
from data_nbd import (
    assert_io_ok,
    image_check,
    image_info,
    node_io,
    qcow2_node_args,
    qemu_io_uri,
)

SIZE = 8 << 20


@pytest.fixture
def make_daemon(make_daemon):
    """The harness factory, returning daemons whose monitor already answers."""
    return data_nbd.ready_factory(make_daemon)


def local_io(image, *cmds, fmt="qcow2"):
    proc = qemu_io_uri(str(image), *cmds, fmt=fmt)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_io_ok(proc.stdout + proc.stderr)
    return proc.stdout


def qcow2_add(d, node, image, **extra):
    args = {"driver": "qcow2", "node-name": node, "file": {"driver": "file", "filename": str(image)}}
    args.update({k.replace("_", "-"): v for k, v in extra.items()})
    return d.cmd("blockdev-add", args)


# Writes at the edges of an 8 MiB disk (cluster-crossing, unaligned, last byte).
EDGE_WRITES = ["write -P 0x11 0 511", "write -P 0x22 511 2", "write -P 0x33 65535 70000",
               "write -P 0x44 3000000 300000", f"write -P 0x55 {SIZE - 4097} 4096", f"write -P 0x66 {SIZE - 1} 1",
               "write -z 5M 64k", "write -P 0x77 6291456 65536"]


def reads_of(writes):
    return [w.replace("write -z", "read -P 0").replace("write", "read") for w in writes]


@pytest.mark.parametrize(
    "compat, cluster_size",
    [("0.10", 65536), ("1.1", 512), ("1.1", 65536), ("1.1", 2 << 20)],
    ids=["v2-64k", "v3-512", "v3-64k", "v3-2m"],
)
def test_image_made_by_qemu_img_reads_and_writes(make_daemon, tmp_path, compat, cluster_size):
    img = tmp_path / "disk.qcow2"
    ref = tmp_path / "ref.raw"
    iotests.create_image(img, SIZE, "qcow2", compat=compat, cluster_size=cluster_size)
    iotests.qemu_io("-c", "write -P 0x99 1M 1M", str(img))
    iotests.create_image(ref, SIZE)
    local_io(ref, "write -P 0x99 1M 1M", *EDGE_WRITES, fmt="raw")
    d = make_daemon()

    assert qcow2_add(d, "n", img) == {"return": {}}
    image = d.node("n")["image"]
    assert (image["format"], image["cluster-size"], image["virtual-size"]) == ("qcow2", cluster_size, SIZE)
    assert image["format-specific"]["data"]["compat"] == compat

    node_io(d, "n", "read -P 0x99 1M 1M", *EDGE_WRITES, *reads_of(EDGE_WRITES))
    assert d.shutdown() == 0

    local_io(img, *reads_of(EDGE_WRITES))
    image_check(img)
    assert "Images are identical." in iotests.qemu_img("compare", "-f", "qcow2", "-F", "raw", str(img), str(ref))


def test_second_writer_on_same_image_is_refused(make_daemon, tmp_path):
    img = tmp_path / "disk.qcow2"
    iotests.create_image(img, SIZE, "qcow2")
    d = make_daemon()
    assert qcow2_add(d, "n", img) == {"return": {}}

    assert qcow2_add(d, "n2", img) == {"error": {"class": "GenericError", "desc": 'Failed to get "write" lock'}}
    node_io(d, "n", "write 0 512")


def test_blockdev_del_releases_the_image(make_daemon, tmp_path):
    img = tmp_path / "disk.qcow2"
    iotests.create_image(img, SIZE, "qcow2")
    d = make_daemon()
    qcow2_add(d, "n", img)
    node_io(d, "n", "write -P 0x42 4096 4096")

    d.ok("blockdev-del", node_name="n")

    assert d.err("blockdev-del", node_name="n") == {
        "class": "GenericError", "desc": "Failed to find node with node-name='n'"}
    local_io(img, "read -P 0x42 4096 4096")  # no -U: the lock is gone
    image_check(img)


def make_chain(tmp_path):
    """base.qcow2 <- mid.qcow2 <- top.qcow2 (backing names stored in the images)."""
    base, mid, top = (tmp_path / f"{n}.qcow2" for n in ("base", "mid", "top"))
    iotests.create_image(base, SIZE, "qcow2")
    iotests.qemu_io("-c", "write -P 0xb0 0 4M", str(base))
    iotests.qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(mid))
    iotests.qemu_io("-c", "write -P 0xb1 1M 1M", str(mid))
    iotests.qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", str(top))
    iotests.qemu_io("-c", "write -P 0xb2 1536k 64k", "-c", "write -z 3M 64k", str(top))
    return base, mid, top


CHAIN_READS = ["read -P 0xb0 0 1M", "read -P 0xb1 1M 512k", "read -P 0xb2 1536k 64k", "read -P 0xb1 1600k 448k",
               "read -P 0xb0 2M 1M", "read -P 0 3M 64k", "read -P 0xb0 3136k 960k", "read -P 0 4M 4M"]


def test_backing_chain_named_in_image_is_opened(make_daemon, tmp_path):
    base, mid, top = make_chain(tmp_path)
    d = make_daemon()

    qcow2_add(d, "n", top)

    info = next(n for n in d.ok("query-named-block-nodes") if n["node-name"] == "n")  # not flat
    assert info["backing_file_depth"] == 2
    assert info["backing_file"] == str(mid)
    assert info["image"]["backing-filename"] == "mid.qcow2"
    assert info["image"]["full-backing-filename"] == str(mid)
    assert info["image"]["backing-image"]["backing-filename"] == "base.qcow2"
    assert info["image"]["backing-image"]["backing-image"]["filename"] == str(base)
    assert len(d.nodes()) == 6  # three qcow2 nodes, each over an implicit file node
    node_io(d, "n", *CHAIN_READS, "write -P 0xcc 0 64k", "read -P 0xcc 0 64k", "read -P 0xb0 64k 64k")
    assert d.shutdown() == 0

    local_io(top, "read -P 0xcc 0 64k", *CHAIN_READS[1:])
    local_io(base, "read -P 0xb0 0 4M", "read -P 0 4M 4M")  # the write stayed in the top image
    local_io(mid, "read -P 0xb0 0 1M", "read -P 0xb1 1M 1M")
    for img in (base, mid, top):
        image_check(img)


def test_backing_option_overrides_image_and_null_cuts_chain(make_daemon, tmp_path):
    base, mid, top = make_chain(tmp_path)
    d = make_daemon(*qcow2_node_args(base, "nb", "fb"))

    # top directly on base, skipping mid
    assert qcow2_add(d, "skip", top, backing="nb") == {"return": {}}
    node_io(d, "skip", "read -P 0xb0 0 1536k", "read -P 0xb2 1536k 64k", "read -P 0xb0 1600k 1472k",
            "read -P 0 3M 64k")
    d.ok("blockdev-del", node_name="skip")

    # no backing at all: unallocated clusters read as zeros
    assert qcow2_add(d, "alone", top, backing=None) == {"return": {}}
    assert d.node("alone")["backing_file_depth"] == 0
    node_io(d, "alone", "read -P 0 0 1536k", "read -P 0xb2 1536k 64k", "read -P 0 1600k 6592k")


def wait_job(d, job_id):
    """Waits for the job to conclude and returns its query-jobs entry."""
    d.event_wait("JOB_STATUS_CHANGE", match={"id": job_id, "status": "concluded"})
    return next(j for j in d.ok("query-jobs") if j["id"] == job_id)


def create_job(d, job_id, options):
    d.ok("blockdev-create", {"job-id": job_id, "options": options})
    job = wait_job(d, job_id)
    d.ok("job-dismiss", id=job_id)
    d.event_wait("JOB_STATUS_CHANGE", match={"id": job_id, "status": "null"})
    return job


def test_blockdev_create_as_libvirt_drives_it(make_daemon, tmp_path):
    base = tmp_path / "base.qcow2"
    iotests.create_image(base, SIZE, "qcow2")
    iotests.qemu_io("-c", "write -P 0xba 0 8M", str(base))
    new = tmp_path / "new.qcow2"
    d = make_daemon()

    job = create_job(d, "create-file", {"driver": "file", "filename": str(new), "size": 0})
    assert job == {"id": "create-file", "type": "create", "status": "concluded",
                   "current-progress": 1, "total-progress": 1}
    statuses = [e["data"]["status"] for e in d.get_events() if e["event"] == "JOB_STATUS_CHANGE"]
    assert statuses == ["created", "running", "waiting", "pending"]

    d.ok("blockdev-add", driver="file", node_name="new-file", filename=str(new))
    job = create_job(d, "create-fmt", {"driver": "qcow2", "file": "new-file", "size": SIZE, "cluster-size": 4096,
                                       "backing-file": str(base), "backing-fmt": "qcow2"})
    assert "error" not in job
    d.ok("blockdev-add", driver="qcow2", node_name="new", file="new-file")

    assert d.node("new")["image"]["cluster-size"] == 4096
    assert d.node("new")["backing_file"] == str(base)
    node_io(d, "new", "read -P 0xba 0 8M", "write -P 0x12 4095 2", "read -P 0x12 4095 2")
    assert d.shutdown() == 0

    image_check(new)
    info = image_info(new)
    assert (info["virtual-size"], info["cluster-size"]) == (SIZE, 4096)
    assert info["backing-filename"] == str(base)
    assert info["backing-filename-format"] == "qcow2"
    assert info["format-specific"]["data"]["compat"] == "1.1"
    local_io(new, "read -P 0xba 0 4095", "read -P 0x12 4095 2", "read -P 0xba 4097 8384511")


def test_blockdev_create_v2_image(make_daemon, tmp_path):
    new = tmp_path / "v2.qcow2"
    d = make_daemon()
    create_job(d, "c1", {"driver": "file", "filename": str(new), "size": 0})
    d.ok("blockdev-add", driver="file", node_name="f", filename=str(new))

    job = create_job(d, "c2", {"driver": "qcow2", "file": "f", "size": 1 << 20, "version": "v2", "cluster-size": 512})

    assert "error" not in job
    d.ok("blockdev-del", node_name="f")
    image_check(new)
    info = image_info(new)
    assert (info["virtual-size"], info["cluster-size"], info["format-specific"]["data"]["compat"]) == (
        1 << 20, 512, "0.10")


@pytest.mark.parametrize(
    "options, error",
    [
        ({"size": SIZE, "cluster-size": 1000}, "Cluster size must be a power of two between 512 and 2048k"),
        ({"size": 1000}, "Image size must be a multiple of 512 bytes"),
        ({"size": SIZE, "file": "nosuch"}, "Cannot find device='nosuch' nor node-name='nosuch'"),
        ({"size": SIZE, "version": "v2", "compression-type": "zstd"},
         "Non-zlib compression type is only supported with compatibility level 1.1 and above "
         "(use version=v3 or greater)"),
    ],
    ids=["cluster-size", "size", "no-file-node", "v2-zstd"],
)
def test_blockdev_create_failure_is_reported_by_the_job(make_daemon, tmp_path, options, error):
    img = tmp_path / "x.qcow2"
    img.write_bytes(b"")
    d = make_daemon("--blockdev", f"file,node-name=f,filename={img}")

    d.ok("blockdev-create", {"job-id": "j", "options": {"driver": "qcow2", "file": "f", **options}})
    job = wait_job(d, "j")

    assert job == {"id": "j", "type": "create", "status": "concluded", "current-progress": 1,
                   "total-progress": 1, "error": error}
    statuses = [e["data"]["status"] for e in d.get_events() if e["event"] == "JOB_STATUS_CHANGE"]
    assert statuses == ["created", "running", "aborting"]
    assert d.err("blockdev-create", {"job-id": "j", "options": {"driver": "qcow2", "file": "f", "size": SIZE}}) == {
        "class": "GenericError", "desc": "Job ID 'j' already in use"}
    d.ok("job-dismiss", id="j")
    assert os.path.getsize(img) == 0


def test_blockdev_reopen_switches_read_only_and_back(make_daemon, tmp_path):
    img = tmp_path / "disk.qcow2"
    iotests.create_image(img, SIZE, "qcow2")
    d = make_daemon(*qcow2_node_args(img))
    sock = data_nbd.start_unix_server(d)
    node_io(d, "n", "write -P 0x31 0 64k")

    d.ok("blockdev-reopen", options=[{"driver": "qcow2", "node-name": "n", "file": "f", "read-only": True}])

    assert d.node("n")["ro"] is True
    assert d.err("block-export-add", {"type": "nbd", "id": "w", "node-name": "n", "writable": True}) == {
        "class": "GenericError", "desc": "Cannot export read-only node as writable"}
    data_nbd.export(d, "n", "r", "r")
    p = qemu_io_uri(data_nbd.uri(sock, "r"), "read -P 0x31 0 64k", read_only=True)
    assert p.returncode == 0 and "verification" not in p.stdout, p.stdout
    data_nbd.unexport(d, "r")

    d.ok("blockdev-reopen", options=[{"driver": "qcow2", "node-name": "n", "file": "f", "read-only": False}])

    assert d.node("n")["ro"] is False
    node_io(d, "n", "write -P 0x32 64k 64k")
    assert d.shutdown() == 0
    local_io(img, "read -P 0x31 0 64k", "read -P 0x32 64k 64k")
    image_check(img)


def test_blockdev_reopen_to_read_only_refused_while_written_through_export(make_daemon, tmp_path):
    img = tmp_path / "disk.qcow2"
    iotests.create_image(img, SIZE, "qcow2")
    d = make_daemon(*qcow2_node_args(img))
    data_nbd.start_unix_server(d)
    data_nbd.export(d, "n", "w", "w", writable=True)

    err = d.err("blockdev-reopen", options=[{"driver": "qcow2", "node-name": "n", "file": "f", "read-only": True}])

    assert err == {"class": "GenericError", "desc": "Read-only block node 'n' cannot support read-write users"}
    assert d.node("n")["ro"] is False
    assert d.err("blockdev-reopen", options=[{"driver": "qcow2", "node-name": "n", "read-only": True}]) == {
        "class": "GenericError", "desc": "Parameter 'options[0].file' is missing"}
    assert d.err("blockdev-reopen", options=[{"driver": "qcow2", "node-name": "nosuch", "file": "f",
                                               "read-only": True}]) == {
        "class": "GenericError", "desc": "Failed to find node with node-name='nosuch'"}
    assert d.err("blockdev-reopen", options=[{"driver": "raw", "node-name": "n", "file": "f"}]) == {
        "class": "GenericError", "desc": "Cannot change the option 'driver'"}


def corrupt(path, kind):
    """Damages a fresh qcow2 image in place."""
    if kind == "bad-magic":
        with open(path, "r+b") as f:
            f.write(b"XXXX")
    elif kind == "truncated-header":
        os.truncate(path, 50)
    elif kind == "empty":
        os.truncate(path, 0)
    elif kind == "version-4":
        with open(path, "r+b") as f:
            f.seek(4)
            f.write(struct.pack(">I", 4))
    elif kind == "cluster-bits-8":
        with open(path, "r+b") as f:
            f.seek(20)
            f.write(struct.pack(">I", 8))
    elif kind == "unknown-incompat-bit":
        with open(path, "r+b") as f:
            f.seek(72)
            f.write(struct.pack(">Q", 1 << 63))
    else:
        raise ValueError(kind)


@pytest.mark.parametrize(
    "kind, desc",
    [
        ("bad-magic", "Image is not in qcow2 format"),
        ("truncated-header", "qcow2 header too short"),
        ("empty", "Image is not in qcow2 format"),
        ("version-4", "Unsupported qcow2 version 4"),
        ("cluster-bits-8", "Unsupported cluster size: 2^8"),
        ("unknown-incompat-bit", "Unsupported qcow2 feature(s): Unknown incompatible feature: 8000000000000000"),
    ],
)
def test_corrupt_image_is_refused_and_daemon_keeps_working(make_daemon, tmp_path, kind, desc):
    good = tmp_path / "good.qcow2"
    bad = tmp_path / "bad.qcow2"
    iotests.create_image(good, SIZE, "qcow2")
    shutil.copy(good, bad)
    corrupt(bad, kind)
    d = make_daemon()

    assert qcow2_add(d, "bad", bad) == {"error": {"class": "GenericError", "desc": desc}}

    assert "bad" not in [n["node-name"] for n in d.nodes()]
    assert d.nodes() == []  # the implicit file node went away too
    assert qcow2_add(d, "good", good) == {"return": {}}
    node_io(d, "good", "write -P 0x5 0 4k", "read -P 0x5 0 4k")
    d.ok("blockdev-add", driver="file", node_name="fbad", filename=str(bad))
    assert d.err("blockdev-add", driver="qcow2", node_name="bad", file="fbad") == {"class": "GenericError",
                                                                                   "desc": desc}
    named = {n["node-name"] for n in d.nodes() if not n["node-name"].startswith("#")}
    assert named == {"fbad", "good"}


def test_missing_image_file_is_refused(make_daemon, tmp_path):
    d = make_daemon()
    missing = tmp_path / "missing.qcow2"
    assert qcow2_add(d, "n", missing) == {"error": {
        "class": "GenericError", "desc": f"Could not open '{missing}': No such file or directory"}}

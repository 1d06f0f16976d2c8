"""Compressed writes (``qemu-io write -c``) into qcow2 through blockd's HMP, compared with
the real ``qemu-io`` on an identical image: same texts (refusals included), same data, and
both images compressed per ``qemu-img map`` and clean per ``qemu-img check``.  blockd only:
QSD has no HMP, and over NBD (its only way in) there is no compressed write."""

from __future__ import annotations

import json

from iotests import blockd_only, create_image, filter_qemu_io, qemu_img, qemu_io

pytestmark = blockd_only

MiB = 1 << 20


class Pair:
    def __init__(self, daemon, tmp_path, size=MiB, cluster="64k"):
        self.d = daemon
        self.img = create_image(tmp_path / "blockd.qcow2", size, fmt="qcow2", cluster_size=cluster)
        self.ref = create_image(tmp_path / "ref.qcow2", size, fmt="qcow2", cluster_size=cluster)
        daemon.ok("blockdev-add", driver="qcow2", node_name="q",
                  file={"driver": "file", "filename": str(self.img)})

    def both(self, *cmds: str) -> str:
        got = "".join(self.d.ok("human-monitor-command", {"command-line": f'qemu-io q "{c}"'})
                      for c in cmds)
        got = filter_qemu_io(got.replace("\r\n", "\n"))
        argv = ["-f", "qcow2"]
        for c in cmds:
            argv += ["-c", c]
        want = qemu_io(*argv, str(self.ref), check=False)
        assert got == want
        return got

    def close(self):
        self.d.ok("blockdev-del", node_name="q")

    def compressed_map(self, path):
        return [(e["start"], e["length"], e.get("compressed", False))
                for e in json.loads(qemu_img("map", "--output=json", str(path)))]


def test_write_c_matches_qemu_io(daemon, tmp_path):
    p = Pair(daemon, tmp_path)
    assert p.both("write -c -P 0x11 0 128k") == "wrote 131072/131072 bytes at offset 0\n"
    assert p.both("write -c 4k 64k") == "write failed: Invalid argument\n"
    assert p.both("write -c 256k 4k") == "write failed: Invalid argument\n"
    assert p.both("write -c -P 0x22 0 64k") == "write failed: Input/output error\n"
    assert p.both("write -c -z 256k 64k") == "wrote 65536/65536 bytes at offset 262144\n"
    assert p.both("write -c -P 0x33 256k 64k") == "wrote 65536/65536 bytes at offset 262144\n"
    assert p.both("read -P 0x11 0 128k") == "read 131072/131072 bytes at offset 0\n"
    p.close()
    for path in (p.img, p.ref):
        assert "No errors were found" in qemu_img("check", str(path))
    assert qemu_img("compare", str(p.img), str(p.ref)).strip() == "Images are identical."
    assert p.compressed_map(p.img) == p.compressed_map(p.ref)
    assert any(c for _, _, c in p.compressed_map(p.img))


def test_write_c_last_partial_cluster(daemon, tmp_path):
    p = Pair(daemon, tmp_path, size=100 * 1024)
    assert p.both("write -c -P 0x44 64k 36k") == "wrote 36864/36864 bytes at offset 65536\n"
    assert p.both("write -c -P 0x44 0 64k") == "wrote 65536/65536 bytes at offset 0\n"
    p.close()
    assert "No errors were found" in qemu_img("check", str(p.img))
    assert qemu_img("compare", str(p.img), str(p.ref)).strip() == "Images are identical."
    assert p.compressed_map(p.img) == p.compressed_map(p.ref)


def test_write_c_on_raw_is_not_supported(daemon, tmp_path):
    img = create_image(tmp_path / "a.raw", MiB)
    daemon.ok("blockdev-add", driver="raw", node_name="r",
              file={"driver": "file", "filename": str(img)})
    out = daemon.ok("human-monitor-command", {"command-line": 'qemu-io r "write -c 0 64k"'})
    assert out.replace("\r\n", "\n") == "write failed: Operation not supported\n"


def test_failed_compressed_data_write_leaves_cluster_unallocated(daemon, tmp_path):
    # Unlike QEMU (L2 entry first), blockd writes the data first: an injected failure leaves
    # no entry pointing at garbage and no leaked reference.
    img = create_image(tmp_path / "c.qcow2", MiB, fmt="qcow2")
    daemon.ok("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": {
        "driver": "blkdebug", "image": {"driver": "file", "filename": str(img)},
        "inject-error": [{"event": "write_compressed", "errno": 28, "once": True}]}})
    hmp = lambda c: daemon.ok("human-monitor-command",
                              {"command-line": f'qemu-io q "{c}"'}).replace("\r\n", "\n")
    assert hmp("write -c -P 0x11 64k 64k") == "write failed: No space left on device\n"
    assert hmp("read -P 0 64k 64k").startswith("read 65536/65536 bytes at offset 65536\n")
    assert filter_qemu_io(hmp("write -c -P 0x22 128k 64k")) == \
        "wrote 65536/65536 bytes at offset 131072\n"
    daemon.ok("blockdev-del", node_name="q")
    check = qemu_img("check", str(img))
    assert "No errors were found" in check and "leaked" not in check
    m = json.loads(qemu_img("map", "--output=json", str(img)))
    assert [e["start"] for e in m if e.get("compressed")] == [131072]
    assert not any(e["data"] for e in m if e["start"] <= 65536 < e["start"] + e["length"])


def test_create_zstd_is_refused_by_the_job(make_daemon, tmp_path):
    # QSD creates zstd images; blockd can neither write nor open them, so the job fails.
    img = tmp_path / "z.qcow2"
    img.write_bytes(b"")
    d = make_daemon("--blockdev", f"file,node-name=f,filename={img}")
    d.ok("blockdev-create", {"job-id": "j", "options": {
        "driver": "qcow2", "file": "f", "size": MiB, "compression-type": "zstd"}})
    d.event_wait("JOB_STATUS_CHANGE", match={"id": "j", "status": "concluded"})
    job = next(j for j in d.ok("query-jobs") if j["id"] == "j")
    assert job["error"] == "The zstd compression type is not supported by blockd (use zlib)"
    assert img.stat().st_size == 0

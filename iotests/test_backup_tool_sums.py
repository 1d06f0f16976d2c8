"""blockd-backup never trusts a damaged backup: its chunk-sums objects and its chain files.

A point's chunk-sums object (`sums/DISK/ID.bin`, the hash of every 64 KiB of the disk) must
hash to the point's recorded content digest: `verify` reports one that does not (exit 7, naming
it), and the next incremental does not take its hashes for the chunks it did not change (it
hashes them through the chain and warns), so its own point restores and verifies exactly.
`restore` onto a live node over NBD checks every chain file's checksum before it writes, so a
damaged backup leaves the live disk as it was.

The tool runs the daemon under test (``IOTESTS_DAEMON``) on stopped images (``--image``) and
the live node is that daemon's writable NBD export.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from iotests import qemu_img, qemu_io
from test_backup_tool import SIZE, Vm, digest_of, events, run_tool


def manifests(repo: Path) -> list:
    return [json.loads(p.read_text()) for p in sorted((repo / "pc" / "backups").glob("*.json"))]


def flip(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x5A]))


def raw_of(img: Path, dest: Path) -> str:
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(img), str(dest))
    return digest_of(dest)


@pytest.mark.timeout(180)
def test_damaged_sums_are_reported_by_verify_and_not_used_by_the_next_incremental(tmp_path):
    img = tmp_path / "s.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE))
    # Chunk 100 (6.25 MiB) holds data that no later write touches: its hash is what an
    # incremental would inherit from the damaged sums.
    qemu_io("-f", "qcow2", "-c", "write -P 0x11 0 8M", str(img))
    repo = tmp_path / "repo"
    base = ["--repo", str(repo), "--machine", "pc"]
    run_tool(*base, "full", "--image", str(img))
    qemu_io("-f", "qcow2", "-c", "write -P 0x12 0 128k", str(img))
    run_tool(*base, "inc", "--image", str(img))
    inc = manifests(repo)[-1]
    sums_name = inc["disks"][0]["sums"]
    sums = repo / sums_name
    assert sums.stat().st_size == SIZE // 65536 * 32
    run_tool(*base, "verify", "--at", "latest")

    flip(sums, 3200)
    p = run_tool(*base, "verify", "--at", "latest", check=False)
    assert p.returncode == 7, (p.returncode, p.stderr)
    assert "chunk-sums mismatch" in p.stderr and sums_name in p.stderr, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("blockd-backup: "), p.stderr

    # The next incremental does not use them: it says so, and its point is exact.
    qemu_io("-f", "qcow2", "-c", "write -P 0x13 1M 64k", str(img))
    p = run_tool(*base, "--json", "inc", "--image", str(img))
    warn = [e for e in events(p.stdout) if e["event"] == "warning"]
    assert len(warn) == 1 and warn[0]["what"] == "sums" and sums_name in warn[0]["message"], warn
    assert "damaged" in warn[0]["reason"], warn
    assert [e["kind"] for e in events(p.stdout) if e["event"] == "plan"] == ["inc"]
    run_tool(*base, "verify", "--at", "latest")
    want = raw_of(img, tmp_path / "want.raw")
    out = tmp_path / "got.raw"
    run_tool(*base, "restore", "--at", "latest", "--to", str(out))
    assert digest_of(out) == want
    # And the one after it takes the (good) sums of that point without a warning.
    qemu_io("-f", "qcow2", "-c", "write -P 0x14 2M 64k", str(img))
    p = run_tool(*base, "--json", "inc", "--image", str(img))
    assert not [e for e in events(p.stdout) if e["event"] == "warning"], p.stdout
    run_tool(*base, "verify", "--at", "latest")
    want = raw_of(img, tmp_path / "want.raw")
    run_tool(*base, "restore", "--at", "latest", "--to", str(out))
    assert digest_of(out) == want

    # Without --json the warning is one line on stderr.
    qemu_io("-f", "qcow2", "-c", "write -P 0x15 3M 64k", str(img))
    flip(repo / manifests(repo)[-1]["disks"][0]["sums"], 0)
    p = run_tool(*base, "inc", "--image", str(img))
    lines = [ln for ln in p.stderr.splitlines() if "previous sums" in ln]
    assert len(lines) == 1 and lines[0].startswith("warning: "), p.stderr
    run_tool(*base, "verify", "--at", "latest")

    # The damaged point still fails verify; a missing sums object the manifest names too.
    p = run_tool(*base, "verify", "--at", inc["id"], check=False)
    assert p.returncode == 7 and "chunk-sums mismatch" in p.stderr, p.stderr
    first = manifests(repo)[0]
    (repo / first["disks"][0]["sums"]).unlink()
    p = run_tool(*base, "verify", "--at", first["id"], check=False)
    assert p.returncode == 7 and "chunk-sums object missing" in p.stderr, p.stderr
    assert first["disks"][0]["sums"] in p.stderr, p.stderr


@pytest.mark.timeout(180)
def test_restore_onto_a_live_node_refuses_a_damaged_chain_and_writes_nothing(make_daemon, tmp_path):
    img = tmp_path / "r.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE))
    qemu_io("-f", "qcow2", "-c", "write -P 0x21 0 2M", "-c", "write -P 0x22 40M 1M", str(img))
    repo = tmp_path / "repo"
    base = ["--repo", str(repo), "--machine", "pc"]
    run_tool(*base, "full", "--image", str(img))
    qemu_io("-f", "qcow2", "-c", "write -P 0x23 1M 64k", str(img))
    run_tool(*base, "inc", "--image", str(img))
    want = raw_of(img, tmp_path / "want.raw")

    vm = Vm(make_daemon, tmp_path, names=("live",))
    qemu_io("-f", "raw", "-c", "write -P 0x77 0 4M", "-c", "write -P 0x78 60M 64k", vm.uri("live"))
    live = tmp_path / "live-before.raw"
    before = vm.frozen("live", live)
    # The base file of the latest point's chain is damaged: a byte of a data cluster, so the
    # point's content is wrong too (without the check, the restore would write it).
    base_file = repo / manifests(repo)[-1]["disks"][0]["chain"][0]["name"]
    at = base_file.read_bytes().find(b"\x22" * 65536)
    assert at > 0
    flip(base_file, at + 100)
    p = run_tool(*base, "restore", "--at", "latest", "--nbd-socket", str(vm.nbd), "--export", "w-live",
                 check=False)
    assert p.returncode == 7, (p.returncode, p.stdout, p.stderr)
    assert "checksum mismatch" in p.stderr and "nothing written" in p.stderr, p.stderr
    after = tmp_path / "live-after.raw"
    assert vm.frozen("live", after) == before
    out = qemu_io("-f", "raw", "-c", "read -P 0x77 0 4M", "-c", "read -P 0x78 60M 64k",
                  "-c", "read -P 0 4M 56M", str(after))
    assert "fail" not in out.lower(), out

    # Repaired, the same restore writes the point.
    flip(base_file, at + 100)
    run_tool(*base, "restore", "--at", "latest", "--nbd-socket", str(vm.nbd), "--export", "w-live")
    assert vm.frozen("live", after) == want

"""blockd-backup: repositories recorded in an older manifest format keep working.

Version 1 recorded SHA-256 everywhere (`sha256` per file, `content_sha256` per disk: SHA-256 over
the SHA-256 of each 64 KiB of the disk); version 3 (now) records new files' checksums as BLAKE3
block lists. The test writes a repository with the tool, rewrites its manifests into version 1
by hand (the checksums computed here with hashlib, independently of the tool), then checks that
verify, restore, a further incremental and prune work on it, that the files keep the format they
were recorded with, that prune rechecksums what it merges in the new format, and that a damaged
version-1 file is caught.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from iotests import qemu_img, qemu_io
from test_backup_tool import SIZE, digest_of, run_tool

CHUNK = 64 << 10


def sha256_file(p: Path) -> str:
    return digest_of(p)


def sha256_content(raw: Path) -> str:
    """Version 1's content digest: SHA-256 over the SHA-256 of each 64 KiB of the disk."""
    top = hashlib.sha256()
    with open(raw, "rb") as f:
        for b in iter(lambda: f.read(CHUNK), b""):
            top.update(hashlib.sha256(b).digest())
    return top.hexdigest()


def to_version_1(repo: Path, tmp: Path) -> None:
    """Rewrite every manifest of machine `pc` as version 1 would have recorded it."""
    for mf in sorted((repo / "pc" / "backups").glob("*.json")):
        m = json.loads(mf.read_text())
        for d in m["disks"]:
            raw = tmp / "point.raw"
            run_tool("--repo", str(repo), "--machine", "pc", "restore", "--at", m["id"],
                     "--disk", d["name"], "--to", str(raw))
            d["content_sha256"] = sha256_content(raw)
            raw.unlink()
            del d["content_digest"]
            d.pop("sums", None)
            for f in d["chain"]:
                f["sha256"] = sha256_file(repo / f["name"])
                del f["checksum"]
                del f["hash"]
        m["version"] = 1
        del m["hash"]
        mf.write_text(json.dumps(m, indent=2))


def manifests(repo: Path) -> list:
    return [json.loads(p.read_text()) for p in sorted((repo / "pc" / "backups").glob("*.json"))]


@pytest.mark.timeout(300)
def test_version_1_repository_verifies_restores_grows_and_prunes(tmp_path):
    img = tmp_path / "v.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE))
    qemu_io("-f", "qcow2", "-c", "write -P 0x51 0 3M", "-c", "write -P 0x52 40M 1M", str(img))
    repo = tmp_path / "repo"
    base = ["--repo", str(repo), "--machine", "pc"]
    run_tool(*base, "full", "--image", str(img))
    qemu_io("-f", "qcow2", "-c", "write -P 0x61 1M 128k", "-c", "write -z 40M 64k", str(img))
    run_tool(*base, "inc", "--image", str(img))
    now = manifests(repo)
    assert [m["version"] for m in now] == [3, 3]
    assert {f["hash"] for m in now for d in m["disks"] for f in d["chain"]} == {"blake3-blocks"}

    to_version_1(repo, tmp_path)
    old = manifests(repo)
    assert all(m["version"] == 1 and "hash" not in m for m in old)
    for m in old:
        run_tool(*base, "verify", "--at", m["id"])
    want = tmp_path / "want.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(img), str(want))
    out = tmp_path / "got.raw"
    run_tool(*base, "restore", "--at", "latest", "--to", str(out))
    assert digest_of(out) == digest_of(want)

    # A further incremental on top of the version-1 chain: its own file in the new format,
    # the older files keep SHA-256.
    qemu_io("-f", "qcow2", "-c", "write -P 0x71 8M 192k", str(img))
    run_tool(*base, "inc", "--image", str(img))
    last = manifests(repo)[-1]
    assert last["version"] == 3
    chain = last["disks"][0]["chain"]
    assert [f["hash"] for f in chain] == ["sha256", "sha256", "blake3-blocks"], chain
    assert chain[0]["checksum"] == old[0]["disks"][0]["chain"][0]["sha256"]
    run_tool(*base, "verify", "--at", "latest")
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(img), str(want))
    run_tool(*base, "restore", "--at", "latest", "--to", str(out))
    assert digest_of(out) == digest_of(want)

    # Prune merges into the version-1 base: the base is rechecksummed in the new format.
    run_tool(*base, "prune", "--keep", "1")
    kept = manifests(repo)
    assert len(kept) == 1 and kept[0]["version"] == 3
    assert [f["hash"] for f in kept[0]["disks"][0]["chain"]] == ["blake3-blocks"]
    run_tool(*base, "verify")
    run_tool(*base, "restore", "--at", "latest", "--to", str(out))
    assert digest_of(out) == digest_of(want)


@pytest.mark.timeout(120)
def test_damaged_version_1_file_is_caught(tmp_path):
    img = tmp_path / "v.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE))
    qemu_io("-f", "qcow2", "-c", "write -P 0x33 0 2M", str(img))
    repo = tmp_path / "repo"
    base = ["--repo", str(repo), "--machine", "pc"]
    run_tool(*base, "full", "--image", str(img))
    to_version_1(repo, tmp_path)
    run_tool(*base, "verify")
    f = next((repo / "pc" / "disks").rglob("*.qcow2"))
    with open(f, "r+b") as fh:
        fh.seek(f.stat().st_size - 1000)
        b = fh.read(1)
        fh.seek(f.stat().st_size - 1000)
        fh.write(bytes([b[0] ^ 0x10]))
    p = run_tool(*base, "verify", check=False)
    assert p.returncode == 7 and "checksum mismatch" in p.stderr, p.stderr

"""blockd-backup (crates/blockd-backup) end to end, against the daemon under test.

The tool speaks QMP and NBD, so every test runs against blockd and QSD alike
(``IOTESTS_DAEMON``).  Live backups need ``blockdev-backup``, ``transaction``
and ``snapshot-access`` (fleecing) in the daemon; both daemons have them, and a
daemon whose ``query-qmp-schema`` lacks one fails the live tests naming what is
missing.  ``--offline`` variants need no backup job.

Frozen copies: the writer runs in a thread; at each backup it is paused, the
disk is copied through NBD (the point the backup must equal), the tool is
started, and the writer is resumed as soon as the tool reports its snapshot
(``--json`` event), so writes race with the copy and must not leak into it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

import iotests
from iotests import REPO, qemu_img, qemu_io

SIZE = 64 << 20

# Days in the simulated month of backups: the 30 (the first full, incrementals, pushes
# on days 3, 10, 17, 24, differentials on days 5, 15 and 25; the 4 points kept by the prune come
# after the last differential, so pruning must merge their chain into one base). About 3 min
# per daemon for both modes; BLOCKD_BACKUP_TEST_DAYS (at least 20) shortens it for development.
MONTH_DAYS = int(os.environ.get("BLOCKD_BACKUP_TEST_DAYS", "30"))
assert MONTH_DAYS >= 20 and not any(d % 10 == 5 for d in range(MONTH_DAYS - 4, MONTH_DAYS)), \
    "BLOCKD_BACKUP_TEST_DAYS: at least 20, and no differential among the last 4 days"


def tool_binary() -> str:
    env = os.environ.get("BLOCKD_BACKUP")
    if env:
        return env
    p = REPO / "target" / "release" / "blockd-backup"
    assert p.exists(), "build it first: cargo build --release -p blockd-backup"
    return str(p)


def run_tool(*args: str, check: bool = True, env: Optional[dict] = None, timeout: float = 120) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e["BLOCKD_BACKUP_DAEMON"] = iotests.daemon_binary()
    if env:
        e.update(env)
    p = subprocess.run([tool_binary(), *args], capture_output=True, text=True, env=e, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"blockd-backup {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def events(out: str) -> List[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def digest_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def require_live_backup(d) -> None:
    """Fail, naming it, when the daemon lacks what live (fleecing) backups need."""
    schema = d.ok("query-qmp-schema")
    cmds = {e["name"] for e in schema if e.get("meta-type") == "command"}
    enums = [e for e in schema if e.get("meta-type") == "enum"]
    drivers = set()
    for e in enums:
        vals = e.get("values") or [m["name"] for m in e.get("members", [])]
        if "qcow2" in vals and "raw" in vals:
            drivers |= set(vals)
    missing = [c for c in ("blockdev-backup", "transaction") if c not in cmds]
    if "snapshot-access" not in drivers:
        missing.append("snapshot-access driver")
    assert not missing, f"{iotests.DAEMON_KIND} lacks {', '.join(missing)} (live backups need them)"


def backup_events(args: List[str], env: dict, writer=None, stderr: Optional[List[str]] = None) -> List[dict]:
    """Run the tool with `args` (which include --json) and return its events; resume `writer`
    once the snapshot is taken and pause it at the end. The run must succeed. Its standard
    error goes to `stderr` when given."""
    p = subprocess.Popen([tool_binary(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    evs = []
    assert p.stdout is not None
    for line in p.stdout:
        ev = json.loads(line)
        evs.append(ev)
        if ev["event"] == "snapshot" and writer:
            writer.resume()
    err = p.stderr.read() if p.stderr else ""
    if stderr is not None:
        stderr.append(err)
    rc = p.wait(120)
    if writer:
        writer.pause()
    assert rc == 0, f"{args} -> {rc}: {err}\n{evs}"
    return evs


def vm_in_mode(make_daemon, tmp_path: Path, mode: str) -> "Vm":
    """A Vm backed up "live" (through the daemon; skipped where it cannot) or "offline"."""
    vm = Vm(make_daemon, tmp_path)
    if mode == "live":
        require_live_backup(vm.d)
    vm.offline = mode == "offline"
    return vm


class Vm:
    """A daemon serving qcow2 disks, each with a writable NBD export w-NAME."""

    def __init__(self, make_daemon, tmp: Path, names=("disk0",)):
        self.tmp = tmp
        self.names = list(names)
        self.images = {}
        args: List[str] = []
        for n in self.names:
            img = tmp / f"{n}.qcow2"
            if not img.exists():
                qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE))
            self.images[n] = img
            args += ["--blockdev", f"driver=file,node-name={n}-f,filename={img}",
                     "--blockdev", f"driver=qcow2,node-name={n},file={n}-f"]
        self.d = make_daemon(*args, "--nbd-server", f"addr.type=unix,addr.path={tmp / 'nbd.sock'}", name="vm", monitors=2)
        self.nbd = tmp / "nbd.sock"
        for n in self.names:
            self.d.ok("block-export-add", type="nbd", id=f"w-{n}", node_name=n, name=f"w-{n}", writable=True)
        self.repo = tmp / "repo"
        self.offline = False

    def uri(self, n: str) -> str:
        return f"nbd+unix:///w-{n}?socket={self.nbd}"

    def base_args(self) -> List[str]:
        return ["--repo", str(self.repo), "--machine", "vm"]

    def src_args(self) -> List[str]:
        a = ["--qmp", str(self.d.monitor_paths[1]), "--nbd-socket", str(self.nbd)]
        for n in self.names:
            a += ["--disk", n]
        if self.offline:
            a.append("--offline")
        return a

    def frozen(self, n: str, dest: Path) -> str:
        qemu_img("convert", "-f", "raw", "-O", "raw", self.uri(n), str(dest))
        return digest_of(dest)

    def write_random(self, rng: random.Random, n: str, count: int = 6) -> None:
        cmds = []
        for _ in range(count):
            ln = rng.choice([512, 4096, 65536, 100000, 262144])
            off = rng.randrange(0, SIZE - ln) // 512 * 512
            kind = rng.random()
            if kind < 0.15:
                cmds += ["-c", f"write -z {off} {ln}"]
            else:
                cmds += ["-c", f"write -P {rng.randrange(1, 255)} {off} {ln}"]
        qemu_io("-f", "raw", *cmds, self.uri(n))

    def backup(self, cmd: str, extra=(), writer: Optional["Writer"] = None, env: Optional[dict] = None,
               stderr: Optional[List[str]] = None) -> List[dict]:
        """Run a backup with --json; resume `writer` once the snapshot is taken."""
        e = dict(os.environ, BLOCKD_BACKUP_DAEMON=iotests.daemon_binary(), **(env or {}))
        return backup_events([*self.base_args(), "--json", cmd, *self.src_args(), *extra], e, writer, stderr)


class Writer:
    """Random writes through NBD in a thread, paused and resumed by the test."""

    def __init__(self, vm: Vm, seed: int):
        self.vm = vm
        self.rng = random.Random(seed)
        self.go = threading.Event()
        self.idle = threading.Event()
        self.idle.set()
        self.stop = False
        self.error: Optional[BaseException] = None
        self.t = threading.Thread(target=self.loop, daemon=True)
        self.t.start()

    def loop(self) -> None:
        while not self.stop:
            if not self.go.wait(0.05):
                continue
            self.idle.clear()
            try:
                if self.go.is_set():
                    self.vm.write_random(self.rng, self.rng.choice(self.vm.names), 2)
            except BaseException as e:  # noqa: B902 - reported by the test
                self.error = e
                self.go.clear()
            finally:
                self.idle.set()

    def resume(self) -> None:
        self.go.set()

    def pause(self) -> None:
        self.go.clear()
        self.idle.wait(30)
        assert self.error is None, self.error

    def close(self) -> None:
        self.pause()
        self.stop = True
        self.t.join(10)


def restore_and_compare(vm: Vm, point: str, disk: str, want: str, tmp: Path) -> None:
    out = tmp / "restore.raw"
    run_tool(*vm.base_args(), "restore", "--at", point, "--disk", disk, "--to", str(out))
    got = digest_of(out)
    out.unlink()
    assert got == want, f"point {point} disk {disk} differs from its frozen copy"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["live", "offline"])
def test_month_of_backups_restores_every_point_exactly(make_daemon, tmp_path, mode):
    """live: the writer runs during each backup (fleecing); offline: it stays paused and the
    tool reads the disks directly (--offline), which needs no backup job in the daemon."""
    vm = vm_in_mode(make_daemon, tmp_path, mode)
    rng = random.Random(14)
    qemu_io("-f", "raw", "-c", "write -P 0x11 0 8M", "-c", "write -P 0x22 40M 4M", vm.uri("disk0"))
    writer = Writer(vm, 99)
    frozen: Dict[str, str] = {}
    kinds = []
    try:
        for day in range(MONTH_DAYS):
            vm.write_random(rng, "disk0")
            writer.resume()
            time.sleep(0.05)
            writer.pause()
            digest = vm.frozen("disk0", tmp_path / "frozen.raw")
            cmd = "full" if day == 0 else "diff" if day % 10 == 5 else "auto"
            extra = ["--push"] if day % 7 == 3 and mode == "live" else []
            evs = vm.backup(cmd, extra, writer=writer if mode == "live" else None)
            snap = [e for e in evs if e["event"] == "snapshot"]
            assert len(snap) == 1
            frozen[snap[0]["id"]] = digest
            kinds.append([e["kind"] for e in evs if e["event"] == "plan"][0])
    finally:
        writer.close()
    assert kinds[0] == "full" and kinds.count("full") == 1, kinds
    assert kinds[5] == "diff" and kinds[15] == "diff" and kinds[1] == "inc", kinds
    listed = json.loads(run_tool(*vm.base_args(), "--json", "list").stdout)
    assert [m["id"] for m in listed] == list(frozen)
    for point, want in frozen.items():
        restore_and_compare(vm, point, "disk0", want, tmp_path)
    # Every file of the latest point opens directly in qemu-img.
    latest = listed[-1]["disks"][0]["chain"][-1]["name"]
    qemu_img("check", "-q", str(vm.repo / latest))
    run_tool(*vm.base_args(), "verify", "--at", "latest")
    # Pruning merges the old incrementals into the base; the kept points stay exact.
    run_tool(*vm.base_args(), "prune", "--keep", "4")
    kept = json.loads(run_tool(*vm.base_args(), "--json", "list").stdout)
    assert [m["id"] for m in kept] == list(frozen)[-4:]
    assert len(kept[0]["disks"][0]["chain"]) == 1
    for m in kept:
        restore_and_compare(vm, m["id"], "disk0", frozen[m["id"]], tmp_path)
        run_tool(*vm.base_args(), "verify", "--at", m["id"])
    files = list((vm.repo / "vm" / "disks" / "disk0").iterdir())
    assert len(files) == len({f["name"] for m in kept for f in m["disks"][0]["chain"]})


def test_several_disks_are_taken_at_one_instant_and_one_full_falls_back(make_daemon, tmp_path):
    vm = Vm(make_daemon, tmp_path, names=("da", "db"))
    require_live_backup(vm.d)
    rng = random.Random(3)
    for n in vm.names:
        vm.write_random(rng, n)
    evs = vm.backup("full")
    ids = {e["id"] for e in evs if e["event"] == "snapshot"}
    assert len(ids) == 1
    for n in vm.names:
        vm.write_random(rng, n)
    # Lose db's bitmap: only db pays a full.
    bm = [b["name"] for b in vm.d.bitmaps("db") if b["name"].startswith("bb-")]
    assert len(bm) == 1
    vm.d.ok("block-dirty-bitmap-remove", node="db", name=bm[0])
    want = {n: vm.frozen(n, tmp_path / f"{n}.raw") for n in vm.names}
    evs = vm.backup("auto")
    plan = {e["disk"]: e for e in evs if e["event"] == "plan"}
    assert plan["da"]["kind"] == "inc" and plan["da"]["reason"] is None
    assert plan["db"]["kind"] == "full" and f"bitmap '{bm[0]}' is missing" in plan["db"]["reason"]
    for n in vm.names:
        restore_and_compare(vm, "latest", n, want[n], tmp_path)
    # An explicit inc is refused when a disk cannot do one (exit 3), nothing is changed.
    vm.d.ok("block-dirty-bitmap-remove", node="db", name=[b["name"] for b in vm.d.bitmaps("db") if b["name"].startswith("bb-")][0])
    p = run_tool(*vm.base_args(), "inc", *vm.src_args(), check=False)
    assert p.returncode == 3 and "cannot take inc backup of 'db'" in p.stderr, p.stderr
    assert len(json.loads(run_tool(*vm.base_args(), "--json", "list").stdout)) == 2


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["live", "offline"])
@pytest.mark.parametrize("phase", ["prepared", "snapshot", "copy", "written", "manifest"])
def test_tool_killed_at_every_phase_then_run_again(make_daemon, tmp_path, phase, mode):
    vm = vm_in_mode(make_daemon, tmp_path, mode)
    rng = random.Random(7)
    vm.write_random(rng, "disk0", 20)
    vm.backup("full")
    vm.write_random(rng, "disk0", 20)
    p = run_tool(*vm.base_args(), "auto", *vm.src_args(), check=False, env={"BLOCKD_BACKUP_DIE_AT": phase})
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr)
    recorded = len(json.loads(run_tool(*vm.base_args(), "--json", "list").stdout))
    assert recorded == (2 if phase == "manifest" else 1)
    vm.write_random(rng, "disk0", 5)
    want = vm.frozen("disk0", tmp_path / "f.raw")
    # As if a killed run had backed up eight disks: its last scratch image is left too.
    work = vm.repo / "vm" / ".work"
    work.mkdir(parents=True, exist_ok=True)
    (work / "bb-scratch-7.qcow2").write_bytes(b"left")
    evs = vm.backup("auto")
    plan = [e for e in evs if e["event"] == "plan"][0]
    assert plan["kind"] == "inc", plan
    assert not list(work.glob("bb-scratch-*")), list(work.iterdir())
    cleaned = [e["what"] for e in evs if e["event"] == "cleanup"]
    if phase in ("snapshot", "copy", "written") and mode == "live":
        assert any(w.startswith("job bb-") and w.endswith("-j0") for w in cleaned), cleaned
    if phase == "copy":
        assert any(w.startswith("export bb-") and w.endswith("-e0") for w in cleaned), cleaned
    if phase in ("snapshot", "copy", "written"):
        assert any(w.startswith("bitmap disk0/bb-") for w in cleaned), cleaned
    if phase in ("prepared", "snapshot", "copy", "written"):
        if mode == "live":
            assert any(w.startswith("node bb-") and w.endswith("-s0") for w in cleaned), cleaned
        assert any(w.endswith(".qcow2") for w in cleaned), cleaned  # the unrecorded partial file
    if phase == "written":
        # The point's chunk sums are written in place before the manifest, like its file.
        assert any(w.startswith("vm/sums/") and w.endswith(".bin") for w in cleaned), cleaned
    # Nothing unrecorded is left: every sums object is one a manifest names.
    named = {d["sums"] for f in (vm.repo / "vm" / "backups").glob("*.json")
             for d in json.loads(f.read_text())["disks"]}
    stored = {str(f.relative_to(vm.repo)) for f in (vm.repo / "vm" / "sums").rglob("*") if f.is_file()}
    assert stored == named, (stored, named)
    restore_and_compare(vm, "latest", "disk0", want, tmp_path)
    bms = [b["name"] for b in vm.d.bitmaps("disk0") if b["name"].startswith("bb-")]
    assert len(bms) == 2, bms  # the full's anchor and the latest backup's


@pytest.mark.timeout(300)
def test_daemon_killed_during_backup_costs_a_full_then_exact(make_daemon, tmp_path):
    vm = Vm(make_daemon, tmp_path)
    require_live_backup(vm.d)
    rng = random.Random(8)
    vm.write_random(rng, "disk0", 20)
    vm.backup("full")
    vm.write_random(rng, "disk0", 10)
    e = dict(os.environ, BLOCKD_BACKUP_DAEMON=iotests.daemon_binary(), BLOCKD_BACKUP_DIE_AT="")
    p = subprocess.Popen([tool_binary(), *vm.base_args(), "--json", "auto", *vm.src_args(), "--connections", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)
    assert p.stdout is not None
    for line in p.stdout:
        if json.loads(line)["event"] == "snapshot":
            vm.d.kill()
            break
    rc = p.wait(60)
    assert rc in (4, 5), (rc, p.stderr.read() if p.stderr else "")
    assert len(json.loads(run_tool(*vm.base_args(), "--json", "list").stdout)) == 1
    vm2 = Vm(make_daemon, tmp_path)
    want = vm2.frozen("disk0", tmp_path / "f.raw")
    evs = vm2.backup("auto")
    plan = [e for e in evs if e["event"] == "plan"][0]
    if iotests.is_qsd():
        # QSD stores persistent bitmaps only at a clean close: after a kill the bitmap is gone.
        assert plan["kind"] == "full" and "missing" in plan["reason"], plan
    restore_and_compare(vm2, "latest", "disk0", want, tmp_path)
    run_tool(*vm2.base_args(), "verify")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["live", "offline"])
def test_repository_disk_full_fails_cleanly_then_succeeds(make_daemon, tmp_path, mode):
    vm = vm_in_mode(make_daemon, tmp_path, mode)
    rng = random.Random(9)
    vm.write_random(rng, "disk0", 10)
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(small)], check=True)
    try:
        qemu_io("-f", "raw", "-c", "write -P 0x5a 0 16M", vm.uri("disk0"))
        args = ["--repo", str(small / "repo"), "--machine", "vm"]
        p = run_tool(*args, "full", *vm.src_args(), check=False)
        assert p.returncode == 6, (p.returncode, p.stderr)
        assert "No space left on device" in p.stderr, p.stderr
        errors = [ln for ln in p.stderr.splitlines() if ln.startswith("blockd-backup:")]
        assert len(errors) == 1 and p.stderr.endswith(errors[0] + "\n"), p.stderr  # one line, last
        assert json.loads(run_tool(*args, "--json", "list").stdout) == []
        assert not [b for b in vm.d.bitmaps("disk0") if b["name"].startswith("bb-")]
        assert not list((small / "repo" / "vm" / "disks").rglob("*.qcow2"))
        subprocess.run(["mount", "-o", "remount,size=64m", str(small)], check=True)
        want = vm.frozen("disk0", tmp_path / "f.raw")
        run_tool(*args, "full", *vm.src_args())
        out = tmp_path / "r.raw"
        run_tool(*args, "restore", "--to", str(out))
        assert digest_of(out) == want
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_stopped_disk_backs_up_with_its_persistent_bitmaps(tmp_path):
    img = tmp_path / "stopped.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE))
    qemu_io("-f", "qcow2", "-c", "write -P 0x31 1M 2M", str(img))
    repo = ["--repo", str(tmp_path / "repo"), "--machine", "pc"]
    evs = events(run_tool(*repo, "--json", "auto", "--image", str(img)).stdout)
    assert [e["kind"] for e in evs if e["event"] == "plan"] == ["full"]
    info = json.loads(qemu_img("info", "--output=json", str(img)))
    names = [b["name"] for b in info["format-specific"]["data"].get("bitmaps", [])]
    assert len(names) == 1 and names[0].startswith("bb-"), names
    qemu_io("-f", "qcow2", "-c", "write -P 0x32 2M 64k", "-c", "write -z 1M 4k", str(img))
    evs = events(run_tool(*repo, "--json", "auto", "--image", str(img)).stdout)
    plan = [e for e in evs if e["event"] == "plan"][0]
    assert plan["kind"] == "inc" and plan["estimate"] == 2 * 65536, plan
    raw = tmp_path / "want.raw"
    qemu_img("convert", "-O", "raw", str(img), str(raw))
    out = tmp_path / "r.raw"
    run_tool(*repo, "restore", "--to", str(out))
    assert digest_of(out) == digest_of(raw)
    run_tool(*repo, "restore", "--to", str(tmp_path / "r.qcow2"), "--format", "qcow2")
    qemu_img("compare", "-f", "qcow2", "-F", "raw", str(tmp_path / "r.qcow2"), str(raw))
    run_tool(*repo, "verify")


def test_mount_serves_a_point_and_restore_writes_onto_a_live_node(make_daemon, tmp_path):
    img = tmp_path / "m.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE))
    qemu_io("-f", "qcow2", "-c", "write -P 0x41 0 1M", str(img))
    repo = ["--repo", str(tmp_path / "repo"), "--machine", "pc"]
    run_tool(*repo, "full", "--image", str(img))
    want = tmp_path / "want.raw"
    qemu_img("convert", "-O", "raw", str(img), str(want))
    qemu_io("-f", "qcow2", "-c", "write -P 0x42 0 1M", str(img))
    run_tool(*repo, "inc", "--image", str(img))
    # A file of the user's at the socket path is refused and left alone.
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    r = run_tool(*repo, "mount", "--at=-1", "--socket", str(notes), check=False)
    assert r.returncode == 2 and "not a socket" in r.stderr, r
    assert notes.read_text() == "mine"
    sock = tmp_path / "mnt.sock"
    e = dict(os.environ, BLOCKD_BACKUP_DAEMON=iotests.daemon_binary())
    p = subprocess.Popen([tool_binary(), *repo, "--json", "mount", "--at=-1", "--socket", str(sock)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)
    try:
        assert p.stdout is not None
        ev = json.loads(p.stdout.readline())
        assert ev["event"] == "mounted", ev
        qemu_img("compare", "-f", "raw", "-F", "raw", ev["uri"], str(want))
        r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 4k", ev["uri"]], capture_output=True, text=True)
        assert "Permission denied" in r.stdout + r.stderr or r.returncode != 0, r
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
    # Restore the older point onto a live node over NBD.
    vm = Vm(make_daemon, tmp_path, names=("live",))
    run_tool(*repo, "restore", "--at=-1", "--nbd-socket", str(vm.nbd), "--export", "w-live")
    assert vm.frozen("live", tmp_path / "l.raw") == digest_of(want)


def test_verify_catches_a_damaged_file_and_cli_is_documented(tmp_path):
    img = tmp_path / "v.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE))
    qemu_io("-f", "qcow2", "-c", "write -P 0x51 0 1M", str(img))
    repo = ["--repo", str(tmp_path / "repo"), "--machine", "pc"]
    run_tool(*repo, "full", "--image", str(img))
    run_tool(*repo, "verify")
    f = next((tmp_path / "repo" / "pc" / "disks").rglob("*.qcow2"))
    with open(f, "r+b") as fh:
        fh.seek(f.stat().st_size - 4096)
        b = fh.read(1)
        fh.seek(f.stat().st_size - 4096)
        fh.write(bytes([b[0] ^ 0xFF]))
    p = run_tool(*repo, "verify", check=False)
    assert p.returncode == 7 and "checksum mismatch" in p.stderr, p.stderr
    for cmd in ["full", "inc", "diff", "auto", "list", "verify", "restore", "mount", "prune"]:
        h = run_tool(cmd, "--help")
        assert "Usage: blockd-backup" in h.stdout
    assert "Exit codes" in run_tool("--help").stdout
    assert run_tool("frobnicate", check=False).returncode == 2
    p = run_tool(*repo, "inc", "--image", str(tmp_path / "nosuch.qcow2"), check=False)
    assert p.returncode == 6 and p.stderr.count("\n") == 1 and p.stderr.startswith("blockd-backup: "), p.stderr


def test_persistent_bitmap_removed_before_it_was_stored(make_daemon, tmp_path):
    """The tool retires a persistent bitmap that may never have reached the image file;
    QEMU removes it without error (blockd used to fail with ENOENT)."""
    img = tmp_path / "p.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE))
    d = make_daemon("--blockdev", f"driver=file,node-name=f,filename={img}",
                    "--blockdev", "driver=qcow2,node-name=q,file=f")
    d.ok("block-dirty-bitmap-add", node="q", name="p1", persistent=True)
    assert d.cmd("block-dirty-bitmap-remove", node="q", name="p1") == {"return": {}}
    assert d.bitmaps("q") == []
    d.shutdown()
    info = json.loads(qemu_img("info", "--output=json", str(img)))
    assert "bitmaps" not in info["format-specific"]["data"]


def test_two_repositories_on_one_disk_keep_their_own_bitmaps(make_daemon, tmp_path):
    vm = Vm(make_daemon, tmp_path)
    vm.offline = True
    rng = random.Random(11)
    other = ["--repo", str(tmp_path / "other"), "--machine", "vm"]
    vm.write_random(rng, "disk0")
    vm.backup("full")
    run_tool(*other, "full", *vm.src_args())
    vm.write_random(rng, "disk0")
    want = vm.frozen("disk0", tmp_path / "f.raw")
    evs = vm.backup("auto")
    assert [e["kind"] for e in evs if e["event"] == "plan"] == ["inc"]
    assert not [e for e in evs if e["event"] == "cleanup"], evs
    evs = events(run_tool(*other, "--json", "auto", *vm.src_args()).stdout)
    assert [e["kind"] for e in evs if e["event"] == "plan"] == ["inc"]
    restore_and_compare(vm, "latest", "disk0", want, tmp_path)
    out = tmp_path / "o.raw"
    run_tool(*other, "restore", "--to", str(out))
    assert digest_of(out) == want


@pytest.mark.timeout(300)
@pytest.mark.parametrize("phase", ["snapshot", "copy", "written"])
def test_stopped_disk_backup_killed_then_run_again(tmp_path, phase):
    """The daemon a killed run started is found and quit by the next run (so the image lock
    is free), which removes the leftovers and takes a normal incremental."""
    img = tmp_path / "s.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE))
    qemu_io("-f", "qcow2", "-c", "write -P 0x61 0 4M", str(img))
    repo = ["--repo", str(tmp_path / "repo"), "--machine", "pc"]
    run_tool(*repo, "full", "--image", str(img))
    qemu_io("-f", "qcow2", "-c", "write -P 0x62 1M 1M", str(img))
    e = dict(os.environ, BLOCKD_BACKUP_DAEMON=iotests.daemon_binary(), BLOCKD_BACKUP_DIE_AT=phase)
    p = subprocess.Popen([tool_binary(), *repo, "auto", "--image", str(img)], env=e,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert p.wait(60) == -signal.SIGKILL
    evs = events(run_tool(*repo, "--json", "auto", "--image", str(img)).stdout)
    plan = [e for e in evs if e["event"] == "plan"][0]
    assert plan["kind"] == "inc", plan
    cleaned = [e["what"] for e in evs if e["event"] == "cleanup"]
    assert any(w.startswith("daemon left by run") for w in cleaned), cleaned
    assert any(w.startswith("bitmap ") for w in cleaned), cleaned
    raw = tmp_path / "want.raw"
    qemu_img("convert", "-O", "raw", str(img), str(raw))
    out = tmp_path / "r.raw"
    run_tool(*repo, "restore", "--to", str(out))
    assert digest_of(out) == digest_of(raw)


def test_disk_added_later_gets_a_full_while_the_others_stay_incremental(make_daemon, tmp_path):
    vm = Vm(make_daemon, tmp_path, names=("da", "db"))
    vm.offline = True
    rng = random.Random(12)
    for n in vm.names:
        vm.write_random(rng, n)
    src = ["--qmp", str(vm.d.monitor_paths[1]), "--nbd-socket", str(vm.nbd), "--offline"]
    run_tool(*vm.base_args(), "full", *src, "--disk", "da")
    vm.write_random(rng, "da")
    want = {n: vm.frozen(n, tmp_path / f"{n}.raw") for n in vm.names}
    evs = vm.backup("auto")
    plan = {e["disk"]: e for e in evs if e["event"] == "plan"}
    assert plan["da"]["kind"] == "inc" and plan["da"]["reason"] is None, plan
    assert plan["db"]["kind"] == "full" and plan["db"]["reason"] == "no earlier backup of this disk", plan
    for n in vm.names:
        restore_and_compare(vm, "latest", n, want[n], tmp_path)


def test_copies_over_several_connections_restore_exactly(make_daemon, tmp_path):
    """More than 64 MiB to copy goes over several NBD connections, each with a reader and a
    writer thread and one writer to the file at a time: a full and an incremental (with zeroed
    ranges, written as zero clusters) restore exactly and verify."""
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "disk0.qcow2"), str(200 << 20))
    vm = Vm(make_daemon, tmp_path)
    require_live_backup(vm.d)
    qemu_io("-f", "raw", "-c", "write -P 0x31 0 70M", "-c", "write -P 0x32 72M 60M",
            "-c", "write -P 0x33 140M 50M", "-c", "write -z 100M 4M", vm.uri("disk0"))
    env = {"BLOCKD_BACKUP_DEBUG": "1"}
    want = {}
    for cmd, conns in (("full", 3), ("inc", 2)):
        if cmd == "inc":
            qemu_io("-f", "raw", "-c", "write -P 0x41 1M 60M", "-c", "write -z 61M 10M",
                    "-c", "write -P 0x42 90M 40M", "-c", "write -z 180M 8M", vm.uri("disk0"))
        digest = vm.frozen("disk0", tmp_path / "frozen.raw")
        err: List[str] = []
        evs = vm.backup(cmd, ["--connections", "3"], env=env, stderr=err)
        assert [e["kind"] for e in evs if e["event"] == "plan"] == [cmd]
        assert f"over {conns} connection(s)" in err[0], err[0]
        want[[e["id"] for e in evs if e["event"] == "snapshot"][0]] = digest
    for point, digest in want.items():
        restore_and_compare(vm, point, "disk0", digest, tmp_path)
    run_tool(*vm.base_args(), "verify", "--at", "latest")

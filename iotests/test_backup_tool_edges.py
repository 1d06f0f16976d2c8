"""blockd-backup on disks, repositories and daemons out of the ordinary, against the daemon
under test (blockd and QSD alike, ``IOTESTS_DAEMON``): a disk on a backing file, a read-only
disk, a relative repository path, bitmaps that cannot be retired, a push followed while its
job writes, a leftover daemon that does not answer. Helpers come from test_backup_tool.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
from typing import Dict, List

import pytest

import iotests
from iotests import qemu_img, qemu_io
from test_backup_tool import (SIZE, Vm, Writer, digest_of, events, require_live_backup, restore_and_compare,
                              run_tool, tool_binary, vm_in_mode)


@pytest.mark.parametrize("mode", ["pull", "push", "offline"])
def test_a_disk_on_a_backing_file_is_backed_up_whole(make_daemon, tmp_path, mode):
    """A disk whose data partly lives in its backing file (an overlay on a template): QSD's
    snapshot-access reports what only the backing file holds as a hole without the zero flag,
    so a full that skipped holes lost it (and verified, since its digest is of what it read).
    Every point must restore to the disk's whole content."""
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), str(SIZE))
    qemu_io("-f", "qcow2", "-c", "write -P 0xab 0 8M", "-c", "write -P 0x12 40M 1M", str(base))
    top = tmp_path / "disk0.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    qemu_io("-f", "qcow2", "-c", "write -P 0xcd 16M 1M", "-c", "write -z 40M 64k", str(top))
    vm = vm_in_mode(make_daemon, tmp_path, "offline" if mode == "offline" else "live")
    extra = ["--push"] if mode == "push" else []
    frozen: Dict[str, str] = {}
    for cmd in ("full", "inc"):
        if cmd == "inc":
            qemu_io("-f", "raw", "-c", "write -P 0xee 2M 64k", vm.uri("disk0"))
        digest = vm.frozen("disk0", tmp_path / "frozen.raw")
        evs = vm.backup(cmd, extra)
        frozen[[e for e in evs if e["event"] == "snapshot"][0]["id"]] = digest
    for point, want in frozen.items():
        restore_and_compare(vm, point, "disk0", want, tmp_path)
        run_tool(*vm.base_args(), "verify", "--at", point)


@pytest.mark.parametrize("mode", ["live", "offline"])
def test_a_read_only_disk_is_backed_up_beside_a_writable_one(make_daemon, tmp_path, mode):
    """A read-only qcow2 disk cannot store a bitmap: its tracking bitmap is not persistent
    (blockd refuses a persistent one there, which used to fail the whole run), and both disks
    are backed up, then incrementally."""
    args: List[str] = []
    for n, pat in (("da", 0x1a), ("db", 0x1b)):
        img = tmp_path / f"{n}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE))
        qemu_io("-f", "qcow2", "-c", f"write -P {pat} 1M 2M", str(img))
        ro = ",read-only=on" if n == "db" else ""
        args += ["--blockdev", f"driver=file,node-name={n}-f,filename={img}{ro}",
                 "--blockdev", f"driver=qcow2,node-name={n},file={n}-f{ro}"]
    d = make_daemon(*args, "--nbd-server", f"addr.type=unix,addr.path={tmp_path / 'nbd.sock'}",
                    name="vm", monitors=2)
    if mode == "live":
        require_live_backup(d)
    d.ok("block-export-add", type="nbd", id="w-da", node_name="da", name="w-da", writable=True)
    repo = ["--repo", str(tmp_path / "repo"), "--machine", "vm"]
    src = ["--qmp", str(d.monitor_paths[1]), "--nbd-socket", str(tmp_path / "nbd.sock"),
           "--disk", "da", "--disk", "db"] + (["--offline"] if mode == "offline" else [])
    kinds = []
    for cmd in ("auto", "auto"):
        out = run_tool(*repo, "--json", cmd, *src).stdout
        kinds.append(sorted((e["disk"], e["kind"]) for e in events(out) if e["event"] == "plan"))
        qemu_io("-f", "raw", "-c", "write -P 0x2a 5M 64k", f"nbd+unix:///w-da?socket={tmp_path / 'nbd.sock'}")
    assert kinds == [[("da", "full"), ("db", "full")], [("da", "inc"), ("db", "inc")]], kinds
    run_tool(*repo, "verify", "--at", "latest")


def test_bitmaps_not_retired_after_the_manifest_cost_nothing(make_daemon, tmp_path):
    """Retiring the old bitmaps fails after the manifest is written (here: a differential
    retires the incremental's bitmap, which an export holds busy): the run succeeds with a
    warning and keeps the bitmap its manifest records (it used to roll back and remove it, so
    the next `inc` was refused); the next run retires the leftover and stays incremental."""
    vm = Vm(make_daemon, tmp_path)
    require_live_backup(vm.d)
    frozen: Dict[str, str] = {}

    def backup(cmd: str) -> List[dict]:
        qemu_io("-f", "raw", "-c", f"write -P {len(frozen) + 1} {len(frozen)}M 64k", vm.uri("disk0"))
        digest = vm.frozen("disk0", tmp_path / "frozen.raw")
        evs = vm.backup(cmd)
        frozen[[e for e in evs if e["event"] == "snapshot"][0]["id"]] = digest
        return evs

    backup("full")
    backup("inc")
    held = json.loads(run_tool(*vm.base_args(), "--json", "list").stdout)[-1]["disks"][0]["bitmap"]
    vm.d.ok("block-export-add", type="nbd", id="hold", node_name="disk0", name="hold",
            writable=True, bitmaps=[held])
    evs = backup("diff")
    assert [e for e in evs if e["event"] == "warning"], evs
    names = {b["name"] for n in vm.d.ok("query-named-block-nodes") if n["node-name"] == "disk0"
             for b in n.get("dirty-bitmaps", [])}
    latest = json.loads(run_tool(*vm.base_args(), "--json", "list").stdout)[-1]
    assert latest["disks"][0]["bitmap"] in names and held in names, names
    vm.d.ok("block-export-del", id="hold")
    deadline = time.time() + 10
    while any(e["id"] == "hold" for e in vm.d.ok("query-block-exports")) and time.time() < deadline:
        time.sleep(0.05)
    evs = backup("inc")
    assert [e["kind"] for e in evs if e["event"] == "plan"] == ["inc"], evs
    names = {b["name"] for n in vm.d.ok("query-named-block-nodes") if n["node-name"] == "disk0"
             for b in n.get("dirty-bitmaps", [])}
    assert held not in names, names
    for point, want in frozen.items():
        restore_and_compare(vm, point, "disk0", want, tmp_path)


@pytest.mark.parametrize("mode", [[], ["--push"], ["--offline"]], ids=["pull", "push", "offline"])
def test_a_relative_repository_path_works(make_daemon, tmp_path, mode):
    """The tool runs in another folder than the daemon and names the repository relatively:
    every path it sends the daemon (scratch image, push target, its own NBD server's socket)
    must still be right (they were relative, resolved against the daemon's folder)."""
    img = tmp_path / "disk0.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE))
    qemu_io("-f", "qcow2", "-c", "write -P 0x42 3M 1M", str(img))
    raw = tmp_path / "frozen.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(img), str(raw))
    want = digest_of(raw)
    d = make_daemon("--blockdev", f"driver=file,node-name=f0,filename={img}",
                    "--blockdev", "driver=qcow2,node-name=disk0,file=f0", name="vm", monitors=2)
    if "--offline" not in mode:
        require_live_backup(d)
    here = tmp_path / "cwd"
    here.mkdir()
    repo = ["--repo", "rel-repo", "--machine", "vm"]
    # No --nbd-socket: the tool starts the daemon's NBD server on a socket in the repository
    # (a push too: it follows its target, BLOCKD_BACKUP_FOLLOW_MIN=0).
    e = dict(os.environ, BLOCKD_BACKUP_DAEMON=iotests.daemon_binary(), BLOCKD_BACKUP_FOLLOW_MIN="0",
             BLOCKD_BACKUP_DEBUG="1")
    p = subprocess.run([tool_binary(), *repo, "full", "--qmp", str(d.monitor_paths[1]), "--disk", "disk0", *mode],
                       cwd=here, capture_output=True, text=True, env=e, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "not followed" not in p.stderr, p.stderr
    out = tmp_path / "restore.raw"
    p = subprocess.run([tool_binary(), *repo, "restore", "--at", "latest", "--disk", "disk0", "--to", str(out)],
                       cwd=here, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert digest_of(out) == want


def test_push_hashes_the_new_file_while_the_job_writes_it(make_daemon, tmp_path):
    """A push big enough (here: any, BLOCKD_BACKUP_FOLLOW_MIN=0) exports its target read-only
    and flushes it over NBD while the job runs, hashing the data clusters the file's L2 tables
    name (follow.rs); BLOCKD_BACKUP_FOLLOW_LAST adds two rounds after the job, so every data
    cluster is hashed that way whatever the timing. With a writer racing the job, the recorded
    checksums must still be the files' (verify) and the points exact (restore)."""
    vm = Vm(make_daemon, tmp_path)
    require_live_backup(vm.d)
    rnd = tmp_path / "random.raw"
    rnd.write_bytes(random.Random(3).randbytes(SIZE))
    qemu_img("convert", "-n", "-f", "raw", "-O", "raw", str(rnd), vm.uri("disk0"))
    rnd.unlink()
    env = {"BLOCKD_BACKUP_FOLLOW_MIN": "0", "BLOCKD_BACKUP_FOLLOW_LAST": "1", "BLOCKD_BACKUP_DEBUG": "1"}
    writer = Writer(vm, 5)
    frozen: Dict[str, str] = {}
    hashed = []
    try:
        for cmd in ("full", "inc"):
            if cmd == "inc":
                qemu_io("-f", "raw", "-c", "write -P 0x33 1M 3M", vm.uri("disk0"))
            digest = vm.frozen("disk0", tmp_path / "frozen.raw")
            err: List[str] = []
            evs = vm.backup(cmd, ["--push"], writer=writer, env=env, stderr=err)
            frozen[[e for e in evs if e["event"] == "snapshot"][0]["id"]] = digest
            found = [ln for ln in err[0].splitlines() if "hashed during the job" in ln]
            assert len(found) == 1, err[0]
            hashed.append(int(found[0].split(": ")[-1].split()[0]))
    finally:
        writer.close()
    # The full's file holds every chunk as data; the incremental at least the 3 MiB written.
    assert hashed[0] == SIZE, hashed
    assert hashed[1] >= 3 << 20, hashed
    for point, want in frozen.items():
        restore_and_compare(vm, point, "disk0", want, tmp_path)
        run_tool(*vm.base_args(), "verify", "--at", point)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("phase", ["prepared", "snapshot", "written"])
def test_a_followed_push_killed_then_run_again(make_daemon, tmp_path, phase):
    """A followed push exports its target before the transaction that starts its job; killed
    before the snapshot or after it, the run leaves that export (and the target node, the
    partial file, maybe the job and bitmaps; after the job, the file). The next push removes them as
    its own leftovers, takes an incremental, and both points restore exactly; no export of the
    tool is left on the daemon."""
    vm = Vm(make_daemon, tmp_path)
    require_live_backup(vm.d)
    rng = random.Random(11)
    vm.write_random(rng, "disk0", 20)
    env = {"BLOCKD_BACKUP_FOLLOW_MIN": "0"}
    first = vm.frozen("disk0", tmp_path / "f1.raw")
    evs = vm.backup("full", ["--push"], env=env)
    point1 = [e for e in evs if e["event"] == "snapshot"][0]["id"]
    vm.write_random(rng, "disk0", 20)
    p = run_tool(*vm.base_args(), "inc", *vm.src_args(), "--push", check=False,
                 env={**env, "BLOCKD_BACKUP_DIE_AT": phase})
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr)
    left = [e["id"] for e in vm.d.ok("query-block-exports") if e["id"].startswith("bb-")]
    # The export goes once the job is done (before "written").
    assert len(left) == (0 if phase == "written" else 1) and all(x.endswith("-e0") for x in left), left
    vm.write_random(rng, "disk0", 5)
    second = vm.frozen("disk0", tmp_path / "f2.raw")
    evs = vm.backup("inc", ["--push"], env=env)
    point2 = [e for e in evs if e["event"] == "snapshot"][0]["id"]
    cleaned = [e["what"] for e in evs if e["event"] == "cleanup"]
    if phase != "written":
        assert any(w.startswith("export bb-") and w.endswith("-e0") for w in cleaned), cleaned
        assert any(w.startswith("node bb-") and w.endswith("-t0") for w in cleaned), cleaned
    assert any(w.endswith(".qcow2") for w in cleaned), cleaned  # the unrecorded file
    assert not [e["id"] for e in vm.d.ok("query-block-exports") if e["id"].startswith("bb-")]
    assert not [j["id"] for j in vm.d.ok("query-jobs") if j["id"].startswith("bb-")]
    restore_and_compare(vm, point1, "disk0", first, tmp_path)
    restore_and_compare(vm, point2, "disk0", second, tmp_path)
    run_tool(*vm.base_args(), "verify", "--at", point2)


class RefusingMonitor:
    """A QMP proxy on `path` in front of the daemon's monitor `upstream` that answers every
    `transaction` with a GenericError itself (after the replies to the commands sent before
    it), as a daemon refusing the snapshot would; everything else passes through."""

    def __init__(self, upstream: str, path: str):
        self.upstream, self.path = upstream, path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.refused = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def wait_closed(self):
        """Wait until the client left and the upstream connection is shut (a QSD monitor
        serves one client at a time)."""
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()
        self.listener.close()

    def _serve(self):
        client, _ = self.listener.accept()
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        up.connect(self.upstream)
        lock = threading.Condition()
        pending = [0]  # commands forwarded and not answered yet

        def down():
            buf = b""
            while True:
                try:
                    data = up.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    msg = json.loads(line)
                    with lock:
                        try:
                            client.sendall(line + b"\n")
                        except OSError:
                            return
                        if "return" in msg or "error" in msg:
                            pending[0] -= 1
                            lock.notify_all()

        threading.Thread(target=down, daemon=True).start()
        buf = b""
        while True:
            data = client.recv(65536)
            if not data:
                up.shutdown(socket.SHUT_RDWR)
                up.close()
                client.close()
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not line.strip():
                    continue
                cmd = json.loads(line)
                with lock:
                    if cmd.get("execute") == "transaction":
                        lock.wait_for(lambda: pending[0] == 0, timeout=10)
                        self.refused += 1
                        err = {"error": {"class": "GenericError", "desc": "refused by the test"}}
                        if "id" in cmd:
                            err["id"] = cmd["id"]
                        client.sendall(json.dumps(err).encode() + b"\n")
                    else:
                        pending[0] += 1
                        up.sendall(line + b"\n")


def test_a_followed_push_whose_snapshot_is_refused_leaves_nothing(make_daemon, tmp_path):
    """The follower's export exists before the transaction that starts the job; a daemon
    refusing that transaction must leave no export, node, job, bitmap or repository file,
    and the next run works."""
    vm = Vm(make_daemon, tmp_path)
    require_live_backup(vm.d)
    vm.write_random(random.Random(5), "disk0", 10)
    env = {"BLOCKD_BACKUP_FOLLOW_MIN": "0"}
    vm.backup("full", ["--push"], env=env)
    before = {b["name"] for b in vm.d.bitmaps("disk0")}
    files = sorted(str(f) for f in (vm.repo / "vm").rglob("*") if f.is_file())
    proxy = RefusingMonitor(str(vm.d.monitor_paths[1]), str(tmp_path / "refusing.sock"))
    src = ["--qmp", proxy.path, "--nbd-socket", str(vm.nbd), "--disk", "disk0", "--push"]
    p = run_tool(*vm.base_args(), "inc", *src, check=False, env=env)
    assert proxy.refused == 1 and p.returncode != 0, (proxy.refused, p.returncode, p.stderr)
    assert "refused by the test" in p.stderr, p.stderr
    proxy.wait_closed()
    assert not [e["id"] for e in vm.d.ok("query-block-exports") if e["id"].startswith("bb-")]
    assert not [n["node-name"] for n in vm.d.ok("query-named-block-nodes", flat=True)
                if n["node-name"].startswith("bb-")]
    assert not [j["id"] for j in vm.d.ok("query-jobs") if j["id"].startswith("bb-")]
    assert {b["name"] for b in vm.d.bitmaps("disk0")} == before
    assert sorted(str(f) for f in (vm.repo / "vm").rglob("*") if f.is_file()) == files
    want = vm.frozen("disk0", tmp_path / "f.raw")
    evs = vm.backup("inc", ["--push"], env=env)
    assert not [e for e in evs if e["event"] == "cleanup"], evs
    point = [e for e in evs if e["event"] == "snapshot"][0]["id"]
    restore_and_compare(vm, point, "disk0", want, tmp_path)


def test_a_hung_daemon_left_by_a_killed_run_is_ended(tmp_path):
    """The daemon a killed run left does not answer QMP (stopped here with SIGSTOP): the next
    run ends it by signal (SIGCONT and SIGTERM: a clean close), as the process its pidfile
    names and whose command line names the run's QMP socket, instead of forgetting it while it
    keeps the image locked."""
    img = tmp_path / "s.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE))
    qemu_io("-f", "qcow2", "-c", "write -P 0x61 0 4M", str(img))
    repo = ["--repo", str(tmp_path / "repo"), "--machine", "pc"]
    run_tool(*repo, "full", "--image", str(img))
    e = dict(os.environ, BLOCKD_BACKUP_DAEMON=iotests.daemon_binary(), BLOCKD_BACKUP_DIE_AT="snapshot")
    p = subprocess.Popen([tool_binary(), *repo, "auto", "--image", str(img)], env=e,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert p.wait(60) == -signal.SIGKILL
    pidfiles = list((tmp_path / "repo" / "pc" / ".work").glob("bb-daemon-*.pid"))
    assert len(pidfiles) == 1, pidfiles
    left = int(pidfiles[0].read_text().strip())
    os.kill(left, signal.SIGSTOP)
    try:
        evs = events(run_tool(*repo, "--json", "auto", "--image", str(img)).stdout)
    finally:
        try:
            os.kill(left, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cleaned = [e["what"] for e in evs if e["event"] == "cleanup"]
    assert any(w.endswith("(not answering: terminated)") for w in cleaned), cleaned
    raw = tmp_path / "want.raw"
    qemu_img("convert", "-O", "raw", str(img), str(raw))
    out = tmp_path / "r.raw"
    run_tool(*repo, "restore", "--to", str(out))
    assert digest_of(out) == digest_of(raw)
    # Continued and terminated (not killed), it closed cleanly and stored its bitmaps.
    plan = [e for e in evs if e["event"] == "plan"][0]
    assert plan["kind"] == "inc", plan


@pytest.mark.timeout(300)
def test_a_killed_push_leaves_no_server_in_the_way(make_daemon, tmp_path):
    """A push the tool follows starts the daemon's NBD server on its own socket when the user
    named none; killed, the run leaves that server running. The next run recognises it (a
    probe export reachable through the socket) and takes it as its own, instead of refusing
    every later pull with "the daemon already runs an NBD server"."""
    img = tmp_path / "disk0.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE))
    qemu_io("-f", "qcow2", "-c", "write -P 0x33 0 6M", str(img))
    d = make_daemon("--blockdev", f"driver=file,node-name=f0,filename={img}",
                    "--blockdev", "driver=qcow2,node-name=disk0,file=f0", name="vm", monitors=2)
    require_live_backup(d)
    repo = ["--repo", str(tmp_path / "repo"), "--machine", "vm"]
    src = ["--qmp", str(d.monitor_paths[1]), "--disk", "disk0"]
    e = {"BLOCKD_BACKUP_FOLLOW_MIN": "0", "BLOCKD_BACKUP_DEBUG": "1"}
    p = run_tool(*repo, "full", "--push", *src, check=False, env={**e, "BLOCKD_BACKUP_DIE_AT": "written"})
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr)
    assert (tmp_path / "repo" / "vm" / ".work" / "bb-nbd.sock").exists()
    for extra in ([], ["--push"]):
        p = run_tool(*repo, "--json", "full", *src, *extra, env=e)
        assert "not followed" not in p.stderr, p.stderr
    # The runs stopped the server they took over: the daemon has none left.
    d.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(tmp_path / "check.sock")}})
    d.ok("nbd-server-stop")
    raw = tmp_path / "want.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", "-U", str(img), str(raw))
    out = tmp_path / "r.raw"
    run_tool(*repo, "restore", "--to", str(out))
    assert digest_of(out) == digest_of(raw)


def test_restore_onto_a_live_node_waits_for_a_pending_prune(make_daemon, tmp_path):
    """While an interrupted prune is pending (its journal exists) a kept point's base may
    already be merged: restoring onto a live node is refused, naming the prune, and nothing is
    written; once a prune finishes it, the restore goes through."""
    vm = Vm(make_daemon, tmp_path, names=("disk0", "live"))
    vm.names = ["disk0"]  # backed up; "live" is the node restored onto
    vm.offline = True
    for i in range(3):
        qemu_io("-f", "raw", "-c", f"write -P {0x40 + i} {i}M 1M", vm.uri("disk0"))
        vm.backup("full" if i == 0 else "inc")
    want = vm.frozen("disk0", tmp_path / "want.raw")
    p = run_tool(*vm.base_args(), "prune", "--keep", "1", check=False, env={"BLOCKD_BACKUP_DIE_AT": "prune-commit"})
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr)
    live = vm
    before = live.frozen("live", tmp_path / "before.raw")
    r = run_tool(*vm.base_args(), "restore", "--at", "latest", "--nbd-socket", str(live.nbd), "--export", "w-live",
                 check=False)
    assert r.returncode == 3 and "prune is pending" in r.stderr, r
    assert live.frozen("live", tmp_path / "after.raw") == before
    run_tool(*vm.base_args(), "prune", "--keep", "1")
    run_tool(*vm.base_args(), "restore", "--at", "latest", "--nbd-socket", str(live.nbd), "--export", "w-live")
    assert live.frozen("live", tmp_path / "l.raw") == want


@pytest.mark.timeout(120)
def test_a_push_whose_follower_cannot_connect_still_completes(make_daemon, tmp_path):
    """The daemon's NBD server takes one client and another holds it: the follower's
    connection waits in the listen backlog and gets no handshake. Its exchanges time out
    (5 s), so the push ends with the file hashed after the job, instead of hanging; and with
    BLOCKD_BACKUP_NO_FOLLOW nothing is followed at all."""
    vm = Vm(make_daemon, tmp_path)
    require_live_backup(vm.d)
    vm.d.ok("nbd-server-stop")
    sock = tmp_path / "one.sock"
    vm.d.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}}, max_connections=1)
    vm.d.ok("block-export-add", type="nbd", id="w-disk0", node_name="disk0", name="w-disk0", writable=True)
    vm.nbd = sock
    qemu_io("-f", "raw", "-c", "write -P 0x21 0 8M", vm.uri("disk0"))
    want = vm.frozen("disk0", tmp_path / "frozen.raw")
    holder = socket.socket(socket.AF_UNIX)
    holder.connect(str(sock))
    holder.recv(18)  # the greeting: this client now holds the only connection
    try:
        err: List[str] = []
        t0 = time.time()
        vm.backup("full", ["--push"], env={"BLOCKD_BACKUP_FOLLOW_MIN": "0", "BLOCKD_BACKUP_DEBUG": "1"},
                  stderr=err)
        assert time.time() - t0 < 60
        assert "stopped following" in err[0] and "0 bytes hashed during the job" in err[0], err[0]
        err = []
        vm.backup("inc", ["--push"], env={"BLOCKD_BACKUP_FOLLOW_MIN": "0", "BLOCKD_BACKUP_DEBUG": "1",
                                          "BLOCKD_BACKUP_NO_FOLLOW": "1"}, stderr=err)
        assert "hashed during the job" not in err[0], err[0]
    finally:
        holder.close()
    latest = json.loads(run_tool(*vm.base_args(), "--json", "list").stdout)
    restore_and_compare(vm, latest[0]["id"], "disk0", want, tmp_path)
    run_tool(*vm.base_args(), "verify", "--at", "latest")

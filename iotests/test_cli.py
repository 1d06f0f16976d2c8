"""The QSD-compatible command line: --blockdev forms, start-up errors, --pidfile,
--daemonize, quit and signals.

Observed on qemu-storage-daemon 10.0.2: start-up errors print
``qemu-storage-daemon: <option as given>: <message>`` on stderr and exit 1
before serving; quit and SIGTERM/SIGINT/SIGHUP exit 0 and remove the monitor
socket and the pid file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

import socket

from iotests import Daemon, RawQmp, blockd_only, create_image, daemon_binary, qemu_img


@pytest.fixture
def img(tmp_path):
    return create_image(tmp_path / "a.raw", 1 << 20)


def run_to_exit(tmp_path, *args, timeout=10):
    """Runs the daemon with exactly ``args``; returns (status, stderr text)."""
    p = subprocess.run([daemon_binary(), *map(str, args)], cwd=tmp_path, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    return p.returncode, p.stderr.decode(errors="replace")


# ------------------------------------------------------------ --blockdev forms


def test_blockdev_dotted_form_creates_node(make_daemon, img):
    d = make_daemon("--blockdev", f"driver=file,node-name=f0,filename={img}")
    n = d.node("f0")
    assert n["drv"] == "file" and n["file"] == str(img)


def test_blockdev_driver_may_be_given_as_implied_first_key(make_daemon, img):
    d = make_daemon("--blockdev", f"file,node-name=f0,filename={img}")
    assert d.node("f0")["drv"] == "file"


def test_blockdev_dotted_form_nests_children(make_daemon, img):
    d = make_daemon("--blockdev", f"driver=raw,node-name=r0,file.driver=file,file.filename={img},offset=4096,size=65536")
    n = d.node("r0")
    assert n["drv"] == "raw" and n["image"]["virtual-size"] == 65536


def test_blockdev_json_form_creates_node(make_daemon, img):
    spec = {"driver": "raw", "node-name": "r0", "file": {"driver": "file", "filename": str(img)}}
    d = make_daemon("--blockdev", json.dumps(spec))
    assert d.node("r0")["image"]["virtual-size"] == 1 << 20


def test_blockdev_json_form_takes_typed_values(make_daemon):
    d = make_daemon("--blockdev", json.dumps({"driver": "null-co", "node-name": "n0", "size": 4096, "read-only": True}))
    n = d.node("n0")
    assert n["ro"] is True and n["image"]["virtual-size"] == 4096


def test_blockdev_options_are_applied_in_order(make_daemon, img):
    d = make_daemon("--blockdev", f"driver=file,node-name=f0,filename={img}",
                    "--blockdev", "driver=raw,node-name=r0,file=f0")
    assert d.node("r0")["drv"] == "raw"
    assert d.err("blockdev-del", node_name="f0")["desc"] == "Block device f0 is in use"


# ------------------------------------------------------------ start-up errors

STARTUP_ERRORS = [
    ("missing-file", ["--blockdev", "driver=file,node-name=f,filename=nonexist"],
     "Could not open 'nonexist': No such file or directory"),
    ("unexpected-option", ["--blockdev", "driver=file,node-name=f,filename=IMG,bogus=1"],
     "Parameter 'bogus' is unexpected"),
    ("duplicate-node-name", ["--blockdev", "driver=file,node-name=f,filename=IMG",
                             "--blockdev", "driver=file,node-name=f,filename=IMG"],
     "Duplicate nodes with node-name='f'"),
    ("unknown-driver", ["--blockdev", "driver=nosuch,node-name=f"],
     "Parameter 'driver' does not accept value 'nosuch'"),
    ("no-node-name", ["--blockdev", "driver=file,filename=IMG"],
     "'node-name' must be specified for the root node"),
    ("bad-json", ["--blockdev", '{"driver":"file","node-name":"f"'], "JSON parse error"),
    ("nbd-server-bad-address-type", ["--nbd-server", "addr.type=bogus"],
     "Parameter 'type' does not accept value 'bogus'"),
    ("nbd-server-missing-path", ["--nbd-server", "addr.type=unix"], "Parameter 'addr.path' is missing"),
    ("unknown-long-option", ["--bogus"], "--bogus"),
    ("option-missing-argument", ["--blockdev"], "--blockdev"),
    ("positional-argument", ["positional"], "positional"),
    ("monitor-unknown-chardev", ["--monitor", "chardev=nosuch"], 'chardev "nosuch" not found'),
    ("duplicate-chardev-id", ["--chardev", "socket,id=m,path=x.sock,server=on,wait=off",
                              "--chardev", "socket,id=m,path=y.sock,server=on,wait=off"], ""),
    ("chardev-in-missing-dir", ["--chardev", "socket,id=m,path=/nonexistent-dir/x.sock,server=on,wait=off",
                                "--monitor", "chardev=m"],
     "Failed to bind socket to /nonexistent-dir/x.sock: No such file or directory"),
    ("pidfile-in-missing-dir", ["--pidfile", "/nonexistent-dir/p.pid"], "/nonexistent-dir/p.pid"),
    ("export-ill-formed-id", ["--blockdev", "null-co,node-name=n", "--nbd-server", "addr.type=unix,addr.path=n.sock",
                              "--export", "type=nbd,id=1a,node-name=n"],
     "--export type=nbd,id=1a,node-name=n: Invalid block export id"),
]


@pytest.mark.parametrize("args,message", [c[1:] for c in STARTUP_ERRORS], ids=[c[0] for c in STARTUP_ERRORS])
def test_bad_command_line_exits_1_with_message(tmp_path, img, args, message):
    args = [a.replace("IMG", str(img)) for a in args]
    status, err = run_to_exit(tmp_path, *args)
    assert status == 1, err
    assert err.strip(), "no message on stderr"
    assert message in err


def test_error_names_the_failing_option(tmp_path):
    status, err = run_to_exit(tmp_path, "--blockdev", "driver=file,node-name=f,filename=nonexist")
    assert status == 1
    assert "--blockdev driver=file,node-name=f,filename=nonexist: " in err


def test_bad_blockdev_after_monitor_exits_before_serving(tmp_path):
    d = Daemon(tmp_path)
    d.start("--blockdev", "driver=file,node-name=f,filename=nonexist", wait=False)
    assert d.wait_exit() == 1
    assert "Could not open 'nonexist'" in d.log()


# ------------------------------------------------------------ --chardev socket paths


def chardev(path) -> list:
    return ["--chardev", f"socket,id=c,path={path},server=on,wait=off", "--monitor", "chardev=c"]


def test_chardev_replaces_a_stale_socket(make_daemon, tmp_path):
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # the file stays, nobody accepts on it
    make_daemon(*chardev(stale))
    c = socket.socket(socket.AF_UNIX)
    c.settimeout(5)
    c.connect(str(stale))
    assert c.recv(100).startswith(b'{"QMP": ')
    c.close()


def test_chardev_path_that_is_a_directory_is_an_error(tmp_path):
    (tmp_path / "dir").mkdir()
    status, err = run_to_exit(tmp_path, *chardev("dir"))
    assert status == 1
    assert f"--chardev socket,id=c,path=dir,server=on,wait=off: Failed to unlink socket dir: Is a directory" in err
    assert (tmp_path / "dir").is_dir()


@blockd_only
def test_chardev_never_removes_a_regular_file(tmp_path):
    # Observed: QSD 10.0.2 unlinks whatever sits at the path (a mistyped path destroys a
    # file). blockd replaces only a stale socket.
    victim = tmp_path / "disk.img"
    victim.write_bytes(b"precious")
    status, err = run_to_exit(tmp_path, *chardev("disk.img"))
    assert status == 1
    assert "Failed to unlink socket disk.img: not a socket (only a stale socket is replaced)" in err
    assert victim.read_bytes() == b"precious"
    os.symlink("disk.img", tmp_path / "link")
    status, err = run_to_exit(tmp_path, *chardev("link"))
    assert status == 1 and "not a socket" in err
    assert (tmp_path / "link").is_symlink() and victim.read_bytes() == b"precious"


@blockd_only
def test_chardev_never_steals_a_served_socket(tmp_path):
    # Observed: QSD 10.0.2 unlinks a socket another process listens on and takes its path.
    live = tmp_path / "live.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(live))
    srv.listen(4)
    try:
        status, err = run_to_exit(tmp_path, *chardev("live.sock"))
        assert status == 1
        assert "Failed to bind socket to live.sock: Address already in use" in err
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(live))  # still the original listener's
        c.close()
    finally:
        srv.close()


# ------------------------------------------------------------ pidfile / daemonize


def test_pidfile_holds_daemon_pid(make_daemon, tmp_path):
    pid = tmp_path / "d.pid"
    d = make_daemon("--pidfile", pid)
    d.ok("query-version")
    assert int(pid.read_text().strip()) == d.proc.pid


def test_pidfile_is_removed_at_quit(make_daemon, tmp_path):
    pid = tmp_path / "d.pid"
    d = make_daemon("--pidfile", pid)
    d.ok("query-version")
    assert d.shutdown() == 0
    assert not pid.exists()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of someone else still counts as gone for us.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_daemonize_returns_after_socket_exists(tmp_path):
    d = Daemon(tmp_path)
    pid = tmp_path / "d.pid"
    argv = [daemon_binary(), *d.monitor_args(1), "--pidfile", str(pid), "--daemonize"]
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=10)
    assert p.returncode == 0, p.stderr
    assert pid.exists(), "parent returned before the pid file existed"
    dpid = int(pid.read_text())
    try:
        assert d.monitor_paths[0].is_socket(), "parent returned before the monitor socket existed"
        with RawQmp(d.monitor_paths[0]) as r:
            r.greeting()
            assert r.negotiate() == {"return": {}}
            assert r.execute("quit") == {"return": {}}
            r.expect_eof()
    finally:
        deadline = time.monotonic() + 5
        while _pid_alive(dpid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if _pid_alive(dpid):
            os.kill(dpid, signal.SIGKILL)
            pytest.fail("daemonized process did not exit at quit")


def test_daemonize_reports_startup_error_with_status_1(tmp_path):
    d = Daemon(tmp_path)
    argv = [daemon_binary(), *d.monitor_args(1), "--daemonize",
            "--blockdev", "driver=file,node-name=f,filename=nonexist"]
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=10)
    assert p.returncode == 1
    assert b"Could not open 'nonexist'" in p.stderr


# ------------------------------------------------------------ quit and signals


def test_quit_replies_then_closes_connection(daemon):
    r = daemon.raw(negotiate=True)
    assert r.execute("quit", id="q") == {"return": {}, "id": "q"}
    r.expect_eof()
    assert daemon.wait_exit() == 0


def test_quit_removes_monitor_socket(daemon):
    assert daemon.shutdown() == 0
    assert not daemon.monitor_paths[0].exists()


def test_quit_closes_other_monitors(make_daemon):
    d = make_daemon(monitors=2)
    other = d.raw(1, negotiate=True)
    d.ok("quit")
    other.expect_eof()
    assert d.wait_exit() == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["TERM", "INT", "HUP"])
def test_signal_exits_cleanly_and_removes_socket_and_pidfile(make_daemon, tmp_path, sig):
    pid = tmp_path / "d.pid"
    d = make_daemon("--pidfile", pid)
    d.ok("query-version")
    d.signal(sig)
    assert d.wait_exit() == 0
    assert not d.monitor_paths[0].exists()
    assert not pid.exists()


def test_sigterm_closes_client_connections(daemon):
    r = daemon.raw(negotiate=True)
    daemon.signal(signal.SIGTERM)
    r.expect_eof()
    assert daemon.wait_exit() == 0


def test_sighup_shuts_down_cleanly_storing_persistent_bitmaps(make_daemon, tmp_path):
    # Observed on QSD 10.0.2: SIGHUP is a termination request like SIGTERM (QEMU has no log
    # to reopen); the clean close stores persistent bitmaps, not in use.
    img = create_image(tmp_path / "h.qcow2", 1 << 20, "qcow2")
    d = make_daemon("--blockdev", f"file,node-name=f,filename={img}", "--blockdev", "qcow2,node-name=q,file=f")
    d.ok("block-dirty-bitmap-add", node="q", name="b", persistent=True)
    d.ok("block-dirty-bitmap-add", node="q", name="c", persistent=True, granularity=4096)
    d.signal(signal.SIGHUP)
    assert d.wait_exit() == 0
    info = json.loads(qemu_img("info", "--output=json", str(img)))
    bitmaps = info["format-specific"]["data"]["bitmaps"]
    # (Directory order differs: QSD writes the newest bitmap first, blockd the oldest.)
    assert sorted((b["name"], b["granularity"], b["flags"]) for b in bitmaps) == [
        ("b", 65536, ["auto"]), ("c", 4096, ["auto"])]

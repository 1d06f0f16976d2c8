"""The short command line for people: ``blockd --image IMG --qmp SOCK --nbd SOCK``.

blockd-only: QSD has no such form. The image becomes device ``drive0``, which
``query-block`` lists with its node and dirty bitmaps, and which commands accept
wherever QEMU accepts a device name.
"""

import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import iotests
from iotests import RawQmp, blockd_only, create_image, qemu_img, qemu_io

pytestmark = blockd_only

MiB = 1 << 20


@pytest.fixture
def short_daemon(tmp_path):
    img = create_image(tmp_path / "disk.qcow2", 8 * MiB, "qcow2")
    sockdir = Path(tempfile.mkdtemp(prefix="iot-sf-"))
    qmp_sock, nbd_sock = sockdir / "qmp.sock", sockdir / "nbd.sock"
    proc = subprocess.Popen(
        [iotests.daemon_binary(), "--image", str(img), "--qmp", str(qmp_sock), "--nbd", str(nbd_sock)],
        stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not qmp_sock.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    qmp = RawQmp(qmp_sock)
    qmp.greeting()
    qmp.negotiate()
    yield img, qmp, nbd_sock, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_image_is_device_drive0_in_query_block(short_daemon):
    _, qmp, _, _ = short_daemon
    [dev] = qmp.execute("query-block")["return"]
    assert dev["device"] == "drive0"
    assert dev["inserted"]["drv"] == "qcow2"
    assert dev["inserted"]["image"]["virtual-size"] == 8 * MiB


def test_device_name_is_accepted_for_bitmaps_and_writes_mark_them(short_daemon):
    _, qmp, _, _ = short_daemon
    assert qmp.execute("block-dirty-bitmap-add", {"node": "drive0", "name": "b0"}) == {"return": {}}
    out = qmp.execute("human-monitor-command", {"command-line": 'qemu-io drive0 "write -P 0x5a 0 64k"'})
    assert out["return"].startswith("wrote 65536/65536 bytes at offset 0")
    [dev] = qmp.execute("query-block")["return"]
    assert dev["inserted"]["dirty-bitmaps"] == [
        {"name": "b0", "recording": True, "persistent": False, "busy": False, "granularity": 65536, "count": 65536}]


def test_nbd_export_drive0_serves_the_image(short_daemon):
    img, qmp, nbd_sock, proc = short_daemon
    uri = f"nbd+unix:///drive0?socket={nbd_sock}"
    assert "wrote 512/512" in qemu_io("-f", "raw", uri, "-c", "write -P 0x33 1M 512")
    assert "Pattern verification failed" not in qemu_io("-f", "raw", uri, "-c", "read -P 0x33 1M 512")
    assert qmp.execute("quit") == {"return": {}}
    assert proc.wait(timeout=10) == 0
    qemu_img("check", str(img))
    assert "Pattern verification failed" not in qemu_io("-f", "qcow2", str(img), "-c", "read -P 0x33 1M 512")


# ------------------------------------------------------------ run.sh and the README's example

REPO = Path(__file__).resolve().parent.parent


def _wait_path(p: Path, proc, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not p.exists():
        assert proc.poll() is None, f"exited {proc.returncode}: {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"{p} never appeared"
        time.sleep(0.02)


@pytest.fixture
def run_sh(tmp_path):
    """./run.sh as a new user runs it, with nothing on PATH but bash and dirname (no
    qemu-img): blockd creates the default image itself. Yields (run dir, process)."""
    rundir = Path(tempfile.mkdtemp(prefix="iot-run-"))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "dirname"):
        (bindir / tool).symlink_to(shutil.which(tool))
    env = {"PATH": str(bindir), "BLOCKD": iotests.daemon_binary(), "BLOCKD_RUN_DIR": str(rundir)}
    proc = subprocess.Popen([str(bindir / "bash"), str(REPO / "run.sh")], env=env,
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_path(rundir / "blockd.sock", proc)
        _wait_path(rundir / "nbd.sock", proc)
        yield rundir, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        shutil.rmtree(rundir, ignore_errors=True)


def test_run_sh_creates_the_default_image_with_blockd_itself(run_sh):
    rundir, proc = run_sh
    qmp = RawQmp(rundir / "blockd.sock")
    qmp.greeting()
    qmp.negotiate()
    [dev] = qmp.execute("query-block")["return"]
    assert dev["device"] == "drive0" and dev["inserted"]["drv"] == "qcow2"
    assert dev["inserted"]["image"]["virtual-size"] == 1 << 30
    assert qmp.execute("quit") == {"return": {}}
    assert proc.wait(10) == 0
    info = json.loads(qemu_img("info", "--output=json", str(rundir / "disk.qcow2")))
    assert (info["format"], info["virtual-size"]) == ("qcow2", 1 << 30)
    assert "No errors were found on the image." in qemu_img("check", str(rundir / "disk.qcow2"))


def test_run_sh_keeps_an_existing_image(tmp_path):
    rundir = Path(tempfile.mkdtemp(prefix="iot-run-"))
    try:
        create_image(rundir / "disk.qcow2", 8 * MiB, "qcow2")
        qemu_io("-f", "qcow2", "-c", "write -P 0x33 0 64k", str(rundir / "disk.qcow2"))
        proc = subprocess.Popen(["bash", str(REPO / "run.sh")], stdin=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "BLOCKD": iotests.daemon_binary(),
                                     "BLOCKD_RUN_DIR": str(rundir)})
        try:
            _wait_path(rundir / "blockd.sock", proc)
            qmp = RawQmp(rundir / "blockd.sock")
            qmp.greeting()
            qmp.negotiate()
            [dev] = qmp.execute("query-block")["return"]
            assert dev["inserted"]["image"]["virtual-size"] == 8 * MiB
            qmp.execute("quit")
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        assert "read 65536/65536" in qemu_io("-f", "qcow2", "-c", "read -P 0x33 0 64k",
                                             str(rundir / "disk.qcow2"))
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def _readme_example():
    """The README's "Then, for example" block: [(argv, [typed lines])] in order."""
    text = (REPO / "README.md").read_text()
    block = text.split("Then, for example:", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    steps = []
    for line in block.splitlines():
        if line.startswith("(QEMU) "):
            steps[-1][1].append(line[len("(QEMU) "):])
        else:
            steps.append((shlex.split(line, comments=True), []))
    return steps


def test_readme_example_works_as_written(run_sh):
    rundir, _ = run_sh
    steps = _readme_example()
    assert [s[0][0] for s in steps] == ["qmp-shell", "qmp-shell", "qemu-io"]
    for argv, typed in steps:
        exe = shutil.which(argv[0])
        assert exe, f"{argv[0]} (from the README) is not installed"
        p = subprocess.run([exe, *argv[1:]], cwd=rundir, input="".join(t + "\n" for t in typed),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30)
        out = p.stdout
        assert p.returncode == 0, out
        assert '"error"' not in out and "unknown command" not in out, out
        if argv[0] == "qmp-shell" and "-H" in argv:
            assert "wrote 65536/65536 bytes at offset 0" in out, out
        if argv[0] == "qemu-io":
            assert "read 65536/65536 bytes at offset 0" in out and "Pattern verification" not in out, out
    qmp = RawQmp(rundir / "blockd.sock")
    qmp.greeting()
    qmp.negotiate()
    [dev] = qmp.execute("query-block")["return"]
    assert [(b["name"], b["count"]) for b in dev["inserted"]["dirty-bitmaps"]] == [("b0", 65536)]

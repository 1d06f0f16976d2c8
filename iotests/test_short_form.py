"""The short command line for people: ``blockd --image IMG --qmp SOCK --nbd SOCK``.

blockd-only: QSD has no such form. The image becomes device ``drive0``, which
``query-block`` lists with its node and dirty bitmaps, and which commands accept
wherever QEMU accepts a device name.
"""

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

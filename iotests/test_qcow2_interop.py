"""Persistent bitmaps cross between blockd and qemu-storage-daemon with the same counts and
bits, both ways. Needs both daemons, so it runs only in the blockd pass."""

import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import iotests
from iotests import RawQmp, blockd_only, create_image

pytestmark = blockd_only

MiB = 1 << 20


class Run:
    """One daemon (blockd or QSD) with qcow2 node ``n`` over IMG and a QMP socket."""

    def __init__(self, binary: str, img: Path):
        self.dir = Path(tempfile.mkdtemp(prefix="iot-x-"))
        sock = self.dir / "qmp.sock"
        self.proc = subprocess.Popen(
            [binary, "--chardev", f"socket,id=m,path={sock},server=on,wait=off", "--monitor", "chardev=m",
             "--blockdev", f"file,node-name=f,filename={img}", "--blockdev", "qcow2,node-name=n,file=f"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.qmp = RawQmp(sock)
                self.qmp.greeting()
                assert self.qmp.negotiate() == {"return": {}}
                break
            except (OSError, EOFError, TimeoutError):
                assert time.monotonic() < deadline, "daemon did not start"
                time.sleep(0.05)

    def ok(self, _command, **args):
        r = self.qmp.execute(_command, args)
        assert "return" in r, r
        return r["return"]

    def bitmap(self, name):
        node = next(n for n in self.ok("query-named-block-nodes") if n["node-name"] == "n")
        return next(b for b in node["dirty-bitmaps"] if b["name"] == name)

    def sha(self, name):
        return self.ok("x-debug-block-dirty-bitmap-sha256", node="n", name=name)["sha256"]

    def quit(self):
        self.ok("quit")
        assert self.proc.wait(timeout=10) == 0


def write(run: Run, *cmds: str):
    """Dirty the node: HMP on blockd; on QSD through a writable NBD export and qemu-io."""
    if "human-monitor-command" in {c["name"] for c in run.ok("query-commands")}:
        for c in cmds:
            out = run.ok("human-monitor-command", **{"command-line": f'qemu-io n "{c}"'})
            assert "wrote" in out, out
        return
    sock = run.dir / "nbd.sock"
    run.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    run.ok("block-export-add", type="nbd", id="e", **{"node-name": "n"}, writable=True)
    args = ["qemu-io", "-f", "raw", f"nbd+unix:///n?socket={sock}"]
    for c in cmds:
        args += ["-c", c]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    run.ok("block-export-del", id="e")
    run.ok("nbd-server-stop")


@pytest.mark.parametrize("first,second", [("blockd", "qsd"), ("qsd", "blockd")])
def test_persistent_bitmap_crosses_daemons_with_same_bits(tmp_path, first, second):
    binaries = {"blockd": iotests.daemon_binary(), "qsd": "qemu-storage-daemon"}
    img = create_image(tmp_path / "x.qcow2", 64 * MiB, "qcow2")
    a = Run(binaries[first], img)
    a.ok("block-dirty-bitmap-add", node="n", name="p", persistent=True, granularity=65536)
    a.ok("block-dirty-bitmap-add", node="n", name="q", persistent=True, granularity=4096, disabled=True)
    write(a, "write 0 1", "write 1M 128k", "write 67108352 512")
    before = (a.bitmap("p"), a.bitmap("q"), a.sha("p"), a.sha("q"))
    a.quit()
    iotests.qemu_img("check", str(img))

    b = Run(binaries[second], img)
    after = (b.bitmap("p"), b.bitmap("q"), b.sha("p"), b.sha("q"))
    b.quit()

    assert before == after
    assert before[0]["count"] == 65536 * 4 and before[0]["recording"] is True
    assert before[1]["count"] == 0 and before[1]["recording"] is False

"""blockd-backup against a running QEMU (qemu-system-x86_64), not a storage daemon.

A q35 machine under TCG, paused (``-S``), with three qcow2 disks on ``virtio-blk-pci``
devices (two ``-blockdev``, one legacy ``-drive``), and two QMP monitors (the test's and the tool's). QEMU is the
daemon here, so the test runs once, in the pass against blockd (the tool itself is the same).

* disk ``da``: device ``vda`` with ``share-rw=on``; the test writes through a writable NBD export
  started in that QEMU (``nbd-server-start``, ``block-export-add``), also *during* live backups;
* disk ``vdb`` (node ``db``): a device with the default ``share-rw=off``, so nothing but the
  device may write: writes go through HMP ``qemu-io`` on the device's backend, and the tool is
  given the device id, which it maps to the node through ``query-block``;
* disk ``dc``: a legacy ``-drive if=none,id=dc``, whose root node's name QEMU generates
  (``#blockNNN``): the tool is given the drive id; writes through HMP ``qemu-io dc``.

Full, incremental (pull, with writes racing the copy), incremental in push mode, and ``auto``;
every point of every disk restored and compared with a frozen copy taken at its instant.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import pytest

import iotests
from iotests import Daemon, qemu_img, qemu_io
from test_backup_tool import Writer, backup_events, digest_of, restore_and_compare, run_tool

QEMU = "qemu-system-x86_64"
SIZE = 32 << 20

pytestmark = pytest.mark.skipif(iotests.DAEMON_KIND != "blockd",
                                reason="QEMU is the daemon here: runs once, in the blockd pass")


class QemuVm:
    """A paused QEMU with disks da (vda, share-rw=on) and db (vdb); see the module doc."""

    def __init__(self, tmp: Path):
        binary = shutil.which(QEMU)
        if binary is None:
            iotests.missing_oracle(QEMU)
        self.tmp = tmp
        self.names = ["da"]  # what the Writer writes to (through NBD)
        argv: List[str] = ["-M", "q35", "-accel", "tcg", "-nodefaults", "-display", "none", "-S"]
        self.d = Daemon(tmp, name="qemu")
        self.d.binary = str(binary)
        self.d.monitor_paths = [self.d.sock("mon0"), self.d.sock("mon1")]
        for p in self.d.monitor_paths:
            argv += ["-qmp", f"unix:{p},server=on,wait=off"]
        for node, dev, share in (("da", "vda", "on"), ("db", "vdb", "off")):
            img = tmp / f"{node}.qcow2"
            qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE))
            argv += ["-blockdev", f"driver=file,node-name={node}-f,filename={img}",
                     "-blockdev", f"driver=qcow2,node-name={node},file={node}-f",
                     "-device", f"virtio-blk-pci,drive={node},id={dev},share-rw={share}"]
        img = tmp / "dc.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE))
        argv += ["-drive", f"if=none,id=dc,format=qcow2,file={img}", "-device", "virtio-blk-pci,drive=dc,id=vdc"]
        self.d.start(*argv, raw_argv=True)
        self.nbd = self.d.sock("nbd")
        self.d.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(self.nbd)}})
        self.d.ok("block-export-add", type="nbd", id="w-da", node_name="da", name="w-da", writable=True)
        self.d.ok("block-export-add", type="nbd", id="r-db", node_name="db", name="r-db")
        self.dc_node = [b["inserted"]["node-name"] for b in self.d.ok("query-block") if b["device"] == "dc"][0]
        assert self.dc_node.startswith("#block"), self.dc_node
        self.d.ok("block-export-add", type="nbd", id="r-dc", node_name=self.dc_node, name="r-dc")
        self.repo = tmp / "repo"

    def base_args(self) -> List[str]:
        return ["--repo", str(self.repo), "--machine", "vm"]

    def src_args(self) -> List[str]:
        return ["--qmp", str(self.d.monitor_paths[1]), "--nbd-socket", str(self.nbd),
                "--disk", "da", "--disk", "vdb", "--disk", "dc"]

    def uri(self, n: str) -> str:
        return f"nbd+unix:///{'w-da' if n == 'da' else 'r-' + n}?socket={self.nbd}"

    def write_random(self, rng: random.Random, n: str, count: int = 6) -> None:
        """Random writes (some zeroing) to da through NBD, to db and dc through HMP qemu-io."""
        cmds = []
        for _ in range(count):
            ln = rng.choice([512, 4096, 65536, 200000])
            off = rng.randrange(0, SIZE - ln) // 512 * 512
            z = "-z " if rng.random() < 0.15 else f"-P {rng.randrange(1, 255)} "
            cmds.append(f"write {z}{off} {ln}")
        if n == "da":
            qemu_io("-f", "raw", *[a for c in cmds for a in ("-c", c)], self.uri("da"))
            return
        dev = "-d /machine/peripheral/vdb/virtio-backend" if n == "db" else "dc"
        for c in cmds:
            out = self.d.ok("human-monitor-command", command_line=f'qemu-io {dev} "{c}"')
            assert out == "", out  # qemu-io prints to QEMU's stdout; HMP returns only errors

    def frozen(self, n: str, dest: Path) -> str:
        qemu_img("convert", "-f", "raw", "-O", "raw", self.uri(n), str(dest))
        return digest_of(dest)

    def backup(self, cmd: str, extra=(), writer: Optional[Writer] = None) -> List[dict]:
        return backup_events([*self.base_args(), "--json", cmd, *self.src_args(), *extra],
                             dict(os.environ), writer)


@pytest.mark.timeout(300)
def test_backups_of_a_running_qemu_restore_exactly(tmp_path):
    vm = QemuVm(tmp_path)
    try:
        rng = random.Random(41)
        qemu_io("-f", "raw", "-c", "write -P 0x11 0 4M", vm.uri("da"))
        zero = tmp_path / "zero.raw"
        zero.write_bytes(b"")
        os.truncate(zero, SIZE)
        for n in ("db", "dc"):
            vm.write_random(rng, n, 4)
            assert vm.frozen(n, tmp_path / f"{n}.raw") != digest_of(zero), f"HMP qemu-io wrote nothing to {n}"
        writer = Writer(vm, 42)
        frozen: Dict[str, Dict[str, str]] = {}
        plans = []
        try:
            for step, (cmd, extra, live_writes) in enumerate([
                    ("full", [], False), ("inc", [], True), ("inc", ["--push"], True), ("auto", [], False)]):
                if step:
                    vm.write_random(rng, "da")
                    vm.write_random(rng, "db", 3)
                    vm.write_random(rng, "dc", 2)
                want = {n: vm.frozen(n, tmp_path / f"{n}.raw") for n in ("da", "db", "dc")}
                evs = vm.backup(cmd, extra, writer=writer if live_writes else None)
                snap = [e["id"] for e in evs if e["event"] == "snapshot"]
                assert len(snap) == 1, evs
                frozen[snap[0]] = {"da": want["da"], "vdb": want["db"], "dc": want["dc"]}
                plans.append({e["disk"]: e["kind"] for e in evs if e["event"] == "plan"})
        finally:
            writer.close()
        assert plans == [dict.fromkeys(("da", "vdb", "dc"), "full")] + [dict.fromkeys(("da", "vdb", "dc"), "inc")] * 3, plans
        # The tool's jobs, exports and nodes are gone from QEMU; of its bitmaps only the
        # latest backup's and the full's anchor stay on each disk.
        assert vm.d.ok("query-jobs") == []
        assert sorted(e["id"] for e in vm.d.ok("query-block-exports")) == ["r-db", "r-dc", "w-da"]
        assert not [n["node-name"] for n in vm.d.nodes() if n["node-name"].startswith("bb-")]
        for node in ("da", "db", vm.dc_node):
            bms = [b["name"] for b in vm.d.bitmaps(node) if b["name"].startswith("bb-")]
            assert len(bms) == 2, (node, bms)
        for point, want in frozen.items():
            for disk, digest in want.items():
                restore_and_compare(vm, point, disk, digest, tmp_path)
        listed = json.loads(run_tool(*vm.base_args(), "--json", "list").stdout)
        assert [m["id"] for m in listed] == list(frozen)
        for d in listed[-1]["disks"]:
            assert d["node"] == {"da": "da", "vdb": "db", "dc": vm.dc_node}[d["name"]], d
            qemu_img("check", "-q", str(vm.repo / d["chain"][-1]["name"]))
        run_tool(*vm.base_args(), "verify", "--at", "latest")
    finally:
        vm.d.kill()

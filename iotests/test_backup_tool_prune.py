"""blockd-backup: a `prune` killed at any step leaves no stale checksum behind once it is finished.

Four points (a full and three incrementals, taken offline through the daemon under test, each
with a frozen copy of the disk); `prune --keep 2` merges two files into the base. It is killed
(SIGKILL) at each of its steps (test hook `BLOCKD_BACKUP_DIE_AT`: `prune-planned` journal
written, `prune-commit` first merge committed but its child not yet re-pointed, `prune-step` a
merge done but not yet recorded, `prune-manifest` one manifest rewritten, `prune-cleaned` files
removed but the journal not yet), or by a `qemu-img` wrapper that kills the tool after its 1st or
2nd `rebase` (the reviewer's repro). `list` and `verify` keep working and say a prune is pending;
then either a `prune` with another `--keep` or a backup finishes it, and every remaining point
must verify (exit 0) and restore byte-exact, with no journal and no unrecorded file left.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path

import pytest

from test_backup_tool import Vm, restore_and_compare, run_tool

PENDING = "interrupted prune is pending"
PHASES = ["prune-planned", "prune-commit", "prune-step", "prune-manifest", "prune-cleaned",
          "rebase-1", "rebase-2"]


def qemu_img_killer(tmp: Path, nth: int) -> dict:
    """Env putting a `qemu-img` first on PATH that runs the real one and, after its `nth`
    `rebase`, kills its caller (the tool) with SIGKILL."""
    real = shutil.which("qemu-img")
    assert real, "qemu-img is needed"
    d = tmp / "shim"
    d.mkdir()
    count = tmp / "rebases"
    sh = d / "qemu-img"
    sh.write_text(f"""#!/bin/sh
"{real}" "$@"
rc=$?
if [ "$1" = rebase ]; then
    echo x >> "{count}"
    [ "$(wc -l < "{count}")" -ge {nth} ] && kill -9 $PPID
fi
exit $rc
""")
    sh.chmod(0o755)
    return {"PATH": f"{d}:{os.environ['PATH']}"}


def point_ids(vm: Vm) -> list:
    return [m["id"] for m in json.loads(run_tool(*vm.base_args(), "--json", "list").stdout)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("then", ["prune", "backup"])
@pytest.mark.parametrize("phase", PHASES)
def test_prune_killed_at_every_step_is_finished_by_the_next_run(make_daemon, tmp_path, phase, then):
    vm = Vm(make_daemon, tmp_path)
    vm.offline = True
    rng = random.Random(11)
    want = {}
    for i, kind in enumerate(["full", "inc", "inc", "inc"]):
        vm.write_random(rng, "disk0", 12)
        frozen = vm.frozen("disk0", tmp_path / f"f{i}.raw")
        vm.backup(kind)
        want[point_ids(vm)[-1]] = frozen
    ids = point_ids(vm)
    assert len(ids) == 4
    files_before = sorted((vm.repo / "vm" / "disks" / "disk0").iterdir())
    assert len(files_before) == 4

    if phase.startswith("rebase-"):
        env = qemu_img_killer(tmp_path, int(phase.split("-")[1]))
    else:
        env = {"BLOCKD_BACKUP_DIE_AT": phase}
    p = run_tool(*vm.base_args(), "prune", "--keep", "2", check=False, env=env)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stdout, p.stderr)
    journal = vm.repo / "vm" / "prune.json"
    assert journal.exists()

    # list and verify still work, and say that a prune is pending.
    lst = run_tool(*vm.base_args(), "list")
    assert PENDING in lst.stderr, lst.stderr
    assert point_ids(vm) == (ids if phase == "prune-planned" else ids[2:])
    v = run_tool(*vm.base_args(), "verify", "--at", "latest", check=False)
    assert PENDING in v.stderr, v.stderr
    # The latest point's manifest is stale exactly while the base was merged but the manifest
    # not yet rewritten (the first rewritten one is the older kept point).
    stale = phase not in ("prune-planned", "prune-cleaned")
    assert v.returncode == (7 if stale else 0), (v.returncode, v.stderr)

    if then == "prune":
        # Whatever --keep: the pending prune is finished as planned (2 points), nothing more.
        out = run_tool(*vm.base_args(), "prune", "--keep", "3")
        assert "finishing an interrupted prune" in out.stderr, out.stderr
        assert point_ids(vm) == ids[2:]
    else:
        vm.write_random(rng, "disk0", 12)
        frozen = vm.frozen("disk0", tmp_path / "f4.raw")
        evs = vm.backup("auto")
        assert any(e["event"] == "prune" and e.get("resumed") for e in evs), evs
        plan = [e for e in evs if e["event"] == "plan"][0]
        assert plan["kind"] == "inc", plan
        want[point_ids(vm)[-1]] = frozen
        assert point_ids(vm)[:2] == ids[2:] and len(point_ids(vm)) == 3

    assert not journal.exists()
    assert PENDING not in run_tool(*vm.base_args(), "list").stderr
    manifests = [json.loads(f.read_text()) for f in sorted((vm.repo / "vm" / "backups").glob("*.json"))]
    # The oldest kept point is now the base alone; nothing unrecorded is left.
    assert [len(m["disks"][0]["chain"]) for m in manifests][:2] == [1, 2]
    named = {f["name"] for m in manifests for f in m["disks"][0]["chain"]}
    stored = {str(f.relative_to(vm.repo)) for f in (vm.repo / "vm" / "disks").rglob("*") if f.is_file()}
    assert stored == named, (stored, named)
    sums_named = {m["disks"][0]["sums"] for m in manifests}
    sums_stored = {str(f.relative_to(vm.repo)) for f in (vm.repo / "vm" / "sums").rglob("*") if f.is_file()}
    assert sums_stored == sums_named, (sums_stored, sums_named)
    for m in manifests:
        run_tool(*vm.base_args(), "verify", "--at", m["id"])
        restore_and_compare(vm, m["id"], "disk0", want[m["id"]], tmp_path)

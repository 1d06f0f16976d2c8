"""blockd runs every query, `transaction`, the backups and the export adds beside other
monitors' commands (QSD runs every command under one lock): while a transaction waits on a
disk, other monitors' queries answer; a query that reports a node the transaction is changing
waits for it and shows the state after it, never half way. Two backups with one job id, or two
export adds with one id, from two monitors: one wins, the other gets QEMU's error.
blockd-only: QSD would hang in the stalls."""

from __future__ import annotations

import json
import os
import time

import iotests
from backup_helpers import MiB, qcow2
from fleece_helpers import StallableFile
from test_unserialised import _monitor, _stall_qcow2

SIZE = 4 * MiB


def _no_reply(m, wait: float = 0.3) -> bool:
    """True if no reply (events aside: they are kept) arrives within `wait` seconds."""
    while True:
        try:
            msg = m.recv(wait)
        except TimeoutError:
            return True
        if "event" not in msg:
            m.buf = (json.dumps(msg) + "\r\n").encode() + m.buf
            return False
        m.events.append(msg)


def _snapshot_sync(node: str, path, overlay: str, fmt: str) -> dict:
    return {"type": "blockdev-snapshot-sync", "data": {
        "node-name": node, "snapshot-file": str(path), "snapshot-node-name": overlay,
        "format": fmt, "mode": "existing"}}


def _fifo_setup(d, tmp_path):
    """A read-only qcow2 `base` whose snapshot onto a FIFO stalls in the overlay's open until
    the FIFO is opened for writing (then fails: a FIFO overlay is raw), a qcow2 `q` and a
    null `other` exported as `e`."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    img = qcow2(tmp_path / "a.qcow2", SIZE)
    bimg = qcow2(tmp_path / "b.qcow2", SIZE)
    d.blockdev_add(driver="qcow2", node_name="q",
                   file={"driver": "file", "filename": str(img)})
    d.blockdev_add(driver="qcow2", node_name="base", read_only=True,
                   file={"driver": "file", "node-name": "bf", "read-only": True,
                         "filename": str(bimg)})
    d.blockdev_add(driver="null-co", node_name="other", size=SIZE)
    d.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(d.sock("nbd"))}})
    return fifo, img


@iotests.blockd_only
def test_queries_answer_beside_a_stalled_transaction(make_daemon, tmp_path):
    """A transaction (a bitmap add on `q`, a snapshot of `base` whose overlay open hangs)
    stalls: another monitor's query-version, query-jobs, query-block-jobs, query-block and
    query-block-exports (of an export on a node it does not change) answer meanwhile;
    query-named-block-nodes, which reports `q` and `base`, waits for the transaction and then
    shows them as after its abort: no `tb` bitmap, no overlay."""
    d = make_daemon(monitors=3)
    fifo, img = _fifo_setup(d, tmp_path)
    d.ok("block-export-add", type="nbd", id="e", node_name="other")
    with _monitor(d, 1) as m1, _monitor(d, 2) as m2:
        m1.send(json.dumps({"execute": "transaction", "arguments": {"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "q", "name": "tb"}},
            _snapshot_sync("base", fifo, "ov", "raw")]}}))
        time.sleep(2)  # "tb" is added; the overlay's open waits on the FIFO
        assert m1.no_message(), "the transaction did not stall"
        assert "qemu" in d.ok("query-version")
        assert d.ok("query-jobs") == []
        assert d.ok("query-block-jobs") == []
        assert d.ok("query-block") == []
        assert [e["id"] for e in d.ok("query-block-exports")] == ["e"]
        m2.send(json.dumps({"execute": "query-named-block-nodes"}))
        time.sleep(1)
        assert m2.no_message(), ("query-named-block-nodes showed a half-done transaction",
                                 m2.reply())
        os.close(os.open(fifo, os.O_WRONLY))
        r = m1.reply(timeout=30)
        assert r["error"]["desc"] == "The overlay does not support backing images", r
        nodes = m2.reply(timeout=30)["return"]
        names = {n["node-name"] for n in nodes if not n["node-name"].startswith("#")}
        assert names == {"q", "base", "bf", "other"}, names
        q = next(n for n in nodes if n["node-name"] == "q")
        assert [b["name"] for b in q.get("dirty-bitmaps", [])] == [], q
    assert d.bitmaps("q") == []
    d.ok("block-export-del", id="e")
    d.ok("blockdev-del", node_name="q")
    iotests.qemu_img("check", str(img))


@iotests.blockd_only
def test_two_backups_with_one_job_id_one_wins(make_daemon, tmp_path):
    """A transaction with a backup `j` stalls in its snapshot action (the overlay's header read
    hangs): query-version answers meanwhile; another monitor's blockdev-backup with job id `j`
    (other nodes) waits for the transaction instead of racing it, then gets QEMU's
    "already in use"; the transaction's backup completes and its copy equals the source."""
    img = qcow2(tmp_path / "base.qcow2", SIZE)
    stall = StallableFile(tmp_path, SIZE)
    try:
        _stall_qcow2(stall, qcow2(tmp_path / "ov-src.qcow2", SIZE))
        d = make_daemon(monitors=3)
        d.blockdev_add(driver="qcow2", node_name="base",
                       file={"driver": "file", "filename": str(img)})
        for n in ("src", "t1", "src2", "t2"):
            d.blockdev_add(driver="qcow2", node_name=n, file={
                "driver": "file", "filename": str(qcow2(tmp_path / f"{n}.qcow2", SIZE))})
        d.node_io("src", "write -P 0x5a 0 1M")
        stall.stop()
        with _monitor(d, 1) as m1, _monitor(d, 2) as m2:
            m1.send(json.dumps({"execute": "transaction", "arguments": {"actions": [
                {"type": "blockdev-backup", "data": {
                    "job-id": "j", "device": "src", "target": "t1", "sync": "full",
                    "auto-dismiss": False}},
                _snapshot_sync("base", stall.path, "ov", "qcow2")]}}))
            time.sleep(2)
            assert _no_reply(m1), "the transaction did not stall"
            m2.send(json.dumps({"execute": "blockdev-backup", "arguments": {
                "job-id": "j", "device": "src2", "target": "t2", "sync": "full"}}))
            time.sleep(1)
            assert _no_reply(m2), ("the second backup did not wait", m2.reply())
            assert "qemu" in d.ok("query-version")
            stall.cont()
            assert m1.reply(timeout=30) == {"return": {}}
            assert m2.reply(timeout=30) == {"error": {
                "class": "GenericError", "desc": "Job ID 'j' already in use"}}
        deadline = time.monotonic() + 30
        while d.ok("query-jobs")[0]["status"] != "concluded":
            assert time.monotonic() < deadline, d.ok("query-jobs")
            time.sleep(0.1)
        assert [j["id"] for j in d.ok("query-jobs")] == ["j"]
        d.ok("job-dismiss", id="j")
        out = d.node_io("t1", "read -P 0x5a 0 1M")
        assert "Pattern verification failed" not in out, out
    finally:
        stall.close()
    iotests.qemu_img("check", str(img))


@iotests.blockd_only
def test_two_export_adds_with_one_id_one_wins(make_daemon, tmp_path):
    """An export add of `e` on `base`, which a stalled transaction is snapshotting, waits for
    it; meanwhile another monitor's add of `e` on `other` answers (it wins), and the first
    then gets QEMU's "already in use"."""
    d = make_daemon(monitors=3)
    fifo, img = _fifo_setup(d, tmp_path)
    with _monitor(d, 1) as m1, _monitor(d, 2) as m2:
        m1.send(json.dumps({"execute": "transaction", "arguments": {"actions": [
            _snapshot_sync("base", fifo, "ov", "raw")]}}))
        time.sleep(2)
        assert m1.no_message(), "the transaction did not stall"
        m2.send(json.dumps({"execute": "block-export-add", "arguments": {
            "type": "nbd", "id": "e", "node-name": "base"}}))
        time.sleep(1)
        assert m2.no_message(), ("the export add did not wait for the transaction", m2.reply())
        d.ok("block-export-add", type="nbd", id="e", node_name="other")
        os.close(os.open(fifo, os.O_WRONLY))
        r = m1.reply(timeout=30)
        assert r["error"]["desc"] == "The overlay does not support backing images", r
        assert m2.reply(timeout=30) == {"error": {
            "class": "GenericError", "desc": "Block export id 'e' is already in use"}}
    exports = d.ok("query-block-exports")
    assert [(e["id"], e["node-name"]) for e in exports] == [("e", "other")]
    d.ok("block-export-del", id="e")
    d.ok("blockdev-del", node_name="q")
    iotests.qemu_img("check", str(img))


@iotests.blockd_only
def test_a_job_verb_waits_for_the_transaction_creating_its_job(make_daemon, tmp_path):
    """A transaction's backup `j` is created, its snapshot action stalls: query-jobs answers
    meanwhile and shows `j` as created (QEMU announces that state by JOB_STATUS_CHANGE too);
    another monitor's job-cancel of `j` waits for the transaction instead of acting inside it,
    and after its abort finds no job, as if sent after it."""
    d = make_daemon(monitors=3)
    fifo, img = _fifo_setup(d, tmp_path)
    for n in ("src", "t1"):
        d.blockdev_add(driver="qcow2", node_name=n, file={
            "driver": "file", "filename": str(qcow2(tmp_path / f"{n}.qcow2", SIZE))})
    with _monitor(d, 1) as m1, _monitor(d, 2) as m2:
        m1.send(json.dumps({"execute": "transaction", "arguments": {"actions": [
            {"type": "blockdev-backup", "data": {
                "job-id": "j", "device": "src", "target": "t1", "sync": "full"}},
            _snapshot_sync("base", fifo, "ov", "raw")]}}))
        time.sleep(2)
        assert _no_reply(m1), "the transaction did not stall"
        assert [(j["id"], j["status"]) for j in d.ok("query-jobs")] == [("j", "created")]
        m2.send(json.dumps({"execute": "job-cancel", "arguments": {"id": "j"}}))
        time.sleep(1)
        assert _no_reply(m2), ("the job verb did not wait for the transaction", m2.reply())
        os.close(os.open(fifo, os.O_WRONLY))
        r = m1.reply(timeout=30)
        assert r["error"]["desc"] == "The overlay does not support backing images", r
        assert m2.reply(timeout=30) == {
            "error": {"class": "GenericError", "desc": "Job not found"}}
    assert d.ok("query-jobs") == []
    d.ok("blockdev-del", node_name="q")
    iotests.qemu_img("check", str(img))


@iotests.blockd_only
def test_quit_waits_for_a_transaction_before_cancelling_jobs(make_daemon, tmp_path):
    """`quit` while a transaction with a (slow) backup stalls in its snapshot action: shutdown
    waits for the transaction (which runs beside the quit) before it cancels jobs, so the
    backup that the transaction starts is cancelled too and the daemon exits promptly, its
    images consistent; without that wait the job would start after the cancellation."""
    img = qcow2(tmp_path / "base.qcow2", SIZE)
    stall = StallableFile(tmp_path, SIZE)
    try:
        _stall_qcow2(stall, qcow2(tmp_path / "ov-src.qcow2", SIZE))
        d = make_daemon(monitors=2)
        d.blockdev_add(driver="qcow2", node_name="base",
                       file={"driver": "file", "filename": str(img)})
        paths = {n: qcow2(tmp_path / f"{n}.qcow2", SIZE) for n in ("src", "t1")}
        for n, p in paths.items():
            d.blockdev_add(driver="qcow2", node_name=n,
                           file={"driver": "file", "filename": str(p)})
        d.node_io("src", "write -P 0x5a 0 4M")
        stall.stop()
        with _monitor(d, 1) as m1:
            m1.send(json.dumps({"execute": "transaction", "arguments": {"actions": [
                {"type": "blockdev-backup", "data": {
                    "job-id": "j", "device": "src", "target": "t1", "sync": "full",
                    "speed": 65536}},
                _snapshot_sync("base", stall.path, "ov", "qcow2")]}}))
            time.sleep(2)
            assert _no_reply(m1), "the transaction did not stall"
            assert d.cmd("quit") == {"return": {}}
            time.sleep(1)
            assert d.running(), "shutdown did not wait for the transaction"
            stall.cont()
            assert m1.reply(timeout=30) == {"return": {}}
            # The 4 MiB copy at 64 KiB/s would take a minute: it was cancelled.
            assert d.wait_exit(timeout=20) == 0
        iotests.qemu_img("check", "-f", "qcow2", str(stall.path))
    finally:
        stall.close()
    for p in (img, *paths.values()):
        iotests.qemu_img("check", str(p))
    # The job went its ordinary way (a job started after the cancellation of all jobs was
    # logged as illegal transitions), the overlay was kept.
    log = d.log()
    assert "ERROR" not in log and "WARN" not in log, log


@iotests.blockd_only
def test_a_query_hung_on_a_stopped_file_holds_up_no_other_command(make_daemon, tmp_path):
    """query-named-block-nodes stats every node's file; with one file's FUSE server stopped
    that query hangs, but it reads the files before it takes its read claims, so another
    monitor's commands that claim nodes (bitmap add and remove, a reopen) answer meanwhile, and
    query-block (no device) too; once the server continues the query answers with every node."""
    stall = StallableFile(tmp_path, SIZE)
    try:
        d = make_daemon(monitors=2)
        d.blockdev_add(driver="raw", node_name="slow",
                       file={"driver": "file", "filename": str(stall.path)})
        img = qcow2(tmp_path / "q.qcow2", SIZE)
        d.blockdev_add(driver="file", node_name="qf", filename=str(img))
        d.blockdev_add(driver="qcow2", node_name="q", file="qf")
        stall.stop()
        time.sleep(2)  # past the kernel's cached attributes of the FUSE file
        with _monitor(d, 1) as m1:
            m1.send(json.dumps({"execute": "query-named-block-nodes"}))
            time.sleep(1)
            assert _no_reply(m1), "the query did not stall on the stopped file"
            d.ok("block-dirty-bitmap-add", node="q", name="meanwhile")
            # (Not d.bitmaps: a second query-named-block-nodes would hang on the file too.)
            assert "sha256" in d.ok("x-debug-block-dirty-bitmap-sha256", node="q",
                                    name="meanwhile")
            d.ok("block-dirty-bitmap-remove", node="q", name="meanwhile")
            d.ok("blockdev-reopen", options=[{
                "driver": "qcow2", "node-name": "q", "read-only": True,
                "file": "qf"}])
            assert d.ok("query-block") == []
            stall.cont()
            nodes = m1.reply(timeout=30)["return"]
            names = {n["node-name"] for n in nodes if not n["node-name"].startswith("#")}
            assert {"slow", "q"} <= names, names
        d.ok("blockdev-del", node_name="q")
        d.ok("blockdev-del", node_name="slow")
        iotests.qemu_img("check", str(img))
    finally:
        stall.close()

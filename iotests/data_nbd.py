"""Helpers shared by the NBD and qcow2 iotests (not a test module).

* :class:`WireClient`: a tiny raw NBD client (fixed newstyle handshake,
  ``NBD_OPT_GO``, optional structured replies) to look at the exact errno and
  error message a server sends, which ``qemu-io`` hides behind its own checks.
* export helpers: :func:`export`, :func:`unexport`, :func:`start_unix_server`,
  :func:`uri`, :func:`nbd_io` (qemu-io through a temporary writable export),
  :func:`node_io` (the harness's in-daemon I/O where it works, NBD on QSD).
* client tools: :func:`run`, :func:`nbdinfo_map`, :func:`nbdinfo_list`,
  :func:`image_map_flags`, :func:`merge_extents`.
* bitmap helpers: :func:`bitmap_add`, :func:`bitmap_cmd`, :func:`on_disk_bitmaps`.

Commands that take an argument called ``name`` go through an ``args`` dict:
``Daemon.cmd(name, ...)`` already uses ``name`` for the command.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import iotests
from iotests import Daemon

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

OPT_ABORT = 2
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
REP_ACK = 1
REP_INFO = 3
REP_ERR_UNKNOWN = 0x80000006

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES = range(7)
CHUNK_ERROR = 0x8001

#: NBD errno values (the protocol's own numbering).
EPERM, EIO, EINVAL, ENOSPC = 1, 5, 22, 28


class OptionError(Exception):
    """The server answered an option with an error reply."""

    def __init__(self, reply_type: int, message: bytes):
        super().__init__(f"option error {reply_type:#x}: {message!r}")
        self.reply_type = reply_type
        self.message = message


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"server closed the connection after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


class WireClient:
    """One raw NBD connection over a Unix socket."""

    def __init__(self, path: Union[str, Path], timeout: float = 10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.cookie = 0
        self.structured = False
        self.size: Optional[int] = None
        self.flags: Optional[int] = None

    def recv(self, n: int) -> bytes:
        return _recv_exact(self.sock, n)

    def greeting(self) -> int:
        """Reads NBDMAGIC, IHAVEOPT and the handshake flags; returns the flags."""
        magic, opt, flags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (NBDMAGIC, IHAVEOPT), (hex(magic), hex(opt))
        return flags

    def _option(self, opt: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def _option_reply(self) -> Tuple[int, bytes]:
        magic, _opt, rtype, length = struct.unpack(">QIII", self.recv(20))
        assert magic == OPT_REPLY_MAGIC, hex(magic)
        return rtype, self.recv(length)

    def go(self, name: str, structured: bool = False) -> Tuple[int, int]:
        """Full handshake into transmission; returns (export size, transmission flags).

        Raises :class:`OptionError` if the server refuses the export.
        """
        self.greeting()
        self.sock.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
        if structured:
            self._option(OPT_STRUCTURED_REPLY)
            rtype, payload = self._option_reply()
            if rtype != REP_ACK:
                raise OptionError(rtype, payload)
            self.structured = True
        raw = name.encode()
        self._option(OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
        while True:
            rtype, payload = self._option_reply()
            if rtype == REP_ACK:
                assert self.size is not None, "GO acknowledged without NBD_INFO_EXPORT"
                return self.size, self.flags or 0
            if rtype == REP_INFO:
                (itype,) = struct.unpack(">H", payload[:2])
                if itype == 0:
                    self.size, self.flags = struct.unpack(">QH", payload[2:12])
                continue
            if rtype & 0x80000000:
                raise OptionError(rtype, payload)

    def request(self, cmd: int, offset: int, length: int, payload: bytes = b"", flags: int = 0) -> Tuple[int, bytes]:
        """Sends one request; returns (errno, data).

        With structured replies an error chunk's message is returned as data.
        """
        self.cookie += 1
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, self.cookie, offset, length) + payload)
        # Even with structured replies negotiated a server may answer anything
        # but a successful read with a simple reply (QEMU does).
        err, data = 0, b""
        buf = bytearray(length) if cmd == CMD_READ else bytearray()
        while True:
            (magic,) = struct.unpack(">I", self.recv(4))
            if magic == SIMPLE_REPLY_MAGIC:
                err, cookie = struct.unpack(">IQ", self.recv(12))
                assert cookie == self.cookie, cookie
                if cmd == CMD_READ and err == 0:
                    data = self.recv(length)
                return err, data
            assert self.structured and magic == STRUCTURED_REPLY_MAGIC, hex(magic)
            cflags, ctype, cookie, clen = struct.unpack(">HHQI", self.recv(16))
            assert cookie == self.cookie, cookie
            body = self.recv(clen)
            if ctype & 0x8000:
                err, mlen = struct.unpack(">IH", body[:6])
                data = body[6:6 + mlen]
            elif ctype == 1:  # OFFSET_DATA: place by offset (chunks may come in any order)
                (at,) = struct.unpack(">Q", body[:8])
                buf[at - offset:at - offset + clen - 8] = body[8:]
            # OFFSET_HOLE (2): the bytes stay zero
            if cflags & 1:
                return err, (data if err else bytes(buf))

    def read(self, offset: int, length: int) -> Tuple[int, bytes]:
        return self.request(CMD_READ, offset, length)

    def write(self, offset: int, data: bytes) -> Tuple[int, bytes]:
        return self.request(CMD_WRITE, offset, len(data), data)

    def disconnect(self) -> None:
        """NBD_CMD_DISC, then close."""
        self.cookie += 1
        try:
            self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, self.cookie, 0, 0))
        finally:
            self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------- daemons


def ready(d: Daemon, timeout: float = 5.0) -> Daemon:
    """Connects QMP to monitor 0, retrying while the socket exists but does not
    listen yet (QSD binds before it listens; the harness only waits for the file)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            d.qmp()
            return d
        except Exception:  # pylint: disable=broad-except
            if time.monotonic() > deadline or not d.running():
                raise
            time.sleep(0.02)


def ready_factory(factory):
    """Wraps the ``make_daemon`` fixture so started daemons are :func:`ready`."""

    def make(*args: str, **kwargs: Any) -> Daemon:
        d = factory(*args, **kwargs)
        if kwargs.get("start", True) and kwargs.get("wait", True):
            ready(d)
        return d

    return make


# ---------------------------------------------------------------- exports


def uri(sock: Union[str, Path], name: str = "") -> str:
    """``nbd+unix:///NAME?socket=SOCK``."""
    return f"nbd+unix:///{name}?socket={sock}"


def start_unix_server(d: Daemon, name: str = "nbd", **opts: Any) -> Path:
    """``nbd-server-start`` on a fresh Unix socket of ``d``; returns its path."""
    path = d.sock(name)
    d.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(path)}}, **opts)
    d.nbd_sock = path
    return path


def export(d: Daemon, node: str, eid: str, name: Optional[str] = None, **opts: Any) -> None:
    """``block-export-add`` type nbd; ``opts`` keys get ``_`` -> ``-``."""
    args: Dict[str, Any] = {"type": "nbd", "id": eid, "node-name": node}
    if name is not None:
        args["name"] = name
    args.update({k.replace("_", "-"): v for k, v in opts.items()})
    d.ok("block-export-add", args)


def unexport(d: Daemon, eid: str, **opts: Any) -> dict:
    """``block-export-del`` and wait for its BLOCK_EXPORT_DELETED; returns the event."""
    d.ok("block-export-del", id=eid, **opts)
    return d.event_wait("BLOCK_EXPORT_DELETED", match={"id": eid})


_io_seq = 0


def nbd_io(d: Daemon, node: str, *commands: str, check: bool = True) -> str:
    """qemu-io ``commands`` against ``node`` through a temporary writable NBD export.

    Starts an NBD server on a Unix socket if the daemon has none known.
    Returns the filtered qemu-io output; with ``check`` asserts that no
    command failed.
    """
    global _io_seq
    sock = d.nbd_sock or start_unix_server(d, "nbd-io")
    _io_seq += 1
    eid = f"io{_io_seq}"
    export(d, node, eid, eid, writable=True)
    try:
        argv: List[str] = ["-f", "raw"]
        for c in commands:
            argv += ["-c", c]
        out = iotests.qemu_io(*argv, uri(sock, eid), check=False)
    finally:
        unexport(d, eid)
    if check:
        assert_io_ok(out)
    return out


def node_io(d: Daemon, node: str, *commands: str, check: bool = True) -> str:
    """I/O into a node inside the daemon: the harness's HMP route on blockd,
    a temporary NBD export on QSD (which has no HMP)."""
    if iotests.is_qsd():
        return nbd_io(d, node, *commands, check=check)
    out = d.node_io(node, *commands)
    if check:
        assert_io_ok(out)
    return out


_IO_FAILURES = ("failed", "Pattern verification", "error", "Error", "can't open")


def assert_io_ok(out: str) -> None:
    """Fails if qemu-io output reports a failed command or a pattern mismatch."""
    bad = [line for line in out.splitlines() if any(w in line for w in _IO_FAILURES)]
    assert not bad, out


def qemu_io_uri(target: str, *commands: str, read_only: bool = False, fmt: str = "raw") -> subprocess.CompletedProcess:
    """Runs qemu-io commands against ``target``; returns the completed process (text)."""
    argv = ["qemu-io", "-f", fmt]
    if read_only:
        argv.append("-r")
    for c in commands:
        argv += ["-c", c]
    argv.append(target)
    proc = run(argv)
    proc.stdout = iotests.filter_qemu_io(proc.stdout)
    return proc


# ---------------------------------------------------------------- client tools


def run(argv: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess:
    """Runs a client tool; returns the completed process with text output. A tool that is
    not installed fails the test (see :func:`iotests.missing_oracle`)."""
    try:
        return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        iotests.missing_oracle(str(argv[0]))
        raise


def check_run(argv: Sequence[str], timeout: float = 30) -> str:
    """Runs a client tool that must succeed; returns its stdout."""
    proc = run(argv, timeout)
    assert proc.returncode == 0, f"{list(argv)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def nbdinfo_list(server_uri: str) -> Dict[str, dict]:
    """``nbdinfo --json --list``: exports by name."""
    out = json.loads(check_run(["nbdinfo", "--json", "--list", server_uri]))
    return {e["export-name"]: e for e in out["exports"]}


Extent = Tuple[int, int, int]


def nbdinfo_map(export_uri: str, context: str = "base:allocation") -> List[Extent]:
    """``nbdinfo --json --map=CONTEXT``: merged [(offset, length, flags)]."""
    out = json.loads(check_run(["nbdinfo", "--json", f"--map={context}", export_uri]))
    return merge_extents([(e["offset"], e["length"], e["type"]) for e in out])


def merge_extents(extents: Sequence[Extent]) -> List[Extent]:
    """Joins neighbouring extents with the same flags (servers may split freely)."""
    merged: List[Extent] = []
    for off, length, flags in extents:
        if merged and merged[-1][2] == flags and merged[-1][0] + merged[-1][1] == off:
            merged[-1] = (merged[-1][0], merged[-1][1] + length, flags)
        else:
            merged.append((off, length, flags))
    return merged


def image_map_flags(image: Union[str, Path], *extra: str) -> List[Extent]:
    """``qemu-img map`` of a local image as NBD base:allocation flags
    (bit0 hole = no data, bit1 zero), merged."""
    out = json.loads(iotests.qemu_img("map", "--output=json", *extra, str(image)))
    return merge_extents(
        [(e["start"], e["length"], (0 if e["data"] else 1) | (2 if e["zero"] else 0)) for e in out]
    )


def dirty_ranges(extents: Sequence[Extent]) -> List[Tuple[int, int]]:
    """(offset, length) of the extents with bit0 set (dirty / allocated...)."""
    return [(off, length) for off, length, flags in extents if flags & 1]


# ---------------------------------------------------------------- bitmaps


def bitmap_add(d: Daemon, node: str, name: str, **opts: Any) -> None:
    """``block-dirty-bitmap-add``; ``opts``: granularity, persistent, disabled."""
    args = {"node": node, "name": name}
    args.update({k.replace("_", "-"): v for k, v in opts.items()})
    d.ok("block-dirty-bitmap-add", args)


def bitmap_cmd(d: Daemon, command: str, node: str, name: str) -> dict:
    """Runs ``block-dirty-bitmap-COMMAND`` on one bitmap; returns the whole response."""
    return d.cmd(f"block-dirty-bitmap-{command}", {"node": node, "name": name})


def bitmaps_by_name(d: Daemon, node: str) -> Dict[str, dict]:
    """The node's BlockDirtyInfo list keyed by name (nameless ones dropped)."""
    return {b["name"]: b for b in d.bitmaps(node) if "name" in b}


def on_disk_bitmaps(image: Union[str, Path], force_share: bool = False) -> Dict[str, dict]:
    """Bitmaps ``qemu-img info`` lists for a qcow2 file, by name
    (``{"flags": [...], "granularity": N}``); ``force_share`` adds ``-U``."""
    argv = ["info", "--output=json"]
    if force_share:
        argv.append("-U")
    info = json.loads(iotests.qemu_img(*argv, str(image)))
    data = info.get("format-specific", {}).get("data", {})
    return {b["name"]: {"flags": b["flags"], "granularity": b["granularity"]} for b in data.get("bitmaps", [])}


def image_info(image: Union[str, Path], force_share: bool = False) -> dict:
    """``qemu-img info --output=json`` of a local image."""
    argv = ["info", "--output=json"]
    if force_share:
        argv.append("-U")
    return json.loads(iotests.qemu_img(*argv, str(image)))


def image_check(image: Union[str, Path]) -> str:
    """``qemu-img check`` that must report a clean image; returns its output."""
    out = iotests.qemu_img("check", str(image))
    assert "No errors were found on the image." in out, out
    return out


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def qcow2_node_args(image: Union[str, Path], node: str = "n", file_node: str = "f",
                    extra: str = "") -> List[str]:
    """``--blockdev`` pair for a qcow2 image: a file node and a qcow2 node over it."""
    fmt = f"qcow2,node-name={node},file={file_node}" + (f",{extra}" if extra else "")
    return ["--blockdev", f"file,node-name={file_node},filename={image}", "--blockdev", fmt]

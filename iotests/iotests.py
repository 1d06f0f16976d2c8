"""Harness for blockd's integration tests ("iotests").

Every test drives a real daemon process through its QMP monitor socket(s).
The daemon under test is chosen by the environment:

* ``IOTESTS_DAEMON=blockd`` (default): the Rust daemon.  Its binary is
  ``$BLOCKD`` or else ``<repo>/target/release/blockd`` or
  ``<repo>/target/debug/blockd`` (first that exists).
* ``IOTESTS_DAEMON=qsd``: ``qemu-storage-daemon`` (``$QSD`` or from PATH),
  the reference implementation.  Every test that describes QEMU-defined
  behaviour must pass here.

Both daemons get exactly the same QSD-compatible command line.

Layout of this module:

* switch: :data:`DAEMON_KIND`, :func:`daemon_binary`, markers
  (:data:`blockd_only`, :data:`qsd_only`, :data:`qsd_crashes`)
* output filters: :func:`filter_qemu_io`, :func:`filter_qmp`
* image tools: :func:`qemu_img`, :func:`qemu_io`, :func:`create_image`
* :class:`RawQmp`: a byte-exact QMP client over a Unix socket
* :class:`Daemon`: one daemon process (start, sockets, QMP, events, I/O
  into nodes, shutdown, logs)
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import pytest

from qemu.qmp.legacy import QEMUMonitorProtocol

REPO = Path(__file__).resolve().parent.parent

#: Which daemon the suite runs against: "blockd" or "qsd".
DAEMON_KIND = os.environ.get("IOTESTS_DAEMON", "blockd").strip().lower()
if DAEMON_KIND not in ("blockd", "qsd"):
    raise RuntimeError(f"IOTESTS_DAEMON must be 'blockd' or 'qsd', not {DAEMON_KIND!r}")

#: Seconds to wait for a daemon to create its monitor socket.
START_TIMEOUT = float(os.environ.get("IOTESTS_START_TIMEOUT", "10"))
#: Default seconds to wait for a QMP reply or an event.
QMP_TIMEOUT = float(os.environ.get("IOTESTS_QMP_TIMEOUT", "10"))

#: Skips a test on QSD: behaviour where blockd goes beyond QEMU.
blockd_only = pytest.mark.skipif(DAEMON_KIND != "blockd", reason="blockd-only behaviour")
#: Skips a test on blockd: checks only meaningful for the reference daemon.
qsd_only = pytest.mark.skipif(DAEMON_KIND != "qsd", reason="qsd-only behaviour")
#: Skips a test on QSD because QSD 10.0.2 crashes on it (blockd must not).
qsd_crashes = pytest.mark.skipif(DAEMON_KIND == "qsd", reason="qemu-storage-daemon 10.0.2 crashes here")


def is_qsd() -> bool:
    """True when the suite runs against qemu-storage-daemon."""
    return DAEMON_KIND == "qsd"


#: The oracle tools the iotests run beside the daemon (Debian: qemu-utils, libnbd-bin).
ORACLE_TOOLS = ("qemu-img", "qemu-io", "nbdinfo", "nbdcopy")
#: Setting this to 1 lets tests whose oracle is missing be skipped (developers without the
#: tools only; tests/run.sh and CI never set it). Otherwise a missing oracle is a failure.
ALLOW_MISSING = "BLOCKD_ALLOW_MISSING_ORACLES"


def missing_oracle(tool: str) -> None:
    """A test needs ``tool`` and it is not installed: fail, or skip when opted out."""
    msg = (f"oracle {tool} is not installed (Debian: qemu-utils, libnbd-bin); "
           f"set {ALLOW_MISSING}=1 to skip such tests instead of failing them")
    if os.environ.get(ALLOW_MISSING) == "1":
        pytest.skip(msg)
    pytest.fail(msg, pytrace=False)


def missing_oracles() -> List[str]:
    """The oracle tools (QSD too when it is the daemon under test) not on PATH."""
    tools = list(ORACLE_TOOLS)
    if DAEMON_KIND == "qsd" and not os.environ.get("QSD"):
        tools.append("qemu-storage-daemon")
    return [t for t in tools if shutil.which(t) is None]


def daemon_binary() -> str:
    """Path of the daemon executable selected by the switch."""
    if DAEMON_KIND == "qsd":
        qsd = os.environ.get("QSD") or shutil.which("qemu-storage-daemon")
        if not qsd:
            missing_oracle("qemu-storage-daemon")
        return str(qsd)
    env = os.environ.get("BLOCKD")
    if env:
        return env
    for profile in ("release", "debug"):
        cand = REPO / "target" / profile / "blockd"
        if cand.exists():
            return str(cand)
    pytest.fail("blockd binary not found (set BLOCKD or build target/{release,debug}/blockd)",
                pytrace=False)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- filters

_QEMU_IO_TIMING = re.compile(
    r"^[0-9.]+ (?:bytes|[KMGTPE]iB), [0-9]+ ops; [0-9:.]+ sec \([^)]*\)\r?\n?", re.M
)


def filter_qemu_io(text: str) -> str:
    """Drops qemu-io's timing line ("64 KiB, 1 ops; 00.00 sec (...)")."""
    return _QEMU_IO_TIMING.sub("", text)


def filter_qmp(obj: Any) -> Any:
    """Copy of a QMP message with unstable values replaced.

    Timestamps become ``{"seconds": "SECS", "microseconds": "USECS"}``,
    auto-generated node names (``#block123``) become ``#blockNNN`` and the
    package string of a version becomes ``PACKAGE``.
    """
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k == "timestamp" and isinstance(v, dict):
                out[k] = {"seconds": "SECS", "microseconds": "USECS"}
            elif k == "package" and isinstance(v, str):
                out[k] = "PACKAGE"
            else:
                out[k] = filter_qmp(v)
        return out
    if isinstance(obj, list):
        return [filter_qmp(v) for v in obj]
    if isinstance(obj, str):
        return re.sub(r"#block[0-9]+", "#blockNNN", obj)
    return obj


# ---------------------------------------------------------------- image tools


def _run(argv: Sequence[str], check: bool, input: Optional[bytes] = None) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(
            list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, input=input, timeout=60
        )
    except FileNotFoundError:
        missing_oracle(argv[0])
        raise
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{shlex.join(argv)} exited {proc.returncode}:\n{proc.stdout.decode(errors='replace')}"
        )
    return proc


def qemu_img(*args: str, check: bool = True) -> str:
    """Runs ``qemu-img ARGS``; returns stdout+stderr text (raises on failure if check)."""
    return _run(["qemu-img", *map(str, args)], check).stdout.decode(errors="replace")


def qemu_io(*args: str, check: bool = True) -> str:
    """Runs ``qemu-io ARGS``; returns its filtered output (timing lines removed)."""
    return filter_qemu_io(_run(["qemu-io", *map(str, args)], check).stdout.decode(errors="replace"))


def create_image(path: Union[str, Path], size: Union[int, str], fmt: str = "raw", **opts: Any) -> Path:
    """Creates an image with qemu-img; ``opts`` become ``-o k=v`` (``_`` -> ``_`` kept)."""
    argv = ["create", "-q", "-f", fmt]
    if opts:
        argv += ["-o", ",".join(f"{k}={v}" for k, v in opts.items())]
    argv += [str(path), str(size)]
    qemu_img(*argv)
    return Path(path)


# ---------------------------------------------------------------- raw QMP


def _connect_unix(path: str, timeout: float) -> socket.socket:
    """Connects to a Unix socket, retrying while it is bound but not yet listening."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return sock
        except (ConnectionRefusedError, FileNotFoundError):
            sock.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


class RawQmp:
    """A QMP client that sends exact bytes and reads exact reply lines.

    Replies are read one line at a time (QEMU ends every message with CR LF).
    :meth:`recv` returns the next message of any kind; :meth:`reply` skips
    (and keeps) events.
    """

    def __init__(self, path: Union[str, Path], timeout: float = QMP_TIMEOUT):
        self.path = str(path)
        self.timeout = timeout
        self.sock = _connect_unix(self.path, timeout)
        self.buf = b""
        self.events: List[dict] = []
        #: Raw bytes of every line received, in order (for framing checks).
        self.lines: List[bytes] = []

    # -- bytes
    def send(self, data: Union[bytes, str]) -> None:
        """Sends ``data`` verbatim (str is UTF-8 encoded)."""
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def recv_line(self, timeout: Optional[float] = None) -> bytes:
        """Next line including its terminator; raises EOFError at end of stream."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no complete line from {self.path}; have {self.buf[:200]!r}")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"EOF from {self.path}; pending {self.buf[:200]!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        line += b"\n"
        self.lines.append(line)
        return line

    # -- messages
    def recv(self, timeout: Optional[float] = None) -> dict:
        """Next message (reply, error or event) as a dict."""
        return json.loads(self.recv_line(timeout))

    def reply(self, timeout: Optional[float] = None) -> dict:
        """Next reply or error; events met on the way are kept in ``events``."""
        while True:
            msg = self.recv(timeout)
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    def greeting(self) -> dict:
        """Reads the greeting (call once, right after connecting)."""
        msg = self.recv()
        assert "QMP" in msg, msg
        return msg

    def execute(self, name: str, arguments: Optional[dict] = None, **extra: Any) -> dict:
        """Sends one command (``extra`` adds top-level members such as ``id``) and returns the reply."""
        msg: Dict[str, Any] = {"execute": name}
        if arguments is not None:
            msg["arguments"] = arguments
        msg.update(extra)
        self.send(json.dumps(msg))
        return self.reply()

    def negotiate(self) -> dict:
        """Sends ``qmp_capabilities`` and returns its reply."""
        return self.execute("qmp_capabilities")

    def no_message(self, wait: float = 0.3) -> bool:
        """True if nothing arrives within ``wait`` seconds."""
        try:
            line = self.recv_line(wait)
        except TimeoutError:
            return True
        self.buf = line + self.buf
        self.lines.pop()
        return False

    def expect_eof(self, timeout: Optional[float] = None) -> None:
        """Asserts the server closes the stream (after any pending lines)."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no EOF")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return
            if not chunk:
                return
            self.buf += chunk

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "RawQmp":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------- daemon


class QmpError(AssertionError):
    """A command that was expected to succeed returned an error."""


class Daemon:
    """One daemon process (blockd or QSD) in a scratch directory.

    Typical use (through the ``make_daemon`` / ``daemon`` fixtures)::

        d = make_daemon("--blockdev", "driver=null-co,node-name=n0")
        d.cmd("block-dirty-bitmap-add", node="n0", name="b0")   # response dict
        d.ok("query-named-block-nodes", flat=True)              # return value
        d.node_io("n0", "write -P 0x5a 0 64k")                  # qemu-io text
    """

    _export_seq = 0

    def __init__(self, scratch: Union[str, Path], name: str = "d"):
        self.scratch = Path(scratch)
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.name = name
        # Unix socket paths are limited to 108 bytes; keep them short.
        if len(str(self.scratch)) > 70:
            self.sockdir = Path(tempfile.mkdtemp(prefix="iot-"))
        else:
            self.sockdir = self.scratch
        self.binary = daemon_binary()
        self.proc: Optional[subprocess.Popen] = None
        self.argv: List[str] = []
        self.log_path = self.scratch / f"{name}.log"
        self.monitor_paths: List[Path] = []
        self.nbd_sock: Optional[Path] = None
        self._nbd_started_by_harness = False
        self._conns: Dict[int, QEMUMonitorProtocol] = {}
        self._events: Dict[int, List[dict]] = {}
        self.returncode: Optional[int] = None

    # -- paths
    def sock(self, name: str) -> Path:
        """Path for a socket named ``name`` (short enough for AF_UNIX)."""
        return self.sockdir / f"{self.name}-{name}.sock"

    def path(self, name: str) -> Path:
        """Path of a file in the scratch directory."""
        return self.scratch / name

    def monitor_args(self, monitors: int = 1) -> List[str]:
        """``--chardev/--monitor`` pairs for ``monitors`` monitor sockets."""
        args: List[str] = []
        self.monitor_paths = []
        for i in range(monitors):
            p = self.sock(f"mon{i}")
            self.monitor_paths.append(p)
            args += [
                "--chardev", f"socket,id=mon{i},path={p},server=on,wait=off",
                "--monitor", f"chardev=mon{i}",
            ]
        return args

    # -- process
    def start(self, *args: str, monitors: int = 1, wait: bool = True, raw_argv: bool = False) -> "Daemon":
        """Starts the daemon with ``monitors`` monitor sockets followed by ``args``.

        With ``raw_argv`` the monitor options are not added (``args`` is the
        whole command line).  With ``wait`` the call returns once every
        monitor socket exists (raises with the log if the process dies first).
        """
        argv = [self.binary]
        if not raw_argv:
            argv += self.monitor_args(monitors)
        argv += [str(a) for a in args]
        self.argv = argv
        for i, a in enumerate(argv):
            if a == "--nbd-server" and i + 1 < len(argv):
                m = re.search(r"addr\.path=([^,]+)", argv[i + 1])
                if m:
                    self.nbd_sock = Path(m.group(1))
        with open(self.log_path, "ab") as log:
            log.write(f"$ {shlex.join(argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, preexec_fn=_die_with_parent,
            )
        _LIVE.add(self)
        if wait:
            for path in self.monitor_paths:
                self.wait_socket(path)
            if DAEMON_KIND == "qsd" and self.monitor_paths:
                self._qsd_settle(self.monitor_paths[0])
        return self

    def _qsd_settle(self, path: Path) -> None:
        """Waits until QSD answers on its first monitor.

        Under heavy load QSD 10.0.2 sometimes sends the greeting to a client
        that connects right after start-up and then never reads its input
        (a start-up race in its monitor set-up).  A throw-away client that
        completes negotiation proves the monitor is fully set up; tests then
        connect as usual.
        """
        for _ in range(5):
            try:
                with RawQmp(path, timeout=3) as probe:
                    probe.greeting()
                    if probe.negotiate() == {"return": {}}:
                        return
            except (TimeoutError, EOFError, OSError):
                if not self.running():
                    raise AssertionError(f"daemon died during start-up:\n{self.log()}") from None
        raise AssertionError(f"QSD monitor never answered:\n{self.log()}")

    def wait_socket(self, path: Union[str, Path], timeout: float = START_TIMEOUT) -> None:
        """Waits until ``path`` exists as a socket (without connecting, so a
        single-client monitor stays free); raises with the log if the daemon dies."""
        deadline = time.monotonic() + timeout
        path = Path(path)
        while time.monotonic() < deadline:
            if path.is_socket():
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited with {self.proc.returncode} before creating {path}:\n{self.log()}"
                )
            time.sleep(0.01)
        raise AssertionError(f"{path} not created within {timeout}s:\n{self.log()}")

    def wait_exit(self, timeout: float = QMP_TIMEOUT) -> int:
        """Waits for the process to end and returns its exit status."""
        assert self.proc is not None
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"daemon did not exit within {timeout}s:\n{self.log()}") from None
        self._drop_conns()
        return self.returncode

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Sends ``sig`` to the daemon process."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, then reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._drop_conns()

    def shutdown(self, timeout: float = QMP_TIMEOUT) -> int:
        """``quit`` on monitor 0, then waits for exit; returns the exit status."""
        if not self.running():
            self._drop_conns()
            return self.proc.returncode if self.proc else 0
        try:
            resp = self.cmd("quit")
            assert resp == {"return": {}}, resp
        except (EOFError, ConnectionError, OSError, asyncio.TimeoutError, Exception) as e:  # noqa: B014
            if self.running():
                raise AssertionError(f"quit failed: {e!r}\n{self.log()}") from e
        return self.wait_exit(timeout)

    def log(self) -> str:
        """Everything the daemon wrote to stdout/stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- QMP through qemu.qmp
    def qmp(self, monitor: int = 0) -> QEMUMonitorProtocol:
        """The negotiated qemu.qmp connection to monitor ``monitor`` (made on first use)."""
        conn = self._conns.get(monitor)
        if conn is None:
            # Hand qemu.qmp a connected socket: the retry in _connect_unix
            # covers the window between the daemon's bind() and listen().
            sock = _connect_unix(str(self.monitor_paths[monitor]), QMP_TIMEOUT)
            sock.settimeout(None)
            conn = QEMUMonitorProtocol(sock, nickname=f"{self.name}-mon{monitor}")
            conn.settimeout(QMP_TIMEOUT)
            conn.connect(negotiate=True)
            self._conns[monitor] = conn
            self._events[monitor] = []
        return conn

    def greeting(self, monitor: int = 0) -> dict:
        """Greeting the qemu.qmp connection received."""
        conn = self.qmp(monitor)
        return conn._get_greeting() or {}  # pylint: disable=protected-access

    def cmd(self, name: str, args: Optional[dict] = None, /, *, monitor: int = 0, **kwargs: Any) -> dict:
        """Runs one command; returns the whole response (``{"return": ..}`` or ``{"error": ..}``).

        Keyword arguments have ``_`` turned into ``-`` (``node_name=`` ->
        ``node-name``); pass ``args`` for names that must keep ``_``.
        """
        arguments = dict(args or {})
        arguments.update({k.replace("_", "-"): v for k, v in kwargs.items()})
        msg: Dict[str, Any] = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        return self.qmp(monitor).cmd_obj(msg)

    def ok(self, name: str, args: Optional[dict] = None, /, **kwargs: Any) -> Any:
        """Like :meth:`cmd` but asserts success and returns the ``return`` value."""
        resp = self.cmd(name, args, **kwargs)
        if "return" not in resp:
            raise QmpError(f"{name} {args or ''} {kwargs or ''} failed: {resp}")
        return resp["return"]

    def err(self, name: str, args: Optional[dict] = None, /, **kwargs: Any) -> dict:
        """Like :meth:`cmd` but asserts failure and returns the ``error`` object."""
        resp = self.cmd(name, args, **kwargs)
        if "error" not in resp:
            raise AssertionError(f"{name} {args or ''} {kwargs or ''} unexpectedly succeeded: {resp}")
        return resp["error"]

    def _pump(self, monitor: int, wait: float) -> None:
        conn = self.qmp(monitor)
        got = conn.get_events(wait=float(wait) if wait else False)
        self._events[monitor].extend(got)

    def get_events(self, monitor: int = 0, wait: float = 0) -> List[dict]:
        """All events received so far on ``monitor`` (clears the buffer)."""
        try:
            self._pump(monitor, wait)
        except asyncio.TimeoutError:
            pass
        evs, self._events[monitor] = self._events[monitor], []
        return evs

    def event_wait(self, name: str, timeout: float = QMP_TIMEOUT, monitor: int = 0,
                   match: Optional[dict] = None) -> dict:
        """Waits for the first event ``name`` whose ``data`` contains ``match``.

        Other events stay buffered for later :meth:`get_events` calls.
        """
        deadline = time.monotonic() + timeout
        self.qmp(monitor)
        while True:
            for i, ev in enumerate(self._events[monitor]):
                if ev.get("event") == name and _contains(ev.get("data", {}), match or {}):
                    return self._events[monitor].pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"event {name} {match or ''} not seen in {timeout}s; got {self._events[monitor]}")
            try:
                self._pump(monitor, min(left, 1.0))
            except asyncio.TimeoutError:
                pass

    def _drop_conns(self) -> None:
        for conn in self._conns.values():
            try:
                conn.close()
            except Exception:  # pylint: disable=broad-except
                pass
        self._conns.clear()

    # -- raw QMP
    def raw(self, monitor: int = 0, negotiate: bool = False) -> RawQmp:
        """A :class:`RawQmp` on ``monitor`` with the greeting already read.

        The monitor must not also be used through :meth:`qmp` (QSD serves one
        client per monitor at a time).
        """
        r = RawQmp(self.monitor_paths[monitor])
        r.greeting_msg = r.greeting()
        if negotiate:
            resp = r.negotiate()
            assert resp == {"return": {}}, resp
        return r

    # -- nodes
    def blockdev_add(self, **opts: Any) -> dict:
        """``blockdev-add`` with ``opts`` (top-level ``_`` -> ``-``); asserts success."""
        return self.ok("blockdev-add", **opts)

    def nodes(self) -> List[dict]:
        """``query-named-block-nodes`` with ``flat: true``."""
        return self.ok("query-named-block-nodes", flat=True)

    def node(self, name: str) -> dict:
        """The query-named-block-nodes entry of node ``name``."""
        for n in self.nodes():
            if n.get("node-name") == name:
                return n
        raise AssertionError(f"node {name} not found")

    def bitmaps(self, node: str) -> List[dict]:
        """``dirty-bitmaps`` of ``node`` (empty list when the key is absent)."""
        return self.node(node).get("dirty-bitmaps", [])

    def bitmap(self, node: str, name: str) -> dict:
        """The BlockDirtyInfo of bitmap ``name`` on ``node``."""
        for b in self.bitmaps(node):
            if b.get("name") == name:
                return b
        raise AssertionError(f"bitmap {name} not on {node}: {self.bitmaps(node)}")

    def sha256(self, node: str, name: str) -> str:
        """``x-debug-block-dirty-bitmap-sha256`` of the bitmap."""
        return self.ok("x-debug-block-dirty-bitmap-sha256", node=node, name=name)["sha256"]

    # -- I/O into a node
    def node_io(self, node: str, *commands: str) -> str:
        """Runs qemu-io ``commands`` against ``node`` inside the daemon.

        blockd: ``human-monitor-command`` ``qemu-io NODE "CMD"`` per command.
        QSD (no HMP): a temporary writable NBD export of the node and a
        ``qemu-io -f raw nbd+unix://`` client.  Returns the filtered output
        text of all commands, concatenated.
        """
        if DAEMON_KIND == "blockd":
            out = []
            for c in commands:
                line = f'qemu-io {node} "{c}"'
                out.append(self.ok("human-monitor-command", {"command-line": line}))
            # The monitor ends lines with CR LF; qemu-io itself prints LF.
            return filter_qemu_io("".join(out).replace("\r\n", "\n"))
        return self._nbd_io(node, commands)

    def _ensure_nbd_server(self) -> Path:
        if self.nbd_sock is None:
            path = self.sock("nbd-io")
            self.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(path)}})
            self.nbd_sock = path
            self._nbd_started_by_harness = True
        return self.nbd_sock

    def _nbd_io(self, node: str, commands: Iterable[str]) -> str:
        sock = self._ensure_nbd_server()
        Daemon._export_seq += 1
        eid = f"iotests-io-{Daemon._export_seq}"
        self.ok("block-export-add", type="nbd", id=eid, node_name=node, name=eid, writable=True)
        try:
            argv = ["-f", "raw"]
            for c in commands:
                argv += ["-c", c]
            out = qemu_io(*argv, f"nbd+unix:///{eid}?socket={sock}", check=False)
        finally:
            self.ok("block-export-del", id=eid)
            self.event_wait("BLOCK_EXPORT_DELETED", match={"id": eid})
        return out


_LIVE: "weakref.WeakSet[Daemon]" = weakref.WeakSet()


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if the test runner dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@atexit.register
def _kill_leftovers() -> None:
    for d in list(_LIVE):
        try:
            d.kill()
        except Exception:  # pylint: disable=broad-except
            pass


def _contains(data: Any, match: Any) -> bool:
    if isinstance(match, dict):
        return isinstance(data, dict) and all(k in data and _contains(data[k], v) for k, v in match.items())
    return data == match

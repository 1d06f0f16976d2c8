"""NBD server lifecycle: starting, stopping, exports, QMP shapes and events.

Every expected error text below was observed on qemu-storage-daemon 10.0.2.
"""

from __future__ import annotations

import socket

import pytest

import iotests
import data_nbd
from data_nbd import (
    REP_ERR_UNKNOWN,
    OptionError,
    WireClient,
    export,
    free_tcp_port,
    qemu_io_uri,
    start_unix_server,
    unexport,
    uri,
)


@pytest.fixture
def make_daemon(make_daemon):
    """The harness factory, returning daemons whose monitor already answers."""
    return data_nbd.ready_factory(make_daemon)

SIZE = 1 << 20


@pytest.fixture
def raw_image(tmp_path):
    img = tmp_path / "disk.raw"
    iotests.create_image(img, SIZE)
    iotests.qemu_io("-f", "raw", "-c", "write -P 0x5a 0 64k", str(img))
    return img


def file_node(img):
    return ["--blockdev", f"file,node-name=f,filename={img}"]


def test_cmdline_server_and_export_serve_and_are_listed(make_daemon, raw_image):
    d = make_daemon(start=False)
    sock = d.sock("nbd")
    d.start(*file_node(raw_image), "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e0,node-name=f,name=x,writable=on")
    data_nbd.ready(d)

    assert d.ok("query-block-exports") == [
        {"id": "e0", "type": "nbd", "node-name": "f", "shutting-down": False}
    ]
    p = qemu_io_uri(uri(sock, "x"), "read -P 0x5a 0 64k", "write -P 0x61 64k 4k", "read -P 0x61 64k 4k")
    assert p.returncode == 0 and "failed" not in p.stdout and "verification" not in p.stdout, p.stdout


def test_second_server_start_is_refused(make_daemon, raw_image):
    d = make_daemon(start=False)
    sock = d.sock("nbd")
    d.start(*file_node(raw_image), "--nbd-server", f"addr.type=unix,addr.path={sock}")
    data_nbd.ready(d)

    err = d.err("nbd-server-start", addr={"type": "unix", "data": {"path": str(d.sock("other"))}})
    assert err == {"class": "GenericError", "desc": "NBD server already running"}


def test_qmp_server_start_on_unix_socket_serves_export(make_daemon, raw_image):
    d = make_daemon(*file_node(raw_image))
    sock = start_unix_server(d)
    export(d, "f", "e0", "x")

    p = qemu_io_uri(uri(sock, "x"), "read -P 0x5a 0 64k", "read -P 0 64k 64k", read_only=True)
    assert p.returncode == 0 and "failed" not in p.stdout and "verification" not in p.stdout, p.stdout


def test_qmp_server_start_on_inet_serves_export(make_daemon, raw_image):
    d = make_daemon(*file_node(raw_image))
    port = free_tcp_port()
    d.ok("nbd-server-start", addr={"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}})
    export(d, "f", "e0", "x")

    p = qemu_io_uri(f"nbd://127.0.0.1:{port}/x", "read -P 0x5a 0 64k", read_only=True)
    assert p.returncode == 0 and "failed" not in p.stdout and "verification" not in p.stdout, p.stdout


def test_export_name_defaults_to_node_name(make_daemon, raw_image):
    d = make_daemon(*file_node(raw_image))
    sock = start_unix_server(d)
    export(d, "f", "e0")

    p = qemu_io_uri(uri(sock, "f"), "read -P 0x5a 0 64k", read_only=True)
    assert p.returncode == 0 and "verification" not in p.stdout, p.stdout


def test_max_connections_holds_extra_client_until_a_slot_frees(make_daemon, raw_image):
    # QEMU does not refuse the extra client: it stops accepting until a slot frees.
    d = make_daemon(*file_node(raw_image))
    sock = start_unix_server(d, max_connections=1)
    export(d, "f", "e0", "x")

    first = WireClient(sock)
    first.greeting()
    second = WireClient(sock, timeout=0.5)
    with pytest.raises(socket.timeout):
        second.greeting()
    first.close()
    second.sock.settimeout(5)
    second.greeting()
    second.close()


def test_server_stop_removes_exports_and_emits_events(make_daemon, raw_image):
    d = make_daemon(*file_node(raw_image))
    sock = start_unix_server(d)
    export(d, "f", "e0", "x")
    export(d, "f", "e1", "y")
    client = WireClient(sock)
    client.go("x")

    d.ok("nbd-server-stop")

    assert d.ok("query-block-exports") == []
    deleted = {d.event_wait("BLOCK_EXPORT_DELETED")["data"]["id"] for _ in range(2)}
    assert deleted == {"e0", "e1"}
    with pytest.raises((ConnectionError, OSError)):
        client.read(0, 512)
    with pytest.raises(OSError):
        WireClient(sock).greeting()


def test_server_stop_when_not_running_is_refused(daemon):
    assert daemon.err("nbd-server-stop") == {"class": "GenericError", "desc": "NBD server not running"}


def test_export_add_without_server_is_refused(make_daemon, raw_image):
    d = make_daemon(*file_node(raw_image))
    err = d.err("block-export-add", {"type": "nbd", "id": "e0", "node-name": "f"})
    assert err == {"class": "GenericError", "desc": "NBD server not running"}


def test_server_can_restart_after_stop(make_daemon, raw_image):
    d = make_daemon(*file_node(raw_image))
    start_unix_server(d)
    d.ok("nbd-server-stop")
    sock = start_unix_server(d, "nbd2")
    export(d, "f", "e0", "x")

    p = qemu_io_uri(uri(sock, "x"), "read -P 0x5a 0 64k", read_only=True)
    assert p.returncode == 0 and "verification" not in p.stdout, p.stdout


@pytest.mark.parametrize(
    "args, desc",
    [
        ({"id": "e0", "node-name": "f", "name": "other"}, "Block export id 'e0' is already in use"),
        ({"id": "e1", "node-name": "f", "name": "x"}, "NBD server already has export named 'x'"),
        ({"id": "e1", "node-name": "nosuch"}, "Cannot find device='' nor node-name='nosuch'"),
        ({"id": "e1", "node-name": "f", "name": "y", "bitmaps": ["nob"]}, "Bitmap 'nob' is not found"),
        ({"id": "", "node-name": "f", "name": "y"}, "Invalid block export id"),
        ({"id": "e1", "node-name": "f", "name": "a" * 4097}, f"export name '{'a' * 4097}' too long"),
        ({"id": "e1", "node-name": "f", "name": "y", "description": "d" * 4097},
         f"description '{'d' * 4097}' too long"),
    ],
    ids=["dup-id", "dup-name", "no-node", "no-bitmap", "empty-id", "long-name", "long-description"],
)
def test_export_add_errors(make_daemon, raw_image, args, desc):
    d = make_daemon(*file_node(raw_image))
    start_unix_server(d)
    export(d, "f", "e0", "x")

    err = d.err("block-export-add", {"type": "nbd", **args})

    assert err == {"class": "GenericError", "desc": desc}
    assert [e["id"] for e in d.ok("query-block-exports")] == ["e0"]


def test_export_name_of_4096_bytes_is_accepted(make_daemon, raw_image):
    d = make_daemon(*file_node(raw_image))
    start_unix_server(d)
    export(d, "f", "e0", "a" * 4096, description="d" * 4096)
    assert [e["id"] for e in d.ok("query-block-exports")] == ["e0"]


def test_writable_export_of_read_only_node_is_refused(make_daemon, raw_image):
    d = make_daemon("--blockdev", f"file,node-name=f,filename={raw_image},read-only=on")
    start_unix_server(d)
    err = d.err("block-export-add", {"type": "nbd", "id": "e0", "node-name": "f", "writable": True})
    assert err == {"class": "GenericError", "desc": "Cannot export read-only node as writable"}


def test_query_block_exports_lists_newest_first(make_daemon, raw_image):
    d = make_daemon(*file_node(raw_image))
    start_unix_server(d)
    export(d, "f", "e0", "x")
    export(d, "f", "e1", "y", writable=True)

    assert d.ok("query-block-exports") == [
        {"id": "e1", "type": "nbd", "node-name": "f", "shutting-down": False},
        {"id": "e0", "type": "nbd", "node-name": "f", "shutting-down": False},
    ]


def test_export_del_emits_event_and_frees_the_name(make_daemon, raw_image):
    d = make_daemon(*file_node(raw_image))
    sock = start_unix_server(d)
    export(d, "f", "e0", "x")

    ev = unexport(d, "e0")

    assert iotests.filter_qmp(ev) == {
        "event": "BLOCK_EXPORT_DELETED",
        "data": {"id": "e0"},
        "timestamp": {"seconds": "SECS", "microseconds": "USECS"},
    }
    assert d.ok("query-block-exports") == []
    with pytest.raises(OptionError) as exc:
        WireClient(sock).go("x")
    assert exc.value.reply_type == REP_ERR_UNKNOWN
    export(d, "f", "e0", "x")


def test_export_del_unknown_id_is_refused(make_daemon, raw_image):
    d = make_daemon(*file_node(raw_image))
    start_unix_server(d)
    assert d.err("block-export-del", id="nosuch") == {"class": "GenericError", "desc": "Export 'nosuch' is not found"}


def test_export_del_safe_refuses_while_a_client_is_connected(make_daemon, raw_image):
    d = make_daemon(*file_node(raw_image))
    sock = start_unix_server(d)
    export(d, "f", "e0", "x")
    client = WireClient(sock)
    client.go("x")

    err = d.err("block-export-del", id="e0")

    assert err == {"class": "GenericError", "desc": "export 'e0' still in use"}
    assert d.ok("query-block-exports") == [{"id": "e0", "type": "nbd", "node-name": "f", "shutting-down": False}]
    assert d.get_events(wait=0.2) == []
    err_no, data = client.read(0, 4)
    assert (err_no, data) == (0, b"\x5a" * 4)
    client.disconnect()


def test_export_del_hard_drops_connected_clients(make_daemon, raw_image):
    d = make_daemon(*file_node(raw_image))
    sock = start_unix_server(d)
    export(d, "f", "e0", "x")
    client = WireClient(sock)
    client.go("x")

    ev = unexport(d, "e0", mode="hard")

    assert ev["data"] == {"id": "e0"}
    assert d.ok("query-block-exports") == []
    with pytest.raises((ConnectionError, OSError)):
        client.read(0, 512)


def test_legacy_nbd_server_add_and_remove(make_daemon, raw_image):
    d = make_daemon(*file_node(raw_image))
    sock = start_unix_server(d)

    d.ok("nbd-server-add", device="f", writable=True, description="legacy")
    assert d.ok("query-block-exports") == [{"id": "f", "type": "nbd", "node-name": "f", "shutting-down": False}]
    p = qemu_io_uri(uri(sock, "f"), "read -P 0x5a 0 64k", "write -P 0x77 0 512", "read -P 0x77 0 512")
    assert p.returncode == 0 and "failed" not in p.stdout and "verification" not in p.stdout, p.stdout

    assert d.err("nbd-server-add", device="f") == {"class": "GenericError", "desc": "Block export id 'f' is already in use"}
    assert d.err("nbd-server-add", device="nosuch") == {
        "class": "GenericError", "desc": "Cannot find device='nosuch' nor node-name='nosuch'"}

    d.ok("nbd-server-remove", {"name": "f"})
    assert d.event_wait("BLOCK_EXPORT_DELETED")["data"] == {"id": "f"}
    assert d.ok("query-block-exports") == []
    assert d.err("nbd-server-remove", {"name": "f"}) == {"class": "GenericError", "desc": "Export 'f' is not found"}


def test_legacy_nbd_server_add_with_name_uses_it_as_id(make_daemon, raw_image):
    d = make_daemon(*file_node(raw_image))
    sock = start_unix_server(d)

    d.ok("nbd-server-add", {"device": "f", "name": "old"})

    assert [e["id"] for e in d.ok("query-block-exports")] == ["old"]
    p = qemu_io_uri(uri(sock, "old"), "read -P 0x5a 0 64k", read_only=True)
    assert p.returncode == 0 and "verification" not in p.stdout, p.stdout


def test_client_abandoning_handshake_leaves_server_serving(make_daemon, raw_image):
    d = make_daemon(*file_node(raw_image))
    sock = start_unix_server(d)
    export(d, "f", "e0", "x")

    # 1: connect and close without reading; 2: read the greeting and close;
    # 3: send garbage instead of client flags; 4: stop in the middle of an option.
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(sock))
    s.close()
    c = WireClient(sock)
    c.greeting()
    c.close()
    c = WireClient(sock)
    c.greeting()
    c.sock.sendall(b"\xff" * 64)
    c.close()
    c = WireClient(sock)
    c.greeting()
    c.sock.sendall(b"\0\0\0\3" + b"IHAVEOPT\0\0\0\7\0\0\0\x40abc")
    c.close()

    p = qemu_io_uri(uri(sock, "x"), "read -P 0x5a 0 64k", read_only=True)
    assert p.returncode == 0 and "verification" not in p.stdout, p.stdout
    assert d.ok("query-block-exports")[0]["id"] == "e0"
    assert d.running()


@pytest.mark.parametrize("limit", [1, 0])
def test_handshake_max_seconds_is_honoured(make_daemon, raw_image, limit):
    """A client that stalls after the greeting is dropped after handshake-max-seconds; 0
    means no limit (it was accepted and ignored: blockd dropped it after the default 10 s)."""
    d = make_daemon(*file_node(raw_image))
    sock = start_unix_server(d, handshake_max_seconds=limit)
    c = WireClient(sock, timeout=4.0)
    c.greeting()
    if limit:
        assert c.sock.recv(1) == b"", "the stalled client is dropped"
    else:
        with pytest.raises(socket.timeout):
            c.sock.recv(1)
    c.close()
    assert d.running()


def test_unknown_export_name_is_refused_at_handshake(make_daemon, raw_image):
    d = make_daemon(*file_node(raw_image))
    sock = start_unix_server(d)
    export(d, "f", "e0", "x")

    with pytest.raises(OptionError) as exc:
        WireClient(sock).go("nosuch")
    assert exc.value.reply_type == REP_ERR_UNKNOWN

    p = qemu_io_uri(uri(sock, "nosuch"), "read 0 512", read_only=True)
    assert p.returncode == 1
    assert "Requested export not available" in p.stderr, p.stderr
    assert "server reported: export 'nosuch' not present" in p.stderr, p.stderr


def test_quit_with_connected_client_exits(make_daemon, raw_image):
    d = make_daemon(*file_node(raw_image))
    sock = start_unix_server(d)
    export(d, "f", "e0", "x", writable=True)
    client = WireClient(sock)
    client.go("x")
    assert client.write(0, b"q" * 512)[0] == 0

    assert d.shutdown() == 0

    with open(raw_image, "rb") as f:
        assert f.read(512) == b"q" * 512


# ------------------------------------------------------------ export ids (issue 15)

# Observed on QSD 10.0.2 (QEMU's id_wellformed): an ASCII letter, then ASCII letters,
# digits, '-', '.', '_'.
BAD_EXPORT_IDS = ["", "1a", "a b", "-a", "_a", ".a", "a/b", "\u00e9", "a:b", "a+b", "#a", "a\u00e9"]
GOOD_EXPORT_IDS = ["a", "a-b.c_d", "A9", "z" * 200]


@pytest.mark.parametrize("eid", BAD_EXPORT_IDS)
def test_ill_formed_export_id_is_refused(make_daemon, eid):
    d = make_daemon("--blockdev", "null-co,node-name=n")
    invalid = {"class": "GenericError", "desc": "Invalid block export id"}
    # Checked before anything else, even whether the server runs.
    assert d.err("block-export-add", {"type": "nbd", "id": eid, "node-name": "nosuch"}) == invalid
    start_unix_server(d)
    assert d.err("block-export-add", {"type": "nbd", "id": eid, "node-name": "n"}) == invalid
    # nbd-server-add uses the export name as the id.
    assert d.err("nbd-server-add", device="n", name=eid) == invalid
    assert d.ok("query-block-exports") == []


def test_well_formed_export_ids_are_accepted(make_daemon):
    d = make_daemon("--blockdev", "null-co,node-name=n")
    start_unix_server(d)
    for i, eid in enumerate(GOOD_EXPORT_IDS):
        export(d, "n", eid, f"x{i}")
    assert sorted(e["id"] for e in d.ok("query-block-exports")) == sorted(GOOD_EXPORT_IDS)

"""QMP wire protocol: greeting, negotiation, framing, ids, request validation, events.

Every expectation here was observed on qemu-storage-daemon 10.0.2 unless the
test is marked ``blockd_only``.  Raw-socket tests send exact bytes and read
exact lines, so they need a monitor that nothing else uses.
"""

from __future__ import annotations

import json
import time

import pytest

from iotests import RawQmp, blockd_only

PROBE = '{"execute":"query-version","id":"probe"}'


def exchange(r: RawQmp, data, timeout: float = 10) -> list:
    """Sends ``data`` then a probe; returns every message before the probe's reply."""
    r.send(data)
    r.send(PROBE)
    out = []
    while True:
        msg = r.recv(timeout)
        if msg.get("id") == "probe":
            assert "return" in msg, msg
            return out
        out.append(msg)


def only_error(msgs: list) -> dict:
    """The single error reply in ``msgs`` (asserts there is exactly one message)."""
    assert len(msgs) == 1, msgs
    assert "error" in msgs[0], msgs[0]
    return msgs[0]


def version_reply_ok(msg: dict) -> None:
    assert set(msg["return"]) == {"qemu", "package"}, msg


# ------------------------------------------------------------ greeting


def test_greeting_offers_version_and_oob(daemon):
    r = daemon.raw()
    g = r.greeting_msg
    assert set(g) == {"QMP"}
    assert set(g["QMP"]) == {"version", "capabilities"}
    assert set(g["QMP"]["version"]) == {"qemu", "package"}
    q = g["QMP"]["version"]["qemu"]
    assert set(q) == {"major", "minor", "micro"}
    assert all(isinstance(v, int) for v in q.values())
    assert isinstance(g["QMP"]["version"]["package"], str)
    assert g["QMP"]["capabilities"] == ["oob"]


def test_greeting_and_replies_end_with_crlf(daemon):
    r = daemon.raw(negotiate=True)
    r.send(PROBE)
    r.reply()
    assert r.lines, "no lines read"
    for line in r.lines:
        assert line.endswith(b"}\r\n"), line


def test_query_version_matches_greeting(daemon):
    greeting = daemon.greeting()["QMP"]["version"]
    assert daemon.ok("query-version") == greeting


# ------------------------------------------------------------ negotiation


def test_command_before_negotiation_is_command_not_found(daemon):
    r = daemon.raw()
    resp = r.execute("query-version", id=1)
    assert resp == {
        "id": 1,
        "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"},
    }


def test_unknown_command_before_negotiation_is_refused_the_same_way(daemon):
    r = daemon.raw()
    resp = r.execute("nosuch", id=2)
    assert resp["error"]["desc"] == "Expecting capabilities negotiation with 'qmp_capabilities'"
    assert resp["error"]["class"] == "CommandNotFound"


def test_negotiation_succeeds_with_empty_return(daemon):
    r = daemon.raw()
    assert r.execute("qmp_capabilities", id="n") == {"return": {}, "id": "n"}
    version_reply_ok(r.execute("query-version"))


def test_second_negotiation_is_command_not_found(daemon):
    r = daemon.raw(negotiate=True)
    resp = r.execute("qmp_capabilities", id=2)
    assert resp == {
        "id": 2,
        "error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"},
    }
    version_reply_ok(r.execute("query-version"))


def test_negotiation_with_unknown_capability_fails_and_can_be_retried(daemon):
    r = daemon.raw()
    resp = r.execute("qmp_capabilities", {"enable": ["foo"]})
    assert resp["error"]["class"] == "GenericError"
    # QSD's (odd) text: "Parameter 'null' does not accept value 'foo'"
    assert "'foo'" in resp["error"]["desc"]
    assert r.execute("query-version")["error"]["class"] == "CommandNotFound"
    assert r.negotiate() == {"return": {}}


def test_negotiation_with_enable_not_a_list_is_type_error(daemon):
    r = daemon.raw()
    resp = r.execute("qmp_capabilities", {"enable": "oob"})
    assert resp["error"] == {"class": "GenericError", "desc": "Invalid parameter type for 'enable', expected: array"}


def test_negotiation_with_unexpected_argument_is_refused(daemon):
    r = daemon.raw()
    resp = r.execute("qmp_capabilities", {"x": 1}, id=3)
    assert resp == {"id": 3, "error": {"class": "GenericError", "desc": "Parameter 'x' is unexpected"}}


def test_exec_oob_after_enabling_oob_reports_command_lacks_oob_support(daemon):
    r = daemon.raw()
    assert r.execute("qmp_capabilities", {"enable": ["oob"]}) == {"return": {}}
    r.send('{"exec-oob":"query-version","id":4}')
    assert r.reply() == {
        "id": 4,
        "error": {"class": "GenericError", "desc": "The command query-version does not support OOB"},
    }


def test_execute_and_exec_oob_together_clash(daemon):
    r = daemon.raw()
    assert r.execute("qmp_capabilities", {"enable": ["oob"]}) == {"return": {}}
    r.send('{"exec-oob":"query-version","execute":"query-version","id":5}')
    assert r.reply() == {
        "id": 5,
        "error": {"class": "GenericError", "desc": "QMP input member 'execute' clashes with 'exec-oob'"},
    }


# ------------------------------------------------------------ ids

ID_VALUES = [
    1,
    0,
    -1,
    "s",
    "",
    None,
    True,
    False,
    1.5,
    [1, 2],
    [],
    {},
    {"a": [1, {"b": None}]},
    -9223372036854775808,
    12345678901234567890,
    "\u00e9\U0001F600",
    "\u0000 nul",
    'quote " and \\ backslash',
]


@pytest.mark.parametrize("value", ID_VALUES, ids=[json.dumps(v) for v in ID_VALUES])
def test_id_is_echoed_verbatim(daemon, value):
    r = daemon.raw(negotiate=True)
    r.send(json.dumps({"execute": "query-version", "id": value}))
    resp = r.reply()
    assert "id" in resp and resp["id"] == value and type(resp["id"]) is type(value)
    version_reply_ok(resp)


def test_id_is_echoed_on_command_errors(daemon):
    r = daemon.raw(negotiate=True)
    r.send(json.dumps({"execute": "nosuch", "id": {"k": [1, "x"]}}))
    assert r.reply()["id"] == {"k": [1, "x"]}


def test_reply_has_no_id_when_request_had_none(daemon):
    r = daemon.raw(negotiate=True)
    r.send('{"execute":"query-version"}')
    assert "id" not in r.reply()


def test_id_nested_500_deep_is_echoed(daemon):
    # QEMU accepts nesting up to 1024 levels; a parser with a small recursion
    # limit (serde_json's default is 128) would wrongly refuse this.
    value = 1
    for _ in range(500):
        value = [value]
    r = daemon.raw(negotiate=True)
    r.send(json.dumps({"execute": "query-version", "id": value}))
    assert r.reply()["id"] == value


def test_large_string_id_is_echoed(daemon):
    value = "x" * (256 * 1024)
    r = daemon.raw(negotiate=True)
    r.send(json.dumps({"execute": "query-version", "id": value}))
    assert r.reply(timeout=30)["id"] == value


# ------------------------------------------------------------ framing


def test_concatenated_requests_get_replies_in_order(daemon):
    r = daemon.raw(negotiate=True)
    r.send('{"execute":"query-version","id":1}{"execute":"query-version","id":2}')
    assert r.reply()["id"] == 1
    assert r.reply()["id"] == 2


def test_request_split_across_writes_is_assembled(daemon):
    r = daemon.raw(negotiate=True)
    r.send('{"execute":"query-')
    time.sleep(0.1)
    r.send('version","id":')
    time.sleep(0.1)
    r.send("42}")
    assert r.reply()["id"] == 42


def test_request_needs_no_newline(daemon):
    r = daemon.raw(negotiate=True)
    r.send('{"execute":"query-version","id":7}')
    assert r.reply()["id"] == 7


def test_whitespace_and_blank_lines_between_requests_are_ignored(daemon):
    r = daemon.raw(negotiate=True)
    assert exchange(r, '\n\n\r\n  \t{"execute":"query-version","id":35}  \n') == [
        {"return": daemon_version(r), "id": 35}
    ]


def daemon_version(r: RawQmp) -> dict:
    return r.greeting_msg["QMP"]["version"]


def test_single_quoted_strings_are_accepted(daemon):
    r = daemon.raw(negotiate=True)
    r.send("{'execute':'query-version','id':'sq'}")
    assert r.reply()["id"] == "sq"


def test_single_quoted_string_may_contain_double_quote(daemon):
    r = daemon.raw(negotiate=True)
    r.send("{\"execute\":\"query-version\",\"id\":'it\"s'}")
    assert r.reply()["id"] == 'it"s'


def test_unicode_escapes_in_strings_are_decoded(daemon):
    r = daemon.raw(negotiate=True)
    r.send('{"execute":"query-version","id":"\\u00e9\\ud83d\\ude00"}')
    assert r.reply()["id"] == "\u00e9\U0001F600"


def test_utf8_in_strings_is_accepted(daemon):
    r = daemon.raw(negotiate=True)
    r.send('{"execute":"query-version","id":"\u00e9"}'.encode())
    assert r.reply()["id"] == "\u00e9"


# ------------------------------------------------------------ validation
#
# (bytes sent, expected class, expected desc, expected id or MISSING).
# Every case gives exactly one error on QSD and leaves the connection usable.

MISSING = object()
PARSE = "JSON parse error"  # desc prefix; the rest names QEMU's lexer state

VALIDATION_CASES = [
    ("unterminated-string", '{"foo\n', "GenericError", PARSE, MISSING),
    ("lone-close-brace", "}", "GenericError", "JSON parse error, expecting value", MISSING),
    ("bad-keyword", "xyz ", "GenericError", "JSON parse error, invalid keyword 'xyz'", MISSING),
    ("trailing-comma", '{"execute":"query-version",}', "GenericError", "JSON parse error, expecting value", MISSING),
    ("missing-comma", '{"execute":"query-version" "id":22}', "GenericError",
     "JSON parse error, expected separator in dict", MISSING),
    ("duplicate-key", '{"execute":"query-version","id":26,"id":27}', "GenericError",
     "JSON parse error, duplicate key", MISSING),
    ("bad-escape", '{"execute":"query-version","id":"a\\qb"}', "GenericError",
     "JSON parse error, invalid escape sequence in string", MISSING),
    ("nul-byte", "\x00", "GenericError", PARSE, MISSING),
    ("invalid-utf8", b"\xff", "GenericError", PARSE, MISSING),
    ("array", "[]", "GenericError", "QMP input must be a JSON object", MISSING),
    ("array-of-command", '[{"execute":"query-version","id":1}]', "GenericError",
     "QMP input must be a JSON object", MISSING),
    ("string", '"x"', "GenericError", "QMP input must be a JSON object", MISSING),
    ("number", "3\n", "GenericError", "QMP input must be a JSON object", MISSING),
    ("true", "true", "GenericError", "QMP input must be a JSON object", MISSING),
    ("null", "null", "GenericError", "QMP input must be a JSON object", MISSING),
    ("empty-object", "{}", "GenericError", "QMP input lacks member 'execute'", MISSING),
    ("execute-not-string", '{"execute":42}', "GenericError", "QMP input member 'execute' must be a string", MISSING),
    ("unexpected-member", '{"execute":"query-version","bogus":1,"id":7}', "GenericError",
     "QMP input member 'bogus' is unexpected", 7),
    ("control-member", '{"execute":"query-version","control":{},"id":30}', "GenericError",
     "QMP input member 'control' is unexpected", 30),
    ("exec-oob-without-oob", '{"exec-oob":"query-version","id":29}', "GenericError",
     "QMP input member 'exec-oob' is unexpected", 29),
    ("arguments-array", '{"execute":"query-version","arguments":[],"id":8}', "GenericError",
     "QMP input member 'arguments' must be an object", 8),
    ("arguments-null", '{"execute":"query-version","arguments":null,"id":9}', "GenericError",
     "QMP input member 'arguments' must be an object", 9),
    ("unknown-command", '{"execute":"nosuch","id":10}', "CommandNotFound", "The command nosuch has not been found", 10),
    ("empty-command", '{"execute":"","id":40}', "CommandNotFound", "The command  has not been found", 40),
    ("missing-argument", '{"execute":"block-dirty-bitmap-add","arguments":{"node":"x"},"id":11}', "GenericError",
     "Parameter 'name' is missing", 11),
    ("unexpected-argument", '{"execute":"block-dirty-bitmap-add","arguments":{"node":"x","name":"b","x":1},"id":12}',
     "GenericError", "Parameter 'x' is unexpected", 12),
    ("argument-to-argless-command", '{"execute":"query-version","arguments":{"x":1},"id":32}', "GenericError",
     "Parameter 'x' is unexpected", 32),
    ("string-arg-given-int", '{"execute":"block-dirty-bitmap-add","arguments":{"node":1,"name":"b"},"id":13}',
     "GenericError", "Invalid parameter type for 'node', expected: string", 13),
    ("int-arg-given-string",
     '{"execute":"block-dirty-bitmap-add","arguments":{"node":"x","name":"b","granularity":"x"},"id":14}',
     "GenericError", "Parameter 'granularity' expects uint64", 14),
    ("uint32-arg-negative",
     '{"execute":"block-dirty-bitmap-add","arguments":{"node":"x","name":"b","granularity":-1},"id":15}',
     "GenericError", "Parameter 'granularity' expects uint32_t", 15),
    ("uint32-arg-too-big",
     '{"execute":"block-dirty-bitmap-add","arguments":{"node":"x","name":"b","granularity":4294967296},"id":16}',
     "GenericError", "Parameter 'granularity' expects uint32_t", 16),
    ("bool-arg-given-string",
     '{"execute":"block-dirty-bitmap-add","arguments":{"node":"x","name":"b","persistent":"yes"},"id":17}',
     "GenericError", "Invalid parameter type for 'persistent', expected: boolean", 17),
    ("array-arg-given-string",
     '{"execute":"block-dirty-bitmap-merge","arguments":{"node":"x","target":"b","bitmaps":"b"},"id":18}',
     "GenericError", "Invalid parameter type for 'bitmaps', expected: array", 18),
    ("nested-member-missing",
     '{"execute":"block-dirty-bitmap-merge","arguments":{"node":"x","target":"b","bitmaps":[{"node":"x"}]},"id":19}',
     "GenericError", "Parameter 'bitmaps[0].name' is missing", 19),
]


@pytest.mark.parametrize("data,cls,desc,want_id", [c[1:] for c in VALIDATION_CASES],
                         ids=[c[0] for c in VALIDATION_CASES])
def test_bad_request_gets_one_error_and_connection_stays_usable(daemon, data, cls, desc, want_id):
    r = daemon.raw(negotiate=True)
    err = only_error(exchange(r, data))
    assert err["error"]["class"] == cls
    if desc == PARSE:
        assert err["error"]["desc"].startswith(PARSE), err
    else:
        assert err["error"]["desc"] == desc
    if want_id is MISSING:
        assert "id" not in err
    else:
        assert err["id"] == want_id


def test_trailing_garbage_after_request_is_a_separate_error(daemon):
    r = daemon.raw(negotiate=True)
    msgs = exchange(r, '{"execute":"query-version","id":1} garbage ')
    assert msgs[0]["id"] == 1 and "return" in msgs[0]
    assert msgs[1:] == [{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword 'garbage'"}}]


def test_nesting_deeper_than_1024_is_refused_and_connection_recovers(daemon):
    depth = 1100
    r = daemon.raw(negotiate=True)
    msgs = exchange(r, '{"execute":"query-version","id":' + "[" * depth + "1" + "]" * depth + "}\n")
    assert msgs, "no error for too deep nesting"
    assert msgs[0] == {"error": {"class": "GenericError", "desc": "JSON nesting depth limit exceeded"}}
    assert all(m.get("error", {}).get("class") == "GenericError" for m in msgs), msgs


@blockd_only
def test_oversized_request_is_refused_and_connection_survives(daemon):
    # 70 MiB: beyond QEMU's 64 MiB token limit and any sane line limit.
    r = daemon.raw(negotiate=True)
    msgs = exchange(r, '{"execute":"query-version","id":"' + "x" * (70 << 20) + '"}\n', timeout=60)
    assert msgs, "oversized request was accepted"
    assert all(m.get("error", {}).get("class") == "GenericError" and "id" not in m for m in msgs), msgs[:3]


@blockd_only
def test_two_clients_on_one_monitor_are_served_at_once(daemon):
    a = daemon.raw(negotiate=True)
    b = daemon.raw(negotiate=True)
    assert b.execute("query-version", id="b")["id"] == "b"
    assert a.execute("query-version", id="a")["id"] == "a"


def test_monitor_accepts_a_new_client_after_the_previous_one_left(daemon):
    a = daemon.raw(negotiate=True)
    a.close()
    b = daemon.raw()
    assert b.execute("query-version")["error"]["class"] == "CommandNotFound", "negotiation state leaked"
    assert b.negotiate() == {"return": {}}


# ------------------------------------------------------------ events


def _make_export_event(d, node="evnode"):
    """Makes the daemon emit BLOCK_EXPORT_DELETED (NBD export add + del)."""
    d.ok("blockdev-add", driver="null-co", node_name=node, size=1 << 20)
    d.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(d.sock("ev-nbd"))}})
    d.ok("block-export-add", type="nbd", id="ev0", node_name=node)
    d.ok("block-export-del", id="ev0")


def test_every_monitor_gets_every_event(make_daemon):
    d = make_daemon(monitors=2)
    other = d.raw(1, negotiate=True)
    _make_export_event(d)
    ev = d.event_wait("BLOCK_EXPORT_DELETED")
    assert ev["data"] == {"id": "ev0"}
    ev1 = other.recv()
    assert ev1["event"] == "BLOCK_EXPORT_DELETED" and ev1["data"] == {"id": "ev0"}


def test_event_has_wall_clock_timestamp(daemon):
    before = time.time()
    _make_export_event(daemon)
    ev = daemon.event_wait("BLOCK_EXPORT_DELETED")
    after = time.time()
    assert set(ev) == {"event", "data", "timestamp"}
    ts = ev["timestamp"]
    assert set(ts) == {"seconds", "microseconds"}
    assert isinstance(ts["seconds"], int) and isinstance(ts["microseconds"], int)
    assert 0 <= ts["microseconds"] < 1_000_000
    stamp = ts["seconds"] + ts["microseconds"] / 1e6
    assert before - 1 <= stamp <= after + 1


def test_events_are_not_sent_before_negotiation(make_daemon):
    d = make_daemon(monitors=2)
    waiting = d.raw(1)
    _make_export_event(d)
    d.event_wait("BLOCK_EXPORT_DELETED")
    assert waiting.no_message(0.3)
    assert waiting.negotiate() == {"return": {}}
    assert waiting.no_message(0.3), "event queued before negotiation was delivered after it"


def test_monitors_negotiate_independently(make_daemon):
    d = make_daemon(monitors=2)
    d.ok("query-version")  # monitor 0 negotiated
    r = d.raw(1)
    assert r.execute("query-version")["error"]["class"] == "CommandNotFound"


# ------------------------------------------------------------ introspection


def test_query_commands_lists_what_blockd_needs(daemon):
    names = {c["name"] for c in daemon.ok("query-commands")}
    for c in [
        "qmp_capabilities", "quit", "query-version", "query-commands", "query-qmp-schema",
        "blockdev-add", "blockdev-del", "query-named-block-nodes", "query-block",
        "block-dirty-bitmap-add", "block-dirty-bitmap-remove", "block-dirty-bitmap-clear",
        "block-dirty-bitmap-enable", "block-dirty-bitmap-disable", "block-dirty-bitmap-merge",
        "x-debug-block-dirty-bitmap-sha256",
        "nbd-server-start", "nbd-server-stop", "block-export-add", "block-export-del", "query-block-exports",
        "query-jobs", "job-dismiss", "blockdev-create", "blockdev-reopen",
    ]:
        assert c in names, c
    assert all(set(c) == {"name"} for c in daemon.ok("query-commands"))


def _schema(daemon) -> dict:
    return {e["name"]: e for e in daemon.ok("query-qmp-schema")}


def _members(schema: dict, command: str) -> dict:
    entry = schema[command]
    assert entry["meta-type"] == "command"
    args = schema[entry["arg-type"]]
    assert args["meta-type"] == "object"
    return {m["name"]: m for m in args["members"]}


@pytest.mark.parametrize("command,members,optional", [
    ("block-dirty-bitmap-add", ["node", "name", "granularity", "persistent", "disabled"],
     ["granularity", "persistent", "disabled"]),
    ("block-dirty-bitmap-remove", ["node", "name"], []),
    ("block-dirty-bitmap-clear", ["node", "name"], []),
    ("block-dirty-bitmap-enable", ["node", "name"], []),
    ("block-dirty-bitmap-disable", ["node", "name"], []),
    ("block-dirty-bitmap-merge", ["node", "target", "bitmaps"], []),
    ("x-debug-block-dirty-bitmap-sha256", ["node", "name"], []),
    ("query-named-block-nodes", ["flat"], ["flat"]),
    ("blockdev-del", ["node-name"], []),
    ("qmp_capabilities", ["enable"], ["enable"]),
    ("quit", [], []),
])
def test_schema_describes_command_arguments(daemon, command, members, optional):
    schema = _schema(daemon)
    got = _members(schema, command)
    assert list(got) == members
    for name, m in got.items():
        assert ("default" in m) == (name in optional), m


def test_schema_masks_type_names_but_keeps_builtin_types(daemon):
    schema = _schema(daemon)
    m = _members(schema, "block-dirty-bitmap-add")
    assert m["node"]["type"] == "str" and m["granularity"]["type"] == "int" and m["persistent"]["type"] == "bool"
    ret = schema[schema["block-dirty-bitmap-add"]["ret-type"]]
    assert ret == {"name": ret["name"], "meta-type": "object", "members": []}
    assert schema["block-dirty-bitmap-add"]["arg-type"].isdigit()


def test_schema_marks_debug_command_unstable(daemon):
    schema = _schema(daemon)
    assert "unstable" in schema["x-debug-block-dirty-bitmap-sha256"].get("features", [])
    ret = schema[schema["x-debug-block-dirty-bitmap-sha256"]["ret-type"]]
    assert [m["name"] for m in ret["members"]] == ["sha256"]


def test_schema_lists_block_export_deleted_event(daemon):
    schema = _schema(daemon)
    assert schema["BLOCK_EXPORT_DELETED"]["meta-type"] == "event"

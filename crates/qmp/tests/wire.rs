//! End-to-end protocol behaviour over a real Unix socket: raw bytes in, exact bytes out.
//! Expected texts are what qemu-storage-daemon 10.0.2 sends for the same input.

mod common;

use common::{error, Harness};
use serde_json::{json, Value};

const GENERIC: &str = "GenericError";
const NOT_FOUND: &str = "CommandNotFound";

#[tokio::test]
async fn greeting_is_qemus_exact_line() {
    let h = Harness::start();
    let mut c = common::Client::connect(&h.path).await;
    assert_eq!(
        c.text().await,
        r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "blockd-test"}, "capabilities": ["oob"]}}"#
    );
}

#[tokio::test]
async fn replies_are_crlf_terminated_lines_in_qemu_member_order() {
    let h = Harness::start();
    let mut c = h.client().await;
    c.send(br#"{"execute":"qmp_capabilities","id":1}"#).await;
    assert_eq!(c.text().await, r#"{"return": {}, "id": 1}"#);
    c.send(br#"{"execute":"nosuch","id":2}"#).await;
    assert_eq!(
        c.text().await,
        r#"{"id": 2, "error": {"class": "CommandNotFound", "desc": "The command nosuch has not been found"}}"#
    );
}

#[tokio::test]
async fn commands_before_negotiation_are_refused() {
    let h = Harness::start();
    let mut c = h.client().await;
    let reply = c.call(r#"{"execute":"echo","id":"a"}"#).await;
    assert_eq!(
        reply,
        error(
            NOT_FOUND,
            "Expecting capabilities negotiation with 'qmp_capabilities'",
            Some(json!("a"))
        )
    );
}

#[tokio::test]
async fn second_negotiation_is_refused() {
    let h = Harness::start();
    let mut c = h.ready_client().await;
    let reply = c.call(r#"{"execute":"qmp_capabilities"}"#).await;
    assert_eq!(
        reply,
        error(
            NOT_FOUND,
            "Capabilities negotiation is already complete, command ignored",
            None
        )
    );
}

#[tokio::test]
async fn negotiation_enabling_oob_succeeds() {
    let h = Harness::start();
    let mut c = h.client().await;
    let reply = c
        .call(r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#)
        .await;
    assert_eq!(reply, json!({"return": {}}));
}

#[tokio::test]
async fn negotiation_with_unknown_capability_is_refused_and_can_be_retried() {
    let h = Harness::start();
    let mut c = h.client().await;
    let reply = c
        .call(r#"{"execute":"qmp_capabilities","arguments":{"enable":["foo"]}}"#)
        .await;
    assert_eq!(
        reply,
        error(
            GENERIC,
            "Parameter 'null' does not accept value 'foo'",
            None
        )
    );
    c.negotiate().await;
}

#[tokio::test]
async fn negotiation_with_unexpected_argument_is_refused() {
    let h = Harness::start();
    let mut c = h.client().await;
    let reply = c
        .call(r#"{"execute":"qmp_capabilities","arguments":{"x":1}}"#)
        .await;
    assert_eq!(reply, error(GENERIC, "Parameter 'x' is unexpected", None));
}

#[tokio::test]
async fn request_without_execute_is_refused() {
    let h = Harness::start();
    let mut c = h.ready_client().await;
    let reply = c.call("{}").await;
    assert_eq!(
        reply,
        error(GENERIC, "QMP input lacks member 'execute'", None)
    );
}

#[tokio::test]
async fn non_string_execute_is_refused_with_id() {
    let h = Harness::start();
    let mut c = h.ready_client().await;
    let reply = c.call(r#"{"execute":42,"id":7}"#).await;
    assert_eq!(
        reply,
        error(
            GENERIC,
            "QMP input member 'execute' must be a string",
            Some(json!(7))
        )
    );
}

#[tokio::test]
async fn unexpected_member_is_refused_with_id() {
    let h = Harness::start();
    let mut c = h.ready_client().await;
    let reply = c.call(r#"{"execute":"echo","bogus":1,"id":3}"#).await;
    assert_eq!(
        reply,
        error(
            GENERIC,
            "QMP input member 'bogus' is unexpected",
            Some(json!(3))
        )
    );
}

#[tokio::test]
async fn non_object_arguments_are_refused() {
    let h = Harness::start();
    let mut c = h.ready_client().await;
    let reply = c.call(r#"{"execute":"echo","arguments":null}"#).await;
    assert_eq!(
        reply,
        error(
            GENERIC,
            "QMP input member 'arguments' must be an object",
            None
        )
    );
}

#[tokio::test]
async fn non_object_input_is_refused_without_id() {
    let h = Harness::start();
    let mut c = h.ready_client().await;
    let reply = c.call(r#"[{"execute":"echo","id":1}]"#).await;
    assert_eq!(
        reply,
        error(GENERIC, "QMP input must be a JSON object", None)
    );
}

#[tokio::test]
async fn unknown_command_is_command_not_found() {
    let h = Harness::start();
    let mut c = h.ready_client().await;
    let reply = c.call(r#"{"execute":"nosuch"}"#).await;
    assert_eq!(
        reply,
        error(NOT_FOUND, "The command nosuch has not been found", None)
    );
}

#[tokio::test]
async fn exec_oob_without_the_capability_is_an_unexpected_member() {
    let h = Harness::start();
    let mut c = h.ready_client().await;
    let reply = c.call(r#"{"exec-oob":"echo","id":1}"#).await;
    assert_eq!(
        reply,
        error(
            GENERIC,
            "QMP input member 'exec-oob' is unexpected",
            Some(json!(1))
        )
    );
}

#[tokio::test]
async fn exec_oob_with_the_capability_is_not_supported_by_any_command() {
    let h = Harness::start();
    let mut c = h.client().await;
    c.call(r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#)
        .await;
    let reply = c.call(r#"{"exec-oob":"echo","id":1}"#).await;
    assert_eq!(
        reply,
        error(
            GENERIC,
            "The command echo does not support OOB",
            Some(json!(1))
        )
    );
}

#[tokio::test]
async fn execute_with_exec_oob_clashes() {
    let h = Harness::start();
    let mut c = h.client().await;
    c.call(r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#)
        .await;
    let reply = c.call(r#"{"execute":"echo","exec-oob":"echo"}"#).await;
    assert_eq!(
        reply,
        error(
            GENERIC,
            "QMP input member 'execute' clashes with 'exec-oob'",
            None
        )
    );
}

#[tokio::test]
async fn command_error_carries_class_desc_and_id() {
    let h = Harness::start();
    let mut c = h.ready_client().await;
    let reply = c
        .call(r#"{"execute":"fail","arguments":{"class":"DeviceNotActive","desc":"Block job 'j3' not found"},"id":9}"#)
        .await;
    assert_eq!(
        reply,
        error(
            "DeviceNotActive",
            "Block job 'j3' not found",
            Some(json!(9))
        )
    );
}

async fn echoed_id(id: &str) -> Value {
    let h = Harness::start();
    let mut c = h.ready_client().await;
    let reply = c.call(&format!(r#"{{"execute":"echo","id":{id}}}"#)).await;
    assert_eq!(reply["return"], json!({}));
    reply.get("id").cloned().unwrap_or(json!("<absent>"))
}

#[tokio::test]
async fn object_id_is_echoed_verbatim() {
    assert_eq!(
        echoed_id(r#"{"a":[1,2],"b":{"c":null}}"#).await,
        json!({"a": [1, 2], "b": {"c": null}})
    );
}

#[tokio::test]
async fn array_id_is_echoed_verbatim() {
    assert_eq!(echoed_id(r#"[1,"two",[3]]"#).await, json!([1, "two", [3]]));
}

#[tokio::test]
async fn null_id_is_echoed() {
    assert_eq!(echoed_id("null").await, Value::Null);
}

#[tokio::test]
async fn string_id_is_echoed() {
    assert_eq!(echoed_id(r#""req-1""#).await, json!("req-1"));
}

#[tokio::test]
async fn reply_without_request_id_has_no_id() {
    let h = Harness::start();
    let mut c = h.ready_client().await;
    c.send(br#"{"execute":"echo"}"#).await;
    assert_eq!(c.text().await, r#"{"return": {}}"#);
}

#[tokio::test]
async fn echo_returns_arguments() {
    let h = Harness::start();
    let mut c = h.ready_client().await;
    let reply = c
        .call(r#"{"execute":"echo","arguments":{"n":1,"s":"x"}}"#)
        .await;
    assert_eq!(reply, json!({"return": {"n": 1, "s": "x"}}));
}

#[tokio::test]
async fn concatenated_objects_get_replies_in_order() {
    let h = Harness::start();
    let mut c = h.ready_client().await;
    c.send(br#"{"execute":"echo","id":1}{"execute":"slow","arguments":{"ms":50},"id":2}{"execute":"nosuch","id":3}{"execute":"echo","id":4}"#)
        .await;
    let ids: Vec<Value> = [
        c.recv().await,
        c.recv().await,
        c.recv().await,
        c.recv().await,
    ]
    .iter()
    .map(|r| r["id"].clone())
    .collect();
    assert_eq!(ids, [json!(1), json!(2), json!(3), json!(4)]);
}

#[tokio::test]
async fn request_sent_one_byte_at_a_time_is_understood() {
    let h = Harness::start();
    let mut c = h.ready_client().await;
    for b in br#"{"execute": "echo", "id": 5}"# {
        c.send(&[*b]).await;
    }
    assert_eq!(c.recv().await, json!({"return": {}, "id": 5}));
}

#[tokio::test]
async fn single_quoted_strings_are_accepted() {
    let h = Harness::start();
    let mut c = h.ready_client().await;
    let reply = c
        .call(r#"{'execute':'echo','arguments':{'s':'say "hi"'},'id':19}"#)
        .await;
    assert_eq!(reply, json!({"return": {"s": "say \"hi\""}, "id": 19}));
}

#[tokio::test]
async fn unicode_escapes_and_surrogate_pairs_decode_and_reencode_like_qemu() {
    let h = Harness::start();
    let mut c = h.ready_client().await;
    c.send(br#"{"execute":"echo","arguments":{"s":"\u00e9\ud83d\ude00"}}"#)
        .await;
    assert_eq!(c.text().await, r#"{"return": {"s": "\u00E9\uD83D\uDE00"}}"#);
}

#[tokio::test]
async fn parse_error_then_next_command_works() {
    let h = Harness::start();
    let mut c = h.ready_client().await;
    c.send(b"{\"foo\n{\"execute\":\"echo\",\"id\":1}").await;
    assert_eq!(
        c.recv().await,
        error(GENERIC, "JSON parse error, stray '\"foo\n'", None)
    );
    assert_eq!(c.recv().await, json!({"return": {}, "id": 1}));
}

#[tokio::test]
async fn lone_closing_brace_is_expecting_value() {
    let h = Harness::start();
    let mut c = h.ready_client().await;
    let reply = c.call("}").await;
    assert_eq!(
        reply,
        error(GENERIC, "JSON parse error, expecting value", None)
    );
}

#[tokio::test]
async fn big_integers_keep_their_value_and_overflow_to_float() {
    let h = Harness::start();
    let mut c = h.ready_client().await;
    c.send(br#"{"execute":"echo","arguments":{"u":18446744073709551615,"f":18446744073709551616,"x":0.1}}"#)
        .await;
    assert_eq!(
        c.text().await,
        r#"{"return": {"x": 0.10000000000000001, "f": 1.8446744073709552e+19, "u": 18446744073709551615}}"#
    );
}

#[tokio::test]
async fn oversized_message_is_refused_and_the_next_command_works() {
    let mut config = qmp::ServerConfig::default();
    config.input.max_bytes = 64 * 1024;
    let h = Harness::with_config(config);
    let mut c = h.ready_client().await;
    c.send(br#"{"execute":"echo","arguments":{"s":""#).await;
    let chunk = vec![b'a'; 1 << 20];
    for _ in 0..8 {
        c.send(&chunk).await;
    }
    c.send(br#""}}{"execute":"echo","id":2}"#).await;
    assert_eq!(
        c.recv().await,
        error(GENERIC, "JSON token size limit exceeded", None)
    );
    assert_eq!(c.recv().await, json!({"return": {}, "id": 2}));
}

#[tokio::test]
async fn endless_line_is_refused_once_and_a_newline_resynchronises() {
    let mut config = qmp::ServerConfig::default();
    config.input.max_bytes = 64 * 1024;
    let h = Harness::with_config(config);
    let mut c = h.ready_client().await;
    c.send(br#"{"execute":"echo","arguments":{"s":""#).await;
    let chunk = vec![b'a'; 1 << 20];
    for _ in 0..8 {
        c.send(&chunk).await;
    }
    c.send(b"\n{\"execute\":\"echo\",\"id\":3}").await;
    assert_eq!(
        c.recv().await,
        error(GENERIC, "JSON token size limit exceeded", None)
    );
    assert_eq!(c.recv().await, json!({"return": {}, "id": 3}));
}

#[tokio::test]
async fn too_deep_nesting_is_refused_once_and_the_next_command_works() {
    let h = Harness::start();
    let mut c = h.ready_client().await;
    let mut input = br#"{"execute":"echo","id":"#.to_vec();
    input.extend(vec![b'['; 2000]);
    input.extend(vec![b']'; 2000]);
    input.extend(br#"}{"execute":"echo","id":4}"#);
    c.send(&input).await;
    assert_eq!(
        c.recv().await,
        error(GENERIC, "JSON nesting depth limit exceeded", None)
    );
    assert_eq!(c.recv().await, json!({"return": {}, "id": 4}));
}

#[tokio::test]
async fn deepest_allowed_id_is_echoed() {
    let h = Harness::start();
    let mut c = h.ready_client().await;
    let mut id = vec![b'['; 1023];
    id.extend(vec![b']'; 1023]);
    let mut input = br#"{"execute":"echo","id":"#.to_vec();
    input.extend(&id);
    input.push(b'}');
    c.send(&input).await;
    let line = c.text().await;
    let want = format!(
        r#"{{"return": {{}}, "id": {}}}"#,
        String::from_utf8_lossy(&id)
    );
    assert_eq!(line, want);
}

#[tokio::test]
async fn panicking_command_gets_an_error_and_the_connection_survives() {
    let h = Harness::start();
    let mut c = h.ready_client().await;
    let reply = c.call(r#"{"execute":"panic","id":1}"#).await;
    assert_eq!(reply["error"]["class"], json!(GENERIC));
    assert_eq!(reply["id"], json!(1));
    assert_eq!(
        c.call(r#"{"execute":"echo","id":2}"#).await,
        json!({"return": {}, "id": 2})
    );
}

#[tokio::test]
async fn tcp_monitor_speaks_the_same_protocol() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let h = Harness::start();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind tcp");
    let addr = listener.local_addr().expect("addr");
    h.server.add_tcp_monitor(listener);
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    r.read_line(&mut line).await.expect("greeting");
    assert!(line.starts_with(r#"{"QMP": "#) && line.ends_with("\r\n"));
    w.write_all(br#"{"execute":"qmp_capabilities","id":1}"#)
        .await
        .expect("send");
    line.clear();
    r.read_line(&mut line).await.expect("reply");
    assert_eq!(line, "{\"return\": {}, \"id\": 1}\r\n");
}

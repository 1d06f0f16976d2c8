//! The QMP protocol rules, as pure functions of the parsed input: envelope checks,
//! capabilities negotiation, and the shape of replies, events and the greeting.
//!
//! Each parsed message becomes one [`Action`] for the connection to carry out; the rules about
//! what is allowed when are in [`Session::handle`] and the functions it calls. Every error text
//! is the one qemu-storage-daemon 10.0.2 sends. Checks run in QEMU's order:
//!
//! 1. not an object → "QMP input must be a JSON object" (no id);
//! 2. members in QEMU's `QDict` walk order: `execute` (and `exec-oob` once `oob` is enabled)
//!    must be strings and not both present, `arguments` must be an object, `id` is anything,
//!    anything else is unexpected;
//! 3. no command → "QMP input lacks member 'execute'";
//! 4. unknown command → `CommandNotFound` (before negotiation every command but
//!    `qmp_capabilities` is unknown, and the text becomes "Expecting capabilities negotiation
//!    with 'qmp_capabilities'");
//! 5. `exec-oob` → "The command X does not support OOB" (no command supports OOB);
//! 6. `qmp_capabilities` arguments, then "Capabilities negotiation is already complete,
//!    command ignored" if it was.
//!
//! Every error after step 1 echoes the request's `id` when it has one.

use serde_json::{Map, Value};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::QmpError;
use crate::json::{qdict, Parsed};

/// The version the greeting announces (`query-version` is the dispatcher's business).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// Major version (QEMU 10.0.2 → 10).
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
    /// Package string (QSD on Debian says e.g. "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1").
    pub package: String,
}

impl Greeting {
    /// The greeting message:
    /// `{"QMP": {"version": {"qemu": {...}, "package": ...}, "capabilities": ["oob"]}}`.
    pub fn to_json(&self) -> Value {
        let mut qemu = Map::new();
        qemu.insert("major".into(), self.major.into());
        qemu.insert("minor".into(), self.minor.into());
        qemu.insert("micro".into(), self.micro.into());
        let mut version = Map::new();
        version.insert("qemu".into(), Value::Object(qemu));
        version.insert("package".into(), self.package.clone().into());
        let mut qmp = Map::new();
        qmp.insert("version".into(), Value::Object(version));
        qmp.insert("capabilities".into(), Value::Array(vec!["oob".into()]));
        let mut root = Map::new();
        root.insert("QMP".into(), Value::Object(qmp));
        Value::Object(root)
    }
}

/// Name of the negotiation command, handled by this crate rather than the dispatcher.
pub const QMP_CAPABILITIES: &str = "qmp_capabilities";

/// A command for the dispatcher.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// Command name (known to the dispatcher).
    pub name: String,
    /// Arguments (`{}` when absent), every object in QEMU's `QDict` walk order.
    pub args: Map<String, Value>,
    /// The request's `id`, to echo.
    pub id: Option<Value>,
}

/// What the connection does with one parsed message.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send this reply.
    Reply(Value),
    /// Negotiation succeeded: send this reply, then start delivering events.
    Negotiated(Value),
    /// Run the command, then send its reply (see [`reply`]).
    Execute(Command),
}

/// Where a connection is in the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Only `qmp_capabilities` is available; no events.
    Negotiating,
    /// Commands and events; `oob` says whether `exec-oob` is understood.
    Ready { oob: bool },
}

/// The protocol state of one connection.
#[derive(Debug)]
pub struct Session {
    phase: Phase,
}

impl Default for Session {
    fn default() -> Self {
        Self::new()
    }
}

/// A validated request envelope.
struct Envelope {
    name: String,
    oob: bool,
    args: Map<String, Value>,
    id: Option<Value>,
}

impl Session {
    /// A new connection, in capabilities negotiation mode.
    pub fn new() -> Self {
        Session {
            phase: Phase::Negotiating,
        }
    }

    /// Has negotiation completed?
    pub fn is_ready(&self) -> bool {
        matches!(self.phase, Phase::Ready { .. })
    }

    /// Decides what to do with one message. `known` tells whether the dispatcher has a
    /// command (only asked after negotiation).
    pub fn handle(&mut self, parsed: Parsed, known: &dyn Fn(&str) -> bool) -> Action {
        match parsed {
            Parsed::Error(desc) => Action::Reply(error_reply(&QmpError::generic(desc), None)),
            Parsed::Value(Value::Object(request)) => {
                let id = request.get("id").cloned();
                self.route(request, known)
                    .unwrap_or_else(|e| Action::Reply(error_reply(&e, id)))
            }
            Parsed::Value(_) => Action::Reply(error_reply(
                &QmpError::generic("QMP input must be a JSON object"),
                None,
            )),
        }
    }

    fn route(
        &mut self,
        request: Map<String, Value>,
        known: &dyn Fn(&str) -> bool,
    ) -> Result<Action, QmpError> {
        let oob_enabled = matches!(self.phase, Phase::Ready { oob: true });
        let envelope = parse_envelope(request, oob_enabled)?;
        let is_capabilities = envelope.name == QMP_CAPABILITIES;
        let exists = is_capabilities || (self.is_ready() && known(&envelope.name));
        if !exists {
            return Err(match self.phase {
                Phase::Negotiating => QmpError::command_not_found(
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                ),
                Phase::Ready { .. } => QmpError::command_not_found(format!(
                    "The command {} has not been found",
                    envelope.name
                )),
            });
        }
        if envelope.oob {
            return Err(QmpError::generic(format!(
                "The command {} does not support OOB",
                envelope.name
            )));
        }
        if is_capabilities {
            return self.negotiate(envelope);
        }
        Ok(Action::Execute(Command {
            name: envelope.name,
            args: qdict::map_into_walk_order(envelope.args),
            id: envelope.id,
        }))
    }

    fn negotiate(&mut self, envelope: Envelope) -> Result<Action, QmpError> {
        let oob = check_capabilities_args(&envelope.args)?;
        if self.is_ready() {
            return Err(QmpError::command_not_found(
                "Capabilities negotiation is already complete, command ignored",
            ));
        }
        self.phase = Phase::Ready { oob };
        Ok(Action::Negotiated(reply(
            Ok(Value::Object(Map::new())),
            envelope.id,
        )))
    }
}

/// Checks the request members in QEMU's order and takes the envelope apart.
fn parse_envelope(
    mut request: Map<String, Value>,
    oob_enabled: bool,
) -> Result<Envelope, QmpError> {
    let mut command_member: Option<&'static str> = None;
    for (key, value) in qdict::walk(&request) {
        match key.as_str() {
            "execute" | "exec-oob" if key == "execute" || oob_enabled => {
                if !value.is_string() {
                    return Err(QmpError::generic(format!(
                        "QMP input member '{key}' must be a string"
                    )));
                }
                if let Some(other) = command_member {
                    return Err(QmpError::generic(format!(
                        "QMP input member '{key}' clashes with '{other}'"
                    )));
                }
                command_member = Some(if key == "execute" {
                    "execute"
                } else {
                    "exec-oob"
                });
            }
            "arguments" if !value.is_object() => {
                return Err(QmpError::generic(
                    "QMP input member 'arguments' must be an object",
                ));
            }
            "arguments" | "id" => {}
            _ => {
                return Err(QmpError::generic(format!(
                    "QMP input member '{key}' is unexpected"
                )));
            }
        }
    }
    let Some(member) = command_member else {
        return Err(QmpError::generic("QMP input lacks member 'execute'"));
    };
    let oob = member == "exec-oob";
    let name = match request.remove(member) {
        Some(Value::String(name)) => name,
        _ => return Err(QmpError::generic("QMP input lacks member 'execute'")),
    };
    let args = match request.remove("arguments") {
        Some(Value::Object(args)) => args,
        _ => Map::new(),
    };
    Ok(Envelope {
        name,
        oob,
        args,
        id: request.remove("id"),
    })
}

/// Checks `qmp_capabilities` arguments as QEMU's generated code does (declared members
/// first, then the first unexpected member in walk order). Returns whether `oob` is enabled.
fn check_capabilities_args(args: &Map<String, Value>) -> Result<bool, QmpError> {
    let mut oob = false;
    if let Some(enable) = args.get("enable") {
        let Value::Array(list) = enable else {
            return Err(QmpError::generic(
                "Invalid parameter type for 'enable', expected: array",
            ));
        };
        for (i, item) in list.iter().enumerate() {
            let Value::String(capability) = item else {
                return Err(QmpError::generic(format!(
                    "Invalid parameter type for 'enable[{i}]', expected: string"
                )));
            };
            if capability != "oob" {
                // Sic: QEMU names the list element 'null'.
                return Err(QmpError::generic(format!(
                    "Parameter 'null' does not accept value '{capability}'"
                )));
            }
            oob = true;
        }
    }
    if let Some((key, _)) = qdict::walk(args).into_iter().find(|(k, _)| *k != "enable") {
        return Err(QmpError::generic(format!(
            "Parameter '{key}' is unexpected"
        )));
    }
    Ok(oob)
}

/// A command reply: `{"return": V, "id"?: ID}` or `{"error": {...}, "id"?: ID}`.
pub fn reply(result: Result<Value, QmpError>, id: Option<Value>) -> Value {
    match result {
        Ok(value) => {
            let mut obj = Map::new();
            obj.insert("return".into(), value);
            if let Some(id) = id {
                obj.insert("id".into(), id);
            }
            Value::Object(obj)
        }
        Err(e) => error_reply(&e, id),
    }
}

/// An error reply, with the id when the request had one.
pub fn error_reply(err: &QmpError, id: Option<Value>) -> Value {
    let mut obj = Map::new();
    obj.insert("error".into(), err.to_json());
    if let Some(id) = id {
        obj.insert("id".into(), id);
    }
    Value::Object(obj)
}

/// An event message stamped with the wall clock:
/// `{"event": NAME, "data"?: DATA, "timestamp": {"seconds": S, "microseconds": US}}`.
pub fn event(name: &str, data: Option<Value>, now: SystemTime) -> Value {
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut timestamp = Map::new();
    timestamp.insert("seconds".into(), since_epoch.as_secs().into());
    timestamp.insert("microseconds".into(), since_epoch.subsec_micros().into());
    let mut obj = Map::new();
    obj.insert("event".into(), name.into());
    if let Some(data) = data {
        obj.insert("data".into(), data);
    }
    obj.insert("timestamp".into(), Value::Object(timestamp));
    Value::Object(obj)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::to_string;
    use serde_json::json;

    fn known(name: &str) -> bool {
        name == "query-version"
    }

    fn send(session: &mut Session, v: Value) -> Action {
        session.handle(Parsed::Value(v), &known)
    }

    fn desc(action: &Action) -> (String, String, Option<Value>) {
        let Action::Reply(Value::Object(obj)) = action else {
            panic!("expected an error reply, got {action:?}")
        };
        let err = &obj["error"];
        (
            err["class"].as_str().unwrap_or_default().to_string(),
            err["desc"].as_str().unwrap_or_default().to_string(),
            obj.get("id").cloned(),
        )
    }

    fn ready(oob: bool) -> Session {
        let mut s = Session::new();
        let args = if oob {
            json!({"enable": ["oob"]})
        } else {
            json!({})
        };
        let a = send(
            &mut s,
            json!({"execute": "qmp_capabilities", "arguments": args}),
        );
        assert!(matches!(a, Action::Negotiated(_)));
        s
    }

    #[test]
    fn commands_before_negotiation_are_refused_with_qemu_text() {
        let mut s = Session::new();
        let (class, text, id) = desc(&send(&mut s, json!({"execute": "query-version", "id": 1})));
        assert_eq!(class, "CommandNotFound");
        assert_eq!(
            text,
            "Expecting capabilities negotiation with 'qmp_capabilities'"
        );
        assert_eq!(id, Some(json!(1)));
    }

    #[test]
    fn envelope_errors_precede_the_negotiation_refusal() {
        let mut s = Session::new();
        let (_, text, _) = desc(&send(&mut s, json!({"execute": "x", "bogus": 1})));
        assert_eq!(text, "QMP input member 'bogus' is unexpected");
    }

    #[test]
    fn members_are_checked_in_qdict_walk_order() {
        let mut s = ready(false);
        let (_, text, _) = desc(&send(&mut s, json!({"execute": 42, "bogus": 1})));
        assert_eq!(text, "QMP input member 'bogus' is unexpected");
        let (_, text, _) = desc(&send(&mut s, json!({"arguments": 1, "execute": 42})));
        assert_eq!(text, "QMP input member 'execute' must be a string");
    }

    #[test]
    fn exec_oob_without_capability_is_an_unexpected_member() {
        let mut s = ready(false);
        let (_, text, _) = desc(&send(&mut s, json!({"exec-oob": "query-version"})));
        assert_eq!(text, "QMP input member 'exec-oob' is unexpected");
    }

    #[test]
    fn exec_oob_with_capability_is_refused_per_command() {
        let mut s = ready(true);
        let (class, text, _) = desc(&send(&mut s, json!({"exec-oob": "query-version"})));
        assert_eq!(class, "GenericError");
        assert_eq!(text, "The command query-version does not support OOB");
        let (class, text, _) = desc(&send(&mut s, json!({"exec-oob": "nosuch"})));
        assert_eq!(class, "CommandNotFound");
        assert_eq!(text, "The command nosuch has not been found");
    }

    #[test]
    fn execute_and_exec_oob_together_clash_before_arguments_are_checked() {
        let mut s = ready(true);
        let (_, text, _) = desc(&send(
            &mut s,
            json!({"execute": "x", "exec-oob": "y", "arguments": 1}),
        ));
        assert_eq!(text, "QMP input member 'execute' clashes with 'exec-oob'");
    }

    #[test]
    fn capabilities_arguments_are_checked_before_the_repeat_refusal() {
        let mut s = ready(false);
        let (_, text, _) = desc(&send(
            &mut s,
            json!({"execute": "qmp_capabilities", "arguments": {"x": 1}}),
        ));
        assert_eq!(text, "Parameter 'x' is unexpected");
        let (class, text, _) = desc(&send(&mut s, json!({"execute": "qmp_capabilities"})));
        assert_eq!(class, "CommandNotFound");
        assert_eq!(
            text,
            "Capabilities negotiation is already complete, command ignored"
        );
    }

    #[test]
    fn capability_values_are_checked_like_qsd() {
        let cases = [
            (
                json!({"enable": ["foo"]}),
                "Parameter 'null' does not accept value 'foo'",
            ),
            (
                json!({"enable": "oob"}),
                "Invalid parameter type for 'enable', expected: array",
            ),
            (
                json!({"enable": null}),
                "Invalid parameter type for 'enable', expected: array",
            ),
            (
                json!({"enable": ["oob", 1]}),
                "Invalid parameter type for 'enable[1]', expected: string",
            ),
            (
                json!({"x": 1, "enable": ["foo"]}),
                "Parameter 'null' does not accept value 'foo'",
            ),
            (
                json!({"enable": ["oob"], "x": 1}),
                "Parameter 'x' is unexpected",
            ),
        ];
        for (args, want) in cases {
            let mut s = Session::new();
            let a = send(
                &mut s,
                json!({"execute": "qmp_capabilities", "arguments": args}),
            );
            assert_eq!(desc(&a).1, want);
            assert!(!s.is_ready());
        }
    }

    #[test]
    fn repeated_oob_capability_is_accepted() {
        let mut s = Session::new();
        let a = send(
            &mut s,
            json!({"execute": "qmp_capabilities", "arguments": {"enable": ["oob", "oob"]}}),
        );
        assert!(matches!(a, Action::Negotiated(_)));
    }

    #[test]
    fn known_commands_are_routed_with_arguments_and_id() {
        let mut s = ready(false);
        let a = send(
            &mut s,
            json!({"execute": "query-version", "arguments": {"b": 1, "a": 2}, "id": [1]}),
        );
        let Action::Execute(cmd) = a else {
            panic!("{a:?}")
        };
        assert_eq!(cmd.name, "query-version");
        assert_eq!(cmd.id, Some(json!([1])));
        let keys: Vec<&str> = cmd.args.keys().map(String::as_str).collect();
        assert_eq!(keys, ["a", "b"]);
    }

    #[test]
    fn non_objects_get_no_id() {
        let mut s = ready(false);
        let (_, text, id) = desc(&send(&mut s, json!([{"id": 1}])));
        assert_eq!(text, "QMP input must be a JSON object");
        assert_eq!(id, None);
    }

    #[test]
    fn greeting_prints_exactly_like_qsd() {
        let g = Greeting {
            major: 10,
            minor: 0,
            micro: 2,
            package: "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1".into(),
        };
        assert_eq!(
            to_string(&g.to_json()),
            r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "capabilities": ["oob"]}}"#
        );
    }

    #[test]
    fn events_print_timestamp_first_like_qsd() {
        let when = UNIX_EPOCH + std::time::Duration::new(1795633389, 569_349_123);
        let e = event(
            "JOB_STATUS_CHANGE",
            Some(json!({"status": "created", "id": "j"})),
            when,
        );
        assert_eq!(
            to_string(&e),
            r#"{"timestamp": {"seconds": 1795633389, "microseconds": 569349}, "event": "JOB_STATUS_CHANGE", "data": {"status": "created", "id": "j"}}"#
        );
    }
}

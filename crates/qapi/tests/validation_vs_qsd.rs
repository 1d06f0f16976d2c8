//! Differential test of argument checking: for every command we share with
//! qemu-storage-daemon, a generated set of argument objects (valid ones, each member missing,
//! each member of the wrong JSON type or out of range, stray members, every union branch and
//! alternate branch) is sent to QSD and to our checker, and the errors must be identical.
//!
//! A sentinel member `zzzz` is added at the top level so that arguments QSD accepts fail
//! with "Parameter 'zzzz' is unexpected" instead of executing. Fails when
//! qemu-storage-daemon is not installed, unless `BLOCKD_ALLOW_MISSING_ORACLES=1`.

mod common;

use std::collections::HashSet;

use common::{Introspection, Qsd};
use qapi::Schema;
use serde_json::{json, Map, Value};

/// Key used for a stray member.
const EXTRA: &str = "zz-extra";

/// Values of every JSON type and integers at each width boundary.
fn scalar_probes() -> Vec<Value> {
    vec![
        json!("s"),
        json!(1),
        json!(-1),
        json!(1.5),
        json!(true),
        json!(null),
        json!([]),
        json!({}),
        json!(128),
        json!(256),
        json!(-129),
        json!(32768),
        json!(65536),
        json!(2147483648u64),
        json!(4294967296u64),
        json!(-2147483649i64),
        json!(9223372036854775808u64),
        json!(18446744073709551616.0),
    ]
}

struct Gen<'a> {
    schema: &'a Introspection,
    /// Types whose members have been probed in full once already.
    expanded: HashSet<String>,
}

impl Gen<'_> {
    fn entity(&self, t: &str) -> &Map<String, Value> {
        self.schema.entity(t)
    }

    /// A valid value of type `t`, using the union case `case` if `t` is a union.
    fn minimal(&self, t: &str, depth: usize) -> Value {
        let e = self.entity(t);
        match e["meta-type"].as_str().unwrap_or("") {
            "builtin" => match e["json-type"].as_str().unwrap_or("") {
                "string" => json!("x"),
                "int" => json!(1),
                "number" => json!(1.5),
                "boolean" => json!(true),
                "null" => Value::Null,
                _ => json!({}),
            },
            "enum" => e["values"][0].clone(),
            "array" => json!([]),
            "alternate" => {
                // Prefer a string branch: it never recurses.
                let branches: Vec<String> = e["members"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|m| m["type"].as_str().map(str::to_owned))
                    .collect();
                let pick = branches
                    .iter()
                    .find(|b| self.entity(b)["meta-type"] == "builtin")
                    .unwrap_or(&branches[0])
                    .clone();
                self.minimal(&pick, depth + 1)
            }
            "object" => {
                let cases = self.cases(t);
                self.minimal_object(t, cases.first().map(|c| c.0.as_str()), depth)
            }
            other => panic!("unexpected meta-type {other}"),
        }
    }

    /// (case, branch type) of a union, empty for structs.
    fn cases(&self, t: &str) -> Vec<(String, String)> {
        self.entity(t)
            .get("variants")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|v| {
                (
                    v["case"].as_str().unwrap_or("").to_owned(),
                    v["type"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }

    fn members(&self, t: &str) -> Vec<(String, String, bool)> {
        self.entity(t)["members"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                (
                    m["name"].as_str().unwrap_or("").to_owned(),
                    m["type"].as_str().unwrap_or("").to_owned(),
                    m.get("default").is_some(),
                )
            })
            .collect()
    }

    /// The mandatory members of object `t` (and of branch `case`) with valid values.
    fn minimal_object(&self, t: &str, case: Option<&str>, depth: usize) -> Value {
        let mut out = Map::new();
        let tag = self
            .entity(t)
            .get("tag")
            .and_then(Value::as_str)
            .map(str::to_owned);
        for (name, ty, optional) in self.members(t) {
            if Some(&name) == tag.as_ref() {
                out.insert(name, json!(case.unwrap_or("")));
            } else if !optional {
                out.insert(name, self.minimal(&ty, depth + 1));
            }
        }
        if let Some(case) = case {
            if let Some((_, branch)) = self.cases(t).into_iter().find(|(c, _)| c == case) {
                if let Value::Object(b) = self.minimal_object(&branch, None, depth + 1) {
                    out.extend(b);
                }
            }
        }
        Value::Object(out)
    }

    /// Probe values for type `t`: valid and invalid ones.
    fn probes(&mut self, t: &str) -> Vec<Value> {
        let e = self.entity(t).clone();
        let mt = e["meta-type"].as_str().unwrap_or("").to_owned();
        let mut out = Vec::new();
        match mt.as_str() {
            "builtin" | "enum" => {
                out.extend(scalar_probes());
                if mt == "enum" {
                    out.push(json!("bogus-value"));
                    out.push(e["values"][0].clone());
                }
            }
            "array" => {
                let elem = e["element-type"].as_str().unwrap_or("").to_owned();
                out.push(json!("not-a-list"));
                out.push(json!([]));
                for p in self.probes(&elem) {
                    out.push(json!([p]));
                }
                out.push(json!([self.minimal(&elem, 1), 5]));
            }
            "alternate" => {
                out.extend(scalar_probes());
                if self.expanded.insert(t.to_owned()) {
                    for m in e["members"].as_array().cloned().unwrap_or_default() {
                        let bt = m["type"].as_str().unwrap_or("").to_owned();
                        if self.entity(&bt)["meta-type"] == "object" {
                            out.extend(self.probes(&bt));
                        }
                    }
                }
            }
            "object" => {
                if !self.expanded.insert(t.to_owned()) {
                    out.push(self.minimal(t, 1));
                    out.push(json!("s"));
                    return out;
                }
                out.push(json!("s"));
                let cases = self.cases(t);
                let case_list: Vec<Option<String>> = if cases.is_empty() {
                    vec![None]
                } else {
                    cases.iter().map(|c| Some(c.0.clone())).collect()
                };
                let tag = e.get("tag").and_then(Value::as_str).map(str::to_owned);
                // Base members, probed with the first case.
                let first = case_list[0].clone();
                out.extend(self.member_probes(t, t, first.as_deref(), tag.as_deref()));
                if let Some(tag) = &tag {
                    for v in [json!("bogus-case"), json!(5), Value::Null] {
                        let mut base = self.minimal_object(t, first.as_deref(), 1);
                        base[tag.as_str()] = v;
                        out.push(base);
                    }
                    let mut base = self.minimal_object(t, first.as_deref(), 1);
                    base.as_object_mut().map(|o| o.remove(tag));
                    out.push(base);
                }
                // Every case, and the members of every branch.
                for (case, branch) in &cases {
                    out.push(self.minimal_object(t, Some(case), 1));
                    if self.expanded.insert(format!("{branch}@branch")) {
                        out.extend(self.member_probes(t, branch, Some(case), tag.as_deref()));
                    }
                }
                let mut extra = self.minimal_object(t, first.as_deref(), 1);
                extra
                    .as_object_mut()
                    .map(|o| o.insert(EXTRA.into(), json!(1)));
                out.push(extra);
            }
            other => panic!("unexpected meta-type {other}"),
        }
        out
    }

    /// Probes for each member of `owner` (the object, or one union branch of union `t`).
    fn member_probes(
        &mut self,
        t: &str,
        owner: &str,
        case: Option<&str>,
        tag: Option<&str>,
    ) -> Vec<Value> {
        let mut out = Vec::new();
        for (name, ty, optional) in self.members(owner) {
            if Some(name.as_str()) == tag {
                continue;
            }
            let base = self.minimal_object(t, case, 1);
            if !optional {
                let mut without = base.clone();
                without.as_object_mut().map(|o| o.remove(&name));
                out.push(without);
            }
            for p in self.probes(&ty) {
                let mut with = base.clone();
                with[name.as_str()] = p;
                out.push(with);
            }
        }
        out
    }
}

fn has_extra_at_top(v: &Value) -> bool {
    v.as_object().is_some_and(|o| o.contains_key(EXTRA))
}

#[test]
fn argument_errors_match_qsd_for_every_shared_command() {
    let Some(mut qsd) = Qsd::start(&[]) else {
        return;
    };
    let schema = Schema::get();
    let ours_value = schema.introspect();
    let ours = Introspection::new(&ours_value);
    let mut gen = Gen {
        schema: &ours,
        expanded: HashSet::new(),
    };
    let mut mismatches = Vec::new();
    let mut probes = 0usize;
    for cmd in schema.commands() {
        // qmp_capabilities is refused before its arguments are looked at once negotiated;
        // human-monitor-command is not a QSD command.
        if cmd == "qmp_capabilities" || cmd == "human-monitor-command" {
            continue;
        }
        let arg_type = ours.entity(cmd)["arg-type"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let mut cases = gen.probes(&arg_type);
        cases.push(json!({}));
        for case in cases {
            let Value::Object(mut args) = case else {
                continue;
            };
            if !has_extra_at_top(&Value::Object(args.clone())) {
                args.insert("zzzz".into(), json!(1));
            }
            probes += 1;
            let reply = qsd.execute(cmd, Value::Object(args.clone()));
            let theirs = Qsd::error_of(&reply);
            let ours = schema
                .check_command(cmd, &args)
                .err()
                .map(|e| (e.class.to_owned(), e.desc));
            if theirs != ours {
                mismatches.push(format!(
                    "{cmd} {}\n    qsd: {theirs:?}\n    ours: {ours:?}",
                    Value::Object(args)
                ));
            }
        }
    }
    eprintln!("{probes} argument objects compared");
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches
            .iter()
            .take(60)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Several stray members at once: QEMU names the one its hash tables put first, which our
/// checker replays. Key sets come from a fixed pseudo-random sequence.
#[test]
fn choice_among_several_stray_members_matches_qsd() {
    let Some(mut qsd) = Qsd::start(&[]) else {
        return;
    };
    let schema = Schema::get();
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let words = [
        "a",
        "b",
        "x",
        "zz",
        "node2",
        "name-x",
        "granularity2",
        "q",
        "file",
        "abc",
        "k9",
        "driver2",
        "yy",
        "m-n",
    ];
    let bases = [
        ("block-dirty-bitmap-add", json!({"node": "n", "name": "b"})),
        (
            "block-dirty-bitmap-add",
            json!({"node": "n", "name": "b", "granularity": 65536, "persistent": true}),
        ),
        (
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "x", "size": 1, "read-only": true}),
        ),
        ("blockdev-add", json!({"driver": "raw", "file": "f"})),
        ("query-named-block-nodes", json!({})),
        ("job-cancel", json!({"id": "j"})),
    ];
    let mut mismatches = Vec::new();
    for round in 0..300 {
        let (cmd, base) = &bases[round % bases.len()];
        let mut args = base.as_object().unwrap().clone();
        let n = 2 + next(5) as usize;
        for _ in 0..n {
            let w = words[next(words.len() as u64) as usize];
            args.insert(format!("{w}{}", next(3)), json!(1));
        }
        let reply = qsd.execute(cmd, Value::Object(args.clone()));
        let theirs = Qsd::error_of(&reply);
        let ours = schema
            .check_command(cmd, &args)
            .err()
            .map(|e| (e.class.to_owned(), e.desc));
        if theirs != ours {
            mismatches.push(format!(
                "{cmd} {}\n    qsd: {theirs:?}\n    ours: {ours:?}",
                Value::Object(args)
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

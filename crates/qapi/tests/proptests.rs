//! Property tests: the parsers and the checker never panic on arbitrary input, and keyval
//! syntax round-trips.

use proptest::prelude::*;
use qapi::{parse_keyval, Schema};
use serde_json::{Map, Value};

/// Arbitrary JSON, a few levels deep.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e20f64..1e20).prop_map(Value::from),
        "[a-z0-9-]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z-]{1,12}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A member name from the schema, so generated objects often get past the first member.
fn member_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("driver".to_owned()),
        Just("node-name".to_owned()),
        Just("file".to_owned()),
        Just("filename".to_owned()),
        Just("backing".to_owned()),
        Just("size".to_owned()),
        Just("cache".to_owned()),
        "[a-z-]{1,8}",
    ]
}

fn driverish_args() -> impl Strategy<Value = Map<String, Value>> {
    let driver = prop_oneof![
        Just("file"),
        Just("qcow2"),
        Just("raw"),
        Just("null-co"),
        Just("nbd"),
        Just("quorum")
    ];
    (
        driver,
        prop::collection::btree_map(member_name(), json(), 0..5),
    )
        .prop_map(|(d, m)| {
            let mut out: Map<String, Value> = m.into_iter().collect();
            out.insert("driver".into(), Value::String(d.to_owned()));
            out
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn checker_never_panics_on_arbitrary_arguments(args in driverish_args()) {
        let schema = Schema::get();
        let _ = schema.check_command("blockdev-add", &args);
        let _ = qapi::types::parse_command("blockdev-add", args.clone());
        let _ = schema.check_command("block-dirty-bitmap-merge", &args);
    }

    #[test]
    fn accepted_arguments_always_parse_into_a_typed_command(args in driverish_args()) {
        if Schema::get().check_command("blockdev-add", &args).is_ok() {
            prop_assert!(qapi::types::parse_command("blockdev-add", args).is_ok());
        }
    }

    #[test]
    fn keyval_parser_never_panics(s in "[a-z0-9.,=_-]{0,40}") {
        if let Ok(tree) = parse_keyval(&s, Some("driver")) {
            let _ = Schema::get().coerce_keyval("BlockdevOptions", Value::Object(tree));
        }
    }

    #[test]
    fn keyval_round_trips_flat_members(
        members in prop::collection::btree_map("[a-z][a-z0-9-]{0,10}", "[ -~]{0,12}", 1..6)
    ) {
        let text = members
            .iter()
            .map(|(k, v)| format!("{k}={}", v.replace(',', ",,")))
            .collect::<Vec<_>>()
            .join(",");
        let parsed = parse_keyval(&text, None).unwrap();
        let expected: Map<String, Value> = members.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
        prop_assert_eq!(parsed, expected);
    }
}

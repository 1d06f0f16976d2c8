//! Property tests of the JSON streamer and writer.

use proptest::prelude::*;
use qmp::json::{to_string, Limits, Parsed, Streamer};
use serde_json::{Map, Number, Value};

/// Small limits, so random input reaches every limit path.
fn tight() -> Limits {
    Limits {
        max_bytes: 64,
        max_tokens: 16,
        max_depth: 8,
    }
}

/// Feeds `input` split at the given points; returns every result.
fn feed_chunked(limits: Limits, input: &[u8], cuts: &[usize]) -> Vec<Parsed> {
    let mut s = Streamer::new(limits);
    let mut out = Vec::new();
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    points.push(input.len());
    points.sort_unstable();
    let mut from = 0;
    for to in points {
        out.extend(s.feed_all(&input[from..to]));
        assert!(
            s.buffered_bytes() <= limits.max_bytes,
            "streamer holds {} bytes",
            s.buffered_bytes()
        );
        from = to;
    }
    out
}

/// Bytes that steer the lexer into its interesting states.
fn jsonish_bytes() -> impl Strategy<Value = Vec<u8>> {
    let fragment = prop_oneof![
        Just(&b"{"[..]),
        Just(&b"}"[..]),
        Just(&b"["[..]),
        Just(&b"]"[..]),
        Just(&b":"[..]),
        Just(&b","[..]),
        Just(&b"\""[..]),
        Just(&b"'"[..]),
        Just(&b"\\"[..]),
        Just(&b"\\u"[..]),
        Just(&b"d83d"[..]),
        Just(&b"-"[..]),
        Just(&b"0"[..]),
        Just(&b"12"[..]),
        Just(&b"."[..]),
        Just(&b"e+"[..]),
        Just(&b"true"[..]),
        Just(&b"nul"[..]),
        Just(&b" "[..]),
        Just(&b"\n"[..]),
        Just(&b"\t"[..]),
        Just(&b"\0"[..]),
        Just(&b"\xff"[..]),
        Just(&b"\xc3"[..]),
        Just(&b"\xc3\xa9"[..]),
        Just(&b"\"execute\""[..]),
    ];
    prop::collection::vec(fragment, 0..200).prop_map(|parts| parts.concat())
}

fn key() -> impl Strategy<Value = String> {
    "[a-z-]{0,6}"
}

fn text() -> impl Strategy<Value = String> {
    // Noncharacters are rejected by QEMU's parser (and ours), so they cannot round-trip.
    any::<String>().prop_map(|s| {
        s.chars()
            .filter(|&c| {
                let cp = c as u32;
                !(0xFDD0..=0xFDEF).contains(&cp) && (cp & 0xFFFE) != 0xFFFE
            })
            .collect()
    })
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| Value::Number(i.into())),
        any::<u64>().prop_map(|u| Value::Number(u.into())),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number)),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Equality where numbers compare by value (QEMU prints 1.0 as `1`, which reads back as an
/// integer) and object member order does not matter.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            match (x.as_i64(), y.as_i64(), x.as_u64(), y.as_u64()) {
                (Some(p), Some(q), _, _) => p == q,
                (_, _, Some(p), Some(q)) => p == q,
                _ => x.as_f64() == y.as_f64(),
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn arbitrary_bytes_never_panic_and_stay_bounded(
        input in prop::collection::vec(any::<u8>(), 0..2048),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        feed_chunked(tight(), &input, &cuts);
    }

    #[test]
    fn jsonish_noise_never_panics_and_stays_bounded(
        input in jsonish_bytes(),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        feed_chunked(tight(), &input, &cuts);
    }

    #[test]
    fn results_do_not_depend_on_how_input_is_split(
        input in jsonish_bytes(),
        cuts in prop::collection::vec(any::<usize>(), 0..16),
    ) {
        let whole = feed_chunked(tight(), &input, &[]);
        let split = feed_chunked(tight(), &input, &cuts);
        prop_assert_eq!(whole, split);
    }

    #[test]
    fn written_values_read_back_equal(value in json_value()) {
        let mut text = to_string(&value).into_bytes();
        // A number or keyword at top level ends only at the next byte.
        text.push(b' ');
        let out = Streamer::new(Limits::default()).feed_all(&text);
        prop_assert_eq!(out.len(), 1);
        match &out[0] {
            Parsed::Value(back) => prop_assert!(same(&value, back), "{} read back as {}", value, back),
            Parsed::Error(e) => prop_assert!(false, "{} failed to parse: {}", value, e),
        }
    }

    #[test]
    fn written_values_are_valid_standard_json(value in json_value()) {
        let text = to_string(&value);
        let back: Result<Value, _> = serde_json::from_str(&text);
        prop_assert!(back.is_ok(), "{}", text);
    }
}

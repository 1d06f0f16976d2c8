//! JSON output exactly as QEMU prints it on a QMP monitor.
//!
//! * Separators are `", "` and `": "`; no newlines inside a message.
//! * Object members come in QEMU's `QDict` walk order (see [`super::qdict`]), taking the order
//!   of the `serde_json::Map` as the insertion order. Build maps in QAPI declaration order and
//!   the output matches QEMU byte for byte.
//! * Strings: `"` `\` and the control characters with a short form use it (`\b \f \n \r \t`);
//!   every other character outside printable ASCII (including DEL) becomes `\uXXXX` with
//!   upper-case hex, characters beyond the BMP as a surrogate pair. `/` is not escaped.
//! * Integers in decimal; floating-point numbers as C's `%.17g` (`0.1` prints as
//!   `0.10000000000000001`, `1.0` as `1`).

use serde_json::{Number, Value};
use std::fmt::Write;

use super::qdict;

/// Serialises `value` the way QEMU's monitor prints it (no trailing newline).
pub fn to_string(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value);
    out
}

/// Appends the QEMU rendering of `value` to `out`.
pub fn write_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (key, item)) in qdict::walk(map).into_iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_string(out, key);
                out.push_str(": ");
                write_value(out, item);
            }
            out.push('}');
        }
    }
}

fn write_number(out: &mut String, n: &Number) {
    if let Some(i) = n.as_i64() {
        let _ = write!(out, "{i}");
    } else if let Some(u) = n.as_u64() {
        let _ = write!(out, "{u}");
    } else if let Some(f) = n.as_f64() {
        write_g17(out, f);
    }
}

/// Appends `s` as a JSON string literal escaped like QEMU does.
pub fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04X}");
                }
            }
        }
    }
    out.push('"');
}

/// C's `printf("%.17g", x)`: 17 significant digits, trailing zeros removed, exponent form
/// when the decimal exponent is below -4 or at least 17.
pub fn write_g17(out: &mut String, x: f64) {
    if x.is_nan() {
        out.push_str(if x.is_sign_negative() { "-nan" } else { "nan" });
        return;
    }
    if x.is_infinite() {
        out.push_str(if x < 0.0 { "-inf" } else { "inf" });
        return;
    }
    if x == 0.0 {
        out.push_str(if x.is_sign_negative() { "-0" } else { "0" });
        return;
    }
    // Rust's `{:e}` with a precision rounds correctly, like glibc's printf.
    let sci = format!("{:.16e}", x.abs());
    let (mantissa, exp) = match sci.split_once('e') {
        Some((m, e)) => (m, e.parse::<i32>().unwrap_or(0)),
        None => (sci.as_str(), 0),
    };
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    if x < 0.0 {
        out.push('-');
    }
    if !(-4..17).contains(&exp) {
        let (first, rest) = digits.split_at(1);
        out.push_str(first);
        let rest = rest.trim_end_matches('0');
        if !rest.is_empty() {
            out.push('.');
            out.push_str(rest);
        }
        let sign = if exp < 0 { '-' } else { '+' };
        let _ = write!(out, "e{sign}{:02}", exp.unsigned_abs());
    } else if exp >= 0 {
        let split = (exp as usize + 1).min(digits.len());
        let (int, frac) = digits.split_at(split);
        out.push_str(int);
        let frac = frac.trim_end_matches('0');
        if !frac.is_empty() {
            out.push('.');
            out.push_str(frac);
        }
    } else {
        out.push_str("0.");
        for _ in 0..(-exp - 1) {
            out.push('0');
        }
        out.push_str(digits.trim_end_matches('0'));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn g(x: f64) -> String {
        let mut s = String::new();
        write_g17(&mut s, x);
        s
    }

    #[test]
    fn floats_print_like_printf_g17() {
        // Every expectation below was printed by qemu-storage-daemon 10.0.2.
        assert_eq!(g(1.5e300), "1.5000000000000001e+300");
        assert_eq!(g(1e-7), "9.9999999999999995e-08");
        assert_eq!(g(123456789012345678.0), "1.2345678901234568e+17");
        assert_eq!(g(0.001), "0.001");
        assert_eq!(g(1e16), "10000000000000000");
        assert_eq!(g(1e17), "1e+17");
        assert_eq!(g(-2.5), "-2.5");
        assert_eq!(g(100000.0), "100000");
        assert_eq!(g(0.1), "0.10000000000000001");
        assert_eq!(g(1.0), "1");
        assert_eq!(g(-0.0), "-0");
        assert_eq!(g(1.8446744073709552e19), "1.8446744073709552e+19");
    }

    #[test]
    fn strings_escape_non_ascii_and_controls_in_upper_case_hex() {
        let s = "/\u{8}\u{c}\n\r\t'\"\u{7f}\u{0}\u{1f}\u{e9}\u{1F600}";
        let mut out = String::new();
        write_string(&mut out, s);
        assert_eq!(
            out,
            r#""/\b\f\n\r\t'\"\u007F\u0000\u001F\u00E9\uD83D\uDE00""#
        );
    }

    #[test]
    fn members_print_in_qdict_walk_order_with_qemu_separators() {
        let v = json!({"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2},
                       "package": "p"}, "capabilities": ["oob"]}});
        assert_eq!(
            to_string(&v),
            r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "p"}, "capabilities": ["oob"]}}"#
        );
        assert_eq!(
            to_string(&json!({"return": {}, "id": [1, {"a": null}]})),
            r#"{"return": {}, "id": [1, {"a": null}]}"#
        );
        assert_eq!(
            to_string(&json!({"error": {"class": "C", "desc": "d"}, "id": 1})),
            r#"{"id": 1, "error": {"class": "C", "desc": "d"}}"#
        );
    }

    #[test]
    fn big_integers_print_exactly() {
        assert_eq!(
            to_string(&json!([u64::MAX, i64::MIN])),
            "[18446744073709551615, -9223372036854775808]"
        );
    }
}

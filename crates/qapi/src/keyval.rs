//! QEMU's command-line `key=value,...` syntax ("keyval") and its scalar conversions.
//!
//! [`parse_keyval`] turns `driver=qcow2,file.driver=file,file.filename=/x,children.0=a` into a
//! JSON object whose leaves are strings: dotted keys nest objects, numeric key fragments make
//! arrays, `,,` stands for a literal comma and a later duplicate key wins. The conversion of
//! leaves to the schema's types happens in the checker, using the `parse_*` helpers here,
//! which follow QEMU's number, size and boolean syntax.

use serde_json::{Map, Value};

use crate::error::QapiError;

/// Longest key fragment QEMU accepts.
const MAX_FRAGMENT: usize = 127;

/// Parses QEMU keyval syntax into a nested object whose leaves are strings.
///
/// `implied_key` names the key of a leading value given without `key=` (QEMU's "implied
/// key", e.g. `driver` for `--blockdev qcow2,...`); it applies only to the first item.
/// Errors carry QEMU's texts, e.g. "Expected '=' after parameter 'x'",
/// "Parameters 'a.*' used inconsistently", "Parameter 'a.1' missing".
pub fn parse_keyval(s: &str, implied_key: Option<&str>) -> Result<Map<String, Value>, QapiError> {
    let mut root = Map::new();
    let mut rest = s;
    let mut implied = implied_key;
    while !rest.is_empty() {
        rest = parse_one(&mut root, rest, implied)?;
        implied = None;
    }
    listify_members(&mut root, "")?;
    Ok(root)
}

/// Length of the QAPI name at the start of `s` (0 if there is none).
fn qapi_name_len(s: &[u8]) -> usize {
    let mut p = 0;
    if s.first() == Some(&b'_') {
        // Downstream extension prefix: __RFQDN_
        if s.get(1) != Some(&b'_') {
            return 0;
        }
        p = 2;
        while s
            .get(p)
            .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'.')
        {
            p += 1;
        }
        if s.get(p) != Some(&b'_') {
            return 0;
        }
        p += 1;
    }
    if !s.get(p).is_some_and(u8::is_ascii_alphabetic) {
        return 0;
    }
    p += 1;
    while s
        .get(p)
        .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_')
    {
        p += 1;
    }
    p
}

/// Parses one `key=value` (or implied value) and returns what follows it.
fn parse_one<'a>(
    root: &mut Map<String, Value>,
    params: &'a str,
    implied: Option<&str>,
) -> Result<&'a str, QapiError> {
    let pb = params.as_bytes();
    let len = pb
        .iter()
        .position(|&c| c == b'=' || c == b',')
        .unwrap_or(pb.len());
    let (key, is_implied) = match implied {
        Some(ik) if len > 0 && pb.get(len) != Some(&b'=') => (ik, true),
        _ => (&params[..len], false),
    };
    let kb = key.as_bytes();

    // Split the key into fragments; the first must be a name, later ones may be indexes.
    let mut fragments: Vec<&str> = Vec::new();
    let mut s = 0;
    loop {
        let flen = if s != 0 && kb[s].is_ascii_digit() {
            kb[s..].iter().take_while(|c| c.is_ascii_digit()).count()
        } else {
            qapi_name_len(&kb[s..])
        };
        if flen == 0 || (s + flen < kb.len() && kb[s + flen] != b'.') {
            return Err(QapiError::generic(format!("Invalid parameter '{key}'")));
        }
        if flen > MAX_FRAGMENT {
            let fragment = if s != 0 || s + flen != kb.len() {
                " fragment"
            } else {
                ""
            };
            return Err(QapiError::generic(format!(
                "Parameter{fragment} '{}' is too long",
                &key[s..s + flen]
            )));
        }
        fragments.push(&key[s..s + flen]);
        s += flen;
        if s < kb.len() && kb[s] == b'.' {
            s += 1;
            if s == kb.len() {
                return Err(QapiError::generic(format!("Invalid parameter '{key}'")));
            }
            continue;
        }
        break;
    }

    let value_start = if is_implied {
        0
    } else {
        if pb.get(len) != Some(&b'=') {
            return Err(QapiError::generic(format!(
                "Expected '=' after parameter '{key}'"
            )));
        }
        len + 1
    };
    let mut value = String::new();
    let mut i = value_start;
    let mut rest_start = pb.len();
    let mut chunk = i;
    while i < pb.len() {
        if pb[i] == b',' {
            if pb.get(i + 1) == Some(&b',') {
                value.push_str(&params[chunk..=i]);
                i += 2;
                chunk = i;
                continue;
            }
            rest_start = i + 1;
            break;
        }
        i += 1;
    }
    value.push_str(&params[chunk..i.min(pb.len())]);

    // Walk/create the inner objects, then store the leaf.
    let mut cur = root;
    let mut consumed = 0;
    for (n, frag) in fragments.iter().enumerate() {
        consumed += frag.len() + usize::from(n > 0);
        let last = n + 1 == fragments.len();
        if last {
            match cur.get(*frag) {
                Some(Value::Object(_)) => {
                    return Err(QapiError::generic(format!(
                        "Parameters '{key}.*' used inconsistently"
                    )));
                }
                _ => {
                    cur.insert((*frag).to_owned(), Value::String(value));
                    break;
                }
            }
        }
        let entry = cur
            .entry((*frag).to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        match entry {
            Value::Object(inner) => cur = inner,
            _ => {
                return Err(QapiError::generic(format!(
                    "Parameters '{}.*' used inconsistently",
                    &key[..consumed]
                )));
            }
        }
    }
    Ok(&params[rest_start..])
}

/// A key fragment as a list index: all digits, capped at `i32::MAX` like QEMU.
fn key_to_index(key: &str) -> Option<usize> {
    if key.is_empty() || !key.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some(
        key.parse::<u64>()
            .map_or(i32::MAX as usize, |v| v.min(i32::MAX as u64) as usize),
    )
}

/// Turns objects whose keys are all indexes into arrays, recursively. `prefix` is the dotted
/// key of `map` followed by '.', or empty at the root.
fn listify_members(map: &mut Map<String, Value>, prefix: &str) -> Result<(), QapiError> {
    for (k, v) in map.iter_mut() {
        if let Value::Object(inner) = v {
            let inner_prefix = format!("{prefix}{k}.");
            listify_members(inner, &inner_prefix)?;
            if let Some(list) = as_list(inner, &inner_prefix)? {
                *v = Value::Array(list);
            }
        }
    }
    Ok(())
}

/// If every key of `map` is an index, the array it denotes.
fn as_list(map: &mut Map<String, Value>, prefix: &str) -> Result<Option<Vec<Value>>, QapiError> {
    let has_index = map.keys().any(|k| key_to_index(k).is_some());
    let has_member = map.keys().any(|k| key_to_index(k).is_none());
    if has_index && has_member {
        return Err(QapiError::generic(format!(
            "Parameters '{prefix}*' used inconsistently"
        )));
    }
    if !has_index {
        return Ok(None);
    }
    let n = map.len();
    let mut slots: Vec<Option<Value>> = vec![None; n];
    let mut max_index: Option<usize> = None;
    for (k, v) in std::mem::take(map) {
        let index = key_to_index(&k).unwrap_or(usize::MAX);
        max_index = Some(max_index.map_or(index, |m| m.max(index)));
        if index < n {
            slots[index] = Some(v);
        }
    }
    let upto = max_index.map_or(0, |m| m.saturating_add(1)).min(n + 1);
    let mut list = Vec::with_capacity(n);
    for i in 0..upto {
        match slots.get_mut(i).and_then(Option::take) {
            Some(v) => list.push(v),
            None => {
                return Err(QapiError::generic(format!(
                    "Parameter '{prefix}{i}' missing"
                )))
            }
        }
    }
    Ok(Some(list))
}

/// Splits optional leading C whitespace, as `strtol` skips it.
fn skip_space(s: &str) -> &str {
    s.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r'])
}

/// `strtoull`-style magnitude with base detection (0x.. hex, 0.. octal, decimal).
/// Returns `None` for no digits, trailing garbage or overflow.
fn parse_magnitude(s: &str) -> Option<u64> {
    let (digits, radix) = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        if h.bytes().next().is_some_and(|c| c.is_ascii_hexdigit()) {
            (h, 16)
        } else {
            // "0x" without hex digits: strtoull reads just "0" and stops at 'x'.
            return None;
        }
    } else if s.len() > 1 && s.starts_with('0') {
        (&s[1..], 8)
    } else {
        (s, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

/// QEMU's `qemu_strtoi64(s, NULL, 0)`: optional whitespace and sign, then decimal, `0x` hex
/// or `0` octal, nothing after.
pub(crate) fn parse_i64(s: &str) -> Option<i64> {
    let s = skip_space(s);
    let (neg, body) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let mag = parse_magnitude(body)?;
    if neg {
        if mag <= i64::MAX as u64 + 1 {
            Some((mag as i64).wrapping_neg())
        } else {
            None
        }
    } else {
        i64::try_from(mag).ok()
    }
}

/// QEMU's `qemu_strtou64(s, NULL, 0)`: like [`parse_i64`] but unsigned; a leading '-' is
/// accepted and negates in unsigned arithmetic (so "-1" is `u64::MAX`).
pub(crate) fn parse_u64(s: &str) -> Option<u64> {
    let s = skip_space(s);
    let (neg, body) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let mag = parse_magnitude(body)?;
    Some(if neg { mag.wrapping_neg() } else { mag })
}

/// Multiplier of a size suffix (B, K, M, G, T, P, E; either case).
fn suffix_mul(c: u8) -> Option<u64> {
    let shift = match c.to_ascii_uppercase() {
        b'B' => 0,
        b'K' => 10,
        b'M' => 20,
        b'G' => 30,
        b'T' => 40,
        b'P' => 50,
        b'E' => 60,
        _ => return None,
    };
    Some(1u64 << shift)
}

/// QEMU's `qemu_strtosz`: a decimal number with an optional fraction and an optional binary
/// suffix (`1G`, `1.5k`, `512b`), or a plain hex number (`0x1000`). A fraction needs a suffix
/// other than B. Fractions of a byte are rounded half up.
pub(crate) fn parse_size(s: &str) -> Option<u64> {
    let t = skip_space(s);
    let b = t.as_bytes();
    if b.first().is_some_and(|c| *c == b'-' || *c == b'+') {
        return None;
    }
    let int_len = b.iter().take_while(|c| c.is_ascii_digit()).count();
    let mut pos = int_len;
    // Hex: no fraction, no suffix.
    if int_len == 1 && b[0] == b'0' && matches!(b.get(1), Some(b'x' | b'X')) {
        let hex = &t[2..];
        let n = hex.bytes().take_while(u8::is_ascii_hexdigit).count();
        if n == 0 || n != hex.len() {
            return None;
        }
        return u64::from_str_radix(hex, 16).ok();
    }
    let int_part: u64 = if int_len == 0 {
        0
    } else {
        t[..int_len].parse().ok()?
    };
    // Fraction as 0.64 fixed point.
    let mut frac: u64 = 0;
    if b.get(pos) == Some(&b'.') {
        pos += 1;
        let digits = b[pos..].iter().take_while(|c| c.is_ascii_digit()).count();
        if int_len == 0 && digits == 0 {
            return None;
        }
        let text = format!(
            "0.{}",
            if digits == 0 {
                "0"
            } else {
                &t[pos..pos + digits]
            }
        );
        let f: f64 = text.parse().ok()?;
        frac = (f * 18446744073709551616.0) as u64;
        pos += digits;
    } else if int_len == 0 {
        return None;
    }
    let mul = match b.get(pos).and_then(|c| suffix_mul(*c)) {
        Some(m) => {
            pos += 1;
            m
        }
        None => 1,
    };
    if pos != b.len() {
        return None;
    }
    if mul == 1 {
        return if frac != 0 { None } else { Some(int_part) };
    }
    let whole = u128::from(int_part) * u128::from(mul);
    let f = u128::from(frac) * u128::from(mul);
    let mut total = whole + (f >> 64);
    // Round half up.
    total += (f >> 63) & 1;
    u64::try_from(total).ok()
}

/// QEMU's boolean words: on/yes/true/y and off/no/false/n.
pub(crate) fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn size_suffixes_and_fractions() {
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("1k"), Some(1024));
        assert_eq!(parse_size("1b"), Some(1));
        assert_eq!(parse_size("1.5k"), Some(1536));
        assert_eq!(parse_size("1.k"), Some(1024));
        assert_eq!(parse_size("0x10"), Some(16));
        assert_eq!(parse_size("15E"), Some(15 << 60));
        assert_eq!(parse_size("16E"), None);
        assert_eq!(parse_size("1.5"), None);
        assert_eq!(parse_size("1kB"), None);
        assert_eq!(parse_size("-1"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("0x10k"), None);
        assert_eq!(parse_size(" 5"), Some(5));
        assert_eq!(parse_size("5 "), None);
    }

    #[test]
    fn integers_follow_strtol_base_detection() {
        assert_eq!(parse_i64("0x10"), Some(16));
        assert_eq!(parse_i64("010"), Some(8));
        assert_eq!(parse_i64("-5"), Some(-5));
        assert_eq!(parse_i64(" 5"), Some(5));
        assert_eq!(parse_i64("5 "), None);
        assert_eq!(parse_i64("08"), None);
        assert_eq!(parse_i64("9223372036854775808"), None);
        assert_eq!(parse_i64("-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_u64("-1"), Some(u64::MAX));
        assert_eq!(parse_u64("18446744073709551616"), None);
        assert_eq!(parse_u64("1k"), None);
    }

    #[test]
    fn keyval_nests_dotted_keys_and_listifies() {
        let m = parse_keyval(
            "driver=quorum,children.0=a,children.1.driver=file,a.b=x,,y",
            None,
        )
        .unwrap();
        assert_eq!(
            Value::Object(m),
            json!({"driver": "quorum", "children": ["a", {"driver": "file"}], "a": {"b": "x,y"}})
        );
    }

    #[test]
    fn keyval_implied_key_applies_to_first_item_only() {
        let m = parse_keyval("null-co,node-name=n", Some("driver")).unwrap();
        assert_eq!(
            Value::Object(m),
            json!({"driver": "null-co", "node-name": "n"})
        );
        let e = parse_keyval("driver=x,foo", Some("driver")).unwrap_err();
        assert_eq!(e.desc, "Expected '=' after parameter 'foo'");
    }
}

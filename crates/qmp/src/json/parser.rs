//! Push parser: builds a `serde_json::Value` from tokens, one token at a time.
//!
//! It keeps an explicit stack of open containers (no recursion), and reports the same first
//! error, with the same words, as QEMU's recursive-descent parser would for the whole token
//! sequence. Notable QEMU rules reproduced here:
//!
//! * an object key is parsed as any value and then rejected if it is not a string
//!   (`{[1 2]: 3}` reports the list error, `{1: 2}` "key is not a string in object");
//! * a duplicate key is detected after its value has been parsed;
//! * strings: the escapes `\" \' \\ \/ \b \f \n \r \t \uXXXX` (surrogate pairs joined),
//!   modified UTF-8 (`C0 80` is U+0000), noncharacters and lone surrogates rejected;
//! * integers become i64, else u64, else f64; floats f64. A float too large for f64 (QEMU
//!   makes it `inf` and prints invalid JSON) is clamped to the largest finite f64.

use serde_json::{Map, Number, Value};

use super::lexer::TokenKind;

/// Prefix of every syntax error description.
const PREFIX: &str = "JSON parse error, ";

#[derive(Debug)]
enum ObjState {
    /// After `{`: a key or `}`.
    KeyOrEnd,
    /// After `,`: a key.
    Key,
    /// After a key: `:`.
    Colon(String),
    /// After `:`: the member's value.
    Value(String),
    /// After a member: `,` or `}`.
    CommaOrEnd,
}

#[derive(Debug)]
enum ArrState {
    /// After `[`: a value or `]`.
    ValueOrEnd,
    /// After `,`: a value.
    Value,
    /// After an element: `,` or `]`.
    CommaOrEnd,
}

#[derive(Debug)]
enum Frame {
    Object(Map<String, Value>, ObjState),
    Array(Vec<Value>, ArrState),
}

/// The push parser for one message at a time.
#[derive(Debug, Default)]
pub struct Parser {
    stack: Vec<Frame>,
    done: Option<Value>,
}

impl Parser {
    /// An empty parser.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets any partial value.
    pub fn reset(&mut self) {
        self.stack = Vec::new();
        self.done = None;
    }

    /// The completed value, if the tokens so far form one.
    pub fn take(&mut self) -> Option<Value> {
        self.done.take()
    }

    /// Feeds one token with its raw text. On error the parser must be reset before reuse.
    /// The error is the full description ("JSON parse error, ...").
    pub fn push(&mut self, kind: TokenKind, text: &[u8]) -> Result<(), String> {
        self.push_inner(kind, text)
            .map_err(|msg| format!("{PREFIX}{msg}"))
    }

    fn push_inner(&mut self, kind: TokenKind, text: &[u8]) -> Result<(), String> {
        let Some(top) = self.stack.last_mut() else {
            if self.done.is_some() {
                // Cannot happen when messages are split at balanced brackets; treat as QEMU
                // would treat trailing tokens after a value.
                return Err("expecting value".into());
            }
            return self.begin_value(kind, text);
        };
        match top {
            Frame::Object(_, ObjState::KeyOrEnd) if kind == TokenKind::RCurly => self.close(),
            Frame::Object(_, ObjState::KeyOrEnd | ObjState::Key) => self.begin_value(kind, text),
            Frame::Object(_, state @ ObjState::Colon(_)) => {
                if kind != TokenKind::Colon {
                    return Err("missing : in object pair".into());
                }
                if let ObjState::Colon(key) = std::mem::replace(state, ObjState::CommaOrEnd) {
                    *state = ObjState::Value(key);
                }
                Ok(())
            }
            Frame::Object(_, ObjState::Value(_)) => self.begin_value(kind, text),
            Frame::Object(_, state @ ObjState::CommaOrEnd) => match kind {
                TokenKind::RCurly => self.close(),
                TokenKind::Comma => {
                    *state = ObjState::Key;
                    Ok(())
                }
                _ => Err("expected separator in dict".into()),
            },
            Frame::Array(_, ArrState::ValueOrEnd) if kind == TokenKind::RSquare => self.close(),
            Frame::Array(_, ArrState::ValueOrEnd | ArrState::Value) => self.begin_value(kind, text),
            Frame::Array(_, state @ ArrState::CommaOrEnd) => match kind {
                TokenKind::RSquare => self.close(),
                TokenKind::Comma => {
                    *state = ArrState::Value;
                    Ok(())
                }
                _ => Err("expected separator in list".into()),
            },
        }
    }

    /// A token where a value must start.
    fn begin_value(&mut self, kind: TokenKind, text: &[u8]) -> Result<(), String> {
        let value = match kind {
            TokenKind::LCurly => {
                self.stack
                    .push(Frame::Object(Map::new(), ObjState::KeyOrEnd));
                return Ok(());
            }
            TokenKind::LSquare => {
                self.stack
                    .push(Frame::Array(Vec::new(), ArrState::ValueOrEnd));
                return Ok(());
            }
            TokenKind::String => Value::String(decode_string(text)?),
            TokenKind::Integer => Value::Number(parse_integer(text)),
            TokenKind::Float => Value::Number(parse_float(text)),
            TokenKind::Keyword => match text {
                b"true" => Value::Bool(true),
                b"false" => Value::Bool(false),
                b"null" => Value::Null,
                _ => {
                    return Err(format!(
                        "invalid keyword '{}'",
                        String::from_utf8_lossy(text)
                    ))
                }
            },
            TokenKind::RCurly | TokenKind::RSquare | TokenKind::Colon | TokenKind::Comma => {
                return Err("expecting value".into())
            }
        };
        self.complete(value)
    }

    /// Closes the innermost container and hands it to its parent.
    fn close(&mut self) -> Result<(), String> {
        let value = match self.stack.pop() {
            Some(Frame::Object(map, _)) => Value::Object(map),
            Some(Frame::Array(items, _)) => Value::Array(items),
            None => return Err("expecting value".into()),
        };
        self.complete(value)
    }

    /// A value is complete: store it where the innermost container expects it.
    fn complete(&mut self, value: Value) -> Result<(), String> {
        let Some(top) = self.stack.last_mut() else {
            self.done = Some(value);
            return Ok(());
        };
        match top {
            Frame::Object(_, state @ (ObjState::KeyOrEnd | ObjState::Key)) => match value {
                Value::String(key) => {
                    *state = ObjState::Colon(key);
                    Ok(())
                }
                _ => Err("key is not a string in object".into()),
            },
            Frame::Object(map, state @ ObjState::Value(_)) => {
                let ObjState::Value(key) = std::mem::replace(state, ObjState::CommaOrEnd) else {
                    return Err("expecting value".into());
                };
                if map.contains_key(&key) {
                    return Err("duplicate key".into());
                }
                map.insert(key, value);
                Ok(())
            }
            Frame::Array(items, state @ (ArrState::ValueOrEnd | ArrState::Value)) => {
                items.push(value);
                *state = ArrState::CommaOrEnd;
                Ok(())
            }
            // A value cannot complete where a separator is expected: begin_value is only
            // called in value positions.
            Frame::Object(_, ObjState::Colon(_) | ObjState::CommaOrEnd)
            | Frame::Array(_, ArrState::CommaOrEnd) => Err("expecting value".into()),
        }
    }
}

fn parse_integer(text: &[u8]) -> Number {
    let s = String::from_utf8_lossy(text);
    if let Ok(i) = s.parse::<i64>() {
        return Number::from(i);
    }
    if !s.starts_with('-') {
        if let Ok(u) = s.parse::<u64>() {
            return Number::from(u);
        }
    }
    parse_float(text)
}

fn parse_float(text: &[u8]) -> Number {
    let s = String::from_utf8_lossy(text);
    let f = s.parse::<f64>().unwrap_or(0.0);
    let f = if f.is_infinite() {
        f64::MAX.copysign(f)
    } else {
        f
    };
    Number::from_f64(f).unwrap_or_else(|| Number::from(0))
}

/// Is `cp` a Unicode scalar value QEMU accepts (not a surrogate, not a noncharacter)?
fn valid_codepoint(cp: u32) -> bool {
    cp <= 0x10FFFF
        && !(0xD800..=0xDFFF).contains(&cp)
        && !(0xFDD0..=0xFDEF).contains(&cp)
        && (cp & 0xFFFE) != 0xFFFE
}

/// Four hex digits at `pos` of `text` (reading stops at the end of the token).
fn hex4(text: &[u8], pos: usize) -> Option<u32> {
    let mut cp = 0u32;
    for k in 0..4 {
        let digit = char::from(*text.get(pos + k)?).to_digit(16)?;
        cp = (cp << 4) | digit;
    }
    Some(cp)
}

/// Decodes one modified-UTF-8 character at the start of `bytes`: returns it and its length.
fn decode_utf8(bytes: &[u8]) -> Option<(char, usize)> {
    let first = *bytes.first()?;
    if first < 0x80 {
        return Some((char::from(first), 1));
    }
    if first == 0xC0 && bytes.get(1) == Some(&0x80) {
        return Some(('\0', 2));
    }
    let (len, min, init) = match first {
        0xC2..=0xDF => (2, 0x80, u32::from(first & 0x1F)),
        0xE0..=0xEF => (3, 0x800, u32::from(first & 0x0F)),
        0xF0..=0xF4 => (4, 0x10000, u32::from(first & 0x07)),
        _ => return None,
    };
    let mut cp = init;
    for k in 1..len {
        let b = *bytes.get(k)?;
        if !(0x80..=0xBF).contains(&b) {
            return None;
        }
        cp = (cp << 6) | u32::from(b & 0x3F);
    }
    if cp < min || !valid_codepoint(cp) {
        return None;
    }
    char::from_u32(cp).map(|c| (c, len))
}

/// Decodes a string token (quotes included) into its value.
fn decode_string(text: &[u8]) -> Result<String, String> {
    // The lexer guarantees: opening quote, closing quote, every backslash followed by a byte.
    let end = text.len().saturating_sub(1);
    let mut out = String::with_capacity(end);
    let mut i = 1;
    while i < end {
        let b = text[i];
        if b != b'\\' {
            let (c, len) = decode_utf8(&text[i..end])
                .ok_or_else(|| "invalid UTF-8 sequence in string".to_string())?;
            out.push(c);
            i += len;
            continue;
        }
        let simple = match text.get(i + 1) {
            Some(b'"') => Some('"'),
            Some(b'\'') => Some('\''),
            Some(b'\\') => Some('\\'),
            Some(b'/') => Some('/'),
            Some(b'b') => Some('\u{8}'),
            Some(b'f') => Some('\u{c}'),
            Some(b'n') => Some('\n'),
            Some(b'r') => Some('\r'),
            Some(b't') => Some('\t'),
            Some(b'u') => None,
            _ => return Err("invalid escape sequence in string".into()),
        };
        if let Some(c) = simple {
            out.push(c);
            i += 2;
            continue;
        }
        let (c, next) = decode_unicode_escape(text, i)?;
        out.push(c);
        i = next;
    }
    Ok(out)
}

/// Decodes `\uXXXX` (or a surrogate pair `\uXXXX\uXXXX`) starting at `start` (the
/// backslash); returns the character and the index after the escape.
fn decode_unicode_escape(text: &[u8], start: usize) -> Result<(char, usize), String> {
    let mut next = start + 6;
    let mut cp = hex4(text, start + 2);
    if let Some(lead @ 0xD800..=0xDBFF) = cp {
        if text.get(next) == Some(&b'\\') && text.get(next + 1) == Some(&b'u') {
            cp = match hex4(text, next + 2) {
                Some(trail @ 0xDC00..=0xDFFF) => {
                    next += 6;
                    Some(0x10000 + ((lead & 0x3FF) << 10) + (trail & 0x3FF))
                }
                _ => None,
            };
        }
    }
    match cp
        .filter(|&cp| valid_codepoint(cp))
        .and_then(char::from_u32)
    {
        Some(c) => Ok((c, next)),
        None => {
            let shown = &text[start..next.min(text.len())];
            Err(format!(
                "{} is not a valid Unicode character",
                String::from_utf8_lossy(shown)
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::lexer::{Event, Lexer};
    use super::*;
    use serde_json::json;

    /// Parses one complete message (lexed with a trailing space to end numbers).
    fn parse(input: &str) -> Result<Value, String> {
        let mut lexer = Lexer::new();
        let mut parser = Parser::new();
        let bytes: Vec<u8> = input.bytes().chain(std::iter::once(b' ')).collect();
        let mut i = 0;
        while i < bytes.len() {
            let step = lexer.step(bytes[i]);
            if step.consumed {
                i += 1;
            }
            match step.event {
                Event::Token(kind) => parser.push(kind, lexer.text())?,
                Event::Error => return Err("lexical".into()),
                Event::Nothing => {}
            }
        }
        parser.take().ok_or_else(|| "incomplete".into())
    }

    fn err(input: &str) -> String {
        match parse(input) {
            Err(e) => e.trim_start_matches(PREFIX).to_string(),
            Ok(v) => panic!("{input} parsed as {v}"),
        }
    }

    #[test]
    fn well_formed_values_parse() {
        assert_eq!(
            parse(r#"{"a": [1, -2, 3.5, true, false, null, "x"], "b": {}}"#),
            Ok(json!({"a": [1, -2, 3.5, true, false, null, "x"], "b": {}}))
        );
    }

    #[test]
    fn integers_widen_like_qemu() {
        assert_eq!(parse("18446744073709551615"), Ok(json!(u64::MAX)));
        assert_eq!(parse("-9223372036854775808"), Ok(json!(i64::MIN)));
        assert_eq!(
            parse("18446744073709551616"),
            Ok(json!(18446744073709551616.0))
        );
        assert_eq!(
            parse("-9223372036854775809"),
            Ok(json!(-9223372036854775809.0))
        );
        assert_eq!(parse("-0"), Ok(json!(0)));
    }

    #[test]
    fn huge_floats_are_clamped() {
        assert_eq!(parse("1e999"), Ok(json!(f64::MAX)));
        assert_eq!(parse("-1e999"), Ok(json!(-f64::MAX)));
    }

    #[test]
    fn grammar_errors_use_qemu_words() {
        assert_eq!(err(r#"{"a" 1}"#), "missing : in object pair");
        assert_eq!(err(r#"{"a":1 "b":2}"#), "expected separator in dict");
        assert_eq!(err("{1:2}"), "key is not a string in object");
        assert_eq!(err("[1 2]"), "expected separator in list");
        assert_eq!(err(r#"{"a":1,"a":2}"#), "duplicate key");
        assert_eq!(err(r#"{"a":foo}"#), "invalid keyword 'foo'");
        assert_eq!(err(r#"{"a":,}"#), "expecting value");
        assert_eq!(err("{,}"), "expecting value");
        assert_eq!(err(r#"{"a":1,}"#), "expecting value");
        assert_eq!(err("[1,]"), "expecting value");
        assert_eq!(err("}"), "expecting value");
        assert_eq!(err(r#"{"a":[}]"#), "expecting value");
    }

    #[test]
    fn a_bad_key_container_reports_its_own_error_first() {
        assert_eq!(err("{[1 2]:3}"), "expected separator in list");
        assert_eq!(err(r#"{{"a":1}:3}"#), "key is not a string in object");
    }

    #[test]
    fn duplicate_key_is_reported_after_its_value_parses() {
        assert_eq!(err(r#"{"a":1,"a":[1 2]}"#), "expected separator in list");
    }

    #[test]
    fn string_escapes_decode() {
        assert_eq!(
            parse(r#"'\/\b\f\n\r\t\'\"\u00e9\ud83d\ude00\u0000'"#),
            Ok(json!("/\u{8}\u{c}\n\r\t'\"\u{e9}\u{1F600}\u{0}"))
        );
    }

    #[test]
    fn bad_escapes_use_qemu_words() {
        assert_eq!(err(r#""\x""#), "invalid escape sequence in string");
        assert_eq!(
            err(r#""\uD800""#),
            r"\uD800 is not a valid Unicode character"
        );
        assert_eq!(
            err(r#""\uD800\u0041""#),
            r"\uD800 is not a valid Unicode character"
        );
        assert_eq!(
            err(r#""\uDC00""#),
            r"\uDC00 is not a valid Unicode character"
        );
        assert_eq!(
            err(r#""\uZZZZ""#),
            r"\uZZZZ is not a valid Unicode character"
        );
        assert_eq!(
            err(r#""\u12""#),
            r#"\u12" is not a valid Unicode character"#
        );
        assert_eq!(
            err(r#""\uFFFF""#),
            r"\uFFFF is not a valid Unicode character"
        );
        assert_eq!(
            err(r#""\uFDD0""#),
            r"\uFDD0 is not a valid Unicode character"
        );
    }

    #[test]
    fn raw_utf8_is_checked_like_qemu() {
        let decode = |b: &[u8]| decode_string(b).map_err(|e| e.to_string());
        assert_eq!(decode(b"\"\xc3\xa9\""), Ok("\u{e9}".to_string()));
        assert_eq!(decode(b"\"\xc0\x80\""), Ok("\0".to_string()));
        for bad in [
            &b"\"\xc3\""[..],
            b"\"\xef\xbf\xbf\"",
            b"\"\xed\xa0\x80\"",
            b"\"\xf4\x90\x80\x80\"",
            b"\"\xe0\x80\xaf\"",
        ] {
            assert_eq!(decode(bad), Err("invalid UTF-8 sequence in string".into()));
        }
    }
}

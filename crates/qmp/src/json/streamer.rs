//! Splits a byte stream into JSON messages, with QEMU's error recovery and bounded memory.
//!
//! Message boundaries are found by counting brackets, as QEMU does: tokens accumulate while
//! more `{`/`[` are open than closed; when the counts are back to zero (or either goes
//! negative) the message is complete. So `42`, `"x"` or a lone `}` are messages of their own,
//! and objects may follow each other with no separator at all.
//!
//! Errors, all reported as a description for a `GenericError` reply:
//!
//! * **lexical** ("JSON parse error, stray '...'"): reported at once; whatever was collected for
//!   the current message is dropped and the bracket counts are reset, so the next token starts
//!   a new message (the lexer meanwhile skips to a resynchronisation point). Same as QSD 10.0:
//!   after `{"foo` + newline, a following well-formed command is executed.
//! * **syntax** ("JSON parse error, expecting value", ...): the first one is remembered and
//!   reported when the brackets balance; the tokens in between are ignored.
//! * **limits** ("JSON token size limit exceeded", "JSON token count limit exceeded",
//!   "JSON nesting depth limit exceeded"): reported at once. Then, unlike QSD 10.0 (which resets
//!   and reparses the rest of the oversized message as fresh messages, producing a flood of
//!   errors), the rest of the message is skipped without storing it until its brackets
//!   balance — or until a lexical error, which resets everything silently (so an unterminated
//!   huge string ends at the next newline). Skipping costs no memory.
//!
//! Memory: the token being lexed is bounded by the byte limit, the value being built by the
//! token limit; nesting by the depth limit. Nothing is recursive.

use serde_json::Value;

use super::lexer::{Event, Lexer, TokenKind};
use super::parser::Parser;

/// Limits on one message. QEMU's are 64 MiB, 2 Mi tokens and depth 1024.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes of tokens in one message (whitespace between tokens is not counted).
    pub max_bytes: usize,
    /// Most tokens in one message.
    pub max_tokens: usize,
    /// Most open brackets (`{` plus `[`) at once. Capped at [`Limits::MAX_DEPTH`].
    pub max_depth: usize,
}

impl Limits {
    /// The deepest nesting ever accepted (QEMU's limit); deeper values could overflow the
    /// stack of code that walks them recursively.
    pub const MAX_DEPTH: usize = 1024;
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 1 << 20,
            max_tokens: 64 << 10,
            max_depth: Self::MAX_DEPTH,
        }
    }
}

/// One complete message, or an error to report for a malformed one.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    /// A well-formed JSON value (any type).
    Value(Value),
    /// The description of a `GenericError` to send (no id).
    Error(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Mode {
    /// Tokens go to the parser.
    Normal,
    /// A syntax error was found; report it when the message ends.
    Failed(String),
    /// A limit was exceeded and reported; skip until the message ends.
    Discard,
}

/// The incremental message splitter and parser.
#[derive(Debug)]
pub struct Streamer {
    limits: Limits,
    lexer: Lexer,
    parser: Parser,
    mode: Mode,
    /// Open `{` minus `}` in the current message (may go negative: then it ends).
    braces: i64,
    /// Open `[` minus `]` in the current message.
    brackets: i64,
    /// Bytes of the finished tokens of the current message.
    bytes: usize,
    /// Finished tokens of the current message.
    tokens: usize,
}

impl Streamer {
    /// A streamer with the given limits (depth capped at [`Limits::MAX_DEPTH`]).
    pub fn new(mut limits: Limits) -> Self {
        limits.max_depth = limits.max_depth.min(Limits::MAX_DEPTH);
        Streamer {
            limits,
            lexer: Lexer::new(),
            parser: Parser::new(),
            mode: Mode::Normal,
            braces: 0,
            brackets: 0,
            bytes: 0,
            tokens: 0,
        }
    }

    /// Feeds bytes until one message (or error) is produced or `input` is used up.
    /// Returns how many bytes were used; feed the rest again later. At least one byte is used
    /// unless a result is returned, so a loop calling this always progresses.
    pub fn feed(&mut self, input: &[u8]) -> (usize, Option<Parsed>) {
        let mut used = 0;
        while let Some(&b) = input.get(used) {
            let step = self.lexer.step(b);
            if step.consumed {
                used += 1;
            }
            let result = match step.event {
                Event::Nothing => self.check_token_growth(),
                Event::Token(kind) => self.on_token(kind),
                Event::Error => self.on_lexical_error(),
            };
            if result.is_some() {
                return (used, result);
            }
        }
        (used, None)
    }

    /// Feeds all of `input`, collecting every result (convenience for tests and tools).
    pub fn feed_all(&mut self, mut input: &[u8]) -> Vec<Parsed> {
        let mut out = Vec::new();
        while !input.is_empty() {
            let (used, result) = self.feed(input);
            input = &input[used..];
            out.extend(result);
        }
        out
    }

    /// Bytes of the message in progress: its finished tokens plus the stored part of the
    /// token being lexed. Never more than [`Limits::max_bytes`].
    pub fn buffered_bytes(&self) -> usize {
        let partial = if self.lexer.in_token() {
            self.lexer.text().len()
        } else {
            0
        };
        self.bytes + partial
    }

    fn ended(&self) -> bool {
        !((self.braces > 0 || self.brackets > 0) && self.braces >= 0 && self.brackets >= 0)
    }

    fn reset_message(&mut self) {
        self.mode = Mode::Normal;
        self.braces = 0;
        self.brackets = 0;
        self.bytes = 0;
        self.tokens = 0;
        self.parser.reset();
        self.lexer.keep_text(true);
        self.lexer.shrink(4096);
    }

    /// Enters discard mode after a limit error; ends it at once if the message is over.
    fn exceed(&mut self, what: &str) -> Option<Parsed> {
        self.mode = Mode::Discard;
        self.parser.reset();
        self.lexer.keep_text(false);
        if !self.lexer.in_token() && self.ended() {
            self.reset_message();
        }
        Some(Parsed::Error(format!("JSON {what} limit exceeded")))
    }

    /// A long token must not grow past the byte limit while it is being lexed.
    fn check_token_growth(&mut self) -> Option<Parsed> {
        if self.mode != Mode::Discard
            && self.lexer.in_token()
            && self.bytes.saturating_add(self.lexer.token_len()) > self.limits.max_bytes
        {
            return self.exceed("token size");
        }
        None
    }

    fn on_token(&mut self, kind: TokenKind) -> Option<Parsed> {
        match kind {
            TokenKind::LCurly => self.braces += 1,
            TokenKind::RCurly => self.braces -= 1,
            TokenKind::LSquare => self.brackets += 1,
            TokenKind::RSquare => self.brackets -= 1,
            _ => {}
        }
        if self.mode == Mode::Discard {
            if self.ended() {
                self.reset_message();
            }
            return None;
        }
        let len = self.lexer.token_len();
        if self.bytes.saturating_add(len) > self.limits.max_bytes {
            return self.exceed("token size");
        }
        if self.tokens >= self.limits.max_tokens {
            return self.exceed("token count");
        }
        let depth = self.braces.max(0) + self.brackets.max(0);
        if depth > self.limits.max_depth as i64 {
            return self.exceed("nesting depth");
        }
        self.bytes += len;
        self.tokens += 1;
        if self.mode == Mode::Normal {
            if let Err(desc) = self.parser.push(kind, self.lexer.text()) {
                self.mode = Mode::Failed(desc);
                self.parser.reset();
            }
        }
        if !self.ended() {
            return None;
        }
        let result = match std::mem::replace(&mut self.mode, Mode::Normal) {
            Mode::Failed(desc) => Parsed::Error(desc),
            _ => match self.parser.take() {
                Some(value) => Parsed::Value(value),
                None => Parsed::Error("JSON parse error, expecting value".into()),
            },
        };
        self.reset_message();
        Some(result)
    }

    fn on_lexical_error(&mut self) -> Option<Parsed> {
        let silent = self.mode == Mode::Discard;
        let text = self.lexer.text();
        // QEMU formats the text as a C string: it ends at a NUL byte.
        let text = match text.iter().position(|&b| b == 0) {
            Some(nul) => &text[..nul],
            None => text,
        };
        let desc = format!(
            "JSON parse error, stray '{}'",
            String::from_utf8_lossy(text)
        );
        self.reset_message();
        if silent {
            None
        } else {
            Some(Parsed::Error(desc))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(input: &[u8]) -> Vec<Parsed> {
        Streamer::new(Limits::default()).feed_all(input)
    }

    fn err(desc: &str) -> Parsed {
        Parsed::Error(desc.to_string())
    }

    #[test]
    fn concatenated_objects_are_separate_messages() {
        assert_eq!(
            run(br#"{"a":1}{"b":2}"#),
            [
                Parsed::Value(json!({"a": 1})),
                Parsed::Value(json!({"b": 2}))
            ]
        );
    }

    #[test]
    fn a_message_split_across_feeds_is_reassembled() {
        let mut s = Streamer::new(Limits::default());
        assert!(s.feed_all(br#"{"execute": "qu"#).is_empty());
        assert_eq!(
            s.feed_all(br#"ery-version"}"#),
            [Parsed::Value(json!({"execute": "query-version"}))]
        );
    }

    #[test]
    fn top_level_scalars_are_messages_once_terminated() {
        assert_eq!(run(b"42"), []);
        assert_eq!(
            run(b"42 \"x\" true "),
            [
                Parsed::Value(json!(42)),
                Parsed::Value(json!("x")),
                Parsed::Value(json!(true))
            ]
        );
    }

    #[test]
    fn unterminated_string_then_newline_resyncs_before_next_command() {
        assert_eq!(
            run(b"{\"foo\n{\"execute\":\"x\"}"),
            [
                err("JSON parse error, stray '\"foo\n'"),
                Parsed::Value(json!({"execute": "x"}))
            ]
        );
    }

    #[test]
    fn stray_byte_inside_object_gives_two_errors_like_qsd() {
        assert_eq!(
            run(br#"{"a":1 @}"#),
            [
                err("JSON parse error, stray '@'"),
                err("JSON parse error, expecting value")
            ]
        );
    }

    #[test]
    fn stray_error_consumes_the_offending_byte() {
        assert_eq!(run(br#"{"a":-}"#), [err("JSON parse error, stray '-}'")]);
    }

    #[test]
    fn nul_byte_ends_the_stray_text() {
        assert_eq!(run(b"\0"), [err("JSON parse error, stray ''")]);
    }

    #[test]
    fn invalid_utf8_in_stray_text_is_replaced() {
        assert_eq!(
            run(b"\xff{}"),
            [
                err("JSON parse error, stray '\u{fffd}'"),
                Parsed::Value(json!({}))
            ]
        );
    }

    #[test]
    fn extra_closing_brace_is_its_own_error() {
        assert_eq!(
            run(br#"{"a":1}}"#),
            [
                Parsed::Value(json!({"a": 1})),
                err("JSON parse error, expecting value")
            ]
        );
    }

    #[test]
    fn syntax_error_is_reported_when_brackets_balance() {
        let mut s = Streamer::new(Limits::default());
        assert!(s.feed_all(br#"{"a" 1, "b": [1, 2"#).is_empty());
        assert_eq!(
            s.feed_all(b"]}"),
            [err("JSON parse error, missing : in object pair")]
        );
    }

    #[test]
    fn oversized_string_is_reported_once_and_skipped_without_buffering() {
        let limits = Limits {
            max_bytes: 1000,
            ..Limits::default()
        };
        let mut s = Streamer::new(limits);
        let mut out = s.feed_all(br#"{"execute": "x", "arguments": {"data": ""#);
        for _ in 0..1000 {
            out.extend(s.feed_all(&[b'a'; 1000]));
            assert!(s.buffered_bytes() <= 1000);
        }
        out.extend(s.feed_all(br#""}}{"execute": "y"}"#));
        assert_eq!(
            out,
            [
                err("JSON token size limit exceeded"),
                Parsed::Value(json!({"execute": "y"}))
            ]
        );
    }

    #[test]
    fn oversized_unterminated_string_ends_at_newline() {
        let limits = Limits {
            max_bytes: 100,
            ..Limits::default()
        };
        let mut s = Streamer::new(limits);
        let mut input = br#"{"execute": ""#.to_vec();
        input.extend([b'a'; 500]);
        input.extend(b"\n{\"execute\": \"y\"}");
        assert_eq!(
            s.feed_all(&input),
            [
                err("JSON token size limit exceeded"),
                Parsed::Value(json!({"execute": "y"}))
            ]
        );
    }

    #[test]
    fn too_many_tokens_is_reported_once() {
        let limits = Limits {
            max_tokens: 10,
            ..Limits::default()
        };
        let mut s = Streamer::new(limits);
        let mut input = b"[".to_vec();
        for _ in 0..100 {
            input.extend(b"1,");
        }
        input.extend(b"1]{}");
        assert_eq!(
            s.feed_all(&input),
            [
                err("JSON token count limit exceeded"),
                Parsed::Value(json!({}))
            ]
        );
    }

    #[test]
    fn nesting_limit_is_reported_once() {
        let mut input = vec![b'['; 1025];
        input.extend(vec![b']'; 1025]);
        input.extend(b"{}");
        assert_eq!(
            run(&input),
            [
                err("JSON nesting depth limit exceeded"),
                Parsed::Value(json!({}))
            ]
        );
    }

    #[test]
    fn nesting_to_the_limit_is_accepted() {
        let mut input = vec![b'['; 1024];
        input.extend(vec![b']'; 1024]);
        let out = run(&input);
        assert!(matches!(out.as_slice(), [Parsed::Value(_)]));
    }

    #[test]
    fn oversized_top_level_keyword_is_skipped() {
        let limits = Limits {
            max_bytes: 10,
            ..Limits::default()
        };
        let mut s = Streamer::new(limits);
        let mut input = vec![b'a'; 100];
        input.extend(b" {}");
        assert_eq!(
            s.feed_all(&input),
            [
                err("JSON token size limit exceeded"),
                Parsed::Value(json!({}))
            ]
        );
    }
}

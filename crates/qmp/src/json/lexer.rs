//! Byte-level JSON lexer in QEMU's dialect.
//!
//! A state machine fed one byte at a time. A step either consumes the byte or only looks at
//! it (numbers and keywords end at the first byte that cannot continue them; that byte is then
//! lexed again from the start state). The dialect, as observed on qemu-storage-daemon:
//!
//! * whitespace is space, tab, CR, LF;
//! * strings are delimited by `"` or `'`; inside, bytes 0x20..=0xFD are taken as they come
//!   (escapes and UTF-8 are checked later by the parser); a control byte or 0xFE/0xFF is a
//!   lexical error;
//! * numbers follow RFC 8259 (`01`, `1.`, `-x` are errors); keywords are `[a-z]+`;
//! * any other byte at the start of a token is an error.
//!
//! An error consumes the offending byte, which is part of the error text
//! (`{"a":-}` reports `stray '-}'`). After an error the lexer skips bytes until a structural
//! character (`[]{}:,`), a control character other than tab, or 0xFE/0xFF; that byte is then
//! lexed normally. Clients rely on this to resynchronise (a newline ends the recovery).

/// What a finished token is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// `{`
    LCurly,
    /// `}`
    RCurly,
    /// `[`
    LSquare,
    /// `]`
    RSquare,
    /// `:`
    Colon,
    /// `,`
    Comma,
    /// A quoted string, quotes included in the text.
    String,
    /// An integer literal.
    Integer,
    /// A literal with a fraction or an exponent.
    Float,
    /// A run of lower-case letters (`true`, `false`, `null`, or an invalid keyword).
    Keyword,
}

/// What one step produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Nothing finished.
    Nothing,
    /// A token finished; its text is [`Lexer::text`].
    Token(TokenKind),
    /// A lexical error; the offending text (including the bad byte) is [`Lexer::text`].
    Error,
}

/// Result of feeding one byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// False when the byte was only looked at and must be fed again.
    pub consumed: bool,
    /// What the step produced.
    pub event: Event,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    Recovery,
    DqString,
    DqEscape,
    SqString,
    SqEscape,
    Zero,
    Sign,
    Digits,
    Mantissa,
    MantissaDigits,
    ExpE,
    ExpSign,
    ExpDigits,
    Keyword,
}

/// The lexer. Holds the text of the token being lexed (unless told not to keep it).
#[derive(Debug)]
pub struct Lexer {
    state: State,
    /// Bytes of the current token (or of the last finished token / error until the next
    /// token starts). Empty while `keep_text` is false.
    text: Vec<u8>,
    /// Length of the current token, counted even when the text is not kept.
    len: usize,
    /// Whether token bytes are stored (false while a message is being discarded).
    keep_text: bool,
}

impl Default for Lexer {
    fn default() -> Self {
        Self::new()
    }
}

impl Lexer {
    /// A lexer in the start state.
    pub fn new() -> Self {
        Lexer {
            state: State::Start,
            text: Vec::new(),
            len: 0,
            keep_text: true,
        }
    }

    /// Text of the token or error produced by the last step.
    pub fn text(&self) -> &[u8] {
        &self.text
    }

    /// Length in bytes of the token in progress (or just finished).
    pub fn token_len(&self) -> usize {
        self.len
    }

    /// True while in the middle of a token (a string, number or keyword).
    pub fn in_token(&self) -> bool {
        !matches!(self.state, State::Start | State::Recovery)
    }

    /// Stop or resume storing token text. Stopping drops what is stored.
    pub fn keep_text(&mut self, keep: bool) {
        self.keep_text = keep;
        if !keep {
            self.text = Vec::new();
        }
    }

    /// Releases memory held for the text of a long token once it is no longer needed.
    pub fn shrink(&mut self, max_idle_capacity: usize) {
        if self.text.capacity() > max_idle_capacity && !self.in_token() {
            self.text = Vec::new();
        }
    }

    fn begin(&mut self, b: u8) {
        self.text.clear();
        self.len = 0;
        self.add(b);
    }

    fn add(&mut self, b: u8) {
        self.len = self.len.saturating_add(1);
        if self.keep_text {
            self.text.push(b);
        }
    }

    fn consume(&mut self, b: u8, next: State) -> Step {
        self.add(b);
        self.state = next;
        Step {
            consumed: true,
            event: Event::Nothing,
        }
    }

    fn finish_with(&mut self, b: u8, kind: TokenKind) -> Step {
        self.add(b);
        self.state = State::Start;
        Step {
            consumed: true,
            event: Event::Token(kind),
        }
    }

    fn finish_before(&mut self, kind: TokenKind) -> Step {
        self.state = State::Start;
        Step {
            consumed: false,
            event: Event::Token(kind),
        }
    }

    fn error(&mut self, b: u8) -> Step {
        self.add(b);
        self.state = State::Recovery;
        Step {
            consumed: true,
            event: Event::Error,
        }
    }

    /// Feeds one byte.
    pub fn step(&mut self, b: u8) -> Step {
        match self.state {
            State::Start => self.step_start(b),
            State::Recovery => self.step_recovery(b),
            State::DqString | State::SqString => self.step_string(b),
            State::DqEscape => self.step_escape(b, State::DqString),
            State::SqEscape => self.step_escape(b, State::SqString),
            State::Zero => match b {
                b'0'..=b'9' => self.error(b),
                b'.' => self.consume(b, State::Mantissa),
                _ => self.finish_before(TokenKind::Integer),
            },
            State::Sign => match b {
                b'0' => self.consume(b, State::Zero),
                b'1'..=b'9' => self.consume(b, State::Digits),
                _ => self.error(b),
            },
            State::Digits => match b {
                b'0'..=b'9' => self.consume(b, State::Digits),
                b'e' | b'E' => self.consume(b, State::ExpE),
                b'.' => self.consume(b, State::Mantissa),
                _ => self.finish_before(TokenKind::Integer),
            },
            State::Mantissa => match b {
                b'0'..=b'9' => self.consume(b, State::MantissaDigits),
                _ => self.error(b),
            },
            State::MantissaDigits => match b {
                b'0'..=b'9' => self.consume(b, State::MantissaDigits),
                b'e' | b'E' => self.consume(b, State::ExpE),
                _ => self.finish_before(TokenKind::Float),
            },
            State::ExpE => match b {
                b'+' | b'-' => self.consume(b, State::ExpSign),
                b'0'..=b'9' => self.consume(b, State::ExpDigits),
                _ => self.error(b),
            },
            State::ExpSign => match b {
                b'0'..=b'9' => self.consume(b, State::ExpDigits),
                _ => self.error(b),
            },
            State::ExpDigits => match b {
                b'0'..=b'9' => self.consume(b, State::ExpDigits),
                _ => self.finish_before(TokenKind::Float),
            },
            State::Keyword => match b {
                b'a'..=b'z' => self.consume(b, State::Keyword),
                _ => self.finish_before(TokenKind::Keyword),
            },
        }
    }

    fn step_start(&mut self, b: u8) -> Step {
        let structural = match b {
            b' ' | b'\t' | b'\r' | b'\n' => {
                return Step {
                    consumed: true,
                    event: Event::Nothing,
                }
            }
            b'{' => Some(TokenKind::LCurly),
            b'}' => Some(TokenKind::RCurly),
            b'[' => Some(TokenKind::LSquare),
            b']' => Some(TokenKind::RSquare),
            b':' => Some(TokenKind::Colon),
            b',' => Some(TokenKind::Comma),
            _ => None,
        };
        self.text.clear();
        self.len = 0;
        if let Some(kind) = structural {
            return self.finish_with(b, kind);
        }
        let next = match b {
            b'"' => State::DqString,
            b'\'' => State::SqString,
            b'0' => State::Zero,
            b'1'..=b'9' => State::Digits,
            b'-' => State::Sign,
            b'a'..=b'z' => State::Keyword,
            _ => return self.error(b),
        };
        self.begin(b);
        self.state = next;
        Step {
            consumed: true,
            event: Event::Nothing,
        }
    }

    fn step_recovery(&mut self, b: u8) -> Step {
        let resync = matches!(
            b,
            0x00..=0x1f | 0xfe | 0xff | b'[' | b']' | b'{' | b'}' | b':' | b','
        ) && b != b'\t';
        if resync {
            self.state = State::Start;
            self.text.clear();
            self.len = 0;
        }
        Step {
            consumed: !resync,
            event: Event::Nothing,
        }
    }

    fn step_string(&mut self, b: u8) -> Step {
        let (quote, escape) = if self.state == State::DqString {
            (b'"', State::DqEscape)
        } else {
            (b'\'', State::SqEscape)
        };
        match b {
            _ if b == quote => self.finish_with(b, TokenKind::String),
            b'\\' => self.consume(b, escape),
            0x20..=0xfd => self.consume(b, self.state),
            _ => self.error(b),
        }
    }

    fn step_escape(&mut self, b: u8, back: State) -> Step {
        match b {
            0x20..=0xfd => self.consume(b, back),
            _ => self.error(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lexes `input`, returning tokens and errors with their text.
    fn lex(input: &[u8]) -> Vec<(Option<TokenKind>, String)> {
        let mut lexer = Lexer::new();
        let mut out = Vec::new();
        let mut i = 0;
        while i < input.len() {
            let step = lexer.step(input[i]);
            if step.consumed {
                i += 1;
            }
            let text = String::from_utf8_lossy(lexer.text()).into_owned();
            match step.event {
                Event::Nothing => {}
                Event::Token(kind) => out.push((Some(kind), text)),
                Event::Error => out.push((None, text)),
            }
        }
        out
    }

    #[test]
    fn numbers_end_at_the_first_byte_that_cannot_continue_them() {
        let toks = lex(b"[12,-0.5e+3]");
        let kinds: Vec<_> = toks.iter().map(|t| (t.0, t.1.as_str())).collect();
        assert_eq!(
            kinds,
            [
                (Some(TokenKind::LSquare), "["),
                (Some(TokenKind::Integer), "12"),
                (Some(TokenKind::Comma), ","),
                (Some(TokenKind::Float), "-0.5e+3"),
                (Some(TokenKind::RSquare), "]"),
            ]
        );
    }

    #[test]
    fn a_number_at_the_end_of_input_is_not_finished() {
        assert!(lex(b"42").is_empty());
    }

    #[test]
    fn error_text_includes_the_offending_byte() {
        assert_eq!(lex(b"-}"), [(None, "-}".to_string())]);
        assert_eq!(lex(b"01"), [(None, "01".to_string())]);
        assert_eq!(lex(b"\"foo\n"), [(None, "\"foo\n".to_string())]);
    }

    #[test]
    fn recovery_skips_to_a_structural_byte() {
        let toks = lex(b"TRUE}");
        assert_eq!(toks[0], (None, "T".to_string()));
        assert_eq!(toks[1], (Some(TokenKind::RCurly), "}".to_string()));
        assert_eq!(toks.len(), 2);
    }

    #[test]
    fn recovery_skips_spaces_but_stops_at_newline() {
        let toks = lex(b"@ x\nnull ");
        assert_eq!(toks[0].0, None);
        assert_eq!(toks[1], (Some(TokenKind::Keyword), "null".to_string()));
    }

    #[test]
    fn single_quoted_strings_may_contain_double_quotes() {
        assert_eq!(
            lex(b"'a\"b'"),
            [(Some(TokenKind::String), "'a\"b'".to_string())]
        );
    }

    #[test]
    fn control_bytes_inside_strings_are_errors() {
        assert_eq!(lex(b"\"a\tb\"")[0].0, None);
    }

    #[test]
    fn length_is_counted_when_text_is_not_kept() {
        let mut lexer = Lexer::new();
        lexer.step(b'"');
        lexer.keep_text(false);
        for _ in 0..1000 {
            lexer.step(b'a');
        }
        assert_eq!(lexer.token_len(), 1001);
        assert!(lexer.text().is_empty());
    }
}

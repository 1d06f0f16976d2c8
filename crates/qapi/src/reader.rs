//! Reader for the QAPI schema language: JSON-like expressions with single-quoted strings and
//! `#` comments, one top-level object per definition.
//!
//! The reader only turns text into [`serde_json::Value`]s (object member order is kept); what
//! the expressions mean is decided in [`crate::model`].

use serde_json::{Map, Value};

/// One top-level expression and the line it starts on (for messages about our own schema).
#[derive(Debug)]
pub(crate) struct Expr {
    /// The expression, always a JSON object.
    pub value: Map<String, Value>,
    /// 1-based line of the opening brace.
    pub line: usize,
}

/// Reads every top-level expression of one schema file.
pub(crate) fn read_exprs(file: &str, text: &str) -> Result<Vec<Expr>, String> {
    let mut r = Reader {
        file,
        bytes: text.as_bytes(),
        pos: 0,
        line: 1,
    };
    let mut out = Vec::new();
    loop {
        r.skip_blank();
        if r.pos >= r.bytes.len() {
            return Ok(out);
        }
        let line = r.line;
        match r.value()? {
            Value::Object(value) => out.push(Expr { value, line }),
            _ => return Err(r.error("top-level expression must be an object")),
        }
    }
}

struct Reader<'a> {
    file: &'a str,
    bytes: &'a [u8],
    pos: usize,
    line: usize,
}

impl Reader<'_> {
    fn error(&self, what: &str) -> String {
        format!("{}:{}: {what}", self.file, self.line)
    }

    /// Skips whitespace and comments.
    fn skip_blank(&mut self) {
        while let Some(&c) = self.bytes.get(self.pos) {
            match c {
                b'\n' => {
                    self.line += 1;
                    self.pos += 1;
                }
                b' ' | b'\t' | b'\r' => self.pos += 1,
                b'#' => {
                    while self.bytes.get(self.pos).is_some_and(|&c| c != b'\n') {
                        self.pos += 1;
                    }
                }
                _ => return,
            }
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_blank();
        self.bytes.get(self.pos).copied()
    }

    fn expect(&mut self, want: u8) -> Result<(), String> {
        match self.peek() {
            Some(c) if c == want => {
                self.pos += 1;
                Ok(())
            }
            _ => Err(self.error(&format!("expected '{}'", want as char))),
        }
    }

    fn value(&mut self) -> Result<Value, String> {
        match self.peek() {
            Some(b'{') => self.object(),
            Some(b'[') => self.array(),
            Some(b'\'') | Some(b'"') => self.string().map(Value::String),
            Some(_) if self.bytes[self.pos..].starts_with(b"true") => {
                self.pos += 4;
                Ok(Value::Bool(true))
            }
            Some(_) if self.bytes[self.pos..].starts_with(b"false") => {
                self.pos += 5;
                Ok(Value::Bool(false))
            }
            _ => Err(self.error("expected a value")),
        }
    }

    fn object(&mut self) -> Result<Value, String> {
        self.expect(b'{')?;
        let mut map = Map::new();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(Value::Object(map));
        }
        loop {
            let key = self.string()?;
            self.expect(b':')?;
            let value = self.value()?;
            if map.insert(key.clone(), value).is_some() {
                return Err(self.error(&format!("duplicate key '{key}'")));
            }
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Value::Object(map));
                }
                _ => return Err(self.error("expected ',' or '}'")),
            }
        }
    }

    fn array(&mut self) -> Result<Value, String> {
        self.expect(b'[')?;
        let mut items = Vec::new();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(Value::Array(items));
        }
        loop {
            items.push(self.value()?);
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Value::Array(items));
                }
                _ => return Err(self.error("expected ',' or ']'")),
            }
        }
    }

    fn string(&mut self) -> Result<String, String> {
        let quote = match self.peek() {
            Some(q @ (b'\'' | b'"')) => q,
            _ => return Err(self.error("expected a string")),
        };
        self.pos += 1;
        let start = self.pos;
        while let Some(&c) = self.bytes.get(self.pos) {
            if c == quote {
                let s = std::str::from_utf8(&self.bytes[start..self.pos])
                    .map_err(|_| self.error("string is not UTF-8"))?;
                self.pos += 1;
                return Ok(s.to_owned());
            }
            if c == b'\\' || c == b'\n' {
                return Err(self.error("escapes and line breaks are not allowed in schema strings"));
            }
            self.pos += 1;
        }
        Err(self.error("unterminated string"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_objects_with_comments_and_single_quotes() {
        let exprs = read_exprs(
            "t.json",
            "# c\n{ 'a': ['x', 'y'], \"b\": true } # tail\n{ 'c': {} }",
        )
        .unwrap();
        assert_eq!(exprs.len(), 2);
        assert_eq!(exprs[0].value["a"], serde_json::json!(["x", "y"]));
        assert_eq!(exprs[0].value["b"], Value::Bool(true));
        assert_eq!(exprs[1].line, 3);
    }

    #[test]
    fn keeps_member_order() {
        let exprs = read_exprs("t.json", "{ 'z': 'a', 'a': 'b', 'm': 'c' }").unwrap();
        let keys: Vec<_> = exprs[0].value.keys().cloned().collect();
        assert_eq!(keys, ["z", "a", "m"]);
    }

    #[test]
    fn rejects_duplicate_keys_with_line() {
        let err = read_exprs("t.json", "\n{ 'a': 'x', 'a': 'y' }").unwrap_err();
        assert!(err.starts_with("t.json:2:"), "{err}");
    }

    #[test]
    fn rejects_unterminated_string() {
        assert!(read_exprs("t.json", "{ 'a: 1 }").is_err());
    }
}

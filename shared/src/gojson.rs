//! The two pieces of Go's `encoding/json` that clients of a credential helper can observe:
//! decoding the `store` payload into `Credentials` (with Go's exact error texts) and encoding
//! strings (with Go's HTML-safe escaping).
//!
//! Go's `Decoder` first scans one whole JSON value (syntax errors win, bytes after the value
//! are ignored), then unmarshals it: object keys match the struct's fields case-insensitively,
//! unknown keys are ignored, `null` leaves a field unset, and the first type error is reported.

/// The fields of a `store` payload, as Go's `credentials.Credentials`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Credentials {
    /// `ServerURL`.
    pub server_url: String,
    /// `Username`.
    pub username: String,
    /// `Secret`.
    pub secret: String,
}

/// Go's nesting limit.
const MAX_DEPTH: usize = 10_000;

const FIELDS: [&str; 3] = ["ServerURL", "Username", "Secret"];

/// Formats a byte the way Go's scanner does in its error messages (`quoteChar`).
fn quote_char(c: u8) -> String {
    match c {
        b'\'' => r"'\''".to_owned(),
        b'"' => "'\"'".to_owned(),
        0x07 => r"'\a'".to_owned(),
        0x08 => r"'\b'".to_owned(),
        0x0c => r"'\f'".to_owned(),
        b'\n' => r"'\n'".to_owned(),
        b'\r' => r"'\r'".to_owned(),
        b'\t' => r"'\t'".to_owned(),
        0x0b => r"'\v'".to_owned(),
        b'\\' => r"'\\'".to_owned(),
        0x00..=0x1f | 0x7f => format!(r"'\x{c:02x}'"),
        // Go turns the byte into the rune U+0080..U+00FF; these are not printable there.
        0x80..=0xa0 | 0xad => format!(r"'\u{c:04x}'"),
        _ => format!("'{}'", char::from(c)),
    }
}

#[derive(Debug)]
enum Fail {
    Syntax(String),
    Eof,
}

fn syntax(c: u8, context: &str) -> Fail {
    Fail::Syntax(format!("invalid character {} {context}", quote_char(c)))
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\r' | b'\n')
}

/// The kind of a JSON value, named as Go names it in type errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Object,
    Array,
    String,
    Number,
    Bool,
    Null,
}

impl Kind {
    fn go_name(self) -> &'static str {
        match self {
            Kind::Object => "object",
            Kind::Array => "array",
            Kind::String => "string",
            Kind::Number => "number",
            Kind::Bool => "bool",
            Kind::Null => "null",
        }
    }
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Result<u8, Fail> {
        let c = self.peek().ok_or(Fail::Eof)?;
        self.i += 1;
        Ok(c)
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(is_space) {
            self.i += 1;
        }
    }

    /// Scans a string whose opening quote was consumed; returns its decoded value.
    fn string(&mut self) -> Result<String, Fail> {
        let mut out: Vec<u8> = Vec::new();
        loop {
            let c = self.next()?;
            match c {
                b'"' => break,
                b'\\' => {
                    let e = self.next()?;
                    match e {
                        b'"' | b'\\' | b'/' => out.push(e),
                        b'b' => out.push(0x08),
                        b'f' => out.push(0x0c),
                        b'n' => out.push(b'\n'),
                        b'r' => out.push(b'\r'),
                        b't' => out.push(b'\t'),
                        b'u' => {
                            let first = self.hex4()?;
                            let ch = if (0xd800..0xdc00).contains(&first)
                                && self.b.get(self.i..self.i + 2) == Some(b"\\u")
                            {
                                // A high surrogate followed by an escape: Go pairs them when
                                // the second is a low surrogate, and otherwise emits U+FFFD
                                // and decodes the second escape on its own.
                                let save = self.i;
                                self.i += 2;
                                let second = self.hex4()?;
                                if (0xdc00..0xe000).contains(&second) {
                                    let cp = 0x10000 + ((first - 0xd800) << 10) + (second - 0xdc00);
                                    char::from_u32(cp).unwrap_or(char::REPLACEMENT_CHARACTER)
                                } else {
                                    self.i = save;
                                    char::REPLACEMENT_CHARACTER
                                }
                            } else {
                                char::from_u32(first).unwrap_or(char::REPLACEMENT_CHARACTER)
                            };
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                        }
                        _ => return Err(syntax(e, "in string escape code")),
                    }
                }
                0x00..=0x1f => return Err(syntax(c, "in string literal")),
                _ => out.push(c),
            }
        }
        Ok(go_lossy(&out))
    }

    fn hex4(&mut self) -> Result<u32, Fail> {
        let mut v = 0u32;
        for _ in 0..4 {
            let c = self.next()?;
            let d = char::from(c)
                .to_digit(16)
                .ok_or_else(|| syntax(c, r"in \u hexadecimal character escape"))?;
            v = v * 16 + d;
        }
        Ok(v)
    }

    fn literal(&mut self, word: &'static [u8]) -> Result<(), Fail> {
        let name = std::str::from_utf8(word).unwrap_or_default();
        for &want in &word[1..] {
            let c = self.next()?;
            if c != want {
                let context = format!("in literal {name} (expecting {})", quote_char(want));
                return Err(syntax(c, &context));
            }
        }
        Ok(())
    }

    /// Scans a number whose first byte (`-` or a digit) is at `self.i`.
    fn number(&mut self) -> Result<(), Fail> {
        if self.peek() == Some(b'-') {
            self.i += 1;
            let c = self.peek().ok_or(Fail::Eof)?;
            if !c.is_ascii_digit() {
                return Err(syntax(c, "in numeric literal"));
            }
        }
        if self.peek() == Some(b'0') {
            self.i += 1;
        } else {
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.i += 1;
            }
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            let c = self.peek().ok_or(Fail::Eof)?;
            if !c.is_ascii_digit() {
                return Err(syntax(c, "after decimal point in numeric literal"));
            }
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.i += 1;
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            let c = self.peek().ok_or(Fail::Eof)?;
            if !c.is_ascii_digit() {
                return Err(syntax(c, "in exponent of numeric literal"));
            }
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.i += 1;
            }
        }
        Ok(())
    }

    /// Scans one scalar value or the opening of a container at `self.i` (after white space).
    /// Returns its kind; for a string, its decoded value.
    fn begin_value(&mut self) -> Result<(Kind, Option<String>), Fail> {
        let c = self.next()?;
        Ok(match c {
            b'{' => (Kind::Object, None),
            b'[' => (Kind::Array, None),
            b'"' => (Kind::String, Some(self.string()?)),
            b't' => {
                self.literal(b"true")?;
                (Kind::Bool, None)
            }
            b'f' => {
                self.literal(b"false")?;
                (Kind::Bool, None)
            }
            b'n' => {
                self.literal(b"null")?;
                (Kind::Null, None)
            }
            b'-' | b'0'..=b'9' => {
                self.i -= 1;
                self.number()?;
                (Kind::Number, None)
            }
            _ => return Err(syntax(c, "looking for beginning of value")),
        })
    }

    /// Finishes a container whose opening byte was consumed, checking syntax only.
    fn skip_container(&mut self, first: Kind) -> Result<(), Fail> {
        let mut stack = vec![first];
        let mut fresh = true;
        while let Some(&top) = stack.last() {
            self.skip_space();
            if top == Kind::Object {
                let c = self.next()?;
                if fresh && c == b'}' {
                    stack.pop();
                    fresh = self.after_element(&mut stack)?;
                    continue;
                }
                if c != b'"' {
                    return Err(syntax(c, "looking for beginning of object key string"));
                }
                self.string()?;
                self.skip_space();
                let c = self.next()?;
                if c != b':' {
                    return Err(syntax(c, "after object key"));
                }
            } else if fresh && self.peek() == Some(b']') {
                self.i += 1;
                stack.pop();
                fresh = self.after_element(&mut stack)?;
                continue;
            }
            self.skip_space();
            let (kind, _) = self.begin_value()?;
            if matches!(kind, Kind::Object | Kind::Array) {
                if stack.len() >= MAX_DEPTH {
                    return Err(syntax(self.b[self.i - 1], "exceeded max depth"));
                }
                stack.push(kind);
                fresh = true;
                continue;
            }
            fresh = self.after_element(&mut stack)?;
        }
        Ok(())
    }

    /// After an element: consumes `,` (returns false: expect another element) or the closing
    /// byte(s) of as many containers as end here.
    fn after_element(&mut self, stack: &mut Vec<Kind>) -> Result<bool, Fail> {
        while let Some(&top) = stack.last() {
            self.skip_space();
            let c = self.next()?;
            match (top, c) {
                (_, b',') => return Ok(false),
                (Kind::Object, b'}') | (Kind::Array, b']') => {
                    stack.pop();
                }
                (Kind::Object, _) => return Err(syntax(c, "after object key:value pair")),
                _ => return Err(syntax(c, "after array element")),
            }
        }
        Ok(false)
    }
}

/// Replaces each invalid UTF-8 byte with U+FFFD, as Go's decoder does.
fn go_lossy(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    let mut rest = bytes;
    while !rest.is_empty() {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                break;
            }
            Err(e) => {
                let (good, bad) = rest.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(good).unwrap_or_default());
                let skip = e.error_len().unwrap_or(bad.len()).max(1);
                for _ in 0..skip {
                    out.push(char::REPLACEMENT_CHARACTER);
                }
                rest = &bad[skip..];
            }
        }
    }
    out
}

/// Go's case folding for matching a key to a field name: ASCII case, plus the two non-ASCII
/// letters that fold to ASCII (`ſ` → `s`, the Kelvin sign → `k`).
fn fold_eq(key: &str, field: &str) -> bool {
    let mut k = key.chars().map(|c| match c {
        '\u{017f}' => 's',
        '\u{212a}' => 'k',
        c => c.to_ascii_lowercase(),
    });
    let mut f = field.chars().map(|c| c.to_ascii_lowercase());
    loop {
        match (k.next(), f.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

fn field_index(key: &str) -> Option<usize> {
    FIELDS.iter().position(|f| *f == key).or_else(|| FIELDS.iter().position(|f| fold_eq(key, f)))
}

/// Why a `store` payload did not decode: Go's own error text, which the helper prints as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct GoJsonError(String);

/// Decodes the `store` payload like `json.NewDecoder(r).Decode(&creds)`; errors carry Go's text.
pub fn decode_credentials(input: &[u8]) -> Result<Credentials, GoJsonError> {
    let mut s = Scanner { b: input, i: 0 };
    s.skip_space();
    if s.peek().is_none() {
        return Err(GoJsonError("EOF".to_owned()));
    }
    let mut creds = Credentials::default();
    match parse_top(&mut s, &mut creds) {
        Ok(None) => Ok(creds),
        Ok(Some(type_error)) => Err(GoJsonError(type_error)),
        Err(Fail::Eof) => Err(GoJsonError("unexpected EOF".to_owned())),
        Err(Fail::Syntax(msg)) => Err(GoJsonError(msg)),
    }
}

/// Parses the top-level value; `Ok(Some(msg))` is a type error found after a clean scan.
fn parse_top(s: &mut Scanner<'_>, creds: &mut Credentials) -> Result<Option<String>, Fail> {
    let (kind, _) = s.begin_value()?;
    match kind {
        Kind::Null => return Ok(None),
        Kind::Object => {}
        Kind::Array => {
            s.skip_container(Kind::Array)?;
            return Ok(Some(top_type_error(kind)));
        }
        _ => return Ok(Some(top_type_error(kind))),
    }
    let mut type_error = None;
    s.skip_space();
    if s.peek() == Some(b'}') {
        return Ok(None);
    }
    loop {
        s.skip_space();
        let c = s.next()?;
        if c != b'"' {
            return Err(syntax(c, "looking for beginning of object key string"));
        }
        let key = s.string()?;
        s.skip_space();
        let c = s.next()?;
        if c != b':' {
            return Err(syntax(c, "after object key"));
        }
        s.skip_space();
        let (kind, value) = s.begin_value()?;
        if matches!(kind, Kind::Object | Kind::Array) {
            s.skip_container(kind)?;
        }
        if let Some(idx) = field_index(&key) {
            match (kind, value) {
                (Kind::String, Some(v)) => match idx {
                    0 => creds.server_url = v,
                    1 => creds.username = v,
                    _ => creds.secret = v,
                },
                (Kind::Null, _) => {}
                (other, _) => {
                    type_error.get_or_insert_with(|| {
                        format!(
                            "json: cannot unmarshal {} into Go struct field Credentials.{} of type string",
                            other.go_name(),
                            FIELDS[idx]
                        )
                    });
                }
            }
        }
        s.skip_space();
        let c = s.next()?;
        match c {
            b',' => {}
            b'}' => return Ok(type_error),
            _ => return Err(syntax(c, "after object key:value pair")),
        }
    }
}

fn top_type_error(kind: Kind) -> String {
    format!(
        "json: cannot unmarshal {} into Go value of type credentials.Credentials",
        kind.go_name()
    )
}

/// Appends `s` as a JSON string the way Go's encoder writes it with HTML escaping on:
/// `<`, `>`, `&` as `\u003c`, `\u003e`, `\u0026`; U+2028 and U+2029 escaped; control bytes as
/// `\n`, `\r`, `\t`, `\b`, `\f` or `\u00XX`; invalid UTF-8 as `\ufffd`.
pub fn push_go_string(out: &mut Vec<u8>, s: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let mut i = 0;
    while i < s.len() {
        let b = s[i];
        if b < 0x80 {
            match b {
                b'\\' | b'"' => out.extend_from_slice(&[b'\\', b]),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                0x08 => out.extend_from_slice(b"\\b"),
                0x0c => out.extend_from_slice(b"\\f"),
                0x00..=0x1f | b'<' | b'>' | b'&' => {
                    out.extend_from_slice(b"\\u00");
                    out.push(HEX[usize::from(b >> 4)]);
                    out.push(HEX[usize::from(b & 0xf)]);
                }
                _ => out.push(b),
            }
            i += 1;
            continue;
        }
        let len = utf8_len(&s[i..]);
        if len == 0 {
            out.extend_from_slice(b"\\ufffd");
            i += 1;
            continue;
        }
        let ch = &s[i..i + len];
        if ch == "\u{2028}".as_bytes() {
            out.extend_from_slice(b"\\u2028");
        } else if ch == "\u{2029}".as_bytes() {
            out.extend_from_slice(b"\\u2029");
        } else {
            out.extend_from_slice(ch);
        }
        i += len;
    }
    out.push(b'"');
}

/// Length of the valid UTF-8 sequence starting `s`, or 0 when it is invalid.
fn utf8_len(s: &[u8]) -> usize {
    let want = match s[0] {
        0xc2..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf4 => 4,
        _ => return 0,
    };
    match s.get(..want) {
        Some(seq) if std::str::from_utf8(seq).is_ok() => want,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs and the exact texts Debian's docker-credential-secretservice 0.6.4 printed.
    const REFERENCE: &[(&str, &str)] = &[
        ("", "EOF"),
        ("  ", "EOF"),
        ("{", "unexpected EOF"),
        ("{\"ServerURL\"", "unexpected EOF"),
        ("{b", "invalid character 'b' looking for beginning of object key string"),
        ("[]", "json: cannot unmarshal array into Go value of type credentials.Credentials"),
        ("123", "json: cannot unmarshal number into Go value of type credentials.Credentials"),
        ("\"x\"", "json: cannot unmarshal string into Go value of type credentials.Credentials"),
        ("true", "json: cannot unmarshal bool into Go value of type credentials.Credentials"),
        (
            "{\"ServerURL\":1}",
            "json: cannot unmarshal number into Go struct field Credentials.ServerURL of type string",
        ),
        (
            "{\"ServerURL\":\"a\",\"Username\":true}",
            "json: cannot unmarshal bool into Go struct field Credentials.Username of type string",
        ),
        (
            "{\"ServerURL\":\"a\",\"Username\":{}}",
            "json: cannot unmarshal object into Go struct field Credentials.Username of type string",
        ),
        (
            "{\"ServerURL\":\"a\",\"Username\":[]}",
            "json: cannot unmarshal array into Go struct field Credentials.Username of type string",
        ),
        ("{\"ServerURL\":\"a\" x", "invalid character 'x' after object key:value pair"),
        ("{\"ServerURL\":\"a\\q\"}", "invalid character 'q' in string escape code"),
        ("{\"ServerURL\":\"\\u12\"}", "invalid character '\"' in \\u hexadecimal character escape"),
        ("{\"ServerURL\":tru}", "invalid character '}' in literal true (expecting 'e')"),
        ("{\"ServerURL\":-}", "invalid character '}' in numeric literal"),
        (
            "{\"ServerURL\":\"a\",}",
            "invalid character '}' looking for beginning of object key string",
        ),
        ("{\"ServerURL\":1.5e}", "invalid character '}' in exponent of numeric literal"),
        ("{\"ServerURL\":nul}", "invalid character '}' in literal null (expecting 'l')"),
        (
            "{\"ServerURL\":\"a\",\"Username\":1,\"Secret\":true}",
            "json: cannot unmarshal number into Go struct field Credentials.Username of type string",
        ),
        (
            "{\"A\":1,\"ServerURL\":2}",
            "json: cannot unmarshal number into Go struct field Credentials.ServerURL of type string",
        ),
        ("{\"ServerURL\":01}", "invalid character '1' after object key:value pair"),
    ];

    #[test]
    fn errors_match_the_reference_helper() {
        for (input, want) in REFERENCE {
            assert_eq!(
                decode_credentials(input.as_bytes()).unwrap_err().to_string(),
                *want,
                "input {input:?}"
            );
        }
    }

    #[test]
    fn values_and_keys() {
        let c = decode_credentials(br#"{"serverurl":"h","USERNAME":"u","secret":"s"} trailing"#)
            .unwrap();
        assert_eq!(
            c,
            Credentials { server_url: "h".into(), username: "u".into(), secret: "s".into() }
        );
        let c = decode_credentials(
            br#"{"ServerURL":"a","ServerURL":"b","x":[1,{"y":[]}],"Username":null}"#,
        )
        .unwrap();
        assert_eq!(c.server_url, "b");
        assert_eq!(c.username, "");
        let c = decode_credentials(br#"null"#).unwrap();
        assert_eq!(c, Credentials::default());
        let c = decode_credentials(
            "{\"\u{17f}erverURL\":\"\\u00e9\\ud83d\\ude00\\ud800x\"}".as_bytes(),
        )
        .unwrap();
        assert_eq!(c.server_url, "é😀\u{fffd}x");
        assert_eq!(
            decode_credentials(b"{\"a\":\"\x01\"}").unwrap_err().to_string(),
            r"invalid character '\x01' in string literal"
        );
        assert_eq!(
            decode_credentials(b"[1 2]").unwrap_err().to_string(),
            "invalid character '2' after array element"
        );
        assert_eq!(
            decode_credentials(b"\xff").unwrap_err().to_string(),
            "invalid character '\u{ff}' looking for beginning of value"
        );
    }

    #[test]
    fn deep_nesting_is_bounded() {
        let deep = format!("{{\"x\":{}", "[".repeat(20_000));
        let err = decode_credentials(deep.as_bytes()).unwrap_err().to_string();
        assert_eq!(err, "invalid character '[' exceeded max depth");
    }

    #[test]
    fn go_string_escaping() {
        let mut out = Vec::new();
        push_go_string(&mut out, "<token>&\"\\\n\u{1}\u{2028}é".as_bytes());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#""\u003ctoken\u003e\u0026\"\\\n\u0001\u2028é""#
        );
        let mut out = Vec::new();
        push_go_string(&mut out, b"a\xffb");
        assert_eq!(out, br#""a\ufffdb""#);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = decode_credentials(&bytes);
        }

        #[test]
        fn strings_round_trip_through_the_decoder(s in "\\PC*") {
            let mut out = b"{\"Secret\":".to_vec();
            push_go_string(&mut out, s.as_bytes());
            out.push(b'}');
            proptest::prop_assert_eq!(decode_credentials(&out).unwrap().secret, s);
        }
    }
}

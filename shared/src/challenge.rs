//! `WWW-Authenticate` challenges (RFC 9110 §11.6.1), as registries send them: one scheme and
//! its auth-params, `Bearer realm="https://auth.example/token",service="registry",scope="…"`.
//! The host reads a registry's realm from one; the guest's registry front rewrites the realm
//! to itself and writes the challenge back.

/// Most bytes of a challenge read; a longer header is not parsed at all.
pub const MAX_CHALLENGE: usize = 8 * 1024;

/// One challenge: its scheme and its parameters, in order, names lower-cased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The scheme as sent (`Bearer`, `Basic`).
    pub scheme: String,
    /// `(name, value)` pairs; quoted values unquoted.
    pub params: Vec<(String, String)>,
}

impl Challenge {
    /// Parses one challenge. `None` for a header over [`MAX_CHALLENGE`] bytes, a quoted value
    /// left open, or a parameter without `=`.
    pub fn parse(header: &str) -> Option<Challenge> {
        if header.len() > MAX_CHALLENGE {
            return None;
        }
        let header = header.trim();
        let (scheme, params) = header.split_once(' ').unwrap_or((header, ""));
        if scheme.is_empty() || !scheme.bytes().all(is_token_byte) {
            return None;
        }
        let mut out = Vec::new();
        let mut rest = params.trim();
        while !rest.is_empty() {
            let (name, after) = rest.split_once('=')?;
            let name = name.trim();
            if name.is_empty() || !name.bytes().all(is_token_byte) {
                return None;
            }
            let after = after.trim_start();
            let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
                unquote(quoted)?
            } else {
                let end = after.find(',').unwrap_or(after.len());
                (after[..end].trim_end().to_owned(), &after[end..])
            };
            out.push((name.to_ascii_lowercase(), value));
            rest = next.trim_start().strip_prefix(',').unwrap_or(next).trim_start();
        }
        Some(Challenge { scheme: scheme.to_owned(), params: out })
    }

    /// Whether the scheme is `scheme` (compared without case).
    pub fn is(&self, scheme: &str) -> bool {
        self.scheme.eq_ignore_ascii_case(scheme)
    }

    /// The value of parameter `name` (lower case), if present.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// Sets parameter `name` (lower case), in place if present, else at the end.
    pub fn set(&mut self, name: &str, value: String) {
        match self.params.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => *v = value,
            None => self.params.push((name.to_owned(), value)),
        }
    }

    /// The header value: every parameter quoted, `"` and `\` escaped, control characters
    /// dropped (a header value cannot carry them).
    pub fn render(&self) -> String {
        let mut out = self.scheme.clone();
        for (i, (name, value)) in self.params.iter().enumerate() {
            out.push_str(if i == 0 { " " } else { "," });
            out.push_str(name);
            out.push_str("=\"");
            for c in value.chars().filter(|c| !c.is_control()) {
                if c == '"' || c == '\\' {
                    out.push('\\');
                }
                out.push(c);
            }
            out.push('"');
        }
        out
    }
}

/// A quoted-string's value (after the opening quote) and what follows its closing quote.
fn unquote(quoted: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = quoted.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &quoted[i + 1..])),
            '\\' => value.push(chars.next()?.1),
            c => value.push(c),
        }
    }
    None
}

/// RFC 9110 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_challenges_are_read_and_written_back() {
        let header = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#;
        let c = Challenge::parse(header).unwrap();
        assert!(c.is("bearer"));
        assert_eq!(c.param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(c.param("scope"), Some("repository:library/alpine:pull"));
        assert_eq!(c.render(), header);

        let ecr = Challenge::parse(r#"Basic realm="https://1.dkr.ecr.us-east-1.amazonaws.com/",service="ecr.amazonaws.com""#).unwrap();
        assert!(ecr.is("Basic"));
        assert_eq!(ecr.param("service"), Some("ecr.amazonaws.com"));

        let bare = Challenge::parse("Basic").unwrap();
        assert!(bare.params.is_empty());
        let tokens = Challenge::parse("Bearer realm=https://a/t , error=invalid_token").unwrap();
        assert_eq!(tokens.param("realm"), Some("https://a/t"));
        assert_eq!(tokens.param("error"), Some("invalid_token"));
    }

    #[test]
    fn quotes_and_escapes_survive_a_round_trip() {
        let mut c = Challenge::parse(r#"Bearer realm="a\"b\\c",scope="x,y""#).unwrap();
        assert_eq!(c.param("realm"), Some("a\"b\\c"));
        assert_eq!(c.param("scope"), Some("x,y"));
        c.set("realm", "http://127.0.0.1:6128/token/r\"\n".into());
        c.set("new", "v".into());
        let again = Challenge::parse(&c.render()).unwrap();
        assert_eq!(again.param("realm"), Some("http://127.0.0.1:6128/token/r\""));
        assert_eq!(again.param("scope"), Some("x,y"));
        assert_eq!(again.param("new"), Some("v"));
    }

    #[test]
    fn malformed_or_oversized_challenges_are_not_read() {
        for bad in [
            "",
            r#"Bearer realm="open"#,
            "Bearer realm",
            "Bear\u{1}er realm=x",
            "Bearer =x",
            r#"Bearer realm="a\"#,
        ] {
            assert_eq!(Challenge::parse(bad), None, "{bad:?}");
        }
        let huge = format!("Bearer realm=\"{}\"", "a".repeat(MAX_CHALLENGE));
        assert_eq!(Challenge::parse(&huge), None);
    }
}

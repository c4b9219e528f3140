//! The docker config file's JSON (`config.json`), decoded the way docker/cli reads it: the
//! top-level object, `credsStore`, `credHelpers`, and the plaintext `auths` entries. Pure
//! decoding (no files), so it can be fuzzed; the host agent reads and writes the file.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value};
use zeroize::Zeroizing;

use crate::Secret;

/// Largest config file accepted.
pub const MAX_CONFIG: u64 = 4 * 1024 * 1024;

/// Username docker uses to mark an identity token.
pub const TOKEN_USERNAME: &str = "<token>";

/// Why a config's text was refused. Never repeats the text (it may hold credentials).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigInvalid {
    /// Over [`MAX_CONFIG`] bytes.
    #[error("larger than {MAX_CONFIG} bytes")]
    TooLarge,
    /// Valid JSON, but not an object.
    #[error("the top level is not a JSON object")]
    NotAnObject,
    /// Not JSON; where it stops being JSON.
    #[error("invalid JSON at line {line} column {column}")]
    Json {
        /// Line (1-based).
        line: usize,
        /// Column (1-based).
        column: usize,
    },
}

/// The top-level object of a config's text; blank text is an empty config.
pub fn parse(text: &[u8]) -> Result<Map<String, Value>, ConfigInvalid> {
    if text.len() as u64 > MAX_CONFIG {
        return Err(ConfigInvalid::TooLarge);
    }
    if text.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ConfigInvalid::NotAnObject),
        // serde_json's message gives line and column, never the text around them.
        Err(e) => Err(ConfigInvalid::Json { line: e.line(), column: e.column() }),
    }
}

/// `credsStore`, if it is a string.
pub fn creds_store(config: &Map<String, Value>) -> Option<String> {
    config.get("credsStore").and_then(Value::as_str).map(str::to_owned)
}

/// `credHelpers`: registry → helper name (entries that are not strings are ignored).
pub fn cred_helpers(config: &Map<String, Value>) -> BTreeMap<String, String> {
    config
        .get("credHelpers")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter().filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned()))).collect()
        })
        .unwrap_or_default()
}

/// One `auths` entry as docker/cli decodes it: an identity token, else `auth` (base64 of
/// `user:password`, split at the first colon), else `username` and `password`.
pub fn decode_entry(entry: &Value) -> Option<(String, Secret)> {
    let obj = entry.as_object()?;
    if let Some(token) = obj.get("identitytoken").and_then(Value::as_str).filter(|t| !t.is_empty())
    {
        return Some((TOKEN_USERNAME.into(), Secret::from(token)));
    }
    if let Some(auth) = obj.get("auth").and_then(Value::as_str).filter(|a| !a.is_empty()) {
        let raw = Zeroizing::new(STANDARD.decode(auth.trim()).ok()?);
        let text = std::str::from_utf8(&raw).ok()?;
        let (user, pass) = text.split_once(':')?;
        return Some((user.to_owned(), Secret::from(pass)));
    }
    let user = obj.get("username").and_then(Value::as_str)?;
    let pass = obj.get("password").and_then(Value::as_str).unwrap_or_default();
    Some((user.to_owned(), Secret::from(pass)))
}

/// The `auths` entry docker/cli writes for a credential.
pub fn encode_entry(username: &str, secret: &Secret) -> Value {
    let mut obj = Map::new();
    if username == TOKEN_USERNAME {
        obj.insert("identitytoken".into(), Value::String(secret.expose().to_owned()));
    } else {
        let plain = Zeroizing::new(format!("{username}:{}", secret.expose()));
        obj.insert("auth".into(), Value::String(STANDARD.encode(plain.as_bytes())));
    }
    Value::Object(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_decode_as_docker_cli_does() {
        let e = encode_entry("u", &Secret::from("p:w"));
        assert_eq!(
            decode_entry(&e).map(|(u, s)| (u, s.expose().to_owned())),
            Some(("u".into(), "p:w".into()))
        );
        let t = encode_entry(TOKEN_USERNAME, &Secret::from("tok"));
        assert_eq!(t["identitytoken"], "tok");
        for bad in [r#"{"auth":"%%%"}"#, r#"{"auth":"bm9jb2xvbg=="}"#, r#""x""#, "{}"] {
            assert!(decode_entry(&serde_json::from_str(bad).unwrap()).is_none(), "{bad}");
        }
    }

    #[test]
    fn text_errors_never_repeat_the_text() {
        assert_eq!(parse(b"  \n"), Ok(Map::new()));
        assert_eq!(parse(b"[]"), Err(ConfigInvalid::NotAnObject));
        let e = parse(b"{\"auths\": {\"x\": \"s3cret").unwrap_err();
        assert!(matches!(e, ConfigInvalid::Json { line: 1, .. }), "{e}");
        assert!(!e.to_string().contains("s3cret"));
        let big = vec![b' '; MAX_CONFIG as usize + 1];
        assert_eq!(parse(&big), Err(ConfigInvalid::TooLarge));
    }
}

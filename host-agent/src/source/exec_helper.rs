//! The host's own `docker-credential-<name>` binaries, run with a timeout and a clean
//! environment. Their output may contain credentials: it is parsed, never logged.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use finch_shared::message::ListEntry;
use finch_shared::{NOT_FOUND_TEXT, Secret};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use zeroize::Zeroizing;

use super::{Credential, CredentialSource, SourceError, SourceFuture};

/// Environment variables passed through to a helper (with the OS's own,
/// [`crate::platform::OS_HELPER_ENV`]); everything else is dropped.
pub const HELPER_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_ALL",
    "TMPDIR",
    "XDG_RUNTIME_DIR",
    "DBUS_SESSION_BUS_ADDRESS",
    "DISPLAY",
    "WAYLAND_DISPLAY",
    "GNUPGHOME",
    "PASSWORD_STORE_DIR",
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
];

/// Most bytes read from a helper's stdout.
pub const MAX_OUTPUT: usize = 1024 * 1024;

/// Whether `name` is a safe helper name: no path separators, no leading dot or dash.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// One host helper.
#[derive(Debug, Clone)]
pub struct ExecHelper {
    name: String,
    program: PathBuf,
    timeout: Duration,
    env: Vec<(String, OsString)>,
}

impl ExecHelper {
    /// Finds `docker-credential-<name>` (`.exe` on Windows) on `search_path` (a `PATH`-style
    /// list).
    pub fn find(
        name: &str,
        search_path: &std::ffi::OsStr,
        timeout: Duration,
    ) -> Result<Self, SourceError> {
        if !valid_name(name) {
            return Err(SourceError::HelperName(name.to_owned()));
        }
        let file = crate::platform::helper_file(name);
        let program = std::env::split_paths(search_path)
            .filter(|dir| dir.is_absolute())
            .map(|dir| dir.join(&file))
            .find(|p| crate::platform::is_executable(p))
            .ok_or_else(|| SourceError::HelperMissing(name.to_owned()))?;
        let env = HELPER_ENV
            .iter()
            .chain(crate::platform::OS_HELPER_ENV)
            .filter_map(|k| std::env::var_os(k).map(|v| ((*k).to_owned(), v)))
            .collect();
        Ok(ExecHelper { name: name.to_owned(), program, timeout, env })
    }

    /// Runs `action` with `input` on stdin; returns exit success and stdout (zeroized on drop).
    async fn run(
        &self,
        action: &'static str,
        input: &[u8],
    ) -> Result<(ExitStatus, Zeroizing<Vec<u8>>), SourceError> {
        let mut cmd = Command::new(&self.program);
        cmd.arg(action)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        crate::platform::prepare_helper(&mut cmd);
        let spawn_err = |source| SourceError::HelperSpawn { name: self.name.clone(), source };
        let mut child = cmd.spawn().map_err(spawn_err)?;
        // Its process group (unix) or Job Object (Windows): killed with it on timeout.
        let tree = crate::platform::HelperTree::adopt(&child).map_err(spawn_err)?;
        let mut stdin = child.stdin.take();
        let mut stdout = child.stdout.take();
        let work = async {
            if let Some(mut w) = stdin.take() {
                // A helper that exits without reading stdin is judged by its exit status.
                let _ = w.write_all(input).await;
            }
            let mut out = Zeroizing::new(Vec::new());
            if let Some(r) = stdout.as_mut() {
                let _ = r.take(MAX_OUTPUT as u64).read_to_end(&mut out).await;
            }
            let status = child.wait().await;
            (status, out)
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok((Ok(status), out)) => Ok((status, out)),
            Ok((Err(source), _)) => {
                Err(SourceError::HelperSpawn { name: self.name.clone(), source })
            }
            Err(_) => {
                tree.kill();
                Err(SourceError::HelperTimeout {
                    name: self.name.clone(),
                    action,
                    secs: self.timeout.as_secs(),
                })
            }
        }
    }

    fn failed(&self, action: &'static str, status: ExitStatus) -> SourceError {
        SourceError::HelperFailed { name: self.name.clone(), action, status: status.to_string() }
    }

    fn bad_output(&self, action: &'static str) -> SourceError {
        SourceError::HelperOutput { name: self.name.clone(), action }
    }
}

fn is_not_found(out: &[u8]) -> bool {
    std::str::from_utf8(out).is_ok_and(|s| s.trim() == NOT_FOUND_TEXT)
}

#[derive(Deserialize)]
struct GetAnswer {
    #[serde(rename = "Username", default)]
    username: String,
    #[serde(rename = "Secret", default)]
    secret: Secret,
}

#[derive(serde::Serialize)]
struct StoreInput<'a> {
    #[serde(rename = "ServerURL")]
    server_url: &'a str,
    #[serde(rename = "Username")]
    username: &'a str,
    #[serde(rename = "Secret")]
    secret: &'a str,
}

impl CredentialSource for ExecHelper {
    fn name(&self) -> String {
        format!("helper:{}", self.name)
    }

    fn kind(&self) -> super::SourceKind {
        super::SourceKind::Helper
    }

    fn get<'a>(&'a self, server: &'a str) -> SourceFuture<'a, Option<Credential>> {
        Box::pin(async move {
            let (status, out) = self.run("get", server.as_bytes()).await?;
            if !status.success() {
                return if is_not_found(&out) { Ok(None) } else { Err(self.failed("get", status)) };
            }
            let answer: GetAnswer =
                serde_json::from_slice(&out).map_err(|_| self.bad_output("get"))?;
            // docker-credential-pass answers a missing entry with empty credentials.
            if answer.username.is_empty() && answer.secret.is_empty() {
                return Ok(None);
            }
            Ok(Some(Credential { username: answer.username, secret: answer.secret }))
        })
    }

    fn store<'a>(&'a self, server: &'a str, credential: &'a Credential) -> SourceFuture<'a, ()> {
        Box::pin(async move {
            let input = StoreInput {
                server_url: server,
                username: &credential.username,
                secret: credential.secret.expose(),
            };
            let mut json =
                Zeroizing::new(serde_json::to_vec(&input).map_err(|_| self.bad_output("store"))?);
            json.push(b'\n');
            let (status, _) = self.run("store", &json).await?;
            if status.success() { Ok(()) } else { Err(self.failed("store", status)) }
        })
    }

    fn erase<'a>(&'a self, server: &'a str) -> SourceFuture<'a, ()> {
        Box::pin(async move {
            let (status, out) = self.run("erase", server.as_bytes()).await?;
            if status.success() || is_not_found(&out) {
                Ok(())
            } else {
                Err(self.failed("erase", status))
            }
        })
    }

    fn list(&self) -> SourceFuture<'_, Vec<ListEntry>> {
        Box::pin(async move {
            let (status, out) = self.run("list", b"unused").await?;
            if !status.success() {
                return Err(self.failed("list", status));
            }
            let map: std::collections::BTreeMap<String, String> =
                serde_json::from_slice(&out).map_err(|_| self.bad_output("list"))?;
            Ok(map.into_iter().map(|(server, username)| ListEntry { server, username }).collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        for ok in ["secretservice", "ecr-login", "pass", "desktop.exe", "a_b"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "../x", "a/b", ".hidden", "-rf", "a b", "a\\b", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}

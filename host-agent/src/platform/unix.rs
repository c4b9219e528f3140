//! unix (Linux, macOS): the control socket, process groups, signals.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tokio::net::{UnixListener, UnixStream};

use super::{Event, Refused};

/// File name of the control socket in the state directory.
pub const CONTROL_SOCKET_FILE: &str = "control.sock";

/// Variables a host helper may need beyond the common ones (none on unix).
pub const OS_HELPER_ENV: &[&str] = &[];

/// The control socket of the agent using `state_dir`.
pub fn control_path(state_dir: &Path) -> PathBuf {
    state_dir.join(CONTROL_SOCKET_FILE)
}

/// Where the control channel of `state_dir` is, for people.
pub fn control_address(state_dir: &Path) -> String {
    control_path(state_dir).display().to_string()
}

/// A control connection.
pub type ControlStream = UnixStream;

/// The control socket: mode 0600 inside the 0700 state directory, and every peer's uid
/// checked (own uid or root).
#[derive(Debug)]
pub struct ControlListener {
    listener: UnixListener,
    path: PathBuf,
    own_uid: u32,
}

impl ControlListener {
    /// Binds the control socket (the caller holds the agent lock, so an old socket file is
    /// stale).
    pub fn bind(state_dir: &Path) -> anyhow::Result<ControlListener> {
        use std::os::unix::fs::PermissionsExt;
        let path = control_path(state_dir);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("cannot remove stale {}", path.display()));
            }
        }
        let listener =
            UnixListener::bind(&path).with_context(|| format!("cannot bind {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot chmod {}", path.display()))?;
        Ok(ControlListener { listener, path, own_uid: nix::unistd::getuid().as_raw() })
    }

    /// The next connection from this user (or root); another peer is `Ok(Err(Refused))`.
    pub async fn accept(&mut self) -> std::io::Result<Result<ControlStream, Refused>> {
        let (stream, _) = self.listener.accept().await?;
        Ok(match stream.peer_cred() {
            Ok(c) if c.uid() == self.own_uid || c.uid() == 0 => Ok(stream),
            Ok(c) => Err(Refused(format!("a connection from uid {}", c.uid()))),
            Err(e) => Err(Refused(format!("a connection without credentials ({e})"))),
        })
    }

    /// Removes the socket file.
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Connects to the control channel of `state_dir` (blocking; for the command line).
pub fn control_connect(state_dir: &Path) -> std::io::Result<std::os::unix::net::UnixStream> {
    std::os::unix::net::UnixStream::connect(control_path(state_dir))
}

/// Makes the helper lead a process group of its own, so its children can be killed with it.
pub fn prepare_helper(cmd: &mut tokio::process::Command) {
    cmd.process_group(0);
}

/// A spawned helper and everything it started.
#[derive(Debug)]
pub struct HelperTree {
    pgid: Option<nix::unistd::Pid>,
}

impl HelperTree {
    /// Takes hold of `child` (spawned after [`prepare_helper`]) and its future children.
    pub fn adopt(child: &tokio::process::Child) -> std::io::Result<HelperTree> {
        let pgid = child.id().and_then(|p| i32::try_from(p).ok()).map(nix::unistd::Pid::from_raw);
        Ok(HelperTree { pgid })
    }

    /// Kills the helper and every process of its group.
    pub fn kill(&self) {
        if let Some(pgid) = self.pgid {
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// SIGTERM and SIGINT stop the agent; SIGHUP reloads it.
#[derive(Debug)]
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers.
    pub fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// The next request.
    pub async fn next(&mut self) -> Event {
        tokio::select! {
            _ = self.term.recv() => Event::Stop("SIGTERM"),
            _ = self.int.recv() => Event::Stop("SIGINT"),
            _ = self.hup.recv() => Event::Reload("SIGHUP"),
        }
    }
}

/// Whether `path` is a file its owner, group or others may execute.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// What tells two versions of a file apart besides time and size: its inode.
pub fn file_id(meta: &std::fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::ino(meta)
}

/// The launchd domain of this user (`gui/UID`), for the LaunchAgent.
pub fn launchd_domain() -> anyhow::Result<String> {
    Ok(format!("gui/{}", nix::unistd::getuid()))
}

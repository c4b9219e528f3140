//! Everything in the host agent that differs between unix (Linux, macOS) and Windows, behind
//! one set of names with an implementation per OS:
//!
//! * the control channel: `STATE/control.sock` with its peer-uid check on unix; a named pipe
//!   only the current user may open, with the client's user checked, on Windows
//!   ([`ControlListener`], [`control_connect`], [`control_address`]);
//! * host helpers killed with their children on timeout: a process group on unix, a Job
//!   Object on Windows ([`prepare_helper`], [`HelperTree`]);
//! * shutdown and reload requests: SIGTERM/SIGINT/SIGHUP on unix; Ctrl-C, Ctrl-Break and
//!   console close on Windows, where reload is the control command or a file change
//!   ([`Signals`]);
//! * small facts: which files are executable helpers, the helper environment, file identity.
//!
//! * where things are: the home, Finch's root, key paths, private directories ([`paths`]).
//!
//! Private files and directories are `finch_shared::private`, shared with the guest side.

pub mod paths;

#[cfg(unix)]
mod unix;
#[cfg(unix)]
pub use unix::*;
#[cfg(windows)]
mod windows;
#[cfg(windows)]
pub use windows::*;

/// What the OS asked the agent to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Stop, because of the named signal or console event.
    Stop(&'static str),
    /// Reload the configuration, because of the named signal (Windows has none: reload is
    /// the control command or a file change there).
    #[cfg(unix)]
    Reload(&'static str),
}

/// A control connection refused before anything was read, and why (logged by the caller).
#[derive(Debug)]
pub struct Refused(pub String);

/// What identifies a version of a file, for change polling: modification time, size, file
/// identity (a file replaced by rename is another file).
pub type FileStamp = (Option<std::time::SystemTime>, u64, u64);

/// The stamp of `path`, if it can be read.
pub fn stamp(path: &std::path::Path) -> Option<FileStamp> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok(), m.len(), file_id(&m)))
}

/// The helper program for `name` in `dir`: `docker-credential-NAME` (`.exe` on Windows).
pub fn helper_file(name: &str) -> String {
    format!("docker-credential-{name}{}", std::env::consts::EXE_SUFFIX)
}

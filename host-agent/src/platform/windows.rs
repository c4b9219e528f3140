//! Windows: the control named pipe, Job Objects, console events.
//!
//! Unsafe code is confined to the Win32 calls here; every handle is an `OwnedHandle` and
//! every buffer a call points into lives in a value that outlives the call.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::os::windows::ffi::OsStrExt;
use std::os::windows::io::{AsHandle, AsRawHandle, FromRawHandle, OwnedHandle};
use std::path::Path;

use anyhow::Context;
use finch_shared::private::windows::{OwnerOnlyAcl, UserSid};
use tokio::net::windows::named_pipe::{NamedPipeServer, PipeMode, ServerOptions};
use windows_sys::Win32::Foundation::ERROR_PIPE_BUSY;
use windows_sys::Win32::Security::{
    InitializeSecurityDescriptor, SECURITY_ATTRIBUTES, SECURITY_DESCRIPTOR,
    SetSecurityDescriptorDacl,
};
use windows_sys::Win32::System::JobObjects::{
    AssignProcessToJobObject, CreateJobObjectW, JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE,
    JOBOBJECT_EXTENDED_LIMIT_INFORMATION, JobObjectExtendedLimitInformation,
    SetInformationJobObject, TerminateJobObject,
};
use windows_sys::Win32::System::Pipes::GetNamedPipeClientProcessId;
use windows_sys::Win32::System::Threading::{OpenProcess, PROCESS_QUERY_LIMITED_INFORMATION};

use super::{Event, Refused};

/// Variables a host helper needs on Windows to start and find its stores.
pub const OS_HELPER_ENV: &[&str] = &[
    "SystemRoot",
    "SystemDrive",
    "windir",
    "USERPROFILE",
    "USERNAME",
    "USERDOMAIN",
    "LOCALAPPDATA",
    "APPDATA",
    "ProgramData",
    "TEMP",
    "TMP",
    "PATHEXT",
    "ComSpec",
];

/// `SECURITY_DESCRIPTOR_REVISION`.
const SD_REVISION: u32 = 1;

/// The control pipe of the agent using `state_dir`:
/// `\\.\pipe\finch-host-agent-<user>-<hash of the state dir>` (one agent per state dir).
pub fn control_address(state_dir: &Path) -> String {
    let user: String = std::env::var("USERNAME")
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(64)
        .collect();
    // FNV-1a: a stable name, not a secret; the pipe's DACL and the client check protect it.
    let hash = state_dir
        .as_os_str()
        .encode_wide()
        .flat_map(u16::to_le_bytes)
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    format!(r"\\.\pipe\finch-host-agent-{user}-{hash:016x}")
}

/// A control connection.
pub type ControlStream = NamedPipeServer;

/// The control pipe: its DACL lets only the current user open it, remote clients are
/// refused, the first instance must be ours (a squatter makes `bind` fail), and every
/// client's user is checked against ours.
pub struct ControlListener {
    name: String,
    me: UserSid,
    // The security descriptor points into the ACL: both live as long as the listener.
    _acl: OwnerOnlyAcl,
    sd: Box<SECURITY_DESCRIPTOR>,
    next: NamedPipeServer,
}

impl std::fmt::Debug for ControlListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlListener").field("name", &self.name).finish_non_exhaustive()
    }
}

// SAFETY: the descriptor is only read by CreateNamedPipeW, from the task that owns the
// listener; nothing else aliases it.
unsafe impl Send for ControlListener {}

impl ControlListener {
    /// Creates the first instance of the control pipe.
    pub fn bind(state_dir: &Path) -> anyhow::Result<ControlListener> {
        let name = control_address(state_dir);
        let me = UserSid::current().context("cannot read this user's SID")?;
        let acl = OwnerOnlyAcl::new(&me, false).context("cannot build the pipe's ACL")?;
        // SAFETY: all-zero is a valid (empty) SECURITY_DESCRIPTOR to initialize.
        let mut sd: Box<SECURITY_DESCRIPTOR> = Box::new(unsafe { std::mem::zeroed() });
        let psd: *mut c_void = (&raw mut *sd).cast();
        // SAFETY: `psd` points at a SECURITY_DESCRIPTOR we own; the ACL outlives it.
        let ok = unsafe {
            InitializeSecurityDescriptor(psd, SD_REVISION) != 0
                && SetSecurityDescriptorDacl(psd, 1, acl.as_ptr(), 0) != 0
        };
        anyhow::ensure!(
            ok,
            "cannot build the pipe's security descriptor: {}",
            std::io::Error::last_os_error()
        );
        let next = instance(&name, &mut sd, true)
            .with_context(|| format!("cannot create {name} (is another agent running?)"))?;
        Ok(ControlListener { name, me, _acl: acl, sd, next })
    }

    /// The next connection from this user; another user's is `Ok(Err(Refused))`.
    pub async fn accept(&mut self) -> std::io::Result<Result<ControlStream, Refused>> {
        self.next.connect().await?;
        let fresh = instance(&self.name, &mut self.sd, false)?;
        let connected = std::mem::replace(&mut self.next, fresh);
        Ok(match client_user(&connected) {
            Ok(user) if user.same_as(&self.me) => Ok(connected),
            Ok(user) => Err(Refused(format!("a connection from {}", user.to_sid_string()))),
            Err(e) => Err(Refused(format!("a connection whose user cannot be read ({e})"))),
        })
    }

    /// Nothing to remove: a pipe goes with its last handle.
    pub fn remove(&self) {}
}

/// One instance of the pipe `name` with the descriptor `sd`; `first` fails when the name
/// exists already (another agent, or a squatter).
fn instance(
    name: &str,
    sd: &mut SECURITY_DESCRIPTOR,
    first: bool,
) -> std::io::Result<NamedPipeServer> {
    let mut attrs = SECURITY_ATTRIBUTES {
        nLength: size_of::<SECURITY_ATTRIBUTES>() as u32,
        lpSecurityDescriptor: (&raw mut *sd).cast(),
        bInheritHandle: 0,
    };
    // SAFETY: `attrs` and the descriptor it points at are valid for the call.
    unsafe {
        ServerOptions::new()
            .first_pipe_instance(first)
            .reject_remote_clients(true)
            .pipe_mode(PipeMode::Byte)
            .create_with_security_attributes_raw(name, (&raw mut attrs).cast())
    }
}

/// The user of the process at the other end of `pipe`.
fn client_user(pipe: &NamedPipeServer) -> std::io::Result<UserSid> {
    let mut pid = 0u32;
    // SAFETY: a connected pipe handle and a valid out pointer.
    if unsafe { GetNamedPipeClientProcessId(pipe.as_raw_handle(), &mut pid) } == 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: OpenProcess returns a new handle or null.
    let raw = unsafe { OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, 0, pid) };
    if raw.is_null() {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh handle we own from here on.
    let process = unsafe { OwnedHandle::from_raw_handle(raw) };
    UserSid::of_process(process.as_handle())
}

/// Connects to the control pipe of `state_dir` (blocking; for the command line).
pub fn control_connect(state_dir: &Path) -> std::io::Result<std::fs::File> {
    let name = control_address(state_dir);
    let mut tries = 0;
    loop {
        match std::fs::OpenOptions::new().read(true).write(true).open(&name) {
            // Every instance is busy for a moment while the agent makes the next one.
            Err(e) if e.raw_os_error() == Some(ERROR_PIPE_BUSY as i32) && tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// Nothing to prepare: the helper joins its Job Object right after it starts.
pub fn prepare_helper(_cmd: &mut tokio::process::Command) {}

/// A spawned helper and everything it starts, in a Job Object that kills them all when it
/// is closed. The helper joins it right after `spawn`: a child it starts in that first
/// instant would escape, which is why the job is created before the helper reads input.
#[derive(Debug)]
pub struct HelperTree {
    job: OwnedHandle,
}

impl HelperTree {
    /// Puts `child` into a new kill-on-close Job Object.
    pub fn adopt(child: &tokio::process::Child) -> std::io::Result<HelperTree> {
        // SAFETY: no attributes, no name; returns a new handle or null.
        let raw = unsafe { CreateJobObjectW(std::ptr::null(), std::ptr::null()) };
        if raw.is_null() {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh handle we own from here on.
        let job = unsafe { OwnedHandle::from_raw_handle(raw) };
        // SAFETY: all-zero is a valid JOBOBJECT_EXTENDED_LIMIT_INFORMATION.
        let mut info: JOBOBJECT_EXTENDED_LIMIT_INFORMATION = unsafe { std::mem::zeroed() };
        info.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE;
        // SAFETY: `info` is the struct the class names, with its size.
        let ok = unsafe {
            SetInformationJobObject(
                job.as_raw_handle(),
                JobObjectExtendedLimitInformation,
                (&raw const info).cast(),
                size_of::<JOBOBJECT_EXTENDED_LIMIT_INFORMATION>() as u32,
            )
        };
        if ok == 0 {
            return Err(std::io::Error::last_os_error());
        }
        let process = child
            .raw_handle()
            .ok_or_else(|| std::io::Error::other("the helper has already exited"))?;
        // SAFETY: both handles are live.
        if unsafe { AssignProcessToJobObject(job.as_raw_handle(), process) } == 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(HelperTree { job })
    }

    /// Kills the helper and every process of its job.
    pub fn kill(&self) {
        // SAFETY: a live job handle.
        unsafe { TerminateJobObject(self.job.as_raw_handle(), 1) };
    }
}

/// Ctrl-C, Ctrl-Break, closing the console and system shutdown stop the agent. Reload is
/// the control command (`finch-host-agent reload`) or a change of the config file.
#[derive(Debug)]
pub struct Signals {
    c: tokio::signal::windows::CtrlC,
    brk: tokio::signal::windows::CtrlBreak,
    close: tokio::signal::windows::CtrlClose,
    shutdown: tokio::signal::windows::CtrlShutdown,
}

impl Signals {
    /// Installs the handlers.
    pub fn new() -> std::io::Result<Signals> {
        use tokio::signal::windows;
        Ok(Signals {
            c: windows::ctrl_c()?,
            brk: windows::ctrl_break()?,
            close: windows::ctrl_close()?,
            shutdown: windows::ctrl_shutdown()?,
        })
    }

    /// The next request (always a stop: Windows has no reload signal).
    pub async fn next(&mut self) -> Event {
        tokio::select! {
            _ = self.c.recv() => Event::Stop("Ctrl-C"),
            _ = self.brk.recv() => Event::Stop("Ctrl-Break"),
            _ = self.close.recv() => Event::Stop("console closed"),
            _ = self.shutdown.recv() => Event::Stop("system shutdown"),
        }
    }
}

/// Whether `path` is a program Windows would run: a file named `*.exe`.
pub fn is_executable(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("exe")) && path.is_file()
}

/// What tells two versions of a file apart besides time and size (nothing stable on
/// Windows without opening it).
pub fn file_id(_meta: &std::fs::Metadata) -> u64 {
    0
}

/// launchd exists only on macOS.
pub fn launchd_domain() -> anyhow::Result<String> {
    anyhow::bail!("launchctl runs on macOS only")
}

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// Test support: a failed expectation here is a failed test, which is what a panic reports.

//! Helpers for the integration tests: each test gets its own temp dir and its own processes,
//! killed by PID when the test ends (pass or fail).

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Directory holding the built binaries (`target/debug`), or `$FINCH_BIN_DIR`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FINCH_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // The test binary lives in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent().and_then(Path::parent).expect("target dir").to_path_buf()
}

/// Path of one of the project's binaries; fails the test with a hint when it is missing.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (cargo build --workspace --bins)",
        path.display()
    );
    path
}

/// Whether this run is CI, where a missing part is a failure, never a skip.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false")
}

/// Whether we run as root (needed to run a process as another uid).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Finds `program` on PATH (or as given, if it contains a slash).
pub fn which(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Path::new(program).exists().then(|| PathBuf::from(program));
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Checks that every program a test needs is installed. Missing in CI: the test fails.
/// Missing outside CI: prints an explicit skip line and returns false.
pub fn require(test: &str, programs: &[&str]) -> bool {
    let missing: Vec<&str> = programs.iter().copied().filter(|p| which(p).is_none()).collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        !in_ci(),
        "{test}: required programs missing in CI: {missing:?} (.ci/run must install them)"
    );
    eprintln!("SKIPPED {test}: missing {missing:?} (install them, or run .ci/run)");
    false
}

/// Requires root; same rules as [`require`].
pub fn require_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(!in_ci(), "{test}: CI must run as root");
    eprintln!("SKIPPED {test}: needs root to run a process as another uid");
    false
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed (by PID, with its process group) when dropped; its stderr and
/// stdout go to a log file the test can read.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    /// Where its output goes.
    pub log: PathBuf,
    name: String,
}

impl Proc {
    /// Starts `cmd` in its own process group, output appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Proc {
        use std::os::unix::process::CommandExt;
        let out =
            std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log file");
        let err = out.try_clone().expect("log file");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err).process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc { child, log: log.to_owned(), name: name.to_owned() }
    }

    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to it.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal);
    }

    /// Kills it hard and its process group, and reaps it.
    pub fn kill(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits (bounded) for it to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether it has exited (reaping it if so).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Its log so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The result of running the helper once.
#[derive(Debug)]
pub struct HelperRun {
    /// Exit code.
    pub code: i32,
    /// Stdout bytes.
    pub stdout: Vec<u8>,
    /// Stderr text.
    pub stderr: String,
    /// How long it took.
    pub took: Duration,
}

impl HelperRun {
    /// Stdout as text.
    pub fn out(&self) -> &str {
        std::str::from_utf8(&self.stdout).expect("utf-8 stdout")
    }
}

/// Runs a command with `stdin`, bounded by `timeout`; kills it if it overruns.
pub fn run_with_input(mut cmd: Command, stdin: &[u8], timeout: Duration) -> HelperRun {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    if let Some(mut w) = child.stdin.take() {
        let _ = w.write_all(stdin);
    }
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(timeout);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    });
    let out = child.wait_with_output().expect("wait");
    drop(watchdog);
    HelperRun {
        code: out.status.code().unwrap_or(-1),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: started.elapsed(),
    }
}

/// A 32-byte key file with mode 0600.
pub fn write_key(path: &Path, byte: u8) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("key file");
    let mut key = [byte; 32];
    key[0] = 0x42;
    f.write_all(&key).expect("write key");
}

/// Writes an executable shell script.
pub fn write_script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).expect("script");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// Timeouts used by the bridge in tests: short, so failures show fast, but generous enough
/// for a busy 2-core machine.
pub const STARTUP: Duration = Duration::from_secs(20);

/// Hermetic AWS for a host agent: nothing of the test runner's own AWS setup reaches it, and
/// its AWS config and credentials files are `dir/aws-config` and `dir/aws-credentials`.
pub fn hermetic_aws(cmd: &mut Command, dir: &Path) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("AWS_CONFIG_FILE", dir.join("aws-config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", dir.join("aws-credentials"))
        .env("AWS_EC2_METADATA_DISABLED", "true");
}

/// A free TCP port on 127.0.0.1 (bound and released: another process may take it, which a
/// test then sees as a failed bind, not as a wrong answer).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A guest agent and a host agent linked over a unix socket, in a temp dir of their own.
#[derive(Debug)]
pub struct Bridge {
    /// The temp dir (kept on failure: it holds the logs).
    pub dir: tempfile::TempDir,
    /// The guest agent.
    pub guest: Option<Proc>,
    /// The host agent.
    pub host: Option<Proc>,
    /// The host's docker config directory.
    pub docker_config: PathBuf,
    /// Extra directory put first on the host agent's PATH (for fake helpers).
    pub helper_dir: PathBuf,
    /// Extra environment for the host agent.
    pub host_env: Vec<(String, String)>,
    /// Extra flags for the host agent.
    pub host_flags: Vec<String>,
    /// A TCP port on 127.0.0.1 for the link instead of the unix socket (`tcp://`).
    pub tcp_link: Option<u16>,
    /// Run the guest agent and the helper from another directory through a runner (an
    /// aarch64 build under `qemu-aarch64-static`): `(runner, bin dir)`.
    pub guest_exec: Option<(PathBuf, PathBuf)>,
    /// Extra flags for the guest agent.
    pub guest_flags: Vec<String>,
    /// Extra environment for the guest agent (after `RUST_LOG=debug`, so it can override it).
    pub guest_env: Vec<(String, String)>,
    /// Where the host agent dials, when not the guest's link socket (a proxy or an impostor).
    pub host_dials: Option<PathBuf>,
    /// Heartbeat interval of both agents, in milliseconds (500 unless a test needs another).
    pub heartbeat_ms: u64,
    /// VMs beyond `itvm`, each with a guest agent of its own (sockets and key in `DIR/NAME/`):
    /// [`Bridge::start`] starts them too and the host agent dials them all.
    pub more_vms: Vec<String>,
    /// Their guest agents, in the order of [`Bridge::more_vms`].
    pub more_guests: Vec<Proc>,
    /// The host agent's whole `--vm` argument, instead of [`Bridge::vm_arg`] (a VM without a
    /// key file of its own, say).
    pub host_vm: Option<String>,
}

impl Bridge {
    /// A bridge whose host answers from `config_json` (the host's docker config). Nothing is
    /// started yet.
    pub fn new(config_json: &str) -> Bridge {
        let dir = tempfile::Builder::new().prefix("finch-it-").tempdir().expect("tempdir");
        let docker_config = dir.path().join("docker-config");
        let helper_dir = dir.path().join("helpers");
        std::fs::create_dir_all(&docker_config).expect("mkdir");
        std::fs::create_dir_all(&helper_dir).expect("mkdir");
        std::fs::write(docker_config.join("config.json"), config_json).expect("config");
        std::fs::write(dir.path().join("host-agent.toml"), "").expect("host config");
        write_key(&dir.path().join("link.key"), 7);
        Bridge {
            dir,
            guest: None,
            host: None,
            docker_config,
            helper_dir,
            host_env: Vec::new(),
            host_flags: Vec::new(),
            guest_flags: Vec::new(),
            guest_env: Vec::new(),
            host_dials: None,
            host_vm: None,
            heartbeat_ms: 500,
            more_vms: Vec::new(),
            more_guests: Vec::new(),
            tcp_link: None,
            guest_exec: None,
        }
    }

    /// Path of a file in the bridge's dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The host agent's state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.path("state")
    }

    /// The host agent's config file (empty unless a test writes it).
    pub fn host_config(&self) -> PathBuf {
        self.path("host-agent.toml")
    }

    /// Runs `finch-host-agent ARGS` against this bridge's state dir and config; returns
    /// (exit code, stdout, stderr).
    pub fn host_cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(bin("finch-host-agent"))
            .args(args)
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--config")
            .arg(self.host_config())
            .arg("--docker-config")
            .arg(&self.docker_config)
            .env("PATH", path_with(&self.helper_dir))
            .envs(self.host_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()
            .expect("finch-host-agent");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The host agent's `--vm` argument for this bridge's guest.
    pub fn vm_arg(&self) -> String {
        if let Some(port) = self.tcp_link {
            return format!("itvm=tcp://127.0.0.1:{port},key={}", self.path("link.key").display());
        }
        format!(
            "itvm=unix://{},key={}",
            self.host_dials.clone().unwrap_or_else(|| self.link_socket()).display(),
            self.path("link.key").display()
        )
    }

    /// The helper socket.
    pub fn helper_socket(&self) -> PathBuf {
        self.path("helper.sock")
    }

    /// The link socket.
    pub fn link_socket(&self) -> PathBuf {
        self.path("link.sock")
    }

    /// A command running the guest-side program `name` (directly, or through the runner of
    /// [`Bridge::guest_exec`]).
    pub fn guest_command(&self, name: &str) -> Command {
        match &self.guest_exec {
            Some((runner, dir)) => {
                let mut cmd = Command::new(runner);
                cmd.arg(dir.join(name));
                cmd
            }
            None => Command::new(bin(name)),
        }
    }

    /// Starts the guest agent and waits for its helper socket.
    pub fn start_guest(&mut self) {
        let proc = self.spawn_guest(&self.helper_socket(), &self.link_socket(), "guest");
        self.guest = Some(proc);
        for vm in self.more_vms.clone() {
            let dir = self.path(&vm);
            std::fs::create_dir_all(&dir).expect("mkdir");
            write_key(&dir.join("link.key"), 9);
            let proc = self.spawn_guest(&self.helper_socket_of(&vm), &dir.join("link.sock"), &vm);
            self.more_guests.push(proc);
        }
    }

    /// Starts a guest agent on these sockets (the link on [`Bridge::tcp_link`] when set) with
    /// the key next to its link socket, logging to `<log>.log`, and waits for it to listen.
    fn spawn_guest(&self, helper: &Path, link: &Path, log: &str) -> Proc {
        let mut cmd = self.guest_command("finch-guest-agent");
        let key = link.with_file_name("link.key");
        cmd.arg("serve")
            .arg("--helper-socket")
            .arg(helper)
            .arg("--link-listen")
            .arg(match self.tcp_link {
                Some(port) => format!("tcp://127.0.0.1:{port}"),
                None => format!("unix://{}", link.display()),
            })
            .arg("--link-key-file")
            .arg(key)
            .arg("--heartbeat-ms")
            .arg(self.heartbeat_ms.to_string())
            .args(["--link-wait-ms", "3000"])
            .args(&self.guest_flags)
            .env("RUST_LOG", "debug")
            .envs(self.guest_env.iter().map(|(k, v)| (k, v)));
        let proc = Proc::spawn(log, cmd, &self.path(&format!("{log}.log")));
        let tcp = self.tcp_link;
        let listening = || match tcp {
            Some(port) => std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
            None => link.exists(),
        };
        assert!(
            wait_until(STARTUP, || helper.exists() && listening()),
            "guest agent did not start:\n{}",
            proc.output()
        );
        proc
    }

    /// The helper socket of one of [`Bridge::more_vms`].
    pub fn helper_socket_of(&self, vm: &str) -> PathBuf {
        self.path(vm).join("helper.sock")
    }

    /// Starts the host agent.
    pub fn start_host(&mut self) {
        let mut path = std::ffi::OsString::from(&self.helper_dir);
        path.push(":");
        path.push(std::env::var_os("PATH").unwrap_or_default());
        let mut cmd = Command::new(bin("finch-host-agent"));
        cmd.arg("run").arg("--vm").arg(self.host_vm.clone().unwrap_or_else(|| self.vm_arg()));
        for vm in &self.more_vms {
            let dir = self.path(vm);
            let (link, key) = (dir.join("link.sock"), dir.join("link.key"));
            cmd.arg("--vm").arg(format!("{vm}=unix://{},key={}", link.display(), key.display()));
        }
        cmd.arg("--docker-config")
            .arg(&self.docker_config)
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--config")
            .arg(self.host_config())
            .arg("--heartbeat-ms")
            .arg(self.heartbeat_ms.to_string())
            .args(["--reconnect-max-ms", "500"])
            .args(&self.host_flags)
            .env("PATH", path)
            .env("RUST_LOG", "debug");
        hermetic_aws(&mut cmd, self.dir.path());
        for (k, v) in &self.host_env {
            cmd.env(k, v);
        }
        self.host = Some(Proc::spawn("host-agent", cmd, &self.path("host.log")));
    }

    /// Starts both and waits until the link is up.
    pub fn start(&mut self) {
        self.start_guest();
        self.start_host();
        self.wait_link_up(1);
    }

    /// Waits until the guest agent (and each of [`Bridge::more_vms`]') has logged `n` links up.
    pub fn wait_link_up(&self, n: usize) {
        let guest = self.guest.as_ref().expect("guest running");
        for guest in std::iter::once(guest).chain(&self.more_guests) {
            let ok = wait_until(STARTUP, || guest.output().matches("host link up").count() >= n);
            assert!(
                ok,
                "link #{n} of {} did not come up\n--- guest\n{}\n--- host\n{}",
                guest.name(),
                guest.output(),
                self.host_log()
            );
        }
    }

    /// The host agent's log.
    pub fn host_log(&self) -> String {
        std::fs::read_to_string(self.path("host.log")).unwrap_or_default()
    }

    /// The guest agent's log.
    pub fn guest_log(&self) -> String {
        std::fs::read_to_string(self.path("guest.log")).unwrap_or_default()
    }

    /// A command running the helper against this bridge's guest agent.
    pub fn helper_cmd(&self, action: &str) -> Command {
        let mut cmd = self.guest_command("docker-credential-finchhost");
        cmd.arg(action).env("FINCH_GUEST_AGENT_SOCKET", self.helper_socket());
        cmd
    }

    /// Runs the helper once.
    pub fn helper(&self, action: &str, stdin: &str) -> HelperRun {
        run_with_input(self.helper_cmd(action), stdin.as_bytes(), Duration::from_secs(60))
    }

    /// Writes a fake host helper `docker-credential-<name>` with this shell body.
    pub fn fake_helper(&self, name: &str, body: &str) {
        write_script(&self.helper_dir.join(format!("docker-credential-{name}")), body);
    }
}

/// Asserts that `secret` appears in none of `texts` (logs, outputs).
pub fn assert_no_secret(secret: &str, texts: &[(&str, &str)]) {
    for (what, text) in texts {
        assert!(!text.contains(secret), "the secret leaked into {what}");
    }
}

/// Runs a command to completion with a bound, returning (status, stdout+stderr).
pub fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed ({}):\n{text}", out.status);
    text
}

/// An `OsStr` helper for building PATH values.
pub fn path_with(first: &Path) -> std::ffi::OsString {
    let mut p = first.as_os_str().to_owned();
    p.push(OsStr::new(":"));
    p.push(std::env::var_os("PATH").unwrap_or_default());
    p
}

/// Accepts one connection within `timeout`, so a test fails instead of hanging.
pub fn accept_within(
    listener: &std::os::unix::net::UnixListener,
    timeout: Duration,
) -> std::os::unix::net::UnixStream {
    listener.set_nonblocking(true).expect("nonblocking");
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).expect("blocking");
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("no connection within {timeout:?}: {e}"),
        }
    }
}

/// gnome-keyring in a private D-Bus session, and the reference helper that talks to it.
pub mod keyring {
    use std::path::Path;
    use std::process::Command;
    use std::time::Duration;

    use crate::{Proc, STARTUP, run_with_input, wait_until};

    /// Programs these helpers need.
    pub const TOOLS: &[&str] =
        &["dbus-run-session", "gnome-keyring-daemon", "docker-credential-secretservice"];

    /// A private D-Bus session with an unlocked gnome-keyring (secrets component only).
    #[derive(Debug)]
    pub struct Keyring {
        proc: Proc,
        /// The environment that reaches it (D-Bus address, HOME, XDG_RUNTIME_DIR).
        pub env: Vec<(String, String)>,
    }

    pub fn start_keyring(dir: &Path) -> Keyring {
        let home = dir.join("keyring-home");
        let run = dir.join("keyring-run");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::create_dir_all(&run).unwrap();
        std::fs::set_permissions(&run, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        let addr_file = dir.join("dbus-address");
        let mut cmd = Command::new("dbus-run-session");
        cmd.args(["--", "sh", "-c"])
            .arg(format!(
                "echo \"$DBUS_SESSION_BUS_ADDRESS\" > {a}.tmp && mv {a}.tmp {a}; \
                 printf keyring-pw | gnome-keyring-daemon --unlock --components=secrets >/dev/null; exec sleep 3600",
                a = addr_file.display()
            ))
            .env("HOME", &home)
            .env("XDG_RUNTIME_DIR", &run)
            .env_remove("DBUS_SESSION_BUS_ADDRESS");
        let proc = Proc::spawn("dbus-session", cmd, &dir.join("dbus.log"));
        assert!(wait_until(STARTUP, || addr_file.exists()), "no D-Bus session:\n{}", proc.output());
        let address = std::fs::read_to_string(&addr_file).unwrap().trim().to_owned();
        let env = vec![
            ("DBUS_SESSION_BUS_ADDRESS".to_owned(), address),
            ("HOME".to_owned(), home.display().to_string()),
            ("XDG_RUNTIME_DIR".to_owned(), run.display().to_string()),
        ];
        let keyring = Keyring { proc, env };
        // Ready when the reference helper can list (the Secret Service answers).
        let ready = wait_until(STARTUP, || {
            let mut c = Command::new("docker-credential-secretservice");
            c.arg("list").envs(keyring.env.iter().map(|(k, v)| (k, v)));
            run_with_input(c, b"unused", Duration::from_secs(10)).code == 0
        });
        assert!(ready, "gnome-keyring did not come up");
        keyring
    }

    /// Runs Debian's docker-credential-secretservice against `keyring`.
    pub fn secretservice(keyring: &Keyring, action: &str, stdin: &str) -> crate::HelperRun {
        let mut c = Command::new("docker-credential-secretservice");
        c.arg(action).envs(keyring.env.iter().map(|(k, v)| (k, v)));
        run_with_input(c, stdin.as_bytes(), Duration::from_secs(20))
    }

    impl Keyring {
        /// The session's log.
        pub fn output(&self) -> String {
            self.proc.output()
        }
    }
}

/// AWS stand-ins on 127.0.0.1: the project's own fake ECR endpoint and moto_server.
pub mod aws {
    use std::io::{Read, Write};
    use std::path::Path;
    use std::process::Command;

    use crate::{Proc, STARTUP, wait_until};

    /// `tests/fake_ecr.py` running on 127.0.0.1.
    #[derive(Debug)]
    pub struct FakeEcr {
        _proc: Proc,
        /// Its port.
        pub port: u16,
    }

    /// A minimal HTTP/1.1 exchange with a server on 127.0.0.1 (test control only).
    pub fn http(port: u16, method: &str, path: &str, body: &str) -> String {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()
    }

    impl FakeEcr {
        /// Starts it, logging to `dir/fake-ecr.log`.
        pub fn start(dir: &Path) -> FakeEcr {
            let port_file = dir.join("fake-ecr.port");
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fake_ecr.py");
            let mut cmd = Command::new("python3");
            cmd.arg(script).arg(&port_file);
            let proc = Proc::spawn("fake-ecr", cmd, &dir.join("fake-ecr.log"));
            assert!(
                wait_until(STARTUP, || port_file.exists()),
                "fake ECR did not start:\n{}",
                proc.output()
            );
            let port = std::fs::read_to_string(&port_file).unwrap().trim().parse().unwrap();
            FakeEcr { _proc: proc, port }
        }

        /// Changes its behaviour (see `tests/fake_ecr.py`).
        pub fn control(&self, json: &str) {
            assert!(http(self.port, "POST", "/control", json).contains("ok"));
        }

        /// (private, public) token calls so far.
        pub fn calls(&self) -> (u64, u64) {
            let v: serde_json::Value =
                serde_json::from_str(&http(self.port, "GET", "/calls", "")).unwrap();
            (v["private"].as_u64().unwrap(), v["public"].as_u64().unwrap())
        }

        /// The endpoint URL for `AWS_ENDPOINT_URL`.
        pub fn url(&self) -> String {
            format!("http://127.0.0.1:{}", self.port)
        }
    }

    /// `moto_server` on 127.0.0.1 with extra environment.
    #[derive(Debug)]
    pub struct Moto {
        proc: Proc,
        /// Its port.
        pub port: u16,
    }

    impl Moto {
        /// Starts it on a free port and waits until it answers.
        pub fn start(dir: &Path, env: &[(&str, &str)]) -> Moto {
            let port =
                std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let mut cmd = Command::new("moto_server");
            cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]).envs(env.iter().copied());
            let proc = Proc::spawn("moto_server", cmd, &dir.join("moto.log"));
            let up = wait_until(STARTUP * 3, || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                    && !http(port, "GET", "/moto-api/", "").is_empty()
            });
            assert!(up, "moto_server did not answer:\n{}", proc.output());
            Moto { proc, port }
        }

        /// The endpoint URL for `AWS_ENDPOINT_URL`.
        pub fn url(&self) -> String {
            format!("http://127.0.0.1:{}", self.port)
        }

        /// Its log.
        pub fn output(&self) -> String {
            self.proc.output()
        }
    }
}

/// Writes a self-signed RSA certificate (`cert`, PEM) for `san` (`IP:…` or `DNS:…`, also
/// its CN) and its key (`key`), valid two days, with `extensions` added (`-addext`).
pub fn self_signed_cert(cert: &Path, key: &Path, san: &str, extensions: &[&str]) {
    let cn = san.split_once(':').map_or(san, |(_, v)| v);
    let mut cmd = Command::new("openssl");
    cmd.args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj"])
        .arg(format!("/CN={cn}"))
        .arg("-addext")
        .arg(format!("subjectAltName={san}"));
    for e in extensions {
        cmd.args(["-addext", e]);
    }
    run_ok(cmd.arg("-keyout").arg(key).arg("-out").arg(cert), "openssl");
}

/// A network namespace of the test's own, with its loopback up and `/etc/netns/NAME/hosts`
/// (which `ip netns exec` mounts over `/etc/hosts`) mapping names to addresses. The
/// namespace, its veth pairs and that directory are removed on drop; no system file is
/// touched.
#[derive(Debug)]
pub struct Netns {
    /// The namespace's name (`finch-TAG-PID`).
    pub name: String,
    links: Vec<String>,
}

impl Netns {
    /// A namespace whose hosts file maps each `(address, name)`, and `localhost`.
    pub fn new(tag: &str, hosts: &[(&str, &str)]) -> Netns {
        let name = format!("finch-{tag}-{}", std::process::id());
        run_ok(Command::new("ip").args(["netns", "add", &name]), "ip netns add");
        let ns = Netns { name, links: Vec::new() };
        run_ok(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]), "lo up");
        let etc = ns.etc();
        std::fs::create_dir_all(&etc).expect("mkdir /etc/netns/NAME");
        let mut text = "127.0.0.1 localhost\n".to_owned();
        for (addr, host) in hosts {
            text.push_str(&format!("{addr} {host}\n"));
        }
        std::fs::write(etc.join("hosts"), text).expect("write the namespace's hosts");
        ns
    }

    /// A veth pair between this namespace and the test's: `outside/30` on the test's end
    /// (named `fb<id>h`), `inside/30` in the namespace, both up. Returns the test's end.
    pub fn veth(&mut self, id: u32, outside: &str, inside: &str) -> String {
        let (out_if, in_if) = (format!("fb{id}h"), format!("fb{id}g"));
        let ip = |args: &[&str]| run_ok(Command::new("ip").args(args), "ip");
        ip(&["link", "add", &out_if, "type", "veth", "peer", "name", &in_if, "netns", &self.name]);
        self.links.push(out_if.clone());
        ip(&["addr", "add", &format!("{outside}/30"), "dev", &out_if]);
        ip(&["link", "set", &out_if, "up"]);
        ip(&["-n", &self.name, "addr", "add", &format!("{inside}/30"), "dev", &in_if]);
        ip(&["-n", &self.name, "link", "set", &in_if, "up"]);
        out_if
    }

    /// `/etc/netns/NAME`.
    pub fn etc(&self) -> PathBuf {
        Path::new("/etc/netns").join(&self.name)
    }

    /// A command run inside the namespace.
    pub fn cmd(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for link in &self.links {
            let _ = Command::new("ip").args(["link", "del", link]).status();
        }
        let _ = std::fs::remove_dir_all(self.etc());
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

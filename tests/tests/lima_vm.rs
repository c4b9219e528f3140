//! The bridge in a real VM, brought up the way Lima and Finch bring it up.
//!
//! The VM is a Debian 12 image with systemd (built once by `tests/vm/image`, cached outside the
//! repository), booted under QEMU with a copy-on-write overlay, QEMU user networking that only
//! forwards `127.0.0.1:PORT` to the guest's sshd, and 9p shares. This test plays `limactl`,
//! and nothing more:
//!
//! * `finch-host-agent setup finch` writes `_config/default.yaml` and the `[lima]` table in a
//!   `LIMA_HOME` laid out as Lima lays it out (`LIMA_HOME/finch/lima.yaml`); the host agent,
//!   started with that config alone, discovers the instance and fills `finch/finch-bridge`;
//! * from the merged YAML the test takes what Lima would: the `mounts` (exported as 9p shares,
//!   read-only where `writable` is false), the `mode: system` provisioning scripts (rendered
//!   with the login user's `{{.UID}}` and `{{.Home}}` into a cidata share that the image's
//!   `lima-boot.service` runs at every boot, as Lima's cidata `boot.sh` does), and the
//!   `portForwards` socket entry, carried as Lima carries it: `ssh -O forward -L
//!   HOST.sock:GUEST.sock` on an ssh control master opened as the login user (uid 501).
//!
//! Inside the VM, as that user: `podman login`, `push`, `pull`, `skopeo inspect` and `podman
//! logout` against a docker-registry in the VM (TLS, htpasswd), and a `get` for an ECR host
//! answered by the host's native ECR source (`tests/fake_ecr.py` on the host). Then a reboot
//! (the unit comes back at boot, the link with it, the host agent untouched), the guest agent
//! killed (`systemctl kill -s KILL`; systemd restarts it), a root container that tries the key,
//! the helper socket and the link socket and port, and at the end a scan of the VM's whole disk
//! for every secret of the test. Also: Lima's readiness probe, and provisioning with no bundle
//! yet (it says so and the VM starts).
//!
//! QEMU runs under TCG: this machine has `/dev/kvm`, but nested KVM aborts with `-cpu host`
//! (`failed to set MSR 0x10a`) and, with `-cpu host,-arch-capabilities`, the guest kernel hangs
//! before its first earlyprintk line.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use finch_tests::aws::FakeEcr;
use finch_tests::{HelperRun, Proc, assert_no_secret, bin, run_ok, run_with_input, wait_until};
use yaml_rust2::{Yaml, YamlLoader};

/// The login user of the image (`tests/vm/image`): uid 501, as Lima makes it on macOS.
const USER: &str = "finch";
const UID: u32 = 501;
const HOME: &str = "/home/finch.linux";
/// The registry inside the VM; the VM's /etc/hosts points it at the VM's loopback.
const REGISTRY: &str = "registry.finch.test:5000";
const REGISTRY_USER: &str = "vmtester";
/// A registry the VM's policy gives scoped tokens for (so the VM runs the registry front).
const SCOPED: &str = "scoped.finch.test";
const PASSWORD: &str = "lima-vm-Pa55-9c1e";
const ECR: &str = "123456789012.dkr.ecr.us-west-2.amazonaws.com";
const ECR_TOKEN: &str = "ecr-vm-token-1";
/// What the stand-in of Finch's host credserver answers for every registry.
const CANARY: &str = "finch-credserver-canary-7f3a";
/// In the host user's `~/.aws/credentials`, which Finch's `~` mount hands the VM.
const AWS_CANARY: &str = "aws-home-canary-5d21";
/// Where Finch's helper asks, in the VM (Finch's `mac.yaml` reverse-forwards it).
const FINCH_CREDS: &str = "/run/user/501/finch-creds.sock";
/// Generous: QEMU emulates the CPU (TCG) on a 2-core machine that runs other tests beside it.
const BOOT: Duration = Duration::from_secs(600);
const COMMAND: Duration = Duration::from_secs(300);

fn image_dir() -> PathBuf {
    std::env::var_os("FINCH_VM_DIR")
        .map_or_else(|| PathBuf::from("/var/cache/finch-ci/vm"), PathBuf::from)
}

/// What the test takes from the merged Lima YAML, as `limactl` would.
#[derive(Debug, Default)]
struct Plan {
    /// (host location, guest mount point, writable)
    mounts: Vec<(PathBuf, String, bool)>,
    /// `mode: system` scripts, rendered.
    system_scripts: Vec<String>,
    /// `mode: readiness` probe scripts, rendered.
    probes: Vec<String>,
    /// (guest socket, host socket)
    socket_forwards: Vec<(String, PathBuf)>,
}

/// Renders Lima's template fields the fragment may use.
fn render(text: &str, inst: &Path) -> String {
    let out = text
        .replace("{{.Dir}}", &inst.display().to_string())
        .replace("{{.UID}}", &UID.to_string())
        .replace("{{.Home}}", HOME)
        .replace("{{.User}}", USER)
        .replace("{{.Name}}", "finch");
    assert!(!out.contains("{{"), "a template field the test does not render: {out}");
    out
}

/// Lima's merge of `_config/default.yaml` into the instance's `lima.yaml`: lists concatenated
/// (mounts would be combined by mount point; default.yaml has none). `~` is the host user's
/// home (`home`).
fn plan(lima_home: &Path, inst: &Path, home: &Path) -> Plan {
    let mut plan = Plan::default();
    for file in [inst.join("lima.yaml"), lima_home.join("_config/default.yaml")] {
        let text = std::fs::read_to_string(&file).unwrap();
        let docs = YamlLoader::load_from_str(&text).unwrap();
        let Some(doc) = docs.first() else { continue };
        for m in doc["mounts"].as_vec().map_or(&[][..], Vec::as_slice) {
            let location = render(m["location"].as_str().unwrap(), inst);
            let location = match location.strip_prefix('~') {
                Some(tail) => format!("{}{tail}", home.display()),
                None => location,
            };
            let point = m["mountPoint"].as_str().map_or_else(|| location.clone(), str::to_owned);
            plan.mounts.push((location.into(), point, m["writable"].as_bool() == Some(true)));
        }
        for p in doc["provision"].as_vec().map_or(&[][..], Vec::as_slice) {
            if p["mode"].as_str() == Some("system") {
                plan.system_scripts.push(render(p["script"].as_str().unwrap(), inst));
            }
        }
        for p in doc["probes"].as_vec().map_or(&[][..], Vec::as_slice) {
            if p["mode"].as_str().unwrap_or("readiness") == "readiness" {
                plan.probes.push(render(p["script"].as_str().unwrap(), inst));
            }
        }
        for f in doc["portForwards"].as_vec().map_or(&[][..], Vec::as_slice) {
            if let (Yaml::String(guest), Yaml::String(host)) = (&f["guestSocket"], &f["hostSocket"])
            {
                plan.socket_forwards.push((guest.clone(), render(host, inst).into()));
            }
        }
    }
    plan
}

/// A booted VM and the ssh control master into it, as the login user.
struct Vm {
    dir: PathBuf,
    qemu: Proc,
    master: Option<Proc>,
    port: u16,
    boots: usize,
}

impl Vm {
    fn ssh_base(&self) -> Command {
        let mut c = Command::new("ssh");
        c.arg("-F")
            .arg("/dev/null")
            .arg("-i")
            .arg(self.dir.join("id_ed25519"))
            .args(["-p", &self.port.to_string()])
            .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
            .args(["-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"])
            .arg("-o")
            .arg(format!("ControlPath={}", self.dir.join("ssh.ctl").display()));
        c
    }

    /// Runs `script` with `sh` in the VM as the login user, `stdin` as its input.
    fn sh(&self, script: &str, stdin: &[u8]) -> HelperRun {
        let mut c = self.ssh_base();
        c.args(["-o", "ControlMaster=no", &format!("{USER}@127.0.0.1"), "--", script]);
        run_with_input(c, stdin, COMMAND)
    }

    /// Like `sh`, and the script must succeed; returns its stdout.
    fn ok(&self, what: &str, script: &str) -> String {
        let r = self.sh(script, b"");
        assert_eq!(r.code, 0, "{what}: {}{}\n{}", r.out(), r.stderr, self.console_tail());
        r.out().to_owned()
    }

    fn console(&self) -> String {
        self.qemu.output()
    }

    fn console_tail(&self) -> String {
        let c = self.console();
        let lines: Vec<&str> = c.lines().collect();
        format!("--- console (last lines)\n{}", lines[lines.len().saturating_sub(60)..].join("\n"))
    }

    /// Waits for sshd, opens the control master (as Lima's host agent does after each boot),
    /// and waits for the boot scripts (`/run/lima-boot-done`, as Lima waits for them).
    fn connect(&mut self) {
        let up = wait_until(BOOT, || {
            let mut probe = self.ssh_base();
            probe.args(["-o", "ControlMaster=no", &format!("{USER}@127.0.0.1"), "true"]);
            run_with_input(probe, b"", Duration::from_secs(30)).code == 0
        });
        assert!(up, "sshd in the VM never answered\n{}", self.console_tail());
        // As Lima's requirement checks do, the master is retried: sshd may be reloading
        // while the boot scripts run (install.sh reloads it once, for its drop-in).
        let log = self.dir.join(format!("ssh-master-{}.log", self.boots));
        let ready = wait_until(Duration::from_secs(120), || {
            if self.master.as_mut().is_none_or(|m| m.wait_exit(Duration::ZERO).is_some()) {
                let _ = std::fs::remove_file(self.dir.join("ssh.ctl"));
                let mut master = self.ssh_base();
                master.args(["-M", "-N", "-o", "StreamLocalBindUnlink=yes"]);
                master.args(["-o", "ServerAliveInterval=5"]).arg(format!("{USER}@127.0.0.1"));
                self.master = Some(Proc::spawn("ssh master", master, &log));
                std::thread::sleep(Duration::from_secs(2));
            }
            let mut check = self.ssh_base();
            check.args(["-O", "check", "x"]);
            run_with_input(check, b"", Duration::from_secs(10)).code == 0
        });
        assert!(
            ready,
            "the ssh master did not come up: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let booted = wait_until(BOOT, || {
            self.sh("cat /run/lima-boot-done 2>/dev/null", b"").out().trim() == "0"
        });
        assert!(booted, "the boot scripts did not finish cleanly\n{}", self.console_tail());
    }

    /// `ssh -O forward -L HOST:GUEST`, what Lima does for a `portForwards` socket entry.
    fn forward(&self, guest: &str, host: &Path) {
        let _ = std::fs::remove_file(host);
        let mut c = self.ssh_base();
        c.args(["-O", "forward", "-L"]).arg(format!("{}:{guest}", host.display())).arg("x");
        let r = run_with_input(c, b"", Duration::from_secs(30));
        assert_eq!(r.code, 0, "ssh -O forward: {}{}", r.out(), r.stderr);
    }

    /// `ssh -O forward -R GUEST:HOST`, what Lima does for a `reverse: true` socket entry
    /// (after `rm -f GUEST` in the guest, lima-vm/lima `pkg/hostagent/hostagent.go`).
    fn reverse_forward(&self, guest: &str, host: &Path) -> HelperRun {
        let _ = self.sh(&format!("rm -f {guest}"), b"");
        let mut c = self.ssh_base();
        c.args(["-O", "forward", "-R"]).arg(format!("{guest}:{}", host.display())).arg("x");
        run_with_input(c, b"", Duration::from_secs(30))
    }

    /// Reboots the VM from inside and waits until the master is gone.
    fn reboot(&mut self) {
        let _ = self.sh("sudo -n systemctl reboot", b"");
        if let Some(mut m) = self.master.take() {
            let _ = m.wait_exit(Duration::from_secs(120));
            m.kill();
        }
        self.boots += 1;
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut m) = self.master.take() {
            m.kill();
        }
        self.qemu.kill();
    }
}

/// The registry's files for the VM, and the two images: `hello` (one file) and `box` (busybox,
/// the helper and the guest agent, static, for the container checks).
fn testdata(dir: &Path, parts: &Path) -> PathBuf {
    let data = dir.join("testdata");
    std::fs::create_dir_all(&data).unwrap();
    // The certificate (its own CA) and htpasswd; the config is the VM's, with the VM's paths.
    let (_, certs) = crate::e2e_skopeo::registry_files(
        &data,
        "127.0.0.1:5000",
        "DNS:registry.finch.test",
        REGISTRY_USER,
        PASSWORD,
    );
    assert!(certs.join("ca.crt").exists() && data.join("htpasswd").exists());
    std::fs::write(
        data.join("registry.yml"),
        "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: /var/lib/docker-registry\n\
         http:\n  addr: 127.0.0.1:5000\n  tls:\n    certificate: /etc/docker/registry/ca.crt\n    key: /etc/docker/registry/registry.key\n\
         auth:\n  htpasswd:\n    realm: finch-lima-vm\n    path: /etc/docker/registry/htpasswd\n",
    )
    .unwrap();
    crate::e2e_skopeo::make_oci_image(&data.join("hello"), dir);
    let content = dir.join("box-content");
    std::fs::create_dir_all(content.join("bin")).unwrap();
    std::fs::create_dir_all(content.join("run")).unwrap();
    std::fs::create_dir_all(content.join("tmp")).unwrap();
    std::fs::copy(finch_tests::which("busybox").unwrap(), content.join("bin/busybox")).unwrap();
    for b in ["finch-guest-agent", "docker-credential-finchhost", "finch-helper-standin"] {
        std::fs::copy(parts.join("bin").join(b), content.join("bin").join(b)).unwrap();
    }
    std::fs::copy(parts.join("bin/finch-helper-standin"), data.join("finch-helper-standin"))
        .unwrap();
    finch_tests::write_key(&content.join("impostor.key"), 99);
    crate::e2e_skopeo::make_oci_image_of(&data.join("box"), &content, dir);
    data
}

fn host_agent(d: &Path, config: &Path, fake: &FakeEcr) -> Proc {
    let mut cmd = Command::new(bin("finch-host-agent"));
    cmd.arg("run")
        .env("HOME", d.join("home"))
        .arg("--config")
        .arg(config)
        .arg("--state-dir")
        .arg(d.join("state"))
        .arg("--docker-config")
        .arg(d.join("docker"))
        .args(["--heartbeat-ms", "1000", "--reconnect-max-ms", "1000"])
        // Trace, so the check that no secret reaches the host log covers every level.
        .env("RUST_LOG", "trace");
    finch_tests::hermetic_aws(&mut cmd, d);
    cmd.env("AWS_ENDPOINT_URL", fake.url())
        .env("AWS_ACCESS_KEY_ID", "AKIAFAKEFAKEFAKE")
        .env("AWS_SECRET_ACCESS_KEY", "lima-vm-fake-secret-key");
    Proc::spawn("host-agent", cmd, &d.join("host.log"))
}

fn links_up(host: &Proc) -> usize {
    host.output().lines().filter(|l| l.contains("link up") && l.contains("finch")).count()
}

fn base64_of(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// The host's docker config entry for the VM's registry, if any.
fn host_auth(d: &Path) -> Option<String> {
    let text = std::fs::read_to_string(d.join("docker/config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let auths = v["auths"].as_object()?;
    auths
        .iter()
        .find(|(k, _)| k.contains("registry.finch.test"))
        .and_then(|(_, e)| e["auth"].as_str().map(str::to_owned))
}

/// Within a minute, `get` answers the registry's password (`when`: the step, for the message).
fn gets_the_password_soon(vm: &Vm, when: &str) {
    let answered = wait_until(Duration::from_secs(60), || {
        get_gives(vm, REGISTRY, REGISTRY_USER, PASSWORD).is_ok()
    });
    assert!(answered, "{when}: {:?}", get_gives(vm, REGISTRY, REGISTRY_USER, PASSWORD));
}

/// What `get` answered, checked without printing the secret.
fn get_gives(vm: &Vm, server: &str, user: &str, secret: &str) -> Result<(), String> {
    let r = vm.sh("docker-credential-finchhost get", server.as_bytes());
    if r.code != 0 {
        return Err(format!("get {server} failed ({}): {}", r.code, r.stderr));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&r.stdout).map_err(|e| format!("get {server}: not JSON: {e}"))?;
    if v["Username"] == user && v["Secret"] == secret {
        Ok(())
    } else {
        Err(format!("get {server} answered another credential (user {})", v["Username"]))
    }
}

#[test]
fn a_lima_style_vm_boots_the_bridge_and_its_clients_use_it() {
    let test = "a_lima_style_vm_boots_the_bridge_and_its_clients_use_it";
    let tools = ["qemu-system-x86_64", "qemu-img", "ssh", "ssh-keygen", "openssl", "htpasswd"];
    if !finch_tests::require(test, &[&tools[..], &["busybox", "tar", "python3", "grep"]].concat()) {
        return;
    }
    let parts = image_dir();
    let prepared =
        parts.join("debian/image.raw").exists() && parts.join("bin/finch-guest-agent").exists();
    if !prepared {
        assert!(
            !finch_tests::in_ci(),
            "{test}: {} is not prepared (.ci/run runs tests/vm/prepare and tests/vm/image)",
            parts.display()
        );
        eprintln!("SKIPPED {test}: run tests/vm/prepare and tests/vm/image first");
        return;
    }
    let started = Instant::now();
    // Kept when the test fails (the console, the host agent's log, the overlay); removed at
    // the end of a run that passed.
    let kept = tempfile::Builder::new().prefix("finch-lima-vm-").tempdir().unwrap().keep();
    eprintln!("{test}: working in {}", kept.display());

    let (lima_home, inst, config) = setup_finch_wires_finchs_template(&kept, &parts);
    finch_vm_init_makes_a_wired_vm(&lima_home, &inst);
    let (host, fake) = the_host_agent_fills_the_bundle(&kept, &inst, &config);
    let plan = lima_takes_mounts_scripts_forward_and_probe(&lima_home, &inst);
    let mut scene = boot(kept, &parts, plan, host, fake);
    let boot_to_link = the_first_boot_links_and_the_unit_is_confined(&mut scene);
    the_probe_passes_and_a_vm_without_a_bundle_starts(&scene);
    clients_log_in_push_and_pull_through_the_bridge(&scene);
    a_reboot_brings_the_link_back(&mut scene);
    a_killed_agent_is_restarted(&scene);
    the_unit_comes_up_with_a_tcp_link(&scene);
    finchs_own_credential_path_yields_nothing(&scene);
    a_container_gets_nothing_and_an_impostor_no_link(&scene);
    hardened_finch_keeps_the_home_out(&mut scene);
    logout_erases_on_the_host(&scene);
    no_secret_in_the_vm_its_disk_or_the_logs(scene);
    eprintln!("lima_vm: boot to link up {boot_to_link:?}; whole test {:?}", started.elapsed());
}

/// What the steps share: the working directory, the host agent, the fake ECR, the VM.
struct Scene {
    d: PathBuf,
    plan: Plan,
    host: Proc,
    fake: FakeEcr,
    vm: Vm,
    overlay: PathBuf,
    booted_at: Instant,
}

impl Scene {
    /// After a (re)start: Lima's master and forward again, and a link up beyond the `before`
    /// seen until then.
    fn relinked(&mut self, before: usize, after: &str) {
        self.reconnect();
        let (vm, host) = (&self.vm, &self.host);
        assert!(
            wait_until(BOOT, || links_up(host) > before),
            "no link after {after}\n{}\n--- host\n{}",
            vm.console_tail(),
            host.output()
        );
    }

    /// A new ssh master and Lima's socket forward over it (the plan has exactly one).
    fn reconnect(&mut self) {
        self.vm.connect();
        let (guest, host) = &self.plan.socket_forwards[0];
        self.vm.forward(guest, host);
    }
}

fn image_ref() -> String {
    format!("{REGISTRY}/finch/hello:v1")
}

/// Finch's template as its Makefile builds it for macOS (runfinch/finch `finch.yaml.d/mac.yaml`,
/// `finchhost-mount.yaml`), cut to what this test plays: the home mounted writable, and
/// `finch-cred` (which holds the credserver the host runs) mounted writable.
fn finch_template(finch: &Path) -> String {
    format!(
        "# Finch's template (a stand-in)\nvmType: qemu\narch: x86_64\ncpus: 2\nmemory: 2GiB\n\
         mounts:\n  - location: \"~\"\n    mountPoint: null\n    writable: true\n\
         \x20 - location: \"{}/finch-cred\"\n    writable: true\n",
        finch.display()
    )
}

/// A Finch install as its macOS package lays it out (`Finch/os/finch.yaml`, `Finch/finch-cred/`,
/// `LIMA_HOME` at `Finch/lima/data`), no VM yet; the guest binaries where `[lima] guest_dir`
/// points; the host user's home with `~/.aws/credentials`; the host's docker config plaintext
/// (`auths`), so the test can check it. Then `setup finch` finds Finch's template and wires it.
fn setup_finch_wires_finchs_template(d: &Path, parts: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let finch = d.join("Finch");
    let lima_home = finch.join("lima/data");
    let inst = lima_home.join("finch");
    let guest_dir = d.join("guest");
    for dir in [
        &lima_home.join("_config"),
        &finch.join("os"),
        &finch.join("finch-cred"),
        &guest_dir.join("linux-x86_64"),
        &d.join("docker"),
        &d.join("home/.aws"),
        &d.join("home/src"),
    ] {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(finch.join("os/finch.yaml"), finch_template(&finch)).unwrap();
    std::fs::write(finch.join("finch-cred/credserver"), "#!/bin/sh\n").unwrap();
    std::fs::write(
        d.join("home/.aws/credentials"),
        format!("[default]\naws_access_key_id = AKIAHOME\naws_secret_access_key = {AWS_CANARY}\n"),
    )
    .unwrap();
    std::fs::write(d.join("docker/config.json"), "{}").unwrap();
    for b in ["finch-guest-agent", "docker-credential-finchhost"] {
        std::fs::copy(parts.join("bin").join(b), guest_dir.join("linux-x86_64").join(b)).unwrap();
    }
    let config = d.join("host-agent.toml");
    std::fs::write(&config, "").unwrap();
    let setup = setup_finch(d, &[]);
    assert!(setup.contains(&format!("wired {}", finch.join("os/finch.yaml").display())), "{setup}");
    assert!(setup.contains("the fragment is not in"), "{setup}");
    // Scoped tokens for one registry: the bundle names it, so the VM runs the registry front.
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!("\n[vm.finch.policy]\npull = [\"{SCOPED}/probe\"]\n"));
    std::fs::write(&config, text).unwrap();
    (lima_home, inst, config)
}

/// `finch-host-agent ARGS` for the test's Finch (its config and state), as the user whose
/// home is `d/home`.
fn host_cli(d: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin("finch-host-agent"));
    c.args(args)
        .arg("--config")
        .arg(d.join("host-agent.toml"))
        .arg("--state-dir")
        .arg(d.join("state"))
        .env("HOME", d.join("home"));
    c
}

/// `setup finch` for the test's Finch, with `extra` arguments.
fn setup_finch(d: &Path, extra: &[&str]) -> String {
    let mut c = host_cli(d, &["setup", "finch", "--no-start", "--platform", "linux"]);
    c.args(["--instance", "finch", "--lima-home"])
        .arg(d.join("Finch/lima/data"))
        .arg("--guest-dir")
        .arg(d.join("guest"))
        .args(extra);
    run_ok(&mut c, "setup finch")
}

/// `doctor` for the test's Finch: its report (no AWS variables where it runs).
fn doctor(d: &Path) -> String {
    let mut c = host_cli(d, &["doctor"]);
    c.arg("--docker-config").arg(d.join("docker"));
    c.env_remove("AWS_ACCESS_KEY_ID").env_remove("AWS_SECRET_ACCESS_KEY");
    let out = c.output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        report.contains("vm finch"),
        "doctor: {report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    report
}

/// `finch-host-agent status`, asked of the scene's running agent.
fn status(d: &Path) -> String {
    let out = host_cli(d, &["status"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "status: {text}{}", String::from_utf8_lossy(&out.stderr));
    text
}

/// `finch vm init` as Finch 1.18 does it: `default.yaml` rewritten whole right before `limactl
/// start` (`ConfigureDefaultLimaYaml`), then Lima makes the instance from the template with
/// `--set .ssh.overVsock=false`. No host agent runs: the VM gets the bridge from the template
/// alone, so no race with Finch's rewrite decides it.
fn finch_vm_init_makes_a_wired_vm(lima_home: &Path, inst: &Path) {
    std::fs::write(
        lima_home.join("_config/default.yaml"),
        "vmOpts:\n  vz:\n    rosetta:\n      enabled: false\n      binfmt: false\n",
    )
    .unwrap();
    std::fs::create_dir_all(inst).unwrap();
    let template = lima_home.join("../../os/finch.yaml");
    let mut text = std::fs::read_to_string(template).unwrap();
    text.push_str("ssh:\n  overVsock: false\n");
    std::fs::write(inst.join("lima.yaml"), text).unwrap();
}

/// The host agent, started with that config alone, finds the instance and fills its bundle.
fn the_host_agent_fills_the_bundle(d: &Path, inst: &Path, config: &Path) -> (Proc, FakeEcr) {
    let made = std::fs::read(inst.join("lima.yaml")).unwrap();
    let fake = FakeEcr::start(d);
    fake.control(r#"{"password": "ecr-vm-token-{n}"}"#);
    let host = host_agent(d, config, &fake);
    let bundle = inst.join("finch-bridge");
    assert!(
        wait_until(Duration::from_secs(60), || bundle.join("SHA256SUMS").exists()),
        "the host agent did not fill {}:\n{}",
        bundle.display(),
        host.output()
    );
    // The instance was made wired: the agent had nothing to change in it.
    assert_eq!(std::fs::read(inst.join("lima.yaml")).unwrap(), made, "the agent rewrote lima.yaml");
    assert!(!inst.join("lima.yaml.finch-bridge-orig").exists());
    (host, fake)
}

/// What limactl takes from the merged YAML: one system script that installs with systemd,
/// the bundle mounted read-only, one socket forward to the instance's socket, one probe.
fn lima_takes_mounts_scripts_forward_and_probe(lima_home: &Path, inst: &Path) -> Plan {
    let d = lima_home.ancestors().nth(3).unwrap();
    let plan = plan(lima_home, inst, &d.join("home"));
    assert_eq!(plan.system_scripts.len(), 1, "{plan:?}");
    assert!(plan.system_scripts[0].contains("--init systemd"), "{plan:?}");
    let bridge_mount = plan.mounts.iter().find(|m| m.1 == "/mnt/finch-bridge");
    let bundle = inst.join("finch-bridge");
    assert_eq!(bridge_mount.map(|m| (&m.0, m.2)), Some((&bundle, false)), "{plan:?}");
    let [(_, host_socket)] = &plan.socket_forwards[..] else {
        panic!("one socket forward expected: {plan:?}")
    };
    assert_eq!(host_socket, &inst.join("sock/finch-guest-agent.sock"));
    assert_eq!(plan.probes.len(), 1, "one readiness probe expected: {plan:?}");
    std::fs::create_dir_all(inst.join("sock")).unwrap();
    plan
}

/// Boots the VM as Lima would: cidata with the scripts and the ssh key, the plan's mounts
/// as 9p shares (plus the test's own), an overlay on the image.
fn boot(d: PathBuf, parts: &Path, plan: Plan, host: Proc, fake: FakeEcr) -> Scene {
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "lima-vm-test", "-f"])
            .arg(d.join("id_ed25519")),
        "ssh-keygen",
    );
    testdata(&d, parts);
    let overlay = d.join("overlay.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(parts.join("debian/image.raw"))
            .arg(&overlay),
        "qemu-img create",
    );
    let booted_at = Instant::now();
    let (qemu, port) = start_qemu(&d, parts, &plan, &overlay);
    let vm = Vm { dir: d.clone(), qemu, master: None, port, boots: 0 };
    Scene { d, plan, host, fake, vm, overlay, booted_at }
}

/// `limactl start` of the instance in `d`: cidata from `plan`, the plan's mounts as 9p shares
/// (plus the test's own), QEMU on `overlay`, and `ha.pid` written as Lima's host agent writes
/// it when it starts.
fn start_qemu(d: &Path, parts: &Path, plan: &Plan, overlay: &Path) -> (Proc, u16) {
    let image = parts.join("debian");
    let cidata = d.join("cidata");
    let _ = std::fs::remove_dir_all(&cidata);
    std::fs::create_dir_all(cidata.join("provision.system")).unwrap();
    for (i, s) in plan.system_scripts.iter().enumerate() {
        std::fs::write(cidata.join(format!("provision.system/{i:08}")), s).unwrap();
    }
    std::fs::copy(d.join("id_ed25519.pub"), cidata.join("ssh_authorized_keys")).unwrap();
    let mut virtfs = Vec::new();
    let mut mounts = String::new();
    for (i, (location, point, writable)) in plan.mounts.iter().enumerate() {
        let tag = format!("mount{i}");
        let ro = if *writable { "" } else { ",readonly=on" };
        virtfs.push(format!(
            "local,path={},mount_tag={tag},security_model=none{ro}",
            location.display()
        ));
        mounts.push_str(&format!("{tag} {point} {}\n", if *writable { "rw" } else { "ro" }));
    }
    // The test's own share (registry files, images), not part of the Lima plan.
    virtfs.push(format!(
        "local,path={},mount_tag=testdata,security_model=none,readonly=on",
        d.join("testdata").display()
    ));
    mounts.push_str("testdata /mnt/testdata ro\n");
    virtfs.push(format!(
        "local,path={},mount_tag=cidata,security_model=none,readonly=on",
        cidata.display()
    ));
    std::fs::write(cidata.join("mounts"), mounts).unwrap();

    let port = finch_tests::free_port();
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-cpu", "max", "-m", "2048", "-smp", "2"])
        .args(["-nographic", "-nodefaults", "-serial", "stdio"])
        .arg("-kernel")
        .arg(image.join("vmlinuz"))
        .arg("-initrd")
        .arg(image.join("initrd.img"))
        .args(["-append", "root=/dev/vda rw console=ttyS0 panic=-1 random.trust_cpu=on"])
        .arg("-drive")
        .arg(format!("file={},format=qcow2,if=virtio", overlay.display()))
        .arg("-netdev")
        .arg(format!("user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22"))
        .args(["-device", "virtio-net-pci,netdev=n0", "-device", "virtio-rng-pci"]);
    for v in &virtfs {
        qemu.arg("-virtfs").arg(v);
    }
    let n = std::fs::read_dir(d).unwrap().filter(|e| {
        e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().starts_with("console"))
    });
    let console = d.join(format!("console-{}.log", n.count()));
    let qemu = Proc::spawn("qemu", qemu, &console);
    let inst = &plan.socket_forwards[0].1.parent().unwrap().parent().unwrap().to_owned();
    std::fs::write(inst.join("ha.pid"), qemu.pid().to_string()).unwrap();
    // Lima keeps the console in the instance's serial.log, new at every start.
    let _ = std::fs::remove_file(inst.join("serial.log"));
    std::fs::hard_link(&console, inst.join("serial.log")).unwrap();
    (qemu, port)
}

/// Boot 1: provisioning installs the guest side, the unit starts, Lima forwards the socket,
/// the link comes up; the unit runs confined. Returns the time from boot to link.
fn the_first_boot_links_and_the_unit_is_confined(scene: &mut Scene) -> Duration {
    scene.reconnect();
    let (vm, host) = (&scene.vm, &scene.host);
    assert!(
        wait_until(BOOT, || links_up(host) >= 1),
        "the link never came up\n{}\n--- host\n{}",
        vm.console_tail(),
        host.output()
    );
    let boot_to_link = scene.booted_at.elapsed();
    let unit = vm.ok(
        "the unit",
        "systemctl show finch-guest-agent -p ActiveState -p ProtectSystem -p InaccessiblePaths -p NoNewPrivileges \
         -p MemoryDenyWriteExecute -p RestrictAddressFamilies -p CapabilityBoundingSet -p User",
    );
    for want in [
        "ActiveState=active",
        // Finch's credential socket is in /run/user (install.sh --finch-creds-uid): the unit's
        // drop-in makes /run writable and hides the homes instead of ProtectHome.
        "ProtectSystem=full",
        "InaccessiblePaths=-/home -/root",
        "NoNewPrivileges=yes",
        "MemoryDenyWriteExecute=yes",
    ] {
        assert!(unit.lines().any(|l| l == want), "the unit runs without {want}:\n{unit}");
    }
    // The link is a unix socket (Lima forwards it); the registry front (the policy names a
    // registry for scoped tokens) adds loopback TCP and the registries: nothing else.
    let families =
        unit.lines().find_map(|l| l.strip_prefix("RestrictAddressFamilies=")).unwrap_or_default();
    let mut families: Vec<&str> = families.split(' ').collect();
    families.sort_unstable();
    assert_eq!(families, ["AF_INET", "AF_INET6", "AF_UNIX"], "{unit}");
    let caps = unit.lines().find(|l| l.starts_with("CapabilityBoundingSet=")).unwrap_or_default();
    assert!(
        caps.contains("cap_chown") && !caps.contains("cap_sys_admin") && !caps.contains("cap_net"),
        "the unit's capability bounding set: {caps}"
    );
    boot_to_link
}

/// Lima's readiness probe passes; and a VM that boots before the host agent filled its
/// bundle starts anyway: provisioning and the probe, over an empty /mnt/finch-bridge (in a
/// mount namespace of their own), say so and exit 0.
fn the_probe_passes_and_a_vm_without_a_bundle_starts(scene: &Scene) {
    let vm = &scene.vm;
    let probe = &scene.plan.probes[0];
    let ready = vm.sh("sh -s", probe.as_bytes());
    assert_eq!(ready.code, 0, "the readiness probe failed: {}", ready.stderr);
    let empty = vm.sh(
        "sudo -n unshare -m sh -c 'mount -t tmpfs none /mnt/finch-bridge || exit 9
           sh /mnt/lima-cidata/provision.system/00000000; echo \"provision=$?\"
           sh -s; echo \"probe=$?\"'",
        probe.as_bytes(),
    );
    assert!(
        empty.out().contains("provision=0") && empty.out().contains("probe=0"),
        "without a bundle: {}{}",
        empty.out(),
        empty.stderr
    );
    assert!(empty.stderr.contains("no bundle in /mnt/finch-bridge yet"), "{}", empty.stderr);
    assert_eq!(vm.ok("still active", "systemctl is-active finch-guest-agent").trim(), "active");

    // A bundle provisioning did not see (on QEMU, reverse-sshfs mounts come after it): the
    // probe installs, and the agent runs.
    let before = links_up(&scene.host);
    vm.ok("no agent", "sudo -n systemctl stop finch-guest-agent");
    let late = vm.sh("sh -s", probe.as_bytes());
    assert_eq!(late.code, 0, "{}", late.stderr);
    if !late.stderr.contains("guest side installed") {
        let why = vm.sh(
            "set -x; systemctl is-active finch-guest-agent; sudo -n ls -la /run/finch-credential-bridge-install; \
             sudo -n cat /run/finch-credential-bridge-install; sudo -n journalctl -b -o cat -u finch-guest-agent | tail -5",
            b"",
        );
        panic!(
            "the probe did not install: {}{}\n{}{}",
            late.out(),
            late.stderr,
            why.out(),
            why.stderr
        );
    }
    assert_eq!(vm.ok("installed", "systemctl is-active finch-guest-agent").trim(), "active");
    // A guest side that cannot come up never holds the start: the probe says why and passes
    // within its bound (Lima retries a failing probe for ten minutes).
    // (A runtime drop-in the install does not touch makes the unit fail at every start.)
    vm.ok(
        "an agent that cannot start",
        "set -e; d=/run/systemd/system/finch-guest-agent.service.d; sudo -n mkdir -p $d
         printf '[Service]\\nExecStartPre=/bin/false\\n' | sudo -n tee $d/zz-broken.conf >/dev/null
         sudo -n systemctl daemon-reload; sudo -n systemctl stop finch-guest-agent",
    );
    let started = Instant::now();
    let stuck = vm.sh("sh -s", probe.as_bytes());
    let took = started.elapsed();
    assert_eq!(stuck.code, 0, "{}", stuck.stderr);
    assert!(took < Duration::from_secs(45), "the probe held the start for {took:?}");
    assert!(stuck.stderr.contains("the guest agent is not running"), "{}", stuck.stderr);
    // And on the VM's console, which Lima keeps: the host's doctor shows it.
    let said = "FAIL vm finch guest: the VM's console (Lima's serial log) says: \"finch-credential-bridge: the guest agent is not running";
    assert!(
        wait_until(Duration::from_secs(20), || doctor(&scene.d).contains(said)),
        "{}",
        doctor(&scene.d)
    );
    vm.ok(
        "repaired",
        "sudo -n rm -r /run/systemd/system/finch-guest-agent.service.d && sudo -n systemctl daemon-reload && \
         sudo -n systemctl restart finch-guest-agent",
    );
    assert!(
        wait_until(Duration::from_secs(120), || links_up(&scene.host) > before + 1),
        "the link did not come back\n{}",
        scene.host.output()
    );
}

/// The registry in the VM (TLS with the test's CA, htpasswd; podman and skopeo trust it);
/// podman login stores on the host, push and pull use it, and `get` answers for the
/// registry and, from the host's native ECR source, for an ECR host.
fn clients_log_in_push_and_pull_through_the_bridge(scene: &Scene) {
    let (vm, d) = (&scene.vm, scene.d.as_path());
    let image_ref = image_ref();
    vm.ok(
        "the registry",
        "set -e; sudo -n sh -c 'set -e
          install -m 0644 /mnt/testdata/registry.yml /etc/docker/registry/config.yml
          install -m 0644 /mnt/testdata/htpasswd /mnt/testdata/registry.key /etc/docker/registry/
          install -m 0644 /mnt/testdata/certs/ca.crt /etc/docker/registry/ca.crt
          mkdir -p /etc/containers/certs.d/registry.finch.test:5000
          install -m 0644 /mnt/testdata/certs/ca.crt /etc/containers/certs.d/registry.finch.test:5000/ca.crt
          grep -q registry.finch.test /etc/hosts || echo \"127.0.0.1 registry.finch.test\" >> /etc/hosts
          systemctl enable --now docker-registry 2>/dev/null'
         for i in $(seq 60); do (echo > /dev/tcp/127.0.0.1/5000) 2>/dev/null && exit 0; sleep 1; done
         systemctl status docker-registry; exit 1",
    );

    // podman login: the registry checks the password, the bridge stores it on the host.
    let login = vm.sh(
        &format!("podman login --username {REGISTRY_USER} --password-stdin {REGISTRY}"),
        PASSWORD.as_bytes(),
    );
    assert_eq!(login.code, 0, "podman login: {}{}", login.out(), login.stderr);
    assert!(login.out().contains("Login Succeeded"), "{}", login.out());
    assert_eq!(
        host_auth(d).as_deref(),
        Some(base64_of(&format!("{REGISTRY_USER}:{PASSWORD}")).as_str()),
        "the host does not hold the credential podman stored"
    );
    vm.ok(
        "podman push",
        &format!(
            "set -e; podman pull -q oci:/mnt/testdata/hello:v1 >/dev/null
             podman tag $(podman images -q | head -1) {image_ref}
             podman push -q {image_ref}"
        ),
    );
    vm.ok(
        "podman pull",
        &format!("set -e; podman rmi -a -f >/dev/null; podman pull -q {image_ref}"),
    );
    let inspect = vm.ok("skopeo inspect", &format!("skopeo inspect docker://{image_ref}"));
    assert!(inspect.contains("\"Digest\": \"sha256:"), "{inspect}");
    get_gives(vm, REGISTRY, REGISTRY_USER, PASSWORD).unwrap();
    // ECR: answered on the host by the native source (the fake token endpoint).
    get_gives(vm, ECR, "AWS", ECR_TOKEN).unwrap();
    assert_eq!(scene.fake.calls(), (1, 0));
}

/// Reboot: the unit starts at boot, provisioning runs again, the link comes back; nothing is
/// done on the host side but what Lima does (a new ssh master and the forward).
fn a_reboot_brings_the_link_back(scene: &mut Scene) {
    let before = links_up(&scene.host);
    scene.vm.reboot();
    scene.relinked(before, "the reboot");
    let vm = &scene.vm;
    let journal = vm.ok("the boot's journal", "sudo -n journalctl -b -o cat -u finch-guest-agent");
    assert!(journal.contains("host link up"), "{journal}");
    assert_eq!(vm.ok("enabled", "systemctl is-enabled finch-guest-agent").trim(), "enabled");
    gets_the_password_soon(vm, "after the reboot");
}

/// The unit with a `tcp://` link (Finch on Windows without Hyper-V sockets) comes up under
/// systemd and listens (its address families are the link's); then the fragment's own install
/// again, and the host's link is back.
fn the_unit_comes_up_with_a_tcp_link(scene: &Scene) {
    let (vm, host) = (&scene.vm, &scene.host);
    let before = links_up(host);
    let tcp = vm.ok(
        "install with a tcp:// link",
        "set -e; sudo -n sh /mnt/finch-bridge/install.sh --bundle /mnt/finch-bridge --init systemd \
           --link-listen tcp://127.0.0.1:6127 --allow-uid 501 >/dev/null
         for i in $(seq 30); do ss -ltnH 'sport = :6127' | grep -q . && break; sleep 1; done
         systemctl is-active finch-guest-agent
         systemctl show -p RestrictAddressFamilies --value finch-guest-agent
         ss -ltnH 'sport = :6127' | wc -l",
    );
    let lines: Vec<&str> = tcp.lines().collect();
    assert_eq!(lines.first().copied(), Some("active"), "{tcp}");
    assert!(lines.get(1).is_some_and(|l| l.contains("AF_INET") && l.contains("AF_UNIX")), "{tcp}");
    assert_eq!(lines.get(2).copied(), Some("1"), "not listening on 127.0.0.1:6127: {tcp}");
    vm.ok(
        "the fragment's install",
        "sudo -n /bin/sh /run/finch-credential-bridge-install >/dev/null",
    );
    assert!(
        wait_until(Duration::from_secs(120), || links_up(host) > before),
        "the link did not come back after the unix:// install\n{}",
        host.output()
    );
}

/// Killed: systemd restarts the agent (Restart=on-failure) and the next get works.
fn a_killed_agent_is_restarted(scene: &Scene) {
    let (vm, host) = (&scene.vm, &scene.host);
    let before = links_up(host);
    vm.ok("kill", "sudo -n systemctl kill -s KILL finch-guest-agent");
    assert!(
        wait_until(Duration::from_secs(120), || links_up(host) > before),
        "the link did not come back after the kill\n{}",
        host.output()
    );
    let restarts = vm.ok("restarts", "systemctl show -p NRestarts --value finch-guest-agent");
    assert!(restarts.trim().parse::<u32>().unwrap_or(0) >= 1, "NRestarts={restarts}");
    gets_the_password_soon(vm, "after the kill");
}

/// Finch's own credential path, as Finch 1.18 and Lima set it up (stand-ins written from their
/// source, `finch-helper-standin` and a Python credserver): a host credserver that answers
/// every registry with a canary, Lima's reverse forward of it to Finch's guest socket, Finch's
/// user-mode provisioning copying its helper to `/usr/bin`, and Finch's `.bashrc` line. sshd
/// refuses the forward; the guest agent holds the path; Finch's helper, as the login user, as
/// root under `sudo -E` (with the host-side `AWS_PROFILE` Finch passes) and in a root
/// container, is answered by the bridge under the host's policy, and the credserver is never
/// asked.
fn finchs_own_credential_path_yields_nothing(scene: &Scene) {
    let (vm, d) = (&scene.vm, scene.d.as_path());
    let sock_dir = scene.plan.socket_forwards[0].1.parent().unwrap().to_owned();
    let creds = sock_dir.join("creds.sock");
    let asked = d.join("credserver-requests.log");
    let script = d.join("credserver.py");
    std::fs::write(
        &script,
        format!(
            r#"import http.server, json, os, socketserver, sys
path, log = sys.argv[1], sys.argv[2]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with open(log, "a") as f:
            f.write(self.path + "\n")
        body = json.dumps({{"ServerURL": "x", "Username": "finch-canary", "Secret": "{CANARY}"}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
if os.path.exists(path):
    os.remove(path)
Server(path, Handler).serve_forever()
"#
        ),
    )
    .unwrap();
    let mut cmd = Command::new("python3");
    cmd.arg(&script).arg(&creds).arg(&asked);
    let credserver = Proc::spawn("credserver", cmd, &d.join("credserver.log"));
    assert!(wait_until(Duration::from_secs(20), || creds.exists()), "{}", credserver.output());

    // Lima's reverse forward: sshd refuses it (the bridge's drop-in), and the agent's socket is
    // at the path (Lima's `rm -f` took it; the agent took it back).
    let forward = vm.reverse_forward(FINCH_CREDS, &creds);
    assert_ne!(forward.code, 0, "sshd accepted the reverse forward of Finch's credserver");
    let sshd = vm.ok("sshd's setting", "sudo -n sshd -T | grep -i allowstreamlocalforwarding");
    assert_eq!(sshd.trim(), "allowstreamlocalforwarding local");
    let ours = wait_until(Duration::from_secs(30), || {
        vm.sh(&format!("test -S {FINCH_CREDS}"), b"").code == 0
    });
    if !ours {
        let why = vm.sh(
            "ls -la /run/user/501; sudo -n journalctl -b -o cat -u finch-guest-agent | tail -40",
            b"",
        );
        panic!("the guest agent does not hold Finch's socket:\n{}{}", why.out(), why.stderr);
    }

    // Finch's user-mode provisioning and its .bashrc lines, as the login user.
    vm.ok(
        "Finch's provisioning",
        "sudo cp /mnt/testdata/finch-helper-standin /usr/bin/docker-credential-finchhost",
    );
    vm.ok(
        "Finch's .bashrc lines",
        &format!(
            r#"mkdir -p "$HOME/.finch-vm-config" && export DOCKER_CONFIG="$HOME/.finch-vm-config" &&
               echo '{{"credsStore": "finchhost"}}' > "$DOCKER_CONFIG/config.json" &&
               AWS_DIR={}/home/.aws && {{ [ -L /root/.aws ] || sudo ln -fsn "$AWS_DIR" /root/.aws; }}"#,
            d.display()
        ),
    );
    // Stock Finch's side door, which the bridge does not close by itself: root in the VM reads
    // the host's ~/.aws through the `~` mount (only a count leaves the VM), and doctor says so.
    // The pattern comes on stdin: sudo logs its command line to the journal, on the disk.
    let door = vm.sh("sudo -n grep -c -F -f - /root/.aws/credentials", AWS_CANARY.as_bytes());
    assert_eq!(door.out().trim(), "1", "stock Finch: /root/.aws reaches the host's ~/.aws");
    let report = doctor(d);
    let aws = d.join("home/.aws/credentials");
    assert!(report.contains(&format!("reaches {} (AWS credentials", aws.display())), "{report}");
    assert!(report.contains("holds the credserver the host runs"), "{report}");
    let finch_get = |how: &str| -> String {
        let r = vm.sh(&format!("{how} get"), REGISTRY.as_bytes());
        assert!(!r.out().contains(CANARY) && !r.stderr.contains(CANARY), "{how}: the canary");
        assert_eq!(r.code, 0, "{how}: {}", r.stderr);
        let v: serde_json::Value = serde_json::from_str(r.out().trim()).unwrap();
        assert_eq!(v["Username"], REGISTRY_USER, "{how}");
        assert!(v["Secret"] == PASSWORD, "{how}: another secret");
        how.to_owned()
    };
    finch_get("/usr/bin/docker-credential-finchhost");
    finch_get("sudo -E /usr/bin/docker-credential-finchhost");
    finch_get(
        "AWS_PROFILE=prod HOST_DOCKER_CONFIG=/Users/me/.docker sudo -E docker-credential-finchhost",
    );
    finch_get("sudo -E env PATH=/usr/bin:/bin docker-credential-finchhost");
    vm.ok("the box image", "sudo -n podman pull -q oci:/mnt/testdata/box:v1 >/dev/null && sudo -n podman tag $(sudo -n podman images -q | head -1) localhost/box:v1");
    // Only a verdict leaves the container, and no secret is in its command line: both are
    // kept on the VM's disk, which the last step scans. The canary's user is `finch-canary`.
    let inside = vm.ok(
        "Finch's helper in a root container",
        &format!(
            "sudo -n podman run --rm --log-driver=none -v /run/user/501:/run/user/501 -e SUDO_UID=501 \
             localhost/box:v1 /bin/busybox sh -c '
              out=$(printf %s {REGISTRY} | /bin/finch-helper-standin get)
              case \"$out\" in
                *finch-canary*) echo CANARY ;;
                *{REGISTRY_USER}*) echo BRIDGE-ANSWERED ;;
                *) echo NOTHING ;;
              esac'"
        ),
    );
    assert_eq!(inside.trim(), "BRIDGE-ANSWERED", "Finch's helper in a root container");
    let host = scene.host.output();
    assert!(host.contains(r#"op="get" registry="registry.finch.test:5000""#), "no audit line");
    let asked = std::fs::read_to_string(&asked).unwrap_or_default();
    assert!(asked.is_empty(), "Finch's credserver was asked: {asked}");
    drop(credserver);
}

/// `setup finch --harden --share ~/src`, then `finch vm stop && finch vm start`: the template
/// and the instance lose the `~` mount and get `~/src`, `finch-cred` is read-only; until the
/// restart doctor says the VM runs without its wiring. After it, nothing in the VM reaches the
/// host's ~/.aws (nor /root/.aws, Finch's link to it), the share is writable, `finch-cred` is
/// not, and the bridge answers.
fn hardened_finch_keeps_the_home_out(scene: &mut Scene) {
    let d = scene.d.clone();
    let inst = d.join("Finch/lima/data/finch");
    let src = d.join("home/src");
    let out = setup_finch(&d, &["--harden", "--share", &src.display().to_string()]);
    assert!(out.contains(&format!("wired {}", inst.join("lima.yaml").display())), "{out}");
    let report = doctor(&d);
    assert!(report.contains("FAIL vm finch started"), "{report}");
    let restart = format!(
        "restart needed: {} changed after the VM started",
        inst.join("lima.yaml").display()
    );
    assert!(status(&d).contains(&restart), "status does not say: {restart}");

    let before = links_up(&scene.host);
    let _ = scene.vm.sh("sudo -n systemctl poweroff", b"");
    if let Some(mut m) = scene.vm.master.take() {
        m.kill();
    }
    assert!(scene.vm.qemu.wait_exit(Duration::from_secs(180)).is_some(), "no poweroff");
    let lima_home = d.join("Finch/lima/data");
    scene.plan = lima_takes_mounts_scripts_forward_and_probe(&lima_home, &inst);
    let points: Vec<(&str, bool)> =
        scene.plan.mounts.iter().map(|(_, p, w)| (p.as_str(), *w)).collect();
    let cred = d.join("Finch/finch-cred").display().to_string();
    let src_point = src.display().to_string();
    assert!(points.contains(&(cred.as_str(), false)), "{points:?}");
    assert!(points.contains(&(src_point.as_str(), true)), "{points:?}");
    let home = d.join("home").display().to_string();
    assert!(!points.iter().any(|(p, _)| *p == home), "the home is still mounted: {points:?}");
    let parts = image_dir();
    let (qemu, port) = start_qemu(&d, &parts, &scene.plan, &scene.overlay);
    scene.vm.qemu = qemu;
    scene.vm.port = port;
    scene.vm.boots += 1;
    scene.relinked(before, "the hardened start");
    let vm = &scene.vm;
    let seen = vm.sh(
        &format!(
            "sudo -n sh -c 'grep -rlF -f - /root/.aws/ {home}/ 2>/dev/null | wc -l; \
             touch {cred}/x 2>/dev/null && echo cred-writable; touch {src_point}/built && echo src-writable'"
        ),
        AWS_CANARY.as_bytes(),
    );
    assert_eq!(seen.out().trim(), "0\nsrc-writable", "hardened: {}", seen.stderr);
    assert!(src.join("built").exists());
    gets_the_password_soon(vm, "after the hardened start");
    let report = doctor(&d);
    for gone in ["FAIL vm finch started", "AWS credentials", "holds the credserver"] {
        assert!(!report.contains(gone), "{gone}: {report}");
    }
    assert!(!status(&d).contains("restart needed"), "status after the restart");
}

/// A container, root in the VM: no key, no helper socket, nothing from the link. With the
/// agent stopped, a container takes the link socket's path and the link port, and the host
/// (which keeps dialing) links to neither.
fn a_container_gets_nothing_and_an_impostor_no_link(scene: &Scene) {
    let (vm, host) = (&scene.vm, &scene.host);
    vm.ok("the box image", "sudo -n podman pull -q oci:/mnt/testdata/box:v1 >/dev/null && sudo -n podman tag $(sudo -n podman images -q | head -1) localhost/box:v1");
    // The registry front runs (the bundle's scoped file named a registry), with its
    // certificates in the agent's runtime directory and hosts.toml naming them.
    vm.ok(
        "the front",
        &format!(
            "sudo -n ss -ltnH 'sport = :6128' | grep -q LISTEN && sudo -n test -s /run/finch-guest-agent/front/client.key \
             && sudo -n grep -q 'client = ' /etc/containerd/certs.d/{SCOPED}/hosts.toml"
        ),
    );
    let refused_before = vm
        .ok("the agent's journal", "sudo -n journalctl -u finch-guest-agent --no-pager -o cat")
        .matches("TLS handshake refused")
        .count();
    let inside = vm.ok(
        "the container",
        &format!(
            "sudo -n podman run --rm --network host localhost/box:v1 /bin/busybox sh -c '
              /bin/busybox --install -s /bin; export PATH=/bin
              cat /etc/finch-guest-agent/link.key >/dev/null 2>&1 || echo KEY-UNREADABLE
              find / -xdev -name link.key 2>/dev/null | grep -q . || echo KEY-NOWHERE
              out=$(printf %s {REGISTRY} | docker-credential-finchhost get 2>&1)
              case \"$out\" in *Secret*) echo HELPER-ANSWERED;; *) echo HELPER-UNREACHABLE;; esac
              find / -xdev -name client.key 2>/dev/null | grep -q . || echo FRONT-KEY-NOWHERE
              printf \"GET /token/{SCOPED}?scope=repository:probe:pull HTTP/1.0\\r\\n\\r\\n\" \
                | nc -w 5 127.0.0.1 6128 > /tmp/front.out 2>&1
              grep -q HTTP/ /tmp/front.out && echo FRONT-ANSWERED || echo FRONT-NO-ANSWER'"
        ),
    );
    for want in [
        "KEY-UNREADABLE",
        "KEY-NOWHERE",
        "HELPER-UNREACHABLE",
        "FRONT-KEY-NOWHERE",
        "FRONT-NO-ANSWER",
    ] {
        assert!(inside.contains(want), "container: {inside}");
    }
    assert!(!inside.contains("HELPER-ANSWERED"), "container: {inside}");
    // The container reached the front on the VM's loopback as uid 0, which the socket table
    // cannot tell from containerd; without the client certificate it got no handshake.
    let journal =
        vm.ok("the agent's journal", "sudo -n journalctl -u finch-guest-agent --no-pager -o cat");
    let refused: Vec<&str> =
        journal.lines().filter(|l| l.contains("TLS handshake refused")).collect();
    assert!(refused.len() > refused_before, "the front saw no refused handshake:\n{journal}");
    assert!(refused.last().is_some_and(|l| l.contains("uid=0")), "{refused:?}");
    // With the agent stopped, the container takes the link socket's path and the link port.
    let before = links_up(host);
    let log_at_stop = host.output().len();
    vm.ok("stop", "sudo -n systemctl stop finch-guest-agent");
    let impostor = vm.ok(
        "the impostor container",
        &format!(
            "sudo -n podman run --rm --network host -e RUST_LOG=debug localhost/box:v1 /bin/busybox sh -c '
              /bin/busybox --install -s /bin; export PATH=/bin; mkdir -p /run/finch-guest-agent
              finch-guest-agent serve --link-listen unix:///run/finch-guest-agent/link.sock \
                --link-key-file /impostor.key --allow-uid 0 --link-allow-uid {UID} \
                --helper-socket /tmp/a.sock > /tmp/a.log 2>&1 &
              finch-guest-agent serve --link-listen tcp://127.0.0.1:6127 \
                --link-key-file /impostor.key --allow-uid 0 --helper-socket /tmp/b.sock > /tmp/b.log 2>&1 &
              sleep 20; cat /tmp/a.log /tmp/b.log'"
        ),
    );
    assert_eq!(
        impostor.matches("guest agent ready").count(),
        2,
        "the impostors did not listen: {impostor}"
    );
    for never in ["host authenticated", "handshake", "host link up", "link connection"] {
        assert!(!impostor.contains(never), "an impostor got a connection ({never}): {impostor}");
    }
    assert_eq!(links_up(host), before, "a link came up while the agent was stopped");
    // The host kept dialing through the forward meanwhile, and got nowhere.
    let since_stop = host.output()[log_at_stop..].to_owned();
    assert!(
        since_stop.contains("link down") && since_stop.contains("cannot link to the VM"),
        "the host did not dial while the agent was stopped:\n{since_stop}"
    );
    vm.ok("start", "sudo -n systemctl start finch-guest-agent");
    assert!(wait_until(Duration::from_secs(120), || links_up(host) > before), "{}", host.output());
}

/// podman logout erases on the host; the registry then refuses skopeo.
fn logout_erases_on_the_host(scene: &Scene) {
    let (vm, d) = (&scene.vm, scene.d.as_path());
    let image_ref = image_ref();
    vm.ok("podman logout", &format!("podman logout {REGISTRY}"));
    assert_eq!(host_auth(d), None, "the host still holds the credential after logout");
    let refused = vm.sh(&format!("skopeo inspect docker://{image_ref}"), b"");
    assert_ne!(refused.code, 0, "skopeo inspect worked after logout: {}", refused.out());
    assert!(
        refused.stderr.contains("unauthorized") || refused.stderr.contains("authentication"),
        "{}",
        refused.stderr
    );
}

/// No auth.json or config.json in the VM holds a secret; nor does the VM's whole disk, after
/// a clean poweroff; nor the console or the host agent's log (at trace).
fn no_secret_in_the_vm_its_disk_or_the_logs(mut scene: Scene) {
    let d = scene.d.clone();
    let vm = &mut scene.vm;
    let files = vm.ok(
        "client files",
        "sudo -n sh -c 'find / /run /tmp /var/tmp -xdev \\( -name auth.json -o -name config.json \\) \
         -type f 2>/dev/null | while read -r f; do echo \"== $f\"; cat \"$f\"; echo; done'",
    );
    let encoded = base64_of(&format!("{REGISTRY_USER}:{PASSWORD}"));
    let secrets =
        [PASSWORD, encoded.as_str(), ECR_TOKEN, "lima-vm-fake-secret-key", CANARY, AWS_CANARY];
    assert!(files.contains("finchhost"), "no client config names finchhost:\n{files}");
    for s in secrets {
        assert!(
            !files.contains(s),
            "a client config in the VM holds a secret:\n{}",
            files.replace(s, "<SECRET>")
        );
    }
    let _ = vm.sh("sudo -n systemctl poweroff", b"");
    assert!(vm.qemu.wait_exit(Duration::from_secs(180)).is_some(), "the VM did not power off");
    let raw = d.join("disk.raw");
    run_ok(
        Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(&scene.overlay).arg(&raw),
        "qemu-img convert",
    );
    // The scan reads the data: the registry's htpasswd (user name, bcrypt hash) is on it.
    let control = Command::new("grep")
        .args(["-a", "-c", "-F", "-e", &format!("{REGISTRY_USER}:$2y$")])
        .arg(&raw)
        .output()
        .unwrap();
    assert_ne!(String::from_utf8_lossy(&control.stdout).trim(), "0", "the scan sees nothing");
    let patterns = d.join("secrets.txt");
    std::fs::write(&patterns, secrets.join("\n")).unwrap();
    let scan = Command::new("grep")
        .args(["-a", "-c", "-F", "-f"])
        .arg(&patterns)
        .arg(&raw)
        .output()
        .unwrap();
    let count = String::from_utf8_lossy(&scan.stdout).trim().to_owned();
    assert_eq!(count, "0", "the VM's disk holds a secret of the test ({count} lines)");
    let _ = std::fs::remove_file(&raw);

    // Every start's console, not only this one's.
    let mut console = String::new();
    for e in std::fs::read_dir(&d).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("console-") {
            console.push_str(&String::from_utf8_lossy(&std::fs::read(e.path()).unwrap()));
        }
    }
    assert!(console.contains("lima-boot"), "no console read");
    let host_log = scene.host.output();
    assert!(host_log.contains("TRACE"), "trace was not in force");
    for s in secrets {
        assert_no_secret(s, &[("console", &console), ("host log", &host_log)]);
    }
}

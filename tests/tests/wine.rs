//! The Windows host agent, for real, under Wine: the release `finch-host-agent.exe` dials a
//! Linux guest agent over `tcp://127.0.0.1:PORT`, with the host's docker config saying
//! `credsStore: wincred`. Through the Linux `docker-credential-finchhost`: `store`, `get`,
//! `list`, `erase` answered by the native `wincred` source from Wine's Credential Manager
//! (each item checked by `wincred-check.exe`, which reads it with `CredReadW`); a Windows
//! host helper answered; a hung one killed with its child inside the timeout (Job Object);
//! `status` and `reload` over the named pipe; `doctor`; `install --print --platform windows`;
//! a key file others may read refused.
//!
//! The Windows programs come from `$FINCH_WINDOWS_BIN_DIR`, default
//! `<target>/x86_64-pc-windows-gnu/release` (`.ci/run` builds them). Wine runs in a prefix of
//! the test's own (`tests/wine/run`). Wine maps a file's DACL onto unix mode bits, so the
//! state directory and key are made private with chmod here; the DACL the agent writes is
//! checked by the Windows unit tests (`finch_shared::private::windows`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use finch_tests::{Bridge, Proc, assert_no_secret, free_port, in_ci, require, wait_until};

/// Wine's first start in a new prefix takes a while; every later one a second or two.
const WINE_STARTUP: Duration = Duration::from_secs(180);

fn windows_bins() -> Option<PathBuf> {
    let dir = std::env::var_os("FINCH_WINDOWS_BIN_DIR").map(PathBuf::from).unwrap_or_else(|| {
        let target = finch_tests::bin_dir().parent().expect("target dir").to_path_buf();
        target.join("x86_64-pc-windows-gnu/release")
    });
    let wanted = ["finch-host-agent.exe", "wincred-check.exe", "docker-credential-winetest.exe"];
    let missing: Vec<&str> = wanted.iter().copied().filter(|f| !dir.join(f).is_file()).collect();
    if missing.is_empty() {
        return Some(dir);
    }
    let build = "cargo build --release --target x86_64-pc-windows-gnu -p finch-host-agent -p finch-wine-tools";
    assert!(!in_ci(), "{missing:?} missing in {}: .ci/run must run `{build}`", dir.display());
    eprintln!("SKIPPED wine: {missing:?} missing in {} (run `{build}`)", dir.display());
    None
}

/// `path` as Wine sees it: the unix root is drive `Z:`.
fn winpath(path: &Path) -> String {
    format!("Z:{}", path.display()).replace('/', "\\")
}

/// One Wine prefix for the test, with the host helpers' directory first on Windows' PATH;
/// its wineserver (and every program left in it) is killed at the end.
struct Wine {
    prefix: PathBuf,
    run: PathBuf,
    path: String,
}

impl Wine {
    fn new(dir: &Path, helpers: &Path) -> Wine {
        let run = Path::new(env!("CARGO_MANIFEST_DIR")).join("wine/run");
        Wine { prefix: dir.join("wineprefix"), run, path: winpath(helpers) }
    }

    fn cmd(&self, exe: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.run);
        cmd.arg(exe).args(args).env("FINCH_WINE_PREFIX", &self.prefix).env("WINEPATH", &self.path);
        cmd
    }

    fn output(&self, exe: &Path, args: &[&str]) -> (i32, String, String) {
        let out = self.cmd(exe, args).output().expect("wine");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Wine {
    fn drop(&mut self) {
        let _ = Command::new("/usr/lib/wine/wineserver")
            .arg("-k")
            .env("WINEPREFIX", &self.prefix)
            .status();
    }
}

fn private_dir(path: &Path) {
    std::fs::create_dir_all(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).unwrap();
}

#[test]
fn windows_host_agent_under_wine_serves_a_linux_guest() {
    if !require("wine", &["wine", "x86_64-w64-mingw32-gcc", "/usr/lib/wine/wine64"]) {
        return;
    }
    let Some(win) = windows_bins() else { return };
    let config = r#"{"credsStore":"wincred","credHelpers":{"helper.example":"winetest","hang.example":"winehang"}}"#;
    let mut b = Bridge::new(config);
    let port = free_port();
    b.tcp_link = Some(port);
    b.start_guest();
    let wine = Wine::new(b.dir.path(), &b.helper_dir);
    for name in ["winetest", "winehang"] {
        let to = b.helper_dir.join(format!("docker-credential-{name}.exe"));
        std::fs::copy(win.join("docker-credential-winetest.exe"), to).unwrap();
    }
    let state = b.state_dir();
    private_dir(&state);
    let agent = win.join("finch-host-agent.exe");
    let settings = [
        "--state-dir".to_owned(),
        winpath(&state),
        "--config".to_owned(),
        winpath(&b.host_config()),
        "--docker-config".to_owned(),
        winpath(&b.docker_config),
    ];
    let cli = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(settings.iter().map(String::as_str));
        wine.output(&agent, &all)
    };

    // The agent, dialing the Linux guest over TCP.
    let itvm = format!("itvm=tcp://127.0.0.1:{port},key={}", winpath(&b.path("link.key")));
    let mut run: Vec<&str> = vec!["run", "--vm", &itvm];
    run.extend(settings.iter().map(String::as_str));
    run.extend([
        "--heartbeat-ms",
        "500",
        "--reconnect-max-ms",
        "500",
        "--helper-timeout-secs",
        "3",
    ]);
    let mut cmd = wine.cmd(&agent, &run);
    cmd.env("RUST_LOG", "debug");
    let mut host = Proc::spawn("finch-host-agent.exe", cmd, &b.path("host.log"));
    let up = wait_until(WINE_STARTUP, || b.guest_log().contains("host link up") || host.exited());
    b.host = Some(host);
    assert!(
        up && b.guest_log().contains("host link up"),
        "no link from the Windows agent\n--- host\n{}\n--- guest\n{}",
        b.host_log(),
        b.guest_log()
    );

    // store / get / list / erase from Wine's Credential Manager, natively.
    let item = r#"{"ServerURL":"registry.wine.example","Username":"wine-store-user","Secret":"wine-store-secret"}"#;
    let r = b.helper("store", item);
    assert_eq!(r.code, 0, "{r:?}\n{}", b.host_log());
    let check = win.join("wincred-check.exe");
    let (code, out, err) = wine.output(&check, &["registry.wine.example"]);
    assert_eq!(code, 0, "{out}{err}");
    // Wine 8 keeps no credential attributes (dlls/advapi32/cred.c: "FIXME: Attributes"), so
    // the `label` docker's helper filters `list` on reads back empty there; real Windows keeps
    // it (the upstream windows-latest job). Everything else is checked exactly.
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (&v["user"], &v["blob"], &v["persist"]),
        (&"wine-store-user".into(), &"wine-store-secret".into(), &2.into()),
        "{out}"
    );
    let keeps_attributes = v["label"] == "Docker Credentials";
    assert!(keeps_attributes || v["label"] == "", "{out}");
    let r = b.helper("get", "registry.wine.example");
    assert_eq!(
        (r.out(), r.code),
        (
            "{\"ServerURL\":\"registry.wine.example\",\"Username\":\"wine-store-user\",\"Secret\":\"wine-store-secret\"}\n",
            0
        ),
        "{}",
        b.host_log()
    );
    let r = b.helper("list", "");
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.out().contains("\"helper.example\":\"wine-user\""), "{r:?}");
    assert_eq!(
        r.out().contains("\"registry.wine.example\":\"wine-store-user\""),
        keeps_attributes,
        "list shows docker's items, told apart by their label: {r:?}"
    );
    assert!(b.host_log().contains("source=\"keychain:wincred\""), "{}", b.host_log());
    let r = b.helper("erase", "registry.wine.example");
    assert_eq!(r.code, 0, "{r:?}");
    let (code, out, _) = wine.output(&check, &["registry.wine.example"]);
    assert_eq!((code, out.trim()), (1, "not found"));
    assert_eq!(b.helper("get", "registry.wine.example").code, 1);

    // A Windows host helper answers; a hung one is killed with its child in the timeout.
    let r = b.helper("get", "helper.example");
    assert!(r.out().contains("\"Secret\":\"wine-helper-secret\""), "{r:?}\n{}", b.host_log());
    let started = Instant::now();
    let r = b.helper("get", "hang.example");
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("winehang") && r.stderr.contains("3 s"), "{}", r.stderr);
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
    let beat = b.helper_dir.join("winehang.beat");
    assert!(beat.exists(), "the hung helper's child never ran");
    let read = || std::fs::read_to_string(&beat).unwrap_or_default();
    let stopped = wait_until(Duration::from_secs(10), || {
        let before = read();
        std::thread::sleep(Duration::from_millis(600));
        read() == before
    });
    assert!(stopped, "the hung helper's child outlived the timeout (Job Object not killed)");

    // status and reload over the named pipe; doctor; install --print.
    let (code, out, err) = cli(&["status"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("vm itvm: link up"), "{out}");
    assert!(out.contains(&format!("endpoint tcp://127.0.0.1:{port}")), "{out}");
    assert!(!out.contains("last error"), "{out}");
    let (code, out, err) = cli(&["reload"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("config reloaded"), "{out}{err}");
    let (code, out, err) = cli(&["doctor", "--vm", &itvm]);
    assert!(out.contains("OK   state dir:"), "{out}{err}");
    assert!(out.contains("OK   agent:") || out.contains("OK   links:"), "{out}{err}");
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = wine.output(&agent, &["install", "--print", "--platform", "windows"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("<Command>") && out.contains("finch-host-agent.exe"), "{out}");

    // A key file that others may read is refused (Wine shows mode 0644 as Everyone: read).
    let open_key = b.path("open.key");
    finch_tests::write_key(&open_key, 9);
    std::fs::set_permissions(&open_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let other_state = b.path("state2");
    private_dir(&other_state);
    let vm = format!("x=tcp://127.0.0.1:{port},key={}", winpath(&open_key));
    let (code, out, err) = wine.output(
        &agent,
        &[
            "run",
            "--vm",
            &vm,
            "--state-dir",
            &winpath(&other_state),
            "--config",
            &winpath(&b.host_config()),
        ],
    );
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("is open to other users") && err.contains("S-1-1-0"), "{err}");

    assert_no_secret(
        "wine-store-secret",
        &[("host log", &b.host_log()), ("guest log", &b.guest_log())],
    );
    assert_no_secret("wine-helper-secret", &[("host log", &b.host_log())]);
}

/// `setup finch` on Windows, under Wine, through Finch's own helper mechanism: a Finch-shaped
/// `%LOCALAPPDATA%\.finch` (`finch.yaml` with `creds_helpers: [ecr-login]`, `config.json` with
/// `credsStore: wincred`); setup (no wsl.exe, no logon task) puts the Linux helper in
/// `cred-helpers\`, `finchhost` in `creds_helpers` (`ecr-login` out), `credsStore: finchhost`
/// in the shared config, records `wincred` as the host's store and attaches the VM over
/// `tcp://`. Then a Linux guest agent with the VM's exported key, and the host agent reading
/// that same directory: the client path (`credsStore` in that config.json, then
/// `docker-credential-finchhost`) stores into Wine's Credential Manager and gets it back, an
/// ECR name is answered natively, no host `docker-credential-finchhost` is ever run; and
/// `--remove` restores both files byte for byte.
#[test]
fn windows_setup_finch_under_wine_wires_finchs_own_helper_mechanism() {
    if !require("wine", &["wine", "x86_64-w64-mingw32-gcc", "/usr/lib/wine/wine64"]) {
        return;
    }
    let Some(win) = windows_bins() else { return };
    let mut b = Bridge::new("{}");
    let port = free_port();
    b.tcp_link = Some(port);
    let finch = b.path("LocalAppData/.finch");
    let guest = b.path("guest/linux-x86_64");
    for d in [&finch, &guest] {
        std::fs::create_dir_all(d).unwrap();
    }
    let yaml =
        "# Finch's config\ncpus: 2\nmemory: 4GiB\ncreds_helpers:\n  - ecr-login\nvmType: wsl2\n";
    let config = "{\n  \"credsStore\": \"wincred\"\n}\n";
    std::fs::write(finch.join("finch.yaml"), yaml).unwrap();
    std::fs::write(finch.join("config.json"), config).unwrap();
    for bin in ["finch-guest-agent", "docker-credential-finchhost"] {
        std::fs::copy(finch_tests::bin(bin), guest.join(bin)).unwrap();
    }
    let wine = Wine::new(b.dir.path(), &b.helper_dir);
    // A docker-credential-finchhost on the host's PATH that says so if it is ever run.
    std::fs::copy(
        win.join("docker-credential-winetest.exe"),
        b.helper_dir.join("docker-credential-finchhost.exe"),
    )
    .unwrap();
    let state = b.state_dir();
    for d in [state.clone(), state.join("finch-setup"), state.join("vms")] {
        private_dir(&d);
    }
    let agent = win.join("finch-host-agent.exe");
    let host_config = b.path("host-agent.toml");
    let common =
        ["--state-dir".to_owned(), winpath(&state), "--config".to_owned(), winpath(&host_config)];
    let setup = |extra: &[&str]| {
        let mut args = vec!["setup", "finch", "--no-wsl", "--no-start", "--platform", "windows"];
        args.extend(["--key-store", "file"]);
        args.extend_from_slice(extra);
        args.extend(common.iter().map(String::as_str));
        wine.output(&agent, &args)
    };
    let (finch_w, guest_w) = (winpath(&finch), winpath(guest.parent().unwrap()));
    let link = format!("tcp://127.0.0.1:{port}");
    let (code, out, err) =
        setup(&["--finch-dir", &finch_w, "--guest-dir", &guest_w, "--link", &link]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("leads on this host to wincred"), "{out}");
    let wired_yaml = std::fs::read_to_string(finch.join("finch.yaml")).unwrap();
    assert!(wired_yaml.contains("finchhost") && !wired_yaml.contains("ecr-login"), "{wired_yaml}");
    assert!(wired_yaml.contains("memory: 4GiB"), "{wired_yaml}");
    let shared: serde_json::Value =
        serde_json::from_slice(&std::fs::read(finch.join("config.json")).unwrap()).unwrap();
    assert_eq!(shared["credsStore"], "finchhost");
    assert_eq!(
        std::fs::read(finch.join("cred-helpers/docker-credential-finchhost")).unwrap(),
        std::fs::read(guest.join("docker-credential-finchhost")).unwrap()
    );
    let host_text = std::fs::read_to_string(&host_config).unwrap();
    assert!(host_text.contains("host_creds_store = \"wincred\""), "{host_text}");
    // doctor on Windows: ecr-login was in creds_helpers before (the original), not now.
    let (_, report, _) = wine.output(&agent, &{
        let mut a = vec!["doctor", "--docker-config", finch_w.as_str()];
        a.extend(common.iter().map(String::as_str));
        a
    });
    assert!(report.contains("OK   finch creds_helpers"), "{report}");
    // The C: automount: not readable under Wine (no \\wsl.localhost), so said as WSL's default.
    assert!(report.contains("FAIL finch distro mounts: Finch's distro mounts, unless"), "{report}");
    assert!(report.contains("[automount] enabled = false"), "{report}");
    assert!(report.contains("setup finch --harden"), "{report}");
    let attached = std::fs::read_to_string(state.join("attached.toml")).unwrap();
    assert!(attached.contains(&link), "{attached}");
    // Again: nothing changes.
    let (code, out, err) =
        setup(&["--finch-dir", &finch_w, "--guest-dir", &guest_w, "--link", &link]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(std::fs::read_to_string(&host_config).unwrap(), host_text);

    // --harden: the lines for the distro's fstab (--no-wsl: written for install.sh
    // --wsl-mounts), as libmount reads them back: Wine's temporary directory and Lima's
    // instance read-only, the share read-write where Finch sends it (Z: is Wine's /).
    let share = b.path("My Src");
    let lima_home = b.path("lima/data");
    for d in [&share, &lima_home.join("finch")] {
        std::fs::create_dir_all(d).unwrap();
    }
    let (share_w, lima_w) = (winpath(&share), winpath(&lima_home));
    let harden = ["--harden", "--share", &share_w, "--lima-home", &lima_w];
    let (code, out, err) = setup(
        &[&["--finch-dir", &finch_w, "--guest-dir", &guest_w][..], &harden[..], &["--link", &link]]
            .concat(),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("--wsl-mounts"), "{out}");
    let fstab = state.join("finch-setup/wsl-fstab");
    let entries = crate::provision::fstab_entries(&fstab);
    let share_target = format!("/mnt/z{}", share.display());
    assert!(
        entries.contains(&(share_w.clone(), share_target, "rw,noatime".to_owned())),
        "{entries:?}"
    );
    let instance = (
        winpath(&lima_home.join("finch")),
        "/mnt/finch-bridge/lima".to_owned(),
        "ro,noatime".to_owned(),
    );
    assert!(entries.contains(&instance), "{entries:?}");
    let temp =
        entries.iter().find(|e| e.1 == "/mnt/finch-bridge/temp").expect("the temporary directory");
    assert!(temp.0.starts_with("C:\\") && temp.2 == "ro,noatime", "{temp:?}");
    assert_eq!(entries.len(), 3, "{entries:?}");
    // A share that holds the agent's state is refused, and nothing changes.
    let files = || {
        [finch.join("finch.yaml"), finch.join("config.json"), host_config.clone(), fstab.clone()]
            .map(|f| std::fs::read(f).unwrap_or_default())
    };
    let before = files();
    let dir_w = winpath(b.dir.path());
    let (code, out, err) = setup(&[
        "--finch-dir",
        &finch_w,
        "--guest-dir",
        &guest_w,
        "--harden",
        "--share",
        &dir_w,
        "--lima-home",
        &lima_w,
        "--link",
        &link,
    ]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("which holds") && err.contains("nothing was changed"), "{err}");
    assert_eq!(files(), before, "a refused share changed a file");
    // Without --harden again: no mounts to give.
    let (code, out, err) =
        setup(&["--finch-dir", &finch_w, "--guest-dir", &guest_w, "--link", &link]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!fstab.exists(), "{out}");

    // The VM's key, exported for the guest (install.sh would put it in the distro).
    let key = b.path("link.key");
    let mut export = vec!["key-export", "finch", "--out"];
    let key_w = winpath(&key);
    export.push(&key_w);
    export.extend(["--key-store", "file"]);
    export.extend(common.iter().map(String::as_str));
    std::fs::remove_file(&key).unwrap();
    let (code, out, err) = wine.output(&agent, &export);
    assert_eq!(code, 0, "{out}{err}");
    // As install.sh installs it in the distro (Wine shows the DACL it wrote as 0775).
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    b.start_guest();

    let fake = finch_tests::aws::FakeEcr::start(b.dir.path());
    fake.control(r#"{"password": "wine-ecr-token-{n}"}"#);
    let mut run: Vec<&str> = vec!["run", "--docker-config", &finch_w, "--key-store", "file"];
    run.extend(common.iter().map(String::as_str));
    run.extend(["--heartbeat-ms", "500", "--reconnect-max-ms", "500"]);
    let mut cmd = wine.cmd(&agent, &run);
    finch_tests::hermetic_aws(&mut cmd, b.dir.path());
    // Trace: every level of the changed paths is checked for secrets at the end.
    cmd.env("RUST_LOG", "trace")
        .env("AWS_ENDPOINT_URL", fake.url())
        .env("AWS_ACCESS_KEY_ID", "AKIAWINEFAKE")
        .env("AWS_SECRET_ACCESS_KEY", "wine-fake-aws-secret");
    let mut host = Proc::spawn("finch-host-agent.exe", cmd, &b.path("host.log"));
    let up = wait_until(WINE_STARTUP, || b.guest_log().contains("host link up") || host.exited());
    b.host = Some(host);
    assert!(up && b.guest_log().contains("host link up"), "{}\n{}", b.host_log(), b.guest_log());

    // The client's path in the distro: DOCKER_CONFIG is that directory; its credsStore names
    // the helper Finch links from cred-helpers\.
    let item =
        r#"{"ServerURL":"finch.wine.example","Username":"wsl-user","Secret":"wsl-wincred-secret"}"#;
    let r = b.helper("store", item);
    assert_eq!(r.code, 0, "{r:?}\n{}", b.host_log());
    let (code, out, err) = wine.output(&win.join("wincred-check.exe"), &["finch.wine.example"]);
    assert_eq!(code, 0, "not in Wine's Credential Manager: {out}{err}");
    let r = b.helper("get", "finch.wine.example");
    assert!(r.out().contains("\"Username\":\"wsl-user\""), "{r:?}\n{}", b.host_log());
    let ecr = "123456789012.dkr.ecr.us-west-2.amazonaws.com";
    let r = b.helper("get", ecr);
    assert!(r.out().contains("\"Username\":\"AWS\""), "{r:?}\n{}", b.host_log());
    assert!(r.out().contains("wine-ecr-token-"), "{r:?}");
    let log = b.host_log();
    assert!(log.contains("source=\"keychain:wincred\""), "{log}");
    assert!(!log.contains("helper:finchhost"), "a host finchhost ran:\n{log}");
    drop(b.host.take());

    let (code, out, err) = setup(&["--remove", "--finch-dir", &finch_w]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(std::fs::read_to_string(finch.join("finch.yaml")).unwrap(), yaml, "{out}");
    assert_eq!(std::fs::read_to_string(finch.join("config.json")).unwrap(), config, "{out}");
    assert!(!finch.join("cred-helpers/docker-credential-finchhost").exists());
    let host_text = std::fs::read_to_string(&host_config).unwrap_or_default();
    assert!(!host_text.contains("host_creds_store"), "{host_text}");
    let (host_log, guest_log) = (b.host_log(), b.guest_log());
    assert!(host_log.contains("TRACE"), "trace was not in force");
    for secret in ["wsl-wincred-secret", "wine-ecr-token-", "wine-fake-aws-secret"] {
        assert_no_secret(secret, &[("host log", &host_log), ("guest log", &guest_log)]);
    }
}

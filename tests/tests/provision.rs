//! Wiring into VMs and onto the login: the guest install/uninstall scripts on a scratch root
//! (twice for idempotence, then removal back to the exact starting tree), the systemd units
//! checked by `systemd-analyze verify`, the LaunchAgent plist and logon task XML parsed, the
//! Lima fragment parsed as Lima reads it, and `attach`/`detach` against a running bridge.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use finch_tests::{Bridge, bin, run_ok, wait_until, write_key};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// Every path under `root` with its type, mode and content (JSON files compared parsed).
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let p = entry.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let what = if m.file_type().is_symlink() {
                format!("link -> {}", std::fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                walk(root, &p, out);
                format!("dir {:o}", m.mode() & 0o7777)
            } else {
                let bytes = std::fs::read(&p).unwrap();
                let content = match serde_json::from_slice::<serde_json::Value>(&bytes) {
                    Ok(v) if rel.ends_with(".json") => v.to_string(),
                    _ => format!("{:x?}", sha(&bytes)),
                };
                format!("file {:o} {content}", m.mode() & 0o7777)
            };
            out.insert(rel, what);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn sha(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

pub(crate) struct Scratch {
    _dir: tempfile::TempDir,
    pub(crate) root: PathBuf,
    bundle: PathBuf,
    key: Vec<u8>,
}

pub(crate) fn scratch() -> Scratch {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let bundle = dir.path().join("bundle");
    for d in [root.join("etc"), root.join("home/user/.finch-vm-config"), bundle.clone()] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0::/root:/bin/sh\nuser:x:501:20::/home/user:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/wsl.conf"), "[network]\ngenerateResolvConf = true\n").unwrap();
    std::fs::write(
        root.join("home/user/.finch-vm-config/config.json"),
        r#"{"auths":{"x.test":{}},"credsStore":"desktop"}"#,
    )
    .unwrap();
    for b in ["finch-guest-agent", "docker-credential-finchhost"] {
        std::fs::copy(bin(b), bundle.join(b)).unwrap();
    }
    write_key(&bundle.join("link.key"), 23);
    let key = std::fs::read(bundle.join("link.key")).unwrap();
    run_ok(
        Command::new("sh")
            .arg("-c")
            .arg("sha256sum finch-guest-agent docker-credential-finchhost > SHA256SUMS")
            .current_dir(&bundle),
        "sha256sum",
    );
    Scratch { _dir: dir, root, bundle, key }
}

pub(crate) fn install(s: &Scratch, init: &str) -> std::process::Output {
    install_with(s, init, &[])
}

/// `install.sh` on the scratch root, with `extra` arguments after the usual ones.
fn install_with(s: &Scratch, init: &str, extra: &[&str]) -> std::process::Output {
    Command::new("sh")
        .arg(repo().join("lima/guest/install.sh"))
        .arg("--root")
        .arg(&s.root)
        .arg("--bundle")
        .arg(&s.bundle)
        .args(["--init", init, "--allow-uid", "501", "--link-allow-uid", "501"])
        .args(["--finch-creds-uid", "501"])
        .args([
            "--docker-config",
            "/home/user/.finch-vm-config",
            "--docker-config",
            "/root/.docker",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The unit allows exactly the address families its link needs (a `tcp://` link could not
/// bind under `AF_UNIX AF_VSOCK`); `--init wsl` on a distro with `[boot] systemd=true`
/// (Finch's) installs the unit and leaves wsl.conf alone; a `[boot]` that already runs
/// something else is a failure, not "installed"; a key the agent would refuse changes nothing.
#[test]
fn install_fits_the_unit_to_the_link_and_to_wsls_systemd() {
    let unit = |s: &Scratch| {
        std::fs::read_to_string(s.root.join("etc/systemd/system/finch-guest-agent.service"))
            .unwrap_or_default()
    };
    let families = |s: &Scratch| {
        unit(s).lines().find_map(|l| l.strip_prefix("RestrictAddressFamilies=")).map(str::to_owned)
    };
    for (link, want) in [
        ("tcp://0.0.0.0:6127", "AF_UNIX AF_INET AF_INET6"),
        ("vsock://-1:6127", "AF_UNIX AF_VSOCK"),
        ("unix:///run/finch-guest-agent/link.sock", "AF_UNIX"),
    ] {
        let s = scratch();
        let out = install_with(&s, "systemd", &["--link-listen", link]);
        assert!(out.status.success(), "{link}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(families(&s).as_deref(), Some(want), "{link}");
        // The registry front's certificates (in the runtime directory) outlive a restart.
        assert!(unit(&s).contains("\nRuntimeDirectoryPreserve=yes\n"), "{}", unit(&s));
    }

    let s = scratch();
    let wsl = "[boot]\nsystemd=true\n";
    std::fs::write(s.root.join("etc/wsl.conf"), wsl).unwrap();
    let out = install_with(&s, "wsl", &["--link-listen", "tcp://127.0.0.1:6127"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("init: systemd, WSL's"), "{said}");
    assert_eq!(families(&s).as_deref(), Some("AF_UNIX AF_INET AF_INET6"));
    let wants = s.root.join("etc/systemd/system/multi-user.target.wants/finch-guest-agent.service");
    assert!(std::fs::symlink_metadata(wants).is_ok(), "not enabled");
    assert_eq!(std::fs::read_to_string(s.root.join("etc/wsl.conf")).unwrap(), wsl);

    let s = scratch();
    std::fs::write(s.root.join("etc/wsl.conf"), "[boot]\ncommand = /bin/true\n").unwrap();
    let out = install_with(&s, "wsl", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("nothing starts the agent at boot"), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("installed ("));

    let s = scratch();
    std::fs::write(s.bundle.join("link.key"), [7u8; 16]).unwrap();
    let before = snapshot(&s.root);
    let out = install(&s, "systemd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("link.key is 16 bytes") && err.contains("nothing installed"), "{err}");
    assert_eq!(snapshot(&s.root), before, "a short key changed the root");
}

/// `findmnt`'s reading of an fstab (util-linux's libmount, which WSL's `mount -a` runs
/// through): each entry's source, target and options, escapes undone.
pub(crate) fn fstab_entries(fstab: &Path) -> Vec<(String, String, String)> {
    let out = Command::new("findmnt")
        .args(["--fstab", "--json", "-o", "SOURCE,TARGET,FSTYPE,OPTIONS", "-F"])
        .arg(fstab)
        .output()
        .expect("findmnt (util-linux) runs");
    assert!(out.status.success(), "findmnt: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["filesystems"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["fstype"] == "drvfs")
        .map(|f| {
            let s = |k: &str| f[k].as_str().unwrap_or_default().to_owned();
            (s("source"), s("target"), s("options"))
        })
        .collect()
}

/// `--wsl-mounts` (what `setup finch --harden` sends on Windows): WSL's automount goes off in
/// a marked block of wsl.conf, the given drvfs mounts go into a marked block of fstab (the
/// mount points made, a name with a space included), a second run changes nothing, a run
/// without the flag and uninstall.sh each put both files back byte for byte; an
/// `[automount]` of the distro's own, or a line that is not a drvfs mount under /mnt, changes
/// nothing.
#[test]
fn wsl_mounts_turn_the_automount_off_and_come_out_again() {
    let s = scratch();
    let (conf, fstab) = (s.root.join("etc/wsl.conf"), s.root.join("etc/fstab"));
    let conf_text = "[boot]\nsystemd=true\n";
    let fstab_text = "# <file system> <mount point> <type>\nLABEL=root / ext4 defaults 0 1\n";
    std::fs::write(&conf, conf_text).unwrap();
    std::fs::write(&fstab, fstab_text).unwrap();
    let mounts = s.bundle.join("wsl-fstab");
    std::fs::write(
        &mounts,
        "# written by setup finch --harden\n\
         C:\\134Users\\134me\\134AppData\\134Local\\134Temp /mnt/finch-bridge/temp drvfs ro,noatime 0 0\n\
         C:\\134Users\\134me\\134My\\040Src /mnt/c/Users/me/My\\040Src drvfs rw,noatime 0 0\n",
    )
    .unwrap();
    // Finch's lines in the VM user's ~/.bashrc, as updateEnvironment writes them for wsl2
    // with creds_helpers [finchhost] (each added unless the file already contains it).
    let finch_lines = [
        r#"FINCH_DIR="$(/usr/bin/wslpath 'C:\Users\me\AppData\Local\.finch')""#,
        r#"AWS_DIR="$(/usr/bin/wslpath 'C:\Users\me/.aws')""#,
        r#"export DOCKER_CONFIG="$FINCH_DIR""#,
        r#"[ -L /root/.aws ] || sudo ln -fsn "$AWS_DIR" /root/.aws"#,
        "([ -e \"$FINCH_DIR\"/cred-helpers/docker-credential-finchhost ] || \\\n\t\t\t(echo \"error: docker-credential-finchhost not found in $FINCH_DIR/cred-helpers directory.\")) && \\\n\t\t\t([ -L /usr/local/bin/docker-credential-finchhost ] || sudo ln -s \"$FINCH_DIR\"/cred-helpers/docker-credential-finchhost /usr/local/bin)",
        "[ -L /home/user.linux/.finch ] || ln -s $FINCH_DIR /home/user.linux/.finch",
    ];
    let bashrc = s.root.join("home/user/.bashrc");
    let bashrc_text = format!("# ~/.bashrc\nalias ll='ls -l'\n{}", finch_lines.join("\n"));
    std::fs::write(&bashrc, &bashrc_text).unwrap();
    std::fs::set_permissions(&bashrc, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&bashrc, Some(501), Some(20)).unwrap();
    let mounts_arg = mounts.to_str().unwrap();
    let with = ["--link-listen", "tcp://127.0.0.1:6127", "--wsl-mounts", mounts_arg];
    let out = install_with(&s, "wsl", &with);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let wsl = std::fs::read_to_string(&conf).unwrap();
    assert!(wsl.starts_with(conf_text), "{wsl}");
    assert!(wsl.contains("[automount]\nenabled = false\nmountFsTab = true\n"), "{wsl}");
    let tab = std::fs::read_to_string(&fstab).unwrap();
    assert!(tab.starts_with(fstab_text), "{tab}");
    assert_eq!(
        fstab_entries(&fstab),
        [
            (
                r"C:\Users\me\AppData\Local\Temp".to_owned(),
                "/mnt/finch-bridge/temp".to_owned(),
                "ro,noatime".to_owned()
            ),
            (
                r"C:\Users\me\My Src".to_owned(),
                "/mnt/c/Users/me/My Src".to_owned(),
                "rw,noatime".to_owned()
            ),
        ]
    );
    assert!(s.root.join("mnt/c/Users/me/My Src").is_dir());
    assert!(s.root.join("mnt/finch-bridge/temp").is_dir());
    // Finch's lines are still in the file verbatim (so Finch adds none again), and none runs.
    let rc = std::fs::read_to_string(&bashrc).unwrap();
    for line in finch_lines {
        assert!(rc.contains(line), "Finch would add again: {line}\n{rc}");
    }
    let meta = std::fs::metadata(&bashrc).unwrap();
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o777), (501, 20, 0o600));
    let stubs = s.root.join("../stubs");
    std::fs::create_dir_all(&stubs).unwrap();
    std::fs::write(
        stubs.join("sudo"),
        "#!/bin/sh\necho ran >> \"$(dirname \"$0\")/sudo.ran\"; exit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(stubs.join("sudo"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .args([
            "--norc",
            "-c",
            r#". "$1"; echo "[${DOCKER_CONFIG-unset}][${FINCH_DIR-unset}]""#,
            "-",
        ])
        .arg(&bashrc)
        .env("PATH", format!("{}:/usr/bin:/bin", stubs.display()))
        .current_dir(cwd.path())
        .output()
        .unwrap();
    let (said, err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!((said.trim(), err.trim()), ("[unset][unset]", ""), "{rc}");
    assert!(!stubs.join("sudo.ran").exists(), "a line of Finch ran sudo");
    assert_eq!(std::fs::read_dir(cwd.path()).unwrap().count(), 0, "a line of Finch made a link");
    let first = snapshot(&s.root);
    assert!(install_with(&s, "wsl", &with).status.success());
    assert_eq!(snapshot(&s.root), first, "the second run changed something");

    // Without the flag: both files as they were.
    let out = install_with(&s, "wsl", &["--link-listen", "tcp://127.0.0.1:6127"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), conf_text);
    assert_eq!(std::fs::read_to_string(&fstab).unwrap(), fstab_text);
    assert_eq!(std::fs::read_to_string(&bashrc).unwrap(), bashrc_text);

    assert!(install_with(&s, "wsl", &with).status.success());
    uninstall(&s);
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), conf_text);
    assert_eq!(std::fs::read_to_string(&fstab).unwrap(), fstab_text);
    assert_eq!(std::fs::read_to_string(&bashrc).unwrap(), bashrc_text);
    let meta = std::fs::metadata(&bashrc).unwrap();
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o777), (501, 20, 0o600));
    assert!(!s.root.join("mnt").exists(), "the mount points stayed");

    // A distro with an [automount] of its own, and a line that is not a drvfs mount.
    let s = scratch();
    std::fs::write(s.root.join("etc/wsl.conf"), "[automount]\nroot = /win/\n").unwrap();
    std::fs::copy(&mounts, s.bundle.join("wsl-fstab")).unwrap();
    let before = snapshot(&s.root);
    let arg = s.bundle.join("wsl-fstab");
    let out = install_with(&s, "wsl", &["--wsl-mounts", arg.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("already has an [automount] section"), "{err}");
    assert_eq!(snapshot(&s.root), before);
    std::fs::write(s.root.join("etc/wsl.conf"), conf_text).unwrap();
    for bad in [
        "C: / drvfs rw 0 0\n",
        "/dev/sda1 /mnt/x ext4 rw 0 0\n",
        "C: /mnt/c/../../etc drvfs rw 0 0\n",
    ] {
        std::fs::write(&arg, bad).unwrap();
        let before = snapshot(&s.root);
        let out = install_with(&s, "wsl", &["--wsl-mounts", arg.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{bad}: {err}");
        assert!(err.contains("is not a drvfs mount under /mnt/"), "{err}");
        assert_eq!(snapshot(&s.root), before, "{bad}");
    }
}

fn uninstall(s: &Scratch) {
    let out = Command::new("sh")
        .arg(repo().join("lima/guest/uninstall.sh"))
        .arg("--root")
        .arg(&s.root)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn guest_install_is_idempotent_and_uninstall_restores_the_tree() {
    for init in ["systemd", "wsl", "none"] {
        let s = scratch();
        let before = snapshot(&s.root);
        let out = install(&s, init);
        assert!(out.status.success(), "{init}: {}", String::from_utf8_lossy(&out.stderr));
        let first = snapshot(&s.root);
        assert!(install(&s, init).status.success());
        assert_eq!(snapshot(&s.root), first, "{init}: the second install changed something");

        let r = &s.root;
        assert_eq!(mode(&r.join("etc/finch-guest-agent")), 0o700);
        assert_eq!(mode(&r.join("etc/finch-guest-agent/link.key")), 0o600);
        assert_eq!(std::fs::read(r.join("etc/finch-guest-agent/link.key")).unwrap(), s.key);
        assert_eq!(mode(&r.join("usr/local/bin/finch-guest-agent")), 0o755);
        // A link, so Finch's `[ -L /usr/local/bin/docker-credential-finchhost ] || sudo ln -s`
        // (Windows, at every shell) leaves it alone instead of failing on a plain file.
        let helper = r.join("usr/local/bin/docker-credential-finchhost");
        assert!(std::fs::symlink_metadata(&helper).unwrap().file_type().is_symlink(), "{init}");
        assert_eq!(
            std::fs::read(&helper).unwrap(),
            std::fs::read(bin("docker-credential-finchhost")).unwrap()
        );
        let config: serde_json::Value = serde_json::from_slice(
            &std::fs::read(r.join("home/user/.finch-vm-config/config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(config["credsStore"], "finchhost");
        assert!(config["auths"]["x.test"].is_object(), "other keys were lost");
        let root_config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(r.join("root/.docker/config.json")).unwrap())
                .unwrap();
        assert_eq!(root_config, serde_json::json!({"credsStore": "finchhost"}));
        let defaults = std::fs::read_to_string(r.join("etc/default/finch-guest-agent")).unwrap();
        assert!(
            defaults.contains("--allow-uid 501") && defaults.contains("--socket-group 20"),
            "{defaults}"
        );
        assert!(
            defaults.contains("--finch-creds-socket /run/user/501/finch-creds.sock"),
            "{defaults}"
        );
        let registries = std::fs::read_to_string(
            r.join("etc/containers/registries.conf.d/50-finch-credential-helpers.conf"),
        )
        .unwrap();
        assert!(
            registries.contains(r#"credential-helpers = ["finchhost"]"#),
            "containers-image tools must not fall back to a file in the VM: {registries}"
        );
        match init {
            "systemd" => {
                assert!(defaults.contains("--link-listen unix:///run/finch-guest-agent/link.sock"));
                let wants =
                    r.join("etc/systemd/system/multi-user.target.wants/finch-guest-agent.service");
                assert_eq!(
                    std::fs::read_link(wants).unwrap(),
                    Path::new("/etc/systemd/system/finch-guest-agent.service")
                );
                let soci = std::fs::read_to_string(r.join(
                    "etc/systemd/system/soci-snapshotter.service.d/zz-finch-credential-bridge.conf",
                ))
                .unwrap();
                assert!(soci.contains("Environment=DOCKER_CONFIG=/home/user/.finch-vm-config"));
                let sshd = std::fs::read_to_string(
                    r.join("etc/ssh/sshd_config.d/00-finch-credential-bridge.conf"),
                )
                .unwrap();
                assert!(sshd.contains("\nAllowStreamLocalForwarding local\n"), "{sshd}");
                let dropin = std::fs::read_to_string(
                    r.join("etc/systemd/system/finch-guest-agent.service.d/finch-creds.conf"),
                )
                .unwrap();
                assert!(
                    dropin.contains(
                        "ProtectSystem=full\nProtectHome=no\nInaccessiblePaths=-/home -/root\n"
                    ),
                    "{dropin}"
                );
            }
            "wsl" => {
                assert!(defaults.contains("--link-listen vsock://-1:6127"));
                let wsl = std::fs::read_to_string(r.join("etc/wsl.conf")).unwrap();
                assert!(
                    wsl.starts_with("[network]")
                        && wsl.contains(
                            "[boot]\ncommand = \"/usr/local/libexec/finch-guest-agent-start\""
                        ),
                    "{wsl}"
                );
            }
            _ => assert!(!r.join("etc/systemd/system/finch-guest-agent.service").exists()),
        }
        // The key's bytes are in the key file only.
        for (path, what) in &first {
            if what.starts_with("file") && !path.ends_with("link.key") {
                let bytes = std::fs::read(r.join(path)).unwrap();
                assert!(
                    !bytes.windows(s.key.len()).any(|w| w == s.key.as_slice()),
                    "{path} holds the key"
                );
            }
        }

        uninstall(&s);
        assert_eq!(snapshot(&s.root), before, "{init}: uninstall did not restore the tree");
        uninstall(&s);
        assert_eq!(snapshot(&s.root), before, "{init}: a second uninstall changed something");
    }
}

#[test]
fn a_tampered_bundle_changes_nothing() {
    let s = scratch();
    let before = snapshot(&s.root);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(s.bundle.join("docker-credential-finchhost"))
        .unwrap();
    std::io::Write::write_all(&mut f, b"tampered").unwrap();
    let out = install(&s, "systemd");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("checksums do not match"));
    assert_eq!(snapshot(&s.root), before);
}

#[test]
fn units_verify_and_login_services_parse() {
    if !finch_tests::require(
        "units_verify_and_login_services_parse",
        &["systemd-analyze", "python3"],
    ) {
        return;
    }
    // The guest unit, with its paths pointed into the scratch root.
    let s = scratch();
    assert!(install(&s, "systemd").status.success());
    let unit = std::fs::read_to_string(s.root.join("etc/systemd/system/finch-guest-agent.service"))
        .unwrap();
    let root = s.root.display().to_string();
    let unit = unit
        .replace("/usr/local/bin/", &format!("{root}/usr/local/bin/"))
        .replace("/etc/default/", &format!("{root}/etc/default/"));
    let check = s.root.join("finch-guest-agent.service");
    std::fs::write(&check, unit).unwrap();
    run_ok(
        Command::new("systemd-analyze").arg("verify").arg(&check),
        "systemd-analyze verify (guest unit)",
    );

    // The host's login services, generated by the binary.
    let home = tempfile::tempdir().unwrap();
    let runtime = home.path().join("run");
    std::fs::create_dir(&runtime).unwrap();
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
    let print = |platform: &str| {
        let out = Command::new(bin("finch-host-agent"))
            .args(["install", "--print", "--platform", platform])
            .env("HOME", home.path())
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let user_unit = home.path().join("finch-host-agent.service");
    std::fs::write(&user_unit, print("linux")).unwrap();
    run_ok(
        Command::new("systemd-analyze")
            .args(["verify", "--user"])
            .arg(&user_unit)
            .env("XDG_RUNTIME_DIR", &runtime),
        "systemd-analyze verify --user (host unit)",
    );
    let agent = bin("finch-host-agent").canonicalize().unwrap().display().to_string();
    let check_py = |script: &str, input: String| {
        let mut c = Command::new("python3");
        c.args(["-c", script]).arg(&agent).arg(home.path());
        let r = finch_tests::run_with_input(c, input.as_bytes(), Duration::from_secs(30));
        assert_eq!(r.code, 0, "{script}: {}", r.stderr);
    };
    check_py(
        "import plistlib,sys; d=plistlib.loads(sys.stdin.buffer.read()); \
         assert d['Label']=='io.finch.credential-bridge.host-agent'; assert d['ProgramArguments'][:2]==[sys.argv[1],'run']; \
         assert d['RunAtLoad'] is True; assert d['StandardErrorPath']==sys.argv[2]+'/Library/Logs/finch-host-agent.log'",
        print("macos"),
    );
    check_py(
        "import sys,xml.dom.minidom as m; d=m.parseString(sys.stdin.buffer.read()); \
         assert d.getElementsByTagName('Command')[0].firstChild.data==sys.argv[1]; \
         assert d.getElementsByTagName('Arguments')[0].firstChild.data=='run'; \
         assert d.getElementsByTagName('LogonTrigger')",
        print("windows"),
    );

    // install --no-start writes exactly what --print shows; uninstall --no-stop removes it.
    let out = Command::new(bin("finch-host-agent"))
        .args(["install", "--no-start", "--platform", "linux"])
        .env("HOME", home.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let installed = home.path().join(".config/systemd/user/finch-host-agent.service");
    assert_eq!(std::fs::read_to_string(&installed).unwrap(), print("linux"));
    let out = Command::new(bin("finch-host-agent"))
        .args(["uninstall", "--no-stop", "--platform", "linux"])
        .env("HOME", home.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!installed.exists());
}

#[test]
fn the_lima_fragment_is_what_lima_reads() {
    if !finch_tests::require("the_lima_fragment_is_what_lima_reads", &["python3", "shellcheck"]) {
        return;
    }
    let yaml = repo().join("lima/finch-credential-bridge.yaml");
    let dir = tempfile::tempdir().unwrap();
    let script = "import sys,yaml,json; d=yaml.safe_load(open(sys.argv[1])); \
        m=d['mounts'][0]; assert m['location'].endswith('/finch-bridge') and m['mountPoint']=='/mnt/finch-bridge' and m['writable'] is False; \
        p=d['provision'][0]; assert p['mode']=='system'; \
        f=d['portForwards'][0]; assert f['guestSocket']=='/run/finch-guest-agent/link.sock' and f['hostSocket'].endswith('/sock/finch-guest-agent.sock'); \
        r=d['probes'][0]; assert r['mode']=='readiness'; \
        subst=lambda s: s.replace('{{.UID}}','501').replace('{{.Home}}','/home/user.linux'); \
        open(sys.argv[2]+'/provision.sh','w').write(subst(p['script'])); open(sys.argv[2]+'/probe.sh','w').write(subst(r['script']))";
    run_ok(
        Command::new("python3").args(["-c", script]).arg(&yaml).arg(dir.path()),
        "parsing the Lima fragment",
    );
    let provision = std::fs::read_to_string(dir.path().join("provision.sh")).unwrap();
    // The key comes from the read-only bundle mount, never from the template's text.
    assert!(
        provision.contains("bundle=/mnt/finch-bridge")
            && provision.contains("--bundle \"$bundle\""),
        "{provision}"
    );
    assert!(!std::fs::read_to_string(&yaml).unwrap().to_lowercase().contains("link.key"));
    run_ok(
        Command::new("shellcheck")
            .args(["-s", "sh"])
            .arg(dir.path().join("provision.sh"))
            .arg(dir.path().join("probe.sh")),
        "shellcheck on the fragment's scripts",
    );
}

#[test]
fn attach_and_detach_a_vm_on_a_running_agent() {
    let mut b = Bridge::new(r#"{"auths":{"a.test":{"auth":"dTpw"}}}"#);
    b.start();
    let (code, key, err) = b.host_cli(&["key-path", "second"]);
    assert_eq!(code, 0, "{err}");
    let key = PathBuf::from(key.trim());
    assert_eq!(mode(&key), 0o600);
    assert!(key.starts_with(b.state_dir()));
    // A second guest agent, keyed by that file.
    let (helper2, link2) = (b.path("helper2.sock"), b.path("link2.sock"));
    let mut cmd = Command::new(bin("finch-guest-agent"));
    cmd.arg("serve")
        .arg("--helper-socket")
        .arg(&helper2)
        .arg("--link-listen")
        .arg(format!("unix://{}", link2.display()))
        .arg("--link-key-file")
        .arg(&key)
        .env("RUST_LOG", "info");
    let guest2 = finch_tests::Proc::spawn("guest2", cmd, &b.path("guest2.log"));
    assert!(wait_until(finch_tests::STARTUP, || link2.exists()));

    let endpoint = format!("unix://{}", link2.display());
    let (code, out, err) = b.host_cli(&["attach", "second", &endpoint]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("attached second: config reloaded: 1 links kept, 1 started, 0 stopped"),
        "{out}"
    );
    assert!(
        wait_until(finch_tests::STARTUP, || guest2.output().contains("host link up")),
        "{}",
        b.host_log()
    );
    let mut get = Command::new(bin("docker-credential-finchhost"));
    get.arg("get").env("FINCH_GUEST_AGENT_SOCKET", &helper2);
    let r = finch_tests::run_with_input(get, b"a.test", Duration::from_secs(30));
    assert_eq!(r.code, 0, "the attached VM was not served: {}", r.stderr);
    let (_, status, _) = b.host_cli(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["vms"]["second"]["up"], true, "{status}");

    let (_, out, _) = b.host_cli(&["attach", "second", &endpoint]);
    assert!(
        out.contains("2 links kept, 0 started, 0 stopped"),
        "attaching again changed something: {out}"
    );
    let (code, out, _) = b.host_cli(&["detach", "second"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("detached second: config reloaded: 1 links kept, 0 started, 1 stopped"),
        "{out}"
    );
    // The first VM's link was never dropped.
    assert_eq!(b.guest_log().matches("host link up").count(), 1);
    assert_eq!(b.helper("get", "a.test").code, 0);
    let attached = std::fs::read_to_string(b.state_dir().join("attached.toml")).unwrap();
    assert!(!attached.contains("second"), "{attached}");
}

/// `finch-host-agent` with one config, state directory and home, as a user runs it.
struct HostCli {
    config: PathBuf,
    state: PathBuf,
    home: PathBuf,
}

impl HostCli {
    fn new(t: &Path, home: &Path) -> HostCli {
        HostCli {
            config: t.join("host-agent.toml"),
            state: t.join("state"),
            home: home.to_path_buf(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("finch-host-agent"));
        c.args(args)
            .arg("--config")
            .arg(&self.config)
            .arg("--state-dir")
            .arg(&self.state)
            .env("HOME", &self.home)
            .env_remove("LIMA_HOME");
        c
    }

    /// Runs it: whether it succeeded, and stdout then stderr.
    fn run(&self, args: &[&str]) -> (bool, String) {
        let out = self.command(args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    /// `setup finch` for the Lima home `lima` and guest binaries in `guest`, with `extra`.
    fn setup_finch(&self, lima: &Path, guest: &Path, extra: &[&str]) -> (bool, String) {
        let mut args = vec!["setup", "finch", "--no-start", "--platform", "linux"];
        args.extend_from_slice(extra);
        args.extend([
            "--lima-home",
            lima.to_str().unwrap(),
            "--guest-dir",
            guest.to_str().unwrap(),
        ]);
        self.run(&args)
    }

    /// The agent, running, logging at info to `log`.
    fn agent(&self, log: &Path) -> finch_tests::Proc {
        let mut run = self.command(&["run"]);
        run.env("RUST_LOG", "info");
        finch_tests::Proc::spawn("host", run, log)
    }
}

/// `setup finch` on a LIMA_HOME laid out as Lima lays it out: the fragment goes into
/// `_config/default.yaml` (once), the `[lima]` table into the config; the running agent fills
/// the instance's bundle (checksummed, the VM's key 0600), dials the forwarded socket by
/// itself, and stops when the instance is deleted; `doctor` fails on Finch's `~` mount;
/// `--remove` takes it all out.
#[test]
fn setup_finch_wires_a_lima_home_by_itself() {
    let t = tempfile::tempdir().unwrap();
    let (home, lima, guest) =
        (t.path().join("home"), t.path().join("lima"), t.path().join("guest"));
    let inst = lima.join("finch");
    // The guest binaries as a release archive unpacks (scripts/dist).
    let unpacked = guest.join("finch-bridge-guest-0.1.0-linux-x86_64");
    for d in [&home.join(".aws"), &inst, &lima.join("_config"), &unpacked] {
        std::fs::create_dir_all(d).unwrap();
    }
    // As Finch writes them: the instance from its template (home mounted writable), the
    // override at every start.
    // Finch's release builds also mount finch-cred (the credserver the host runs) writable.
    let finch_cred = t.path().join("finch/finch-cred");
    std::fs::create_dir_all(&finch_cred).unwrap();
    std::fs::write(finch_cred.join("credserver"), "#!/bin/sh\n").unwrap();
    std::fs::write(
        inst.join("lima.yaml"),
        format!(
            "arch: x86_64\nmounts:\n- location: \"~\"\n  writable: true\n- location: {}\n  writable: true\n",
            finch_cred.display()
        ),
    )
    .unwrap();
    std::fs::write(lima.join("_config/override.yaml"), "cpus: 2\n").unwrap();
    for b in ["finch-guest-agent", "docker-credential-finchhost"] {
        std::fs::copy(bin(b), unpacked.join(b)).unwrap();
    }
    let cli = HostCli::new(t.path(), &home);
    let (config, state) = (cli.config.clone(), cli.state.clone());
    let host = |args: &[&str]| cli.run(args);
    let setup = |extra: &[&str]| cli.setup_finch(&lima, &guest, extra);
    std::fs::write(&config, "").unwrap();
    // Without the guest binaries of this machine's architecture (a Finch VM's), setup fails
    // and writes nothing: a VM must never boot silently without the bridge.
    let no_guest = t.path().join("no-guest");
    std::fs::create_dir(&no_guest).unwrap();
    let (ok, out) = host(&[
        "setup",
        "finch",
        "--no-start",
        "--platform",
        "linux",
        "--lima-home",
        lima.to_str().unwrap(),
        "--guest-dir",
        no_guest.to_str().unwrap(),
    ]);
    assert!(!ok && out.contains("has no guest binaries for x86_64 VMs"), "{out}");
    assert!(!lima.join("_config/default.yaml").exists(), "{out}");
    assert_eq!(std::fs::read_to_string(&config).unwrap(), "", "{out}");
    let (ok, out) = setup(&[]);
    assert!(ok, "{out}");
    assert!(out.contains("merged the fragment into"), "{out}");
    let default_yaml = lima.join("_config/default.yaml");
    let merged = std::fs::read_to_string(&default_yaml).unwrap();
    assert!(merged.contains("/mnt/finch-bridge") && merged.contains("guestSocket"), "{merged}");
    let (ok, out) = setup(&[]);
    assert!(ok && out.contains("the fragment is already in"), "{out}");
    assert_eq!(
        std::fs::read_to_string(&default_yaml).unwrap(),
        merged,
        "a second setup changed it"
    );
    assert!(home.join(".config/systemd/user/finch-host-agent.service").exists());

    let (ok, report) = host(&["doctor"]);
    assert!(!ok, "{report}");
    assert!(report.contains("FAIL vm finch mounts") && report.contains(".aws"), "{report}");
    assert!(report.contains("holds the credserver the host runs"), "{report}");
    // The AWS variables finch would pass into the VM, named; none set, none named.
    let doctor_with = |env: &[(&str, &str)]| {
        let out = Command::new(bin("finch-host-agent"))
            .args(["doctor", "--config"])
            .arg(&config)
            .arg("--state-dir")
            .arg(&state)
            .env("HOME", &home)
            .env_remove("LIMA_HOME")
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let report = doctor_with(&[("AWS_PROFILE", "prod"), ("AWS_SESSION_TOKEN", "tok-not-printed")]);
    assert!(report.contains("FAIL finch env: AWS_SESSION_TOKEN, AWS_PROFILE set here"), "{report}");
    assert!(!report.contains("tok-not-printed"), "a value was printed");
    assert!(doctor_with(&[]).contains("OK   finch env"), "{}", doctor_with(&[]));

    // The agent fills the bundle and dials the instance's forwarded socket.
    let agent = cli.agent(&t.path().join("host.log"));
    let bundle = inst.join("finch-bridge");
    assert!(
        wait_until(finch_tests::STARTUP, || bundle.join("SHA256SUMS").exists()),
        "{}",
        agent.output()
    );
    run_ok(
        Command::new("sha256sum").args(["-c", "--quiet", "SHA256SUMS"]).current_dir(&bundle),
        "the bundle's checksums",
    );
    assert_eq!(mode(&bundle.join("link.key")), 0o600);
    assert_eq!(
        std::fs::read(bundle.join("link.key")).unwrap(),
        std::fs::read(state.join("vms/finch.key")).unwrap()
    );
    std::fs::create_dir_all(inst.join("sock")).unwrap();
    let helper = t.path().join("helper.sock");
    let mut guest_cmd = Command::new(bundle.join("finch-guest-agent"));
    guest_cmd
        .arg("serve")
        .arg("--helper-socket")
        .arg(&helper)
        .arg("--link-listen")
        .arg(format!("unix://{}", inst.join("sock/finch-guest-agent.sock").display()))
        .arg("--link-key-file")
        .arg(bundle.join("link.key"))
        .env("RUST_LOG", "info");
    let guest_agent = finch_tests::Proc::spawn("guest", guest_cmd, &t.path().join("guest.log"));
    assert!(
        wait_until(Duration::from_secs(30), || guest_agent.output().contains("host link up")),
        "the agent did not dial the instance by itself:\n{}\n{}",
        agent.output(),
        guest_agent.output()
    );
    // Deleting the instance detaches it.
    std::fs::remove_dir_all(&inst).unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || agent.output().contains("Lima instances changed")),
        "{}",
        agent.output()
    );
    drop(guest_agent);
    drop(agent);

    // `detach` of a VM that `attach` did not add is an error, not "detached".
    let (ok, out) = host(&["detach", "finch"]);
    assert!(!ok && out.contains("not attached"), "{out}");

    let (ok, out) = setup(&["--remove"]);
    assert!(ok && out.contains("took the fragment out of"), "{out}");
    // Both files held only what setup wrote (the config was empty, default.yaml did not
    // exist): both are gone, as before setup.
    assert!(!config.exists() && !default_yaml.exists(), "{out}");
    assert!(!home.join(".config/systemd/user/finch-host-agent.service").exists());
}

/// Finch's install as its macOS package lays it out (`Finch/os/finch.yaml`,
/// `Finch/lima/data`): `setup finch` finds the template and wires it, never `default.yaml`;
/// an instance Lima makes from it is wired as made; an upgrade (the installer replaces the
/// template and deletes `_config/` and the instance) is wired again by the running agent, and
/// an instance made from the unwired template before that is wired too, with the VM said to
/// run without it until restarted. `--harden` takes out the home mount; `--remove` restores
/// the template byte for byte.
#[test]
fn setup_finch_wires_finchs_template_and_the_agent_rewires_it_after_an_upgrade() {
    let t = tempfile::tempdir().unwrap();
    let (home, finch, guest) =
        (t.path().join("home"), t.path().join("Finch"), t.path().join("guest/linux-x86_64"));
    let lima = finch.join("lima/data");
    let inst = lima.join("finch");
    let template = finch.join("os/finch.yaml");
    for d in [&home.join("src"), &lima.join("_config"), &finch.join("os"), &guest] {
        std::fs::create_dir_all(d).unwrap();
    }
    for b in ["finch-guest-agent", "docker-credential-finchhost"] {
        std::fs::copy(bin(b), guest.join(b)).unwrap();
    }
    let stock = "# Finch 1.18's template\nvmType: vz\nmounts:\n  - location: \"~\"\n    writable: true\n  - location: /tmp/lima\n    writable: true\n";
    std::fs::write(&template, stock).unwrap();
    let cli = HostCli::new(t.path(), &home);
    let config = cli.config.clone();
    let host = |args: &[&str]| cli.run(args);
    let setup = |extra: &[&str]| cli.setup_finch(&lima, guest.parent().unwrap(), extra);
    let wired = |path: &Path| {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        text.contains("/mnt/finch-bridge") && text.contains("finch-credential-bridge:")
    };
    // `vm init`: default.yaml rewritten, the instance made from the template (with Lima's --set).
    let vm_init = || {
        std::fs::write(lima.join("_config/default.yaml"), "vmOpts: {}\n").unwrap();
        std::fs::create_dir_all(&inst).unwrap();
        let mut text = std::fs::read_to_string(&template).unwrap();
        text.push_str("ssh:\n  overVsock: false\n");
        std::fs::write(inst.join("lima.yaml"), text).unwrap();
    };

    let (ok, out) = setup(&[]);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("wired {}", template.display())), "{out}");
    assert!(wired(&template) && !wired(&lima.join("_config/default.yaml")), "{out}");
    let orig = finch.join("os/finch.yaml.finch-bridge-orig");
    assert_eq!(std::fs::read_to_string(&orig).unwrap(), stock);
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains(&format!("template = \"{}\"", template.display())), "{text}");
    vm_init();
    assert!(wired(&inst.join("lima.yaml")));

    // The agent runs; the instance was made wired, so it changes nothing there.
    let made = std::fs::read(inst.join("lima.yaml")).unwrap();
    let agent = cli.agent(&t.path().join("host.log"));
    assert!(
        wait_until(finch_tests::STARTUP, || inst.join("finch-bridge/SHA256SUMS").exists()),
        "{}",
        agent.output()
    );
    assert_eq!(std::fs::read(inst.join("lima.yaml")).unwrap(), made);

    // The upgrade: the installer deletes the instance and _config's files, replaces the
    // template; the user runs `vm init` at once, before the agent has looked (the VM is made
    // from the unwired template, and Lima's host agent starts: ha.pid).
    std::fs::remove_dir_all(&inst).unwrap();
    std::fs::remove_file(lima.join("_config/default.yaml")).unwrap();
    let upgraded = stock.replace("1.18", "1.19");
    std::fs::write(&template, &upgraded).unwrap();
    vm_init();
    std::fs::write(inst.join("ha.pid"), "1").unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || wired(&template) && wired(&inst.join("lima.yaml"))),
        "the agent did not wire the upgraded template and instance:\n{}",
        agent.output()
    );
    assert_eq!(std::fs::read_to_string(&orig).unwrap(), upgraded);
    assert!(
        wait_until(Duration::from_secs(10), || agent
            .output()
            .contains("the VM runs without the bridge's wiring")),
        "{}",
        agent.output()
    );
    let (_, report) = host(&["doctor"]);
    assert!(report.contains("FAIL vm finch started"), "{report}");
    assert!(report.contains("OK   finch template"), "{report}");
    drop(agent);

    // Hardened: no home mount in either file; the share mounted writable.
    let src = home.join("src");
    let (ok, out) = setup(&["--harden", "--share", src.to_str().unwrap()]);
    assert!(ok, "{out}");
    for f in [&template, &inst.join("lima.yaml")] {
        let text = std::fs::read_to_string(f).unwrap();
        assert!(!text.contains("location: \"~\"") && !text.contains("location: ~"), "{text}");
        assert!(text.contains(&src.display().to_string()), "{text}");
    }
    let (ok, out) = setup(&["--share", "/x"]);
    assert!(!ok && out.contains("--harden"), "--share without --harden: {out}");
    // Not taken silently where it means nothing: Finch's template on Windows.
    let windows = ["setup", "finch", "--platform", "windows", "--no-wsl", "--template", "/x"];
    let (ok, out) = cli.run(&windows);
    assert!(!ok && out.contains("are for Finch on macOS"), "{out}");

    let (ok, out) = setup(&["--remove"]);
    assert!(ok, "{out}");
    assert_eq!(std::fs::read_to_string(&template).unwrap(), upgraded, "{out}");
    assert!(!orig.exists());
    assert!(!wired(&inst.join("lima.yaml")));
    assert!(std::fs::read_to_string(inst.join("lima.yaml")).unwrap().contains("overVsock"));
}

/// `install.sh --scoped` and the bundle's `scoped` file (what the host agent writes from the
/// VM's pull/push rules): containerd's hosts.toml and the containers-image mirror for each,
/// one the bridge did not write refused before any change, and all of it gone again.
#[test]
fn scoped_registries_get_the_front_in_hosts_toml_and_as_a_mirror() {
    let s = scratch();
    std::fs::write(s.bundle.join("scoped"), "r.example:5000\ndocker.io\n").unwrap();
    run_ok(
        Command::new("sh")
            .arg("-c")
            .arg("sha256sum finch-guest-agent docker-credential-finchhost scoped > SHA256SUMS")
            .current_dir(&s.bundle),
        "sha256sum",
    );
    let out = install_with(&s, "none", &["--scoped", "ghcr.io"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("scoped: ghcr.io r.example:5000 docker.io"), "{said}");
    let certs = s.root.join("etc/containerd/certs.d");
    let hosts = std::fs::read_to_string(certs.join("r.example:5000/hosts.toml")).unwrap();
    assert!(hosts.contains("server = \"https://r.example:5000\""), "{hosts}");
    assert!(hosts.contains("[host.\"https://127.0.0.1:6128/r/r.example:5000\"]"), "{hosts}");
    // The front's TLS: its CA and the clients' certificate, in the agent's runtime directory.
    let front = "/run/finch-guest-agent/front";
    assert!(hosts.contains(&format!("ca = \"{front}/ca.crt\"")), "{hosts}");
    assert!(
        hosts.contains(&format!("client = [[\"{front}/client.cert\", \"{front}/client.key\"]]")),
        "{hosts}"
    );

    let hub = std::fs::read_to_string(certs.join("docker.io/hosts.toml")).unwrap();
    assert!(hub.contains("server = \"https://registry-1.docker.io\""), "{hub}");
    assert!(certs.join("ghcr.io/hosts.toml").exists());
    let mirrors = s.root.join("etc/containers/registries.conf.d/60-finch-bridge-scoped.conf");
    let text = std::fs::read_to_string(&mirrors).unwrap();
    assert!(text.contains("location = \"127.0.0.1:6128/m/r.example__5000\""), "{text}");
    assert!(!text.contains("insecure"), "the mirror is TLS: {text}");
    // containers-image finds the front's certificates in certs.d/IP:PORT/: links.
    let front_d = s.root.join("etc/containers/certs.d/127.0.0.1:6128");
    for name in ["ca.crt", "client.cert", "client.key"] {
        let link = std::fs::read_link(front_d.join(name)).unwrap();
        assert_eq!(link, Path::new(front).join(name));
    }
    let args = std::fs::read_to_string(s.root.join("etc/default/finch-guest-agent")).unwrap();
    assert!(
        args.contains(&format!("--front-listen 127.0.0.1:6128 --front-certs-dir {front}")),
        "{args}"
    );

    // A registry's own hosts.toml is never replaced: nothing changes.
    std::fs::create_dir_all(certs.join("quay.io")).unwrap();
    std::fs::write(certs.join("quay.io/hosts.toml"), "server = \"https://quay.io\"\n").unwrap();
    let before = std::fs::read(&mirrors).unwrap();
    let out = install_with(&s, "none", &["--scoped", "quay.io"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not the bridge's"));
    assert_eq!(std::fs::read(&mirrors).unwrap(), before);
    // Nor is a certificate of someone else's where the front's links go.
    std::fs::remove_file(front_d.join("ca.crt")).unwrap();
    std::fs::write(front_d.join("ca.crt"), "someone's CA\n").unwrap();
    let out = install_with(&s, "none", &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("127.0.0.1:6128/ca.crt is not the bridge's"), "{err}");
    assert_eq!(std::fs::read(&mirrors).unwrap(), before);
    std::fs::remove_file(front_d.join("ca.crt")).unwrap();
    // A bundle whose sums leave `scoped` out is refused.
    run_ok(
        Command::new("sh")
            .arg("-c")
            .arg("sha256sum finch-guest-agent docker-credential-finchhost > SHA256SUMS")
            .current_dir(&s.bundle),
        "sha256sum",
    );
    let out = install_with(&s, "none", &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not cover scoped"));

    let out = Command::new("sh")
        .arg(repo().join("lima/guest/uninstall.sh"))
        .arg("--root")
        .arg(&s.root)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!mirrors.exists());
    assert!(!front_d.exists(), "the certificate links stayed");
    for r in ["r.example:5000", "docker.io", "ghcr.io"] {
        assert!(!certs.join(r).exists(), "{r} stayed");
    }
    assert!(certs.join("quay.io/hosts.toml").exists(), "the registry's own file went");
}

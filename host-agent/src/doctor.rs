//! `finch-host-agent doctor`: checks everything the agent needs, one line per check with
//! OK or FAIL, and a `fix:` line under each FAIL. It creates nothing, never prints a secret,
//! and dials each VM without a handshake, so a running agent's link is not taken over.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::control;
use crate::lima::{self, Adopted};
use crate::platform::paths;
use crate::resolve::Current;
use crate::settings::{self, LimaSettings, Overrides, Settings};
use crate::source::docker_config::DockerConfig;
use crate::source::ecr::EcrClass;
use crate::source::keychain;

/// The findings, in order.
#[derive(Debug, Default)]
pub struct Report {
    text: String,
    failures: usize,
}

impl Report {
    fn ok(&mut self, what: &str, detail: impl std::fmt::Display) {
        let _ = writeln!(self.text, "OK   {what}: {detail}");
    }

    fn fail(&mut self, what: &str, detail: impl std::fmt::Display, fix: impl std::fmt::Display) {
        self.failures += 1;
        let _ = writeln!(self.text, "FAIL {what}: {detail}\n     fix: {fix}");
    }

    /// The report for people.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// How many checks failed.
    pub fn failures(&self) -> usize {
        self.failures
    }
}

/// Runs every check.
pub fn run(overrides: &Overrides) -> Report {
    let mut r = Report::default();
    let (settings, adopted) = match crate::agent::load(overrides) {
        Ok((s, adopted, _)) => {
            let found =
                if s.config_file_found { "parses" } else { "not present (defaults in use)" };
            r.ok("config", format!("{} {found}", s.config_file.display()));
            (s, adopted)
        }
        Err(e) => {
            r.fail(
                "config",
                format!("{e:#}"),
                "correct the file at the line and key named, then `finch-host-agent reload`",
            );
            return r;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            r.fail("runtime", e, "the system is out of resources");
            return r;
        }
    };
    let uses_ecr = check_docker_config(&mut r, &settings, &runtime);
    if uses_ecr || !settings.ecr.rules.is_empty() {
        // The default chain is checked when the docker config sends registries to ECR; rules
        // name their own identities.
        check_ecr(&mut r, &settings, &runtime, uses_ecr || settings.ecr.rules.is_empty());
    }
    check_state_dir(&mut r, &settings.state_dir);
    for (name, vm) in &settings.vms {
        check_key(&mut r, &settings, name);
        let what = format!("vm {name} endpoint");
        match runtime.block_on(crate::transport::dial(&vm.endpoint)) {
            Ok(_) => r.ok(&what, format!("{} accepts connections", vm.endpoint)),
            Err(e) => r.fail(
                &what,
                format!("{e:#}"),
                "start the VM (and its guest agent), or correct the endpoint",
            ),
        }
    }
    if settings.vms.is_empty() {
        r.fail(
            "vms",
            "no VM is configured",
            "add a [vm.NAME] table to the config file, or pass --vm NAME=ENDPOINT",
        );
    }
    if let Some(lima) = &settings.lima {
        check_lima(&mut r, &settings, lima, &adopted);
    }
    check_finch_helpers(&mut r, &settings, overrides);
    check_agent(&mut r, &settings);
    r
}

/// Finch for Windows keeps `finch.yaml` beside the docker config it shares with its VM: with
/// `ecr-login` in `creds_helpers` it exports the host's AWS keys into the VM
/// (runfinch/finch `cmd/finch/nerdctl_remote.go` `ensureRemoteCredentials`).
fn check_finch_helpers(r: &mut Report, settings: &Settings, overrides: &Overrides) {
    let finch_dir = settings.docker_config.as_path();
    let file = finch_dir.join("finch.yaml");
    let Ok(Some(yaml)) = lima::read_yaml(&file) else { return };
    let helpers: Vec<&str> = yaml["creds_helpers"]
        .as_vec()
        .map(|v| v.iter().filter_map(yaml_rust2::Yaml::as_str).collect())
        .unwrap_or_default();
    if helpers.contains(&"ecr-login") {
        r.fail(
            "finch creds_helpers",
            format!(
                "{} has ecr-login: Finch exports the host's AWS keys into the VM",
                file.display()
            ),
            "finch-host-agent setup finch (the bridge answers ECR natively; ecr-login comes out)",
        );
    } else if helpers.contains(&settings::BRIDGE_HELPER) {
        r.ok("finch creds_helpers", format!("{} has finchhost", file.display()));
    }
    if yaml["vmType"].as_str() != Some("wsl2") {
        return;
    }
    let config = settings::config_file(overrides.config.as_deref()).ok().map(|(c, _)| c);
    let protected =
        crate::finch_wsl::protected(finch_dir, config, &settings.state_dir, paths::home().ok());
    check_wsl_mounts(r, finch_dir, &protected);
}

/// What Finch's distro mounts from Windows (read through `\\wsl.localhost` while it runs):
/// WSL mounts every fixed drive read-write unless its wsl.conf says `[automount] enabled =
/// false`, and Finch's does not (finch-core `deps/mkosi/mkosi.images/wsl-rootfs/mkosi.postinst.chroot`
/// appends only `[boot] systemd=true`); Finch links `/root/.aws` to `%USERPROFILE%\.aws`
/// (runfinch/finch `pkg/config/nerdctl_config_applier.go` `updateEnvironment`).
fn check_wsl_mounts(r: &mut Report, finch_dir: &Path, protected: &[(PathBuf, &str)]) {
    use crate::finch_wsl::{self, DistroMounts, MAX_DISTRO_FILE};
    let etc = Path::new(r"\\wsl.localhost").join(finch_wsl::DISTRO).join("etc");
    let read = |name: &str| {
        lima::read_bounded(&etc.join(name), MAX_DISTRO_FILE)
            .ok()
            .flatten()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    };
    let fix = "finch-host-agent setup finch --harden [--share DIR]... (then finch vm stop; finch vm start)";
    let aws = paths::home().map(|h| h.join(".aws")).ok().filter(|p| p.exists());
    let Some(conf) = read("wsl.conf") else {
        r.fail(
            "finch distro mounts",
            format!(
                "Finch's distro mounts, unless its wsl.conf (unreadable now: is the distro running?) says otherwise, C: read-write: a process in the VM reads {} (config.json's auths, the agent's state and VM keys) and %USERPROFILE%\\.aws (Finch links /root/.aws to it) without the bridge",
                finch_dir.display()
            ),
            format!("{fix}: it sets [automount] enabled = false in the distro's wsl.conf and mounts only what builds need through its /etc/fstab"),
        );
        if let Some(aws) = aws {
            r.fail(
                "finch /root/.aws",
                format!(
                    "Finch links /root/.aws in the VM to {}, which the distro mounts unless its wsl.conf says otherwise: root in the VM reads the host's AWS credentials",
                    aws.display()
                ),
                fix,
            );
        }
        return;
    };
    let distro = DistroMounts::read(&conf, &read("fstab").unwrap_or_default());
    let exposed: Vec<String> = protected
        .iter()
        .filter_map(|(p, what)| {
            let via = distro.reach(&p.to_string_lossy())?;
            Some(format!("{} ({what}) through {via}", p.display()))
        })
        .collect();
    if exposed.is_empty() {
        let list: Vec<String> = distro.mounts.iter().map(|m| m.source.clone()).collect();
        r.ok("finch distro mounts", format!("no drive whole; only {}", list.join(", ")));
    } else {
        r.fail(
            "finch distro mounts",
            format!("a process in the VM reads, without the bridge: {}", exposed.join("; ")),
            fix,
        );
    }
    match aws {
        None => r.ok("finch /root/.aws", "this host has no %USERPROFILE%\\.aws"),
        Some(aws) => match distro.reach(&aws.to_string_lossy()) {
            Some(via) => r.fail(
                "finch /root/.aws",
                format!(
                    "Finch links /root/.aws in the VM to {}, which the distro mounts ({via}): root in the VM reads the host's AWS credentials",
                    aws.display()
                ),
                fix,
            ),
            None => r.ok(
                "finch /root/.aws",
                format!("{} is not mounted in the distro: /root/.aws leads nowhere", aws.display()),
            ),
        },
    }
}

/// Host paths whose content the bridge keeps on the host, with what each holds.
fn protected(settings: &Settings, lima: &LimaSettings) -> Vec<(PathBuf, &'static str)> {
    let mut out = vec![
        (settings.docker_config.clone(), "the agent's docker config"),
        (settings.state_dir.clone(), "the agent's state and VM keys"),
        (lima.config_dir(), "Lima's config and ssh key"),
        (settings.config_file.clone(), "the agent's config"),
    ];
    let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Ok(home) = paths::home() {
        out.push((
            env("AWS_CONFIG_FILE").unwrap_or_else(|| home.join(".aws/config")),
            "AWS config",
        ));
        out.push((
            env("AWS_SHARED_CREDENTIALS_FILE").unwrap_or_else(|| home.join(".aws/credentials")),
            "AWS credentials; Finch's VM links /root/.aws to the host's ~/.aws",
        ));
        out.push((home.join(".aws/sso/cache"), "AWS SSO cache"));
        out.push((env("DOCKER_CONFIG").unwrap_or_else(|| home.join(".docker")), "docker config"));
        out.push((home.join(".finch"), "Finch's config.json"));
        out.push((home.join(".ssh"), "ssh keys"));
        out.push((home.join("Library/Keychains"), "macOS keychains"));
        out.push((home.join(".local/share/keyrings"), "Secret Service keyrings"));
        out.push((home.join("Library/LaunchAgents"), "login services the host runs"));
        out.push((home.join(".config/systemd/user"), "login services the host runs"));
    }
    out
}

/// Each Lima instance: its Lima config readable, the fragment in it, its bundle filled, and
/// no mount that hands the VM what the bridge keeps on the host.
fn check_lima(r: &mut Report, settings: &Settings, lima: &LimaSettings, adopted: &Adopted) {
    // `finch` passes these from the shell it runs in into `sudo -E nerdctl` in the VM (runfinch/finch
    // cmd/finch/nerdctl_remote.go `passedEnvs`): keys that then live in the VM's processes.
    let passed: Vec<&str> =
        ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"]
            .into_iter()
            .filter(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()))
            .collect();
    if passed.is_empty() {
        r.ok("finch env", "no AWS_* variable for finch to pass into the VM");
    } else {
        r.fail(
            "finch env",
            format!(
                "{} set here: finch passes them into the VM with every nerdctl command",
                passed.join(", ")
            ),
            "unset them in the shells that run finch: the bridge answers ECR from the host's AWS config",
        );
    }
    if let Some(untrusted) = &adopted.untrusted {
        r.fail(
            "lima home",
            format!(
                "{}: a process in that VM could make an instance there, so [\"*\"] adopts none",
                untrusted.reason
            ),
            format!(
                "name the instances to serve in [lima] instances, or mount {} read-only in \
                 every VM and then remove {}",
                lima.home.display(),
                settings.state_dir.join(lima::HOME_WRITABLE_MARKER).display()
            ),
        );
    }
    if adopted.instances.is_empty() {
        r.fail(
            "lima",
            format!("no instance {:?} under {}", lima.instances, lima.home.display()),
            "create the VM (finch vm init), or correct [lima] home and instances",
        );
        return;
    }
    let home = paths::home().unwrap_or_default();
    if let Some(template) = &lima.template {
        match lima::read_yaml(template) {
            Ok(Some(y)) if lima::has_fragment(&y) => {
                r.ok("finch template", format!("{} is wired", template.display()));
            }
            Ok(_) => r.fail(
                "finch template",
                format!(
                    "{} is missing or not wired: `finch vm init` would make a VM without the bridge",
                    template.display()
                ),
                "start the agent (it wires the template within seconds), or finch-host-agent setup finch",
            ),
            Err(e) => r.fail("finch template", format!("{e:#}"), "reinstall Finch"),
        }
    }
    let protected = protected(settings, lima);
    for (name, instance) in &adopted.instances {
        let what = format!("vm {name} lima");
        let yaml = match lima::LimaYaml::read(lima, instance) {
            Ok(y) => y,
            Err(e) => {
                r.fail(&what, format!("{e:#}"), "correct the file (limactl edit NAME)");
                continue;
            }
        };
        if [&yaml.default, &yaml.instance, &yaml.overrides].into_iter().any(lima::has_fragment) {
            r.ok(&what, "the fragment is in its Lima config");
        } else {
            r.fail(
                &what,
                "the fragment is in none of default.yaml, lima.yaml, override.yaml",
                "finch-host-agent setup finch (then restart the VM)",
            );
        }
        if lima::started_before_its_config(&instance.dir) {
            r.fail(
                &format!("vm {name} started"),
                format!(
                    "it runs, and {} changed after it started (the agent wires it when Finch made it without the bridge): the VM runs without it",
                    instance.dir.join("lima.yaml").display()
                ),
                "restart the VM: finch vm stop && finch vm start",
            );
        }
        if let Some(said) = lima::guest_says(&instance.dir) {
            r.fail(
                &format!("vm {name} guest"),
                format!("the VM's console (Lima's serial log) says: {said:?}"),
                "in the VM: sudo journalctl -u finch-guest-agent; then restart the VM",
            );
        }
        let bundle = instance.bundle();
        if bundle.join("SHA256SUMS").is_file() {
            r.ok(&format!("vm {name} bundle"), bundle.display());
        } else {
            r.fail(
                &format!("vm {name} bundle"),
                format!("{} is not filled", bundle.display()),
                format!(
                    "unpack the linux-{} guest release archive in {} and start (or reload) the agent",
                    yaml.arch(),
                    lima.guest_dir.display()
                ),
            );
        }
        let mut exposed = false;
        for m in yaml.mounts().into_iter().filter(|m| m.writable) {
            let Some(location) = lima::expand_location(&m.location, instance, &home) else {
                continue;
            };
            // Finch's release builds mount finch-cred writable: it holds the credserver that
            // `finch vm start` runs on the host (runfinch/finch finch.yaml.d/finchhost-mount.yaml).
            if location.join("credserver").is_file() || location.ends_with("finch-cred") {
                exposed = true;
                r.fail(
                    &format!("vm {name} mounts"),
                    format!(
                        "{} is mounted writable into the VM and holds the credserver the host runs: a process in the VM can replace a program the host executes",
                        location.display()
                    ),
                    format!(
                        "finch-host-agent setup finch --harden (or writable: false on that mount in {}), then restart the VM",
                        instance.dir.join("lima.yaml").display()
                    ),
                );
            }
        }
        for m in yaml.mounts() {
            let how = if m.writable { "writable" } else { "read-only" };
            let Some(location) = lima::expand_location(&m.location, instance, &home) else {
                exposed = true;
                r.fail(
                    &format!("vm {name} mounts"),
                    format!("cannot tell where the mount {:?} points", m.location),
                    "write the mount's location as an absolute path",
                );
                continue;
            };
            for (path, holds) in &protected {
                if lima::reaches(&location, path) {
                    exposed = true;
                    r.fail(
                        &format!("vm {name} mounts"),
                        format!(
                            "{} is mounted {how} into the VM and reaches {} ({holds}): a process in the VM reads it without the bridge",
                            location.display(),
                            path.display()
                        ),
                        format!(
                            "mount only what builds need: finch-host-agent setup finch --harden --share DIR (or in {} replace the mount of {} with narrower directories), then restart the VM",
                            instance.dir.join("lima.yaml").display(),
                            location.display()
                        ),
                    );
                }
            }
        }
        if !exposed {
            r.ok(&format!("vm {name} mounts"), "none reaches a path the bridge protects");
        }
    }
}

/// Checks the docker config and each helper it names; says whether it names `ecr-login`.
fn check_docker_config(
    r: &mut Report,
    settings: &Settings,
    runtime: &tokio::runtime::Runtime,
) -> bool {
    let dir = &settings.docker_config;
    let config = match DockerConfig::load(dir) {
        Ok(c) => c,
        Err(e) => {
            r.fail("docker config", e, "fix or remove the file (it must be a JSON object)");
            return false;
        }
    };
    let file = dir.join(crate::source::docker_config::CONFIG_FILE);
    r.ok(
        "docker config",
        format!(
            "{} ({}; {} credHelpers; {} plaintext auths)",
            file.display(),
            config
                .routing
                .creds_store
                .as_deref()
                .map_or("no credsStore".to_owned(), |s| format!("credsStore {s}")),
            config.routing.cred_helpers.len(),
            config.auths.len()
        ),
    );
    let mut names: Vec<&str> = config.routing.cred_helpers.values().map(String::as_str).collect();
    names.extend(config.routing.creds_store.as_deref().filter(|s| !s.is_empty()));
    names.sort_unstable();
    names.dedup();
    let current = Current::new(settings.clone(), None);
    for name in names {
        let what = format!("helper {name}");
        let native = settings.native_keychain && keychain::NATIVE_NAME == Some(name);
        if name == crate::source::ecr::HELPER_NAME {
            r.ok(&what, "served natively (AWS credentials checked below)");
            continue;
        }
        match current.helper("doctor", name) {
            Ok(source) if native => {
                let bound = settings.keychain_timeout + Duration::from_secs(1);
                match runtime.block_on(async { tokio::time::timeout(bound, source.list()).await }) {
                    Ok(Ok(items)) => r.ok(&what, format!("native keychain reachable ({} docker items)", items.len())),
                    Ok(Err(e)) => r.fail(&what, e, "unlock or start the keychain (log in to the desktop session), or set native_keychain = false to use the helper binary"),
                    Err(_) => r.fail(&what, "the keychain did not answer in time", "unlock or restart the keychain daemon"),
                }
            }
            Ok(_) => r.ok(&what, format!("docker-credential-{name} found on PATH")),
            Err(e) => r.fail(&what, e, format!("install docker-credential-{name} on the host agent's PATH, or change the docker config")),
        }
    }
    config.routing.creds_store.as_deref() == Some(crate::source::ecr::HELPER_NAME)
        || config.routing.cred_helpers.values().any(|h| h == crate::source::ecr::HELPER_NAME)
}

/// Resolves each ECR identity's AWS credentials (never printing them).
fn check_ecr(
    r: &mut Report,
    settings: &Settings,
    runtime: &tokio::runtime::Runtime,
    with_default: bool,
) {
    let ecr = crate::source::ecr::Ecr::new(settings.ecr.clone());
    for (label, identity) in ecr.identities(with_default) {
        let what = format!("ecr {label}");
        let bound = identity.timeout + Duration::from_secs(2);
        let result =
            runtime.block_on(async { tokio::time::timeout(bound, ecr.check(&identity)).await });
        match result {
            Ok(Ok(expiry)) => {
                let when = expiry
                    .and_then(|e| e.duration_since(std::time::SystemTime::now()).ok())
                    .map_or("no expiry".to_owned(), |d| {
                        format!("expire in {} min", d.as_secs() / 60)
                    });
                r.ok(&what, format!("AWS credentials resolve ({when})"));
            }
            Ok(Err(e)) => {
                let fix = match (e.class, &identity.profile) {
                    (EcrClass::SsoExpired, Some(p)) => format!("aws sso login --profile {p}"),
                    (EcrClass::SsoExpired, None) => "aws sso login".to_owned(),
                    (_, Some(p)) => format!(
                        "configure the profile: aws configure --profile {p} (or aws sso login --profile {p})"
                    ),
                    (_, None) => {
                        "configure AWS credentials for this user (aws configure, or aws sso login)"
                            .to_owned()
                    }
                };
                r.fail(&what, e, fix);
            }
            Err(_) => r.fail(
                &what,
                "resolving AWS credentials timed out",
                "check the AWS configuration (credential_process, SSO) and the network",
            ),
        }
    }
}

fn check_state_dir(r: &mut Report, dir: &Path) {
    use finch_shared::private;
    match private::path_exposure(dir) {
        Ok(Some(e)) => r.fail(
            "state dir",
            format!("{} is open to other users ({e})", dir.display()),
            private::fix_command(dir, true),
        ),
        Ok(None) => r.ok("state dir", format!("{} (private)", dir.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            r.ok("state dir", format!("{} does not exist yet (created by `run`)", dir.display()))
        }
        Err(e) => r.fail(
            "state dir",
            format!("{}: {e}", dir.display()),
            "check the path and its permissions",
        ),
    }
}

fn check_key(r: &mut Report, settings: &Settings, name: &str) {
    use crate::vm_keys::{Found, find};
    let what = format!("vm {name} key");
    let explicit = settings.vms.get(name).is_some_and(|v| v.key_file.is_some());
    let (path, keychain_said) = match find(settings, name) {
        Ok(Found::Keychain(store)) => {
            r.ok(&what, format!("in the {store} keychain, where no VM mount reaches"));
            return;
        }
        Ok(Found::Missing { home }) if !explicit => {
            r.fail(
                &what,
                format!("not made yet (it goes to {home})"),
                "start the agent once (`finch-host-agent run`) to make it, then wire the VM with it",
            );
            return;
        }
        Ok(Found::Missing { .. }) => (settings.key_file(name).unwrap_or_default(), None),
        Ok(Found::File { path, keychain_said }) => (path, keychain_said),
        Err(e) => {
            let fix = format!(
                "unlock the keychain; or keep the key in a file: `finch-host-agent key-export {name} \
                 --key-store auto --out {}` and key_store = \"file\"",
                paths::key_path(&settings.state_dir, name).display()
            );
            r.fail(&what, format!("{e:#}"), fix);
            return;
        }
    };
    match finch_shared::key::LinkKey::load(&path) {
        Ok(_) => match keychain_said {
            None => r.ok(&what, format!("{} (private)", path.display())),
            Some(why) => {
                r.ok(&what, format!("{} (private; not in the keychain: {why})", path.display()))
            }
        },
        Err(e) => r.fail(
            &what,
            e,
            format!("create it with 32+ random bytes and chmod 600 {}", path.display()),
        ),
    }
}

fn check_agent(r: &mut Report, settings: &Settings) {
    match control::call(&settings.state_dir, control::ControlRequest::Status) {
        Ok(reply) => match reply.status {
            Some(s) => {
                let up = s.vms.values().filter(|v| v.up).count();
                if up == s.vms.len() {
                    r.ok(
                        "agent",
                        format!("running (pid {}), {up}/{} links up", s.pid, s.vms.len()),
                    );
                } else {
                    let down: Vec<&str> =
                        s.vms.iter().filter(|(_, v)| !v.up).map(|(n, _)| n.as_str()).collect();
                    r.fail(
                        "agent",
                        format!("running (pid {}), links down: {}", s.pid, down.join(", ")),
                        "see `finch-host-agent status` for each link's last error",
                    );
                }
            }
            None => r.fail("agent", "the agent gave no status", "restart it"),
        },
        Err(e) => r.fail(
            "agent",
            format!("{e:#}"),
            "start it: finch-host-agent run (or `finch-host-agent install`)",
        ),
    }
}

/// The state directory for commands that must work while the config file is broken.
pub fn state_dir_fallback(overrides: &Overrides) -> anyhow::Result<PathBuf> {
    match Settings::load(overrides) {
        Ok(s) => Ok(s.state_dir),
        Err(_) => Ok(settings::state_dir_without_file(overrides)?),
    }
}

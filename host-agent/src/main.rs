//! `finch-host-agent`: the daemon on the host, started at login.
//!
//! Modules: `settings` (flags > environment > `~/.finch/host-agent.toml` > defaults, `--vm`
//! specs, `attached.toml`; loading is pure), `platform` (what differs between unix and
//! Windows; `platform::paths`), `policy` (what each VM may do), `agent` (the links, reloads,
//! Lima adoption), `lima` (instances found under a Lima home, their bundles, the fragment),
//! `vm_keys` (each VM's link key, in the keychain or a file), `link` (dial each VM,
//! authenticate, reconnect; the host's `Role` in `finch_shared::link::drive`), `resolve`
//! (policy, route a request in docker/cli's order, try every registry spelling, audit),
//! `source` (the credential sources behind one trait: host helpers, plaintext `auths`,
//! native ECR, native keychains), `control` (the control channel behind `status` and
//! `reload`), `status`, `doctor`, `fair` (fair shares of host helper processes between VMs),
//! `budget` (what each VM stored), `transport` (unix, vsock, hybrid vsock, Hyper-V: one
//! stream type, chosen by the endpoint string).
//!
//! Path of a request: guest's `LinkMsg::Request` → `link::Answering` (budget, in-flight
//! bound) → `Resolver::handle` (check, policy) → `source::*` → audit line →
//! `LinkMsg::Response` back on the same link.

mod agent;
mod budget;
mod control;
mod doctor;
mod fair;
mod finch_wsl;
mod install;
mod kept;
mod lima;
mod link;
mod platform;
mod policy;
mod resolve;
mod settings;
mod source;
mod status;
mod transport;
mod vm_keys;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::platform::paths;
use crate::settings::{Overrides, VmName};

/// How often the config file is checked for changes.
const CONFIG_POLL: Duration = Duration::from_secs(2);

#[derive(Debug, Parser)]
#[command(name = "finch-host-agent", version, about = "Host agent of the finch credential bridge")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Dial every VM and answer its credential requests until stopped.
    Run(Overrides),
    /// Show the running agent's links, requests and cache.
    Status {
        #[command(flatten)]
        settings: Overrides,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check the config, the credential sources, each VM's key and endpoint, and the agent.
    Doctor(Overrides),
    /// Make the running agent re-read its config file (as SIGHUP does).
    Reload(Overrides),
    /// Add a VM (or change its endpoint) at run time; kept in STATE/attached.toml.
    Attach {
        /// The VM's name.
        name: VmName,
        /// Where to dial it (unix:///…, vsock://CID:PORT, hybrid:///vmm.sock:PORT, hvsock://…).
        endpoint: finch_shared::endpoint::Endpoint,
        /// Its key file [default: STATE/vms/NAME.key, created when missing].
        #[arg(long, value_name = "PATH")]
        key: Option<PathBuf>,
        #[command(flatten)]
        settings: Overrides,
    },
    /// Remove a VM attached with `attach`.
    Detach {
        /// The VM's name.
        name: VmName,
        #[command(flatten)]
        settings: Overrides,
    },
    /// Print the path of a VM's key file (creating the key, 0600, when missing); a key kept
    /// in the OS keychain has no path: see key-export.
    KeyPath {
        /// The VM's name.
        name: VmName,
        #[command(flatten)]
        settings: Overrides,
    },
    /// Write a copy of a VM's key to a file (mode 0600), wherever the key is kept (creating
    /// the key when missing): for wiring a VM by hand.
    KeyExport {
        /// The VM's name.
        name: VmName,
        /// The file to write.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        #[command(flatten)]
        settings: Overrides,
    },
    /// Run the agent at login: a systemd user unit, a LaunchAgent or a logon task.
    Install {
        /// Print the service file instead of installing it.
        #[arg(long)]
        print: bool,
        /// Platform whose service file to generate [default: this one].
        #[arg(long, value_enum)]
        platform: Option<install::Platform>,
        /// Write the file but do not register or start it.
        #[arg(long)]
        no_start: bool,
        /// Arguments given to `finch-host-agent run` at login (after `--`).
        #[arg(last = true)]
        run_args: Vec<String>,
    },
    /// Make `finch vm start` bring the bridge up with no other step (see `setup finch --help`).
    Setup {
        #[command(subcommand)]
        what: SetupTarget,
    },
    /// Stop the login service and remove its file.
    Uninstall {
        /// Platform whose service to remove [default: this one].
        #[arg(long, value_enum)]
        platform: Option<install::Platform>,
        /// Remove the file without stopping the service.
        #[arg(long)]
        no_stop: bool,
    },
}

#[derive(Debug, Subcommand)]
enum SetupTarget {
    /// Finch on macOS (or any Lima): installs the login service, merges the Lima fragment
    /// into LIMA_HOME/_config/default.yaml (which Lima merges into every instance and `finch
    /// vm start` leaves alone), and adds a [lima] table to the config so the agent fills each
    /// instance's bundle and dials its forwarded socket by itself. Idempotent.
    Finch(SetupFinch),
}

#[derive(Debug, clap::Args)]
struct SetupFinch {
    /// Undo it: the fragment, the [lima] table setup wrote, and the login service.
    #[arg(long)]
    remove: bool,
    /// Finch's LIMA_HOME [default: /Applications/Finch/lima/data on macOS;
    /// %ProgramFiles%\Finch\lima\data on Windows (--harden mounts its finch\ read-only);
    /// elsewhere $LIMA_HOME or ~/.lima].
    #[arg(long, value_name = "DIR")]
    lima_home: Option<PathBuf>,
    /// An instance to serve (repeatable; "*" for all) [default: finch].
    #[arg(long = "instance", value_name = "NAME")]
    instances: Vec<String>,
    /// Holds linux-x86_64/ and linux-aarch64/ with the guest binaries [default: guest/
    /// beside this binary].
    #[arg(long, value_name = "DIR")]
    guest_dir: Option<PathBuf>,
    /// Write the login service's file but do not register, start or stop it.
    #[arg(long)]
    no_start: bool,
    /// Platform whose login service to write [default: this one].
    #[arg(long, value_enum)]
    platform: Option<install::Platform>,
    /// Finch's template, which `finch vm init` makes the VM from: the fragment goes there and
    /// into the instance's lima.yaml, which Finch never rewrites [default: os/finch.yaml of
    /// the install the Lima home is in (LIMA_HOME/../../os/finch.yaml), when it exists].
    #[arg(long, value_name = "FILE")]
    template: Option<PathBuf>,
    /// Close the side doors that keep Finch working: no mount holding the home (~/.aws,
    /// ~/.docker, ~/.finch, this agent's config), Finch's own files (finch-cred) read-only.
    /// Needs the template. On Windows: WSL's drive automount off in Finch's distro; only the
    /// temporary directory and Lima's instance (read-only, Lima's boot reads them) and the
    /// shares are mounted, through the distro's /etc/fstab.
    #[arg(long)]
    harden: bool,
    /// With --harden: a directory to mount writable instead of the home, for bind mounts
    /// (repeatable; on Windows where Finch expects it, /mnt/c/...: finch commands run from
    /// inside a share).
    #[arg(long = "share", value_name = "DIR", requires = "harden")]
    shares: Vec<PathBuf>,
    /// Windows: Finch's directory, with finch.yaml, config.json and cred-helpers\ [default:
    /// %LOCALAPPDATA%\.finch].
    #[arg(long, value_name = "DIR")]
    finch_dir: Option<PathBuf>,
    /// Windows: where the agent dials Finch's distro [default: hvsock://wsl:6127; tcp://127.0.0.1:PORT
    /// where Hyper-V sockets are not available].
    #[arg(long, value_name = "ENDPOINT")]
    link: Option<finch_shared::endpoint::Endpoint>,
    /// Windows: do not run wsl.exe (install the guest side in the distro yourself:
    /// lima/README.md, Windows).
    #[arg(long)]
    no_wsl: bool,
    #[command(flatten)]
    settings: Overrides,
}

fn main() -> ExitCode {
    init_tracing();
    let result = match Cli::parse().command {
        Command::Run(args) => run(args),
        Command::Status { settings, json } => status(&settings, json),
        Command::Doctor(args) => {
            let report = doctor::run(&args);
            print(report.text());
            return if report.failures() == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE };
        }
        Command::Reload(args) => reload(&args),
        Command::Attach { name, endpoint, key, settings } => {
            attach(&settings, &name, Some((endpoint, key)))
        }
        Command::Detach { name, settings } => attach(&settings, &name, None),
        Command::KeyPath { name, settings } => key_path(&settings, &name),
        Command::KeyExport { name, out, settings } => key_export(&settings, &name, &out),
        Command::Install { print: only_print, platform, no_start, run_args } => install_service(
            platform.unwrap_or_else(install::Platform::current),
            only_print,
            no_start,
            &run_args,
        ),
        Command::Setup { what: SetupTarget::Finch(args) } => setup_finch(args),
        Command::Uninstall { platform, no_stop } => {
            uninstall_service(platform.unwrap_or_else(install::Platform::current), no_stop)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

#[allow(clippy::print_stdout)]
fn print(text: &str) {
    print!("{text}");
}

/// Crates whose events may carry what they sent or received (the AWS SDK logs whole
/// `GetAuthorizationToken` responses at trace level; HTTP and TLS crates log bodies and
/// headers): capped at [`LIBRARY_LOG_CAP`] whatever `RUST_LOG` asks.
const CAPPED_TARGETS: &[&str] = &[
    "aws_smithy_runtime",
    "aws_smithy_runtime_api",
    "aws_smithy_http_client",
    "aws_smithy_http",
    "aws_smithy_types",
    "aws_smithy_json",
    "aws_smithy_query",
    "aws_smithy_xml",
    "aws_sdk_ecr",
    "aws_sdk_ecrpublic",
    "aws_sdk_sts",
    "aws_sdk_sso",
    "aws_sdk_ssooidc",
    "aws_config",
    "aws_runtime",
    "aws_credential_types",
    "aws_sigv4",
    "hyper",
    "hyper_util",
    "h2",
    "rustls",
    "tower",
    "zbus",
    "secret_service",
];

/// The most verbose level a [`CAPPED_TARGETS`] crate may log at.
const LIBRARY_LOG_CAP: tracing::Level = tracing::Level::WARN;

/// Whether an event of `target` at `level` may be written at all (see [`CAPPED_TARGETS`]).
fn library_allows(target: &str, level: &tracing::Level) -> bool {
    !finch_shared::limit::is_capped_target(target, CAPPED_TARGETS) || *level <= LIBRARY_LOG_CAP
}

fn init_tracing() {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let cap = tracing_subscriber::filter::filter_fn(|m| library_allows(m.target(), m.level()));
    use std::io::IsTerminal;
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_filter(filter)
        .with_filter(cap);
    tracing_subscriber::registry().with(layer).init();
    tracing::trace!(capped = ?CAPPED_TARGETS, level = %LIBRARY_LOG_CAP, "library events capped");
}

fn status(overrides: &Overrides, json: bool) -> anyhow::Result<()> {
    let state_dir = doctor::state_dir_fallback(overrides)?;
    let reply = control::call(&state_dir, control::ControlRequest::Status)?;
    let status = reply.status.context("the agent gave no status")?;
    if json {
        print(&format!("{}\n", serde_json::to_string_pretty(&status)?));
    } else {
        print(&status::render(&status));
    }
    Ok(())
}

fn reload(overrides: &Overrides) -> anyhow::Result<()> {
    let state_dir = doctor::state_dir_fallback(overrides)?;
    let reply = control::call(&state_dir, control::ControlRequest::Reload)?;
    let message = reply.message.unwrap_or_default();
    anyhow::ensure!(reply.ok, "{message}");
    print(&format!("{message}\n"));
    Ok(())
}

/// Adds, changes (`Some`) or removes (`None`) an attached VM, then asks a running agent to
/// reload (links of other VMs are kept).
fn attach(
    overrides: &Overrides,
    name: &VmName,
    what: Option<(finch_shared::endpoint::Endpoint, Option<PathBuf>)>,
) -> anyhow::Result<()> {
    let state_dir = doctor::state_dir_fallback(overrides)?;
    paths::private_dir(&state_dir)?;
    let path = state_dir.join(settings::ATTACHED_FILE);
    let mut vms = settings::read_attached(&path)?;
    let changed = match what {
        Some((endpoint, key)) => {
            if let Some(k) = &key {
                anyhow::ensure!(k.is_absolute(), "--key must be an absolute path");
                finch_shared::key::LinkKey::load(k)?;
            }
            let vm = settings::AttachedVm { endpoint, key };
            vms.insert(name.clone(), vm.clone()) != Some(vm)
        }
        None => {
            anyhow::ensure!(
                vms.remove(name).is_some(),
                "VM {name} is not attached: `attach` added no VM by that name (one from the config \
                 file's [vm.{name}] or [lima] table is removed there, or with `setup finch --remove`)"
            );
            true
        }
    };
    if changed {
        settings::write_attached(&path, &vms)?;
    }
    let verb = if vms.contains_key(name) { "attached" } else { "detached" };
    match control::call(&state_dir, control::ControlRequest::Reload) {
        Ok(reply) if reply.ok => {
            print(&format!("{verb} {name}: {}\n", reply.message.unwrap_or_default()))
        }
        Ok(reply) => anyhow::bail!(
            "{verb} {name}, but the agent did not reload: {}",
            reply.message.unwrap_or_default()
        ),
        Err(_) => {
            print(&format!("{verb} {name} (no agent running: it takes effect at the next start)\n"))
        }
    }
    Ok(())
}

fn key_path(overrides: &Overrides, name: &VmName) -> anyhow::Result<()> {
    let settings = settings::Settings::load(overrides)?;
    match vm_keys::load_key(&settings, name)?.1 {
        vm_keys::KeyHome::File(path) => print(&format!("{}\n", path.display())),
        home @ vm_keys::KeyHome::Keychain(_) => anyhow::bail!(
            "the key of VM {name} is kept in {home}, not in a file: \
             `finch-host-agent key-export {name} --out FILE` writes a copy (mode 0600)"
        ),
    }
    Ok(())
}

fn key_export(overrides: &Overrides, name: &VmName, out: &Path) -> anyhow::Result<()> {
    let settings = settings::Settings::load(overrides)?;
    let home = vm_keys::export(&settings, name, out)?;
    print(&format!("wrote the key of VM {name} (kept in {home}) to {}\n", out.display()));
    Ok(())
}

fn install_service(
    platform: install::Platform,
    only_print: bool,
    no_start: bool,
    run_args: &[String],
) -> anyhow::Result<()> {
    let binary = std::env::current_exe().context("cannot tell where this binary is")?;
    let binary = binary.canonicalize().unwrap_or(binary);
    let file = install::service_file(platform, &paths::home()?, &binary, run_args);
    if only_print {
        print(&file.text);
        return Ok(());
    }
    install::install(platform, &file, no_start)?;
    print(&format!("installed {}\n", file.path.display()));
    Ok(())
}

fn setup_finch(args: SetupFinch) -> anyhow::Result<()> {
    let platform = args.platform.unwrap_or_else(install::Platform::current);
    if platform == install::Platform::Windows {
        return setup_finch_wsl(args);
    }
    let overrides = args.settings.clone();
    let (config_path, named) = settings::config_file(overrides.config.as_deref())?;
    let home = match args.lima_home {
        Some(h) => h,
        None if cfg!(target_os = "macos") => PathBuf::from(lima::FINCH_LIMA_HOME_MACOS),
        None => match std::env::var_os("LIMA_HOME").filter(|v| !v.is_empty()) {
            Some(h) => PathBuf::from(h),
            None => paths::home()?.join(".lima"),
        },
    };
    anyhow::ensure!(home.is_absolute(), "--lima-home {} must be absolute", home.display());
    let mut instances = args.instances;
    if instances.is_empty() {
        instances.push("finch".to_owned());
    }
    for i in &instances {
        anyhow::ensure!(
            i == "*" || VmName::is_valid(i),
            "--instance {i:?}: a VM name uses letters, digits, '.', '_' or '-' (at most 64), or \"*\""
        );
    }
    let guest_dir = args.guest_dir.unwrap_or_else(paths::default_guest_dir);
    anyhow::ensure!(
        guest_dir.is_absolute(),
        "--guest-dir {} must be absolute",
        guest_dir.display()
    );
    // The template given, else the one an earlier setup recorded, else Finch's beside the home.
    let recorded = || settings::Settings::load(&overrides).ok()?.lima?.template;
    let template = args
        .template
        .or_else(recorded)
        .or_else(|| lima::template_beside(&home).filter(|t| t.is_file()));
    if let Some(t) = &template {
        anyhow::ensure!(t.is_absolute(), "--template {} must be absolute", t.display());
        anyhow::ensure!(
            args.remove || t.is_file(),
            "--template {}: no such file (Finch's is os/finch.yaml in its install)",
            t.display()
        );
    }
    anyhow::ensure!(
        !args.harden || template.is_some(),
        "--harden changes Finch's template and its instance: give --template (no os/finch.yaml \
         was found beside {})",
        home.display()
    );
    let user_home = paths::home()?;
    for share in &args.shares {
        anyhow::ensure!(share.is_absolute(), "--share {} must be absolute", share.display());
        anyhow::ensure!(
            !user_home.starts_with(share),
            "--share {} holds the home: name directories inside it",
            share.display()
        );
    }
    let settings = settings::LimaSettings {
        home,
        instances,
        guest_dir,
        keep_fragment: true,
        template,
        harden: args.harden,
        shares: args.shares,
    };

    if !args.remove {
        // Finch's VM has the host's architecture: without its guest binaries the VM would
        // boot without the bridge, so that is an error; the other one is a note.
        let native = if cfg!(target_arch = "aarch64") { "aarch64" } else { "x86_64" };
        for arch in ["x86_64", "aarch64"] {
            if lima::guest_binaries(&settings.guest_dir, arch).is_some() {
                continue;
            }
            let what = format!(
                "{} has no guest binaries for {arch} VMs: unpack finch-bridge-guest-VERSION-linux-{arch}.tar.gz there (or put them in linux-{arch}/)",
                settings.guest_dir.display()
            );
            if arch == native {
                anyhow::bail!("{what}; nothing was set up");
            }
            print(&format!("note: {what}\n"));
        }
    }

    let text = match std::fs::read_to_string(&config_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", config_path.display())),
    };
    let new = lima::setup_config_text(&text, (!args.remove).then_some(&settings))
        .with_context(|| format!("cannot set up {}", config_path.display()))?;
    if args.remove && new != text && new.trim().is_empty() {
        // Nothing but the [lima] table was there (setup made the file): no file, as before.
        std::fs::remove_file(&config_path)
            .with_context(|| format!("cannot remove {}", config_path.display()))?;
        print(&format!("removed {}\n", config_path.display()));
    } else if new != text {
        if let Some(dir) = config_path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        paths::write_private(&config_path, new.as_bytes())?;
        print(&format!(
            "{} {}\n",
            if args.remove { "updated" } else { "wrote [lima] to" },
            config_path.display()
        ));
    }
    let wiring = lima::Wiring::of(&settings, &user_home);
    // With Finch's template the fragment is there and in the instances, never in
    // default.yaml too (Lima would run it twice).
    let changed =
        lima::update_default_yaml(&settings.config_dir(), !args.remove && wiring.is_none())?;
    let default_yaml = settings.config_dir().join("default.yaml");
    print(&format!(
        "{} {}\n",
        match (changed, !args.remove && wiring.is_none()) {
            (true, true) => "merged the fragment into",
            (true, false) => "took the fragment out of",
            (false, true) => "the fragment is already in",
            (false, false) => "the fragment is not in",
        },
        default_yaml.display()
    ));
    if let Some(template) = &settings.template {
        let instances = lima::discover(&settings).0;
        let want = if args.remove { None } else { wiring.as_ref() };
        for (file, done) in lima::wire_finch(template, &instances, want) {
            let done = done.with_context(|| format!("cannot wire {}", file.display()))?;
            print(&format!(
                "{} {}\n",
                match (done, args.remove) {
                    (lima::Wired::Written, false) => "wired",
                    (lima::Wired::Written, true) => "restored",
                    (lima::Wired::Unchanged, false) => "already wired:",
                    (lima::Wired::Unchanged, true) => "not wired:",
                    (lima::Wired::Missing, _) => "no file (yet):",
                },
                file.display()
            ));
        }
    }
    if args.remove {
        uninstall_service(platform, args.no_start)?;
    } else {
        let run_args: Vec<String> = if named {
            vec!["--config".to_owned(), config_path.display().to_string()]
        } else {
            Vec::new()
        };
        install_service(platform, false, args.no_start, &run_args)?;
    }
    if let Ok(reply) =
        control::call(&doctor::state_dir_fallback(&overrides)?, control::ControlRequest::Reload)
    {
        print(&format!("running agent: {}\n", reply.message.unwrap_or_default()));
    }
    if !args.remove {
        print("restart the VM to provision it: finch vm stop && finch vm start\n");
    }
    Ok(())
}

/// `setup finch` for Finch on Windows (WSL2): Finch's own helper mechanism (`finch_wsl`),
/// the VM attached on `--link`, the guest side installed in the distro with `wsl.exe`, the
/// logon task.
fn setup_finch_wsl(args: SetupFinch) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.template.is_none() && args.instances.is_empty(),
        "--template and --instance are for Finch on macOS (Lima); on Windows setup finch takes \
         --finch-dir, --guest-dir, --link, --no-wsl, --harden [--share DIR]... [--lima-home DIR]"
    );
    let overrides = args.settings.clone();
    let (config_path, named) = settings::config_file(overrides.config.as_deref())?;
    let state_dir = doctor::state_dir_fallback(&overrides)?;
    let saved = state_dir.join(finch_wsl::SAVED_DIR);
    let finch = finch_wsl::FinchDir {
        dir: match args.finch_dir {
            Some(d) => d,
            None => paths::finch_root()?.join(".finch"),
        },
    };
    let name: VmName = "finch".parse()?;
    let config_text = match std::fs::read_to_string(&config_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", config_path.display())),
    };
    let write_config = |text: &str| -> anyhow::Result<()> {
        if text.trim().is_empty() && !named {
            match std::fs::remove_file(&config_path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
                _ => Ok(()),
            }
        } else {
            if let Some(dir) = config_path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            paths::write_private(&config_path, text.as_bytes())
        }
    };
    let fstab_copy = saved.join("wsl-fstab");
    if args.remove {
        if !args.no_wsl {
            uninstall_in_distro()?;
        }
        let _ = std::fs::remove_file(&fstab_copy);
        for line in finch_wsl::unwire(&finch, &saved)? {
            print(&format!("{line}\n"));
        }
        let text = finch_wsl::store_config_text(&config_text, None)?;
        if text != config_text {
            write_config(&text)?;
            print(&format!("took host_creds_store out of {}\n", config_path.display()));
        }
        if attach(&overrides, &name, None).is_err() {
            print("finch was not attached\n");
        }
        return uninstall_service(install::Platform::Windows, args.no_start);
    }
    let arch = if cfg!(target_arch = "aarch64") { "aarch64" } else { "x86_64" };
    let guest_dir = args.guest_dir.unwrap_or_else(paths::default_guest_dir);
    let binaries = lima::guest_binaries(&guest_dir, arch).with_context(|| {
        format!(
            "{} has no guest binaries for {arch}: unpack finch-bridge-guest-VERSION-linux-{arch}.tar.gz there; nothing was set up",
            guest_dir.display()
        )
    })?;
    anyhow::ensure!(
        args.no_wsl || cfg!(windows),
        "wsl.exe runs only on Windows: pass --no-wsl and install the guest side yourself"
    );
    let mounts = if args.harden {
        Some(harden_plan(&args.lima_home, &args.shares, &finch, &config_path, &state_dir)?)
    } else {
        None
    };
    let done = finch_wsl::wire(&finch, &binaries, &saved)?;
    for line in &done.said {
        print(&format!("{line}\n"));
    }
    if !done.helpers_before.is_empty() {
        print(&format!("creds_helpers was {:?}\n", done.helpers_before));
    }
    let text = finch_wsl::store_config_text(&config_text, Some(done.host_store.as_deref()))?;
    if text != config_text {
        write_config(&text)?;
    }
    print(&format!(
        "credsStore finchhost leads on this host to {}\n",
        done.host_store.as_deref().unwrap_or("the plaintext auths")
    ));
    let link = match args.link {
        Some(l) => l,
        None => "hvsock://wsl:6127".parse()?,
    };
    attach(&overrides, &name, Some((link.clone(), None)))?;
    let fstab = mounts.as_deref().map(finch_wsl::fstab_text);
    if let Some(mounts) = &mounts {
        for m in mounts {
            print(&format!(
                "{} {} at {}\n",
                if m.writable { "mounts" } else { "mounts read-only" },
                m.source,
                m.target
            ));
        }
    }
    if args.no_wsl {
        match &fstab {
            Some(text) => {
                paths::write_private(&fstab_copy, text.as_bytes())?;
                print(&format!(
                    "hardened: give install.sh --wsl-mounts {} in the distro (no drive is mounted whole there)\n",
                    fstab_copy.display()
                ));
            }
            None => {
                let _ = std::fs::remove_file(&fstab_copy);
            }
        }
    } else {
        install_in_distro(&overrides, &name, &link, &binaries, fstab.as_deref())?;
    }
    let run_args: Vec<String> = if named {
        vec!["--config".to_owned(), config_path.display().to_string()]
    } else {
        Vec::new()
    };
    install_service(install::Platform::Windows, false, args.no_start, &run_args)?;
    print("restart Finch's VM: finch vm stop; finch vm start\n");
    Ok(())
}

/// What `setup finch --harden` mounts in Finch's distro: the temporary directory, Lima's
/// instance (from `lima_home`, or Finch's install), the shares; none may hold or be inside
/// the agent's config, state or Finch's directory, or the home's `.aws`, `.docker`, `.ssh`.
fn harden_plan(
    lima_home: &Option<PathBuf>,
    shares: &[PathBuf],
    finch: &finch_wsl::FinchDir,
    config_path: &Path,
    state_dir: &Path,
) -> anyhow::Result<Vec<finch_wsl::DrvMount>> {
    let text = |p: &Path| p.to_string_lossy().into_owned();
    let lima_home = match lima_home {
        Some(h) => h.clone(),
        None => paths::env_path("ProgramFiles")
            .context("ProgramFiles is not set: give --lima-home")?
            .join(r"Finch\lima\data"),
    };
    let instance = lima_home.join("finch");
    anyhow::ensure!(
        instance.is_dir(),
        "Finch's VM is not in {} (finch vm init makes it; or give --lima-home): nothing was changed",
        instance.display()
    );
    let home = paths::home()?;
    let protected: Vec<(String, &str)> =
        finch_wsl::protected(&finch.dir, Some(config_path.to_owned()), state_dir, Some(home))
            .into_iter()
            .map(|(p, what)| (text(&p), what))
            .collect();
    let shares: Vec<String> = shares.iter().map(|s| text(s)).collect();
    finch_wsl::harden_mounts(&text(&std::env::temp_dir()), &text(&instance), &shares, &protected)
}

/// Installs the guest side in Finch's distro with `wsl.exe`, as root, from a bundle with the
/// VM's key staged in the temporary directory (which the distro reads, hardened too) and
/// removed again at once; `fstab`, when hardened, goes with it as `wsl-fstab`.
fn install_in_distro(
    overrides: &Overrides,
    name: &VmName,
    link: &finch_shared::endpoint::Endpoint,
    binaries: &Path,
    fstab: Option<&str>,
) -> anyhow::Result<()> {
    use finch_shared::endpoint::Endpoint;
    let guest_link = match link {
        Endpoint::Tcp { port, .. } => format!("tcp://127.0.0.1:{port}"),
        Endpoint::HvSock { port, .. } => format!("vsock://-1:{port}"),
        other => anyhow::bail!("Finch's distro is reached over hvsock:// or tcp://, not {other}"),
    };
    let settings = settings::Settings::load(overrides)?;
    let (key, _) = vm_keys::load_key(&settings, name)?;
    let bundle = std::env::temp_dir().join(format!("finch-bridge-{}", std::process::id()));
    let result = (|| {
        let scoped =
            settings.vms.get(name).map(|v| v.policy.tokens.registries()).unwrap_or_default();
        lima::write_bundle(&bundle, &lima::read_binaries(binaries)?, &key, &scoped)?;
        if let Some(text) = fstab {
            paths::write_private(&bundle.join("wsl-fstab"), text.as_bytes())?;
        }
        let uid = std::process::Command::new("wsl.exe")
            .args(["-d", finch_wsl::DISTRO, "--", "id", "-u"])
            .output()
            .context("cannot run wsl.exe")?;
        let uid: u32 = String::from_utf8_lossy(&uid.stdout)
            .trim()
            .parse()
            .context("cannot tell the distro's user (wsl.exe -d lima-finch -- id -u)")?;
        let script = finch_wsl::install_script(
            &bundle.display().to_string(),
            &guest_link,
            uid,
            fstab.is_some(),
        );
        run_in_distro(&script, "install.sh")
    })();
    let _ = std::fs::remove_dir_all(&bundle);
    result
}

/// Runs uninstall.sh in Finch's distro (what install.sh changed there, the hardened mounts
/// included, goes back at the distro's next start).
fn uninstall_in_distro() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("finch-bridge-{}", std::process::id()));
    let result = (|| {
        finch_shared::private::create_dir_all(&dir)?;
        std::fs::write(dir.join("uninstall.sh"), lima::UNINSTALL_SH)?;
        let quoted = dir.display().to_string().replace('\'', "'\\''");
        run_in_distro(
            &format!("set -e; sh \"$(wslpath -u '{quoted}')/uninstall.sh\""),
            "uninstall.sh",
        )
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// `wsl.exe -d lima-finch -u root -- sh -c SCRIPT`, which must succeed.
fn run_in_distro(script: &str, what: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("wsl.exe")
        .args(["-d", finch_wsl::DISTRO, "-u", "root", "--", "sh", "-c", script])
        .status()
        .context("cannot run wsl.exe")?;
    anyhow::ensure!(status.success(), "{what} in {} failed ({status})", finch_wsl::DISTRO);
    Ok(())
}

fn uninstall_service(platform: install::Platform, no_stop: bool) -> anyhow::Result<()> {
    let file = install::service_file(platform, &paths::home()?, Path::new("/"), &[]);
    install::uninstall(platform, &file.path, no_stop)?;
    print(&format!("removed {}\n", file.path.display()));
    Ok(())
}

fn run(overrides: Overrides) -> anyhow::Result<()> {
    let prepared = agent::prepare(&overrides)?;
    let agent = agent::Agent::new(overrides, &prepared);
    let settings = agent.settings();
    let _lock = control::lock(&settings.state_dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = control::bind(&settings.state_dir)?;
        let (stop, shutdown) = finch_shared::link::Shutdown::new();
        let applied = agent.apply(prepared).await;
        if applied.started == 0 {
            tracing::warn!(config = %settings.config_file.display(), "no VM to serve yet: add a [vm.NAME] table to the config file (then `finch-host-agent reload`) or pass --vm NAME=ENDPOINT");
        }
        tracing::info!(
            vms = applied.started,
            config = %settings.config_file.display(),
            docker_config = %settings.docker_config.display(),
            "host agent ready"
        );
        // The control channel runs beside the rest, on this task (not spawned): it stops
        // when `stop` fires, after the links.
        let control = control::serve(listener, agent.clone(), shutdown.clone());
        let running = async {
            wait_for_stop(&agent).await;
            stop.fire();
            agent.stop_all().await;
        };
        tokio::join!(control, running);
        tracing::info!("host agent stopped");
        Ok(())
    })
}

/// Runs until the OS asks it to stop (SIGTERM or SIGINT; Ctrl-C, Ctrl-Break or console
/// close on Windows); reloads on SIGHUP (unix) and when the config file changes.
async fn wait_for_stop(agent: &agent::Agent) {
    let mut signals = match platform::Signals::new() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot install signal handlers");
            return std::future::pending().await;
        }
    };
    let mut poll = tokio::time::interval(CONFIG_POLL);
    loop {
        tokio::select! {
            event = signals.next() => match event {
                platform::Event::Stop(why) => { tracing::info!("{why}: shutting down"); return }
                #[cfg(unix)]
                platform::Event::Reload(why) => { let _ = agent.reload(why).await; }
            },
            _ = poll.tick() => {
                if agent.config_changed() {
                    let _ = agent.reload("config file changed").await;
                } else if agent.lima_changed().await {
                    let _ = agent.reload("Lima instances changed").await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn library_events_are_capped_whatever_rust_log_says() {
        use tracing::Level;
        for target in ["aws_smithy_runtime::client::orchestrator", "aws_sdk_ecr", "hyper_util::x"] {
            assert!(!super::library_allows(target, &Level::TRACE), "{target}");
            assert!(!super::library_allows(target, &Level::DEBUG), "{target}");
            assert!(!super::library_allows(target, &Level::INFO), "{target}");
            assert!(super::library_allows(target, &Level::WARN), "{target}");
        }
        assert!(super::library_allows("finch_host_agent::link", &Level::TRACE));
        assert!(super::library_allows("hyperfine_like", &Level::TRACE));
    }
}

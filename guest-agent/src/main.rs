//! `finch-guest-agent`: the daemon inside the VM.
//!
//! Modules (in the library): `agent::helper_socket` accepts helper calls and checks the
//! caller's uid; `agent::listener` accepts the host's link and authenticates it (both
//! through `finch_shared::accept`); `agent::link` holds the current link (`LinkSlot`) and is
//! the guest's `Role` in `finch_shared::link::drive`, the loop both ends run.
//!
//! Path of a request: `docker-credential-finchhost get` → helper socket (uid checked) →
//! `LinkSlot::request` (waits a bounded time for a link) → `LinkMsg::Request` on the link →
//! host agent → `LinkMsg::Response` → back to the helper.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use finch_guest_agent::agent::{self, Config, Shutdown};
use finch_shared::endpoint::Endpoint;
use finch_shared::key::LinkKey;

#[derive(Debug, Parser)]
#[command(
    name = "finch-guest-agent",
    version,
    about = "Guest agent of the finch credential bridge"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve helper calls over the link to the host agent.
    Serve(ServeArgs),
    /// Point a docker config's credsStore at finchhost, or put back what was there.
    #[command(subcommand)]
    DockerConfig(DockerConfigCommand),
}

#[derive(Debug, Subcommand)]
enum DockerConfigCommand {
    /// Set credsStore (other keys, mode and owner kept), recording the previous value once.
    SetCredsStore(CredsStoreArgs),
    /// Put back the recorded credsStore, if credsStore is still NAME.
    RestoreCredsStore(CredsStoreArgs),
}

#[derive(Debug, clap::Args)]
struct CredsStoreArgs {
    /// The docker config file (config.json).
    #[arg(long)]
    file: PathBuf,
    /// The helper name.
    #[arg(long, default_value = "finchhost")]
    name: String,
    /// Where the previous value is recorded (set-creds-store writes it, restore reads it).
    #[arg(long)]
    record: PathBuf,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Unix socket that docker-credential-finchhost connects to.
    #[arg(long, env = "FINCH_GUEST_AGENT_SOCKET", default_value = agent::DEFAULT_HELPER_SOCKET)]
    helper_socket: PathBuf,
    /// Also allow this uid to call the helper (root and the agent's own uid always may). Repeatable.
    #[arg(long = "allow-uid", value_name = "UID")]
    allow_uids: Vec<u32>,
    /// Give the helper socket to this group (name or GID; mode 0660), so allowed users can connect.
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// Where the host agent's link arrives: unix:///abs/path, vsock://-1:PORT (default port
    /// 6127) or tcp://IP:PORT (loopback unless --link-listen-non-loopback).
    #[arg(long, default_value = agent::DEFAULT_LINK_LISTEN)]
    link_listen: Endpoint,
    /// Let a tcp:// link listen on an address other than loopback (WSL2 NAT, a bridged VM).
    /// Only the link's mutual authentication then keeps others out.
    #[arg(long)]
    link_listen_non_loopback: bool,
    /// Also accept a unix link connection from this uid (the socket forwarder's). Repeatable.
    #[arg(long = "link-allow-uid", value_name = "UID")]
    link_allow_uids: Vec<u32>,
    /// The VM's link key: at least 32 random bytes, readable by its owner only.
    #[arg(long, default_value = agent::DEFAULT_LINK_KEY_FILE)]
    link_key_file: PathBuf,
    /// How long a helper call waits for a link that is not up yet, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = agent::DEFAULT_LINK_WAIT.as_millis() as u64)]
    link_wait_ms: u64,
    /// How long a request may take on the host, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = agent::DEFAULT_REQUEST_TIMEOUT.as_secs())]
    request_timeout_secs: u64,
    /// Heartbeat interval on the link, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = agent::DEFAULT_HEARTBEAT.as_millis() as u64)]
    heartbeat_ms: u64,
    /// Also answer Finch's credential socket here (/run/user/UID/finch-creds.sock: what
    /// Finch's own docker-credential-finchhost asks), from the bridge, under the host's
    /// policy; the path is taken back whenever something replaces it.
    #[arg(long, value_name = "PATH")]
    finch_creds_socket: Option<PathBuf>,
    /// Run the registry front on this loopback address (127.0.0.1:6128 is install.sh's
    /// choice): containerd's hosts.toml names it as a host of each scoped registry, and its
    /// clients get short-lived scoped tokens from the host instead of passwords. Callers are
    /// checked by uid like the helper's.
    #[arg(long, value_name = "IP:PORT")]
    front_listen: Option<std::net::SocketAddr>,
    /// How long the registry front waits for a registry's answer to a request without a body,
    /// in seconds (an upload's has an hour, and its body 60 s of silence).
    #[arg(long, value_name = "SECS", default_value_t = agent::front::DEFAULT_ANSWER_TIMEOUT.as_secs())]
    front_answer_timeout_secs: u64,
    /// Where the registry front's TLS certificates are: ca.crt, client.cert, client.key (what
    /// clients name in hosts.toml and certs.d) and server/; made there when missing. The
    /// front serves only clients holding client.cert (root's; --socket-group may read it).
    #[arg(long, value_name = "DIR", default_value = agent::front::tls::DEFAULT_CERTS_DIR)]
    front_certs_dir: PathBuf,
}

fn main() -> ExitCode {
    init_tracing();
    let result = match Cli::parse().command {
        Command::Serve(args) => run(args),
        Command::DockerConfig(DockerConfigCommand::SetCredsStore(a)) => {
            finch_guest_agent::docker_config::set_creds_store(&a.file, &a.name, &a.record)
                .map(|_| ())
        }
        Command::DockerConfig(DockerConfigCommand::RestoreCredsStore(a)) => {
            finch_guest_agent::docker_config::restore_creds_store(&a.file, &a.name, &a.record)
                .map(|_| ())
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

/// Library crates whose events are written at `warn` and above only, whatever `RUST_LOG`
/// says: below it the HTTP and TLS crates of the registry front describe requests whole.
const CAPPED_TARGETS: &[&str] = &["hyper", "hyper_util", "hyper_rustls", "h2", "rustls"];

fn init_tracing() {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let cap = tracing_subscriber::filter::filter_fn(|m| {
        !finch_shared::limit::is_capped_target(m.target(), CAPPED_TARGETS)
            || *m.level() <= tracing::Level::WARN
    });
    use std::io::IsTerminal;
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_filter(filter)
        .with_filter(cap);
    tracing_subscriber::registry().with(layer).init();
    tracing::trace!(capped = ?CAPPED_TARGETS, "library events capped");
}

fn run(args: ServeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (100..=3_600_000).contains(&args.heartbeat_ms),
        "--heartbeat-ms must be between 100 and 3600000"
    );
    let key = LinkKey::load(&args.link_key_file).context("loading the link key")?;
    let config = Config {
        helper_socket: args.helper_socket,
        allow_uids: args.allow_uids,
        socket_group: args.socket_group.as_deref().map(group_id).transpose()?,
        link_listen: args.link_listen,
        link_allow_uids: args.link_allow_uids,
        link_listen_non_loopback: args.link_listen_non_loopback,
        key,
        link_wait: Duration::from_millis(args.link_wait_ms),
        request_timeout: Duration::from_secs(args.request_timeout_secs.max(1)),
        heartbeat: Duration::from_millis(args.heartbeat_ms),
        finch_creds_socket: args.finch_creds_socket,
        front_listen: args.front_listen,
        front_answer_timeout: Duration::from_secs(args.front_answer_timeout_secs.clamp(1, 3600)),
        front_certs_dir: args.front_certs_dir,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let (stop, shutdown) = Shutdown::new();
        let signals = tokio::spawn(async move {
            wait_for_signal().await;
            stop.fire();
        });
        let result = agent::serve(config, shutdown).await;
        signals.abort();
        result
    })
}

/// A group given by number or by name.
fn group_id(group: &str) -> anyhow::Result<u32> {
    if let Ok(gid) = group.parse() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => anyhow::bail!("--socket-group: no group named {group:?}"),
        Err(e) => Err(e).with_context(|| format!("--socket-group: cannot look up {group:?}")),
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::warn!("cannot install signal handlers");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

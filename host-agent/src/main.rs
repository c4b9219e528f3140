//! `finch-host-agent`: the daemon on the host, started at login.
//!
//! Modules: `config` (flags, defaults, `--vm` specs, keys), `link` (dial each VM,
//! authenticate, serve, reconnect), `resolve` (route a request in docker/cli's order, try
//! every registry spelling, audit), `source` (the credential sources behind one trait).
//!
//! Path of a request: guest's `LinkMsg::Request` → `link::serve` spawns →
//! `Resolver::handle` → `source::*` (host helper or plaintext `auths`) → audit line →
//! `LinkMsg::Response` back on the same link.

mod config;
mod link;
mod resolve;
mod source;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "finch-host-agent", version, about = "Host agent of the finch credential bridge")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Dial every VM and answer its credential requests until stopped.
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// A VM to serve: NAME=ENDPOINT[,key=PATH], e.g. default=unix:///path/to/link.sock. Repeatable.
    #[arg(long = "vm", value_name = "NAME=ENDPOINT[,key=PATH]", required = true)]
    vms: Vec<config::VmSpec>,
    /// The host's docker config directory [default: ~/.finch].
    #[arg(long, value_name = "DIR")]
    docker_config: Option<PathBuf>,
    /// Where VM keys live [env: FINCH_HOST_AGENT_STATE_DIR; default: ~/.finch/host-agent].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Time a host credential helper may take, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = source::exec_helper::DEFAULT_TIMEOUT.as_secs())]
    helper_timeout_secs: u64,
    /// Heartbeat interval on each link, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = link::DEFAULT_HEARTBEAT.as_millis() as u64)]
    heartbeat_ms: u64,
    /// Cap of the reconnect delay, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = link::DEFAULT_BACKOFF_MAX.as_millis() as u64)]
    reconnect_max_ms: u64,
}

fn main() -> ExitCode {
    init_tracing();
    let Cli { command: Command::Run(args) } = Cli::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (100..=3_600_000).contains(&args.heartbeat_ms),
        "--heartbeat-ms must be between 100 and 3600000"
    );
    anyhow::ensure!(args.helper_timeout_secs >= 1, "--helper-timeout-secs must be at least 1");
    let state_dir = config::state_dir(args.state_dir)?;
    let docker_config = config::docker_config_dir(args.docker_config)?;
    let mut names = std::collections::HashSet::new();
    let mut vms = Vec::new();
    for spec in &args.vms {
        anyhow::ensure!(names.insert(spec.name.clone()), "VM {} is given twice", spec.name);
        vms.push(link::VmLink {
            name: spec.name.clone(),
            endpoint: spec.endpoint.clone(),
            key: config::load_key(spec, &state_dir)?,
            heartbeat: Duration::from_millis(args.heartbeat_ms),
            backoff_max: Duration::from_millis(
                args.reconnect_max_ms.max(link::BACKOFF_MIN.as_millis() as u64),
            ),
        });
    }
    let resolver = Arc::new(resolve::Resolver::new(resolve::ResolverSettings {
        docker_config: docker_config.clone(),
        helper_path: std::env::var_os("PATH").unwrap_or_default(),
        helper_timeout: Duration::from_secs(args.helper_timeout_secs),
    }));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        tracing::info!(vms = vms.len(), docker_config = %docker_config.display(), "host agent ready");
        let mut tasks = tokio::task::JoinSet::new();
        for vm in vms {
            tasks.spawn(link::run_vm(vm, resolver.clone(), shutdown.clone()));
        }
        wait_for_signal().await;
        let _ = stop.send(true);
        while tasks.join_next().await.is_some() {}
        tracing::info!("host agent stopped");
        Ok(())
    })
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

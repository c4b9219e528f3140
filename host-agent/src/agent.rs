//! The running host agent: the links to every VM, the settings requests are answered from,
//! and reloads that change them without dropping the links that stay the same.
//!
//! A reload (SIGHUP, `finch-host-agent reload`, or the config file changing) loads every
//! setting and key first; only if all of it is good does anything change. A bad file keeps
//! the old config in force, and the reason is logged, shown by `status` and returned.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use finch_shared::key::LinkKey;
use finch_shared::link::{Shutdown, Trigger};
use tokio::task::JoinHandle;

use crate::lima::{Adopted, Instance};
use crate::link::{self, VmLink};
use crate::platform::paths;
use crate::resolve::{Current, Resolver};
use crate::settings::{LimaSettings, Overrides, Settings, VmName};
use crate::status::{AgentStatus, StatusBoard};

struct Running {
    link: VmLink,
    stop: Trigger,
    task: JoinHandle<()>,
}

/// What a reload changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Links left running as they were.
    pub kept: usize,
    /// Links started (new VMs, or changed endpoint, key or timing).
    pub started: usize,
    /// Links stopped (VMs removed or changed).
    pub stopped: usize,
}

impl std::fmt::Display for Applied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} links kept, {} started, {} stopped", self.kept, self.started, self.stopped)
    }
}

/// Settings with every VM's key loaded: ready to apply.
pub struct Prepared {
    settings: Settings,
    keys: BTreeMap<VmName, LinkKey>,
    lima_stamp: LimaStamp,
}

/// Loads the settings for `overrides` and adopts the Lima instances they serve, saying what
/// discovery left out; with the Lima home's [`LimaStamp`] taken before discovery, so a change
/// made while the agent acts on what it found (an instance gone and made again by `vm init`)
/// differs from it and is seen at the next check. (The agent's own writes differ from it too:
/// one more reload, which finds everything wired and writes nothing.)
pub fn load(overrides: &Overrides) -> anyhow::Result<(Settings, Adopted, LimaStamp)> {
    let mut settings = Settings::load(overrides)?;
    let stamp = lima_stamp(&settings);
    let adopted = crate::lima::adopt(&mut settings, &paths::home().unwrap_or_default());
    if adopted.left_out > 0 {
        tracing::warn!(
            left_out = adopted.left_out,
            max = crate::lima::MAX_INSTANCES,
            "Lima home: instances or entries past the bound are not served"
        );
    }
    Ok((settings, adopted, stamp))
}

/// Loads settings and keys for `overrides`; creates the state directory and missing keys.
pub fn prepare(overrides: &Overrides) -> anyhow::Result<Prepared> {
    let (settings, adopted, lima_stamp) = load(overrides)?;
    paths::private_dir(&settings.state_dir)?;
    let mut keys = BTreeMap::new();
    for name in settings.vms.keys() {
        let (key, home) = crate::vm_keys::load_key(&settings, name)?;
        tracing::debug!(vm = %name, key = %home, "VM key loaded");
        keys.insert(name.clone(), key);
    }
    if let Some(lima) = &settings.lima {
        trust_lima(&settings, &adopted);
        wire_lima(lima, &adopted.instances, &keys, &settings);
        crate::vm_keys::forget_vanished_lima(&settings, &adopted.instances, || {
            crate::vm_keys::os_vault(settings.keychain_timeout)
        });
    }
    Ok(Prepared { settings, keys, lima_stamp })
}

/// Says when `"*"` adopted nothing because a VM can write the Lima home, and records it (the
/// marker keeps it so when the VM later hides its mount).
fn trust_lima(settings: &Settings, adopted: &Adopted) {
    let Some(untrusted) = &adopted.untrusted else { return };
    let marker = settings.state_dir.join(crate::lima::HOME_WRITABLE_MARKER);
    tracing::warn!(
        reason = %untrusted.reason,
        marker = %marker.display(),
        "Lima home: a VM can write it, so [lima] instances = [\"*\"] adopts no instance (a \
         directory made there from inside the VM would become one): name the instances to \
         serve, or mount the home read-only in every VM and then remove the marker"
    );
    if !untrusted.from_marker {
        let text = format!("{}\n", untrusted.reason);
        if let Err(e) = paths::write_private(&marker, text.as_bytes()) {
            tracing::warn!(error = %format!("{e:#}"), "cannot record that the Lima home is writable from a VM");
        }
    }
}

/// Fills each discovered Lima instance's bundle and, with `keep_fragment`, puts the fragment
/// back into `_config/default.yaml`. One instance's trouble is logged and leaves the others.
fn wire_lima(
    lima: &LimaSettings,
    instances: &BTreeMap<VmName, Instance>,
    keys: &BTreeMap<VmName, LinkKey>,
    settings: &Settings,
) {
    use crate::lima;
    let home = paths::home().unwrap_or_default();
    match (lima.keep_fragment, lima::Wiring::of(lima, &home)) {
        (false, _) => {}
        (true, Some(wiring)) => {
            let template = lima.template.as_deref().unwrap_or(Path::new(""));
            for (file, done) in lima::wire_finch(template, instances, Some(&wiring)) {
                match done {
                    Ok(lima::Wired::Written) => {
                        tracing::info!(file = ?file, "Finch config wired");
                        let dir = file.parent().unwrap_or(Path::new(""));
                        if file != template && lima::started_before_its_config(dir) {
                            tracing::warn!(
                                instance = ?dir,
                                "the VM runs without the bridge's wiring (its config was wired \
                                 after it started): restart it, finch vm stop && finch vm start"
                            );
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(file = ?file, error = ?format!("{e:#}"), "cannot wire a Finch config")
                    }
                }
            }
        }
        (true, None) => match lima::update_default_yaml(&lima.config_dir(), true) {
            Ok(true) => {
                tracing::info!(dir = ?lima.config_dir(), "fragment merged into default.yaml")
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = ?format!("{e:#}"), "cannot merge the fragment"),
        },
    }
    for (name, instance) in instances {
        let Some(key) = keys.get(name) else { continue };
        let arch = match lima::LimaYaml::read(lima, instance) {
            Ok(y) => y.arch(),
            Err(e) => {
                tracing::warn!(vm = ?name, error = ?format!("{e:#}"), "cannot read the instance's Lima config");
                continue;
            }
        };
        // The registries the VM's pull/push rules name: its registry front is wired for them.
        let scoped =
            settings.vms.get(name).map(|v| v.policy.tokens.registries()).unwrap_or_default();
        match lima::fill_bundle(instance, &arch, &lima.guest_dir, key, &scoped) {
            Ok(f) if f.written > 0 => {
                tracing::info!(vm = ?name, arch = ?arch, files = f.written, "bundle filled");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(vm = ?name, error = ?format!("{e:#}"), "bundle not filled");
            }
        }
    }
}

/// What, of the Lima side, makes a reload due: the instances there, and the stamps of
/// `default.yaml` (Finch's `vm init` rewrites it), Finch's template (an upgrade replaces it)
/// and each instance's `lima.yaml`.
pub type LimaStamp = Option<(Vec<VmName>, Vec<Option<FileStamp>>)>;

/// The [`LimaStamp`] for `settings` now (reads the Lima home: call it off the runtime).
pub fn lima_stamp(settings: &Settings) -> LimaStamp {
    let lima = settings.lima.as_ref()?;
    let instances = crate::lima::discover(lima).0;
    let mut stamps = vec![stamp(&lima.config_dir().join("default.yaml"))];
    stamps.extend(lima.template.as_deref().map(stamp));
    stamps.extend(instances.values().map(|i| stamp(&i.dir.join("lima.yaml"))));
    Some((instances.into_keys().collect(), stamps))
}

/// The agent.
pub struct Agent {
    overrides: Overrides,
    resolver: Arc<Resolver>,
    board: Arc<StatusBoard>,
    links: tokio::sync::Mutex<BTreeMap<VmName, Running>>,
    started: Instant,
    config_error: Mutex<Option<String>>,
    config_stamp: Mutex<Option<FileStamp>>,
    lima_stamp: Mutex<LimaStamp>,
    /// Held by a reload from reading the files to the last link change, so two reloads
    /// cannot interleave and leave the resolver and the links on different configs.
    reloading: tokio::sync::Mutex<()>,
}

/// Longest a link may take to stop before its task is aborted.
pub const STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("started", &self.started).finish_non_exhaustive()
    }
}

use crate::platform::{FileStamp, stamp};

impl Agent {
    /// An agent for `prepared` (nothing runs until [`Agent::apply`]).
    pub fn new(overrides: Overrides, prepared: &Prepared) -> Arc<Agent> {
        let board = Arc::new(StatusBoard::default());
        let current = Current::new(prepared.settings.clone(), None);
        Arc::new(Agent {
            overrides,
            resolver: Arc::new(Resolver::new(current, board.clone())),
            board,
            links: tokio::sync::Mutex::new(BTreeMap::new()),
            started: Instant::now(),
            config_error: Mutex::new(None),
            config_stamp: Mutex::new(stamp(&prepared.settings.config_file)),
            lima_stamp: Mutex::new(prepared.lima_stamp.clone()),
            reloading: tokio::sync::Mutex::new(()),
        })
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<Settings> {
        self.resolver.current().settings
    }

    /// Makes `prepared` the config in force: requests use it from now on; links whose
    /// endpoint, key and timing are unchanged keep running.
    pub async fn apply(&self, prepared: Prepared) -> Applied {
        let Prepared { settings, keys, .. } = prepared;
        let previous = self.resolver.current();
        let mut wanted = BTreeMap::new();
        for (name, vm) in &settings.vms {
            let Some(key) = keys.get(name) else { continue };
            wanted.insert(
                name.clone(),
                VmLink {
                    name: name.clone(),
                    endpoint: vm.endpoint.clone(),
                    key: key.clone(),
                    heartbeat: settings.heartbeat,
                    backoff_max: settings.reconnect_max.max(link::BACKOFF_MIN),
                },
            );
        }
        // Links and resolver change under one lock, so nobody sees one without the other.
        let mut links = self.links.lock().await;
        self.board
            .configure(settings.vms.iter().map(|(n, v)| (n.as_str(), v.endpoint.to_string())));
        self.resolver.replace(Current::new(settings, Some(&previous)));
        let mut applied = Applied::default();
        let names: Vec<VmName> = links.keys().cloned().collect();
        let mut stopping = Vec::new();
        for name in names {
            let keep = wanted
                .get(&name)
                .is_some_and(|w| links.get(&name).is_some_and(|r| r.link.same_as(w)));
            if keep {
                wanted.remove(&name);
                applied.kept += 1;
            } else if let Some(running) = links.remove(&name) {
                stopping.push(running);
                applied.stopped += 1;
            }
        }
        stop_links(stopping).await;
        for (name, link) in wanted {
            let (stop, stopped) = Shutdown::new();
            let task = tokio::spawn(link::run_vm(
                link.clone(),
                self.resolver.clone(),
                self.board.clone(),
                stopped,
            ));
            links.insert(name, Running { link, stop, task });
            applied.started += 1;
        }
        applied
    }

    /// Reloads the config; on any error the old config stays in force.
    pub async fn reload(&self, why: &str) -> anyhow::Result<Applied> {
        let _one = self.reloading.lock().await;
        let file = self.settings().config_file.clone();
        *self.config_stamp.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = stamp(&file);
        // Settings and keys are files: read off the runtime.
        let overrides = self.overrides.clone();
        let prepared = tokio::task::spawn_blocking(move || prepare(&overrides))
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("the reload worker failed: {e}")));
        match prepared {
            Ok(prepared) => {
                *self.lima_stamp.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                    prepared.lima_stamp.clone();
                let applied = self.apply(prepared).await;
                *self.config_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
                tracing::info!(why, %applied, "config reloaded");
                Ok(applied)
            }
            Err(e) => {
                let text = format!("{e:#}");
                tracing::error!(why, error = %text, "config not reloaded; the previous config stays in force");
                *self.config_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some(text);
                Err(e)
            }
        }
    }

    /// Whether the Lima home's instances or `default.yaml` changed since the last reload.
    pub async fn lima_changed(&self) -> bool {
        let settings = self.settings();
        if settings.lima.is_none() {
            return false;
        }
        let now = tokio::task::spawn_blocking(move || lima_stamp(&settings)).await.ok();
        let seen = self.lima_stamp.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        now.is_some_and(|now| *seen != now)
    }

    /// Whether the config file changed since it was last read.
    pub fn config_changed(&self) -> bool {
        let file: PathBuf = self.settings().config_file.clone();
        let now = stamp(&file);
        *self.config_stamp.lock().unwrap_or_else(std::sync::PoisonError::into_inner) != now
    }

    /// The status `finch-host-agent status` shows.
    pub fn status(&self) -> AgentStatus {
        let settings = self.settings();
        AgentStatus {
            pid: std::process::id(),
            uptime_secs: self.started.elapsed().as_secs(),
            config_file: settings.config_file.display().to_string(),
            config_file_found: settings.config_file.exists(),
            config_error: self
                .config_error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
            docker_config: settings.docker_config.display().to_string(),
            cache_entries: self.resolver.current().ecr.cached() as u64,
            vms: Self::with_restarts(self.board.snapshot(), &settings),
        }
    }

    /// `vms`, each Lima instance that started before its `lima.yaml` last changed marked so.
    fn with_restarts(
        mut vms: BTreeMap<String, crate::status::VmStatus>,
        settings: &Settings,
    ) -> BTreeMap<String, crate::status::VmStatus> {
        let Some(lima) = &settings.lima else { return vms };
        for (name, vm) in &mut vms {
            let dir = lima.home.join(name);
            // Only a VM the agent dials in that instance directory is that instance.
            let socket = finch_shared::endpoint::Endpoint::Unix(dir.join(crate::lima::LINK_SOCKET));
            let is_instance =
                settings.vms.iter().any(|(n, v)| n.as_str() == name && v.endpoint == socket);
            if is_instance && crate::lima::started_before_its_config(&dir) {
                vm.restart_for = Some(dir.join("lima.yaml").display().to_string());
            }
        }
        vms
    }

    /// Stops every link at once and waits for them, and the ECR refreshes under way.
    pub async fn stop_all(&self) {
        let mut links = self.links.lock().await;
        stop_links(std::mem::take(&mut *links).into_values().collect()).await;
        self.resolver.current().ecr.stop();
    }
}

/// Stops `links` together: each is told at once, then each gets [`STOP_TIMEOUT`] before its
/// task is aborted, so stopping many takes as long as the slowest, not their sum.
async fn stop_links(links: Vec<Running>) {
    for running in &links {
        running.stop.fire();
    }
    let stops = links.into_iter().map(stop);
    let mut all = tokio::task::JoinSet::new();
    for s in stops {
        all.spawn(s);
    }
    while all.join_next().await.is_some() {}
}

/// Stops a link, waiting at most [`STOP_TIMEOUT`] before aborting its task.
async fn stop(running: Running) {
    running.stop.fire();
    let mut task = running.task;
    if tokio::time::timeout(STOP_TIMEOUT, &mut task).await.is_err() {
        tracing::warn!(vm = %running.link.name, "the link did not stop in time; aborted");
        task.abort();
        let _ = task.await;
    }
}

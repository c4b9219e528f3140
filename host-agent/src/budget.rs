//! What each VM has stored on the host, so one VM cannot fill a store every VM shares.
//!
//! A `store` from a VM reserves its registry and size here before the source writes; a
//! failed write gives the reservation back; an `erase` from that VM releases it. Each VM may
//! hold at most [`MAX_STORED_PER_VM`] registries and [`MAX_STORED_BYTES_PER_VM`] bytes
//! (names, usernames and secrets). Credentials the host's own user stored do not count. The
//! ledger holds registry names and sizes only, never a credential, and is kept in
//! `STATE/stores.json` so the budget survives restarts.
//!
//! A VM's stores and erases take their [`StoreBudget::turn`] one at a time, from the
//! reservation to the write (or from the erase to the release), so the ledger and the store
//! never disagree: a store racing an erase of the same registry cannot leave an entry in the
//! store that the ledger has released.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use finch_shared::message::WireError;

/// Most registries one VM may have stored at once.
pub const MAX_STORED_PER_VM: usize = 64;
/// Most bytes (server names, usernames, secrets) one VM may have stored at once.
pub const MAX_STORED_BYTES_PER_VM: u64 = 256 * 1024;
/// The ledger's file in the state directory.
pub const LEDGER_FILE: &str = "stores.json";
/// Largest ledger read (it cannot grow past the configured VMs' budgets).
const MAX_LEDGER: u64 = 4 * 1024 * 1024;

type Ledger = BTreeMap<String, BTreeMap<String, u64>>;

/// The ledger of one state directory.
#[derive(Debug)]
pub struct StoreBudget {
    path: PathBuf,
    ledger: Mutex<Option<Ledger>>,
    turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Most VMs whose turns are kept apart; VM names come from the host's configuration, so this
/// is never reached in practice, and past it VMs share one turn (correct, only slower).
const MAX_TURNS: usize = 1024;

/// A VM's turn to store or erase; the next one waits until this is dropped.
pub type Turn = tokio::sync::OwnedMutexGuard<()>;

/// A reservation: given back with [`StoreBudget::undo`] if the write fails.
#[derive(Debug)]
pub struct Reserved {
    vm: String,
    key: String,
    previous: Option<u64>,
}

impl StoreBudget {
    /// The ledger kept in `state_dir` (read when first needed).
    pub fn new(state_dir: &Path) -> Self {
        StoreBudget {
            path: state_dir.join(LEDGER_FILE),
            ledger: Mutex::new(None),
            turns: Mutex::default(),
        }
    }

    /// Waits for `vm`'s turn to store or erase: hold it from the reservation (or the erase)
    /// until the ledger says what the store holds.
    pub async fn turn(&self, vm: &str) -> Turn {
        let lock = {
            let mut turns = self.turns.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let key = if turns.len() >= MAX_TURNS && !turns.contains_key(vm) { "" } else { vm };
            turns.entry(key.to_owned()).or_default().clone()
        };
        lock.lock_owned().await
    }

    /// Where the ledger lives.
    #[cfg(test)]
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn with<T>(
        &self,
        edit: impl FnOnce(&mut Ledger) -> Result<T, WireError>,
    ) -> Result<T, WireError> {
        let mut guard = self.ledger.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let ledger = guard.get_or_insert_with(|| read(&self.path));
        let mut edited = ledger.clone();
        let out = edit(&mut edited)?;
        if edited != *ledger {
            write(&self.path, &edited).map_err(|e| {
                WireError::unavailable(format!(
                    "cannot record the store in {}: {e}",
                    self.path.display()
                ))
            })?;
            *ledger = edited;
        }
        Ok(out)
    }

    /// Reserves `bytes` for `key` in `vm`'s budget (replacing what `key` had), or refuses.
    pub fn reserve(&self, vm: &str, key: &str, bytes: u64) -> Result<Reserved, WireError> {
        self.with(|ledger| {
            let mine = ledger.entry(vm.to_owned()).or_default();
            let previous = mine.get(key).copied();
            let count = mine.len() + usize::from(previous.is_none());
            let total: u64 = mine.values().sum::<u64>() - previous.unwrap_or(0) + bytes;
            if count > MAX_STORED_PER_VM {
                return Err(WireError::Denied {
                    reason: format!(
                        "VM {vm} already stored credentials for {MAX_STORED_PER_VM} registries on the host: erase one first (docker logout)"
                    ),
                });
            }
            if total > MAX_STORED_BYTES_PER_VM {
                return Err(WireError::Denied {
                    reason: format!(
                        "VM {vm} would store more than {MAX_STORED_BYTES_PER_VM} bytes of credentials on the host: erase some first (docker logout)"
                    ),
                });
            }
            mine.insert(key.to_owned(), bytes);
            Ok(Reserved { vm: vm.to_owned(), key: key.to_owned(), previous })
        })
    }

    /// Gives a reservation back (the write it was for failed).
    pub fn undo(&self, reserved: Reserved) {
        let _ = self.with(|ledger| {
            let mine = ledger.entry(reserved.vm.clone()).or_default();
            match reserved.previous {
                Some(b) => mine.insert(reserved.key.clone(), b),
                None => mine.remove(&reserved.key),
            };
            ledger.retain(|_, m| !m.is_empty());
            Ok(())
        });
    }

    /// Releases `key` from `vm`'s budget (it was erased).
    pub fn release(&self, vm: &str, key: &str) {
        let _ = self.with(|ledger| {
            if let Some(mine) = ledger.get_mut(vm) {
                mine.remove(key);
            }
            ledger.retain(|_, m| !m.is_empty());
            Ok(())
        });
    }

    /// How many registries and bytes `vm` has stored.
    #[cfg(test)]
    pub fn used(&self, vm: &str) -> (usize, u64) {
        self.with(|ledger| {
            Ok(ledger.get(vm).map(|m| (m.len(), m.values().sum())).unwrap_or_default())
        })
        .unwrap_or_default()
    }
}

fn read(path: &Path) -> Ledger {
    use std::io::Read;
    let mut text = Vec::new();
    let read = std::fs::File::open(path)
        .and_then(|f| f.take(MAX_LEDGER).read_to_end(&mut text).map(|_| ()));
    match read {
        Ok(()) => serde_json::from_slice(&text).unwrap_or_else(|e| {
            tracing::warn!(file = %path.display(), error = %e, "the store ledger is unreadable; starting a new one");
            Ledger::new()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ledger::new(),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot read the store ledger; starting a new one");
            Ledger::new()
        }
    }
}

fn write(path: &Path, ledger: &Ledger) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(ledger).map_err(std::io::Error::other)?;
    finch_shared::private::write_atomic(path, &text, 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_vm_takes_turns_and_other_vms_do_not_wait() {
        let dir = tempfile::tempdir().unwrap();
        let budget = StoreBudget::new(dir.path());
        let held = budget.turn("a").await;
        let wait = std::time::Duration::from_millis(50);
        assert!(tokio::time::timeout(wait, budget.turn("a")).await.is_err(), "a ran twice at once");
        let _other = tokio::time::timeout(wait, budget.turn("b")).await.expect("b waited for a");
        drop(held);
        let _again = tokio::time::timeout(wait, budget.turn("a")).await.expect("a's turn was lost");
    }

    #[test]
    fn a_vm_is_held_to_its_count_and_bytes_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let budget = StoreBudget::new(dir.path());
        for i in 0..MAX_STORED_PER_VM {
            budget.reserve("a", &format!("r{i}.example"), 10).unwrap();
        }
        let e = budget.reserve("a", "one-more.example", 10).unwrap_err();
        assert_eq!(e.class(), "denied", "{e}");
        // Replacing one it holds is not a new registry; another VM has its own budget.
        budget.reserve("a", "r0.example", 20).unwrap();
        budget.reserve("b", "one-more.example", 10).unwrap();
        assert_eq!(budget.used("a"), (MAX_STORED_PER_VM, 10 * 63 + 20));
        budget.release("a", "r0.example");
        let restarted = StoreBudget::new(dir.path());
        assert_eq!(restarted.used("a"), (MAX_STORED_PER_VM - 1, 10 * 63));
        let e = restarted.reserve("b", "big.example", MAX_STORED_BYTES_PER_VM).unwrap_err();
        assert_eq!(e.class(), "denied");
        let r = restarted.reserve("b", "fits.example", 100).unwrap();
        restarted.undo(r);
        assert_eq!(restarted.used("b"), (1, 10));
        let text = std::fs::read_to_string(restarted.path()).unwrap();
        assert!(text.contains("one-more.example") && !text.contains("secret"));
    }
}

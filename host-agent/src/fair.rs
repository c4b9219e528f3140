//! Fair shares between VMs of what the host spends on their requests.
//!
//! One VM flooding requests must not slow another VM's: each link starts at most
//! [`crate::link::REQUEST_RATE`] requests a second after a burst (the rest wait their turn,
//! then `busy`), and host helper processes, the costliest work, are capped per VM
//! ([`MAX_HELPERS_PER_VM`]) and in all ([`MAX_HELPERS`]). A VM waiting for a helper slot
//! waits behind its own helper calls, never behind another VM's, and at most
//! [`HELPER_SLOT_WAIT`]; requests that need no helper never wait for one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Host helper processes running at once for all VMs.
pub const MAX_HELPERS: usize = 8;
/// Host helper processes running at once for one VM.
pub const MAX_HELPERS_PER_VM: usize = 2;
/// Longest a request waits for a helper slot before it is answered `busy`.
pub const HELPER_SLOT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// VMs whose helper slots are kept apart (VM names come from the host's config; past this,
/// the rest share one set).
const MAX_VMS: usize = 1024;

/// The helper slots.
#[derive(Debug)]
pub struct Shares {
    all: Arc<Semaphore>,
    per_vm: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Default for Shares {
    fn default() -> Self {
        Shares { all: Arc::new(Semaphore::new(MAX_HELPERS)), per_vm: Mutex::default() }
    }
}

/// A VM's slot to run a host helper; given back when dropped.
#[derive(Debug)]
pub struct HelperSlot {
    _vm: OwnedSemaphorePermit,
    _all: OwnedSemaphorePermit,
}

impl Shares {
    /// Waits for a slot to run a host helper for `vm`: first one of the VM's own, then one
    /// of all, so a VM never holds a shared slot while it waits for its own.
    pub async fn helper(&self, vm: &str) -> Option<HelperSlot> {
        tokio::time::timeout(HELPER_SLOT_WAIT, self.wait_helper(vm)).await.ok()
    }

    async fn wait_helper(&self, vm: &str) -> HelperSlot {
        let mine = {
            let mut per_vm = self.per_vm.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let key = if per_vm.len() >= MAX_VMS && !per_vm.contains_key(vm) { "" } else { vm };
            per_vm
                .entry(key.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(MAX_HELPERS_PER_VM)))
                .clone()
        };
        // The semaphores are never closed.
        let Ok(own) = mine.acquire_owned().await else { unreachable!("never closed") };
        let Ok(all) = self.all.clone().acquire_owned().await else { unreachable!("never closed") };
        HelperSlot { _vm: own, _all: all }
    }

    /// Helper slots free in all (tests).
    #[cfg(test)]
    pub fn free(&self) -> usize {
        self.all.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_vm_runs_its_share_of_helpers_and_leaves_the_rest() {
        let shares = Shares::default();
        let mut flood = Vec::new();
        for _ in 0..MAX_HELPERS_PER_VM {
            flood.push(shares.helper("a").await.unwrap());
        }
        let wait = Duration::from_millis(50);
        assert!(tokio::time::timeout(wait, shares.helper("a")).await.is_err(), "over its share");
        assert_eq!(shares.free(), MAX_HELPERS - MAX_HELPERS_PER_VM);
        let other = tokio::time::timeout(wait, shares.helper("b")).await;
        assert!(other.is_ok(), "another VM waited for the flooding one");
        drop(flood);
        drop(other);
        assert_eq!(shares.free(), MAX_HELPERS);
    }
}

//! Integration tests: real processes of all three binaries, linked over real sockets.
//!
//! * `protocol`: every case of the helper protocol through the whole chain, byte for byte.
//! * `link`: the link dropping and coming back, a host agent killed mid-request, slow and
//!   hung host helpers.
//! * `auth`: disallowed uids, impostors on either end of the link, replayed handshakes.
//! * `boundary`: the boundary under attack: names that parse two ways, floods of requests
//!   and connections, stores that fill a shared file, a forged boot id, concurrent writers;
//!   round 2: connection churn, a store/erase race, a Lima home the VM can write, a relay on
//!   the link, ECR name floods, one VM's flood against another's latency, a stopped host
//!   agent, bad frames, log growth.
//! * `provision`: the guest install scripts on a scratch root, units and service files, the
//!   Lima fragment, attach/detach.
//! * `readme`: the README's bridge command works as written.
//! * `reference`: differential tests against the reference helper (docker-credential-helpers).
//! * `ecr`: native ECR against the fake endpoint (`tests/fake_ecr.py`) and moto_server.
//! * `hostconfig`: per-VM policy, reloads, the control socket (`status`), `doctor`.
//! * `keychain`: the native Secret Service source vs Debian's docker-credential-secretservice
//!   on a real gnome-keyring, a locked keyring, no session bus.
//! * `vm`: a real VM (QEMU + vhost-device-vsock) with the guest agent on vsock, dialed by the
//!   host agent over hybrid vsock.
//! * `lima_vm`: a Debian 12 VM with systemd (`tests/vm/image`) brought up the Lima way:
//!   `setup finch`, the fragment's provisioning at every boot, Lima's ssh socket forward;
//!   podman and skopeo in the VM against a registry in the VM, ECR, reboot, a killed agent,
//!   a root container, and a scan of the VM's disk for the test's secrets.
//! * `aarch64`: the static aarch64 guest binaries (Finch on Apple Silicon) under
//!   `qemu-aarch64-static`, answering a `get` through the x86_64 host agent.
//! * `tokens`: scoped tokens, the host's half: the link's token request answered by
//!   exchanging the stored password at a real docker-registry's token realm (`auth: token`,
//!   a token server in `tests/tokens/`), cut to the VM's `pull`/`push` policy.
//! * `front`: scoped tokens end to end: containerd's `ctr` in a network namespace (the VM)
//!   pushes and pulls through the guest agent's registry front, wired by install.sh's
//!   hosts.toml, with tokens the host exchanged for the password it never sends the VM.
//! * `wine`: the Windows host agent (`x86_64-pc-windows-gnu`, release) under Wine, dialing a
//!   Linux guest agent over `tcp://`, answering from Wine's Credential Manager and from a
//!   Windows host helper; its named-pipe control channel, `doctor`, `install --print`.
//! * `finch`: Finch's own credential socket answered by the guest agent from the bridge.
//! * `e2e_skopeo`: Debian's docker-registry and skopeo, with gnome-keyring behind Debian's
//!   docker-credential-secretservice as the host's store.
//!
//! The binaries under test are the ones next to this test binary (`target/<profile>/`, or
//! `$FINCH_BIN_DIR`): `cargo test --workspace` builds them first; `cargo test -p finch-tests`
//! alone may run against stale ones.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod aarch64;
mod auth;
mod boundary;
mod e2e_skopeo;
mod ecr;
mod finch;
mod front;
mod hostconfig;
mod keychain;
mod lima_vm;
mod link;
mod protocol;
mod provision;
mod readme;
mod reference;
mod tokens;
mod vm;
mod wine;

//! The link handshake, sans I/O: mutual challenge-response over fresh nonces.
//!
//! ```text
//! host  → guest  HostHello  { versions, vm, nonce_h }
//! guest → host   GuestHello { version, boot_id, nonce_g, proof_g }
//! host  → guest  HostProof  { proof_h }
//! transcript = version ‖ versions ‖ vm ‖ nonce_h ‖ nonce_g ‖ boot_id   (lengths prefixed)
//! proof_x    = HMAC-SHA256(key, label_x ‖ transcript)
//! ```
//!
//! Distinct labels stop a proof from being reflected; fresh nonces on both sides stop a
//! recorded handshake from being replayed; the versions the host offered are in the
//! transcript, so a relay that strips versions from the hello fails the proofs instead of
//! choosing an older protocol. The host serves nothing until `proof_g` verifies, and the
//! guest sends no request until `proof_h` does. The key never crosses the link. Each side
//! finishes with the [`Session`] that seals every later frame ([`crate::seal`]).

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::key::LinkKey;
use crate::message::{Handshake, LINK_VERSIONS, MAX_VERSIONS, Nonce, Proof, RejectReason};
use crate::seal::{Role, Session};

type HmacSha256 = Hmac<Sha256>;

const GUEST_LABEL: &[u8] = b"finch-link v3 guest proof";
const HOST_LABEL: &[u8] = b"finch-link v3 host proof";

/// Longest VM name or boot id accepted in a handshake.
pub const MAX_NAME_LEN: usize = 256;

/// Why a handshake failed. Never carries key or proof bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The peer's proof did not verify: it does not hold this VM's key.
    #[error("the peer failed to prove the link key")]
    ProofMismatch,
    /// No version in common.
    #[error("no common protocol version (ours: {ours:?}, theirs: {theirs:?})")]
    VersionMismatch {
        /// Ours.
        ours: Vec<u16>,
        /// Theirs.
        theirs: Vec<u16>,
    },
    /// The peer refused the handshake.
    #[error("the peer refused the handshake: {0:?}")]
    PeerRejected(RejectReason),
    /// A message that does not belong at this step, or with out-of-range fields.
    #[error("unexpected handshake message: {0}")]
    Unexpected(&'static str),
    /// The random source failed.
    #[error("no randomness available for a nonce")]
    RandomUnavailable,
}

impl HandshakeError {
    /// The reject frame to send the peer for this error, if any.
    pub fn reject(&self) -> Option<Handshake> {
        let reason = match self {
            HandshakeError::ProofMismatch => RejectReason::BadProof,
            HandshakeError::VersionMismatch { .. } => RejectReason::NoCommonVersion,
            HandshakeError::Unexpected(_) => RejectReason::Unexpected,
            HandshakeError::PeerRejected(_) | HandshakeError::RandomUnavailable => return None,
        };
        Some(Handshake::Reject { reason })
    }
}

/// What both sides know once the handshake succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Established {
    /// Negotiated version.
    pub version: u16,
    /// VM name the host used.
    pub vm: String,
    /// Guest boot id.
    pub boot_id: String,
}

fn fresh_nonce() -> Result<Nonce, HandshakeError> {
    let mut nonce = [0u8; 32];
    getrandom::fill(&mut nonce).map_err(|_| HandshakeError::RandomUnavailable)?;
    Ok(nonce)
}

fn mac(key: &LinkKey, label: &[u8], t: &Transcript<'_>) -> HmacSha256 {
    // HMAC takes keys of any length.
    let mut mac = match HmacSha256::new_from_slice(key.bytes()) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts keys of every length"),
    };
    mac.update(label);
    mac.update(&t.bytes());
    mac
}

struct Transcript<'a> {
    version: u16,
    offered: &'a [u16],
    vm: &'a str,
    host_nonce: &'a Nonce,
    guest_nonce: &'a Nonce,
    boot_id: &'a str,
}

impl Transcript<'_> {
    /// The bytes both proofs and the session keys are over; every variable field is
    /// length-prefixed, so no two transcripts share their bytes.
    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128 + self.vm.len() + self.boot_id.len());
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&(self.offered.len() as u32).to_be_bytes());
        for v in self.offered {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.extend_from_slice(&(self.vm.len() as u32).to_be_bytes());
        out.extend_from_slice(self.vm.as_bytes());
        out.extend_from_slice(self.host_nonce);
        out.extend_from_slice(self.guest_nonce);
        out.extend_from_slice(&(self.boot_id.len() as u32).to_be_bytes());
        out.extend_from_slice(self.boot_id.as_bytes());
        out
    }
}

fn prove(key: &LinkKey, label: &[u8], t: &Transcript<'_>) -> Proof {
    mac(key, label, t).finalize().into_bytes().into()
}

fn verify(
    key: &LinkKey,
    label: &[u8],
    t: &Transcript<'_>,
    proof: &Proof,
) -> Result<(), HandshakeError> {
    // Constant-time comparison.
    mac(key, label, t).verify_slice(proof).map_err(|_| HandshakeError::ProofMismatch)
}

fn check_name(s: &str, what: &'static str) -> Result<(), HandshakeError> {
    if s.len() > MAX_NAME_LEN {
        return Err(HandshakeError::Unexpected(what));
    }
    Ok(())
}

fn peer_message(msg: Handshake) -> Result<Handshake, HandshakeError> {
    match msg {
        Handshake::Reject { reason } => Err(HandshakeError::PeerRejected(reason)),
        other => Ok(other),
    }
}

/// The host's side: created with the hello it sends, finished by the guest's answer.
#[derive(Debug)]
pub struct HostHandshake {
    key: LinkKey,
    vm: String,
    nonce: Nonce,
}

impl HostHandshake {
    /// Starts a handshake; send the returned hello.
    pub fn start(key: LinkKey, vm: &str) -> Result<(Self, Handshake), HandshakeError> {
        check_name(vm, "VM name too long")?;
        let nonce = fresh_nonce()?;
        let hello =
            Handshake::HostHello { versions: LINK_VERSIONS.to_vec(), vm: vm.to_owned(), nonce };
        Ok((Self { key, vm: vm.to_owned(), nonce }, hello))
    }

    /// Checks the guest's hello. On success, send the returned proof and the link is up,
    /// sealed by the returned session.
    pub fn finish(
        self,
        msg: Handshake,
    ) -> Result<(Established, Session, Handshake), HandshakeError> {
        let Handshake::GuestHello { version, boot_id, nonce, proof } = peer_message(msg)? else {
            return Err(HandshakeError::Unexpected("expected the guest's hello"));
        };
        if !LINK_VERSIONS.contains(&version) {
            return Err(HandshakeError::VersionMismatch {
                ours: LINK_VERSIONS.to_vec(),
                theirs: vec![version],
            });
        }
        check_name(&boot_id, "boot id too long")?;
        let t = Transcript {
            version,
            offered: LINK_VERSIONS,
            vm: &self.vm,
            host_nonce: &self.nonce,
            guest_nonce: &nonce,
            boot_id: &boot_id,
        };
        verify(&self.key, GUEST_LABEL, &t, &proof)?;
        let answer = Handshake::HostProof { proof: prove(&self.key, HOST_LABEL, &t) };
        let session = Session::new(&self.key, &t.bytes(), Role::Host);
        Ok((Established { version, vm: self.vm, boot_id }, session, answer))
    }
}

/// The guest's side: answers the host's hello, then checks the host's proof.
#[derive(Debug)]
pub struct GuestHandshake {
    key: LinkKey,
    established: Established,
    offered: Vec<u16>,
    host_nonce: Nonce,
    nonce: Nonce,
}

impl GuestHandshake {
    /// Answers the host's hello; send the returned message (a hello, or a reject on error).
    pub fn answer(
        key: LinkKey,
        boot_id: &str,
        msg: Handshake,
    ) -> Result<(Self, Handshake), HandshakeError> {
        let Handshake::HostHello { versions, vm, nonce: host_nonce } = peer_message(msg)? else {
            return Err(HandshakeError::Unexpected("expected the host's hello"));
        };
        check_name(&vm, "VM name too long")?;
        if versions.len() > MAX_VERSIONS {
            return Err(HandshakeError::Unexpected("too many versions"));
        }
        let Some(version) = LINK_VERSIONS.iter().rev().copied().find(|v| versions.contains(v))
        else {
            return Err(HandshakeError::VersionMismatch {
                ours: LINK_VERSIONS.to_vec(),
                theirs: versions,
            });
        };
        let nonce = fresh_nonce()?;
        let boot_id: String = boot_id.chars().take(MAX_NAME_LEN).collect();
        let t = Transcript {
            version,
            offered: &versions,
            vm: &vm,
            host_nonce: &host_nonce,
            guest_nonce: &nonce,
            boot_id: &boot_id,
        };
        let proof = prove(&key, GUEST_LABEL, &t);
        let hello = Handshake::GuestHello { version, boot_id: boot_id.clone(), nonce, proof };
        let established = Established { version, vm, boot_id };
        Ok((Self { key, established, offered: versions, host_nonce, nonce }, hello))
    }

    /// Checks the host's proof; on success the link is up, sealed by the returned session.
    pub fn finish(self, msg: Handshake) -> Result<(Established, Session), HandshakeError> {
        let Handshake::HostProof { proof } = peer_message(msg)? else {
            return Err(HandshakeError::Unexpected("expected the host's proof"));
        };
        let e = &self.established;
        let t = Transcript {
            version: e.version,
            offered: &self.offered,
            vm: &e.vm,
            host_nonce: &self.host_nonce,
            guest_nonce: &self.nonce,
            boot_id: &e.boot_id,
        };
        verify(&self.key, HOST_LABEL, &t, &proof)?;
        let session = Session::new(&self.key, &t.bytes(), Role::Guest);
        Ok((self.established, session))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> LinkKey {
        LinkKey::from_bytes(&[b; 32]).unwrap()
    }

    #[test]
    fn same_key_succeeds_both_ways() {
        let (host, hello) = HostHandshake::start(key(1), "default").unwrap();
        let (guest, ghello) = GuestHandshake::answer(key(1), "boot-1", hello).unwrap();
        let (h, mut hs, proof) = host.finish(ghello).unwrap();
        let (g, mut gs) = guest.finish(proof).unwrap();
        assert_eq!(h, g);
        assert_eq!(h.version, *LINK_VERSIONS.last().unwrap());
        assert_eq!(h.boot_id, "boot-1");
        // Both ends derived the same keys, one per direction.
        let frame = hs.sealer.seal(b"request").unwrap();
        assert_eq!(&gs.opener.open(&frame).unwrap()[..], b"request");
        let frame = gs.sealer.seal(b"answer").unwrap();
        assert_eq!(&hs.opener.open(&frame).unwrap()[..], b"answer");
    }

    #[test]
    fn a_hello_with_versions_stripped_fails_the_proof() {
        let (host, hello) = HostHandshake::start(key(1), "vm").unwrap();
        let Handshake::HostHello { vm, nonce, .. } = hello else { panic!() };
        let mut offered = LINK_VERSIONS.to_vec();
        offered.push(u16::MAX);
        let relayed = Handshake::HostHello { versions: offered, vm, nonce };
        let (_guest, ghello) = GuestHandshake::answer(key(1), "b", relayed).unwrap();
        assert_eq!(host.finish(ghello).unwrap_err(), HandshakeError::ProofMismatch);
    }

    #[test]
    fn wrong_key_fails_on_the_host() {
        let (host, hello) = HostHandshake::start(key(1), "vm").unwrap();
        let (_guest, ghello) = GuestHandshake::answer(key(2), "b", hello).unwrap();
        assert_eq!(host.finish(ghello).unwrap_err(), HandshakeError::ProofMismatch);
    }

    #[test]
    fn impostor_host_fails_on_the_guest() {
        // An impostor host without the key cannot make a proof; reflecting the guest's own
        // proof back fails because the labels differ.
        let (_host, hello) = HostHandshake::start(key(1), "vm").unwrap();
        let (guest, ghello) = GuestHandshake::answer(key(1), "b", hello).unwrap();
        let Handshake::GuestHello { proof, .. } = ghello else { panic!() };
        assert_eq!(
            guest.finish(Handshake::HostProof { proof }).unwrap_err(),
            HandshakeError::ProofMismatch
        );
    }

    #[test]
    fn replayed_guest_hello_fails() {
        let (host1, hello1) = HostHandshake::start(key(1), "vm").unwrap();
        let (_g, recorded) = GuestHandshake::answer(key(1), "b", hello1).unwrap();
        host1.finish(recorded.clone()).unwrap();
        let (host2, _hello2) = HostHandshake::start(key(1), "vm").unwrap();
        assert_eq!(host2.finish(recorded).unwrap_err(), HandshakeError::ProofMismatch);
    }

    #[test]
    fn replayed_host_proof_fails() {
        let (host, hello) = HostHandshake::start(key(1), "vm").unwrap();
        let (guest, ghello) = GuestHandshake::answer(key(1), "b", hello.clone()).unwrap();
        let (_, _, proof) = host.finish(ghello).unwrap();
        guest.finish(proof.clone()).unwrap();
        // Same host hello replayed to a new guest session: new guest nonce, old proof fails.
        let (guest2, _) = GuestHandshake::answer(key(1), "b", hello).unwrap();
        assert_eq!(guest2.finish(proof).unwrap_err(), HandshakeError::ProofMismatch);
    }

    #[test]
    fn version_negotiation() {
        let hello = Handshake::HostHello { versions: vec![7, 9], vm: "vm".into(), nonce: [0; 32] };
        let err = GuestHandshake::answer(key(1), "b", hello).unwrap_err();
        assert!(matches!(err, HandshakeError::VersionMismatch { .. }));
        assert_eq!(err.reject(), Some(Handshake::Reject { reason: RejectReason::NoCommonVersion }));
        let hello = Handshake::HostHello { versions: vec![9, 3], vm: "vm".into(), nonce: [0; 32] };
        assert!(GuestHandshake::answer(key(1), "b", hello).is_ok());
        // Versions 1 and 2 sent frames in plaintext: no longer spoken.
        let hello = Handshake::HostHello { versions: vec![1, 2], vm: "vm".into(), nonce: [0; 32] };
        let err = GuestHandshake::answer(key(1), "b", hello).unwrap_err();
        assert!(matches!(err, HandshakeError::VersionMismatch { .. }));
    }

    #[test]
    fn out_of_order_and_rejects() {
        let err = GuestHandshake::answer(key(1), "b", Handshake::HostProof { proof: [0; 32] })
            .unwrap_err();
        assert!(matches!(err, HandshakeError::Unexpected(_)));
        let (host, _) = HostHandshake::start(key(1), "vm").unwrap();
        let err = host.finish(Handshake::Reject { reason: RejectReason::BadProof }).unwrap_err();
        assert_eq!(err, HandshakeError::PeerRejected(RejectReason::BadProof));
    }
}

//! Every frame of an established link, sealed: the handshake authenticates who started the
//! link; sealing makes sure nobody else speaks on it afterwards.
//!
//! ```text
//! prk        = HKDF-Extract(salt = "finch-link v3 keys", ikm = link key)
//! key_h2g    = HKDF-Expand(prk, SHA-256(transcript) ‖ "host to guest", 32)
//! key_g2h    = HKDF-Expand(prk, SHA-256(transcript) ‖ "guest to host", 32)
//! frame n    = ChaCha20-Poly1305(key_dir, nonce = 0u32 ‖ n as u64 BE, aad = "finch-link v3")
//! ```
//!
//! The transcript is the handshake's (version, the versions the host offered, VM name, both
//! nonces, boot id; see [`crate::handshake`]), so every link has its own pair of keys, one
//! per direction, and a frame of one link or direction means nothing on another. Each side
//! counts the frames it sends and expects: a frame that was altered, dropped, replayed,
//! reordered or moved from the other direction fails to open, and the link closes. A relay
//! between the two ends sees only lengths.
//!
//! Keys come from the link key alone and the handshake's fresh nonces (as TLS 1.3's
//! `psk_ke` mode): who records a link and later learns its key can read it. The key lives in
//! the host's keychain and in a root-only file in the VM; see the threat model.

use chacha20poly1305::aead::{Aead, KeyInit, Payload as AeadPayload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::frame::{MAX_FRAME, Payload};
use crate::key::LinkKey;

/// Bytes the seal adds to a frame (the Poly1305 tag).
pub const TAG_LEN: usize = 16;
/// Largest plaintext a sealed frame carries.
pub const MAX_PLAINTEXT: usize = MAX_FRAME - TAG_LEN;

const SALT: &[u8] = b"finch-link v3 keys";
const AAD: &[u8] = b"finch-link v3";
const HOST_TO_GUEST: &[u8] = b"host to guest";
const GUEST_TO_HOST: &[u8] = b"guest to host";

/// Why a frame could not be sealed or opened. Never carries key or frame bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The frame does not open with the next counter of this direction.
    #[error("a link frame failed authentication (altered, dropped, replayed or reordered)")]
    FrameForged,
    /// The plaintext is larger than [`MAX_PLAINTEXT`].
    #[error("a message of {len} bytes does not fit a sealed frame ({MAX_PLAINTEXT} at most)")]
    FrameTooLarge {
        /// Its length.
        len: usize,
    },
    /// This direction has used every counter (2^64 frames): never in practice.
    #[error("the link has sent every frame its keys allow")]
    CounterSpent,
}

/// Which end of the link this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The host agent (dials, sends requests' answers).
    Host,
    /// The guest agent.
    Guest,
}

/// One direction's cipher and the counter of its next frame.
struct Direction {
    aead: ChaCha20Poly1305,
    next: u64,
}

impl Direction {
    fn new(prk: &Hkdf<Sha256>, transcript_hash: &[u8], label: &[u8]) -> Self {
        let mut key = Zeroizing::new([0u8; 32]);
        // 32 bytes is far below HKDF-SHA256's 8160-byte output limit.
        if prk.expand_multi_info(&[transcript_hash, label], key.as_mut()).is_err() {
            unreachable!("HKDF-SHA256 expands to 32 bytes");
        }
        Direction { aead: ChaCha20Poly1305::new(Key::from_slice(key.as_ref())), next: 0 }
    }

    /// The nonce of the next frame, and the counter moved on.
    fn nonce(&mut self) -> Result<Nonce, SealError> {
        let n = self.next;
        self.next = n.checked_add(1).ok_or(SealError::CounterSpent)?;
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&n.to_be_bytes());
        Ok(Nonce::from(nonce))
    }
}

/// Seals the frames this end sends.
pub struct Sealer(Direction);

/// Opens the frames this end receives.
pub struct Opener(Direction);

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").field("next", &self.0.next).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener").field("next", &self.0.next).finish_non_exhaustive()
    }
}

impl Sealer {
    /// Seals `plaintext` as the next frame of this direction.
    pub fn seal(&mut self, plaintext: &[u8]) -> Result<Payload, SealError> {
        if plaintext.len() > MAX_PLAINTEXT {
            return Err(SealError::FrameTooLarge { len: plaintext.len() });
        }
        let nonce = self.0.nonce()?;
        let sealed = self.0.aead.encrypt(&nonce, AeadPayload { msg: plaintext, aad: AAD });
        // Encryption fails only for lengths far beyond a frame.
        sealed.map(Zeroizing::new).map_err(|_| SealError::FrameTooLarge { len: plaintext.len() })
    }
}

impl Opener {
    /// Opens `frame`, which must be the next frame of this direction.
    pub fn open(&mut self, frame: &[u8]) -> Result<Payload, SealError> {
        let nonce = self.0.nonce()?;
        self.0
            .aead
            .decrypt(&nonce, AeadPayload { msg: frame, aad: AAD })
            .map(Zeroizing::new)
            .map_err(|_| SealError::FrameForged)
    }
}

/// Both directions of one established link, as seen from one end.
#[derive(Debug)]
pub struct Session {
    /// For the frames this end sends.
    pub sealer: Sealer,
    /// For the frames this end receives.
    pub opener: Opener,
}

impl Session {
    /// The keys of the link whose handshake produced `transcript`, for `role`'s end.
    pub fn new(key: &LinkKey, transcript: &[u8], role: Role) -> Session {
        let prk = Hkdf::<Sha256>::new(Some(SALT), key.bytes());
        let hash = Sha256::digest(transcript);
        let h2g = Direction::new(&prk, &hash, HOST_TO_GUEST);
        let g2h = Direction::new(&prk, &hash, GUEST_TO_HOST);
        match role {
            Role::Host => Session { sealer: Sealer(h2g), opener: Opener(g2h) },
            Role::Guest => Session { sealer: Sealer(g2h), opener: Opener(h2g) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(transcript: &[u8]) -> (Session, Session) {
        let key = LinkKey::from_bytes(&[5; 32]).unwrap();
        (Session::new(&key, transcript, Role::Host), Session::new(&key, transcript, Role::Guest))
    }

    #[test]
    fn frames_open_in_order_both_ways() {
        let (mut host, mut guest) = pair(b"t");
        for n in 0..3u8 {
            let sealed = host.sealer.seal(&[n; 10]).unwrap();
            assert_eq!(sealed.len(), 10 + TAG_LEN);
            assert!(!sealed.windows(10).any(|w| w == [n; 10]), "plaintext in the frame");
            assert_eq!(&guest.opener.open(&sealed).unwrap()[..], &[n; 10]);
            let back = guest.sealer.seal(b"answer").unwrap();
            assert_eq!(&host.opener.open(&back).unwrap()[..], b"answer");
        }
    }

    #[test]
    fn altered_dropped_replayed_reflected_or_foreign_frames_fail() {
        let (mut host, mut guest) = pair(b"t");
        let first = host.sealer.seal(b"one").unwrap();
        let second = host.sealer.seal(b"two").unwrap();
        // Dropped: the second frame arrives where the first was expected.
        let (mut h2, mut g2) = pair(b"t");
        let _ = h2.sealer.seal(b"one").unwrap();
        assert_eq!(g2.opener.open(&second).unwrap_err(), SealError::FrameForged);
        // Altered: one bit.
        let mut bent = first.to_vec();
        bent[0] ^= 1;
        assert_eq!(guest.opener.open(&bent).unwrap_err(), SealError::FrameForged);
        // A failed frame still moves the counter: the link is closed after it anyway.
        let (_, mut guest) = pair(b"t");
        guest.opener.open(&first).unwrap();
        // Replayed.
        assert_eq!(guest.opener.open(&first).unwrap_err(), SealError::FrameForged);
        // Reflected back to its sender, and from another link (another transcript).
        let (mut host, _) = pair(b"t");
        let (mut other_host, mut other_guest) = pair(b"u");
        assert_eq!(host.opener.open(&first).unwrap_err(), SealError::FrameForged);
        let foreign = other_host.sealer.seal(b"one").unwrap();
        let (_, mut guest) = pair(b"t");
        assert_eq!(guest.opener.open(&foreign).unwrap_err(), SealError::FrameForged);
        assert!(other_guest.opener.open(&foreign).is_ok());
        let _ = h2;
    }

    #[test]
    fn the_largest_plaintext_fits_a_frame_and_one_more_byte_does_not() {
        let (mut host, mut guest) = pair(b"t");
        let sealed = host.sealer.seal(&vec![1; MAX_PLAINTEXT]).unwrap();
        assert_eq!(sealed.len(), MAX_FRAME);
        assert!(guest.opener.open(&sealed).is_ok());
        assert_eq!(
            host.sealer.seal(&vec![1; MAX_PLAINTEXT + 1]).unwrap_err(),
            SealError::FrameTooLarge { len: MAX_PLAINTEXT + 1 }
        );
        assert_eq!(guest.opener.open(&[0; 3]).unwrap_err(), SealError::FrameForged);
    }
}

//! Credential sources: one trait, one module per kind of store.
//!
//! * [`exec_helper`]: the host's own `docker-credential-<name>` binaries.
//! * [`docker_config`]: the docker config file (`credsStore`, `credHelpers`, plaintext `auths`).
//!
//! * [`ecr`]: native Amazon ECR and ECR Public tokens from the host's AWS configuration.
//! * [`keychain`]: the OS keychains (Secret Service, macOS Keychain, Windows Credential
//!   Manager), served natively under the helper names docker uses for them.
//!
//! The resolver picks a source by the helper name the user already configured.

pub mod docker_config;
pub mod ecr;
pub mod exec_helper;
pub mod keychain;
pub mod token;

use std::future::Future;
use std::pin::Pin;

use finch_shared::Secret;
use finch_shared::message::{ListEntry, WireError};

/// A future returned by a source; boxed so sources can sit behind `dyn`.
pub type SourceFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, SourceError>> + Send + 'a>>;

/// A stored credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// Username, or `<token>` for an identity token.
    pub username: String,
    /// Password or token.
    pub secret: Secret,
}

/// What kind of store a source is: the resolver acts on it (ECR stores are not counted in a
/// VM's budget; host helpers are processes, capped per VM and in all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// Native ECR and ECR Public.
    Ecr,
    /// A native OS keychain.
    Keychain,
    /// A host `docker-credential-*` process.
    Helper,
    /// The docker config's plaintext `auths`.
    Auths,
}

/// A place credentials live. Server strings are passed exactly as they should be looked up:
/// the resolver tries the spellings, not the source.
pub trait CredentialSource: Send + Sync {
    /// Name for audit lines (`helper:secretservice`, `auths`, …).
    fn name(&self) -> String;
    /// What kind of store it is.
    fn kind(&self) -> SourceKind;
    /// The credential stored under exactly `server`, if any.
    fn get<'a>(&'a self, server: &'a str) -> SourceFuture<'a, Option<Credential>>;
    /// Stores a credential under `server`, replacing any there.
    fn store<'a>(&'a self, server: &'a str, credential: &'a Credential) -> SourceFuture<'a, ()>;
    /// Removes what is stored under `server`; nothing there is not an error.
    fn erase<'a>(&'a self, server: &'a str) -> SourceFuture<'a, ()>;
    /// Every server and its username.
    fn list(&self) -> SourceFuture<'_, Vec<ListEntry>>;
}

/// Why a source failed. Messages name the source and the cause, never a secret and never a
/// helper's output.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A helper name that could be a path or an option.
    #[error("invalid credential helper name {0:?}: use letters, digits, '.', '_' or '-'")]
    HelperName(String),
    /// No `docker-credential-<name>` on the search path.
    #[error("docker-credential-{0} was not found on the host agent's PATH")]
    HelperMissing(String),
    /// The helper could not be started.
    #[error("cannot run docker-credential-{name}")]
    HelperSpawn {
        /// Helper name.
        name: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The helper did not finish in time (it was killed).
    #[error("docker-credential-{name} {action} did not finish within {secs} s and was stopped")]
    HelperTimeout {
        /// Helper name.
        name: String,
        /// Action.
        action: &'static str,
        /// Timeout.
        secs: u64,
    },
    /// The helper failed (its output is not repeated: it may contain credentials).
    #[error("docker-credential-{name} {action} failed ({status})")]
    HelperFailed {
        /// Helper name.
        name: String,
        /// Action.
        action: &'static str,
        /// Exit status.
        status: String,
    },
    /// The helper's answer was not the JSON the protocol defines.
    #[error("docker-credential-{name} {action} gave an answer that is not valid protocol JSON")]
    HelperOutput {
        /// Helper name.
        name: String,
        /// Action.
        action: &'static str,
    },
    /// No ECR token could be had.
    #[error(transparent)]
    Ecr(ecr::EcrError),
    /// A native keychain failed (locked, unreachable, denied, timed out, …).
    #[error(transparent)]
    Keychain(#[from] keychain::KeychainError),
    /// The docker config could not be read or parsed.
    #[error("cannot read docker config {path}: {reason}")]
    ConfigRead {
        /// File.
        path: String,
        /// Why (no file contents).
        reason: String,
    },
    /// The docker config could not be written.
    #[error("cannot write docker config {path}: {reason}")]
    ConfigWrite {
        /// File.
        path: String,
        /// Why.
        reason: String,
    },
}

impl From<SourceError> for WireError {
    fn from(e: SourceError) -> Self {
        WireError::unavailable(e.to_string())
    }
}

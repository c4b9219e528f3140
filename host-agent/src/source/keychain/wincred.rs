//! Windows Credential Manager, with credentials as docker-credential-wincred writes them:
//! generic credentials, TargetName = the server URL, UserName = the username, the blob = the
//! secret as UTF-8 bytes (read as raw bytes: reading it as UTF-16 fails on odd lengths), and
//! an attribute `label` = `Docker Credentials`; persisted per local machine.
//!
//! Written against the documented `windows-sys` 0.61 API (`CredReadW`, `CredWriteW`,
//! `CredDeleteW`, `CredEnumerateW`, `CredFree`). Not compiled on the Linux CI machine; the
//! [`Blocking`](super::Blocking) adapter around it is tested there.
#![allow(unsafe_code)]

use std::ptr;

use finch_shared::Secret;
use finch_shared::message::ListEntry;
use windows_sys::Win32::Foundation::{ERROR_NOT_FOUND, FILETIME, GetLastError};
use windows_sys::Win32::Security::Credentials::{
    CRED_PERSIST_LOCAL_MACHINE, CRED_TYPE_GENERIC, CREDENTIAL_ATTRIBUTEW, CREDENTIALW, CredDeleteW,
    CredEnumerateW, CredFree, CredReadW, CredWriteW,
};

use super::{DOCKER_LABEL, KeychainError, SyncKeychain};
use crate::source::Credential;

const STORE: &str = "wincred";

/// The native `wincred` source.
#[derive(Debug)]
pub struct WinCred;

fn wide(s: &str) -> Vec<u16> {
    s.encode_utf16().chain(std::iter::once(0)).collect()
}

/// Reads a NUL-terminated UTF-16 string.
///
/// SAFETY: `p` is null or points to a NUL-terminated string owned by a live credential.
unsafe fn from_wide(p: *const u16) -> String {
    if p.is_null() {
        return String::new();
    }
    let mut len = 0;
    // SAFETY: the string is NUL-terminated (caller's contract).
    while unsafe { *p.add(len) } != 0 {
        len += 1;
    }
    // SAFETY: `len` u16s were just read from `p`.
    String::from_utf16_lossy(unsafe { std::slice::from_raw_parts(p, len) })
}

fn last_error(what: &str) -> KeychainError {
    // SAFETY: no preconditions.
    let code = unsafe { GetLastError() };
    KeychainError::KeychainFailed { store: STORE, reason: format!("{what} failed (error {code})") }
}

/// Whether the credential carries docker's `label` attribute.
///
/// SAFETY: `c` points to a credential returned by CredReadW/CredEnumerateW and not yet freed.
unsafe fn is_docker(c: &CREDENTIALW) -> bool {
    (0..c.AttributeCount as usize).any(|i| {
        // SAFETY: `Attributes` holds `AttributeCount` entries.
        let a = unsafe { &*c.Attributes.add(i) };
        // SAFETY: attribute keywords are NUL-terminated; values are `ValueSize` bytes.
        let keyword = unsafe { from_wide(a.Keyword) };
        // SAFETY: `Value` holds `ValueSize` bytes.
        let value = unsafe { std::slice::from_raw_parts(a.Value, a.ValueSize as usize) };
        keyword == "label" && value == DOCKER_LABEL.as_bytes()
    })
}

/// A generic credential as read: its blob, its username, whether it carries docker's label.
struct Read {
    blob: zeroize::Zeroizing<Vec<u8>>,
    username: String,
    docker: bool,
}

/// Reads the generic credential `target`.
fn read_generic(target: &str) -> Result<Option<Read>, KeychainError> {
    let target = wide(target);
    let mut cred: *mut CREDENTIALW = ptr::null_mut();
    // SAFETY: `target` is NUL-terminated; `cred` receives a buffer freed below.
    if unsafe { CredReadW(target.as_ptr(), CRED_TYPE_GENERIC, 0, &mut cred) } == 0 {
        // SAFETY: no preconditions.
        if unsafe { GetLastError() } == ERROR_NOT_FOUND {
            return Ok(None);
        }
        return Err(last_error("CredReadW"));
    }
    // SAFETY: CredReadW succeeded, so `cred` is valid until CredFree.
    let c = unsafe { &*cred };
    // SAFETY: the blob is `CredentialBlobSize` bytes.
    let blob = zeroize::Zeroizing::new(unsafe {
        std::slice::from_raw_parts(c.CredentialBlob, c.CredentialBlobSize as usize).to_vec()
    });
    // SAFETY: `UserName` is NUL-terminated or null; `c` is alive.
    let (username, docker) = unsafe { (from_wide(c.UserName), is_docker(c)) };
    // SAFETY: `cred` came from CredReadW.
    unsafe { CredFree(cred.cast()) };
    Ok(Some(Read { blob, username, docker }))
}

/// Writes the generic credential `target` (replacing it), with docker's label attribute when
/// `docker`, else with `comment`.
fn write_generic(
    target: &str,
    user: &str,
    secret: &[u8],
    docker: bool,
    comment: &str,
) -> Result<(), KeychainError> {
    let target = wide(target);
    let user = wide(user);
    let mut comment = wide(comment);
    let mut keyword = wide("label");
    let mut label = DOCKER_LABEL.as_bytes().to_vec();
    let mut attribute = CREDENTIAL_ATTRIBUTEW {
        Keyword: keyword.as_mut_ptr(),
        Flags: 0,
        ValueSize: label.len() as u32,
        Value: label.as_mut_ptr(),
    };
    let mut blob = zeroize::Zeroizing::new(secret.to_vec());
    let cred = CREDENTIALW {
        Flags: 0,
        Type: CRED_TYPE_GENERIC,
        TargetName: target.as_ptr() as *mut u16,
        Comment: if docker { ptr::null_mut() } else { comment.as_mut_ptr() },
        LastWritten: FILETIME { dwLowDateTime: 0, dwHighDateTime: 0 },
        CredentialBlobSize: blob.len() as u32,
        CredentialBlob: blob.as_mut_ptr(),
        Persist: CRED_PERSIST_LOCAL_MACHINE,
        AttributeCount: u32::from(docker),
        Attributes: if docker { &mut attribute } else { ptr::null_mut() },
        TargetAlias: ptr::null_mut(),
        UserName: user.as_ptr() as *mut u16,
    };
    // SAFETY: every pointer in `cred` points into buffers alive for this call.
    if unsafe { CredWriteW(&cred, 0) } == 0 {
        return Err(last_error("CredWriteW"));
    }
    Ok(())
}

/// Deletes the generic credential `target`; none there is not an error.
fn delete_generic(target: &str) -> Result<(), KeychainError> {
    let target = wide(target);
    // SAFETY: `target` is NUL-terminated.
    if unsafe { CredDeleteW(target.as_ptr(), CRED_TYPE_GENERIC, 0) } == 0 {
        // SAFETY: no preconditions.
        if unsafe { GetLastError() } == ERROR_NOT_FOUND {
            return Ok(());
        }
        return Err(last_error("CredDeleteW"));
    }
    Ok(())
}

impl SyncKeychain for WinCred {
    fn get(&self, server: &str) -> Result<Option<Credential>, KeychainError> {
        if is_key_target(server) {
            return Ok(None);
        }
        let Some(read) = read_generic(server)? else { return Ok(None) };
        let secret =
            std::str::from_utf8(&read.blob).map_err(|_| KeychainError::KeychainFailed {
                store: STORE,
                reason: format!("the credential for {server:?} is not UTF-8"),
            })?;
        Ok(Some(Credential { username: read.username, secret: Secret::new(secret.to_owned()) }))
    }

    fn store(&self, server: &str, credential: &Credential) -> Result<(), KeychainError> {
        if is_key_target(server) {
            return Err(KeychainError::KeychainDenied {
                store: STORE,
                reason: "that name is the bridge's own item".into(),
            });
        }
        let secret = credential.secret.expose().as_bytes();
        write_generic(server, &credential.username, secret, true, "")
    }

    fn erase(&self, server: &str) -> Result<(), KeychainError> {
        if is_key_target(server) {
            return Ok(());
        }
        delete_generic(server)
    }

    fn list(&self) -> Result<Vec<ListEntry>, KeychainError> {
        let mut count = 0u32;
        let mut creds: *mut *mut CREDENTIALW = ptr::null_mut();
        // SAFETY: a null filter enumerates all; the array is freed below.
        if unsafe { CredEnumerateW(ptr::null(), 0, &mut count, &mut creds) } == 0 {
            // SAFETY: no preconditions.
            if unsafe { GetLastError() } == ERROR_NOT_FOUND {
                return Ok(Vec::new());
            }
            return Err(last_error("CredEnumerateW"));
        }
        let mut entries = Vec::new();
        for i in 0..count as usize {
            // SAFETY: the array holds `count` valid credential pointers until CredFree.
            let c = unsafe { &**creds.add(i) };
            // SAFETY: as above.
            if c.Type == CRED_TYPE_GENERIC && unsafe { is_docker(c) } {
                // SAFETY: both strings are NUL-terminated or null.
                let (server, username) =
                    unsafe { (from_wide(c.TargetName), from_wide(c.UserName)) };
                entries.push(ListEntry { server, username });
            }
        }
        // SAFETY: `creds` came from CredEnumerateW.
        unsafe { CredFree(creds.cast()) };
        Ok(entries)
    }
}

/// VM link keys in the Credential Manager (`crate::vm_keys`): generic credentials
/// `finch-credential-bridge:link-key/NAME` without docker's label, so the docker source
/// neither answers nor lists them.
#[derive(Debug)]
pub struct WinKeyVault;

/// Whether `server` names one of the bridge's own items, which the docker source never
/// touches (no registry name parses to one either: defense in depth).
fn is_key_target(server: &str) -> bool {
    server.starts_with(super::vault::TARGET_PREFIX)
}

fn key_target(vm: &str) -> String {
    format!("{}{vm}", super::vault::TARGET_PREFIX)
}

impl super::vault::Vault for WinKeyVault {
    fn name(&self) -> &'static str {
        STORE
    }

    fn get(&self, vm: &str) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, KeychainError> {
        Ok(read_generic(&key_target(vm))?.filter(|r| !r.docker).map(|r| r.blob))
    }

    fn put(&self, vm: &str, key: &[u8]) -> Result<(), KeychainError> {
        write_generic(&key_target(vm), "finch-host-agent", key, false, &super::vault::label(vm))
    }

    fn remove(&self, vm: &str) -> Result<(), KeychainError> {
        delete_generic(&key_target(vm))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::keychain::vault::Vault;

    /// Against the real Credential Manager (Wine's in CI): a VM key item is read back, and
    /// the docker source neither answers, nor overwrites, nor lists, nor erases it.
    #[test]
    fn vm_keys_are_items_the_docker_source_never_serves() {
        let vault = WinKeyVault;
        let vm = format!("unit-{}", std::process::id());
        assert!(vault.get(&vm).unwrap().is_none());
        let key = [7u8; 32];
        vault.put(&vm, &key).unwrap();
        assert_eq!(vault.get(&vm).unwrap().as_deref().map(Vec::as_slice), Some(&key[..]));
        vault.put(&vm, &[9u8; 32]).unwrap();
        assert_eq!(vault.get(&vm).unwrap().as_deref().map(Vec::as_slice), Some(&[9u8; 32][..]));
        let target = key_target(&vm);
        assert!(WinCred.get(&target).unwrap().is_none(), "the docker source served a VM key");
        let c = Credential { username: "u".into(), secret: Secret::new("s".into()) };
        assert!(WinCred.store(&target, &c).is_err(), "the docker source overwrote a VM key");
        assert!(WinCred.list().unwrap().iter().all(|e| e.server != target));
        WinCred.erase(&target).unwrap();
        assert!(vault.get(&vm).unwrap().is_some(), "the docker source erased a VM key");
        vault.remove(&vm).unwrap();
        assert!(vault.get(&vm).unwrap().is_none(), "the key was not removed");
        vault.remove(&vm).unwrap();
    }
}

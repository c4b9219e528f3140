//! `wincred-check TARGET`: reads the generic credential `TARGET` with `CredReadW`, as
//! docker-credential-wincred and the host agent write it, and prints one JSON line for the
//! Wine test: `{"user":…,"blob":…,"label":…,"persist":…}`, or `not found` (exit 1). It is a
//! separate program so that the check does not go through the code under test.
//!
//! Test tool: it prints the secret it reads, which is a test value.

#[cfg(windows)]
#[allow(unsafe_code)]
fn read(target: &str) -> Option<String> {
    use windows_sys::Win32::Security::Credentials::{
        CRED_TYPE_GENERIC, CREDENTIALW, CredFree, CredReadW,
    };
    let wide: Vec<u16> = target.encode_utf16().chain(std::iter::once(0)).collect();
    let mut cred: *mut CREDENTIALW = std::ptr::null_mut();
    // SAFETY: NUL-terminated name, valid out pointer; freed with CredFree below.
    if unsafe { CredReadW(wide.as_ptr(), CRED_TYPE_GENERIC, 0, &mut cred) } == 0 {
        return None;
    }
    // SAFETY: CredReadW returned a valid credential.
    let c = unsafe { &*cred };
    let text = |p: *const u16| {
        if p.is_null() {
            return String::new();
        }
        // SAFETY: NUL-terminated strings of a live credential.
        let len = (0..).take_while(|&i| unsafe { *p.add(i) } != 0).count();
        // SAFETY: `len` u16s were just read.
        String::from_utf16_lossy(unsafe { std::slice::from_raw_parts(p, len) })
    };
    // SAFETY: the blob and the attributes are as long as their sizes say.
    let blob =
        unsafe { std::slice::from_raw_parts(c.CredentialBlob, c.CredentialBlobSize as usize) };
    let mut label = String::new();
    for i in 0..c.AttributeCount as usize {
        // SAFETY: `Attributes` holds `AttributeCount` entries.
        let a = unsafe { &*c.Attributes.add(i) };
        if text(a.Keyword) == "label" {
            // SAFETY: `Value` holds `ValueSize` bytes.
            let v = unsafe { std::slice::from_raw_parts(a.Value, a.ValueSize as usize) };
            label = String::from_utf8_lossy(v).into_owned();
        }
    }
    let line = format!(
        "{{\"user\":{:?},\"blob\":{:?},\"label\":{:?},\"persist\":{}}}",
        text(c.UserName),
        String::from_utf8_lossy(blob),
        label,
        c.Persist
    );
    // SAFETY: allocated by CredReadW.
    unsafe { CredFree(cred.cast()) };
    Some(line)
}

#[cfg(not(windows))]
fn read(_target: &str) -> Option<String> {
    None
}

fn main() -> std::process::ExitCode {
    use std::io::Write;
    if !cfg!(windows) {
        let _ = writeln!(std::io::stderr(), "wincred-check runs on Windows (or Wine) only");
        return std::process::ExitCode::from(2);
    }
    let Some(target) = std::env::args().nth(1) else {
        let _ = writeln!(std::io::stderr(), "usage: wincred-check TARGET");
        return std::process::ExitCode::from(2);
    };
    match read(&target) {
        Some(line) => {
            let _ = writeln!(std::io::stdout(), "{line}");
            std::process::ExitCode::SUCCESS
        }
        None => {
            let _ = writeln!(std::io::stdout(), "not found");
            std::process::ExitCode::FAILURE
        }
    }
}

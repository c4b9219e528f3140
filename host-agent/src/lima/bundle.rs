//! The bundle: what the agent puts in `INSTANCE/finch-bridge/` for the VM to install.

use std::path::{Path, PathBuf};

use anyhow::Context;
use finch_shared::key::LinkKey;
use sha2::Digest;

use super::*;

/// What [`fill_bundle`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Filled {
    /// Files written (the others were already as they should be).
    pub written: usize,
}

/// Writes `path` (mode `mode` on unix) when its content differs from `bytes`. Only a regular
/// file there is read and compared; anything else (a link, a pipe) is replaced, never
/// followed or read.
pub(super) fn put(path: &Path, bytes: &[u8], mode: u32, filled: &mut Filled) -> anyhow::Result<()> {
    let regular = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file());
    if regular && std::fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    finch_shared::private::write_atomic(path, bytes, mode)
        .with_context(|| format!("cannot write {}", path.display()))?;
    filled.written += 1;
    Ok(())
}

/// The directory under `guest_dir` with the guest binaries for `arch`: `linux-ARCH/`, or the
/// directory a guest release archive unpacks to, `finch-bridge-guest-VERSION-linux-ARCH/` (the
/// last in name order when there are several). `None` when no such directory holds both.
pub fn guest_binaries(guest_dir: &Path, arch: &str) -> Option<PathBuf> {
    let complete = |d: &Path| GUEST_BINARIES.iter().all(|b| d.join(b).is_file());
    let plain = guest_dir.join(format!("linux-{arch}"));
    if complete(&plain) {
        return Some(plain);
    }
    let suffix = format!("-linux-{arch}");
    let mut unpacked: Vec<_> = std::fs::read_dir(guest_dir)
        .ok()?
        .flatten()
        .take(MAX_SCANNED)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            (name.starts_with("finch-bridge-guest-") && name.ends_with(&suffix)).then(|| e.path())
        })
        .filter(|d| complete(d))
        .collect();
    unpacked.sort();
    unpacked.pop()
}

/// Fills `instance`'s bundle for a guest of `arch` from `guest_dir`, with `key`. Files that
/// are already right are left alone, so a VM booting while this runs sees a complete bundle
/// (`SHA256SUMS` goes last: install.sh checks every binary against it).
pub fn fill_bundle(
    instance: &Instance,
    arch: &str,
    guest_dir: &Path,
    key: &LinkKey,
    scoped: &[String],
) -> anyhow::Result<Filled> {
    let from = guest_binaries(guest_dir, arch).with_context(|| {
        format!(
            "no guest binaries for the {arch} VM {} in {}: unpack the linux-{arch} guest release archive there ([lima] guest_dir)",
            instance.name,
            guest_dir.display()
        )
    })?;
    let binaries = read_binaries(&from)?;
    anyhow::ensure!(
        is_instance(&instance.dir),
        "{} is no longer an instance directory (a symbolic link, or gone): nothing written",
        instance.dir.display()
    );
    write_bundle(&instance.bundle(), &binaries, key, scoped)
}

/// The guest binaries in `from`, read.
pub fn read_binaries(from: &Path) -> anyhow::Result<Vec<(&'static str, Vec<u8>)>> {
    GUEST_BINARIES
        .iter()
        .map(|name| {
            let path = from.join(name);
            let bytes =
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            Ok((*name, bytes))
        })
        .collect()
}

/// Writes a bundle into `dir` (made private if missing; a link or file there is replaced):
/// `binaries`, the install scripts, `key`, `scoped` (the registries install.sh wires to the
/// registry front, one a line: the VM's `pull`/`push` rules' registries), then `SHA256SUMS`
/// of all of them.
pub fn write_bundle(
    dir: &Path,
    binaries: &[(&str, Vec<u8>)],
    key: &LinkKey,
    scoped: &[String],
) -> anyhow::Result<Filled> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_dir() => {}
        // A link (or a file) where the bundle goes is removed, never written through.
        Ok(_) => std::fs::remove_file(dir)
            .with_context(|| format!("{} is not a directory; cannot remove it", dir.display()))?,
        Err(_) => {}
    }
    finch_shared::private::create_dir_all(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let mut filled = Filled::default();
    let mut sums = String::new();
    for (name, bytes) in binaries {
        put(&dir.join(name), bytes, 0o755, &mut filled)?;
        sums.push_str(&format!("{:x}  {name}\n", sha2::Sha256::digest(bytes)));
    }
    let scoped: String = scoped.iter().map(|r| format!("{r}\n")).collect();
    for (name, text) in
        [("install.sh", INSTALL_SH), ("uninstall.sh", UNINSTALL_SH), ("scoped", scoped.as_str())]
    {
        put(&dir.join(name), text.as_bytes(), 0o644, &mut filled)?;
        sums.push_str(&format!("{:x}  {name}\n", sha2::Sha256::digest(text.as_bytes())));
    }
    put(&dir.join("link.key"), key.file_bytes(), 0o600, &mut filled)?;
    put(&dir.join("SHA256SUMS"), sums.as_bytes(), 0o644, &mut filled)?;
    Ok(filled)
}

//! The fragment in `_config/default.yaml`, and the `[lima]` table `setup finch` writes.

use std::path::Path;

use anyhow::Context;
use yaml_rust2::Yaml;
use yaml_rust2::yaml::Hash;

use super::*;
use crate::settings::{LimaSettings, toml_string};

/// The lists of a Lima config the fragment adds to.
pub(super) const MERGED: [&str; 4] = ["mounts", "provision", "portForwards", "probes"];

/// Whether `item` (an entry of list `list`) is the fragment's, in this or an earlier version.
pub(super) fn ours(list: &str, item: &Yaml) -> bool {
    match list {
        "mounts" => text_field(item, "mountPoint") == Some("/mnt/finch-bridge"),
        "portForwards" => {
            text_field(item, "guestSocket") == Some("/run/finch-guest-agent/link.sock")
        }
        _ => text_field(item, "script").is_some_and(|s| s.contains("finch-credential-bridge:")),
    }
}

pub(super) fn fragment() -> Hash {
    match parse_yaml(FRAGMENT) {
        Ok(Yaml::Hash(h)) => h,
        _ => unreachable!("the embedded fragment is a YAML mapping (a unit test parses it)"),
    }
}

/// `config` (a Lima config's text, maybe empty) with the fragment's entries in it, or taken
/// out (`add` false); other content is kept (comments are not: YAML is re-emitted), and
/// lists the fragment alone made are removed with it. `None` when nothing changes.
pub fn merge_fragment(config: &str, add: bool) -> anyhow::Result<Option<String>> {
    let mut doc = mapping(parse_yaml(config)?)?;
    let before = doc.clone();
    apply_fragment(&mut doc, add)?;
    if doc == before {
        return Ok(None);
    }
    if doc.is_empty() {
        return Ok(Some(String::new()));
    }
    emit(doc, "# Lima merges this file into every instance of this LIMA_HOME.\n").map(Some)
}

/// A Lima config document as a mapping (an empty document is an empty one).
pub(super) fn mapping(doc: Yaml) -> anyhow::Result<Hash> {
    match doc {
        Yaml::Hash(h) => Ok(h),
        Yaml::Null => Ok(Hash::new()),
        _ => anyhow::bail!("it is not a YAML mapping"),
    }
}

/// Puts the fragment's entries into `doc`'s lists (`add`), or takes them out; a list that
/// ends up empty is removed, and a list that stays keeps its place among the keys.
pub(super) fn apply_fragment(doc: &mut Hash, add: bool) -> anyhow::Result<()> {
    let fragment = fragment();
    for list in MERGED {
        let k = key(list);
        let mut items = match doc.get(&k) {
            None | Some(Yaml::Null) => Vec::new(),
            Some(Yaml::Array(a)) => a.clone(),
            Some(_) => anyhow::bail!("`{list}` is not a list"),
        };
        items.retain(|i| !ours(list, i));
        if let (true, Some(Yaml::Array(mine))) = (add, fragment.get(&k)) {
            items.extend(mine.iter().cloned());
        }
        if items.is_empty() {
            doc.remove(&k);
        } else if let Some(slot) = doc.get_mut(&k) {
            *slot = Yaml::Array(items); // in place: the file's key order is kept
        } else {
            doc.insert(k, Yaml::Array(items));
        }
    }
    Ok(())
}

/// `doc` as YAML text after the comment `header` (comments of the file it came from are not
/// kept: YAML is re-emitted).
pub(super) fn emit(doc: Hash, header: &str) -> anyhow::Result<String> {
    let mut out = String::from(header);
    let mut emitter = yaml_rust2::YamlEmitter::new(&mut out);
    emitter.multiline_strings(true);
    emitter.dump(&Yaml::Hash(doc)).map_err(|e| anyhow::anyhow!("cannot write YAML: {e}"))?;
    out.push('\n');
    Ok(out)
}

/// Whether `config` holds every entry of the fragment.
pub fn has_fragment(config: &Yaml) -> bool {
    MERGED.iter().all(|list| {
        field(config, list).and_then(Yaml::as_vec).is_some_and(|v| v.iter().any(|i| ours(list, i)))
    })
}

/// Merges the fragment into (or out of) `dir/default.yaml`, writing it atomically when it
/// changes (mode 0600, as Finch writes it). Returns whether it changed.
pub fn update_default_yaml(config_dir: &Path, add: bool) -> anyhow::Result<bool> {
    let path = config_dir.join("default.yaml");
    let text = match std::fs::read(&path) {
        Ok(b) => {
            anyhow::ensure!(
                b.len() as u64 <= MAX_YAML,
                "{} is larger than {MAX_YAML} bytes",
                path.display()
            );
            String::from_utf8(b).with_context(|| format!("{} is not UTF-8", path.display()))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !add {
                return Ok(false);
            }
            String::new()
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let Some(new) =
        merge_fragment(&text, add).with_context(|| format!("cannot merge {}", path.display()))?
    else {
        return Ok(false);
    };
    if !add && new.trim().is_empty() {
        // Nothing but the fragment was there (setup made the file): no file, as before.
        std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        return Ok(true);
    }
    std::fs::create_dir_all(config_dir)
        .with_context(|| format!("cannot create {}", config_dir.display()))?;
    put(&path, new.as_bytes(), 0o600, &mut Filled::default())?;
    Ok(true)
}

// ---- the config file's [lima] table ------------------------------------------------------

/// The comment line that marks the `[lima]` table `setup finch` wrote.
pub const SETUP_MARK: &str =
    "# Added by `finch-host-agent setup finch`; `setup finch --remove` takes it out.";

/// `text` (a host agent config) with `setup finch`'s `[lima]` table for `lima` appended, or
/// (`lima` `None`) taken out. Errors when a `[lima]` table that setup did not write is there.
pub fn setup_config_text(text: &str, lima: Option<&LimaSettings>) -> anyhow::Result<String> {
    let mut kept = Vec::new();
    let mut skipping = false;
    let mut foreign = false;
    for line in text.lines() {
        if line == SETUP_MARK {
            skipping = true;
            continue;
        }
        let header = line.trim_start().starts_with('[');
        if skipping && header && line.trim() != "[lima]" {
            skipping = false;
        }
        if skipping {
            continue;
        }
        if line.trim() == "[lima]" {
            foreign = true;
        }
        kept.push(line);
    }
    while kept.last().is_some_and(|l| l.trim().is_empty()) {
        kept.pop();
    }
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    if let Some(l) = lima {
        anyhow::ensure!(
            !foreign,
            "the config already has a [lima] table that setup did not write: edit it instead"
        );
        if !out.is_empty() {
            out.push('\n');
        }
        let instances: Vec<String> = l.instances.iter().map(|i| toml_string(i)).collect();
        out.push_str(&format!(
            "{SETUP_MARK}\n[lima]\nhome = {}\ninstances = [{}]\nguest_dir = {}\nkeep_fragment = {}\n",
            toml_string(&l.home.display().to_string()),
            instances.join(", "),
            toml_string(&l.guest_dir.display().to_string()),
            l.keep_fragment
        ));
        if let Some(t) = &l.template {
            out.push_str(&format!("template = {}\n", toml_string(&t.display().to_string())));
        }
        if l.harden {
            let shares: Vec<String> =
                l.shares.iter().map(|s| toml_string(&s.display().to_string())).collect();
            out.push_str(&format!("harden = true\nshares = [{}]\n", shares.join(", ")));
        }
    }
    Ok(out)
}

//! `attached.toml` in the state directory: the VMs `finch-host-agent attach` added at run
//! time. Read like the config file (spans, no unknown keys), written whole and private.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use finch_shared::endpoint::Endpoint;
use serde::Deserialize;
use toml::Spanned;

use super::file::{Spans, toml_string};
use super::{ConfigError, VmName, read_file};

/// The file in the state directory holding the VMs attached at run time.
pub const ATTACHED_FILE: &str = "attached.toml";

/// One VM attached at run time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedVm {
    /// Where to dial it.
    pub endpoint: Endpoint,
    /// Its key file, when not the state directory's.
    pub key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AttachedFile {
    #[serde(default)]
    vm: BTreeMap<Spanned<String>, AttachedEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AttachedEntry {
    endpoint: Spanned<String>,
    key: Option<Spanned<String>>,
}

/// The VMs in `path` (none if it does not exist).
pub fn read_attached(path: &Path) -> Result<BTreeMap<VmName, AttachedVm>, ConfigError> {
    let Some(text) = read_file(path, false)? else { return Ok(BTreeMap::new()) };
    let src = Spans { file: path, text: &text };
    let file: AttachedFile = src.deserialize()?;
    let mut out = BTreeMap::new();
    for (name, vm) in file.vm {
        let key = format!("vm.{}", name.get_ref());
        let vm_name =
            name.get_ref().parse::<VmName>().map_err(|e| src.error(name.span(), &key, e))?;
        let endpoint = vm
            .endpoint
            .get_ref()
            .parse::<Endpoint>()
            .map_err(|e| src.error(vm.endpoint.span(), &format!("{key}.endpoint"), e))?;
        let key_file = match &vm.key {
            Some(k) => Some(src.path(k, &format!("{key}.key"))?),
            None => None,
        };
        out.insert(vm_name, AttachedVm { endpoint, key: key_file });
    }
    Ok(out)
}

/// Writes `vms` to `path` atomically, private (mode 0600, or an owner-only DACL).
pub fn write_attached(path: &Path, vms: &BTreeMap<VmName, AttachedVm>) -> anyhow::Result<()> {
    let mut text =
        String::from("# VMs attached with `finch-host-agent attach`; `detach` removes them.\n");
    for (name, vm) in vms {
        text.push_str(&format!(
            "\n[vm.{}]\nendpoint = {}\n",
            toml_string(name),
            toml_string(&vm.endpoint.to_string())
        ));
        if let Some(k) = &vm.key {
            text.push_str(&format!("key = {}\n", toml_string(&k.display().to_string())));
        }
    }
    crate::platform::paths::write_private(path, text.as_bytes())
}

//! YAML, bounded: Lima's files read with a size cap and no aliases, and what the agent
//! takes from them (architecture, mounts).

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use anyhow::Context;
use yaml_rust2::Yaml;
use yaml_rust2::parser::{Event, Parser};

use super::*;
use crate::settings::LimaSettings;

/// Reads one YAML document from `path`: `None` when the file does not exist; an error when
/// it is larger than [`MAX_YAML`], not YAML, or holds an alias.
pub fn read_yaml(path: &Path) -> anyhow::Result<Option<Yaml>> {
    let Some(text) = read_text(path)? else { return Ok(None) };
    parse_yaml(&text).with_context(|| format!("cannot use {}", path.display())).map(Some)
}

/// Reads `path` bounded ([`MAX_YAML`]) as UTF-8; `None` when it does not exist, an error
/// when it is larger.
pub fn read_text(path: &Path) -> anyhow::Result<Option<String>> {
    let Some(bytes) = read_bounded(path, MAX_YAML)? else { return Ok(None) };
    String::from_utf8(bytes).map(Some).with_context(|| format!("{} is not UTF-8", path.display()))
}

/// Reads `path` whole, at most `max` bytes (never more into memory); `None` when it does
/// not exist, an error when it is larger.
pub fn read_bounded(path: &Path, max: u64) -> anyhow::Result<Option<Vec<u8>>> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    anyhow::ensure!(bytes.len() as u64 <= max, "{} is larger than {max} bytes", path.display());
    Ok(Some(bytes))
}

/// Parses one YAML document (an empty text is `Null`), refusing aliases.
pub fn parse_yaml(text: &str) -> anyhow::Result<Yaml> {
    let mut parser = Parser::new_from_str(text);
    loop {
        match parser.next_token() {
            Ok((Event::StreamEnd, _)) => break,
            Ok((Event::Alias(_), mark)) => anyhow::bail!(
                "line {}: YAML aliases (*name) are not read here; write the value out",
                mark.line()
            ),
            Ok(_) => {}
            Err(e) => anyhow::bail!("not YAML: {e}"),
        }
    }
    let docs = yaml_rust2::YamlLoader::load_from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(docs.into_iter().next().unwrap_or(Yaml::Null))
}

pub(super) fn key(s: &str) -> Yaml {
    Yaml::String(s.to_owned())
}

pub(super) fn field<'a>(y: &'a Yaml, name: &str) -> Option<&'a Yaml> {
    y.as_hash()?.get(&key(name))
}

pub(super) fn text_field<'a>(y: &'a Yaml, name: &str) -> Option<&'a str> {
    field(y, name)?.as_str()
}

/// The three files Lima merges for one instance: `_config/default.yaml`, the instance's
/// `lima.yaml`, `_config/override.yaml` (missing ones are `Null`).
#[derive(Debug, Clone)]
pub struct LimaYaml {
    /// `_config/default.yaml`.
    pub default: Yaml,
    /// The instance's `lima.yaml`.
    pub instance: Yaml,
    /// `_config/override.yaml`.
    pub overrides: Yaml,
}

impl LimaYaml {
    /// Reads the three files for `instance`.
    pub fn read(lima: &LimaSettings, instance: &Instance) -> anyhow::Result<LimaYaml> {
        let config = lima.config_dir();
        Ok(LimaYaml {
            default: read_yaml(&config.join("default.yaml"))?.unwrap_or(Yaml::Null),
            instance: read_yaml(&instance.dir.join("lima.yaml"))?.unwrap_or(Yaml::Null),
            overrides: read_yaml(&config.join("override.yaml"))?.unwrap_or(Yaml::Null),
        })
    }

    /// The guest architecture: `arch` as Lima resolves it (override, then the instance, then
    /// the default; `default` or unset is the host's).
    pub fn arch(&self) -> String {
        let given = [&self.overrides, &self.instance, &self.default]
            .into_iter()
            .find_map(|y| text_field(y, "arch"))
            .filter(|a| *a != "default");
        given.unwrap_or(std::env::consts::ARCH).to_owned()
    }

    /// Every mount Lima would make, in its order (default, instance, override). As Lima's
    /// `FillDefault` does, entries are one mount when they share a mount point (`mountPoint`,
    /// else the location), and `writable` is the last one's that sets it. Mount points are
    /// compared as written, so two spellings of one path stay two mounts here: a check over
    /// them can only see more writable mounts than Lima makes, never fewer.
    pub fn mounts(&self) -> Vec<LimaMount> {
        let mut out: Vec<(String, LimaMount)> = Vec::new();
        for y in [&self.default, &self.instance, &self.overrides] {
            let Some(list) = field(y, "mounts").and_then(Yaml::as_vec) else { continue };
            for m in list {
                let Some(location) = text_field(m, "location") else { continue };
                let point = text_field(m, "mountPoint").unwrap_or(location);
                let writable = field(m, "writable").and_then(Yaml::as_bool);
                match out.iter_mut().find(|(p, _)| p == point) {
                    Some((_, o)) => o.writable = writable.unwrap_or(o.writable),
                    None => out.push((
                        point.to_owned(),
                        LimaMount {
                            location: location.to_owned(),
                            writable: writable.unwrap_or(false),
                        },
                    )),
                }
            }
        }
        out.into_iter().map(|(_, m)| m).collect()
    }
}

/// One mount of a Lima instance, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimaMount {
    /// `location`, unexpanded.
    pub location: String,
    /// Whether the VM may write to it.
    pub writable: bool,
}

/// A mount location as Lima expands it on the host (`executeHostTemplate`, then `~`, then
/// `filepath.Clean`), or `None` when it uses a template value this does not know.
pub fn expand_location(location: &str, instance: &Instance, home: &Path) -> Option<PathBuf> {
    let mut out = String::new();
    let mut rest = location;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find("}}")? + start;
        let value = match rest[start + 2..end].trim() {
            ".Dir" => instance.dir.display().to_string(),
            ".Name" | ".Instance" => instance.name.to_string(),
            ".Home" => home.display().to_string(),
            ".LimaHome" => instance.dir.parent()?.display().to_string(),
            ".GlobalTempDir" => "/tmp".to_owned(),
            ".TempDir" => std::env::temp_dir().display().to_string(),
            _ => return None,
        };
        out.push_str(&value);
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    let path = if out == "~" {
        home.to_path_buf()
    } else if let Some(tail) = out.strip_prefix("~/") {
        home.join(tail)
    } else {
        PathBuf::from(out)
    };
    path.is_absolute().then(|| clean(&path))
}

/// `path` with `.` and `..` resolved lexically, as Go's `filepath.Clean`.
pub fn clean(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// Whether a mount of `location` reaches `protected` (one lies inside the other).
pub fn reaches(location: &Path, protected: &Path) -> bool {
    protected.starts_with(location) || location.starts_with(protected)
}

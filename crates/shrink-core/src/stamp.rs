//! Verified stamps: a file's sha256 remembered beside the facts that change whenever the file
//! does (length, inode, modification and status-change times), so that a large cached asset or
//! input model is hashed once, not on every command.

use crate::{atomic_write, cache_dir, sha256_file, sha256_hex, CoreError, Result};
use std::path::Path;

/// What identifies one state of a file on disk. The status-change time cannot be set back by
/// a program (`touch -r` sets the modification time only), so a file rewritten in place with
/// the same length and a forged modification time still misses its stamp.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Identity {
    path: String,
    len: u64,
    inode: u64,
    modified_ns: i128,
    changed_ns: i128,
}

fn identity(path: &Path) -> Result<Identity> {
    let m = std::fs::metadata(path).map_err(|source| CoreError::Io {
        action: "reading the metadata of",
        path: path.to_path_buf(),
        source,
    })?;
    #[cfg(unix)]
    let (inode, modified_ns, changed_ns) = {
        use std::os::unix::fs::MetadataExt;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        (
            m.ino(),
            ns(m.mtime(), m.mtime_nsec()),
            ns(m.ctime(), m.ctime_nsec()),
        )
    };
    #[cfg(not(unix))]
    let (inode, modified_ns, changed_ns) = {
        let modified = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as i128);
        (0, modified, 0)
    };
    Ok(Identity {
        path: path.display().to_string(),
        len: m.len(),
        inode,
        modified_ns,
        changed_ns,
    })
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Stamp {
    file: Identity,
    sha256: String,
}

/// The sha256 of the file at `path`, read from its stamp in `stamps` when the file is still the
/// one stamped (same length, inode, modification and status-change times), else hashed and
/// stamped. A stamp that cannot be written only costs the next call a hash.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let file = dir.path().join("model.gguf");
/// std::fs::write(&file, b"weights").unwrap();
/// let stamps = dir.path().join("stamps");
/// let sha = shrink_core::sha256_file_stamped_in(&file, &stamps).unwrap();
/// assert_eq!(sha, shrink_core::sha256_hex(b"weights"));
/// assert_eq!(shrink_core::sha256_file_stamped_in(&file, &stamps).unwrap(), sha);
/// ```
pub fn sha256_file_stamped_in(path: &Path, stamps: &Path) -> Result<String> {
    let path = std::fs::canonicalize(path).map_err(|source| CoreError::Io {
        action: "resolving",
        path: path.to_path_buf(),
        source,
    })?;
    let before = identity(&path)?;
    let stamp_file = stamps.join(sha256_hex(before.path.as_bytes()));
    let stamped = std::fs::read(&stamp_file)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Stamp>(&bytes).ok())
        .filter(|s| s.file == before);
    if let Some(stamp) = stamped {
        return Ok(stamp.sha256);
    }
    let sha256 = sha256_file(&path)?;
    // Stamped only when the file did not change while it was read.
    if identity(&path)? == before {
        let stamp = Stamp {
            file: before,
            sha256: sha256.clone(),
        };
        if let Ok(json) = serde_json::to_vec(&stamp) {
            let _ = std::fs::create_dir_all(stamps).and_then(|()| {
                atomic_write(&stamp_file, &json).map_err(|e| std::io::Error::other(e.to_string()))
            });
        }
    }
    Ok(sha256)
}

/// [`sha256_file_stamped_in`] with the stamps in shrink's cache (`CACHE/stamps`); without a
/// cache directory the file is hashed every time.
pub fn sha256_file_stamped(path: &Path) -> Result<String> {
    match cache_dir() {
        Ok(cache) => sha256_file_stamped_in(path, &cache.join("stamps")),
        Err(_) => sha256_file(path),
    }
}

#[cfg(test)]
mod tests;

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

/// A file written under a temporary name beside its target and renamed into place by
/// [`AtomicFile::commit`] once complete and synced: readers see either the old file or the whole
/// new one, never a partial write. Dropped without commit, the temporary is removed, except the
/// partial file of a resumable job ([`AtomicFile::resume`]), which stays for the next run.
pub struct AtomicFile {
    target: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
    tmp: Temporary,
}

enum Temporary {
    /// Removed when dropped.
    Named(tempfile::TempPath),
    /// Kept when dropped: the partial output a resumed run continues.
    Partial(PathBuf),
}

impl AtomicFile {
    /// Starts the temporary file beside `target` (removing temporaries a killed process left).
    pub fn create(target: &Path) -> Result<Self> {
        let dir = parent_dir(target);
        std::fs::create_dir_all(dir).map_err(io_err("creating directory", dir))?;
        remove_stale_temporaries(dir)?;
        let tmp = tempfile::Builder::new()
            .prefix(TMP_PREFIX)
            .tempfile_in(dir)
            .map_err(io_err("creating a temporary file in", dir))?;
        // Locked while it is being written: an unlocked temporary is one a killed process left.
        tmp.as_file()
            .lock()
            .map_err(io_err("locking the temporary file in", dir))?;
        let (file, path) = tmp.into_parts();
        Ok(Self {
            target: target.to_path_buf(),
            out: std::io::BufWriter::with_capacity(1 << 20, file),
            tmp: Temporary::Named(path),
        })
    }

    /// Continues the partial file `partial` (on the target's file system, in a [`ResumeDir`])
    /// from its first `len` bytes: what follows them, written by a run killed before it recorded
    /// them, is cut off. `len` 0 starts it afresh. The partial file is kept if the writer is
    /// dropped without a commit.
    pub fn resume(target: &Path, partial: &Path, len: u64) -> Result<Self> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(partial)
            .map_err(io_err("opening", partial))?;
        let have = file
            .metadata()
            .map_err(io_err("reading the size of", partial))?
            .len();
        if have < len {
            return Err(CoreError::Io {
                action: "resuming",
                path: partial.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the partial file holds {have} bytes, {len} were recorded"),
                ),
            });
        }
        file.set_len(len).map_err(io_err("truncating", partial))?;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0))
            .map_err(io_err("seeking in", partial))?;
        Ok(Self {
            target: target.to_path_buf(),
            out: std::io::BufWriter::with_capacity(1 << 20, file),
            tmp: Temporary::Partial(partial.to_path_buf()),
        })
    }

    /// The file being written, buffered.
    pub fn writer(&mut self) -> &mut impl Write {
        &mut self.out
    }

    /// Where the file goes on commit.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Flushes what was written to the disk and returns the file's length: a record of progress
    /// made after this holds even if the process is killed.
    pub fn sync(&mut self) -> Result<u64> {
        let target = &self.target;
        self.out.flush().map_err(io_err("writing", target))?;
        let file = self.out.get_ref();
        file.sync_data().map_err(io_err("syncing", target))?;
        Ok(file.metadata().map_err(io_err("syncing", target))?.len())
    }

    /// Flushes and syncs the file, then renames it over the target.
    pub fn commit(self) -> Result<()> {
        let path = self.target;
        let file = self
            .out
            .into_inner()
            .map_err(|e| io_err("writing", &path)(e.into_error()))?;
        file.sync_all().map_err(io_err("syncing", &path))?;
        // Temporary files are created private (0600); an artifact gets the usual 0644.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(0o644))
                .map_err(io_err("setting permissions of", &path))?;
        }
        match self.tmp {
            Temporary::Named(tmp) => tmp
                .persist(&path)
                .map_err(|e| io_err("renaming into place", &path)(e.error))?,
            Temporary::Partial(partial) => {
                std::fs::rename(&partial, &path).map_err(io_err("renaming into place", &path))?
            }
        }
        Ok(())
    }
}

/// The folder beside an output where a long job records what it has finished, so that the same
/// job run again after a kill resumes where it stopped: `.shrink-resume-<output name>`. It is
/// locked while a job uses it, belongs to one job (a description of everything that decides the
/// output's bytes: a different job empties it first) and is removed once the output is complete.
#[derive(Debug)]
pub struct ResumeDir {
    path: PathBuf,
    _lock: std::fs::File,
}

impl ResumeDir {
    /// Opens (or creates) the resume folder of `target` for the job described by `job`: what an
    /// earlier run of another job left there is removed. Fails if another process uses it.
    pub fn open(target: &Path, job: &str) -> Result<Self> {
        let dir = parent_dir(target);
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let path = dir.join(format!("{RESUME_PREFIX}{name}"));
        std::fs::create_dir_all(&path).map_err(io_err("creating directory", &path))?;
        let lock = lock_dir(&path, false)?.ok_or_else(|| CoreError::Io {
            action: "locking (another shrink process is writing the same output)",
            path: path.clone(),
            source: std::io::ErrorKind::WouldBlock.into(),
        })?;
        let resume = Self { path, _lock: lock };
        if resume.read(JOB_FILE)?.as_deref() != Some(job.as_bytes()) {
            for entry in std::fs::read_dir(&resume.path)
                .map_err(io_err("listing", &resume.path))?
                .filter_map(|e| e.ok())
            {
                let p = entry.path();
                let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
                removed.map_err(io_err("removing", &p))?;
            }
            resume.write(JOB_FILE, job.as_bytes())?;
        }
        Ok(resume)
    }

    /// The path of the file `name` in the folder.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The contents of the file `name`, if it exists.
    pub fn read(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let path = self.file(name);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("reading", &path)(e)),
        }
    }

    /// Replaces the file `name` with `bytes`, atomically and synced.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.file(name);
        let tmp = self.file(&format!("{name}.tmp"));
        let mut file = std::fs::File::create(&tmp).map_err(io_err("writing", &tmp))?;
        file.write_all(bytes).map_err(io_err("writing", &tmp))?;
        file.sync_data().map_err(io_err("syncing", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err("renaming into place", &path))
    }

    /// Removes the folder: the output is complete.
    pub fn remove(self) -> Result<()> {
        std::fs::remove_dir_all(&self.path).map_err(io_err("removing", &self.path))
    }
}

const RESUME_PREFIX: &str = ".shrink-resume-";
const JOB_FILE: &str = "job";

/// Writes a file through `write` into an [`AtomicFile`], committed when `write` succeeds.
pub fn atomic_write_with<E>(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::result::Result<(), E>,
) -> std::result::Result<(), E>
where
    E: From<CoreError>,
{
    let mut file = AtomicFile::create(path)?;
    write(file.writer())?;
    Ok(file.commit()?)
}

/// Writes `bytes` to `path` atomically (temporary file, then rename).
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    atomic_write_with(path, |w| {
        w.write_all(bytes).map_err(io_err("writing", path))
    })
}

/// A directory built under a temporary name and renamed into place by [`AtomicDir::commit`]; dropped
/// without commit, it is removed, so an interrupted run never leaves a half-written folder —
/// except the partial folder of a resumable job ([`AtomicDir::resume`]), kept for the next run.
#[derive(Debug)]
pub struct AtomicDir {
    target: PathBuf,
    staging: Option<Staging>,
    /// The staging directory, opened and locked while it lives.
    _lock: std::fs::File,
}

#[derive(Debug)]
enum Staging {
    /// Removed when dropped.
    Temporary(tempfile::TempDir),
    /// Kept when dropped: the partial folder a resumed run continues.
    Partial(PathBuf),
}

impl Staging {
    fn path(&self) -> &Path {
        match self {
            Staging::Temporary(t) => t.path(),
            Staging::Partial(p) => p,
        }
    }
}

impl AtomicDir {
    /// Starts a staging directory beside `target`.
    pub fn new(target: &Path) -> Result<Self> {
        let dir = parent_dir(target);
        std::fs::create_dir_all(dir).map_err(io_err("creating directory", dir))?;
        remove_stale_temporaries(dir)?;
        let staging = tempfile::Builder::new()
            .prefix(STAGING_PREFIX)
            .tempdir_in(dir)
            .map_err(io_err("creating a staging directory in", dir))?;
        Self::staged(target, Staging::Temporary(staging))
    }

    /// Continues the partial folder `partial` (on the target's file system, in a
    /// [`ResumeDir`]), created if missing: what a killed run wrote there stays, for the writer to
    /// keep or cut. The partial folder is kept if this is dropped without a commit.
    pub fn resume(target: &Path, partial: &Path) -> Result<Self> {
        let dir = parent_dir(target);
        std::fs::create_dir_all(dir).map_err(io_err("creating directory", dir))?;
        remove_stale_temporaries(dir)?;
        std::fs::create_dir_all(partial).map_err(io_err("creating directory", partial))?;
        Self::staged(target, Staging::Partial(partial.to_path_buf()))
    }

    fn staged(target: &Path, staging: Staging) -> Result<Self> {
        let lock = lock_dir(staging.path(), false)?.ok_or_else(|| CoreError::Io {
            action: "locking",
            path: staging.path().to_path_buf(),
            source: std::io::ErrorKind::WouldBlock.into(),
        })?;
        Ok(Self {
            target: target.to_path_buf(),
            staging: Some(staging),
            _lock: lock,
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
        let staged = match self.staging.take() {
            None => return Ok(self.target.clone()),
            Some(Staging::Temporary(t)) => t.keep(),
            Some(Staging::Partial(p)) => p,
        };
        if self.target.exists() {
            let old = parent_dir(&self.target).join(format!(
                "{OLD_PREFIX}{}",
                self.target
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ));
            let _ = std::fs::remove_dir_all(&old);
            // Locked while set aside, so that another process's clean-up leaves it alone.
            let _held = lock_dir(&self.target, false)?;
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

const TMP_PREFIX: &str = ".shrink-tmp-";
const STAGING_PREFIX: &str = ".shrink-staging-";
const OLD_PREFIX: &str = ".shrink-old-";

/// Opens `dir` and takes an exclusive advisory lock on it (`flock`): waiting for it when `wait`,
/// else `None` if another process holds it. The lock lasts as long as the returned handle.
pub fn lock_dir(dir: &Path, wait: bool) -> Result<Option<std::fs::File>> {
    let file = std::fs::File::open(dir).map_err(io_err("opening", dir))?;
    if wait {
        file.lock().map_err(io_err("locking", dir))?;
        return Ok(Some(file));
    }
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(io_err("locking", dir)(e)),
    }
}

/// Removes the temporaries that shrink's atomic writes left in `dir` when their process was
/// killed (`.shrink-tmp-*`, `.shrink-staging-*`, `.shrink-old-*`): only those, and only when no
/// live process holds their lock. Returns how many were removed.
pub fn remove_stale_temporaries(dir: &Path) -> Result<usize> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(0);
    };
    let mut removed = 0;
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if ![TMP_PREFIX, STAGING_PREFIX, OLD_PREFIX]
            .iter()
            .any(|p| name.starts_with(p))
        {
            continue;
        }
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_symlink() {
            continue; // never ours
        }
        // A live writer holds the lock; a file or folder that vanished meanwhile is fine.
        let Ok(handle) = std::fs::File::open(&path) else {
            continue;
        };
        match handle.try_lock() {
            Ok(()) => {}
            Err(_) => continue,
        }
        let result = if kind.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match result {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("removing the stale temporary", &path)(e)),
        }
    }
    Ok(removed)
}

/// Why an output would overwrite, or be written inside, the input it is made from.
fn overlap(input: &Path, output: &Path) -> Option<&'static str> {
    if input == output {
        return Some("is the input model");
    }
    if output.starts_with(input) {
        return Some("lies inside the input model");
    }
    if input.starts_with(output) {
        return Some("contains the input model");
    }
    None
}

/// `path` with symbolic links and `..` resolved, for a path that may not exist yet: its deepest
/// existing ancestor canonicalized, the rest appended.
pub fn resolve_path(path: &Path) -> Result<PathBuf> {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(io_err("reading the current directory for", path))?
            .join(path)
    };
    let mut rest = Vec::new();
    let mut base = absolute.as_path();
    loop {
        match base.canonicalize() {
            Ok(real) => {
                let mut out = real;
                for part in rest.iter().rev() {
                    match part {
                        std::path::Component::ParentDir => {
                            out.pop();
                        }
                        std::path::Component::CurDir => {}
                        other => out.push(other),
                    }
                }
                return Ok(out);
            }
            Err(_) => match (base.parent(), base.components().next_back()) {
                (Some(parent), Some(last)) => {
                    rest.push(last);
                    base = parent;
                }
                _ => return Ok(absolute),
            },
        }
    }
}

/// Refuses an output path that is the input model (same resolved path or the same file through a
/// hard link), lies inside an input folder, or is a folder holding the input: writing it would
/// modify or delete the input. `what` names the output in the error (`-o`, `model/`).
pub fn check_output_is_not_input(input: &Path, output: &Path, what: &str) -> Result<()> {
    let resolved_in = resolve_path(input)?;
    let resolved_out = resolve_path(output)?;
    let mut why = overlap(&resolved_in, &resolved_out);
    #[cfg(unix)]
    if why.is_none() {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(a), Ok(b)) = (std::fs::metadata(input), std::fs::metadata(output)) {
            if a.dev() == b.dev() && a.ino() == b.ino() {
                why = Some("is the same file as the input model");
            }
        }
    }
    match why {
        None => Ok(()),
        Some(why) => Err(CoreError::OutputOverlapsInput {
            what: what.to_string(),
            output: output.to_path_buf(),
            input: input.to_path_buf(),
            why,
        }),
    }
}

/// Characters allowed in run and stage names, which become folder names.
pub const NAME_CHARS: &str = "letters, digits, '.', '_', '-' and '+' (not starting with '.')";

/// Whether `name` is a plain folder name: 1–100 of [`NAME_CHARS`], not starting with '.', so it
/// can never be absolute, `..`, hidden or empty.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+'))
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
mod tests;

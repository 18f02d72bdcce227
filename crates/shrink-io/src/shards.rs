//! Safetensors written as tensors become ready, split into shards as Hugging Face splits them
//! (`model-00001-of-00004.safetensors` … and `model.safetensors.index.json`; one file,
//! `model.safetensors`, when everything fits in one shard). Every header is computed from the plan
//! before any data, so nothing but the tensor being appended is ever held.

use crate::{io_error, IoError, Result};
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Hugging Face's default shard size (`max_shard_size = "5GB"`).
pub const MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// A tensor of a safetensors folder being written, known before its data.
#[derive(Debug, Clone, PartialEq)]
pub struct SafetensorsEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl SafetensorsEntry {
    pub fn bytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8) as u64
    }
}

/// Writes the safetensors files of a folder in plan order: shards are filled in order up to
/// `max_shard_bytes` (a tensor larger than that gets a shard of its own), each written under a
/// temporary name and renamed when its last tensor is in. The folder itself should be staged
/// (`shrink_core::AtomicDir`) so that it appears only when complete.
pub struct ShardedWriter {
    dir: PathBuf,
    plan: Vec<SafetensorsEntry>,
    /// The shard of each entry, and each shard's file name and header.
    shard_of: Vec<usize>,
    files: Vec<String>,
    headers: Vec<Vec<u8>>,
    next: usize,
    open: Option<(usize, shrink_core::AtomicFile)>,
    /// Shards are written as `.partial-<file>`, kept across a kill (a resumable job's), instead
    /// of under temporary names.
    resumable: bool,
}

/// Where a resumable writer writes shard `file` until it is complete.
fn partial_name(file: &str) -> String {
    format!(".partial-{file}")
}

/// A writer that counts the bytes through it.
struct Counted<'a, W: Write> {
    inner: &'a mut W,
    bytes: u64,
}

impl<W: Write> Write for Counted<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl ShardedWriter {
    /// Plans the shards of `plan` in `dir`.
    pub fn create(dir: &Path, plan: Vec<SafetensorsEntry>, max_shard_bytes: u64) -> Result<Self> {
        let mut shard_of = Vec::with_capacity(plan.len());
        let mut sizes: Vec<u64> = vec![];
        for entry in &plan {
            let bytes = entry.bytes();
            match sizes.last_mut() {
                Some(size) if *size > 0 && *size + bytes <= max_shard_bytes => *size += bytes,
                _ => sizes.push(bytes),
            }
            shard_of.push(sizes.len() - 1);
        }
        let n = sizes.len().max(1);
        let files: Vec<String> = (0..n)
            .map(|i| match n {
                1 => "model.safetensors".to_string(),
                _ => format!("model-{:05}-of-{n:05}.safetensors", i + 1),
            })
            .collect();
        let mut headers = Vec::with_capacity(n);
        for (shard, file) in files.iter().enumerate() {
            let mut header = serde_json::Map::new();
            header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
            let mut offset = 0u64;
            for (entry, _) in plan.iter().zip(&shard_of).filter(|(_, s)| **s == shard) {
                let end = offset + entry.bytes();
                header.insert(
                    entry.name.clone(),
                    serde_json::json!({
                        "dtype": format!("{:?}", entry.dtype),
                        "shape": entry.shape,
                        "data_offsets": [offset, end],
                    }),
                );
                offset = end;
            }
            let mut json = serde_json::to_vec(&header).map_err(|e| IoError::Format {
                path: dir.join(file),
                message: e.to_string(),
            })?;
            // The data starts 8-byte aligned, as the safetensors writer pads it.
            json.resize(json.len().next_multiple_of(8), b' ');
            let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
            bytes.extend(json);
            headers.push(bytes);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            plan,
            shard_of,
            files,
            headers,
            next: 0,
            open: None,
            resumable: false,
        })
    }

    /// [`ShardedWriter::create`] for a job that can be resumed, continuing in `dir` what a
    /// killed run of the same plan wrote there, of which the first `done` tensors were recorded
    /// (as [`ShardedWriter::sync`] counted them): the shards before the one holding tensor `done`
    /// are put in place if they are not, that one is cut after its recorded tensors, and the
    /// later ones are removed. With `done` 0 it starts afresh.
    pub fn resume(
        dir: &Path,
        plan: Vec<SafetensorsEntry>,
        max_shard_bytes: u64,
        done: usize,
    ) -> Result<Self> {
        let mut w = Self::create(dir, plan, max_shard_bytes)?;
        w.resumable = true;
        if done > w.plan.len() {
            return Err(IoError::Format {
                path: dir.to_path_buf(),
                message: format!(
                    "resuming after {done} tensors of a folder that plans {}",
                    w.plan.len()
                ),
            });
        }
        // The shard the next tensor goes to (past the last when every tensor is written).
        let current = w.shard_of.get(done).copied().unwrap_or(w.files.len());
        for (shard, file) in w.files.iter().enumerate() {
            let (path, partial) = (dir.join(file), dir.join(partial_name(file)));
            let written: u64 = w
                .plan
                .iter()
                .zip(&w.shard_of)
                .take(done)
                .filter(|(_, s)| **s == shard)
                .map(|(e, _)| e.bytes())
                .sum();
            let len = w.headers[shard].len() as u64 + written;
            let removed = |p: &Path| match std::fs::remove_file(p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_error(p)(e)),
                _ => Ok(()),
            };
            if shard < current {
                // Complete: in place already, or still under its partial name.
                if !path.exists() {
                    shrink_core::AtomicFile::resume(&path, &partial, len)?.commit()?;
                }
            } else if shard == current && written > 0 {
                // Put in place by a run killed after it finished the shard: continued again.
                if !partial.exists() && path.exists() {
                    std::fs::rename(&path, &partial).map_err(io_error(&path))?;
                }
                w.open = Some((
                    shard,
                    shrink_core::AtomicFile::resume(&path, &partial, len)?,
                ));
            } else {
                removed(&partial)?;
                removed(&path)?;
            }
        }
        w.next = done;
        Ok(w)
    }

    /// Flushes the shard being written to the disk and returns how many tensors are written
    /// and that shard's length: a point to resume from.
    pub fn sync(&mut self) -> Result<(usize, u64)> {
        let bytes = match &mut self.open {
            Some((_, file)) => file.sync()?,
            None => 0,
        };
        Ok((self.next, bytes))
    }

    /// The tensor the next [`ShardedWriter::append`] must write.
    pub fn next(&self) -> Option<&SafetensorsEntry> {
        self.plan.get(self.next)
    }

    /// Appends the data (little-endian, row-major) of the next planned tensor, `name`.
    pub fn append(&mut self, name: &str, data: &[u8]) -> Result<()> {
        self.append_with(name, data.len() as u64, &mut |w| w.write_all(data))
    }

    /// [`ShardedWriter::append`] of `len` bytes that `write` produces a piece at a time (a large
    /// tensor converted a slice of rows at a time is never held whole in its written type).
    pub fn append_with(
        &mut self,
        name: &str,
        len: u64,
        write: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
    ) -> Result<()> {
        let shard = *self.shard_of.get(self.next).unwrap_or(&usize::MAX);
        let path = match self.files.get(shard) {
            Some(file) => self.dir.join(file),
            None => self.dir.clone(),
        };
        let err = |message: String| IoError::Tensor {
            path: path.clone(),
            tensor: name.to_string(),
            message,
        };
        let entry = self
            .plan
            .get(self.next)
            .ok_or_else(|| err("written after every planned tensor".into()))?;
        if entry.name != name {
            return Err(err(format!(
                "written out of order: '{}' comes next",
                entry.name
            )));
        }
        if len != entry.bytes() {
            return Err(err(format!(
                "{} bytes of data for a {:?} tensor of shape {:?} ({} bytes)",
                len,
                entry.dtype,
                entry.shape,
                entry.bytes()
            )));
        }
        if self.open.as_ref().map(|(s, _)| *s) != Some(shard) {
            self.close()?;
            let mut file = match self.resumable {
                true => {
                    let partial = self.dir.join(partial_name(&self.files[shard]));
                    shrink_core::AtomicFile::resume(&path, &partial, 0)?
                }
                false => shrink_core::AtomicFile::create(&path)?,
            };
            file.writer()
                .write_all(&self.headers[shard])
                .map_err(io_error(&path))?;
            self.open = Some((shard, file));
        }
        if let Some((_, file)) = &mut self.open {
            let mut counted = Counted {
                inner: file.writer(),
                bytes: 0,
            };
            write(&mut counted).map_err(io_error(&path))?;
            if counted.bytes != len {
                return Err(err(format!(
                    "{} bytes written, {len} announced",
                    counted.bytes
                )));
            }
        }
        self.next += 1;
        Ok(())
    }

    fn close(&mut self) -> Result<()> {
        if let Some((_, file)) = self.open.take() {
            file.commit()?;
        }
        Ok(())
    }

    /// Checks that every planned tensor was written, puts the last shard in place and, for a
    /// sharded folder, writes `model.safetensors.index.json`. Returns the files written.
    pub fn finish(mut self) -> Result<Vec<String>> {
        if let Some(missing) = self.plan.get(self.next) {
            return Err(IoError::Tensor {
                path: self.dir.join(&self.files[self.shard_of[self.next]]),
                tensor: missing.name.clone(),
                message: format!(
                    "never written ({} of {} tensors were)",
                    self.next,
                    self.plan.len()
                ),
            });
        }
        self.close()?;
        if self.files.len() > 1 {
            let weight_map: BTreeMap<&str, &str> = self
                .plan
                .iter()
                .zip(&self.shard_of)
                .map(|(e, &s)| (e.name.as_str(), self.files[s].as_str()))
                .collect();
            let total: u64 = self.plan.iter().map(SafetensorsEntry::bytes).sum();
            let index = serde_json::json!({
                "metadata": { "total_size": total },
                "weight_map": weight_map,
            });
            let path = self.dir.join("model.safetensors.index.json");
            let mut text = serde_json::to_string_pretty(&index).map_err(|e| IoError::Format {
                path: path.clone(),
                message: e.to_string(),
            })?;
            text.push('\n');
            shrink_core::atomic_write(&path, text.as_bytes())?;
        }
        Ok(self.files)
    }
}

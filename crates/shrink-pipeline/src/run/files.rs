//! The run folder's files: JSON records, hashes of inputs, texts read with their hashes, copies
//! and the leftovers of an interrupted run.

use super::*;

pub(super) fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> PipelineError + '_ {
    move |e| PipelineError::Io {
        file: path.display().to_string(),
        message: e.to_string(),
    }
}

pub(super) fn read_json<T: DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

pub(super) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| PipelineError::Invalid(format!("{}: {e}", path.display())))?;
    text.push('\n');
    Ok(shrink_core::atomic_write(path, text.as_bytes())?)
}

pub(super) fn key_of(value: &serde_json::Value) -> String {
    sha256_hex(value.to_string().as_bytes())
}

/// Says through `log` that the demo model or dataset `spec` names is about to be fetched (a text
/// is named `DATASET:SPLIT`), when it is not in the cache yet.
pub(super) fn announce_fetch(spec: &str, log: &dyn Fn(&str)) {
    for part in shrink_data::text_parts(spec) {
        if Path::new(part).exists() {
            continue;
        }
        let name = part
            .parse::<shrink_data::TextRef>()
            .map_or_else(|_| part.to_string(), |r| r.dataset);
        if let Ok(m) = shrink_data::find(&name) {
            if matches!(shrink_data::is_cached(&m), Ok(false)) {
                log(&format!(
                    "fetching {} ({}=={}) ...",
                    m.name, m.package.name, m.package.version
                ));
            }
        }
    }
}

/// sha256 of a file, or of a folder's files (names and contents, in name order).
pub(super) fn hash_path(path: &Path) -> Result<String> {
    if path.is_file() {
        return Ok(shrink_core::sha256_file_stamped(path)?);
    }
    let mut entries = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(io_error(path))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    for f in files {
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
        entries.push(serde_json::json!([
            name,
            shrink_core::sha256_file_stamped(&f)?
        ]));
    }
    Ok(key_of(&serde_json::Value::Array(entries)))
}

/// The text `spec` names (fetched if needed), each file read once: its sha256 goes into `inputs`
/// under `role`. Returns the text and a key over the files' hashes.
pub(super) fn read_text_input(
    role: &str,
    spec: &str,
    inputs: &mut Vec<InputHash>,
    log: &dyn Fn(&str),
) -> Result<(String, String)> {
    announce_fetch(spec, log);
    let mut text = String::new();
    let mut hashes = Vec::new();
    for path in shrink_data::text_files(spec)? {
        let bytes = std::fs::read(&path).map_err(io_error(&path))?;
        let sha256 = sha256_hex(&bytes);
        match std::str::from_utf8(&bytes) {
            Ok(t) => text.push_str(t),
            Err(_) => return Err(shrink_data::DataError::NotUtf8 { path }.into()),
        }
        hashes.push(sha256.clone());
        inputs.push(InputHash {
            role: role.into(),
            path: path.display().to_string(),
            sha256,
        });
    }
    Ok((text, key_of(&serde_json::json!(hashes))))
}

pub(super) fn remove_leftovers(dir: &Path) -> Result<()> {
    shrink_core::remove_stale_temporaries(dir)?;
    Ok(())
}

pub(super) fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(io_error(to))?;
    for e in std::fs::read_dir(from).map_err(io_error(from))? {
        let e = e.map_err(io_error(from))?;
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), &target).map_err(io_error(&target))?;
        }
    }
    Ok(())
}

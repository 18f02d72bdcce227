//! The pipeline file's schema, parsing with positions, and validation.

mod keys;
mod locate;
mod schema;
mod sweep;

use crate::quantize::Export;
use crate::stage::{whole, KeyError, StageJob, StageKind};
use crate::{PipelineError, Result};
use locate::{closest, header_offsets, key_offset, line_column, unknown_field, Place};
use std::path::Path;

pub use keys::StageKeys;
pub(crate) use keys::{fields, KeyReader, ValueError};
pub use schema::*;

/// Reads and validates a pipeline file.
pub fn load(path: &Path) -> Result<Pipeline> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| PipelineError::Io {
        file: file.clone(),
        message: e.to_string(),
    })?;
    parse(&text, &file)
}

/// Parses and validates pipeline text; `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<Pipeline> {
    let at = |offset: usize, message: String| {
        let (line, column) = line_column(text, offset);
        PipelineError::Config {
            file: file.to_string(),
            line,
            column,
            message,
        }
    };
    // A message at `offset`; one about a key (an unknown key, with its "did you mean") at the
    // start of the key's line.
    let describe = |offset: usize, key: Option<&str>, message: &str| -> PipelineError {
        match unknown_field(message) {
            Some((key, expected)) => {
                let hint = closest(&key, &expected)
                    .map(|k| format!("; did you mean `{k}`?"))
                    .unwrap_or_default();
                at(
                    key_offset(text, offset, &key).unwrap_or(offset),
                    format!(
                        "unknown key `{key}`{hint} (expected one of: {})",
                        expected.join(", ")
                    ),
                )
            }
            None => at(
                key.and_then(|k| key_offset(text, offset, k))
                    .unwrap_or(offset),
                message.to_string(),
            ),
        }
    };
    let stage_starts: Vec<usize> = header_offsets(text, "[[stage]]");
    let stage_start = |i: usize| stage_starts.get(i).copied().unwrap_or(0);
    // An error in the i-th stage's keys, at its value (or the stage, when it has no place).
    let value_error = |i: usize, e: ValueError| {
        let offset = e.span.map_or_else(|| stage_start(i), |s| s.start);
        describe(offset, e.key.as_deref(), &e.message)
    };
    let mut pipeline: Pipeline = toml::from_str(text).map_err(|e| {
        let offset = e.span().map(|s| s.start).unwrap_or(0);
        describe(offset, None, e.message().trim())
    })?;
    // Each [[stage]] read into its kind and keys; keys its kind does not read are refused first,
    // as the schema's unknown keys are.
    for (i, table) in std::mem::take(&mut pipeline.stage_tables)
        .iter()
        .enumerate()
    {
        let stage = keys::read_stage(table).map_err(|e| value_error(i, e))?;
        if let Err(KeyError::Value(e)) = stage.keys.check_applies(stage.kind) {
            return Err(value_error(i, e));
        }
        pipeline.stages.push(stage);
    }
    // Semantic checks, each pointing at the key it is about.
    // Where a key is: in the i-th [[stage]], in a [section], or at the top.
    let key_at = |place: Place, key: &str| -> usize {
        let from = match place {
            Place::Top => 0,
            Place::Stage(i) => stage_start(i),
            Place::Section(h) => header_offsets(text, h).first().copied().unwrap_or(0),
        };
        key_offset(text, from, key).unwrap_or(from)
    };
    let fail = |place: Place, key: &str, message: String| -> PipelineError {
        at(key_at(place, key), message)
    };
    if !shrink_core::is_plain_name(&pipeline.name) {
        return Err(fail(
            Place::Top,
            "name",
            format!(
                "name `{}` must be a plain folder name: 1–100 {}",
                pipeline.name,
                shrink_core::NAME_CHARS
            ),
        ));
    }
    let d = &pipeline.data;
    if d.samples == 0 || d.seq_len < 2 {
        return Err(fail(
            Place::Section("[data]"),
            if d.samples == 0 { "samples" } else { "seq_len" },
            "calibration needs samples ≥ 1 and seq_len ≥ 2".into(),
        ));
    }
    if let Err(err) = shrink_data::check_model(&pipeline.model.source) {
        return Err(fail(
            Place::Section("[model]"),
            "source",
            format!("source = \"{}\": {err}", pipeline.model.source),
        ));
    }
    let e = &pipeline.eval;
    if !["llama-cpp", "full"].contains(&e.protocol.as_str()) {
        return Err(fail(
            Place::Section("[eval]"),
            "protocol",
            format!("protocol `{}` is not one of: llama-cpp, full", e.protocol),
        ));
    }
    if e.ctx < 2 {
        return Err(fail(
            Place::Section("[eval]"),
            "ctx",
            "ctx must be at least 2".into(),
        ));
    }
    for f in &pipeline.export.formats {
        if !["gguf", "hf"].contains(&f.as_str()) {
            return Err(fail(
                Place::Section("[export]"),
                "formats",
                format!("export format `{f}` is not one of: gguf, hf"),
            ));
        }
    }
    for gate in crate::gates::GATES {
        let (key, (lo, hi)) = (gate.key, gate.range);
        if let Some(v) = (gate.limit)(&pipeline.gates) {
            if !(lo..=hi).contains(&v) || !v.is_finite() {
                return Err(fail(
                    Place::Section("[gates]"),
                    key,
                    format!(
                        "{key} = {v} is outside {lo}..={}",
                        if hi == f64::MAX {
                            "∞".to_string()
                        } else {
                            hi.to_string()
                        }
                    ),
                ));
            }
        }
    }
    if pipeline.stages.is_empty() {
        return Err(at(
            text.len(),
            "no [[stage]]: a pipeline needs at least one stage".into(),
        ));
    }
    let mut names: Vec<String> = vec!["model".into()];
    let mut previous = "model".to_string();
    for (i, s) in pipeline.stages.iter().enumerate() {
        let here = Place::Stage(i);
        let name = s.display_name();
        if !shrink_core::is_plain_name(&name) {
            return Err(fail(
                here,
                "name",
                format!(
                    "stage name `{name}` must be a plain folder name: 1–100 {}",
                    shrink_core::NAME_CHARS
                ),
            ));
        }
        if names.contains(&name) {
            return Err(fail(
                here,
                "name",
                format!("stage name `{name}` is used twice (give the stage a `name`)"),
            ));
        }
        let teacher = s.keys.text("teacher").map(String::from);
        for (key, value) in [("input", &s.input), ("teacher", &teacher)] {
            if let Some(v) = value {
                if !names.contains(v) {
                    return Err(fail(
                        here,
                        key,
                        format!(
                            "{key} `{v}` is not the model or an earlier stage (known: {})",
                            names.join(", ")
                        ),
                    ));
                }
            }
        }
        let planned = check_stage(s).map_err(|e| match e {
            KeyError::Key(Some(key), message) => match s.keys.span_of(key) {
                Some(span) => at(
                    key_offset(text, span.start, key).unwrap_or(span.start),
                    message,
                ),
                None => fail(here, key, message),
            },
            KeyError::Key(None, message) => {
                at(stage_start(i), format!("stage `{name}`: {message}"))
            }
            KeyError::Value(e) => value_error(i, e),
        })?;
        let input = s.input.clone().unwrap_or_else(|| previous.clone());
        let teacher =
            (s.kind == StageKind::Distill).then(|| teacher.unwrap_or_else(|| "model".into()));
        if teacher.as_ref() == Some(&input)
            && matches!(&planned.job, StageJob::Distill(r) if r.student == crate::distill::StudentInit::Model)
        {
            return Err(at(
                stage_start(i),
                format!("stage `{name}`: the student would be the teacher itself: take a pruned stage as input, or set `layers` or `[stage.student]`"),
            ));
        }
        let mut planned = PlannedStage {
            name: name.clone(),
            input,
            teacher,
            ..planned
        };
        // Quantizing a pruned model keeps its mask unless the stage says otherwise.
        let input_has_mask = pipeline
            .planned
            .iter()
            .any(|p| p.name == planned.input && p.job.job().leaves_mask());
        planned.job.job_mut().keep_mask(&s.keys, input_has_mask);
        pipeline.planned.push(planned);
        previous = name.clone();
        names.push(name);
    }
    // The texts the planned stages read, known without fetching them.
    let calibrates = pipeline.planned.iter().any(|p| p.calibrates);
    let trains = pipeline.planned.iter().any(|p| p.job.trains());
    for (key, spec, used) in [
        ("eval", &pipeline.data.eval, true),
        ("calib", &pipeline.data.calib, calibrates),
        ("train", &pipeline.data.train, trains),
    ] {
        if let (true, Err(err)) = (used, shrink_data::check_text(spec)) {
            return Err(fail(
                Place::Section("[data]"),
                key,
                format!("{key} = \"{spec}\": {err}"),
            ));
        }
    }
    for f in &pipeline.export.formats {
        let wanted = if f == "hf" { Export::Hf } else { Export::Gguf };
        if !pipeline.planned.iter().any(|s| s.export == wanted) {
            return Err(fail(
                Place::Section("[export]"),
                "formats",
                format!("no stage writes a {f} model to export (set a stage's `format`)"),
            ));
        }
    }
    if let Some(sweep) = pipeline.sweep.clone() {
        let at_sweep = |key: &str, message: String| fail(Place::Section("[sweep]"), key, message);
        sweep::plan_variants(&mut pipeline, &sweep, &at_sweep)?;
    }
    Ok(pipeline)
}

/// Checks one stage's own keys and makes its job; on error, where (a key, a value's place or
/// the whole stage) and why.
fn check_stage(s: &Stage) -> std::result::Result<PlannedStage, KeyError> {
    s.keys.check_applies(s.kind)?;
    let mut reader = KeyReader::new(&s.keys);
    let job = s.kind.stage_type().job(s.kind, &mut reader)?;
    if let Some(key) = reader.unread() {
        return Err(KeyError::Key(
            None,
            format!(
                "`{key}` is listed for a {} stage but never read (a defect in shrink)",
                s.kind.name()
            ),
        ));
    }
    let (calibrates, export) = whole(job.resolve())?;
    Ok(PlannedStage {
        name: s.display_name(),
        kind: s.kind,
        input: String::new(),
        calibrates,
        export,
        job,
        teacher: None,
        sweep_value: None,
    })
}

#[cfg(test)]
mod tests;

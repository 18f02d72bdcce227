//! `[sweep]`: the swept stage planned once per value, with every later stage that reads from it.

use super::{check_stage, closest, Pipeline, PlannedStage, Sweep, SWEEP_KEYS};
use crate::{PipelineError, Result};

/// Adds the planned variants of `sweep` to `pipeline`: the swept stage once per value (unless
/// the pipeline as written already runs it), and every later stage that (transitively) reads
/// from it, renamed `NAME@KEY=VALUE`. Errors point into `[sweep]` through `at_sweep`.
pub(super) fn plan_variants(
    pipeline: &mut Pipeline,
    sweep: &Sweep,
    at_sweep: &dyn Fn(&str, String) -> PipelineError,
) -> Result<()> {
    let Some(index) = pipeline
        .stages
        .iter()
        .position(|s| s.display_name() == sweep.stage)
    else {
        return Err(at_sweep(
            "stage",
            format!(
                "sweep stage `{}` is not a stage of this pipeline (stages: {})",
                sweep.stage,
                pipeline
                    .stages
                    .iter()
                    .map(|s| s.display_name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    };
    let swept = &pipeline.stages[index];
    if !SWEEP_KEYS.contains(&sweep.key.as_str()) || !swept.kind.keys().contains(&sweep.key.as_str())
    {
        let hint = closest(
            &sweep.key,
            &SWEEP_KEYS.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
        )
        .map(|k| format!("; did you mean `{k}`?"))
        .unwrap_or_default();
        return Err(at_sweep(
            "key",
            format!(
                "cannot sweep `{}` of a {} stage{hint} (sweepable: {})",
                sweep.key,
                swept.kind.name(),
                SWEEP_KEYS.join(", ")
            ),
        ));
    }
    if sweep.values.is_empty() {
        return Err(at_sweep(
            "values",
            "a sweep needs at least one value".into(),
        ));
    }
    let mut variants = Vec::new();
    for value in &sweep.values {
        let shown = match value {
            toml::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let label = format!("{}={shown}", sweep.key);
        let suffix = format!("@{label}");
        let problem = |message: String| at_sweep("values", format!("{label}: {message}"));
        let stage = swept.with_value(&sweep.key, value);
        let mut planned = check_stage(&stage).map_err(|e| problem(e.message().to_string()))?;
        let main = &pipeline.planned[index];
        // The same input as the stage as written, so the same mask.
        planned
            .job
            .job_mut()
            .keep_mask(&stage.keys, main.job.job().leaves_mask());
        if planned.job == main.job {
            continue; // the pipeline as written already runs this value
        }
        // The swept stage and every later stage that (transitively) reads from it.
        let mut renamed: Vec<String> = vec![main.name.clone()];
        variants.push(PlannedStage {
            name: format!("{}{suffix}", main.name),
            input: main.input.clone(),
            sweep_value: Some(label.clone()),
            ..planned
        });
        for later in &pipeline.planned[index + 1..] {
            if renamed.contains(&later.input) {
                renamed.push(later.name.clone());
                variants.push(PlannedStage {
                    name: format!("{}{suffix}", later.name),
                    input: format!("{}{suffix}", later.input),
                    sweep_value: Some(label.clone()),
                    ..later.clone()
                });
            }
        }
    }
    pipeline.planned.extend(variants);
    Ok(())
}

//! One stage in the run folder: its record in `stages/NAME/stage.json`, its folder, and its run
//! through a staging folder that is committed only when the artifact and record are complete.

use super::*;

/// What a finished stage left in `stages/NAME/stage.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct StageRecord {
    pub(super) schema: String,
    pub(super) key: String,
    pub(super) name: String,
    pub(super) kind: String,
    pub(super) input: String,
    /// File or folder name inside the stage folder.
    pub(super) artifact: String,
    pub(super) format: String,
    pub(super) method: String,
    pub(super) types: BTreeMap<String, usize>,
    pub(super) linear_bits_per_weight: f64,
    pub(super) layers: Vec<LayerRow>,
    /// Parameters before and after, and for structured pruning what was removed and the new shape.
    #[serde(default)]
    pub(super) pruning: Option<serde_json::Value>,
    /// Distillation and QAT: the training log (loss per step, held-out metrics, throughput).
    #[serde(default)]
    pub(super) training: Option<shrink_train::TrainOutcome>,
    /// Search: the sensitivity table, everything verified and whether the budget was met.
    #[serde(default)]
    pub(super) search: Option<crate::search::SearchSummary>,
    pub(super) wall_s: f64,
    pub(super) peak_rss_bytes: u64,
    /// The memory formula's estimate of the stage's peak, when it read its input block by block
    /// (with the baseline model the run holds, if any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) estimated_peak_bytes: Option<u64>,
    pub(super) shrink_version: String,
}

/// Removes what an interrupted run left: staging folders and temporary files of atomic writes.
/// Refuses, before any work, a quantization whose formats do not fit the shapes of the model it
/// will read: every quantize stage whose input chain keeps the input model's shapes (no
/// structured pruning or distillation on the way).
pub(super) fn check_stage_shapes(
    pipeline: &Pipeline,
    config: &shrink_models::ModelConfig,
) -> Result<()> {
    let plan = pipeline.plan();
    for stage in plan {
        let mut input = stage.input.as_str();
        let mut same_shapes = true;
        while let Some(from) = plan.iter().find(|s| s.name == input) {
            same_shapes &= from.job.job().keeps_shapes();
            input = from.input.as_str();
        }
        if same_shapes {
            stage
                .job
                .job()
                .check_shapes(config)
                .map_err(|e| PipelineError::Stage {
                    stage: stage.name.clone(),
                    source: Box::new(e),
                })?;
        }
    }
    Ok(())
}

/// The folder of a stage under `stages/`: its name when that is a plain folder name (every name a
/// pipeline gives is), else — for sweep variants such as `q@preset=configs/x.toml` — the name with
/// other characters replaced and a hash of the full name appended, so it stays one component.
pub(crate) fn stage_folder(name: &str) -> String {
    let plain: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+' | '@' | '=') {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    let plain = plain.trim_start_matches('.');
    if plain == name {
        return name.to_string();
    }
    format!(
        "{plain}~{}",
        &shrink_core::sha256_hex(name.as_bytes())[..12]
    )
}

/// Runs one stage into `dir` (through a staging folder), on `built`, the input model when it is
/// already built (the baseline), else on the model built from `cx.checkpoint`.
pub(super) fn run_stage(
    stage: &PlannedStage,
    key: String,
    cx: &StageContext,
    built: Option<&Transformer>,
    dir: &Path,
    estimate: Option<u64>,
) -> Result<StageRecord> {
    let staged = AtomicDir::new(dir)?;
    let artifact = match stage.export {
        Export::Gguf => "model.gguf",
        Export::Hf => "model",
    };
    let out = staged.path().join(artifact);
    sys::reset_peak_rss();
    let start = Instant::now();
    // A block-wise job reads its input one block at a time; others get the model whole.
    let job = stage.job.job();
    let result = if job.streams(cx.checkpoint) {
        job.run_streamed(cx, &out)?
    } else {
        let mut model = match built {
            Some(model) => model.clone(),
            None => build_model(cx.checkpoint, DType::F32)?,
        };
        job.run(cx, &mut model, &out)?
    };
    let wall_s = start.elapsed().as_secs_f64();
    let record = StageRecord {
        schema: "shrink.stage/v1".into(),
        key,
        name: stage.name.clone(),
        kind: stage.kind.name().into(),
        input: stage.input.clone(),
        artifact: artifact.into(),
        format: serde_json::to_value(stage.export)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default(),
        method: result.method,
        types: result.types,
        linear_bits_per_weight: result.linear_bits_per_weight,
        layers: result.layers,
        pruning: result.pruning,
        training: result.training,
        search: result.search,
        wall_s,
        peak_rss_bytes: sys::peak_rss_bytes(),
        estimated_peak_bytes: estimate.filter(|_| job.streams(cx.checkpoint)),
        shrink_version: VERSION.into(),
    };
    // The record is written last: its presence means the artifact beside it is complete.
    write_json(&staged.path().join("stage.json"), &record)?;
    staged.commit()?;
    if cx.workdir.exists() {
        std::fs::remove_dir_all(cx.workdir).map_err(io_error(cx.workdir))?;
    }
    Ok(record)
}

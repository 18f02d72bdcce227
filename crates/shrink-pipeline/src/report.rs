//! The run report: one serializable value (`report.json`, schema `shrink.report/v1`) from which
//! `report.md` and the self-contained `report.html` are rendered.

use serde::{Deserialize, Serialize};
/// Speed of the model as it would be served: prefill and greedy decoding, `shrink-integer` (a
/// GGUF's block weights multiplied as llama.cpp multiplies them), `candle-f32` (f32 weights: other
/// formats) or `candle-quantized` (candle's quantized GGUF kernels, for a model measured block by
/// block).
pub use shrink_eval::DecodeSpeed;
use std::collections::BTreeMap;

/// Everything a run measured, baseline first.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    /// `shrink.report/v1`
    pub schema: String,
    pub name: String,
    pub description: Option<String>,
    /// The pipeline file as given on the command line.
    pub pipeline_file: String,
    pub provenance: Provenance,
    pub eval: EvalSettings,
    /// The input model first (`kind = "baseline"`), then every stage (sweep variants included) in
    /// the order they ran.
    pub rows: Vec<ModelRow>,
    /// Names of the rows exported to `model/`.
    pub exported: Vec<String>,
    pub gates: Vec<GateResult>,
    /// Greedy continuations of fixed prompts by the input model and each stage's model.
    pub generations: Vec<Generation>,
    /// Per-linear tables, one per stage that changed weights.
    pub layers: Vec<StageLayers>,
    pub sweep: Option<SweepSummary>,
    /// Search stages: what was verified and each tensor's sensitivity.
    #[serde(default)]
    pub searches: Vec<SearchSection>,
    /// Loss curves of stages that train (none of today's stage kinds do).
    pub training: Vec<LossCurve>,
    /// Wall time of the whole `shrink run`, cached stages included at their cost of zero.
    pub wall_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Provenance {
    pub shrink_version: String,
    /// sha256 of the pipeline file's bytes.
    pub config_sha256: String,
    pub inputs: Vec<InputHash>,
    pub seed: u64,
    pub machine: Machine,
    /// RFC 3339, UTC.
    pub date_utc: String,
    /// The command line that produced the report.
    pub command: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InputHash {
    /// `model`, `calibration text`, `evaluation text`.
    pub role: String,
    pub path: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Machine {
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub cpu: String,
    pub cores: usize,
    pub memory_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalSettings {
    pub text: String,
    pub protocol: String,
    pub ctx: usize,
    pub chunks: usize,
    pub tokens_scored: usize,
    /// Encoders: the held-out sentences embedded (chunks and tokens scored are then 0).
    #[serde(default)]
    pub sentences: Option<usize>,
    /// The models were evaluated block by block (no generations; decode speed of GGUFs only).
    #[serde(default)]
    pub block_by_block: bool,
}

/// One model of the run: the input (baseline) or a stage's output.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelRow {
    pub name: String,
    /// `baseline` or a stage kind (`quantize.gptq`).
    pub kind: String,
    /// The row this model was made from (`None` for the baseline).
    pub input: Option<String>,
    /// The artifact, relative to the run folder (`stages/gptq/model.gguf`).
    pub artifact: String,
    /// `gguf` or `hf`.
    pub format: String,
    /// True when the stage was already done and this run reused it.
    pub cached: bool,
    /// For a sweep variant: `key=value`.
    pub sweep_value: Option<String>,
    /// Perplexity on the evaluation text; an encoder's masked-LM pseudo-perplexity, or not a
    /// number (`null` in JSON) for an encoder without a masked-LM head.
    #[serde(deserialize_with = "null_as_nan")]
    pub perplexity: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub perplexity_stderr: f64,
    /// (ppl / baseline ppl − 1) × 100.
    #[serde(deserialize_with = "null_as_nan")]
    pub ppl_increase_pct: f64,
    /// KL(input model ‖ this model), nats per scored token (`None` for the baseline).
    pub kl_mean: Option<f64>,
    /// Fraction of scored positions where the top token equals the input model's.
    pub top1_agreement: Option<f64>,
    /// Encoders: mean cosine of each held-out sentence's embedding with the input model's.
    #[serde(default)]
    pub embedding_cosine: Option<f64>,
    /// Encoders: mean overlap of each sentence's top-10 nearest neighbours with the input model's.
    #[serde(default)]
    pub neighbour_agreement: Option<f64>,
    pub size_bytes: u64,
    pub bits_per_weight: f64,
    pub parameters: u64,
    /// Layers × width, MLP width and heads (query/KV): structured pruning changes them.
    #[serde(default)]
    pub shape: String,
    /// Fraction of exactly-zero weights in the linear layers.
    pub sparsity: f64,
    /// Input model size / this size.
    pub compression_ratio: f64,
    /// Evaluation throughput (f32 forward on the dequantized weights).
    pub eval_tokens_per_s: f64,
    /// How busy the machine was during the evaluation, where it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_load: Option<shrink_core::MachineLoad>,
    /// Wall time of making the model (0 for the baseline).
    pub stage_wall_s: f64,
    /// Peak resident memory while making the model (0 for the baseline).
    pub peak_rss_bytes: u64,
    pub decode: Option<DecodeSpeed>,
    /// `[eval] tasks`: each task's accuracy and length-normalized accuracy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<shrink_eval::TaskReport>,
    /// The largest drop of a task's length-normalized accuracy below the baseline's, in
    /// percentage points (`None` without tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acc_norm_drop: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GateResult {
    /// The `[gates]` key, e.g. `max_ppl_increase_pct`.
    pub gate: String,
    /// The row it was checked on.
    pub model: String,
    pub limit: f64,
    pub value: f64,
    pub passed: bool,
    /// `ppl increase 4.12% > 3% (by 1.12 points)`.
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Generation {
    pub prompt: String,
    /// Row name → continuation (the baseline's under its row name).
    pub outputs: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StageLayers {
    pub stage: String,
    pub layers: Vec<LayerRow>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayerRow {
    /// Hugging Face weight name.
    pub name: String,
    /// Stored format (`q4_k`, `int8 symmetric channel`).
    pub format: String,
    pub shape: [usize; 2],
    pub bits_per_weight: f64,
    /// ‖(W − Ŵ)X‖² / ‖WX‖² on the calibration inputs, when the stage calibrated.
    pub relative_output_error: Option<f64>,
    /// Fraction of exactly-zero weights.
    pub sparsity: f64,
}

/// A search stage: every verified mix (the frontier of everything tried) and the sensitivity
/// table it allocated from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SearchSection {
    pub stage: String,
    /// `file ≤ 105.45 MB`, `perplexity increase ≤ 3%`.
    pub goal: String,
    pub met: bool,
    /// Why the refinement stopped.
    pub stopped: String,
    /// The round whose model the stage wrote.
    pub best_round: usize,
    pub rounds: Vec<SearchRound>,
    pub sensitivity_cached: bool,
    pub sensitivity_s: f64,
    /// The format the sensitivity chart shows.
    pub sensitivity_format: String,
    /// Per searched tensor (blocks in order, the embeddings last): the KL it alone adds in
    /// `sensitivity_format`.
    pub sensitivity: Vec<(String, f64)>,
}

/// One verified mix.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SearchRound {
    pub round: usize,
    pub size_bytes: u64,
    /// Bits per weight over the searched tensors.
    pub bits_per_weight: f64,
    pub predicted_kl: f64,
    /// Measured on held-out calibration windows.
    pub kl: f64,
    pub ppl_increase_pct: f64,
    /// Block type → number of searched tensors.
    pub types: BTreeMap<String, usize>,
    pub met: bool,
    /// On the (size, KL) Pareto front of the rounds.
    pub pareto: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SweepSummary {
    /// The swept stage and key (`gptq`, `bits`).
    pub stage: String,
    pub key: String,
    /// Row names of the variants, in the order of the values.
    pub variants: Vec<String>,
    /// Row names (variants and baseline) on the size/perplexity Pareto front, smallest first.
    pub pareto: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LossCurve {
    pub stage: String,
    /// (step, loss)
    pub points: Vec<(u64, f64)>,
}

/// Row names on the Pareto front of (size, perplexity): no other row is at most as large and at
/// most as perplexing while better in one of the two. Smallest first.
pub fn pareto_front(rows: &[&ModelRow]) -> Vec<String> {
    let mut front: Vec<&ModelRow> = rows
        .iter()
        .copied()
        .filter(|r| {
            !rows.iter().any(|o| {
                o.size_bytes <= r.size_bytes
                    && o.perplexity <= r.perplexity
                    && (o.size_bytes < r.size_bytes || o.perplexity < r.perplexity)
            })
        })
        .collect();
    front.sort_by(|a, b| {
        a.size_bytes
            .cmp(&b.size_bytes)
            .then(a.perplexity.total_cmp(&b.perplexity))
    });
    front.iter().map(|r| r.name.clone()).collect()
}

/// `null` (how JSON writes a NaN) read back as NaN.
fn null_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

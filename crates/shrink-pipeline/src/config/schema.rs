//! The pipeline file's schema: what each table and key means and its default. Validation, with
//! positions, is in the parent module; the stage keys' meaning per kind is in `crate::stage`.

use crate::quantize::Export;
use crate::stage::{StageJob, StageKind};
use crate::{PipelineError, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A whole pipeline file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    /// The run's name: its folder is `runs/NAME`.
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub seed: u64,
    pub model: ModelConfig,
    #[serde(default)]
    pub data: DataConfig,
    #[serde(default, rename = "stage")]
    pub stages: Vec<Stage>,
    #[serde(default)]
    pub eval: EvalConfig,
    #[serde(default)]
    pub export: ExportConfig,
    #[serde(default)]
    pub gates: Gates,
    #[serde(default)]
    pub sweep: Option<Sweep>,
    /// Filled by validation.
    #[serde(skip)]
    pub(super) planned: Vec<PlannedStage>,
}

/// Runs a stage once per value of one of its keys; the stages before it are shared.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Sweep {
    /// The swept stage's name.
    pub stage: String,
    /// `bits`, `group`, `format`, `preset`, `damp` or `alpha`.
    pub key: String,
    pub values: Vec<toml::Value>,
}

/// The stage keys a sweep can vary.
pub const SWEEP_KEYS: &[&str] = &[
    "bits", "group", "format", "preset", "damp", "alpha", "sparsity", "fraction",
];

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A demo model name (`smollm2`), a GGUF file or a Hugging Face folder.
    pub source: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Calibration text: `DATASET:SPLIT` or a file.
    #[serde(default = "default_calib")]
    pub calib: String,
    /// Evaluation text.
    #[serde(default = "default_eval")]
    pub eval: String,
    /// Calibration windows and their length in tokens.
    #[serde(default = "default_samples")]
    pub samples: usize,
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    /// Training text for distillation and QAT.
    #[serde(default = "default_train")]
    pub train: String,
}

fn default_train() -> String {
    "shakespeare:train".into()
}

fn default_calib() -> String {
    "shakespeare:calib".into()
}
fn default_eval() -> String {
    "shakespeare:eval".into()
}
fn default_samples() -> usize {
    128
}
fn default_seq_len() -> usize {
    512
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            calib: default_calib(),
            eval: default_eval(),
            samples: default_samples(),
            seq_len: default_seq_len(),
            train: default_train(),
        }
    }
}

/// One step of the pipeline.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    pub kind: StageKind,
    /// Defaults to the kind; must be unique.
    #[serde(default)]
    pub name: Option<String>,
    /// `model` or an earlier stage's name; defaults to the previous stage (or the model).
    #[serde(default)]
    pub input: Option<String>,
    /// A preset from `configs/quant` or a preset file.
    #[serde(default)]
    pub preset: Option<String>,
    /// A ggml block type (`q4_k`) for GGUF, or `hf` with `bits` / `group`.
    #[serde(default)]
    pub format: Option<String>,
    #[serde(default)]
    pub bits: Option<u8>,
    /// A group size or `"channel"`.
    #[serde(default)]
    pub group: Option<toml::Value>,
    /// Name pattern → block type (quantization) or sparsity (pruning).
    #[serde(default)]
    pub overrides: BTreeMap<String, toml::Value>,
    #[serde(default)]
    pub embeddings: Option<String>,
    #[serde(default)]
    pub damp: Option<f64>,
    #[serde(default)]
    pub act_order: Option<bool>,
    #[serde(default)]
    pub imatrix: Option<bool>,
    #[serde(default)]
    pub alpha: Option<f64>,
    #[serde(default)]
    pub awq_grid: Option<usize>,
    /// `int8-per-token` or `none`.
    #[serde(default)]
    pub activations: Option<String>,
    /// Search each group's scale on the activation-weighted error.
    #[serde(default)]
    pub search: Option<bool>,
    /// How AWQ and SmoothQuant pick the codes after rescaling: `rtn` or `gptq`.
    #[serde(default)]
    pub weights: Option<String>,
    /// Unstructured pruning: a fraction (`0.5`), a percentage (`"50%"`) or N:M (`"2:4"`).
    #[serde(default)]
    pub sparsity: Option<toml::Value>,
    /// Magnitude pruning over all block linears at once.
    #[serde(default)]
    pub global: Option<bool>,
    /// SparseGPT's columns per mask selection.
    #[serde(default)]
    pub block_size: Option<usize>,
    /// Structured pruning: the fraction of heads, channels, layers or width removed.
    #[serde(default)]
    pub fraction: Option<f64>,
    /// `magnitude`, `activation` or `taylor`.
    #[serde(default)]
    pub importance: Option<String>,
    /// Layer ranking: `block-influence`, `angular` or `perplexity`.
    #[serde(default)]
    pub criterion: Option<String>,
    /// Heads: remove whole key/value groups.
    #[serde(default)]
    pub kv_groups: Option<bool>,
    /// Pruning: `f32` or `f16` storage.
    #[serde(default)]
    pub dtype: Option<String>,
    /// Quantization: keep exactly-zero weights at zero (a pruning mask). Defaults to true when
    /// the input is an unstructured pruning stage (or a quantization of one that keeps them).
    #[serde(default)]
    pub keep_sparsity: Option<bool>,
    /// Distillation: the teacher, `model` (the default) or an earlier stage's name.
    #[serde(default)]
    pub teacher: Option<String>,
    /// Distillation: a student made of these teacher layers (`0,2,4`, `0-7`, `every:2`).
    #[serde(default)]
    pub layers: Option<String>,
    /// Distillation: a random student with the teacher's config and these shape keys changed.
    #[serde(default)]
    pub student: BTreeMap<String, usize>,
    /// `forward-kl` or `reverse-kl`.
    #[serde(default)]
    pub loss: Option<String>,
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Hidden-state pairs `S:T,S:T`, or `auto` with `layers`.
    #[serde(default)]
    pub hidden: Option<String>,
    /// `mse` or `cosine`.
    #[serde(default)]
    pub hidden_loss: Option<String>,
    #[serde(default)]
    pub hidden_weight: Option<f64>,
    /// MiniLM attention transfer `S:T`.
    #[serde(default)]
    pub attention: Option<String>,
    #[serde(default)]
    pub attention_weight: Option<f64>,
    /// Tensor name patterns kept frozen.
    #[serde(default)]
    pub freeze: Option<Vec<String>>,
    /// Cache the teacher's top-k log-probabilities.
    #[serde(default)]
    pub top_k: Option<usize>,
    /// QAT: learn the scales (LSQ) [default: true].
    #[serde(default)]
    pub learn_scales: Option<bool>,
    /// Training: steps, batch, learning rate… (`[stage.train]`).
    #[serde(default)]
    pub train: Option<crate::distill::TrainKeys>,
    /// Search: the candidate block types of the linears.
    #[serde(default)]
    pub formats: Option<Vec<String>>,
    /// Search: the candidate block types of the token embedding (unset: `embeddings`, fixed).
    #[serde(default)]
    pub embedding_formats: Option<Vec<String>>,
    /// Search: `scaled` (one KL per linear, scaled by output error) or `every` format measured.
    #[serde(default)]
    pub sensitivity: Option<String>,
    /// Search: the target and the time budget (`[stage.budget]`).
    #[serde(default)]
    pub budget: Option<crate::search::BudgetKeys>,
}

impl Stage {
    pub fn display_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| self.kind.name().to_string())
    }

    /// This stage with `key` set to `value` (a sweep variant).
    pub fn with_value(&self, key: &str, value: &toml::Value) -> Result<Stage> {
        let mut table = toml::Value::try_from(self)
            .map_err(|e| PipelineError::Invalid(format!("stage `{}`: {e}", self.display_name())))?;
        if let Some(t) = table.as_table_mut() {
            t.insert(key.to_string(), value.clone());
        }
        table
            .try_into()
            .map_err(|e| PipelineError::Invalid(format!("sweep value {key} = {value}: {e}")))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// `llama-cpp` or `full`.
    #[serde(default = "default_protocol")]
    pub protocol: String,
    #[serde(default = "default_ctx")]
    pub ctx: usize,
    /// 0 = every chunk.
    #[serde(default = "default_chunks")]
    pub chunks: usize,
    /// Prompts whose greedy continuations the report shows side by side.
    #[serde(default = "default_prompts")]
    pub prompts: Vec<String>,
    /// Tokens generated per prompt.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// Wrap prompts in the model's chat template when it has one.
    #[serde(default = "default_true")]
    pub chat: bool,
    /// Decode-speed measurement: a prompt of this many evaluation-text tokens, then this many
    /// greedy steps.
    #[serde(default = "default_prefill_tokens")]
    pub prefill_tokens: usize,
    #[serde(default = "default_decode_tokens")]
    pub decode_tokens: usize,
    /// Encoders: held-out sentences of the evaluation text whose embeddings are compared.
    #[serde(default = "default_sentences")]
    pub sentences: usize,
}

fn default_sentences() -> usize {
    512
}

fn default_prompts() -> Vec<String> {
    vec![
        "What is the capital of France?".into(),
        "Write a short poem about the sea.".into(),
        "Explain in one sentence why the sky is blue.".into(),
    ]
}
fn default_max_new_tokens() -> usize {
    32
}
fn default_true() -> bool {
    true
}
fn default_prefill_tokens() -> usize {
    128
}
fn default_decode_tokens() -> usize {
    32
}

fn default_protocol() -> String {
    "llama-cpp".into()
}
fn default_ctx() -> usize {
    512
}
fn default_chunks() -> usize {
    32
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            protocol: default_protocol(),
            ctx: default_ctx(),
            chunks: default_chunks(),
            prompts: default_prompts(),
            max_new_tokens: default_max_new_tokens(),
            chat: true,
            prefill_tokens: default_prefill_tokens(),
            decode_tokens: default_decode_tokens(),
            sentences: default_sentences(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// `gguf` and/or `hf`.
    #[serde(default = "default_formats")]
    pub formats: Vec<String>,
}

fn default_formats() -> Vec<String> {
    vec!["gguf".into()]
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            formats: default_formats(),
        }
    }
}

/// Quality gates: a run whose final model misses one fails.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Gates {
    pub max_ppl_increase_pct: Option<f64>,
    pub min_top1_agreement: Option<f64>,
    pub max_kl: Option<f64>,
    /// Encoders: mean sentence-embedding cosine with the input model.
    pub min_embedding_cosine: Option<f64>,
    /// Encoders: mean top-10 nearest-neighbour overlap with the input model.
    pub min_neighbour_agreement: Option<f64>,
    pub max_size_mb: Option<f64>,
    pub min_compression_ratio: Option<f64>,
}

/// A stage ready to run: its input resolved, its quantization job made, its output format known.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedStage {
    pub name: String,
    pub kind: StageKind,
    /// `model` or an earlier planned stage's name.
    pub input: String,
    pub calibrates: bool,
    pub export: Export,
    pub job: StageJob,
    /// Distillation: the teacher (`model` or an earlier stage).
    pub teacher: Option<String>,
    /// For a sweep variant: `key=value`.
    pub sweep_value: Option<String>,
}

/// A valid pipeline's plan as `shrink validate --json` and `shrink run --dry-run --json` print it
/// (schema `shrink.plan/v1`).
#[derive(Debug, Serialize)]
pub struct PlanSummary<'a> {
    pub schema: &'static str,
    pub file: String,
    pub name: &'a str,
    pub model: &'a str,
    pub run_dir: String,
    pub stages: Vec<StagePlan<'a>>,
    pub export: &'a [String],
    pub sweep: &'a Option<Sweep>,
    pub gates: &'a Gates,
    pub estimated_peak_bytes: Option<u64>,
}

/// One stage of a [`PlanSummary`].
#[derive(Debug, Serialize)]
pub struct StagePlan<'a> {
    pub name: &'a str,
    pub kind: &'static str,
    pub input: &'a str,
    /// The stage's folder in the run folder.
    pub output: String,
    pub format: Export,
    pub calibrates: bool,
    pub sweep_value: &'a Option<String>,
}

impl Pipeline {
    /// Stages in the order they run (sweep variants after the stages they branch from), with
    /// their inputs resolved.
    pub fn plan(&self) -> &[PlannedStage] {
        &self.planned
    }

    /// The plan of a run in `run_dir`, with the estimated peak memory where the model's shape
    /// was known.
    pub fn plan_summary(
        &self,
        file: &std::path::Path,
        run_dir: &std::path::Path,
        estimated_peak_bytes: Option<u64>,
    ) -> PlanSummary<'_> {
        let stages = self
            .planned
            .iter()
            .map(|s| StagePlan {
                name: &s.name,
                kind: s.kind.name(),
                input: &s.input,
                output: run_dir.join("stages").join(&s.name).display().to_string(),
                format: s.export,
                calibrates: s.calibrates,
                sweep_value: &s.sweep_value,
            })
            .collect();
        PlanSummary {
            schema: "shrink.plan/v1",
            file: file.display().to_string(),
            name: &self.name,
            model: &self.model.source,
            run_dir: run_dir.display().to_string(),
            stages,
            export: &self.export.formats,
            sweep: &self.sweep,
            gates: &self.gates,
            estimated_peak_bytes,
        }
    }

    /// The planned stages of the pipeline as written, without sweep variants.
    pub fn main_chain(&self) -> impl Iterator<Item = &PlannedStage> {
        self.planned.iter().filter(|s| s.sweep_value.is_none())
    }
}

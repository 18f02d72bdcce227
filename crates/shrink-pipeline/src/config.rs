//! The pipeline file's schema, parsing with positions, and validation.

use crate::prune::{PruneKind, PruneRequest};
use crate::quantize::{Export, QuantMethod, QuantizeRequest};
use crate::{PipelineError, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

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
    planned: Vec<PlannedStage>,
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

/// The kinds of stage; technique crates add theirs as they land.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum StageKind {
    #[serde(rename = "quantize.rtn")]
    QuantizeRtn,
    #[serde(rename = "quantize.gptq")]
    QuantizeGptq,
    #[serde(rename = "quantize.awq")]
    QuantizeAwq,
    #[serde(rename = "quantize.smoothquant")]
    QuantizeSmoothQuant,
    #[serde(rename = "prune.magnitude")]
    PruneMagnitude,
    #[serde(rename = "prune.wanda")]
    PruneWanda,
    #[serde(rename = "prune.sparsegpt")]
    PruneSparseGpt,
    #[serde(rename = "prune.heads")]
    PruneHeads,
    #[serde(rename = "prune.channels")]
    PruneChannels,
    #[serde(rename = "prune.layers")]
    PruneLayers,
    #[serde(rename = "prune.width")]
    PruneWidth,
    #[serde(rename = "distill")]
    Distill,
    #[serde(rename = "quantize.qat")]
    QuantizeQat,
    #[serde(rename = "search")]
    Search,
}

impl StageKind {
    pub fn name(self) -> &'static str {
        match self {
            StageKind::QuantizeRtn => "quantize.rtn",
            StageKind::QuantizeGptq => "quantize.gptq",
            StageKind::QuantizeAwq => "quantize.awq",
            StageKind::QuantizeSmoothQuant => "quantize.smoothquant",
            StageKind::PruneMagnitude => "prune.magnitude",
            StageKind::PruneWanda => "prune.wanda",
            StageKind::PruneSparseGpt => "prune.sparsegpt",
            StageKind::PruneHeads => "prune.heads",
            StageKind::PruneChannels => "prune.channels",
            StageKind::PruneLayers => "prune.layers",
            StageKind::PruneWidth => "prune.width",
            StageKind::Distill => "distill",
            StageKind::QuantizeQat => "quantize.qat",
            StageKind::Search => "search",
        }
    }

    /// The pruning method of a `prune.*` kind.
    pub fn prune_kind(self) -> Option<PruneKind> {
        self.name()
            .strip_prefix("prune.")
            .and_then(|k| PruneKind::parse(k).ok())
    }

    /// Keys that only some kinds accept.
    fn accepts(self, key: &str) -> bool {
        let prune = self.prune_kind();
        let structured = prune.is_some_and(PruneKind::structured);
        let distill = self == StageKind::Distill;
        let qat = self == StageKind::QuantizeQat;
        if self == StageKind::Search {
            return matches!(
                key,
                "formats"
                    | "embedding_formats"
                    | "embeddings"
                    | "sensitivity"
                    | "budget"
                    | "weights"
                    | "damp"
                    | "act_order"
            );
        }
        match key {
            "formats" | "embedding_formats" | "sensitivity" | "budget" => false,
            "teacher" | "layers" | "student" | "hidden" | "hidden_loss" | "hidden_weight"
            | "attention" | "attention_weight" | "top_k" => distill,
            "loss" | "temperature" | "train" | "freeze" => distill || qat,
            "learn_scales" => qat,
            "alpha" if distill || qat => true,
            "format" | "dtype" if distill => true,
            _ if distill => false,
            "keep_sparsity" | "imatrix" | "awq_grid" if qat => false,
            "weights" if qat => true,
            "preset" | "bits" | "group" | "embeddings" | "act_order" | "imatrix" | "alpha"
            | "awq_grid" | "activations" | "search" | "weights"
                if prune.is_some() =>
            {
                false
            }
            "sparsity" | "overrides" | "global" | "block_size" | "fraction" | "importance"
            | "criterion" | "kv_groups" | "dtype"
                if prune.is_none() =>
            {
                key == "overrides"
            }
            "keep_sparsity" => prune.is_none(),
            "sparsity" | "overrides" => !structured,
            "global" => prune == Some(PruneKind::Magnitude),
            "block_size" => prune == Some(PruneKind::Sparsegpt),
            "fraction" | "importance" => structured,
            "criterion" => prune == Some(PruneKind::Layers),
            "kv_groups" => prune == Some(PruneKind::Heads),
            "damp" if prune.is_some() => prune == Some(PruneKind::Sparsegpt),
            "damp" | "act_order" => self != StageKind::QuantizeRtn,
            "imatrix" => self == StageKind::QuantizeRtn,
            "alpha" => self == StageKind::QuantizeSmoothQuant,
            "awq_grid" => self == StageKind::QuantizeAwq,
            "weights" => matches!(
                self,
                StageKind::QuantizeAwq | StageKind::QuantizeSmoothQuant
            ),
            _ => true,
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

/// A value written as a string or a number, as text.
fn value_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// What a stage does.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum StageJob {
    Quantize(QuantizeRequest),
    Prune(PruneRequest),
    Distill(crate::distill::DistillRequest),
    Qat(crate::distill::QatRequest),
    Search(crate::search::SearchRequest),
}

impl StageJob {
    /// Whether the job calibrates and where it writes.
    pub fn resolve(&self) -> Result<(bool, Export)> {
        match self {
            StageJob::Quantize(r) => r.resolve().map(|r| (r.calibrates, r.export)),
            StageJob::Prune(r) => r.resolve().map(|r| (r.calibrates, r.export)),
            StageJob::Distill(r) => r.resolve().map(|r| (false, r.export)),
            StageJob::Qat(r) => r
                .resolve()
                .map(|r| (r.quantize.calibrates, r.quantize.export)),
            StageJob::Search(r) => r.sensitivity_config().map(|_| (true, Export::Gguf)),
        }
    }

    /// Whether the job trains (and reads the training text).
    pub fn trains(&self) -> bool {
        matches!(self, StageJob::Distill(_) | StageJob::Qat(_))
    }
}

impl Stage {
    pub fn display_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| self.kind.name().to_string())
    }

    /// The job this stage describes.
    pub fn job(&self) -> Result<StageJob> {
        if self.kind == StageKind::Distill {
            return Ok(StageJob::Distill(self.distill_request()));
        }
        if self.kind == StageKind::Search {
            return self.search_request().map(StageJob::Search);
        }
        if self.kind == StageKind::QuantizeQat {
            let d = self.distill_request();
            return Ok(StageJob::Qat(crate::distill::QatRequest {
                loss: d.loss,
                temperature: d.temperature,
                alpha: d.alpha,
                freeze: self.freeze.clone(),
                learn_scales: self.learn_scales.unwrap_or(true),
                train: d.train,
                ..crate::distill::QatRequest::new(self.request()?)
            }));
        }
        match self.kind.prune_kind() {
            Some(kind) => Ok(StageJob::Prune(self.prune_request(kind))),
            None => self.request().map(StageJob::Quantize),
        }
    }

    fn search_request(&self) -> Result<crate::search::SearchRequest> {
        let defaults = QuantizeRequest::default();
        Ok(crate::search::SearchRequest {
            formats: self.formats.clone().unwrap_or_else(|| {
                crate::search::DEFAULT_FORMATS
                    .iter()
                    .map(|f| f.to_string())
                    .collect()
            }),
            embedding_formats: self.embedding_formats.clone().unwrap_or_default(),
            embeddings: self.embeddings.clone().unwrap_or_else(|| "q8_0".into()),
            method: self
                .weights
                .as_deref()
                .map(QuantMethod::parse)
                .transpose()?
                .unwrap_or(QuantMethod::Gptq),
            damp: self.damp.unwrap_or(defaults.damp),
            act_order: self.act_order.unwrap_or(defaults.act_order),
            measure: match self.sensitivity.as_deref() {
                None | Some("scaled") => shrink_search::Measure::Scaled,
                Some("every") => shrink_search::Measure::Every,
                Some(other) => {
                    return Err(PipelineError::Invalid(format!(
                        "sensitivity `{other}` is not one of: scaled, every"
                    )))
                }
            },
            budget: self.budget.clone().unwrap_or_default(),
        })
    }

    fn distill_request(&self) -> crate::distill::DistillRequest {
        use crate::distill::{DistillRequest, StudentInit};
        let d = DistillRequest::default();
        DistillRequest {
            student: match (&self.layers, self.student.is_empty()) {
                (Some(l), _) => StudentInit::Layers(l.clone()),
                (None, false) => StudentInit::Random(self.student.clone()),
                (None, true) => StudentInit::Model,
            },
            loss: self.loss.clone().unwrap_or(d.loss),
            temperature: self.temperature.unwrap_or(d.temperature),
            alpha: self.alpha.unwrap_or(d.alpha),
            hidden: self.hidden.clone(),
            hidden_loss: self.hidden_loss.clone().unwrap_or(d.hidden_loss),
            hidden_weight: self.hidden_weight.unwrap_or(d.hidden_weight),
            attention: self.attention.clone(),
            attention_weight: self.attention_weight.unwrap_or(d.attention_weight),
            freeze: self.freeze.clone().unwrap_or_default(),
            top_k: self.top_k,
            train: self.train.clone().unwrap_or_default(),
            format: self.format.clone(),
            dtype: self.dtype.clone(),
        }
    }

    fn prune_request(&self, kind: PruneKind) -> PruneRequest {
        let defaults = PruneRequest::new(kind);
        PruneRequest {
            sparsity: self.sparsity.as_ref().map(value_text),
            overrides: self
                .overrides
                .iter()
                .map(|(k, v)| (k.clone(), value_text(v)))
                .collect(),
            global: self.global.unwrap_or(false),
            damp: self.damp.unwrap_or(defaults.damp),
            block_size: self.block_size.unwrap_or(defaults.block_size),
            fraction: self.fraction,
            importance: self.importance.clone(),
            criterion: self.criterion.clone(),
            kv_groups: self.kv_groups.unwrap_or(false),
            format: self.format.clone(),
            dtype: self.dtype.clone(),
            ..defaults
        }
    }

    /// The quantization job this stage describes.
    pub fn request(&self) -> Result<QuantizeRequest> {
        let weights = self
            .weights
            .as_deref()
            .map(QuantMethod::parse)
            .transpose()?;
        let (method, smooth) = match self.kind {
            StageKind::QuantizeRtn => (Some(QuantMethod::Rtn), None),
            // QAT starts from GPTQ's codes unless `weights = "rtn"`.
            StageKind::QuantizeQat => (Some(weights.unwrap_or(QuantMethod::Gptq)), None),
            StageKind::QuantizeGptq => (Some(QuantMethod::Gptq), None),
            StageKind::QuantizeAwq => (
                Some(match weights {
                    Some(QuantMethod::Gptq) => QuantMethod::AwqGptq,
                    _ => QuantMethod::Awq,
                }),
                None,
            ),
            // The weights' method defaults to the preset's; alpha to the preset's, then 0.8.
            StageKind::QuantizeSmoothQuant => {
                let preset_alpha = match &self.preset {
                    Some(p) => shrink_quant::Preset::load(p)?.smoothing,
                    None => None,
                };
                (weights, Some(self.alpha.or(preset_alpha).unwrap_or(0.8)))
            }
            other => {
                return Err(PipelineError::Invalid(format!(
                    "a {} stage is not a quantization",
                    other.name()
                )))
            }
        };
        let defaults = QuantizeRequest::default();
        Ok(QuantizeRequest {
            preset: self.preset.clone(),
            method,
            format: self.format.clone(),
            bits: self.bits,
            group: self.group.as_ref().map(value_text),
            smooth,
            activations: self.activations.clone(),
            overrides: self
                .overrides
                .iter()
                .map(|(k, v)| (k.clone(), value_text(v)))
                .collect(),
            search: self.search.unwrap_or(false),
            imatrix: self.imatrix.unwrap_or(false),
            damp: self.damp.unwrap_or(defaults.damp),
            act_order: self.act_order.unwrap_or(defaults.act_order),
            awq_grid: self.awq_grid.unwrap_or(defaults.awq_grid),
            embeddings: self.embeddings.clone(),
            batch: defaults.batch,
            keep_zeros: self.keep_sparsity.unwrap_or(false),
        })
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

impl Pipeline {
    /// Estimated peak memory in bytes of running the pipeline on a model with `parameters`
    /// weights, `hidden` wide with `intermediate` MLP rows and a `vocab`-token vocabulary: the
    /// checkpoint, the f32 model and the reference model the evaluation compares against, plus,
    /// when a stage calibrates, the calibration activations entering and leaving a block, one
    /// block's Hessians and a batch's working set; when a stage trains, the teacher, the student
    /// with its gradients and AdamW moments, and the autograd graph of a micro-batch (logits and
    /// their softmaxes, ~12 copies of `vocab` per token; ~10 of `hidden + intermediate` per token
    /// and layer); a search stage adds what its verification holds. Calibrated on distilling
    /// SmolLM2 (measured 9.1 GB at 4 × 256 tokens).
    pub fn estimated_peak_bytes(
        &self,
        parameters: u64,
        hidden: u64,
        intermediate: u64,
        vocab: u64,
    ) -> u64 {
        // In u128 and saturated: settings such as `samples = 1000000000000` must give a huge
        // estimate, not a wrapped small one.
        let (parameters, hidden, intermediate, vocab) = (
            u128::from(parameters),
            u128::from(hidden),
            u128::from(intermediate),
            u128::from(vocab),
        );
        let model = 3 * parameters * 4;
        let calibrates = self.planned.iter().any(|s| s.calibrates);
        let calibration = if calibrates {
            let tokens = self.data.samples as u128 * self.data.seq_len as u128;
            let ids = tokens * 4;
            let activations = 2 * tokens * hidden * 4;
            let hessians = (3 * hidden * hidden + intermediate * intermediate) * 8;
            let batch = 8 * self.data.seq_len as u128 * intermediate * 4 * 4;
            ids + activations + hessians + batch
        } else {
            0
        };
        let training = self
            .planned
            .iter()
            .filter_map(|s| match &s.job {
                StageJob::Distill(r) => Some(&r.train),
                StageJob::Qat(r) => Some(&r.train),
                _ => None,
            })
            .map(|t| {
                let tokens = t.batch as u128 * t.seq_len as u128;
                let layers = parameters / (4 * hidden * hidden + 3 * hidden * intermediate).max(1);
                let graph = tokens * (12 * vocab + 10 * layers * (hidden + intermediate)) * 4;
                6 * parameters * 4 + graph
            })
            .max()
            .unwrap_or(0);
        // A search holds a quantized copy of the model and the model read back from its file,
        // and the reference and a candidate's log-probabilities (and their exponentials) on 1024
        // scored positions at a time.
        let search = if self.planned.iter().any(|s| s.kind == StageKind::Search) {
            2 * parameters * 4 + 4 * 1024 * vocab * 4
        } else {
            0
        };
        let total = model + (calibration + search).max(training) + (64 << 20);
        u64::try_from(total).unwrap_or(u64::MAX)
    }

    /// Stages in the order they run (sweep variants after the stages they branch from), with
    /// their inputs resolved.
    pub fn plan(&self) -> &[PlannedStage] {
        &self.planned
    }

    /// The planned stages of the pipeline as written, without sweep variants.
    pub fn main_chain(&self) -> impl Iterator<Item = &PlannedStage> {
        self.planned.iter().filter(|s| s.sweep_value.is_none())
    }
}

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
    let pipeline: Pipeline = toml::from_str(text).map_err(|e| {
        let offset = e.span().map(|s| s.start).unwrap_or(0);
        let message = e.message().trim().to_string();
        match unknown_field(&message) {
            Some((key, expected)) if message.starts_with("unknown variant") => {
                let hint = closest(&key, &expected)
                    .map(|k| format!("; did you mean `{k}`?"))
                    .unwrap_or_default();
                at(
                    offset,
                    format!(
                        "unknown stage kind `{key}`{hint} (known: {})",
                        expected.join(", ")
                    ),
                )
            }
            Some((key, expected)) => {
                let hint = closest(&key, &expected)
                    .map(|k| format!("; did you mean `{k}`?"))
                    .unwrap_or_default();
                let offset = key_offset(text, offset, &key).unwrap_or(offset);
                at(
                    offset,
                    format!(
                        "unknown key `{key}`{hint} (expected one of: {})",
                        expected.join(", ")
                    ),
                )
            }
            None => at(offset, message),
        }
    })?;
    // Semantic checks, each pointing at the key it is about.
    let stage_starts: Vec<usize> = header_offsets(text, "[[stage]]");
    // Where a key is: in the i-th [[stage]], in a [section], or at the top.
    let key_at = |place: Place, key: &str| -> usize {
        let from = match place {
            Place::Top => 0,
            Place::Stage(i) => stage_starts.get(i).copied().unwrap_or(0),
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
    let g = &pipeline.gates;
    for (key, value, lo, hi) in [
        (
            "max_ppl_increase_pct",
            g.max_ppl_increase_pct,
            0.0,
            f64::MAX,
        ),
        ("min_top1_agreement", g.min_top1_agreement, 0.0, 1.0),
        ("max_kl", g.max_kl, 0.0, f64::MAX),
        ("min_embedding_cosine", g.min_embedding_cosine, -1.0, 1.0),
        (
            "min_neighbour_agreement",
            g.min_neighbour_agreement,
            0.0,
            1.0,
        ),
        ("max_size_mb", g.max_size_mb, 0.0, f64::MAX),
        (
            "min_compression_ratio",
            g.min_compression_ratio,
            0.0,
            f64::MAX,
        ),
    ] {
        if let Some(v) = value {
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
    // The texts the stages read, known without fetching them.
    let calibrates = pipeline
        .stages
        .iter()
        .any(|s| check_stage(s).is_ok_and(|p| p.calibrates));
    let trains = pipeline
        .stages
        .iter()
        .any(|s| matches!(s.kind, StageKind::Distill | StageKind::QuantizeQat));
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
    let mut pipeline = pipeline;
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
        for (key, value) in [("input", &s.input), ("teacher", &s.teacher)] {
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
        let planned = check_stage(s).map_err(|(key, message)| match key {
            Some(key) => fail(here, key, message),
            None => at(
                stage_starts.get(i).copied().unwrap_or(0),
                format!("stage `{name}`: {message}"),
            ),
        })?;
        let input = s.input.clone().unwrap_or_else(|| previous.clone());
        let teacher = (s.kind == StageKind::Distill)
            .then(|| s.teacher.clone().unwrap_or_else(|| "model".into()));
        if teacher.as_ref() == Some(&input)
            && matches!(&planned.job, StageJob::Distill(r) if r.student == crate::distill::StudentInit::Model)
        {
            return Err(at(
                stage_starts.get(i).copied().unwrap_or(0),
                format!("stage `{name}`: the student would be the teacher itself: take a pruned stage as input, or set `layers` or `[stage.student]`"),
            ));
        }
        let mut planned = PlannedStage {
            name: name.clone(),
            input,
            teacher,
            ..planned
        };
        if let (StageJob::Quantize(request), None) = (&mut planned.job, s.keep_sparsity) {
            // Quantizing a pruned model keeps its mask unless the stage says otherwise.
            request.keep_zeros = pipeline.planned.iter().any(|p| {
                p.name == planned.input
                    && match &p.job {
                        StageJob::Prune(r) => !r.kind.structured(),
                        StageJob::Quantize(r) => r.keep_zeros,
                        StageJob::Distill(_) | StageJob::Qat(_) | StageJob::Search(_) => false,
                    }
            });
        }
        pipeline.planned.push(planned);
        previous = name.clone();
        names.push(name);
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
                    names[1..].join(", ")
                ),
            ));
        };
        let swept = &pipeline.stages[index];
        if !SWEEP_KEYS.contains(&sweep.key.as_str()) || !swept.kind.accepts(&sweep.key) {
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
            let stage = swept
                .with_value(&sweep.key, value)
                .map_err(|e| problem(e.to_string()))?;
            let mut planned = check_stage(&stage).map_err(|(_, m)| problem(m))?;
            let main = &pipeline.planned[index];
            if let (StageJob::Quantize(r), StageJob::Quantize(m), None) =
                (&mut planned.job, &main.job, stage.keep_sparsity)
            {
                r.keep_zeros = m.keep_zeros; // the same input as the stage as written
            }
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
    }
    Ok(pipeline)
}

/// Checks one stage's own keys and makes its job; on error, the key at fault (if one is) and why.
fn check_stage(s: &Stage) -> std::result::Result<PlannedStage, (Option<&'static str>, String)> {
    for (key, set) in [
        ("damp", s.damp.is_some()),
        ("act_order", s.act_order.is_some()),
        ("imatrix", s.imatrix.is_some()),
        ("alpha", s.alpha.is_some()),
        ("awq_grid", s.awq_grid.is_some()),
        ("weights", s.weights.is_some()),
        ("preset", s.preset.is_some()),
        ("bits", s.bits.is_some()),
        ("group", s.group.is_some()),
        ("embeddings", s.embeddings.is_some()),
        ("activations", s.activations.is_some()),
        ("search", s.search.is_some()),
        ("overrides", !s.overrides.is_empty()),
        ("sparsity", s.sparsity.is_some()),
        ("global", s.global.is_some()),
        ("block_size", s.block_size.is_some()),
        ("fraction", s.fraction.is_some()),
        ("importance", s.importance.is_some()),
        ("criterion", s.criterion.is_some()),
        ("kv_groups", s.kv_groups.is_some()),
        ("dtype", s.dtype.is_some()),
        ("keep_sparsity", s.keep_sparsity.is_some()),
        ("teacher", s.teacher.is_some()),
        ("layers", s.layers.is_some()),
        ("student", !s.student.is_empty()),
        ("loss", s.loss.is_some()),
        ("temperature", s.temperature.is_some()),
        ("hidden", s.hidden.is_some()),
        ("hidden_loss", s.hidden_loss.is_some()),
        ("hidden_weight", s.hidden_weight.is_some()),
        ("attention", s.attention.is_some()),
        ("attention_weight", s.attention_weight.is_some()),
        ("freeze", s.freeze.is_some()),
        ("top_k", s.top_k.is_some()),
        ("learn_scales", s.learn_scales.is_some()),
        ("train", s.train.is_some()),
        ("formats", s.formats.is_some()),
        ("embedding_formats", s.embedding_formats.is_some()),
        ("sensitivity", s.sensitivity.is_some()),
        ("budget", s.budget.is_some()),
    ] {
        if set && !s.kind.accepts(key) {
            return Err((
                Some(key),
                format!("`{key}` does not apply to a {} stage", s.kind.name()),
            ));
        }
    }
    if let Some(damp) = s.damp {
        if !(0.0..=1.0).contains(&damp) {
            return Err((Some("damp"), format!("damp = {damp} is outside 0..=1")));
        }
    }
    if s.kind.prune_kind().is_some() {
        return check_prune_stage(s);
    }
    if s.kind == StageKind::Search {
        if let Some(w) = &s.weights {
            if !["rtn", "gptq"].contains(&w.as_str()) {
                return Err((
                    Some("weights"),
                    format!("weights `{w}` is not one of: rtn, gptq"),
                ));
            }
        }
        s.budget
            .as_ref()
            .ok_or((
                None,
                "a search stage needs a [stage.budget] table".to_string(),
            ))?
            .check()
            .map_err(|e| (Some("budget"), e))?;
        let job = s.job().map_err(|e| (None, e.to_string()))?;
        if let StageJob::Search(r) = &job {
            r.sensitivity_config().map_err(|e| (None, e.to_string()))?;
        }
        return planned(s);
    }
    if s.kind == StageKind::Distill || s.kind == StageKind::QuantizeQat {
        check_training_keys(s)?;
        if s.kind == StageKind::Distill {
            return planned(s);
        }
    }
    if let Some(alpha) = s.alpha {
        if !(0.0..=1.0).contains(&alpha) {
            return Err((Some("alpha"), format!("alpha = {alpha} is outside 0..=1")));
        }
    }
    if let Some(b) = s.bits {
        if !(2..=8).contains(&b) {
            return Err((Some("bits"), format!("bits = {b} is outside 2..=8")));
        }
    }
    if let Some(group) = &s.group {
        let ok = match group {
            toml::Value::Integer(n) => *n > 0,
            toml::Value::String(k) => k == "channel" || k == "tensor",
            _ => false,
        };
        if !ok {
            return Err((
                Some("group"),
                format!("group = {group}: expected a positive size, \"channel\" or \"tensor\""),
            ));
        }
    }
    if let Some(w) = &s.weights {
        if !["rtn", "gptq"].contains(&w.as_str()) {
            return Err((
                Some("weights"),
                format!("weights `{w}` is not one of: rtn, gptq"),
            ));
        }
    }
    if let Some(p) = &s.preset {
        shrink_quant::Preset::load(p)
            .map_err(|e| (Some("preset"), format!("preset `{p}`: {e}")))?;
    }
    if let Some(f) = &s.format {
        if f != "hf" {
            shrink_quant::Format::parse(f.strip_prefix("gguf:").unwrap_or(f))
                .map_err(|e| (Some("format"), e.to_string()))?;
        }
    }
    if s.preset.is_none() && s.format.is_none() && s.bits.is_none() {
        return Err((
            None,
            "says nothing about the format: give `preset`, `format` or `bits`".into(),
        ));
    }
    for (pattern, ty) in &s.overrides {
        shrink_quant::Format::parse(&value_text(ty))
            .map_err(|e| (None, format!("override `{pattern}`: {e}")))?;
    }
    if let Some(a) = &s.activations {
        if !["int8-per-token", "none"].contains(&a.as_str()) {
            return Err((
                Some("activations"),
                format!("activations `{a}` is not one of: int8-per-token, none"),
            ));
        }
    }
    planned(s)
}

fn planned(s: &Stage) -> std::result::Result<PlannedStage, (Option<&'static str>, String)> {
    let job = s.job().map_err(|e| (None, e.to_string()))?;
    let (calibrates, export) = job.resolve().map_err(|e| (None, e.to_string()))?;
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

/// `format` (gguf | hf) and `dtype` (f32 | f16) of a stage that writes float weights.
fn check_float_keys(s: &Stage) -> std::result::Result<(), (Option<&'static str>, String)> {
    for (key, value, allowed) in [
        ("format", &s.format, ["gguf", "hf"]),
        ("dtype", &s.dtype, ["f32", "f16"]),
    ] {
        if let Some(v) = value {
            if !allowed.contains(&v.as_str()) {
                return Err((
                    Some(key),
                    format!("{key} `{v}` is not one of: {}", allowed.join(", ")),
                ));
            }
        }
    }
    Ok(())
}

/// The training keys of a `distill` or `quantize.qat` stage, each error pointing at its key.
fn check_training_keys(s: &Stage) -> std::result::Result<(), (Option<&'static str>, String)> {
    if let Some(l) = &s.loss {
        shrink_train::Divergence::parse(l).map_err(|e| (Some("loss"), e.to_string()))?;
    }
    if let Some(h) = &s.hidden_loss {
        shrink_train::HiddenLoss::parse(h).map_err(|e| (Some("hidden_loss"), e.to_string()))?;
    }
    if let Some(t) = s.temperature {
        if !(t > 0.0 && t.is_finite()) {
            return Err((
                Some("temperature"),
                format!("temperature = {t} must be positive"),
            ));
        }
    }
    if let Some(a) = s.alpha {
        if !(0.0..=1.0).contains(&a) {
            return Err((Some("alpha"), format!("alpha = {a} is outside 0..=1")));
        }
    }
    if let Some(l) = &s.layers {
        // The count is checked against the teacher when the stage runs.
        shrink_distill::parse_layers(l, 4096).map_err(|e| (Some("layers"), e.to_string()))?;
    }
    if s.layers.is_some() && !s.student.is_empty() {
        return Err((
            Some("student"),
            "give `layers` (a subset of the teacher) or `[stage.student]` (a random config), not both".into(),
        ));
    }
    if s.kind == StageKind::Distill {
        check_float_keys(s)?;
    }
    if let Some(t) = &s.train {
        t.config().map_err(|e| (Some("train"), e.to_string()))?;
    }
    Ok(())
}

/// The keys of a `prune.*` stage, each error pointing at its key.
fn check_prune_stage(
    s: &Stage,
) -> std::result::Result<PlannedStage, (Option<&'static str>, String)> {
    if let Some(v) = &s.sparsity {
        shrink_prune::Sparsity::parse(&value_text(v))
            .map_err(|e| (Some("sparsity"), e.to_string()))?;
    }
    for (pattern, v) in &s.overrides {
        shrink_prune::Sparsity::parse(&value_text(v))
            .map_err(|e| (Some("overrides"), format!("override `{pattern}`: {e}")))?;
    }
    if let Some(f) = s.fraction {
        if !(0.0..1.0).contains(&f) {
            return Err((
                Some("fraction"),
                format!("fraction = {f} is outside [0, 1)"),
            ));
        }
    }
    if let Some(i) = &s.importance {
        shrink_prune::Importance::parse(i).map_err(|e| (Some("importance"), e.to_string()))?;
    }
    if let Some(c) = &s.criterion {
        shrink_prune::LayerCriterion::parse(c).map_err(|e| (Some("criterion"), e.to_string()))?;
    }
    check_float_keys(s)?;
    if s.block_size == Some(0) {
        return Err((Some("block_size"), "block_size must be positive".into()));
    }
    planned(s)
}

#[derive(Clone, Copy)]
enum Place {
    Top,
    Stage(usize),
    Section(&'static str),
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    (line, column)
}

/// Byte offsets of lines that are exactly `header` (ignoring surrounding spaces).
fn header_offsets(text: &str, header: &str) -> Vec<usize> {
    let mut offset = 0;
    let mut out = vec![];
    for line in text.split_inclusive('\n') {
        if line.trim() == header {
            out.push(offset + line.len() - line.trim_start().len());
        }
        offset += line.len();
    }
    out
}

/// The offset of the line that assigns `key` (bare or quoted) at or after `from`, before the next
/// table header.
fn key_offset(text: &str, from: usize, key: &str) -> Option<usize> {
    let from = text[..from.min(text.len())]
        .rfind('\n')
        .map(|i| i + 1)
        .unwrap_or(0);
    let mut offset = from;
    for (n, line) in text[from..].split_inclusive('\n').enumerate() {
        let t = line.trim_start();
        if n > 0 && t.starts_with('[') {
            return None;
        }
        let k = t.split('=').next().unwrap_or("").trim().trim_matches('"');
        if t.contains('=') && k == key {
            return Some(offset + line.len() - t.len());
        }
        offset += line.len();
    }
    None
}

/// serde's "unknown field `x`, expected one of `a`, `b`" (or "expected `a`"; or "unknown variant").
fn unknown_field(message: &str) -> Option<(String, Vec<String>)> {
    let rest = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("unknown variant `"))?;
    let (key, rest) = rest.split_once('`')?;
    let expected = rest
        .split('`')
        .skip(1)
        .step_by(2)
        .map(String::from)
        .collect();
    Some((key.to_string(), expected))
}

/// The expected key nearest to `key` by edit distance, if it is close enough to be a typo.
fn closest<'a>(key: &str, expected: &'a [String]) -> Option<&'a str> {
    expected
        .iter()
        .map(|e| (levenshtein(key, e), e.as_str()))
        .filter(|(d, e)| *d <= 2.max(e.len() / 3))
        .min()
        .map(|(_, e)| e)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests;

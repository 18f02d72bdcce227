//! One pruning job: the options of `shrink prune` and of a `prune.*` stage resolved into an
//! unstructured plan or a structural removal, run on a model, and written as a GGUF or a Hugging
//! Face folder with the pruned model's own config. The CLI command and pipeline stages both go
//! through [`PruneRequest`].

use super::{check_damp, check_float_keys, value_text, Job, StageContext, StageJob, StageKind};
use super::{Compress, JobInput, JobResult, KeyError, StageResult, StageType};
use crate::config::{fields, KeyReader};
use crate::quantize::Export;
use crate::report::LayerRow;
use crate::{PipelineError, Result};
use serde::{Deserialize, Serialize};
use shrink_io::{Checkpoint, GgufWriteType};
use shrink_models::{BlockModel, Transformer};
use shrink_prune::{
    Importance, LayerCriterion, LayerSparsity, PruneMethod, PrunePlan, SparseGptConfig, Sparsity,
    Structure, StructuredOutcome, Target,
};
use std::collections::BTreeMap;
use std::path::Path;

/// The pruning methods, as `shrink prune --method` and the `prune.*` stage kinds name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PruneKind {
    Magnitude,
    Wanda,
    Sparsegpt,
    Heads,
    Channels,
    Layers,
    Width,
}

impl PruneKind {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "magnitude" => Self::Magnitude,
            "wanda" => Self::Wanda,
            "sparsegpt" => Self::Sparsegpt,
            "heads" => Self::Heads,
            "channels" => Self::Channels,
            "layers" => Self::Layers,
            "width" => Self::Width,
            other => {
                return Err(invalid(format!(
                    "pruning method '{other}' (expected magnitude, wanda, sparsegpt, heads, channels, layers or width)"
                )))
            }
        })
    }

    /// Whether the method removes whole structures (and changes the config).
    pub fn structured(self) -> bool {
        matches!(
            self,
            Self::Heads | Self::Channels | Self::Layers | Self::Width
        )
    }
}

/// What to prune and how. Unstructured methods read `sparsity` and `overrides`; structured ones
/// `fraction`, `importance`, `criterion` and `kv_groups`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PruneRequest {
    pub kind: PruneKind,
    /// `0.5`, `50%` or `2:4`.
    pub sparsity: Option<String>,
    /// (name pattern, sparsity), later ones win.
    pub overrides: Vec<(String, String)>,
    /// Magnitude over all block linears at once instead of per layer.
    pub global: bool,
    pub damp: f64,
    pub block_size: usize,
    /// The fraction of heads, channels, layers or hidden width removed.
    pub fraction: Option<f64>,
    /// `magnitude`, `activation` or `taylor`.
    pub importance: Option<String>,
    /// Layers: `block-influence`, `angular` or `perplexity`.
    pub criterion: Option<String>,
    /// Heads: remove whole key/value groups instead of query heads within each group.
    pub kv_groups: bool,
    /// `gguf` or `hf`.
    pub format: Option<String>,
    /// `f32` or `f16`: how the pruned weights are stored.
    pub dtype: Option<String>,
    pub batch: usize,
}

impl PruneRequest {
    pub fn new(kind: PruneKind) -> Self {
        Self {
            kind,
            sparsity: None,
            overrides: Vec::new(),
            global: false,
            damp: 0.01,
            block_size: 128,
            fraction: None,
            importance: None,
            criterion: None,
            kv_groups: false,
            format: None,
            dtype: None,
            batch: 8,
        }
    }
}

/// The pruning to carry out.
#[derive(Debug, Clone, PartialEq)]
pub enum PruneJob {
    Unstructured(PrunePlan),
    Structured {
        target: Target,
        fraction: f64,
        importance: Importance,
        criterion: LayerCriterion,
    },
}

/// A request with every choice made.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedPrune {
    pub job: PruneJob,
    pub export: Export,
    pub dtype: GgufWriteType,
    /// Whether the job needs calibration windows.
    pub calibrates: bool,
}

/// What a pruning run produced.
#[derive(Debug, Clone, Serialize)]
pub struct PruneOutcome {
    /// `Wanda 2:4`, `layers 0.25 (block-influence)`…
    pub method: String,
    pub layers: Vec<LayerSparsity>,
    pub structured: Option<StructuredOutcome>,
    pub parameters_before: usize,
    pub parameters_after: usize,
    /// The block a killed streamed run was resumed at (its reports cover the blocks before it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resumed_at_block: Option<usize>,
}

impl PruneOutcome {
    /// The fraction of the block linears' weights that are zero (`None` without linears).
    pub fn linear_sparsity(&self) -> Option<f64> {
        let (zeros, weights) = self.layers.iter().fold((0.0, 0.0), |(z, n), l| {
            let w = (l.shape[0] * l.shape[1]) as f64;
            (z + l.sparsity * w, n + w)
        });
        (weights > 0.0).then(|| zeros / weights)
    }
}

fn invalid(message: String) -> PipelineError {
    PipelineError::Invalid(message)
}

fn sparsity(text: &str) -> Result<Sparsity> {
    Ok(Sparsity::parse(text)?)
}

impl PruneRequest {
    /// Checks the options against the method and makes every choice.
    pub fn resolve(&self) -> Result<ResolvedPrune> {
        let (export, dtype) = float_export(self.format.as_deref(), self.dtype.as_deref())?;
        let structured = self.kind.structured();
        let misplaced = |what: &str| {
            invalid(format!(
                "{what} does not apply to {} pruning",
                serde_json::to_value(self.kind)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            ))
        };
        let job = if structured {
            if self.sparsity.is_some() || !self.overrides.is_empty() || self.global {
                return Err(misplaced("sparsity, overrides or global"));
            }
            if self.kv_groups && self.kind != PruneKind::Heads {
                return Err(misplaced("kv_groups"));
            }
            if self.criterion.is_some() && self.kind != PruneKind::Layers {
                return Err(misplaced("criterion"));
            }
            let fraction = self.fraction.ok_or_else(|| {
                invalid(
                    "structured pruning needs a fraction of units to remove (fraction = 0.25)"
                        .into(),
                )
            })?;
            if !(0.0..1.0).contains(&fraction) {
                return Err(invalid(format!("fraction {fraction} is outside [0, 1)")));
            }
            let importance = Importance::parse(self.importance.as_deref().unwrap_or("activation"))?;
            let criterion =
                LayerCriterion::parse(self.criterion.as_deref().unwrap_or("block-influence"))?;
            let target = match self.kind {
                PruneKind::Heads if self.kv_groups => Target::KvGroups,
                PruneKind::Heads => Target::Heads,
                PruneKind::Channels => Target::Channels,
                PruneKind::Layers => Target::Layers,
                _ => Target::Width,
            };
            PruneJob::Structured {
                target,
                fraction,
                importance,
                criterion,
            }
        } else {
            if self.fraction.is_some() || self.importance.is_some() || self.criterion.is_some() {
                return Err(misplaced("fraction, importance or criterion"));
            }
            if self.global && self.kind != PruneKind::Magnitude {
                return Err(misplaced("global"));
            }
            let method = match self.kind {
                PruneKind::Magnitude => PruneMethod::Magnitude {
                    global: self.global,
                },
                PruneKind::Wanda => PruneMethod::Wanda,
                _ => PruneMethod::SparseGpt(SparseGptConfig {
                    damp: self.damp,
                    block_size: self.block_size,
                }),
            };
            let default = sparsity(self.sparsity.as_deref().ok_or_else(|| {
                invalid("unstructured pruning needs a sparsity (0.5, 50% or 2:4)".into())
            })?)?;
            let mut plan = PrunePlan::uniform(method, default);
            for (pattern, s) in &self.overrides {
                plan.rules.push((
                    pattern.clone(),
                    sparsity(s).map_err(|e| invalid(format!("override '{pattern}': {e}")))?,
                ));
            }
            if matches!(method, PruneMethod::Magnitude { global: true })
                && (!plan.rules.is_empty() || matches!(default, Sparsity::NM { .. }))
            {
                return Err(invalid(
                    "global magnitude pruning takes one fraction (no N:M, no overrides)".into(),
                ));
            }
            PruneJob::Unstructured(plan)
        };
        let calibrates = match &job {
            PruneJob::Unstructured(plan) => plan.method.calibrates(),
            PruneJob::Structured {
                target, importance, ..
            } => *target == Target::Layers || *importance != Importance::Magnitude,
        };
        Ok(ResolvedPrune {
            job,
            export,
            dtype,
            calibrates,
        })
    }
}

/// Where and in which float type a pruned or distilled model is written: `gguf` (default) or
/// `hf`, `f32` (default) or `f16`.
pub fn float_export(format: Option<&str>, dtype: Option<&str>) -> Result<(Export, GgufWriteType)> {
    let export = match format {
        None | Some("gguf") => Export::Gguf,
        Some("hf") => Export::Hf,
        Some(other) => return Err(invalid(format!("format '{other}' (expected gguf or hf)"))),
    };
    let dtype = match dtype {
        None | Some("f32") => GgufWriteType::F32,
        Some("f16") => GgufWriteType::F16,
        Some(other) => return Err(invalid(format!("dtype '{other}' (expected f32 or f16)"))),
    };
    Ok((export, dtype))
}

/// The stored float type's name and bits per weight.
pub fn float_storage(dtype: GgufWriteType) -> (&'static str, f64) {
    match dtype {
        GgufWriteType::F16 => ("f16", 16.0),
        _ => ("f32", 32.0),
    }
}

/// Checks a job against the model before any calibration (N:M groups must divide every row).
/// How an unstructured pruning is named in reports (`wanda 0.5`).
fn unstructured_name(plan: &PrunePlan) -> String {
    let name = match plan.method {
        PruneMethod::Magnitude { global: true } => "magnitude (global)".to_string(),
        PruneMethod::Magnitude { .. } => "magnitude".into(),
        PruneMethod::Wanda => "wanda".into(),
        PruneMethod::SparseGpt(c) => {
            format!("sparsegpt (damp {}, blocks of {})", c.damp, c.block_size)
        }
    };
    format!("{name} {}", plan.default)
}

impl ResolvedPrune {
    /// The plan of an unstructured pruning that can read its model block by block: not global
    /// magnitude pruning (which ranks every weight of the model at once).
    fn streamed_plan(&self) -> Option<&PrunePlan> {
        match &self.job {
            PruneJob::Unstructured(plan)
                if !matches!(plan.method, PruneMethod::Magnitude { global: true }) =>
            {
                Some(plan)
            }
            _ => None,
        }
    }

    /// Whether the job reads its model block by block: unstructured (but not global
    /// magnitude) pruning, and structured pruning scored block by block (not by Taylor
    /// importance or the perplexity criterion, which need the model whole).
    fn streams_blocks(&self) -> bool {
        match &self.job {
            PruneJob::Unstructured(_) => self.streamed_plan().is_some(),
            PruneJob::Structured {
                target,
                importance,
                criterion,
                ..
            } => {
                // The structure's counts do not matter here, only its kind.
                let structure = match target {
                    Target::Layers => Structure::Layers {
                        count: 0,
                        criterion: *criterion,
                    },
                    _ => Structure::Channels { count: 0 },
                };
                shrink_prune::scores_block_by_block(structure, *importance)
            }
        }
    }

    /// The structure the job removes from a model shaped `config`, and how it is named in
    /// reports (`channels 0.25 by activation`).
    fn structure(
        &self,
        config: &shrink_models::ModelConfig,
    ) -> Result<Option<(Structure, String)>> {
        let PruneJob::Structured {
            target,
            fraction,
            importance,
            criterion,
        } = &self.job
        else {
            return Ok(None);
        };
        let structure = Structure::from_fraction(*target, *fraction, *criterion, config)?;
        let name = match structure {
            Structure::Layers { criterion, .. } => {
                format!("{target:?} {fraction} by {criterion:?}")
            }
            _ => format!("{target:?} {fraction} by {importance:?}"),
        };
        Ok(Some((structure, name.to_lowercase())))
    }
}

pub fn check_prune(resolved: &ResolvedPrune, model: &Transformer) -> Result<()> {
    if let PruneJob::Unstructured(plan) = &resolved.job {
        plan.check_model(model)?;
    }
    Ok(())
}

/// The `prune.*` stages.
pub(crate) struct PruneStage;

/// A pruning stage's keys; each kind reads some of them (see [`PruneStage::keys`]).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PruneKeys {
    /// Unstructured pruning: a fraction (`0.5`), a percentage (`"50%"`) or N:M (`"2:4"`).
    pub sparsity: Option<toml::Value>,
    /// Name pattern → sparsity.
    #[serde(default)]
    pub overrides: BTreeMap<String, toml::Value>,
    /// Magnitude pruning over all block linears at once.
    pub global: Option<bool>,
    pub damp: Option<f64>,
    /// SparseGPT's columns per mask selection.
    pub block_size: Option<usize>,
    /// Structured pruning: the fraction of heads, channels, layers or width removed.
    pub fraction: Option<f64>,
    /// `magnitude`, `activation` or `taylor`.
    pub importance: Option<String>,
    /// Layer ranking: `block-influence`, `angular` or `perplexity`.
    pub criterion: Option<String>,
    /// Heads: remove whole key/value groups.
    pub kv_groups: Option<bool>,
    /// `gguf` or `hf`.
    pub format: Option<String>,
    /// `f32` or `f16` storage.
    pub dtype: Option<String>,
}

impl StageType for PruneStage {
    fn keys(&self, kind: StageKind) -> Vec<&'static str> {
        let own: &[&str] = match kind {
            StageKind::PruneMagnitude => &["overrides", "sparsity", "global"],
            StageKind::PruneWanda => &["overrides", "sparsity"],
            StageKind::PruneSparseGpt => &["overrides", "damp", "sparsity", "block_size"],
            StageKind::PruneHeads => &["fraction", "importance", "kv_groups"],
            StageKind::PruneLayers => &["fraction", "importance", "criterion"],
            _ => &["fraction", "importance"],
        };
        debug_assert!(own.iter().all(|k| fields::<PruneKeys>().contains(k)));
        [&["format", "dtype"], own].concat()
    }

    fn job(&self, kind: StageKind, keys: &mut KeyReader) -> JobResult {
        let k: PruneKeys = keys.take()?;
        if let Some(v) = &k.sparsity {
            Sparsity::parse(&value_text(v)).map_err(|e| (Some("sparsity"), e.to_string()))?;
        }
        for (pattern, v) in &k.overrides {
            Sparsity::parse(&value_text(v))
                .map_err(|e| (Some("overrides"), format!("override `{pattern}`: {e}")))?;
        }
        if let Some(f) = k.fraction {
            if !(0.0..1.0).contains(&f) {
                return Err(KeyError::Key(
                    Some("fraction"),
                    format!("fraction = {f} is outside [0, 1)"),
                ));
            }
        }
        if let Some(i) = &k.importance {
            Importance::parse(i).map_err(|e| (Some("importance"), e.to_string()))?;
        }
        if let Some(c) = &k.criterion {
            LayerCriterion::parse(c).map_err(|e| (Some("criterion"), e.to_string()))?;
        }
        check_damp(k.damp)?;
        check_float_keys(&k.format, &k.dtype)?;
        if k.block_size == Some(0) {
            return Err(KeyError::Key(
                Some("block_size"),
                "block_size must be positive".into(),
            ));
        }
        let method = kind
            .prune_kind()
            .ok_or((None, format!("a {} stage is not a pruning", kind.name())))?;
        let defaults = PruneRequest::new(method);
        Ok(StageJob::Prune(PruneRequest {
            sparsity: k.sparsity.as_ref().map(value_text),
            overrides: k
                .overrides
                .iter()
                .map(|(k, v)| (k.clone(), value_text(v)))
                .collect(),
            global: k.global.unwrap_or(false),
            damp: k.damp.unwrap_or(defaults.damp),
            block_size: k.block_size.unwrap_or(defaults.block_size),
            fraction: k.fraction,
            importance: k.importance,
            criterion: k.criterion,
            kv_groups: k.kv_groups.unwrap_or(false),
            format: k.format,
            dtype: k.dtype,
            ..defaults
        }))
    }
}

impl Compress for ResolvedPrune {
    type Outcome = PruneOutcome;

    fn calibrates(&self) -> bool {
        self.calibrates
    }

    fn check(&self, checkpoint: &Checkpoint, model: &Transformer) -> Result<()> {
        check_prune(self, model)?;
        Ok(shrink_io::check_export(
            checkpoint,
            model.arch,
            self.export,
        )?)
    }

    fn write(&self, input: &JobInput, model: &mut Transformer, out: &Path) -> Result<PruneOutcome> {
        self.check(input.checkpoint, model)?;
        let parameters_before = model.num_parameters();
        let (method, layers, structured) = match &self.job {
            PruneJob::Unstructured(plan) => {
                let layers = shrink_prune::prune_model(
                    model,
                    plan,
                    input.windows,
                    input.batch,
                    input.progress,
                )?;
                (unstructured_name(plan), layers, None)
            }
            PruneJob::Structured { importance, .. } => {
                let (structure, name) = self
                    .structure(&model.config)?
                    .ok_or_else(|| invalid("a structured pruning without a structure".into()))?;
                let outcome = shrink_prune::prune_structured(
                    model,
                    structure,
                    *importance,
                    input.windows,
                    input.batch,
                    input.progress,
                )?;
                (name, Vec::new(), Some(outcome))
            }
        };
        shrink_io::write_model(input.checkpoint, model, self.export, self.dtype, out)?;
        Ok(PruneOutcome {
            method,
            layers,
            structured,
            parameters_before,
            parameters_after: model.num_parameters(),
            resumed_at_block: None,
        })
    }

    fn streams(&self, checkpoint: &Checkpoint) -> bool {
        self.streams_blocks() && crate::quantize::reads_block_by_block(checkpoint)
    }

    fn check_streamed(&self, checkpoint: &Checkpoint) -> Result<()> {
        let model = checkpoint.streamed(candle_core::DType::F32)?;
        let config = model.config();
        if let Some(plan) = self.streamed_plan() {
            plan.check_model(&model)?;
        }
        if let Some((structure, _)) = self.structure(config)? {
            shrink_prune::check_structure(config.arch()?, config, structure)?;
        }
        Ok(shrink_io::check_export(
            checkpoint,
            config.arch()?,
            self.export,
        )?)
    }

    fn streamed_job(
        &self,
        checkpoint: &Checkpoint,
        calibration: Option<(u64, u64, u64)>,
    ) -> Option<crate::memory::StreamedJob> {
        if !self.streams_blocks() {
            return None;
        }
        let config = shrink_models::ModelConfig::from_json(&checkpoint.config).ok()?;
        let embedding = config.embedding_name();
        let stored = checkpoint
            .tensors
            .dtype(&embedding)
            .map_or(4, |d| d.size_in_bytes() as u64);
        let structure = self.structure(&config).ok()?.map(|(s, _)| s);
        let (hessians, factors, widest_copies) = match (&self.job, structure) {
            (PruneJob::Unstructured(plan), _) => match plan.method {
                PruneMethod::SparseGpt(_) => (true, true, 16),
                PruneMethod::Wanda => (false, false, 8),
                _ => (true, false, 8),
            },
            // Heads are scored from o_proj's input Hessian; the rest from per-channel
            // statistics, or the weights and their squares.
            (_, Some(Structure::QueryHeads { .. } | Structure::KvGroups { .. })) => {
                (true, false, 8)
            }
            _ => (false, false, 8),
        };
        Some(crate::memory::StreamedJob {
            calibration,
            hessians,
            factors,
            block_value_bytes: 4,
            widest_copies,
            embedding_value_bytes: stored,
            embedding_written_bytes: float_storage(self.dtype).1 as u64 / 8,
            spilled: false,
            activation_value_bytes: 4,
            targets: false,
            activation_copies: match structure {
                Some(Structure::Layers {
                    count,
                    criterion: LayerCriterion::Angular,
                }) => count as u64 + 1,
                _ => 2,
            },
            scoring: None,
        })
    }

    fn write_streamed(&self, input: &JobInput, out: &Path) -> Result<PruneOutcome> {
        self.check_streamed(input.checkpoint)?;
        let run = shrink_prune::StreamedRun {
            windows: input.windows,
            batch: input.batch,
            world: input.world,
            keep: input.keep,
            export: self.export,
            dtype: self.dtype,
            progress: input.progress,
        };
        if let PruneJob::Structured { importance, .. } = &self.job {
            let config = shrink_models::ModelConfig::from_json(&input.checkpoint.config)?;
            let (structure, method) = self
                .structure(&config)?
                .ok_or_else(|| invalid("a structured pruning without a structure".into()))?;
            let outcome = shrink_prune::prune_structured_streamed(
                input.checkpoint,
                structure,
                *importance,
                &run,
                out,
            )?;
            return Ok(PruneOutcome {
                method,
                layers: Vec::new(),
                parameters_before: outcome.parameters_before,
                parameters_after: outcome.parameters_after,
                resumed_at_block: outcome.resumed_at,
                structured: Some(outcome),
            });
        }
        let plan = self.streamed_plan().ok_or_else(|| {
            invalid("this pruning holds the model whole; it does not stream".into())
        })?;
        let streamed = shrink_prune::prune_streamed(input.checkpoint, plan, &run, out)?;
        let parameters = input
            .checkpoint
            .tensors
            .names()
            .filter_map(|n| input.checkpoint.tensors.shape(n))
            .map(|s| s.iter().product::<usize>())
            .sum();
        Ok(PruneOutcome {
            method: unstructured_name(plan),
            layers: streamed.layers,
            structured: None,
            parameters_before: parameters,
            parameters_after: parameters,
            resumed_at_block: streamed.resumed_at,
        })
    }
}

impl Job for PruneRequest {
    fn plan(&self) -> Result<(bool, Export)> {
        self.resolve().map(|r| (r.calibrates, r.export))
    }

    fn keeps_shapes(&self) -> bool {
        !self.kind.structured()
    }

    fn leaves_mask(&self) -> bool {
        !self.kind.structured()
    }

    fn run(&self, cx: &StageContext, model: &mut Transformer, out: &Path) -> Result<StageResult> {
        let resolved = self.resolve()?;
        let outcome = cx.compress(&resolved, model, self.batch, out)?;
        Ok(pruned_result(
            &outcome,
            resolved.dtype,
            model.blocks.len() * 7,
        ))
    }

    fn streams(&self, checkpoint: &Checkpoint) -> bool {
        self.resolve().is_ok_and(|r| r.streams(checkpoint))
    }

    fn streamed_job(
        &self,
        checkpoint: &Checkpoint,
        calibration: Option<(u64, u64)>,
    ) -> Option<crate::memory::StreamedJob> {
        let calibration = calibration.map(|(samples, len)| (samples, len, self.batch as u64));
        self.resolve().ok()?.streamed_job(checkpoint, calibration)
    }

    fn run_streamed(&self, cx: &StageContext, out: &Path) -> Result<StageResult> {
        let resolved = self.resolve()?;
        let outcome = resolved.write_streamed(&cx.job_input(self.batch), out)?;
        // A structured pruning reports no linear by linear sparsity: its blocks' linears.
        let linears = match &outcome.structured {
            Some(s) => s.config.get("num_hidden_layers").copied().unwrap_or(0) * 7,
            None => outcome.layers.len(),
        };
        Ok(pruned_result(&outcome, resolved.dtype, linears))
    }
}

/// A pruning's stage result: the `linears` block linears stored as `dtype`, with their sparsity.
fn pruned_result(outcome: &PruneOutcome, dtype: GgufWriteType, linears: usize) -> StageResult {
    let (format, bits) = float_storage(dtype);
    let layers: Vec<LayerRow> = outcome
        .layers
        .iter()
        .map(|l| LayerRow {
            name: l.name.clone(),
            format: format!("{format}, sparsity {}", l.target),
            shape: l.shape,
            bits_per_weight: bits,
            relative_output_error: l.relative_output_error,
            sparsity: l.sparsity,
        })
        .collect();
    StageResult {
        method: outcome.method.clone(),
        types: [(format.to_string(), linears)].into(),
        linear_bits_per_weight: bits,
        layers,
        pruning: Some(serde_json::json!({
            "parameters_before": outcome.parameters_before,
            "parameters_after": outcome.parameters_after,
            "structured": outcome.structured,
        })),
        ..StageResult::default()
    }
}

//! One quantization job: the options of `shrink quantize` and of a `quantize.*` stage resolved into
//! a per-linear plan and a method, run on a model, and written as a GGUF or a compressed-tensors
//! folder. The CLI command and pipeline stages both go through [`QuantizeRequest`].

use super::{Compress, Job, JobInput, StageContext, StageResult};
use crate::config::StageKeys;
use crate::report::LayerRow;
use crate::{PipelineError, Result};
use candle_core::DType;
use serde::{Deserialize, Serialize};
use shrink_io::{Checkpoint, GgufWriteType};
use shrink_models::{ActQuant, BlockModel, ModelConfig, Transformer};
use shrink_quant::{
    Format, GptqConfig, Granularity, Method, Preset, QuantPlan, Rule, SignRoundConfig,
};
use std::collections::BTreeMap;
use std::path::Path;

mod keys;
pub(crate) use keys::{quantize_request, take_quantize_keys, FormatKeys, QuantizeStage};

/// Which algorithm picks the codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum QuantMethod {
    Rtn,
    Gptq,
    /// AWQ scales folded into the norms, then RTN.
    Awq,
    /// AWQ scales, then GPTQ.
    AwqGptq,
    /// Rounding learned per block by signed gradient descent on the block's output error.
    #[serde(rename = "signround")]
    SignRound,
    /// GPTQ's codes refined by SignRound.
    #[serde(rename = "gptq-signround")]
    GptqSignRound,
}

impl QuantMethod {
    /// Every method: its name, as configs and the command line write it, and what it does where
    /// the name does not say.
    pub const CHOICES: [(&'static str, Option<&'static str>); 6] = [
        ("rtn", None),
        ("gptq", None),
        ("awq", Some("AWQ scales folded into the norms, then RTN")),
        ("awq-gptq", Some("AWQ scales, then GPTQ")),
        (
            "signround",
            Some("rounding learned per block by signed gradient descent (AutoRound)"),
        ),
        ("gptq-signround", Some("GPTQ's codes refined by SignRound")),
    ];

    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "rtn" => Ok(Self::Rtn),
            "gptq" => Ok(Self::Gptq),
            "awq" => Ok(Self::Awq),
            "awq-gptq" => Ok(Self::AwqGptq),
            "signround" => Ok(Self::SignRound),
            "gptq-signround" => Ok(Self::GptqSignRound),
            other => Err(invalid(format!(
                "method '{other}' (expected rtn, gptq, awq, awq-gptq, signround or gptq-signround)"
            ))),
        }
    }
}

pub use shrink_io::Export;

/// A preset a request names (a built-in name or a preset file), parsed once when the request is
/// made; it serializes as its name.
#[derive(Debug, Clone, PartialEq)]
pub struct PresetChoice {
    pub name: String,
    pub preset: Preset,
}

impl PresetChoice {
    /// Reads the built-in preset or the preset file `name`.
    pub fn load(name: &str) -> std::result::Result<PresetChoice, shrink_quant::QuantError> {
        Ok(PresetChoice {
            name: name.to_string(),
            preset: Preset::load(name)?,
        })
    }
}

impl Serialize for PresetChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.name)
    }
}

/// What to quantize and how. Unset options take the preset's value, then the defaults.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuantizeRequest {
    /// A built-in preset (`q4_k_m`) or a preset TOML file.
    pub preset: Option<PresetChoice>,
    pub method: Option<QuantMethod>,
    /// `gguf:TYPE` (or just `TYPE`) or `hf`.
    pub format: Option<String>,
    pub bits: Option<u8>,
    /// A group size, `channel` or `tensor`.
    pub group: Option<String>,
    /// SmoothQuant's alpha.
    pub smooth: Option<f64>,
    /// `int8-per-token` or `none`.
    pub activations: Option<String>,
    /// Linears (name patterns) whose inputs stay in 16 bits under `activations`; unset, the
    /// preset's `activations_except`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub activations_except: Option<Vec<String>>,
    /// (name pattern, block type), later ones win.
    pub overrides: Vec<(String, String)>,
    /// Search each group's scale on the activation-weighted error.
    pub search: bool,
    /// RTN weighted by the calibration activations (llama.cpp's imatrix).
    pub imatrix: bool,
    pub damp: f64,
    pub act_order: bool,
    /// GPTQ's Hessian blended toward its diagonal ([`GptqConfig::blend`]); unset, the preset's
    /// `blend`, else 0.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub blend: Option<f64>,
    pub awq_grid: usize,
    /// `f32`, `f16` or a block type for the token embedding and an untied head.
    pub embeddings: Option<String>,
    /// Calibration windows per forward pass.
    pub batch: usize,
    /// GPTQ keeps exactly-zero weights (a pruning mask) at the grid value nearest zero.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub keep_zeros: bool,
    /// SignRound's steps and learning rate (left out of the stage's key when at their defaults,
    /// so other methods' keys are unchanged).
    #[serde(skip_serializing_if = "is_default_signround")]
    pub signround: SignRoundConfig,
}

impl Default for QuantizeRequest {
    fn default() -> Self {
        Self {
            preset: None,
            method: None,
            format: None,
            bits: None,
            group: None,
            smooth: None,
            activations: None,
            activations_except: None,
            overrides: Vec::new(),
            search: false,
            imatrix: false,
            damp: 0.01,
            act_order: true,
            blend: None,
            awq_grid: 20,
            embeddings: None,
            batch: 8,
            keep_zeros: false,
            signround: SignRoundConfig::default(),
        }
    }
}

fn is_default_signround(c: &SignRoundConfig) -> bool {
    *c == SignRoundConfig::default()
}

/// A request with every choice made.
#[derive(Debug, Clone)]
pub struct ResolvedQuantize {
    pub plan: QuantPlan,
    pub method: Method,
    pub export: Export,
    /// `None`: f32; `Some(Err(t))`: a float type; `Some(Ok(f))`: a block format.
    pub embeddings: Option<std::result::Result<Format, GgufWriteType>>,
    /// Whether the method needs calibration windows.
    pub calibrates: bool,
}

/// What a quantization run produced.
#[derive(Debug, Clone, Serialize)]
pub struct QuantizeOutcome {
    /// `Gptq(GptqConfig { … })`
    pub method: String,
    /// Stored type → number of tensors.
    pub types: BTreeMap<String, usize>,
    pub layers: Vec<shrink_quant::LayerReport>,
    /// Bits per weight over the quantized linears.
    pub linear_bits_per_weight: f64,
    /// The block a killed streamed run was resumed at (its reports cover the blocks before it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resumed_at_block: Option<usize>,
}

fn invalid(message: String) -> PipelineError {
    PipelineError::Invalid(message)
}

fn block_type(name: &str, search: bool) -> Result<Format> {
    let t = name.strip_prefix("gguf:").unwrap_or(name);
    Ok(Format::parse(t)?.with_search(search))
}

impl QuantizeRequest {
    /// Makes every choice: the preset's, overridden by what the request sets.
    pub fn resolve(&self) -> Result<ResolvedQuantize> {
        let preset = self.preset.as_ref().map(|p| &p.preset);
        let search = self.search || self.imatrix;
        let export = match (&self.format, &preset) {
            (Some(f), _) if f == "hf" => Export::Hf,
            (Some(_), _) => Export::Gguf,
            (None, Some(p)) if p.export == "hf" => Export::Hf,
            (None, _) => Export::Gguf,
        };
        let preset_plan = preset.as_ref().map(|p| p.plan()).transpose()?;
        let grid = self.grid()?;
        let mut plan = match (&self.format, &preset_plan) {
            (Some(f), _) if export == Export::Gguf => {
                let format = block_type(f, search)?;
                if let Some(Format::Scheme(want)) = grid {
                    let (bits, group) = match format {
                        Format::Scheme(s) => (s.bits, s.granularity),
                        Format::K(k) => (k.bits(), Granularity::Group(k.group())),
                        Format::I(q) => (q.bits(), Granularity::Group(32)),
                    };
                    if self.bits.is_some_and(|b| b != bits)
                        || (self.group.is_some() && want.granularity != group)
                    {
                        return Err(invalid(format!(
                            "bits/group ({} bits, {:?}) do not describe {f} ({bits} bits, {group:?})",
                            want.bits, want.granularity
                        )));
                    }
                }
                QuantPlan::uniform(format)
            }
            (_, Some(p)) if grid.is_none() => p.clone(),
            _ => QuantPlan::uniform(match grid {
                Some(f) => f,
                None if export == Export::Hf => {
                    return Err(invalid(
                        "a Hugging Face export needs a grid: bits/group or a preset".into(),
                    ))
                }
                None => block_type("q4_0", search)?,
            }),
        };
        if let Some(p) = &preset_plan {
            // A preset's fallbacks still apply to a format given explicitly.
            plan.fallbacks = p.fallbacks.clone();
        }
        let smoothing = self.smooth.or(preset.as_ref().and_then(|p| p.smoothing));
        if let Some(alpha) = smoothing {
            if !(0.0..=1.0).contains(&alpha) {
                return Err(invalid(format!("smoothing alpha {alpha} is outside 0..=1")));
            }
        }
        let activations = match self
            .activations
            .as_deref()
            .or(preset.as_ref().and_then(|p| p.activations.as_deref()))
        {
            None | Some("none") => None,
            Some("int8-per-token") => Some(shrink_quant::Activations {
                quant: ActQuant::Int8PerToken,
                except: self
                    .activations_except
                    .clone()
                    .or(preset.as_ref().and_then(|p| p.activations_except.clone()))
                    .unwrap_or_default(),
            }),
            Some(other) => {
                return Err(invalid(format!(
                    "activations '{other}': expected int8-per-token or none"
                )))
            }
        };
        if activations.is_none() && self.activations_except.is_some() {
            return Err(invalid(
                "activations_except without int8 activations (activations = \"int8-per-token\")"
                    .into(),
            ));
        }
        if export == Export::Hf {
            let formats = std::iter::once(&plan.default)
                .chain(plan.rules.iter().map(|r| &r.format))
                .chain(plan.fallbacks.iter().map(|(_, to)| to));
            for f in formats {
                if let Some(why) = shrink_quant::hf_unsupported(f, activations.is_some()) {
                    return Err(invalid(format!("format hf: {why}")));
                }
            }
        }
        if activations.is_some() && export != Export::Hf {
            return Err(invalid(
                "int8 activations are exported to Hugging Face folders only (format hf)".into(),
            ));
        }
        if search {
            plan.search_scales();
        }
        for (pattern, f) in &self.overrides {
            plan.rules.push(Rule::new(
                pattern,
                block_type(f, search).map_err(|e| invalid(format!("override '{pattern}': {e}")))?,
            ));
        }
        let gptq = GptqConfig {
            damp: self.damp,
            act_order: self.act_order,
            static_groups: true,
            keep_zeros: self.keep_zeros,
            blend: self
                .blend
                .or(preset.as_ref().and_then(|p| p.blend))
                .unwrap_or(0.0),
        };
        let method_name = match (self.method, &preset) {
            (Some(m), _) => m,
            (None, Some(p)) => QuantMethod::parse(&p.method)?,
            (None, None) => QuantMethod::Gptq,
        };
        let method = match (method_name, smoothing) {
            (QuantMethod::Rtn, Some(alpha)) => Method::SmoothQuant { alpha, gptq: None },
            (QuantMethod::Gptq, Some(alpha)) => Method::SmoothQuant {
                alpha,
                gptq: Some(gptq),
            },
            (_, Some(_)) => {
                return Err(invalid(
                    "SmoothQuant combines with rtn or gptq weights, not AWQ or SignRound".into(),
                ))
            }
            (QuantMethod::Rtn, None) => Method::Rtn,
            (QuantMethod::Gptq, None) => Method::Gptq(gptq),
            (QuantMethod::Awq, None) => Method::Awq {
                grid: self.awq_grid,
                gptq: None,
            },
            (QuantMethod::AwqGptq, None) => Method::Awq {
                grid: self.awq_grid,
                gptq: Some(gptq),
            },
            (QuantMethod::SignRound | QuantMethod::GptqSignRound, None)
                if self.signround.steps == 0
                    || self.signround.lr.is_some_and(|lr| !(lr > 0.0 && lr <= 1.0)) =>
            {
                let SignRoundConfig { steps, lr, .. } = self.signround;
                return Err(invalid(format!(
                    "SignRound needs at least one step and an lr in (0, 1] (steps = {steps}, lr = {lr:?})"
                )));
            }
            (QuantMethod::SignRound, None) => {
                // GPTQ's settings would do nothing: refused rather than ignored.
                let defaults = QuantizeRequest::default();
                let unused = [
                    (self.blend.is_some(), "blend"),
                    (self.act_order != defaults.act_order, "act-order off"),
                    (self.damp != defaults.damp, "damp"),
                    (self.imatrix, "imatrix"),
                ];
                if let Some((_, what)) = unused.iter().find(|(set, _)| *set) {
                    return Err(invalid(format!(
                        "{what} is a setting of GPTQ or RTN; SignRound fixes its grids by the \
                         format's importance-weighted quantizer and learns the rounding \
                         (gptq-signround starts from GPTQ's codes and reads GPTQ's settings)"
                    )));
                }
                Method::SignRound(SignRoundConfig {
                    keep_zeros: self.keep_zeros,
                    ..self.signround
                })
            }
            (QuantMethod::GptqSignRound, None) => Method::SignRound(SignRoundConfig {
                keep_zeros: self.keep_zeros,
                gptq: Some(gptq),
                ..self.signround
            }),
        };
        let embeddings_spec = match (&self.embeddings, &preset) {
            (Some(e), _) => e.clone(),
            (None, Some(p)) => match &p.embeddings {
                Some(shrink_quant::FormatSpec::Name(n)) => n.clone(),
                Some(other) => {
                    return Err(invalid(format!(
                        "preset embeddings must be a block type, got {other:?}"
                    )))
                }
                None => "q8_0".into(),
            },
            (None, None) => "q8_0".into(),
        };
        let embeddings = match embeddings_spec.as_str() {
            "f32" => None,
            "f16" => Some(Err(GgufWriteType::F16)),
            t => Some(Ok(
                block_type(t, false).map_err(|e| invalid(format!("embeddings: {e}")))?
            )),
        };
        let calibrates = !matches!(method, Method::Rtn) || search;
        Ok(ResolvedQuantize {
            plan: QuantPlan {
                activations,
                ..plan
            },
            method,
            export,
            embeddings,
            calibrates,
        })
    }

    /// The grid that `bits` / `group` describe, if either is set.
    fn grid(&self) -> Result<Option<Format>> {
        if self.bits.is_none() && self.group.is_none() {
            return Ok(None);
        }
        let granularity = match self.group.as_deref() {
            None => Granularity::Group(128),
            Some("channel") => Granularity::Channel,
            Some("tensor") => Granularity::Tensor,
            Some(g) => Granularity::Group(g.parse().map_err(|_| {
                invalid(format!("group '{g}': expected a size, channel or tensor"))
            })?),
        };
        Ok(Some(Format::Scheme(shrink_quant::QuantScheme {
            bits: self.bits.unwrap_or(4),
            grid: shrink_quant::Grid::Symmetric,
            granularity,
            search: false,
        })))
    }
}

/// Builds the f32 (or bf16) model of a checkpoint. The linears a W8A8 checkpoint's token groups
/// target see int8 per-token activations, as in vLLM.
pub fn build_model(checkpoint: &Checkpoint, dtype: DType) -> Result<Transformer> {
    let cfg = ModelConfig::from_json(&checkpoint.config)?;
    let mut model = Transformer::from_checkpoint(&cfg, checkpoint.load_finite()?, dtype)?;
    if let Some(targets) = dynamic_token_targets(checkpoint) {
        model.set_act_quant_by(|name| {
            let hit = targets.iter().any(|t| shrink_io::target_matches(t, name));
            hit.then_some(ActQuant::Int8PerToken)
        });
    }
    Ok(model)
}

/// Writes `model`, whose linears hold the dequantized values of `result`, with those linears
/// stored packed, as `resolved` says. Post-training quantization and QAT both write through here.
pub fn write_quantized(
    checkpoint: &Checkpoint,
    model: &Transformer,
    result: &shrink_quant::QuantizedModel,
    resolved: &ResolvedQuantize,
    out: &Path,
) -> Result<QuantizeOutcome> {
    let written =
        shrink_quant::write_quantized(checkpoint, model, result, &resolved.output(), out)?;
    Ok(QuantizeOutcome {
        method: format!("{:?}", resolved.method),
        types: written.types,
        layers: result.layers.clone(),
        linear_bits_per_weight: written.linear_bits_per_weight,
        resumed_at_block: None,
    })
}

impl Compress for ResolvedQuantize {
    type Outcome = QuantizeOutcome;

    fn calibrates(&self) -> bool {
        self.calibrates
    }

    fn check(&self, checkpoint: &Checkpoint, model: &Transformer) -> Result<()> {
        self.plan.check_model(&model.config)?;
        Ok(shrink_io::check_export(
            checkpoint,
            model.arch,
            self.export,
        )?)
    }

    fn write(
        &self,
        input: &JobInput,
        model: &mut Transformer,
        out: &Path,
    ) -> Result<QuantizeOutcome> {
        shrink_io::check_export(input.checkpoint, model.arch, self.export)?;
        let result = shrink_quant::quantize_model(
            model,
            self.method,
            &self.plan,
            input.windows,
            input.batch,
            input.progress,
        )?;
        write_quantized(input.checkpoint, model, &result, self, out)
    }

    fn streams(&self, checkpoint: &Checkpoint) -> bool {
        reads_block_by_block(checkpoint)
    }

    fn check_streamed(&self, checkpoint: &Checkpoint) -> Result<()> {
        let model = checkpoint.streamed(DType::F32)?;
        self.plan.check_model(model.config())?;
        Ok(shrink_io::check_export(
            checkpoint,
            model.config().arch()?,
            self.export,
        )?)
    }

    fn streamed_job(
        &self,
        checkpoint: &Checkpoint,
        calibration: Option<(u64, u64, u64)>,
    ) -> Option<crate::memory::StreamedJob> {
        let config = ModelConfig::from_json(&checkpoint.config).ok()?;
        let embedding = config.embedding_name();
        let bytes = |d: DType| d.size_in_bytes() as u64;
        Some(crate::memory::StreamedJob {
            calibration,
            hessians: true,
            factors: matches!(
                self.method,
                Method::Gptq(_)
                    | Method::Awq { gptq: Some(_), .. }
                    | Method::SmoothQuant { gptq: Some(_), .. }
                    | Method::SignRound(shrink_quant::SignRoundConfig { gptq: Some(_), .. })
            ),
            block_value_bytes: if calibration.is_some() {
                match self.method {
                    // Beside the block: its linears' weights as variables, their gradients, and
                    // per weight its f32 copy, offset, grid step, value and code, and the values'
                    // tensor set each step.
                    Method::SignRound(_) => 36,
                    _ => 4,
                }
            } else {
                // Rounding alone holds the linears as stored (dequantized GGUF blocks in f32):
                // the widest of block 0's.
                config
                    .block_linear_names(0)
                    .ok()?
                    .iter()
                    .filter(|n| !n.is_empty())
                    .map(|n| {
                        let name = format!("{n}.weight");
                        checkpoint.tensors.dtype(&name).map_or(4, bytes)
                    })
                    .max()
                    .unwrap_or(4)
            },
            widest_copies: 12,
            embedding_value_bytes: checkpoint.tensors.dtype(&embedding).map_or(4, bytes),
            embedding_written_bytes: match self.embeddings {
                None | Some(Err(GgufWriteType::F32)) => 4,
                Some(Err(GgufWriteType::F16)) => 2,
                // Q8_0 goes through an f32 copy and ggml's own buffer.
                Some(Err(GgufWriteType::Q8_0)) => 6,
                Some(Ok(_)) => 1,
            },
            spilled: false,
            activation_value_bytes: 4,
            activation_copies: 2,
            targets: matches!(self.method, Method::SignRound(_)),
            scoring: None,
        })
    }

    fn write_streamed(&self, input: &JobInput, out: &Path) -> Result<QuantizeOutcome> {
        self.check_streamed(input.checkpoint)?;
        // Rounding alone reads the weights as stored (f16 or bf16 linears are not widened);
        // calibration runs the blocks in f32.
        let mut model = match input.windows {
            Some(_) => input.checkpoint.streamed(DType::F32)?,
            None => input.checkpoint.streamed_as_stored()?,
        };
        let output = self.output();
        let (result, written) = shrink_quant::quantize_streamed(
            input.checkpoint,
            &mut model,
            self.method,
            &output,
            input.windows,
            input.batch,
            input.world,
            input.keep,
            input.progress,
            out,
        )?;
        Ok(QuantizeOutcome {
            method: format!("{:?}", self.method),
            types: written.types,
            layers: result.layers,
            linear_bits_per_weight: written.linear_bits_per_weight,
            resumed_at_block: result.resumed_at,
        })
    }
}

/// Whether a checkpoint can be read block by block as it is: a Llama-family model whose linears
/// do not quantize their activations to int8 (which only a model built whole applies).
pub fn reads_block_by_block(checkpoint: &Checkpoint) -> bool {
    let llama = ModelConfig::from_json(&checkpoint.config)
        .and_then(|c| c.arch())
        .is_ok_and(|a| a.is_llama_like());
    llama && dynamic_token_targets(checkpoint).is_none()
}

/// The targets of the config groups whose linears see int8 per-token activations (a W8A8
/// compressed-tensors folder), as in vLLM; `None` when no group does.
fn dynamic_token_targets(checkpoint: &Checkpoint) -> Option<Vec<String>> {
    let groups = checkpoint
        .config
        .pointer("/quantization_config/config_groups")?
        .as_object()?;
    let targets: Vec<String> = groups
        .values()
        .filter(|g| {
            g.pointer("/input_activations/strategy")
                .and_then(|s| s.as_str())
                == Some("token")
        })
        .flat_map(|g| {
            let t = g.get("targets").and_then(|t| t.as_array());
            t.into_iter()
                .flatten()
                .filter_map(|t| t.as_str().map(String::from))
        })
        .collect();
    (!targets.is_empty()).then_some(targets)
}

impl ResolvedQuantize {
    /// How the quantized model is written.
    fn output(&self) -> shrink_quant::QuantizedOutput<'_> {
        shrink_quant::QuantizedOutput {
            export: self.export,
            plan: &self.plan,
            embeddings: self.embeddings,
        }
    }
}

impl Job for QuantizeRequest {
    fn plan(&self) -> Result<(bool, Export)> {
        self.resolve().map(|r| (r.calibrates, r.export))
    }

    fn check_shapes(&self, config: &ModelConfig) -> Result<()> {
        Ok(self.resolve()?.plan.check_model(config)?)
    }

    fn writes_streamable(&self) -> bool {
        self.resolve().is_ok_and(|r| r.plan.activations.is_none())
    }

    fn leaves_mask(&self) -> bool {
        self.keep_zeros
    }

    fn keep_mask(&mut self, keys: &StageKeys, input_has_mask: bool) {
        if !keys.has("keep_sparsity") {
            self.keep_zeros = input_has_mask;
        }
    }

    fn run(&self, cx: &StageContext, model: &mut Transformer, out: &Path) -> Result<StageResult> {
        let resolved = self.resolve()?;
        let outcome = cx.compress(&resolved, model, self.batch, out)?;
        Ok(quantized_result(outcome))
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
        let outcome = self
            .resolve()?
            .write_streamed(&cx.job_input(self.batch), out)?;
        Ok(quantized_result(outcome))
    }
}

/// A quantization's stage result.
pub(crate) fn quantized_result(outcome: QuantizeOutcome) -> StageResult {
    let layers = outcome
        .layers
        .iter()
        .map(|l| LayerRow {
            name: l.name.clone(),
            format: l.format.clone(),
            shape: l.shape,
            bits_per_weight: l.bits_per_weight,
            relative_output_error: l.relative_output_error,
            sparsity: l.zero_fraction,
        })
        .collect();
    StageResult {
        method: outcome.method,
        types: outcome.types,
        linear_bits_per_weight: outcome.linear_bits_per_weight,
        layers,
        ..StageResult::default()
    }
}

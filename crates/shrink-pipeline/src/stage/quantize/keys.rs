//! How a `quantize.*` stage reads its keys: what to write and how codes are picked, each checked
//! at its key, into a [`QuantizeRequest`].

use super::*;
use crate::config::{fields, KeyReader};
use crate::stage::{check_blend, check_damp, check_weights, value_text, whole};
use crate::stage::{JobResult, KeyError, KeyResult, StageJob, StageKind, StageType};
/// The `quantize.rtn`, `quantize.gptq`, `quantize.awq`, `quantize.smoothquant` and
/// `quantize.signround` stages.
pub(crate) struct QuantizeStage;

/// What every quantization stage writes (`quantize.qat` too).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FormatKeys {
    /// A preset from `configs/quant` or a preset file.
    pub preset: Option<String>,
    /// A ggml block type (`q4_k`) for GGUF, or `hf` with `bits` / `group`.
    pub format: Option<String>,
    pub bits: Option<u8>,
    /// A group size or `"channel"`.
    pub group: Option<toml::Value>,
    /// Name pattern → block type.
    #[serde(default)]
    pub overrides: BTreeMap<String, toml::Value>,
    pub embeddings: Option<String>,
    /// `int8-per-token` or `none`.
    pub activations: Option<String>,
    /// Linears (name patterns) whose inputs stay in 16 bits under `activations`.
    pub activations_except: Option<Vec<String>>,
    /// Search each group's scale on the activation-weighted error.
    pub search: Option<bool>,
}

/// How a quantization stage picks its codes; each method reads some of these (see
/// [`QuantizeStage::keys`]).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MethodKeys {
    pub damp: Option<f64>,
    pub act_order: Option<bool>,
    /// GPTQ's Hessian blended toward its diagonal, 0..=1.
    pub blend: Option<f64>,
    pub imatrix: Option<bool>,
    /// SmoothQuant's migration strength.
    pub alpha: Option<f64>,
    pub awq_grid: Option<usize>,
    /// How AWQ, SmoothQuant and QAT pick the codes after rescaling: `rtn` or `gptq`.
    pub weights: Option<String>,
    /// Keep exactly-zero weights at zero (a pruning mask). Defaults to true when the input is
    /// an unstructured pruning stage (or a quantization of one that keeps them).
    pub keep_sparsity: Option<bool>,
    /// SignRound's signed-gradient steps per block.
    pub steps: Option<usize>,
    /// SignRound's first step size, in grid steps (default 1 / steps).
    pub lr: Option<f64>,
}

impl StageType for QuantizeStage {
    fn keys(&self, kind: StageKind) -> Vec<&'static str> {
        let own: &[&str] = match kind {
            StageKind::QuantizeRtn => &["imatrix"],
            StageKind::QuantizeGptq => &["damp", "act_order", "blend"],
            StageKind::QuantizeAwq => &["damp", "act_order", "blend", "awq_grid", "weights"],
            StageKind::QuantizeSignRound => {
                &["steps", "lr", "weights", "damp", "act_order", "blend"]
            }
            _ => &["damp", "act_order", "blend", "alpha", "weights"],
        };
        [fields::<FormatKeys>(), own, &["keep_sparsity"]].concat()
    }

    fn job(&self, kind: StageKind, keys: &mut KeyReader) -> JobResult {
        let (format, method, preset) = take_quantize_keys(keys)?;
        Ok(StageJob::Quantize(whole(quantize_request(
            kind, &format, preset, &method,
        ))?))
    }
}

/// What every quantization stage reads (`quantize.qat` too): what to write and how codes are
/// picked, checked; and the preset, read.
pub(crate) fn take_quantize_keys(
    keys: &mut KeyReader,
) -> std::result::Result<(FormatKeys, MethodKeys, Option<PresetChoice>), KeyError> {
    let format: FormatKeys = keys.take()?;
    let method: MethodKeys = keys.take()?;
    method.check()?;
    let preset = format.check()?;
    Ok((format, method, preset))
}

impl MethodKeys {
    /// The checks of the method's keys, each error pointing at its key.
    pub(crate) fn check(&self) -> KeyResult<()> {
        if let Some(alpha) = self.alpha {
            if !(0.0..=1.0).contains(&alpha) {
                return Err((Some("alpha"), format!("alpha = {alpha} is outside 0..=1")));
            }
        }
        check_damp(self.damp)?;
        check_blend(self.blend)?;
        if self.steps == Some(0) {
            return Err((
                Some("steps"),
                "steps = 0: SignRound needs at least one".into(),
            ));
        }
        if let Some(lr) = self.lr {
            if !(lr > 0.0 && lr <= 1.0) {
                return Err((Some("lr"), format!("lr = {lr} is outside (0, 1]")));
            }
        }
        check_weights(&self.weights)
    }
}

impl FormatKeys {
    /// The checks of what to write, each error pointing at its key; the preset, read.
    pub(crate) fn check(&self) -> KeyResult<Option<PresetChoice>> {
        if let Some(b) = self.bits {
            if !(2..=8).contains(&b) {
                return Err((Some("bits"), format!("bits = {b} is outside 2..=8")));
            }
        }
        if let Some(group) = &self.group {
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
        let preset = self
            .preset
            .as_deref()
            .map(|name| {
                PresetChoice::load(name)
                    .map_err(|e| (Some("preset"), format!("preset `{name}`: {e}")))
            })
            .transpose()?;
        if let Some(f) = &self.format {
            if f != "hf" {
                Format::parse(f.strip_prefix("gguf:").unwrap_or(f))
                    .map_err(|e| (Some("format"), e.to_string()))?;
            }
        }
        if self.preset.is_none() && self.format.is_none() && self.bits.is_none() {
            return Err((
                None,
                "says nothing about the format: give `preset`, `format` or `bits`".into(),
            ));
        }
        for (pattern, ty) in &self.overrides {
            Format::parse(&value_text(ty))
                .map_err(|e| (None, format!("override `{pattern}`: {e}")))?;
        }
        if let Some(a) = &self.activations {
            if !["int8-per-token", "none"].contains(&a.as_str()) {
                return Err((
                    Some("activations"),
                    format!("activations `{a}` is not one of: int8-per-token, none"),
                ));
            }
        }
        Ok(preset)
    }
}

/// The quantization job a `quantize.*` (or `quantize.qat`) stage describes.
pub(crate) fn quantize_request(
    kind: StageKind,
    f: &FormatKeys,
    preset: Option<PresetChoice>,
    m: &MethodKeys,
) -> Result<QuantizeRequest> {
    let weights = m.weights.as_deref().map(QuantMethod::parse).transpose()?;
    let (method, smooth) = match kind {
        StageKind::QuantizeRtn => (Some(QuantMethod::Rtn), None),
        // QAT starts from GPTQ's codes unless `weights = "rtn"`.
        StageKind::QuantizeQat => (Some(weights.unwrap_or(QuantMethod::Gptq)), None),
        StageKind::QuantizeGptq => (Some(QuantMethod::Gptq), None),
        // Rounding learned from round-to-nearest's codes, or from GPTQ's (`weights = "gptq"`).
        StageKind::QuantizeSignRound => (
            Some(match weights {
                Some(QuantMethod::Gptq) => QuantMethod::GptqSignRound,
                _ => QuantMethod::SignRound,
            }),
            None,
        ),
        StageKind::QuantizeAwq => (
            Some(match weights {
                Some(QuantMethod::Gptq) => QuantMethod::AwqGptq,
                _ => QuantMethod::Awq,
            }),
            None,
        ),
        // The weights' method defaults to the preset's; alpha to the preset's, then 0.8.
        StageKind::QuantizeSmoothQuant => {
            let preset_alpha = preset.as_ref().and_then(|p| p.preset.smoothing);
            (weights, Some(m.alpha.or(preset_alpha).unwrap_or(0.8)))
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
        preset,
        method,
        format: f.format.clone(),
        bits: f.bits,
        group: f.group.as_ref().map(value_text),
        smooth,
        activations: f.activations.clone(),
        activations_except: f.activations_except.clone(),
        overrides: f
            .overrides
            .iter()
            .map(|(k, v)| (k.clone(), value_text(v)))
            .collect(),
        search: f.search.unwrap_or(false),
        imatrix: m.imatrix.unwrap_or(false),
        damp: m.damp.unwrap_or(defaults.damp),
        act_order: m.act_order.unwrap_or(defaults.act_order),
        blend: m.blend.or(defaults.blend),
        awq_grid: m.awq_grid.unwrap_or(defaults.awq_grid),
        embeddings: f.embeddings.clone(),
        batch: defaults.batch,
        keep_zeros: m.keep_sparsity.unwrap_or(false),
        signround: SignRoundConfig {
            steps: m.steps.unwrap_or(defaults.signround.steps),
            lr: m.lr,
            keep_zeros: false,
            gptq: None,
        },
    })
}

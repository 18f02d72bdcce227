//! Quantization-aware training: the `quantize.qat` stage and `shrink distill --qat`.

use super::distill::TrainKeys;
use super::distill::{distill_request, training_memory, DistillRequest, TrainingKeys};
use super::quantize::{quantize_request, quantized_result, take_quantize_keys, FormatKeys};
use super::{whole, Job, JobMemory, JobResult, ModelSizes, StageContext, StageJob, StageKind};
use super::{StageResult, StageType};
use crate::config::{fields, KeyReader};
use crate::quantize::Export;
use crate::Result;
use serde::{Deserialize, Serialize};
use shrink_core::Progress;
use shrink_io::Checkpoint;
use shrink_models::Transformer;
use shrink_train::TrainOutcome;
use std::path::Path;

/// Quantization-aware training: the model is quantized as `quantize` says (GPTQ by default),
/// then trained with fake-quantized linears against its unquantized self, and written through
/// the same packed GGUF / compressed-tensors path as post-training quantization.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QatRequest {
    pub quantize: crate::QuantizeRequest,
    /// `forward-kl` or `reverse-kl`.
    pub loss: String,
    pub temperature: f64,
    pub alpha: f64,
    /// Frozen tensors [default: the token embedding].
    pub freeze: Option<Vec<String>>,
    /// Learn the scales (LSQ): grid schemes', k-quants' and IQ4_XS's (super-block and group),
    /// IQ4_NL's (block).
    pub learn_scales: bool,
    pub train: TrainKeys,
}

impl QatRequest {
    pub fn new(quantize: crate::QuantizeRequest) -> Self {
        Self {
            quantize,
            loss: "forward-kl".into(),
            temperature: 1.0,
            alpha: 0.0,
            freeze: None,
            learn_scales: true,
            train: TrainKeys::default(),
        }
    }

    pub fn resolve(&self) -> Result<ResolvedQat> {
        let quantize = self.quantize.resolve()?;
        let distill = DistillRequest {
            loss: self.loss.clone(),
            temperature: self.temperature,
            alpha: self.alpha,
            train: self.train.clone(),
            ..DistillRequest::default()
        }
        .resolve()?;
        let defaults = shrink_quant::qat::QatJob::default();
        let job = shrink_quant::qat::QatJob {
            train: distill.job.train,
            loss: distill.job.loss,
            frozen: self.freeze.clone().unwrap_or(defaults.frozen),
            activations: quantize.plan.activations.clone(),
            learn_scales: self.learn_scales,
        };
        Ok(ResolvedQat {
            quantize,
            job,
            seq_len: self.train.seq_len,
            eval_windows: self.train.eval_windows,
        })
    }
}

/// A QAT request with every choice made.
#[derive(Debug, Clone)]
pub struct ResolvedQat {
    pub quantize: crate::ResolvedQuantize,
    pub job: shrink_quant::qat::QatJob,
    pub seq_len: usize,
    pub eval_windows: usize,
}

/// Quantizes `model` (the initial codes, e.g. GPTQ on `calibration`), trains it with QAT against
/// the unquantized model on `train`, and writes the packed result to `out`. On return `model`
/// holds the trained quantized values.
#[allow(clippy::too_many_arguments)]
pub fn qat_and_write(
    checkpoint: &Checkpoint,
    model: &mut Transformer,
    resolved: &ResolvedQat,
    calibration: Option<&[Vec<u32>]>,
    batch: usize,
    train: &[Vec<u32>],
    eval: &[Vec<u32>],
    workdir: &Path,
    fingerprint: &str,
    out: &Path,
    progress: &dyn Progress,
) -> Result<(crate::QuantizeOutcome, TrainOutcome)> {
    shrink_io::check_export(checkpoint, model.arch, resolved.quantize.export)?;
    let teacher = model.clone();
    let q = &resolved.quantize;
    let initial =
        shrink_quant::quantize_model(model, q.method, &q.plan, calibration, batch, progress)?;
    let (trained, result, training) = shrink_quant::qat::qat(
        &teacher,
        model,
        &initial,
        &resolved.job,
        train,
        eval,
        Some(workdir),
        fingerprint,
        progress,
    )?;
    *model = trained;
    let mut outcome = crate::quantize::write_quantized(checkpoint, model, &result, q, out)?;
    outcome.method = format!(
        "QAT ({} steps) from {}",
        resolved.job.train.steps, outcome.method
    );
    Ok((outcome, training))
}

/// The `quantize.qat` stage: what a quantization writes, GPTQ's (or RTN's) start, the training
/// keys and its own.
pub(crate) struct QatStage;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct QatKeys {
    /// Learn the scales (LSQ) [default: true].
    learn_scales: Option<bool>,
}

impl StageType for QatStage {
    fn keys(&self, _kind: StageKind) -> Vec<&'static str> {
        [
            fields::<FormatKeys>(),
            &["damp", "act_order", "weights"],
            fields::<TrainingKeys>(),
            fields::<QatKeys>(),
        ]
        .concat()
    }

    fn job(&self, kind: StageKind, keys: &mut KeyReader) -> JobResult {
        let training: TrainingKeys = keys.take()?;
        let own: QatKeys = keys.take()?;
        training.check()?;
        let (format, method, preset) = take_quantize_keys(keys)?;
        let d = distill_request(&training, Default::default());
        Ok(StageJob::Qat(QatRequest {
            loss: d.loss,
            temperature: d.temperature,
            alpha: d.alpha,
            freeze: training.freeze,
            learn_scales: own.learn_scales.unwrap_or(true),
            train: d.train,
            ..QatRequest::new(whole(quantize_request(kind, &format, preset, &method))?)
        }))
    }
}

impl Job for QatRequest {
    fn plan(&self) -> Result<(bool, Export)> {
        self.resolve()
            .map(|r| (r.quantize.calibrates, r.quantize.export))
    }

    fn trains(&self) -> bool {
        true
    }

    fn memory(&self, sizes: &ModelSizes) -> JobMemory {
        training_memory(&self.train, sizes)
    }

    fn run(&self, cx: &StageContext, model: &mut Transformer, out: &Path) -> Result<StageResult> {
        let resolved = self.resolve()?;
        let [train, eval] = cx.windows(resolved.seq_len, resolved.eval_windows)?;
        let (outcome, log) = qat_and_write(
            cx.checkpoint,
            model,
            &resolved,
            cx.calibration,
            self.quantize.batch,
            &train,
            &eval,
            cx.workdir,
            cx.key,
            out,
            cx.progress,
        )?;
        Ok(StageResult {
            training: Some(log),
            ..quantized_result(outcome)
        })
    }
}

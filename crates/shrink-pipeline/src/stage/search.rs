//! The `search` stage: per-tensor sensitivity (cached across runs), a budget-driven allocation of
//! one format per tensor, and its verification by quantizing the whole mix for real and
//! measuring it, refined until it converges or the time budget runs out. The best model found is
//! always written, and the stage says whether it meets the budget.

use super::quantize::quantized_result;
use super::StageType;
use super::{check_damp, check_weights, whole, Job, JobMemory, ModelSizes};
use super::{Compress, JobInput, JobResult, StageContext, StageJob, StageKind, StageResult};
use crate::config::{fields, KeyReader};
use crate::quantize::{Export, QuantMethod, QuantizeOutcome, QuantizeRequest};
use crate::{PipelineError, Result};
use serde::{Deserialize, Serialize};
use shrink_core::Progress;
use shrink_io::{Checkpoint, QuantizedBlocks};
use shrink_models::Transformer;
use shrink_quant::Format;
use shrink_search::{
    Goal, Item, Limits, Measure, Measurement, Scorer, SearchOutcome, SensitivityConfig, Verifier,
    EMBEDDINGS,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `[stage.budget]`: one target (size, bits per weight or perplexity increase) and the time the
/// verification may take.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BudgetKeys {
    /// The whole GGUF file, in MB (10⁶ bytes).
    #[serde(default)]
    pub max_size_mb: Option<f64>,
    /// Bits per weight over the searched tensors (the block linears, and the embedding when
    /// searched).
    #[serde(default)]
    pub target_bpw: Option<f64>,
    /// The perplexity increase over the input model on held-out calibration windows, in percent.
    #[serde(default)]
    pub max_ppl_increase_pct: Option<f64>,
    /// No verification round starts after this many minutes of verification, counted once the
    /// sensitivity table is ready (the first round always runs).
    #[serde(default)]
    pub time_budget_min: Option<f64>,
    /// At most this many verified rounds [default: 6].
    #[serde(default)]
    pub rounds: Option<usize>,
}

impl BudgetKeys {
    /// Checks that exactly one target is set and every value is in range.
    pub fn check(&self) -> std::result::Result<(), String> {
        let targets = [
            self.max_size_mb.is_some(),
            self.target_bpw.is_some(),
            self.max_ppl_increase_pct.is_some(),
        ];
        if targets.iter().filter(|&&t| t).count() != 1 {
            return Err(
                "[stage.budget] needs exactly one of max_size_mb, target_bpw, max_ppl_increase_pct"
                    .into(),
            );
        }
        for (key, v) in [
            ("max_size_mb", self.max_size_mb),
            ("target_bpw", self.target_bpw),
            ("max_ppl_increase_pct", self.max_ppl_increase_pct),
            ("time_budget_min", self.time_budget_min),
        ] {
            if let Some(v) = v {
                if !v.is_finite() || v <= 0.0 {
                    return Err(format!("budget.{key} = {v}: expected a positive number"));
                }
            }
        }
        if self.target_bpw.is_some_and(|b| b > 32.0) {
            return Err("budget.target_bpw: expected at most 32 bits per weight".into());
        }
        if let Some(r) = self.rounds.filter(|r| !(1..=1000).contains(r)) {
            return Err(format!("budget.rounds = {r}: expected 1 to 1000"));
        }
        Ok(())
    }
}

/// What a `search` stage does.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SearchRequest {
    /// Candidate block types of the linears.
    pub formats: Vec<String>,
    /// Candidate block types of the token embedding (and an untied head); empty: `embeddings`.
    pub embedding_formats: Vec<String>,
    /// The fixed embedding type when it is not searched.
    pub embeddings: String,
    /// `gptq` or `rtn`: how the codes are chosen, in the sensitivity and in the verified mix.
    pub method: QuantMethod,
    pub damp: f64,
    pub act_order: bool,
    pub measure: Measure,
    pub budget: BudgetKeys,
}

/// The default candidates: llama.cpp's block types from 8 down to 2 bits.
pub const DEFAULT_FORMATS: &[&str] = &[
    "q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0", "q3_k", "q2_k",
];

impl SearchRequest {
    fn parse_all(names: &[String], key: &str) -> Result<Vec<Format>> {
        let mut out: Vec<Format> = Vec::new();
        for n in names {
            let f = Format::parse(n.strip_prefix("gguf:").unwrap_or(n))
                .map_err(|e| PipelineError::Invalid(format!("{key}: {e}")))?;
            if f.ggml_type().is_none() {
                return Err(PipelineError::Invalid(format!(
                    "{key}: `{n}` is not a GGUF block type (the search writes GGUF)"
                )));
            }
            if !out.contains(&f) {
                out.push(f);
            }
        }
        if out.is_empty() {
            return Err(PipelineError::Invalid(format!("{key} is empty")));
        }
        Ok(out)
    }

    /// The sensitivity configuration this request describes.
    pub fn sensitivity_config(&self) -> Result<SensitivityConfig> {
        // The fixed embedding type must be one the writer knows.
        self.quantize(&[], &self.embeddings).resolve()?;
        Ok(SensitivityConfig {
            formats: Self::parse_all(&self.formats, "formats")?,
            embeddings: if self.embedding_formats.is_empty() {
                Vec::new()
            } else {
                Self::parse_all(&self.embedding_formats, "embedding_formats")?
            },
            method: self.quantize(&[], "q8_0").resolve()?.method,
            measure: self.measure,
        })
    }

    /// The quantization of one mix: every linear named with its type.
    fn quantize(&self, linears: &[(String, String)], embeddings: &str) -> QuantizeRequest {
        QuantizeRequest {
            method: Some(self.method),
            format: Some(
                linears
                    .first()
                    .map_or_else(|| "q8_0".to_string(), |l| l.1.clone()),
            ),
            overrides: linears.to_vec(),
            embeddings: Some(embeddings.to_string()),
            damp: self.damp,
            act_order: self.act_order,
            ..QuantizeRequest::default()
        }
    }
}

/// The stage's summary in its record and the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SearchSummary {
    pub outcome: SearchOutcome,
    /// Bytes besides the searched tensors (metadata, vocabulary, norms).
    pub fixed_bytes: u64,
    /// Each searched tensor's options as measured (the sensitivity table).
    pub sensitivity: Vec<Item>,
    /// Whether the sensitivity came from the cache.
    pub sensitivity_cached: bool,
    pub sensitivity_s: f64,
    pub windows: [usize; 2],
    pub window_tokens: usize,
    /// Weights in the searched tensors (for bits per weight).
    pub searched_weights: u64,
}

impl SearchSummary {
    /// The report's view: every round with its bits per weight, types and Pareto status, and the
    /// sensitivity of each tensor in the cheapest format all of them share.
    pub fn section(&self, stage: &str) -> crate::report::SearchSection {
        let o = &self.outcome;
        let goal = match o.goal {
            Goal::MaxSize(b) => format!("file ≤ {:.2} MB", b as f64 / 1e6),
            Goal::MaxPplIncrease(p) => format!("perplexity increase ≤ {p}%"),
        };
        let rounds = o
            .tried
            .iter()
            .map(|t| {
                let mut types = BTreeMap::new();
                for c in &t.choices {
                    *types.entry(c.clone()).or_insert(0) += 1;
                }
                let pareto = !o.tried.iter().any(|u| {
                    u.size_bytes <= t.size_bytes
                        && u.score.kl <= t.score.kl
                        && (u.size_bytes < t.size_bytes || u.score.kl < t.score.kl)
                });
                crate::report::SearchRound {
                    round: t.round,
                    size_bytes: t.size_bytes,
                    bits_per_weight: 8.0 * t.size_bytes.saturating_sub(self.fixed_bytes) as f64
                        / self.searched_weights.max(1) as f64,
                    predicted_kl: t.predicted_kl,
                    kl: t.score.kl,
                    ppl_increase_pct: t.score.ppl_increase_pct,
                    types,
                    met: t.met,
                    pareto,
                }
            })
            .collect();
        // The cheapest format every tensor has, else each tensor's smallest option.
        let shared = self.sensitivity.first().map_or(Vec::new(), |first| {
            first
                .choices
                .iter()
                .filter(|c| {
                    self.sensitivity
                        .iter()
                        .all(|it| it.choices.iter().any(|d| d.name == c.name))
                })
                .map(|c| c.name.clone())
                .collect()
        });
        let total = |name: &str| -> u64 {
            self.sensitivity
                .iter()
                .filter_map(|it| it.choices.iter().find(|c| c.name == name))
                .map(|c| c.size_bytes)
                .sum()
        };
        let format = shared.iter().min_by_key(|n| total(n)).cloned();
        let sensitivity = self
            .sensitivity
            .iter()
            .map(|it| {
                let c = match &format {
                    Some(f) => it.choices.iter().find(|c| &c.name == f),
                    None => it.choices.iter().min_by_key(|c| c.size_bytes),
                };
                (it.name.clone(), c.map_or(f64::NAN, |c| c.loss))
            })
            .collect();
        crate::report::SearchSection {
            stage: stage.to_string(),
            goal,
            met: o.met,
            stopped: o.stopped.clone(),
            best_round: o.best,
            rounds,
            sensitivity_cached: self.sensitivity_cached,
            sensitivity_s: self.sensitivity_s,
            sensitivity_format: format.unwrap_or_else(|| "each tensor's smallest option".into()),
            sensitivity,
        }
    }
}

fn hash_hex(value: &serde_json::Value) -> String {
    shrink_core::sha256_hex(value.to_string().as_bytes())
}

/// Runs the search on `model` (built from `checkpoint`, whose identity is `input_key`) and writes
/// the best mix to `out`. The calibration windows are split: the first half (up to 8, cut to 256
/// tokens) measures the sensitivity, the second half (as many) scores the verified mixes; GPTQ
/// calibrates on all of them.
#[allow(clippy::too_many_arguments)]
pub fn search_and_write(
    checkpoint: &Checkpoint,
    model: &Transformer,
    input_key: &str,
    request: &SearchRequest,
    windows: &[Vec<u32>],
    batch: usize,
    out: &Path,
    progress: &dyn Progress,
) -> Result<(QuantizeOutcome, SearchSummary)> {
    if model.arch.is_encoder() {
        return Err(PipelineError::Invalid(
            "the search scores next-token predictions: it runs on decoders".into(),
        ));
    }
    if windows.len() < 2 {
        return Err(PipelineError::Invalid(
            "the search needs at least 2 calibration windows (data.samples)".into(),
        ));
    }
    if windows
        .iter()
        .any(|w| w.len() != windows[0].len() || w.len() < 4)
    {
        return Err(PipelineError::Invalid(
            "the search needs calibration windows of one length, at least 4 tokens".into(),
        ));
    }
    let half = (windows.len() / 2).min(8);
    let tokens = windows[0].len().min(256);
    let cut =
        |ws: &[Vec<u32>]| -> Vec<Vec<u32>> { ws.iter().map(|w| w[..tokens].to_vec()).collect() };
    let sens_windows = cut(&windows[..half]);
    let verify_windows = cut(&windows[half..2 * half]);
    // GPTQ of each verified mix calibrates on every window but the held-out ones it is scored on.
    let gptq_windows: Vec<Vec<u32>> = windows[..half]
        .iter()
        .chain(&windows[2 * half..])
        .cloned()
        .collect();
    let config = request.sensitivity_config()?;

    // The sensitivity table, cached by everything it depends on.
    let key = hash_hex(&serde_json::json!({
        "shrink": env!("CARGO_PKG_VERSION"), "input": input_key, "formats": request.formats,
        "embeddings": config.embeddings.iter().map(Format::label).collect::<Vec<_>>(),
        "method": request.method, "damp": request.damp, "act_order": request.act_order,
        "measure": request.measure, "windows": sens_windows,
    }));
    // Best effort: without a cache folder the table is measured every time.
    let cache = shrink_core::cache_dir()
        .ok()
        .map(|d| d.join("sensitivity").join(format!("{key}.json")));
    let start = Instant::now();
    let cached: Option<Vec<Item>> = cache
        .as_ref()
        .and_then(|c| std::fs::read(c).ok())
        .and_then(|b| serde_json::from_slice(&b).ok());
    let sensitivity_cached = cached.is_some();
    let items = match cached {
        Some(items) => items,
        None => {
            let items = shrink_search::sensitivity(model, &sens_windows, &config, progress)?;
            if let (Some(c), Ok(json)) = (&cache, serde_json::to_vec(&items)) {
                let _ = shrink_core::atomic_write(c, &json);
            }
            items
        }
    };
    let sensitivity_s = start.elapsed().as_secs_f64();
    let items = merge_stacked(model, items);

    let fixed_bytes = fixed_bytes(checkpoint, model, &items, &request.embeddings, out)?;
    let searched_weights = searched_weights(model, &items)?;
    let b = &request.budget;
    let goal = match (b.max_size_mb, b.target_bpw, b.max_ppl_increase_pct) {
        (Some(mb), _, _) => Goal::MaxSize((mb * 1e6).floor() as u64),
        (_, Some(bpw), _) => Goal::MaxSize(
            fixed_bytes.saturating_add((bpw * searched_weights as f64 / 8.0).floor() as u64),
        ),
        (_, _, Some(pct)) => Goal::MaxPplIncrease(pct),
        _ => return Err(PipelineError::Invalid("the budget has no target".into())),
    };
    let limits = Limits {
        // The clock starts once the table is ready, cached or not.
        deadline: b.time_budget_min.and_then(|m| {
            Duration::try_from_secs_f64(m * 60.0)
                .ok()
                .and_then(|d| Instant::now().checked_add(d))
        }),
        max_rounds: b.rounds.unwrap_or(6),
    };
    let scorer = Scorer::new(model, &verify_windows)?;
    let mut verifier = StageVerifier {
        checkpoint,
        model,
        request,
        windows: &gptq_windows,
        batch,
        scorer,
        out,
        outcomes: BTreeMap::new(),
        progress,
    };
    let outcome = shrink_search::refine(&items, fixed_bytes, goal, &limits, &mut verifier);
    // Round files not kept; on an error, the kept one too.
    for round in 0..=verifier.outcomes.len() {
        let _ = std::fs::remove_file(verifier.candidate(round));
    }
    let outcome = outcome.inspect_err(|_| {
        let _ = std::fs::remove_file(out);
    })?;
    let quantized = verifier
        .outcomes
        .remove(&outcome.best)
        .ok_or_else(|| PipelineError::Invalid("the search verified no allocation".into()))?;
    Ok((
        quantized,
        SearchSummary {
            outcome,
            fixed_bytes,
            sensitivity: items,
            sensitivity_cached,
            sensitivity_s,
            windows: [sens_windows.len(), verify_windows.len()],
            window_tokens: tokens,
            searched_weights,
        },
    ))
}

/// The weight names an item stands for: the embedding and an untied head, or the linears joined
/// by `+` (GPT-2's q, k and v, stored as one tensor).
fn tensor_names(model: &Transformer, item: &Item) -> Vec<String> {
    if item.name == EMBEDDINGS {
        vec![model.embedding_name(), "lm_head.weight".into()]
    } else {
        item.name
            .split('+')
            .map(|n| format!("{n}.weight"))
            .collect()
    }
}

/// Linears a checkpoint stores as one GGUF tensor (GPT-2's q, k and v) must share a type: their
/// items become one named `q+k+v`, whose options are the formats all of them have, with sizes and
/// losses summed.
fn merge_stacked(model: &Transformer, mut items: Vec<Item>) -> Vec<Item> {
    for (_, sources) in model.stacked_weights() {
        if sources.len() < 2 {
            continue;
        }
        let names: Vec<&str> = sources
            .iter()
            .map(|s| s.strip_suffix(".weight").unwrap_or(s))
            .collect();
        let Some(at) = items.iter().position(|it| it.name == names[0]) else {
            continue;
        };
        let members: Vec<Item> = names
            .iter()
            .filter_map(|n| items.iter().find(|it| it.name == *n).cloned())
            .collect();
        if members.len() != names.len() {
            continue;
        }
        let choices = members[0]
            .choices
            .iter()
            .filter_map(|c| {
                let all: Vec<&shrink_search::Choice> = members
                    .iter()
                    .filter_map(|m| m.choices.iter().find(|d| d.name == c.name))
                    .collect();
                (all.len() == members.len()).then(|| {
                    shrink_search::Choice::new(
                        &c.name,
                        all.iter().map(|d| d.size_bytes).sum(),
                        all.iter().map(|d| d.loss).sum(),
                    )
                })
            })
            .collect();
        items[at] = Item::new(&names.join("+"), choices);
        items.retain(|it| !names[1..].contains(&it.name.as_str()));
    }
    items
}

/// The weights of the searched tensors.
fn searched_weights(model: &Transformer, items: &[Item]) -> Result<u64> {
    let tensors = model.named_tensors();
    Ok(items
        .iter()
        .flat_map(|it| tensor_names(model, it))
        .filter_map(|n| tensors.get(&n).map(|t| t.elem_count() as u64))
        .sum())
}

/// The file's bytes besides the searched tensors: a probe GGUF with every searched tensor as
/// zero-filled Q8_0 blocks, less those blocks. Tensor types take a fixed number of header bytes,
/// so this is exact for any mix.
fn fixed_bytes(
    checkpoint: &Checkpoint,
    model: &Transformer,
    items: &[Item],
    embeddings: &str,
    out: &Path,
) -> Result<u64> {
    let tensors = model.named_tensors();
    let mut blocks = BTreeMap::new();
    let mut fixed_blocks = BTreeMap::new();
    // An embedding that is not searched is written in its fixed type: part of the fixed bytes.
    let mut weight_type = shrink_io::GgufWriteType::F32;
    if !items.iter().any(|it| it.name == EMBEDDINGS) {
        match embeddings {
            "f32" => {}
            "f16" => weight_type = shrink_io::GgufWriteType::F16,
            t => {
                let dtype = Format::parse(t.strip_prefix("gguf:").unwrap_or(t))?
                    .ggml_type()
                    .ok_or_else(|| {
                        PipelineError::Invalid(format!(
                            "embeddings: `{t}` is not a GGUF block type"
                        ))
                    })?;
                for name in [model.embedding_name(), "lm_head.weight".into()] {
                    let Some(t) = tensors.get(&name) else {
                        continue;
                    };
                    let cols = t.dims().last().copied().unwrap_or(0);
                    if !cols.is_multiple_of(dtype.block_size()) {
                        return Err(PipelineError::Invalid(format!(
                            "embeddings: {embeddings} blocks of {} do not divide the {cols}-long rows of '{name}'",
                            dtype.block_size()
                        )));
                    }
                    let bytes = t.elem_count() / dtype.block_size() * dtype.type_size();
                    fixed_blocks.insert(
                        name,
                        QuantizedBlocks {
                            dtype,
                            bytes: vec![0u8; bytes],
                        },
                    );
                }
            }
        }
    }
    for name in items.iter().flat_map(|it| tensor_names(model, it)) {
        let Some(t) = tensors.get(&name) else {
            continue;
        };
        let bytes = t.elem_count() / 32 * 34;
        blocks.insert(
            name,
            QuantizedBlocks {
                dtype: candle_core::quantized::GgmlDType::Q8_0,
                bytes: vec![0u8; bytes],
            },
        );
    }
    // Stacked weights are written as one tensor, as the quantized writer stacks them.
    for (stored, sources) in model.stacked_weights() {
        if sources.len() > 1 && sources.iter().all(|s| blocks.contains_key(s)) {
            let bytes = sources
                .iter()
                .filter_map(|s| blocks.remove(s))
                .flat_map(|b| b.bytes)
                .collect();
            blocks.insert(
                stored,
                QuantizedBlocks {
                    dtype: candle_core::quantized::GgmlDType::Q8_0,
                    bytes,
                },
            );
        }
    }
    let searched: u64 = blocks
        .values()
        .map(|b| shrink_search::gguf_bytes(b.bytes.len()))
        .sum();
    blocks.extend(fixed_blocks);
    let probe = out.with_extension("probe.gguf");
    let quantized = Checkpoint {
        tensors: model.checkpoint_tensors()?.into(),
        ..checkpoint.clone()
    };
    shrink_io::write_llama_gguf(&quantized, &probe, weight_type, &blocks)?;
    let size = std::fs::metadata(&probe)
        .map_err(|e| PipelineError::Invalid(format!("{}: {e}", probe.display())))?
        .len();
    std::fs::remove_file(&probe)
        .map_err(|e| PipelineError::Invalid(format!("{}: {e}", probe.display())))?;
    Ok(size.saturating_sub(searched))
}

struct StageVerifier<'a> {
    checkpoint: &'a Checkpoint,
    model: &'a Transformer,
    request: &'a SearchRequest,
    windows: &'a [Vec<u32>],
    batch: usize,
    scorer: Scorer,
    out: &'a Path,
    outcomes: BTreeMap<usize, QuantizeOutcome>,
    progress: &'a dyn Progress,
}

impl StageVerifier<'_> {
    fn candidate(&self, round: usize) -> PathBuf {
        self.out.with_extension(format!("round{round}.gguf"))
    }
}

impl Verifier for StageVerifier<'_> {
    fn measure(
        &mut self,
        round: usize,
        items: &[Item],
        choices: &[usize],
    ) -> shrink_search::Result<Measurement> {
        let wrap = |e: PipelineError| shrink_search::SearchError::Input(e.to_string());
        // The previous round's file, unless it was kept.
        if round > 0 {
            let _ = std::fs::remove_file(self.candidate(round - 1));
        }
        let mut linears = Vec::new();
        let mut embeddings = self.request.embeddings.clone();
        for (item, &c) in items.iter().zip(choices) {
            let format = item.choices[c].name.clone();
            if item.name == EMBEDDINGS {
                embeddings = format;
            } else {
                for linear in item.name.split('+') {
                    linears.push((linear.to_string(), format.clone()));
                }
            }
        }
        let resolved = self
            .request
            .quantize(&linears, &embeddings)
            .resolve()
            .map_err(wrap)?;
        let path = self.candidate(round);
        let mut model = self.model.clone();
        let input = JobInput {
            checkpoint: self.checkpoint,
            windows: Some(self.windows),
            batch: self.batch,
            world: &shrink_core::Alone,
            keep: Default::default(),
            progress: self.progress,
        };
        let outcome = resolved.write(&input, &mut model, &path).map_err(wrap)?;
        // The model as written, read back: what llama.cpp will run.
        let written = shrink_io::load(&path).map_err(|e| wrap(e.into()))?;
        let back = crate::build_model(&written, candle_core::DType::F32).map_err(wrap)?;
        let score = self
            .scorer
            .score(&back)
            .map_err(|e| shrink_search::SearchError::Input(format!("{}: {e}", path.display())))?;
        let size_bytes = std::fs::metadata(&path)
            .map_err(|e| shrink_search::SearchError::Input(format!("{}: {e}", path.display())))?
            .len();
        let errors = outcome
            .layers
            .iter()
            .filter_map(|l| l.relative_output_error.map(|e| (l.name.clone(), e)))
            .collect();
        self.outcomes.insert(round, outcome);
        Ok(Measurement {
            size_bytes,
            score,
            errors,
        })
    }

    fn keep(&mut self, round: usize) -> shrink_search::Result<()> {
        let from = self.candidate(round);
        std::fs::rename(&from, self.out).map_err(|e| {
            shrink_search::SearchError::Input(format!(
                "moving {} to {}: {e}",
                from.display(),
                self.out.display()
            ))
        })
    }
}

/// The `search` stage.
pub(crate) struct SearchStage;

/// A `search` stage's keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchKeys {
    /// The candidate block types of the linears.
    formats: Option<Vec<String>>,
    /// The candidate block types of the token embedding (unset: `embeddings`, fixed).
    embedding_formats: Option<Vec<String>>,
    /// The token embedding's block type when it is not searched.
    embeddings: Option<String>,
    /// `scaled` (one KL per linear, scaled by output error) or `every` format measured.
    sensitivity: Option<String>,
    /// How the candidates' codes are picked: `gptq` or `rtn`.
    weights: Option<String>,
    damp: Option<f64>,
    act_order: Option<bool>,
    /// The target and the time budget (`[stage.budget]`).
    budget: Option<BudgetKeys>,
}

impl StageType for SearchStage {
    fn keys(&self, _kind: StageKind) -> Vec<&'static str> {
        fields::<SearchKeys>().to_vec()
    }

    fn job(&self, _kind: StageKind, keys: &mut KeyReader) -> JobResult {
        let k: SearchKeys = keys.take()?;
        check_damp(k.damp)?;
        check_weights(&k.weights)?;
        k.budget
            .as_ref()
            .ok_or((
                None,
                "a search stage needs a [stage.budget] table".to_string(),
            ))?
            .check()
            .map_err(|e| (Some("budget"), e))?;
        let request = whole(search_request(k))?;
        whole(request.sensitivity_config())?;
        Ok(StageJob::Search(request))
    }
}

fn search_request(s: SearchKeys) -> Result<SearchRequest> {
    let defaults = QuantizeRequest::default();
    Ok(SearchRequest {
        formats: s
            .formats
            .unwrap_or_else(|| DEFAULT_FORMATS.iter().map(|f| f.to_string()).collect()),
        embedding_formats: s.embedding_formats.unwrap_or_default(),
        embeddings: s.embeddings.unwrap_or_else(|| "q8_0".into()),
        method: s
            .weights
            .as_deref()
            .map(QuantMethod::parse)
            .transpose()?
            .unwrap_or(QuantMethod::Gptq),
        damp: s.damp.unwrap_or(defaults.damp),
        act_order: s.act_order.unwrap_or(defaults.act_order),
        measure: match s.sensitivity.as_deref() {
            None | Some("scaled") => Measure::Scaled,
            Some("every") => Measure::Every,
            Some(other) => {
                return Err(PipelineError::Invalid(format!(
                    "sensitivity `{other}` is not one of: scaled, every"
                )))
            }
        },
        budget: s.budget.unwrap_or_default(),
    })
}

impl Job for SearchRequest {
    fn plan(&self) -> Result<(bool, Export)> {
        self.sensitivity_config().map(|_| (true, Export::Gguf))
    }

    /// A search holds a quantized copy of the model and the model read back from its file, and
    /// the reference and a candidate's log-probabilities (and their exponentials) on 1024 scored
    /// positions at a time.
    fn memory(&self, m: &ModelSizes) -> JobMemory {
        JobMemory {
            with_calibration: 2 * m.parameters * 4 + 4 * 1024 * m.vocab * 4,
            ..JobMemory::default()
        }
    }

    fn run(&self, cx: &StageContext, model: &mut Transformer, out: &Path) -> Result<StageResult> {
        let windows = cx.calibration.ok_or_else(|| {
            PipelineError::Invalid("a search stage needs calibration windows".into())
        })?;
        let (outcome, summary) = search_and_write(
            cx.checkpoint,
            model,
            cx.input_key,
            self,
            windows,
            QuantizeRequest::default().batch,
            out,
            cx.progress,
        )?;
        Ok(StageResult {
            search: Some(summary),
            ..quantized_result(outcome)
        })
    }
}

//! The `search` stage: per-tensor sensitivity (cached across runs), a budget-driven allocation of
//! one format per tensor, and its verification by quantizing the whole mix for real and
//! measuring it, refined until it converges or the time budget runs out. The best model found is
//! always written, and the stage says whether it meets the budget.

use super::quantize::quantized_result;
use super::StageType;
use super::{check_blend, check_damp, check_weights, whole, Job, JobMemory, ModelSizes};
use super::{Compress, JobInput, JobResult, StageContext, StageJob, StageKind, StageResult};
use crate::config::{fields, KeyReader};
use crate::quantize::{Export, QuantMethod, QuantizeOutcome, QuantizeRequest};
use crate::{PipelineError, Result};
use candle_core::DType;
use serde::{Deserialize, Serialize};
use shrink_io::Checkpoint;
use shrink_models::{ModelConfig, Transformer};
use shrink_quant::Format;
use shrink_search::{
    sensitivity, Goal, Item, Limits, Measure, Measurement, Scorer, SearchOutcome,
    SensitivityConfig, Verifier, EMBEDDINGS,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use verify::StageVerifier;

mod verify;

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
    /// GPTQ's Hessian blended toward its diagonal, in the sensitivity and the verified mix.
    pub blend: f64,
    pub measure: Measure,
    pub budget: BudgetKeys,
}

/// The default candidates: llama.cpp's block types from 8 down to 2 bits, legacy, k- and i-quants
/// (a type whose blocks do not divide a linear's rows is not a candidate for it).
pub const DEFAULT_FORMATS: &[&str] = &[
    "q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "iq4_xs", "iq4_nl", "q4_1", "q4_0", "q3_k",
    "iq3_s", "iq3_xxs", "q2_k", "iq2_s", "iq2_xs", "iq2_xxs",
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
            blend: Some(self.blend),
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

/// Of `windows` calibration windows of `len` tokens, how many measure the sensitivity (as many
/// again score the verified mixes) and their tokens.
fn scored_windows(windows: usize, len: usize) -> (usize, usize) {
    ((windows / 2).min(8), len.min(256))
}

fn hash_hex(value: &serde_json::Value) -> String {
    shrink_core::sha256_hex(value.to_string().as_bytes())
}

/// The model a search reads: held whole (built from its checkpoint), or read block by block from
/// the checkpoint, with the same results.
#[derive(Clone, Copy)]
pub enum SearchInput<'a> {
    Whole(&'a Transformer),
    BlockByBlock,
}

impl SearchInput<'_> {
    fn config(&self, checkpoint: &Checkpoint) -> Result<ModelConfig> {
        Ok(match self {
            SearchInput::Whole(m) => m.config.clone(),
            SearchInput::BlockByBlock => ModelConfig::from_json(&checkpoint.config)?,
        })
    }
}

/// Runs the search on `input` (from `job.checkpoint`, whose identity is `input_key`) and writes
/// the best mix to `out`. The calibration windows (`job.windows`) are split: the first half (up to
/// 8, cut to 256 tokens) measures the sensitivity, the second half (as many) scores the verified
/// mixes; GPTQ calibrates on every window but the scored ones. The sensitivity table is read from and written to
/// `cache`, a folder, when given. With several ranks (`job.world`), the sensitivity's tensors and
/// the verified GPTQ's windows are split across them; rank 0 writes, scores and shares the
/// scores.
pub fn search_and_write(
    job: &JobInput,
    input: SearchInput,
    input_key: &str,
    cache: Option<&Path>,
    request: &SearchRequest,
    out: &Path,
) -> Result<(QuantizeOutcome, SearchSummary)> {
    let (checkpoint, world, progress) = (job.checkpoint, job.world, job.progress);
    if world.size() > 1 && matches!(input, SearchInput::Whole(_)) {
        return Err(PipelineError::Invalid(
            "a search splits across ranks only when it reads its model block by block".into(),
        ));
    }
    let windows = job
        .windows
        .ok_or_else(|| PipelineError::Invalid("a search stage needs calibration windows".into()))?;
    let model_config = input.config(checkpoint)?;
    if model_config.arch()?.is_encoder() {
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
    let (half, tokens) = scored_windows(windows.len(), windows[0].len());
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
        "blend": request.blend,
        "measure": request.measure, "windows": sens_windows,
    }));
    // Best effort: without a cache folder the table is measured every time.
    let cache = cache.map(|d| d.join(format!("{key}.json")));
    let start = Instant::now();
    let root = world.rank() == 0;
    // Rank 0 reads the cache and tells the others what it found.
    let cached: Option<Vec<Item>> = cache
        .as_ref()
        .filter(|_| root)
        .and_then(|c| std::fs::read(c).ok())
        .and_then(|b| serde_json::from_slice(&b).ok());
    let cached = shrink_core::share_json(world, 0, Some(&cached))?;
    let sensitivity_cached = cached.is_some();
    let items = match cached {
        Some(items) => items,
        None => {
            let items = match input {
                SearchInput::Whole(m) => {
                    sensitivity(&mut m.clone(), &sens_windows, &config, world, progress)?
                }
                SearchInput::BlockByBlock => sensitivity(
                    &mut checkpoint.streamed(DType::F32)?,
                    &sens_windows,
                    &config,
                    world,
                    progress,
                )?,
            };
            if let (Some(c), Ok(json), true) = (&cache, serde_json::to_vec(&items), root) {
                let _ = shrink_core::atomic_write(c, &json);
            }
            items
        }
    };
    let sensitivity_s = start.elapsed().as_secs_f64();
    let items = merge_stacked(&model_config, items);
    // What a verified mix's file holds, planned before any data.
    let written = match input {
        SearchInput::Whole(m) => Checkpoint {
            tensors: m.checkpoint_tensors()?.into(),
            ..checkpoint.clone()
        },
        SearchInput::BlockByBlock => checkpoint.clone(),
    };
    let fixed_bytes = fixed_bytes(&written, &model_config, &items, &request.embeddings, out)?;
    let searched_weights = searched_weights(&model_config, &items);
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
    // Rank 0 scores the verified mixes.
    let scorer = match input {
        _ if !root => None,
        SearchInput::Whole(m) => Some(Scorer::new(&mut m.clone(), &verify_windows)?),
        SearchInput::BlockByBlock => Some(Scorer::new(
            &mut checkpoint.streamed(DType::F32)?,
            &verify_windows,
        )?),
    };
    let mut verifier = StageVerifier {
        job: JobInput {
            windows: Some(&gptq_windows),
            ..*job
        },
        input,
        request,
        scorer,
        out,
        outcomes: BTreeMap::new(),
    };
    let outcome = shrink_search::refine(&items, fixed_bytes, goal, &limits, &mut verifier);
    // Round files not kept; on an error, the kept one too.
    if root {
        for round in 0..=verifier.outcomes.len() {
            let _ = std::fs::remove_file(verifier.candidate(round));
        }
    }
    let outcome = outcome.inspect_err(|_| {
        if root {
            let _ = std::fs::remove_file(out);
        }
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
fn tensor_names(config: &ModelConfig, item: &Item) -> Vec<String> {
    if item.name == EMBEDDINGS {
        vec![config.embedding_name(), "lm_head.weight".into()]
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
fn merge_stacked(config: &ModelConfig, mut items: Vec<Item>) -> Vec<Item> {
    for (_, sources) in config.stacked_weights() {
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

/// The model's weights by name (GPT-2's q, k and v apart), with their shapes.
fn shapes(config: &ModelConfig) -> BTreeMap<String, Vec<usize>> {
    config.expected_tensors().into_iter().collect()
}

/// The weights of the searched tensors.
fn searched_weights(config: &ModelConfig, items: &[Item]) -> u64 {
    let shapes = shapes(config);
    items
        .iter()
        .flat_map(|it| tensor_names(config, it))
        .filter_map(|n| shapes.get(&n).map(|s| s.iter().product::<usize>() as u64))
        .sum()
}

/// The file's bytes besides the searched tensors: the size of the GGUF of `written` planned with
/// every searched tensor in Q8_0, less those tensors' bytes. Tensor types take a fixed number of
/// header bytes, so this is exact for any mix.
fn fixed_bytes(
    written: &Checkpoint,
    config: &ModelConfig,
    items: &[Item],
    embeddings: &str,
    out: &Path,
) -> Result<u64> {
    let shapes = shapes(config);
    let mut types = BTreeMap::new();
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
                for name in [config.embedding_name(), "lm_head.weight".into()] {
                    let Some(&cols) = shapes.get(&name).and_then(|s| s.last()) else {
                        continue;
                    };
                    if !cols.is_multiple_of(dtype.block_size()) {
                        return Err(PipelineError::Invalid(format!(
                            "embeddings: {embeddings} blocks of {} do not divide the {cols}-long rows of '{name}'",
                            dtype.block_size()
                        )));
                    }
                    types.insert(name, dtype);
                }
            }
        }
    }
    // Each searched tensor's Q8_0 bytes; stacked weights are one tensor, as the writer stacks
    // them.
    let q8_0 = shrink_io::ggml::GgmlType::Q8_0;
    let mut searched: BTreeMap<String, usize> = items
        .iter()
        .flat_map(|it| tensor_names(config, it))
        .filter_map(|n| {
            let elems: usize = shapes.get(&n)?.iter().product();
            Some((n, elems / 32 * 34))
        })
        .collect();
    for (stored, sources) in config.stacked_weights() {
        if sources.len() > 1 && sources.iter().all(|s| searched.contains_key(s)) {
            let bytes = sources.iter().filter_map(|s| searched.remove(s)).sum();
            searched.insert(stored, bytes);
        }
    }
    let searched_bytes: u64 = searched
        .values()
        .map(|&b| shrink_search::gguf_bytes(b))
        .sum();
    types.extend(searched.into_keys().map(|n| (n, q8_0)));
    let probe = out.with_extension("probe.gguf");
    let size = shrink_io::LlamaGguf::plan(written, &probe, weight_type, &types)?.file_size()?;
    Ok(size.saturating_sub(searched_bytes))
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
    /// `scaled` (one KL per linear, scaled by output error), `every` format measured, or
    /// `fisher` (a gradient score from one backward pass per window, no KL pass per linear).
    sensitivity: Option<String>,
    /// How the candidates' codes are picked: `gptq` or `rtn`.
    weights: Option<String>,
    damp: Option<f64>,
    act_order: Option<bool>,
    /// GPTQ's Hessian blended toward its diagonal (0..=1, default 0).
    blend: Option<f64>,
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
        check_blend(k.blend)?;
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
        blend: s.blend.unwrap_or(0.0),
        measure: match s.sensitivity.as_deref() {
            None | Some("scaled") => Measure::Scaled,
            Some("every") => Measure::Every,
            Some("fisher") => Measure::Fisher,
            Some(other) => {
                return Err(PipelineError::Invalid(format!(
                    "sensitivity `{other}` is not one of: scaled, every, fisher"
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
        self.search(cx, SearchInput::Whole(model), out)
    }

    fn streams(&self, checkpoint: &Checkpoint) -> bool {
        super::quantize::reads_block_by_block(checkpoint)
    }

    /// The verified quantization's job, which calibrates on the windows the sensitivity and
    /// the scoring leave, beside the search's [`crate::memory::Scoring`].
    fn streamed_job(
        &self,
        checkpoint: &Checkpoint,
        calibration: Option<(u64, u64)>,
    ) -> Option<crate::memory::StreamedJob> {
        let (samples, seq_len) = calibration?;
        let config = ModelConfig::from_json(&checkpoint.config).ok()?;
        let (half, tokens) = scored_windows(samples as usize, seq_len as usize);
        let (half, tokens) = (half as u64, tokens as u64);
        let linears = config.block_linear_names(0).ok()?;
        let linears = linears.iter().filter(|n| !n.is_empty()).count() as u64;
        let variants = match self.measure {
            Measure::Scaled => linears,
            Measure::Every => linears * self.formats.len() as u64,
            // Every block's input is kept for the backward pass.
            Measure::Fisher => config.num_hidden_layers as u64,
        }
        .max(self.embedding_formats.len() as u64);
        let verified = self.quantize(&[], &self.embeddings);
        let mut job = Job::streamed_job(&verified, checkpoint, Some((samples - half, seq_len)))?;
        // The sensitivity takes every linear's input statistics (for the output errors), even
        // when the verified mixes are rounded without calibration.
        job.hessians = true;
        if self.measure == Measure::Fisher {
            // The gradient score holds, beside a block's weights, three f32 copies of them: the
            // variables, one window's gradients and the squared sums.
            job.block_value_bytes = job.block_value_bytes.max(4) + 12;
        }
        if job.calibration.is_none() {
            job.calibration = Some((half, tokens, QuantizeRequest::default().batch as u64));
        }
        Some(crate::memory::StreamedJob {
            scoring: Some(crate::memory::Scoring {
                positions: half * (tokens - tokens / 2),
                states: half * tokens * (variants + 2),
                head_copies: if self.embedding_formats.is_empty() {
                    1
                } else {
                    2
                },
            }),
            ..job
        })
    }

    fn run_streamed(&self, cx: &StageContext, out: &Path) -> Result<StageResult> {
        self.search(cx, SearchInput::BlockByBlock, out)
    }
}

impl SearchRequest {
    /// Runs the search on `input`, held whole or read block by block.
    fn search(&self, cx: &StageContext, input: SearchInput, out: &Path) -> Result<StageResult> {
        let cache = shrink_core::cache_dir().ok().map(|d| d.join("sensitivity"));
        let job = cx.job_input(QuantizeRequest::default().batch);
        let (outcome, summary) =
            search_and_write(&job, input, cx.input_key, cache.as_deref(), self, out)?;
        Ok(StageResult {
            search: Some(summary),
            ..quantized_result(outcome)
        })
    }
}

#[cfg(test)]
mod tests;

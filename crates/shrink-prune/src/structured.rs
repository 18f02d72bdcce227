//! Structured pruning that makes the model physically smaller: attention heads, MLP channels,
//! whole decoder layers and the hidden width. Every result keeps uniform per-layer shapes, so its
//! config is a standard one that llama.cpp and transformers load.
//!
//! Importance comes from the weights alone (`magnitude`) or from calibration activations
//! (`activation`): the energy ‖·‖² a head or channel adds to the residual stream over the
//! calibration tokens, computed exactly from the input statistics of `o_proj` / `down_proj`, and
//! for the hidden width the per-channel RMS of every norm's output (Minitron). Layers are ranked by
//! Block Influence (1 − cos between a block's input and output), by the angular distance across a
//! contiguous run of blocks (Gromov et al.), or by the calibration loss measured without each block.

use crate::{PruneError, Result};
use candle_core::{DType, Tensor, D};
use shrink_calib::BlockStats;
use shrink_core::Progress;
use shrink_models::{ModelConfig, NoHook, Role, Transformer};
use std::collections::BTreeMap;

/// Where importance scores come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Importance {
    /// Squared weight norms of the parts removed together.
    Magnitude,
    /// The energy each part contributes on the calibration tokens.
    Activation,
    /// First-order Taylor: |Σ g·w| over the part's parameters, with g the gradient of the
    /// calibration loss: the loss change the part's removal causes, to first order.
    Taylor,
}

impl Importance {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "magnitude" => Ok(Self::Magnitude),
            "activation" => Ok(Self::Activation),
            "taylor" => Ok(Self::Taylor),
            other => Err(PruneError::Config(format!(
                "importance '{other}' (expected magnitude, activation or taylor)"
            ))),
        }
    }
}

/// How decoder layers are ranked for removal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LayerCriterion {
    /// Remove the blocks whose output is most similar to their input (1 − cos, averaged per token).
    BlockInfluence,
    /// Remove the contiguous run of blocks whose input and output are closest in angle.
    Angular,
    /// Remove the blocks whose absence alone raises the calibration loss least.
    Perplexity,
}

impl LayerCriterion {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "block-influence" => Ok(Self::BlockInfluence),
            "angular" => Ok(Self::Angular),
            "perplexity" => Ok(Self::Perplexity),
            other => Err(PruneError::Config(format!(
                "criterion '{other}' (expected block-influence, angular or perplexity)"
            ))),
        }
    }
}

/// What to remove. Counts are per layer (heads, channels) or over the model (layers, width).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Structure {
    /// Remove this many query heads from every key/value group of every layer (GQA stays uniform).
    QueryHeads { per_group: usize },
    /// Remove this many key/value groups (with all their query heads) from every layer.
    KvGroups { count: usize },
    /// Remove this many MLP intermediate channels from every layer.
    Channels { count: usize },
    /// Remove this many decoder layers.
    Layers {
        count: usize,
        criterion: LayerCriterion,
    },
    /// Remove this many hidden (residual-stream) channels.
    Width { count: usize },
}

/// Which of heads, channels, layers or width a fraction applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Heads,
    KvGroups,
    Channels,
    Layers,
    Width,
}

impl Structure {
    /// The structure removing `fraction` of the target's units of a model shaped like `cfg`
    /// (rounded to the nearest whole unit; at least one unit is always kept).
    pub fn from_fraction(
        target: Target,
        fraction: f64,
        criterion: LayerCriterion,
        cfg: &ModelConfig,
    ) -> Result<Self> {
        if !(0.0..1.0).contains(&fraction) {
            return Err(PruneError::Config(format!(
                "fraction {fraction} is outside [0, 1)"
            )));
        }
        let count = |units: usize| ((fraction * units as f64).round() as usize).min(units - 1);
        let kv = cfg.num_kv_heads();
        Ok(match target {
            // Without grouped-query attention (BERT, GPT-2) every head is its own group.
            Target::Heads if kv == cfg.num_attention_heads => {
                Structure::KvGroups { count: count(kv) }
            }
            Target::Heads => Structure::QueryHeads {
                per_group: count(cfg.num_attention_heads / kv),
            },
            Target::KvGroups => Structure::KvGroups { count: count(kv) },
            Target::Channels => Structure::Channels {
                count: count(cfg.intermediate_size),
            },
            Target::Layers => Structure::Layers {
                count: count(cfg.num_hidden_layers),
                criterion,
            },
            Target::Width => Structure::Width {
                count: count(cfg.hidden_size),
            },
        })
    }

    /// Whether measuring importance needs calibration windows.
    pub fn calibrates(&self, importance: Importance) -> bool {
        matches!(self, Structure::Layers { .. }) || importance != Importance::Magnitude
    }
}

/// What a structured pruning removed.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StructuredOutcome {
    pub structure: Structure,
    pub importance: Importance,
    /// Removed unit indices: per layer for heads, groups and channels; one list for layers and
    /// width.
    pub removed: Vec<Vec<usize>>,
    pub parameters_before: usize,
    pub parameters_after: usize,
    /// The pruned model's shape keys (`hidden_size`, `num_hidden_layers`, …) after pruning.
    pub config: BTreeMap<String, usize>,
}

/// The shape keys of a config, as reported.
pub fn shape_keys(cfg: &ModelConfig) -> BTreeMap<String, usize> {
    [
        ("hidden_size", cfg.hidden_size),
        ("intermediate_size", cfg.intermediate_size),
        ("num_hidden_layers", cfg.num_hidden_layers),
        ("num_attention_heads", cfg.num_attention_heads),
        ("num_key_value_heads", cfg.num_kv_heads()),
        ("head_dim", cfg.head_dim()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn rows_of(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.to_dtype(DType::F32)?.to_vec2()?)
}

/// Squared norms of each row.
fn row_sq(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F32)?
        .sqr()?
        .sum(D::Minus1)?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .collect())
}

/// Squared norms of each column.
fn col_sq(t: &Tensor) -> Result<Vec<f64>> {
    row_sq(&t.t()?)
}

fn sum_ranges(v: &[f64], width: usize) -> Vec<f64> {
    v.chunks(width).map(|c| c.iter().sum()).collect()
}

fn stats_of<'a>(stats: &'a BlockStats, name: &str) -> Result<&'a shrink_calib::LinearStats> {
    stats
        .get(name)
        .ok_or_else(|| PruneError::Config(format!("no calibration statistics for '{name}'")))
}

/// Energy ‖W_o[:, cols] x_cols‖² summed over the calibration tokens, for each run of `width`
/// input columns of `o_proj` (a head, or a KV group's heads), from `o_proj`'s input Hessian.
fn output_energy(w: &Tensor, hessian: &[f64], width: usize) -> Result<Vec<f64>> {
    let w = rows_of(w)?;
    let n = w[0].len();
    Ok((0..n / width)
        .map(|g| {
            let cols = g * width..(g + 1) * width;
            w.iter()
                .map(|row| {
                    let mut e = 0.0;
                    for a in cols.clone() {
                        let ha = &hessian[a * n..(a + 1) * n];
                        let s: f64 = cols.clone().map(|b| ha[b] * row[b] as f64).sum();
                        e += row[a] as f64 * s;
                    }
                    e
                })
                .sum()
        })
        .collect())
}

/// Importance of each query head (per layer), from `o_proj` (and `q_proj` by magnitude).
fn head_scores(
    model: &mut Transformer,
    importance: Importance,
    heads_per_unit: usize,
    windows: Option<&[Vec<u32>]>,
    batch: usize,
    progress: &dyn Progress,
) -> Result<Vec<Vec<f64>>> {
    let hd = model.config.head_dim();
    let width = hd * heads_per_unit;
    let group = model.config.num_attention_heads / model.config.num_kv_heads();
    match importance {
        Importance::Magnitude | Importance::Taylor => {
            let p = parameter_scores(model, importance, windows, progress)?;
            (0..model.blocks.len())
                .map(|i| {
                    let t = |role: Role| &p[&weight_key(model, i, role)];
                    let q = sum_ranges(&row_sum(t(Role::Q))?, width);
                    let o = sum_ranges(&col_sum(t(Role::O))?, width);
                    let mut s: Vec<f64> = q.iter().zip(&o).map(|(a, b)| a + b).collect();
                    if heads_per_unit == group {
                        // A whole KV group also takes its key and value heads.
                        let k = sum_ranges(&row_sum(t(Role::K))?, hd);
                        let v = sum_ranges(&row_sum(t(Role::V))?, hd);
                        for (i, x) in s.iter_mut().enumerate() {
                            *x += k[i] + v[i];
                        }
                    }
                    Ok(s.into_iter().map(f64::abs).collect())
                })
                .collect()
        }
        Importance::Activation => {
            let windows = need_windows(windows)?;
            let mut out = Vec::new();
            crate::for_each_block(model, windows, batch, true, progress, |b, stats| {
                let st = stats_of(stats, b.name(Role::O).unwrap_or_default())?;
                out.push(output_energy(b.o_proj.weight(), &st.hessian, width)?);
                Ok(())
            })?;
            Ok(out)
        }
    }
}

/// The weight name of the linear in `role` of block `i`.
fn weight_key(model: &Transformer, i: usize, role: Role) -> String {
    model.blocks[i]
        .name(role)
        .map(|n| format!("{n}.weight"))
        .unwrap_or_default()
}

fn need_windows(windows: Option<&[Vec<u32>]>) -> Result<&[Vec<u32>]> {
    windows.filter(|w| !w.is_empty()).ok_or_else(|| {
        PruneError::Config("this importance measure needs calibration windows".into())
    })
}

/// The `count` lowest-scored indices, ascending; ties go to the lower index.
fn lowest(scores: &[f64], count: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|a, b| scores[*a].total_cmp(&scores[*b]).then(a.cmp(b)));
    let mut out = idx[..count.min(idx.len())].to_vec();
    out.sort_unstable();
    out
}

fn keep_complement(n: usize, removed: &[usize]) -> Vec<u32> {
    (0..n)
        .filter(|i| !removed.contains(i))
        .map(|i| i as u32)
        .collect()
}

fn select(t: &Tensor, dim: usize, keep: &[u32]) -> Result<Tensor> {
    let idx = Tensor::new(keep, t.device())?;
    Ok(t.index_select(&idx, dim)?.contiguous()?)
}

/// Indices of the rows (or columns) of heads `heads` (each `hd` wide).
fn head_rows(heads: &[u32], hd: usize) -> Vec<u32> {
    heads
        .iter()
        .flat_map(|&h| (h as usize * hd..(h as usize + 1) * hd).map(|i| i as u32))
        .collect()
}

/// Removes what `structure` says, ranked by `importance`. Calibration `windows` are needed for
/// activation importance and for ranking layers. The model is rebuilt with its new config.
///
/// ```
/// use candle_core::Device;
/// use shrink_models::{Transformer, ModelConfig};
/// use shrink_prune::{prune_structured, Importance, Structure};
/// let cfg = ModelConfig::tiny_for_tests();
/// let mut model = Transformer::random(&cfg, 0, &Device::Cpu).unwrap();
/// let out = prune_structured(&mut model, Structure::Channels { count: cfg.intermediate_size / 2 },
///     Importance::Magnitude, None, 4, &shrink_core::NoProgress).unwrap();
/// assert_eq!(model.config.intermediate_size, cfg.intermediate_size - cfg.intermediate_size / 2);
/// assert!(out.parameters_after < out.parameters_before);
/// ```
pub fn prune_structured(
    model: &mut Transformer,
    structure: Structure,
    importance: Importance,
    windows: Option<&[Vec<u32>]>,
    batch: usize,
    progress: &dyn Progress,
) -> Result<StructuredOutcome> {
    let cfg = model.config.clone();
    if model.arch == shrink_models::Arch::Gpt2
        && matches!(
            structure,
            Structure::QueryHeads { .. } | Structure::KvGroups { .. }
        )
    {
        return Err(PruneError::Config(
            "GPT-2's format derives the head size from n_embd / n_head, so a model with heads removed cannot be written; prune MLP channels or layers instead".into(),
        ));
    }
    let parameters_before = model.num_parameters();
    let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
    let group = nh / nkv;
    let mut new_cfg = cfg.clone();
    new_cfg.head_dim = Some(hd);
    let mut tensors = model.named_tensors();
    let removed: Vec<Vec<usize>>;
    // Tensor names by layer, role and part (`weight` or `bias`); `None` for an absent gate.
    let role_names: Vec<Vec<Option<String>>> = model
        .blocks
        .iter()
        .map(|b| {
            Role::ALL
                .iter()
                .map(|&r| b.name(r).map(str::to_string))
                .collect()
        })
        .collect();
    let key = |i: usize, role: Role, part: &str| {
        role_names[i][role as usize]
            .as_ref()
            .map(|n| format!("{n}.{part}"))
    };
    // Selects `rows` along `dim` of a tensor, when the model has it.
    let cut = |tensors: &mut BTreeMap<String, Tensor>,
               key: Option<String>,
               dim: usize,
               rows: &[u32]|
     -> Result<()> {
        if let Some(key) = key {
            if let Some(t) = tensors.get(&key).cloned() {
                tensors.insert(key, select(&t, dim, rows)?);
            }
        }
        Ok(())
    };
    let too_many = |what: &str, count: usize, of: usize| {
        PruneError::Config(format!(
            "cannot remove {count} {what} of {of}: at least one must stay"
        ))
    };
    match structure {
        Structure::QueryHeads { per_group } => {
            if per_group >= group {
                return Err(too_many("query heads per KV group", per_group, group));
            }
            let scores = head_scores(model, importance, 1, windows, batch, progress)?;
            let mut all = Vec::new();
            for (i, s) in scores.iter().enumerate() {
                // The weakest `per_group` heads within each group, so every group keeps the same
                // number of query heads.
                let mut gone = Vec::new();
                for g in 0..nkv {
                    let local = lowest(&s[g * group..(g + 1) * group], per_group);
                    gone.extend(local.into_iter().map(|h| g * group + h));
                }
                let keep = keep_complement(nh, &gone);
                let rows = head_rows(&keep, hd);
                cut(&mut tensors, key(i, Role::Q, "weight"), 0, &rows)?;
                cut(&mut tensors, key(i, Role::Q, "bias"), 0, &rows)?;
                cut(&mut tensors, key(i, Role::O, "weight"), 1, &rows)?;
                all.push(gone);
            }
            new_cfg.num_attention_heads = nkv * (group - per_group);
            new_cfg.num_key_value_heads = Some(nkv);
            removed = all;
        }
        Structure::KvGroups { count } => {
            if count >= nkv {
                return Err(too_many("KV groups", count, nkv));
            }
            let scores = head_scores(model, importance, group, windows, batch, progress)?;
            let mut all = Vec::new();
            for (i, s) in scores.iter().enumerate() {
                let gone = lowest(s, count);
                let keep_groups = keep_complement(nkv, &gone);
                let keep_heads: Vec<u32> = keep_groups
                    .iter()
                    .flat_map(|&g| (g as usize * group..(g as usize + 1) * group).map(|h| h as u32))
                    .collect();
                let q_rows = head_rows(&keep_heads, hd);
                let kv_rows = head_rows(&keep_groups, hd);
                for (role, part, dim, rows) in [
                    (Role::Q, "weight", 0, &q_rows),
                    (Role::Q, "bias", 0, &q_rows),
                    (Role::K, "weight", 0, &kv_rows),
                    (Role::K, "bias", 0, &kv_rows),
                    (Role::V, "weight", 0, &kv_rows),
                    (Role::V, "bias", 0, &kv_rows),
                    (Role::O, "weight", 1, &q_rows),
                ] {
                    cut(&mut tensors, key(i, role, part), dim, rows)?;
                }
                all.push(gone);
            }
            new_cfg.num_attention_heads = (nkv - count) * group;
            new_cfg.num_key_value_heads = Some(nkv - count);
            removed = all;
        }
        Structure::Channels { count } => {
            let inter = cfg.intermediate_size;
            if count >= inter {
                return Err(too_many("MLP channels", count, inter));
            }
            let scores: Vec<Vec<f64>> = match importance {
                Importance::Magnitude | Importance::Taylor => {
                    let p = parameter_scores(model, importance, windows, progress)?;
                    (0..model.blocks.len())
                        .map(|i| {
                            let t = |role: Role| &p[&weight_key(model, i, role)];
                            let g = match model.blocks[i].gate_proj {
                                Some(_) => row_sum(t(Role::Gate))?,
                                None => vec![0.0; inter],
                            };
                            let u = row_sum(t(Role::Up))?;
                            let d = col_sum(t(Role::Down))?;
                            Ok((0..inter).map(|c| (g[c] + u[c] + d[c]).abs()).collect())
                        })
                        .collect::<Result<_>>()?
                }
                Importance::Activation => {
                    let windows = need_windows(windows)?;
                    let mut out = Vec::new();
                    crate::for_each_block(model, windows, batch, false, progress, |b, stats| {
                        let st = stats_of(stats, b.name(Role::Down).unwrap_or_default())?;
                        let d = col_sq(b.down_proj.weight())?;
                        // ‖W_down[:, c]‖² Σ g_c²: the energy channel c writes to the residual.
                        out.push((0..inter).map(|c| d[c] * st.channel_sq[c]).collect());
                        Ok(())
                    })?;
                    out
                }
            };
            let mut all = Vec::new();
            for (i, s) in scores.iter().enumerate() {
                let gone = lowest(s, count);
                let keep = keep_complement(inter, &gone);
                for (role, part, dim) in [
                    (Role::Gate, "weight", 0),
                    (Role::Gate, "bias", 0),
                    (Role::Up, "weight", 0),
                    (Role::Up, "bias", 0),
                    (Role::Down, "weight", 1),
                ] {
                    cut(&mut tensors, key(i, role, part), dim, &keep)?;
                }
                all.push(gone);
            }
            new_cfg.intermediate_size = inter - count;
            removed = all;
        }
        Structure::Layers { count, criterion } => {
            let n = cfg.num_hidden_layers;
            if count >= n {
                return Err(too_many("layers", count, n));
            }
            let windows = need_windows(windows)?;
            let gone = rank_layers(model, criterion, count, windows, batch, progress)?;
            let kept: Vec<usize> = (0..n).filter(|i| !gone.contains(i)).collect();
            tensors = model.keep_layers(&kept)?.named_tensors();
            new_cfg.num_hidden_layers = n - count;
            removed = vec![gone];
        }
        Structure::Width { count } => {
            if !model.arch.is_llama_like() {
                return Err(PruneError::Config(format!(
                    "width pruning needs RMSNorm (the Llama family): {:?} normalises with LayerNorm, whose mean and variance change when channels go",
                    model.arch
                )));
            }
            let d = cfg.hidden_size;
            if count >= d {
                return Err(too_many("hidden channels", count, d));
            }
            let scores: Vec<f64> = match importance {
                Importance::Magnitude => {
                    let mut s = col_sq(&model.embed_tokens)?;
                    for b in &model.blocks {
                        for w in [b.o_proj.weight(), b.down_proj.weight()] {
                            for (x, v) in s.iter_mut().zip(row_sq(w)?) {
                                *x += v;
                            }
                        }
                    }
                    s
                }
                Importance::Taylor => {
                    let p = taylor_products(model, need_windows(windows)?, progress)?;
                    let mut s = vec![0.0; d];
                    for (name, t) in &p {
                        let add: Vec<f64> =
                            if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
                                col_sum(t)?
                            } else if name.ends_with("norm.weight") {
                                t.to_vec1::<f32>()?.into_iter().map(f64::from).collect()
                            } else if name.ends_with("o_proj.weight")
                                || name.ends_with("down_proj.weight")
                            {
                                row_sum(t)?
                            } else if t.rank() == 2 {
                                col_sum(t)?
                            } else {
                                continue; // biases of q/k/v/gate/up are not in the residual stream
                            };
                        for (x, v) in s.iter_mut().zip(add) {
                            *x += v;
                        }
                    }
                    s.into_iter().map(f64::abs).collect()
                }
                Importance::Activation => {
                    let windows = need_windows(windows)?;
                    let mut s = vec![0.0; d];
                    crate::for_each_block(model, windows, batch, false, progress, |b, stats| {
                        // The RMS of each channel at the output of both norms (Minitron).
                        for linear in ["self_attn.q_proj", "mlp.gate_proj"] {
                            let st =
                                stats_of(stats, &format!("model.layers.{}.{linear}", b.index))?;
                            for (x, v) in s.iter_mut().zip(&st.channel_sq) {
                                *x += (v / st.rows.max(1) as f64).sqrt();
                            }
                        }
                        Ok(())
                    })?;
                    s
                }
            };
            let gone = lowest(&scores, count);
            let keep = keep_complement(d, &gone);
            // RMSNorm divides by the RMS over the kept channels only: scaling the norm weights by
            // √(d / d') and eps by d / d' keeps every kept channel's output exactly when the
            // removed channels are silent.
            new_cfg.rms_norm_eps = cfg.rms_norm_eps * d as f64 / (d - count) as f64;
            let rescale = (d as f64 / (d - count) as f64).sqrt();
            let names: Vec<String> = tensors.keys().cloned().collect();
            for name in names {
                let t = tensors[&name].clone();
                let new = if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
                    select(&t, 1, &keep)?
                } else if name.ends_with("norm.weight") {
                    (select(&t, 0, &keep)? * rescale)?
                } else if [
                    "o_proj.weight",
                    "down_proj.weight",
                    "o_proj.bias",
                    "down_proj.bias",
                ]
                .iter()
                .any(|s| name.ends_with(s))
                {
                    select(&t, 0, &keep)? // o and down write the residual stream
                } else if name.ends_with(".weight") && t.rank() == 2 {
                    select(&t, 1, &keep)? // q, k, v, gate, up read the residual stream
                } else {
                    t
                };
                tensors.insert(name, new);
            }
            new_cfg.hidden_size = d - count;
            removed = vec![gone];
        }
    }
    let dtype = model.dtype();
    *model = Transformer::from_tensors(&new_cfg, tensors, dtype)?;
    Ok(StructuredOutcome {
        structure,
        importance,
        removed,
        parameters_before,
        parameters_after: model.num_parameters(),
        config: shape_keys(&model.config),
    })
}

/// Mean next-token cross-entropy of `model` on `windows`.
/// Methods scored by the calibration loss need a token-prediction head.
fn need_token_loss(model: &Transformer, what: &str) -> Result<()> {
    if model.has_token_head() {
        return Ok(());
    }
    Err(PruneError::Config(format!(
        "{what} needs a token-prediction loss, and this encoder has no masked-LM head: use activation or magnitude importance (layers: block-influence or angular)"
    )))
}

fn calibration_loss(model: &Transformer, windows: &[Vec<u32>], batch: usize) -> Result<f64> {
    need_token_loss(model, "the perplexity criterion")?;
    let mut total = 0.0;
    for group in windows.chunks(batch.max(1)) {
        let ids = Tensor::new(group.to_vec(), model.device())?;
        total += model.lm_loss(&ids)?.to_scalar::<f32>()? as f64 * group.len() as f64;
    }
    Ok(total / windows.len().max(1) as f64)
}

/// Sum over each row of a 2-D tensor.
fn row_sum(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.sum(D::Minus1)?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .collect())
}

/// Sum over each column of a 2-D tensor.
fn col_sum(t: &Tensor) -> Result<Vec<f64>> {
    row_sum(&t.t()?)
}

/// Per-parameter scores whose sum over a part ranks it: W² by magnitude, G ⊙ W by Taylor (whose
/// sums are taken in absolute value by the callers; W² sums are already non-negative).
fn parameter_scores(
    model: &Transformer,
    importance: Importance,
    windows: Option<&[Vec<u32>]>,
    progress: &dyn Progress,
) -> Result<BTreeMap<String, Tensor>> {
    match importance {
        Importance::Taylor => taylor_products(model, need_windows(windows)?, progress),
        _ => model
            .named_tensors()
            .into_iter()
            .map(|(name, t)| Ok((name, t.to_dtype(DType::F32)?.sqr()?)))
            .collect(),
    }
}

/// G ⊙ W for every parameter (by Hugging Face name), with G the gradient of the calibration
/// loss summed over `windows`: −Σ over a part of G ⊙ W is the loss change, to first order, of
/// setting that part to zero.
fn taylor_products(
    model: &Transformer,
    windows: &[Vec<u32>],
    progress: &dyn Progress,
) -> Result<BTreeMap<String, Tensor>> {
    need_token_loss(model, "taylor importance")?;
    let vars: BTreeMap<String, candle_core::Var> = model
        .named_tensors()
        .into_iter()
        .map(|(k, t)| Ok((k, candle_core::Var::from_tensor(&t.to_dtype(DType::F32)?)?)))
        .collect::<Result<_>>()?;
    let tracked = Transformer::from_tensors(
        &model.config,
        vars.iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect(),
        DType::F32,
    )?;
    let mut sums: BTreeMap<String, Tensor> = BTreeMap::new();
    // A backward pass keeps every activation of the forward: one window at a time bounds memory.
    let groups: Vec<&[Vec<u32>]> = windows.chunks(1).collect();
    progress.start("gradients", groups.len() as u64);
    for group in groups {
        let ids = Tensor::new(group.to_vec(), model.device())?;
        // The mean over this batch's tokens, weighted by its windows: the sum over windows.
        let loss = (tracked.lm_loss(&ids)? * group.len() as f64)?;
        let grads = loss.backward()?;
        for (name, var) in &vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                let sum = match sums.remove(name) {
                    Some(s) => (s + g)?,
                    None => g.clone(),
                };
                sums.insert(name.clone(), sum);
            }
        }
        progress.advance(1, None);
    }
    progress.finish();
    vars.iter()
        .map(|(name, var)| {
            let g = sums
                .remove(name)
                .ok_or_else(|| PruneError::Config(format!("no gradient reached '{name}'")))?;
            Ok((name.clone(), (g * var.as_tensor().detach())?))
        })
        .collect()
}

/// Per-token cosine similarity between `a` and `b` (`(batch, seq, hidden)`), summed.
fn cosine_sum(a: &Tensor, b: &Tensor) -> Result<(f64, usize)> {
    let dot = (a * b)?.sum(D::Minus1)?;
    let na = a.sqr()?.sum(D::Minus1)?.sqrt()?;
    let nb = b.sqr()?.sum(D::Minus1)?.sqrt()?;
    let cos = (dot / ((na * nb)? + 1e-12)?)?;
    Ok((cos.sum_all()?.to_scalar::<f32>()? as f64, cos.elem_count()))
}

/// The `count` layers to remove under `criterion`, ascending.
fn rank_layers(
    model: &Transformer,
    criterion: LayerCriterion,
    count: usize,
    windows: &[Vec<u32>],
    batch: usize,
    progress: &dyn Progress,
) -> Result<Vec<usize>> {
    let n = model.blocks.len();
    if count == 0 {
        return Ok(vec![]);
    }
    match criterion {
        LayerCriterion::Perplexity => {
            progress.start("scoring layers", n as u64);
            let mut scores = Vec::with_capacity(n);
            for i in 0..n {
                let mut without = model.clone();
                without.blocks.remove(i);
                scores.push(calibration_loss(&without, windows, batch)?);
                progress.advance(1, Some(&format!("without block {i}")));
            }
            progress.finish();
            Ok(lowest(&scores, count))
        }
        LayerCriterion::BlockInfluence | LayerCriterion::Angular => {
            let len = windows[0].len();
            let ctx = model.attention_context(len, 0)?;
            // sims[l][l + k]: summed cosine between the input of block l and that of block l + k.
            let span = if criterion == LayerCriterion::Angular {
                count
            } else {
                1
            };
            let mut sims = vec![0.0; n + 1 - span];
            let mut tokens = 0;
            progress.start(
                "scoring layers",
                windows.len().div_ceil(batch.max(1)) as u64,
            );
            for group in windows.chunks(batch.max(1)) {
                let ids = Tensor::new(group.to_vec(), model.device())?;
                let mut states = std::collections::VecDeque::new();
                let mut x = model.embed(&ids)?;
                states.push_back(x.clone());
                for (i, block) in model.blocks.iter().enumerate() {
                    x = block.forward(&x, &ctx, None, &mut NoHook)?;
                    states.push_back(x.clone());
                    if states.len() > span + 1 {
                        states.pop_front();
                    }
                    if i + 1 >= span {
                        let (s, c) = cosine_sum(&states[0], &states[span])?;
                        sims[i + 1 - span] += s;
                        if i + 1 == span {
                            tokens += c;
                        }
                    }
                }
                progress.advance(1, None);
            }
            progress.finish();
            // Distance = 1 − mean cos (Block Influence) or arccos(mean cos)/π (angular): both
            // rank the same way; the smallest distance goes first.
            let distance: Vec<f64> = sims.iter().map(|s| 1.0 - s / tokens as f64).collect();
            Ok(if criterion == LayerCriterion::Angular {
                let start = lowest(&distance, 1)[0];
                (start..start + count).collect()
            } else {
                lowest(&distance, count)
            })
        }
    }
}

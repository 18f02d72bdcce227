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
//!
//! Scoring ([`scores`]) works block by block on any model but for Taylor importance and the
//! calibration-loss criterion; what the scores decide becomes a [`Cut`] of every original tensor
//! ([`plan_cuts`]), applied to a model held whole by [`prune_structured`] or to each tensor as it is
//! written by [`prune_structured_streamed`].

mod scores;
mod streamed;
#[cfg(test)]
mod tests;

pub use streamed::prune_structured_streamed;

use crate::{PruneError, Result};
use candle_core::Tensor;
use shrink_core::Progress;
use shrink_models::{Arch, ModelConfig, Role, Transformer};
use std::collections::BTreeMap;
use std::sync::Arc;

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
    /// (rounded to the nearest whole unit; at least one unit is always kept; width keeps a
    /// multiple of the head count, at least one head's worth, at most the whole heads it has).
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
            // The kept width is a whole number of heads: transformers refuses a hidden size
            // that is not a multiple of the head count, even when `head_dim` is given.
            Target::Width => {
                let (hidden, heads) = (cfg.hidden_size, cfg.num_attention_heads.max(1));
                let removed = count(hidden);
                let whole = (hidden / heads).max(1);
                let kept = ((hidden - removed) as f64 / heads as f64).round() as usize;
                Structure::Width {
                    count: match removed {
                        0 => 0,
                        _ => hidden.saturating_sub(kept.clamp(1, whole) * heads),
                    },
                }
            }
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
    /// The block a resumed job began at (its scoring's, or the number of blocks when the scoring
    /// was over and the writing resumed): [`prune_structured_streamed`] only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resumed_at: Option<usize>,
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

/// Refuses, before any work, a structure that `arch`'s model of shape `cfg` cannot take: removing
/// every unit, heads of GPT-2 (whose format derives the head size) and the width of a LayerNorm
/// model.
pub fn check_structure(arch: Arch, cfg: &ModelConfig, structure: Structure) -> Result<()> {
    let too_many = |what: &str, count: usize, of: usize| {
        Err(PruneError::Config(format!(
            "cannot remove {count} {what} of {of}: at least one must stay"
        )))
    };
    let (nh, nkv) = (cfg.num_attention_heads, cfg.num_kv_heads());
    let heads = matches!(
        structure,
        Structure::QueryHeads { .. } | Structure::KvGroups { .. }
    );
    if arch == Arch::Gpt2 && heads {
        return Err(PruneError::Config(
            "GPT-2's format derives the head size from n_embd / n_head, so a model with heads removed cannot be written; prune MLP channels or layers instead".into(),
        ));
    }
    match structure {
        Structure::QueryHeads { per_group } if per_group >= nh / nkv => {
            too_many("query heads per KV group", per_group, nh / nkv)
        }
        Structure::KvGroups { count } if count >= nkv => too_many("KV groups", count, nkv),
        Structure::Channels { count } if count >= cfg.intermediate_size => {
            too_many("MLP channels", count, cfg.intermediate_size)
        }
        Structure::Layers { count, .. } if count >= cfg.num_hidden_layers => {
            too_many("layers", count, cfg.num_hidden_layers)
        }
        Structure::Width { .. } if !arch.is_llama_like() => Err(PruneError::Config(format!(
            "width pruning needs RMSNorm (the Llama family): {arch:?} normalises with LayerNorm, whose mean and variance change when channels go"
        ))),
        Structure::Width { count } if count >= cfg.hidden_size => {
            too_many("hidden channels", count, cfg.hidden_size)
        }
        _ => Ok(()),
    }
}

/// Whether `structure` ranked by `importance` can be measured one block at a time: all but
/// Taylor importance (gradients through the whole model) and the perplexity criterion (the
/// whole model run without each block).
pub fn scores_block_by_block(structure: Structure, importance: Importance) -> bool {
    match structure {
        Structure::Layers { criterion, .. } => criterion != LayerCriterion::Perplexity,
        _ => importance != Importance::Taylor,
    }
}

/// How one tensor of the pruned model is made from the original's: tensor `source`, with only
/// the indices `keep` along `dim` when `select` is set, times `scale` when set.
#[derive(Debug, Clone)]
pub(crate) struct Cut {
    source: String,
    select: Option<(usize, Arc<Vec<u32>>)>,
    /// `x · a + b` after the selection (a norm's scale rescaled for a narrower width).
    scale: Option<(f64, f64)>,
}

impl Cut {
    fn apply(&self, t: &Tensor) -> Result<Tensor> {
        let t = match &self.select {
            Some((dim, keep)) => {
                let idx = Tensor::new(keep.as_slice(), t.device())?;
                t.index_select(&idx, *dim)?.contiguous()?
            }
            None => t.clone(),
        };
        Ok(match self.scale {
            Some((a, b)) => t.affine(a, b)?,
            None => t,
        })
    }

    /// The shape made from a source of shape `shape`.
    fn shape(&self, shape: &[usize]) -> Vec<usize> {
        let mut shape = shape.to_vec();
        if let Some((dim, keep)) = &self.select {
            if let Some(d) = shape.get_mut(*dim) {
                *d = keep.len();
            }
        }
        shape
    }
}

fn keep_complement(n: usize, removed: &[usize]) -> Vec<u32> {
    (0..n)
        .filter(|i| !removed.contains(i))
        .map(|i| i as u32)
        .collect()
}

/// Indices of the rows (or columns) of heads `heads` (each `hd` wide).
fn head_rows(heads: &[u32], hd: usize) -> Vec<u32> {
    heads
        .iter()
        .flat_map(|&h| (h as usize * hd..(h as usize + 1) * hd).map(|i| i as u32))
        .collect()
}

/// The block, role and part (`weight` or `bias`) of a block linear's tensor.
fn linear_part(prefix: &str, name: &str) -> Option<(usize, Role, String)> {
    let rest = name.strip_prefix(prefix)?.strip_prefix('.')?;
    let layer = rest.split('.').next()?.parse().ok()?;
    let part = name.rsplit('.').next()?.to_string();
    Some((layer, Role::of_name(name)?, part))
}

/// A block linear's tensor cut by a per-layer structure: its role and part (`weight`, `bias`),
/// and the indices kept along a dimension.
type Rule = (Role, &'static str, usize, Arc<Vec<u32>>);

/// How a per-layer structure (heads, groups or channels) cuts one layer's tensors, the units
/// `gone` removed from it.
fn layer_rules(structure: Structure, cfg: &ModelConfig, gone: &[usize]) -> Vec<Rule> {
    let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
    let group = (nh / nkv) as u32;
    let mut rules = vec![];
    match structure {
        Structure::QueryHeads { .. } => {
            let rows = Arc::new(head_rows(&keep_complement(nh, gone), hd));
            rules.push((Role::Q, "weight", 0, rows.clone()));
            rules.push((Role::Q, "bias", 0, rows.clone()));
            rules.push((Role::O, "weight", 1, rows));
        }
        Structure::KvGroups { .. } => {
            let groups = keep_complement(nkv, gone);
            let heads: Vec<u32> = groups
                .iter()
                .flat_map(|&g| g * group..(g + 1) * group)
                .collect();
            let q = Arc::new(head_rows(&heads, hd));
            let kv = Arc::new(head_rows(&groups, hd));
            for part in ["weight", "bias"] {
                rules.push((Role::Q, part, 0, q.clone()));
                rules.push((Role::K, part, 0, kv.clone()));
                rules.push((Role::V, part, 0, kv.clone()));
            }
            rules.push((Role::O, "weight", 1, q));
        }
        _ => {
            let keep = Arc::new(keep_complement(cfg.intermediate_size, gone));
            for part in ["weight", "bias"] {
                rules.push((Role::Gate, part, 0, keep.clone()));
                rules.push((Role::Up, part, 0, keep.clone()));
            }
            rules.push((Role::Down, "weight", 1, keep));
        }
    }
    rules
}

/// The pruned model's config and every tensor it has (by name), made from the original model's
/// tensors `names` (of shape `cfg`, family `arch`) with the units `removed` taken out: per layer
/// for heads, groups and channels, one list for layers and width.
pub(crate) fn plan_cuts<'n>(
    cfg: &ModelConfig,
    arch: Arch,
    structure: Structure,
    removed: &[Vec<usize>],
    names: impl Iterator<Item = &'n String>,
) -> Result<(ModelConfig, BTreeMap<String, Cut>)> {
    let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
    let group = nh / nkv;
    let mut new_cfg = cfg.clone();
    new_cfg.head_dim = Some(hd);
    let prefix = arch.layer_prefix();
    let same = |name: &String| Cut {
        source: name.clone(),
        select: None,
        scale: None,
    };
    let gone_in = |layer: usize| {
        removed
            .get(layer)
            .ok_or_else(|| PruneError::Config(format!("no removal decided for block {layer}")))
    };
    let mut cuts = BTreeMap::new();
    match structure {
        Structure::QueryHeads { .. } | Structure::KvGroups { .. } | Structure::Channels { .. } => {
            // Per layer: (role, part) → the kept indices along a dimension.
            let mut layers: BTreeMap<usize, Vec<Rule>> = BTreeMap::new();
            for name in names {
                let mut cut = same(name);
                if let Some((layer, role, part)) = linear_part(prefix, name) {
                    if let std::collections::btree_map::Entry::Vacant(e) = layers.entry(layer) {
                        e.insert(layer_rules(structure, cfg, gone_in(layer)?));
                    }
                    if let Some((.., dim, keep)) = layers[&layer]
                        .iter()
                        .find(|(r, p, ..)| *r == role && *p == part)
                    {
                        cut.select = Some((*dim, keep.clone()));
                    }
                }
                cuts.insert(name.clone(), cut);
            }
            match structure {
                Structure::QueryHeads { per_group } => {
                    new_cfg.num_attention_heads = nkv * (group - per_group);
                    new_cfg.num_key_value_heads = Some(nkv);
                }
                Structure::KvGroups { count } => {
                    new_cfg.num_attention_heads = (nkv - count) * group;
                    new_cfg.num_key_value_heads = Some(nkv - count);
                }
                Structure::Channels { count } => {
                    new_cfg.intermediate_size = cfg.intermediate_size - count
                }
                _ => {}
            }
        }
        Structure::Layers { .. } => {
            let gone = gone_in(0)?;
            let kept: Vec<usize> = (0..cfg.num_hidden_layers)
                .filter(|i| !gone.contains(i))
                .collect();
            for name in names {
                let block = name
                    .strip_prefix(prefix)
                    .and_then(|r| r.strip_prefix('.'))
                    .and_then(|r| r.split_once('.'))
                    .and_then(|(i, rest)| Some((i.parse::<usize>().ok()?, rest)));
                match block {
                    Some((i, rest)) => {
                        if let Some(new) = kept.iter().position(|&l| l == i) {
                            cuts.insert(format!("{prefix}.{new}.{rest}"), same(name));
                        }
                    }
                    None => {
                        cuts.insert(name.clone(), same(name));
                    }
                }
            }
            new_cfg = ModelConfig {
                head_dim: new_cfg.head_dim,
                ..cfg.with_layers(&kept)
            };
        }
        Structure::Width { count } => {
            let d = cfg.hidden_size;
            let keep = Arc::new(keep_complement(d, gone_in(0)?));
            // RMSNorm divides by the RMS over the kept channels only: scaling the norm weights by
            // √(d / d') and eps by d / d' keeps every kept channel's output exactly when the
            // removed channels are silent.
            new_cfg.rms_norm_eps = cfg.rms_norm_eps * d as f64 / (d - count) as f64;
            let rescale = (d as f64 / (d - count) as f64).sqrt();
            // A norm applied as `offset + w` (Gemma) is rescaled as a whole: (o + w)·r − o.
            let offset = arch.norm_offset() as f64;
            let norm_scale = Some((rescale, offset * (rescale - 1.0)));
            // QK-norms act across a head, not the width: they are kept whole.
            let qk_norm = |name: &str| name.contains(".q_norm.") || name.contains(".k_norm.");
            // An embedding scaled by √width (Gemma) is rescaled by √(d / d') so that the kept
            // channels enter the blocks unchanged; a head tied to it then gives logits × √(d / d'),
            // which the final norm, left unrescaled, takes back.
            let scaled_embedding = cfg.embedding_scale().is_some();
            let tied = cfg.ties_embeddings();
            for name in names {
                let role = linear_part(prefix, name).map(|(_, role, part)| (role, part));
                let (dim, scale) = if name == "model.embed_tokens.weight" && scaled_embedding {
                    (Some(1), Some((rescale, 0.0)))
                } else if name == "model.norm.weight" && scaled_embedding && tied {
                    (Some(0), None)
                } else if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
                    (Some(1), None)
                } else if qk_norm(name) {
                    (None, None)
                } else if name.ends_with("norm.weight") {
                    (Some(0), norm_scale)
                } else {
                    match role {
                        // o and down write the residual stream; the other linears read it.
                        Some((Role::O | Role::Down, _)) => (Some(0), None),
                        Some((_, part)) if part == "weight" => (Some(1), None),
                        _ => (None, None),
                    }
                };
                let cut = Cut {
                    select: dim.map(|dim| (dim, keep.clone())),
                    scale,
                    ..same(name)
                };
                cuts.insert(name.clone(), cut);
            }
            new_cfg.hidden_size = d - count;
        }
    }
    Ok((new_cfg, cuts))
}

/// Removes what `structure` says, ranked by `importance`. Calibration `windows` are needed for
/// activation and Taylor importance and for ranking layers. The model is rebuilt with its new
/// config. [`prune_structured_streamed`] does the same to a model read block by block from its
/// file.
///
/// ```
/// use candle_core::Device;
/// use shrink_models::{Transformer, ModelConfig};
/// use shrink_prune::{prune_structured, Importance, Structure};
/// let cfg = ModelConfig::tiny_for_tests();
/// let mut model = Transformer::random(&cfg, 0, &Device::Cpu)?;
/// let out = prune_structured(&mut model, Structure::Channels { count: cfg.intermediate_size / 2 },
///     Importance::Magnitude, None, 4, &shrink_core::NoProgress)?;
/// assert_eq!(model.config.intermediate_size, cfg.intermediate_size - cfg.intermediate_size / 2);
/// assert!(out.parameters_after < out.parameters_before);
/// # Ok::<(), Box<dyn std::error::Error>>(())
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
    check_structure(model.arch, &cfg, structure)?;
    let parameters_before = model.num_parameters();
    let removed = match structure {
        Structure::Layers {
            count,
            criterion: LayerCriterion::Perplexity,
        } => {
            let windows = scores::need_windows(windows)?;
            vec![scores::rank_by_perplexity(
                model, count, windows, batch, progress,
            )?]
        }
        _ if !scores_block_by_block(structure, importance) => {
            scores::removal_by_taylor(model, structure, scores::need_windows(windows)?, progress)?
        }
        _ => {
            let embedding = model.embed_tokens.clone();
            let calibration = scores::Calibration {
                windows,
                batch,
                world: &shrink_core::Alone,
                keep: Default::default(),
                progress,
            };
            scores::removal_by_blocks(
                model,
                structure,
                importance,
                &|| Ok(embedding.clone()),
                calibration,
                None,
                &mut |_, _, _| Ok(()),
            )?
        }
    };
    let tensors = model.named_tensors();
    let (new_cfg, cuts) = plan_cuts(&cfg, model.arch, structure, &removed, tensors.keys())?;
    let pruned = cuts
        .iter()
        .map(|(name, cut)| Ok((name.clone(), cut.apply(&tensors[&cut.source])?)))
        .collect::<Result<BTreeMap<_, _>>>()?;
    drop(tensors);
    let dtype = model.dtype();
    *model = Transformer::from_tensors(&new_cfg, pruned, dtype)?;
    Ok(StructuredOutcome {
        structure,
        importance,
        removed,
        parameters_before,
        parameters_after: model.num_parameters(),
        config: shape_keys(&model.config),
        resumed_at: None,
    })
}

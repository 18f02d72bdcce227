//! Quantization presets: TOML files in `configs/quant/` (compiled in, referenced by name) or any
//! file, describing a method, a default format, per-tensor rules, fallbacks and the export.
//!
//! ```
//! let p = shrink_quant::Preset::named("q4_k_m").unwrap();
//! let plan = p.plan().unwrap();
//! // attn_v of layer 5 of a 30-layer model wants Q6_K; its 576-wide rows fall back to Q8_0.
//! let f = plan.format_for("model.layers.5.self_attn.v_proj", 576, 30);
//! assert_eq!(f, shrink_quant::Format::parse("q8_0").unwrap());
//! ```

use crate::{Format, Granularity, Grid, Layers, QuantError, QuantPlan, QuantScheme, Result, Rule};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

/// The presets shipped in `configs/quant/`.
pub const BUILTIN: &[(&str, &str)] = &[
    ("iq2_m", include_str!("../../../configs/quant/iq2_m.toml")),
    ("iq2_xs", include_str!("../../../configs/quant/iq2_xs.toml")),
    (
        "iq2_xxs",
        include_str!("../../../configs/quant/iq2_xxs.toml"),
    ),
    (
        "iq3_xxs",
        include_str!("../../../configs/quant/iq3_xxs.toml"),
    ),
    ("iq3_s", include_str!("../../../configs/quant/iq3_s.toml")),
    ("iq4_nl", include_str!("../../../configs/quant/iq4_nl.toml")),
    ("iq4_xs", include_str!("../../../configs/quant/iq4_xs.toml")),
    ("q2_k", include_str!("../../../configs/quant/q2_k.toml")),
    ("q3_k_m", include_str!("../../../configs/quant/q3_k_m.toml")),
    ("q4_0", include_str!("../../../configs/quant/q4_0.toml")),
    ("q4_k_m", include_str!("../../../configs/quant/q4_k_m.toml")),
    ("q5_k_m", include_str!("../../../configs/quant/q5_k_m.toml")),
    ("q6_k", include_str!("../../../configs/quant/q6_k.toml")),
    (
        "w4a16-g128",
        include_str!("../../../configs/quant/w4a16-g128.toml"),
    ),
    ("w8a8", include_str!("../../../configs/quant/w8a8.toml")),
];

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum FormatSpec {
    /// A ggml type name: `q4_k`, `q8_0`, …
    Name(String),
    /// A grid scheme: `{ bits = 4, grid = "symmetric-full", group = 128 }`; `group` is a size or
    /// `"channel"` / `"tensor"`.
    Grid {
        bits: u8,
        grid: Grid,
        group: GroupSpec,
        #[serde(default)]
        search: bool,
    },
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum GroupSpec {
    Size(usize),
    Kind(String),
}

impl FormatSpec {
    pub fn resolve(&self) -> Result<Format> {
        match self {
            FormatSpec::Name(n) => Format::parse(n),
            FormatSpec::Grid {
                bits,
                grid,
                group,
                search,
            } => {
                let granularity = match group {
                    GroupSpec::Size(g) => Granularity::Group(*g),
                    GroupSpec::Kind(k) if k == "channel" => Granularity::Channel,
                    GroupSpec::Kind(k) if k == "tensor" => Granularity::Tensor,
                    GroupSpec::Kind(k) => {
                        return Err(QuantError::Scheme(format!(
                            "group = \"{k}\": expected a size, \"channel\" or \"tensor\""
                        )))
                    }
                };
                let scheme = QuantScheme {
                    bits: *bits,
                    grid: *grid,
                    granularity,
                    search: *search,
                };
                scheme.validate(granularity_len(granularity))?;
                Ok(Format::Scheme(scheme))
            }
        }
    }
}

fn granularity_len(g: Granularity) -> usize {
    match g {
        Granularity::Group(g) => g,
        _ => 1,
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum LayerSpec {
    /// `"all"`, `"more-bits"` (llama.cpp's use_more_bits), `"first-eighth"`, `"first-sixteenth"`.
    Named(String),
    List(Vec<usize>),
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    #[serde(rename = "match")]
    pub pattern: String,
    pub format: FormatSpec,
    #[serde(default)]
    pub layers: Option<LayerSpec>,
}

/// A quantization recipe.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    pub description: String,
    /// rtn, gptq, awq or awq-gptq.
    pub method: String,
    pub format: FormatSpec,
    /// The token embedding and output head; unset leaves them to the exporter's default.
    #[serde(default)]
    pub embeddings: Option<FormatSpec>,
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleSpec>,
    #[serde(default)]
    pub fallback: BTreeMap<String, String>,
    /// `"int8-per-token"`: activations quantized dynamically per token at every linear input
    /// (but those of `activations_except`).
    #[serde(default)]
    pub activations: Option<String>,
    /// Linears (rule patterns) whose inputs stay in 16 bits when `activations` is set.
    #[serde(default)]
    pub activations_except: Option<Vec<String>>,
    /// SmoothQuant migration strength alpha.
    #[serde(default)]
    pub smoothing: Option<f64>,
    /// GPTQ's Hessian blended toward its diagonal ([`crate::GptqConfig::blend`]), 0..=1.
    #[serde(default)]
    pub blend: Option<f64>,
    /// Every grid format's scale search on (the default's, the rules' and the fallbacks':
    /// q2_k's Q4_0 for 576-wide rows), as `--search` does.
    #[serde(default)]
    pub search: bool,
    /// gguf or hf.
    pub export: String,
}

impl Preset {
    /// A built-in preset by name, or a TOML file by path.
    pub fn load(name_or_path: &str) -> Result<Preset> {
        match Self::named(name_or_path) {
            Ok(p) => Ok(p),
            Err(_) if Path::new(name_or_path).exists() => {
                let text = std::fs::read_to_string(name_or_path)
                    .map_err(|e| QuantError::Scheme(format!("{name_or_path}: {e}")))?;
                Self::parse(&text, name_or_path)
            }
            Err(e) => Err(e),
        }
    }

    pub fn named(name: &str) -> Result<Preset> {
        let (_, text) = BUILTIN.iter().find(|(n, _)| *n == name).ok_or_else(|| {
            QuantError::Scheme(format!(
                "no preset or file '{name}' (presets: {})",
                BUILTIN
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        Self::parse(text, &format!("configs/quant/{name}.toml"))
    }

    /// Parses and checks a preset; errors name `source` and the line.
    pub fn parse(text: &str, source: &str) -> Result<Preset> {
        // The position and the parser's message only: never the file's text, which may not be
        // a preset at all (`preset = "/etc/passwd"`).
        let p: Preset = toml::from_str(text).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start.min(text.len()));
            let before = &text.as_bytes()[..offset];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            let column = offset
                - before
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(0, |i| i + 1)
                + 1;
            QuantError::Scheme(format!(
                "{source}: line {line}, column {column}: {}",
                e.message().trim()
            ))
        })?;
        p.plan()
            .and_then(|_| p.embeddings.as_ref().map(|e| e.resolve()).transpose())
            .map_err(|e| QuantError::Scheme(format!("{source}: {e}")))?;
        if !["rtn", "gptq", "awq", "awq-gptq"].contains(&p.method.as_str()) {
            return Err(QuantError::Scheme(format!(
                "{source}: method '{}' (expected rtn, gptq, awq or awq-gptq)",
                p.method
            )));
        }
        if !["gguf", "hf"].contains(&p.export.as_str()) {
            return Err(QuantError::Scheme(format!(
                "{source}: export '{}' (expected gguf or hf)",
                p.export
            )));
        }
        if let Some(a) = &p.activations {
            if a != "int8-per-token" {
                return Err(QuantError::Scheme(format!(
                    "{source}: activations '{a}' (expected int8-per-token)"
                )));
            }
        }
        if p.activations_except.is_some() && p.activations.is_none() {
            return Err(QuantError::Scheme(format!(
                "{source}: activations_except without activations"
            )));
        }
        for (key, value) in [("smoothing", p.smoothing), ("blend", p.blend)] {
            if let Some(v) = value.filter(|v| !(0.0..=1.0).contains(v)) {
                return Err(QuantError::Scheme(format!(
                    "{source}: {key} {v} is outside 0..=1"
                )));
            }
        }
        Ok(p)
    }

    /// The per-linear plan: formats, and which inputs are quantized.
    pub fn plan(&self) -> Result<QuantPlan> {
        let mut rules = Vec::with_capacity(self.rules.len());
        for r in &self.rules {
            let layers = match &r.layers {
                None => Layers::All,
                Some(LayerSpec::List(l)) => Layers::List(l.clone()),
                Some(LayerSpec::Named(n)) => match n.as_str() {
                    "all" => Layers::All,
                    "more-bits" => Layers::MoreBits,
                    "first-eighth" => Layers::FirstFraction(8),
                    "first-sixteenth" => Layers::FirstFraction(16),
                    other => {
                        return Err(QuantError::Scheme(format!(
                        "layers = \"{other}\" (expected all, more-bits, first-eighth, first-sixteenth or a list)"
                    )))
                    }
                },
            };
            rules.push(Rule {
                pattern: r.pattern.clone(),
                format: r.format.resolve()?,
                layers,
            });
        }
        let fallbacks = self
            .fallback
            .iter()
            .map(|(from, to)| Ok((Format::parse(from)?, Format::parse(to)?)))
            .collect::<Result<Vec<_>>>()?;
        let mut plan = QuantPlan {
            default: self.format.resolve()?,
            rules,
            fallbacks,
            // Checked when the preset was read: int8 per token, or none.
            activations: self.activations.as_ref().map(|_| crate::Activations {
                quant: shrink_models::ActQuant::Int8PerToken,
                except: self.activations_except.clone().unwrap_or_default(),
            }),
        };
        if self.search {
            plan.search_scales();
        }
        Ok(plan)
    }

    /// The embedding format for rows of `cols` values, after fallbacks.
    pub fn embeddings_for(&self, cols: usize) -> Result<Option<Format>> {
        let plan = self.plan()?;
        Ok(match &self.embeddings {
            Some(e) => Some(plan.fit(e.resolve()?, cols)),
            None => None,
        })
    }
}

#[cfg(test)]
mod tests;

//! Post-training weight quantization: llama.cpp-exact grids (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and their
//! b-bit generalisations), per-tensor / per-channel / per-group scales with an optional
//! error-minimising clip search, codes packed at their real bit width; k-quant blocks (Q2_K…Q6_K)
//! through candle's ggml quantizers, optionally importance-weighted; round-to-nearest, GPTQ (also
//! inside k-quant blocks), AWQ and SmoothQuant, calibrated block by block through `shrink-calib`'s
//! sequential engine; presets (`configs/quant`) and compressed-tensors export.
//!
//! ```
//! use shrink_quant::{rtn, QuantScheme};
//! let w: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) / 10.0).collect();
//! let q = rtn(&w, 2, 32, &QuantScheme::Q4_0, None, "example").unwrap();
//! assert_eq!(q.size_bytes(), 2 * 18); // two Q4_0 blocks: fp16 scale + 16 bytes of nibbles
//! let (_, blocks) = q.to_ggml_blocks().unwrap();
//! assert_eq!(blocks.len(), 36);
//! let back = q.dequantize();
//! assert!(w.iter().zip(&back).all(|(a, b)| (a - b).abs() <= 3.2 / 8.0));
//! ```

pub mod awq;
mod export;
mod grid;
pub mod iquant;
pub mod kquant;
mod methods;
pub mod pack;
mod preset;
pub mod qat;
pub mod signround;
pub mod smooth;
mod tensor;
mod write;
pub mod write_hf;

pub use export::{
    compressed_layout, compressed_tensors, hf_unsupported, quantization_config_of, Activations,
    HfExport,
};
pub use grid::{Grid, GroupParams};
pub use kquant::{CodeBlocks, CodeGrid, GgmlTensor, KQuant, KScales};
pub use methods::{gptq, gptq_blocks, rtn, rtn_blocks, GptqConfig};
pub use preset::{FormatSpec, Preset, BUILTIN as BUILTIN_PRESETS};
pub use shrink_core::iquant::IQuant;
pub use signround::SignRoundConfig;
pub use tensor::{Granularity, QuantScheme, QuantizedTensor};
pub use write::{quantize_streamed, write_quantized, QuantizedGguf, QuantizedOutput, Written};
pub use write_hf::QuantizedHf;

use candle_core::Tensor;
use shrink_calib::LinearStats;
use shrink_core::Progress;
use shrink_models::{BlockModel, Transformer};
use std::collections::BTreeMap;
use std::time::Instant;

/// Errors from quantization; each names the tensor.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("quantization scheme: {0}")]
    Scheme(String),
    #[error("tensor '{tensor}': {message}")]
    Shape { tensor: String, message: String },
    #[error(transparent)]
    Weights(#[from] shrink_core::WeightError),
    #[error(transparent)]
    Calib(#[from] shrink_calib::CalibError),
    #[error(transparent)]
    Model(#[from] shrink_models::ModelError),
    /// A quantized model that cannot be written where it was asked to go.
    #[error("{0}")]
    Export(String),
    #[error(transparent)]
    Io(#[from] shrink_io::IoError),
    /// Quantization-aware training refused its configuration or failed.
    #[error("quantization scheme: {0}")]
    Train(#[from] shrink_train::TrainError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, QuantError>;

/// Which algorithm chooses the codes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Method {
    Rtn,
    Gptq(GptqConfig),
    /// AWQ scales (α grid of `grid` points) folded into the model, then RTN, or GPTQ when given.
    Awq {
        grid: usize,
        gptq: Option<GptqConfig>,
    },
    /// SmoothQuant scales with migration strength `alpha`, then RTN or GPTQ.
    SmoothQuant {
        alpha: f64,
        gptq: Option<GptqConfig>,
    },
    /// Rounding learned per block by signed gradient descent ([`signround`]).
    SignRound(SignRoundConfig),
}

/// The storage format of one quantized weight: a grid scheme (any bits and granularity; the
/// llama.cpp-compatible ones map to Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 blocks), a k-quant or an i-quant
/// block type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    Scheme(QuantScheme),
    K(KQuant),
    I(IQuant),
}

impl Format {
    /// Parses a ggml type name: q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k,
    /// iq4_nl, iq4_xs, iq3_s, iq3_xxs, iq2_s, iq2_xs, iq2_xxs.
    pub fn parse(name: &str) -> Result<Format> {
        let lower = name.to_ascii_lowercase();
        Ok(match lower.as_str() {
            "q4_0" => Format::Scheme(QuantScheme::Q4_0),
            "q4_1" => Format::Scheme(QuantScheme::Q4_1),
            "q5_0" => Format::Scheme(QuantScheme::Q5_0),
            "q5_1" => Format::Scheme(QuantScheme::Q5_1),
            "q8_0" => Format::Scheme(QuantScheme::Q8_0),
            other => match KQuant::ALL.into_iter().find(|k| k.name() == other) {
                Some(k) => Format::K(k),
                None => match IQuant::ALL.into_iter().find(|q| q.name() == other) {
                    Some(q) => Format::I(q),
                    None => {
                        return Err(QuantError::Scheme(format!(
                            "unknown block type '{name}' (known: q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k, iq4_nl, iq4_xs, iq3_s, iq3_xxs, iq2_s, iq2_xs, iq2_xxs)"
                        )))
                    }
                },
            },
        })
    }

    pub fn ggml_type(&self) -> Option<shrink_io::ggml::GgmlType> {
        match self {
            Format::Scheme(s) => s.ggml_type(),
            Format::K(k) => Some(k.ggml()),
            Format::I(q) => Some(shrink_io::ggml::GgmlType::of_iquant(*q)),
        }
    }

    /// The ggml type name (`q4_k`), or a description of a grid scheme without one.
    pub fn label(&self) -> String {
        match self {
            Format::K(k) => k.name().to_string(),
            Format::I(q) => q.name().to_string(),
            Format::Scheme(s) => match s.ggml_type() {
                Some(t) => format!("{t:?}").to_lowercase(),
                None => format!(
                    "int{} {} {}",
                    s.bits,
                    match s.grid {
                        Grid::Asymmetric => "asymmetric",
                        _ => "symmetric",
                    },
                    match s.granularity {
                        Granularity::Tensor => "per-tensor".to_string(),
                        Granularity::Channel => "per-channel".to_string(),
                        Granularity::Group(g) => format!("g{g}"),
                    }
                ),
            },
        }
    }

    /// Weights per block along a row: a row length must be a multiple of it.
    pub fn row_multiple(&self) -> usize {
        match self {
            Format::Scheme(s) => match s.granularity {
                Granularity::Group(g) => g,
                _ => 1,
            },
            Format::K(_) => kquant::QK_K,
            Format::I(q) => q.block_size(),
        }
    }

    /// The grid scheme closest to this format, for searches that simulate quantization (AWQ).
    pub fn simulation_scheme(&self) -> QuantScheme {
        match *self {
            Format::Scheme(s) => s,
            Format::K(k) => QuantScheme {
                bits: k.bits(),
                grid: match k {
                    KQuant::Q3K | KQuant::Q6K => Grid::SymmetricFull,
                    _ => Grid::Asymmetric,
                },
                granularity: Granularity::Group(k.group()),
                search: false,
            },
            // Codes under one scale per 32 weights (a non-uniform codebook or grid).
            Format::I(q) => QuantScheme {
                bits: q.bits(),
                grid: Grid::SymmetricFull,
                granularity: Granularity::Group(32),
                search: false,
            },
        }
    }

    /// The same format with the grid schemes' clip search switched on or off.
    pub fn with_search(self, search: bool) -> Format {
        match self {
            Format::Scheme(s) => Format::Scheme(QuantScheme { search, ..s }),
            k => k,
        }
    }
}

impl From<QuantScheme> for Format {
    fn from(s: QuantScheme) -> Self {
        Format::Scheme(s)
    }
}

/// A quantized weight in its stored, packed form.
#[derive(Debug, Clone, PartialEq)]
pub enum QuantizedWeight {
    Packed(QuantizedTensor),
    Blocks(GgmlTensor),
}

impl QuantizedWeight {
    pub fn dequantize(&self) -> Result<Vec<f32>> {
        match self {
            QuantizedWeight::Packed(q) => Ok(q.dequantize()),
            QuantizedWeight::Blocks(b) => b.dequantize(),
        }
    }

    /// The fraction of weights whose value is exactly zero.
    pub fn zero_fraction(&self) -> Result<f64> {
        match self {
            QuantizedWeight::Packed(q) => Ok(q.zero_fraction()),
            QuantizedWeight::Blocks(b) => b.zero_fraction(),
        }
    }

    pub fn size_bytes(&self) -> usize {
        match self {
            QuantizedWeight::Packed(q) => q.size_bytes(),
            QuantizedWeight::Blocks(b) => b.size_bytes(),
        }
    }

    pub fn bits_per_weight(&self) -> f64 {
        match self {
            QuantizedWeight::Packed(q) => q.bits_per_weight(),
            QuantizedWeight::Blocks(b) => b.bits_per_weight(),
        }
    }

    /// The ggml type and blocks llama.cpp reads.
    pub fn into_ggml_blocks(self) -> Result<(shrink_io::ggml::GgmlType, Vec<u8>)> {
        match self {
            QuantizedWeight::Packed(q) => q.to_ggml_blocks(),
            QuantizedWeight::Blocks(b) => Ok((b.dtype, b.bytes)),
        }
    }
}

/// Quantizes one weight matrix by round-to-nearest into `format`; `importance` (one weight per
/// input column) steers the scale search of grid schemes and the k-quants' importance-weighted
/// quantizer (llama.cpp's imatrix). With `ggml`, a scheme that is a legacy ggml block type is
/// written straight into its blocks ([`QuantizedWeight::Blocks`], the same bytes): for a GGUF
/// that nothing reads back.
pub fn rtn_format(
    w: &[f32],
    rows: usize,
    cols: usize,
    format: &Format,
    importance: Option<&[f32]>,
    name: &str,
    ggml: bool,
) -> Result<QuantizedWeight> {
    Ok(match format {
        Format::Scheme(s) if ggml && s.ggml_type().is_some() => {
            QuantizedWeight::Blocks(rtn_blocks(w, rows, cols, s, importance, name)?)
        }
        Format::Scheme(s) => QuantizedWeight::Packed(rtn(w, rows, cols, s, importance, name)?),
        Format::K(_) | Format::I(_) => {
            let ty = format.ggml_type().unwrap_or(shrink_io::ggml::GgmlType::F32);
            QuantizedWeight::Blocks(GgmlTensor::quantize(w, rows, cols, ty, importance, name)?)
        }
    })
}

/// Which layers a rule applies to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Layers {
    #[default]
    All,
    /// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third one
    /// between them.
    MoreBits,
    /// Layers whose index is below `n_layers / d`.
    FirstFraction(usize),
    List(Vec<usize>),
}

impl Layers {
    pub fn contains(&self, layer: usize, n_layers: usize) -> bool {
        match self {
            Layers::All => true,
            Layers::MoreBits => {
                let (i, n) = (layer as i64, n_layers as i64);
                i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
            }
            Layers::FirstFraction(d) => layer < n_layers / d,
            Layers::List(l) => l.contains(&layer),
        }
    }
}

/// Linears whose name matches `pattern` (in the selected layers) get `format`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub pattern: String,
    pub format: Format,
    pub layers: Layers,
}

impl Rule {
    pub fn new(pattern: impl Into<String>, format: impl Into<Format>) -> Self {
        Self {
            pattern: pattern.into(),
            format: format.into(),
            layers: Layers::All,
        }
    }
}

/// A format for every linear: `default`, except where a rule matches the name (the last matching
/// one wins). A pattern with `*` is a glob over the whole name (`model.layers.*.mlp.down_proj`);
/// without, it matches any name containing it (`down_proj`). A format whose blocks do not divide
/// a row length is replaced through `fallbacks` (llama.cpp: Q4_K → Q5_0 on 576-wide rows).
/// `activations` says which linears' inputs are quantized too (W8A8): SmoothQuant smooths only
/// those inputs, and the export and the loader round them.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantPlan {
    pub default: Format,
    pub rules: Vec<Rule>,
    pub fallbacks: Vec<(Format, Format)>,
    pub activations: Option<Activations>,
}

impl QuantPlan {
    pub fn uniform(format: impl Into<Format>) -> Self {
        Self {
            default: format.into(),
            rules: vec![],
            fallbacks: vec![],
            activations: None,
        }
    }

    /// The format of the linear called `name`, with rows of `cols` values, in a model of
    /// `n_layers` layers.
    pub fn format_for(&self, name: &str, cols: usize, n_layers: usize) -> Format {
        let layer = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next()?.parse::<usize>().ok());
        let format = self
            .rules
            .iter()
            .rev()
            .find(|r| {
                shrink_models::name_matches(&r.pattern, name)
                    && layer.is_none_or(|l| r.layers.contains(l, n_layers))
            })
            .map(|r| r.format)
            .unwrap_or(self.default);
        self.fit(format, cols)
    }

    /// Checks, before any work, that every linear of a model of `config` gets a format whose
    /// blocks divide its rows.
    pub fn check_model(&self, config: &shrink_models::ModelConfig) -> Result<()> {
        let n_layers = config.num_hidden_layers;
        for (name, shape) in config.expected_tensors() {
            let Some(name) = name.strip_suffix(".weight") else {
                continue;
            };
            if shrink_models::Role::of_name(name).is_none() || shape.len() != 2 {
                continue;
            }
            let cols = shape[1];
            let format = self.format_for(name, cols, n_layers);
            let multiple = format.row_multiple();
            if !cols.is_multiple_of(multiple) {
                return Err(QuantError::Shape {
                    tensor: name.to_string(),
                    message: format!(
                        "{} needs rows that are a multiple of {multiple} values, this one has {cols}",
                        format.label()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Every grid format of the plan (the default, the rules' and the fallbacks') with its
    /// scale search switched on: `--search`, or a preset's `search = true`.
    pub fn search_scales(&mut self) {
        self.default = self.default.with_search(true);
        for r in &mut self.rules {
            r.format = r.format.with_search(true);
        }
        // The fallbacks too (q2_k's Q4_0 for rows that are not whole k-quant blocks).
        for (_, to) in &mut self.fallbacks {
            *to = to.with_search(true);
        }
    }

    /// `format`, or its fallback when its blocks do not divide rows of `cols` values.
    pub fn fit(&self, mut format: Format, cols: usize) -> Format {
        for _ in 0..self.fallbacks.len() {
            if cols.is_multiple_of(format.row_multiple()) {
                break;
            }
            match self.fallbacks.iter().find(|(from, _)| *from == format) {
                Some((_, to)) => format = *to,
                None => break,
            }
        }
        format
    }
}

/// What happened to one linear layer.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayerReport {
    pub name: String,
    /// The stored format (`q4_k`, `q5_0`, `int4 symmetric g128`).
    pub format: String,
    pub shape: [usize; 2],
    pub bits_per_weight: f64,
    /// ‖(W − Ŵ)X‖² / ‖WX‖² on the calibration inputs (when calibration data was given).
    pub relative_output_error: Option<f64>,
    /// Fraction of the stored weight's values that are exactly zero: a pruning mask that was
    /// kept, and values rounded to zero.
    pub zero_fraction: f64,
    pub wall_s: f64,
}

/// Fraction of `values` that are exactly zero.
pub fn zero_fraction(values: &[f32]) -> f64 {
    values.iter().filter(|&&v| v == 0.0).count() as f64 / values.len().max(1) as f64
}

/// The quantized linears of a model, by Hugging Face weight name (`….q_proj.weight`).
#[derive(Debug, Clone, Default)]
pub struct QuantizedModel {
    pub tensors: BTreeMap<String, QuantizedWeight>,
    pub layers: Vec<LayerReport>,
    /// The block a resumed streamed quantization started at.
    pub resumed_at: Option<usize>,
}

/// One weight `w` (`rows × cols`) in `format` by `method`: GPTQ (which needs the input
/// statistics `stats`) or round-to-nearest (weighted by the Hessian's diagonal when `stats` are
/// given, as llama.cpp's imatrix). AWQ and SmoothQuant rescale a whole block first and are
/// resolved to one of these by [`quantize_model`]. `ggml` as in [`rtn_format`].
#[allow(clippy::too_many_arguments)]
pub fn quantize_tensor(
    w: &[f32],
    rows: usize,
    cols: usize,
    method: Method,
    stats: Option<&LinearStats>,
    format: Format,
    name: &str,
    ggml: bool,
) -> Result<QuantizedWeight> {
    Ok(match (method, stats, format) {
        (Method::Gptq(cfg), Some(st), Format::Scheme(s)) => {
            QuantizedWeight::Packed(gptq(w, rows, cols, st, &s, &cfg, name)?)
        }
        (Method::Gptq(cfg), Some(st), Format::K(k)) => QuantizedWeight::Blocks(gptq_blocks(
            w,
            rows,
            cols,
            st,
            CodeBlocks::K(k),
            &cfg,
            name,
        )?),
        (Method::Gptq(cfg), Some(st), Format::I(q)) => QuantizedWeight::Blocks(gptq_blocks(
            w,
            rows,
            cols,
            st,
            CodeBlocks::I(q),
            &cfg,
            name,
        )?),
        (Method::Gptq(_), None, _) => {
            return Err(QuantError::Scheme(format!(
                "GPTQ needs calibration data for '{name}'"
            )))
        }
        (Method::Awq { .. } | Method::SmoothQuant { .. }, _, _) => {
            return Err(QuantError::Scheme(
                "AWQ and SmoothQuant resolve to RTN or GPTQ per layer".into(),
            ))
        }
        (Method::SignRound(_), _, _) => {
            return Err(QuantError::Scheme(format!(
                "SignRound learns a whole block's rounding at once, not '{name}' alone"
            )))
        }
        (Method::Rtn, st, format) => {
            let importance: Option<Vec<f32>> =
                st.map(|s| (0..cols).map(|i| s.hessian[i * cols + i] as f32).collect());
            rtn_format(w, rows, cols, &format, importance.as_deref(), name, ggml)?
        }
    })
}

/// Quantizes every linear of every decoder block with its scheme from `plan` (embeddings, norms
/// and the output head are left as they are) and replaces each weight in `model` by its
/// dequantized value, so that evaluating the model measures the quantized weights. GPTQ needs
/// calibration `windows`; with RTN they are optional and only add the per-layer output error to
/// the report.
pub fn quantize_model(
    model: &mut Transformer,
    method: Method,
    plan: &QuantPlan,
    windows: Option<&[Vec<u32>]>,
    batch: usize,
    progress: &dyn Progress,
) -> Result<QuantizedModel> {
    let mut tensors = BTreeMap::new();
    let mut out = quantize_blocks(
        model,
        method,
        plan,
        windows,
        batch,
        &shrink_core::Alone,
        progress,
        None,
        Default::default(),
        false,
        &mut |_, quantized| {
            tensors.append(quantized);
            Ok(())
        },
        &mut |_, _, _| Ok(()),
    )?;
    out.tensors = tensors;
    Ok(out)
}

/// What [`quantize_blocks`] hands each quantized block to: the block and its quantized weights.
pub type BlockDone<'a> =
    dyn FnMut(&shrink_models::Block, &mut BTreeMap<String, QuantizedWeight>) -> Result<()> + 'a;

/// What [`quantize_blocks`] calls once a block is finished: its index, the calibration
/// activations leaving it (when calibrating) and the reports of every layer quantized so far.
pub type BlockFinished<'a> =
    dyn FnMut(usize, Option<&shrink_calib::Activations>, &[LayerReport]) -> Result<()> + 'a;

/// [`quantize_model`] block by block on any [`BlockModel`]: `done` receives each block once its
/// linears are quantized (and hold their dequantized values), with their quantized weights by
/// weight name, and keeps what it takes out of the map; the rest is dropped. The result holds the
/// per-layer reports (its `tensors` stay empty). On a [`shrink_models::StreamedModel`] only one
/// block is ever in memory, so `done` writes it. A resumed job gives `start` (the first block to
/// quantize and, when calibrating, the activations entering it) and records its progress in
/// `finished`; the reports then cover the blocks from `start` on. Calibration is split across the
/// ranks of `world` ([`shrink_calib::sequential_from`]); every rank quantizes every block. The
/// calibration activations are kept as `keep` says ([`shrink_calib::Keep`]). With `ggml` (`done`
/// writes a GGUF), a weight nothing reads back — rounded without calibration in a block that is
/// not kept — goes straight into its ggml blocks ([`rtn_format`]).
#[allow(clippy::too_many_arguments)]
pub fn quantize_blocks<M: BlockModel>(
    model: &mut M,
    method: Method,
    plan: &QuantPlan,
    windows: Option<&[Vec<u32>]>,
    batch: usize,
    world: &dyn shrink_core::Collective,
    progress: &dyn Progress,
    start: Option<shrink_calib::Resume>,
    keep: shrink_calib::Keep,
    ggml: bool,
    done: &mut BlockDone<'_>,
    finished: &mut BlockFinished<'_>,
) -> Result<QuantizedModel> {
    plan.check_model(model.config())?;
    if matches!(method, Method::SignRound(_)) && world.size() > 1 {
        return Err(QuantError::Scheme(
            "SignRound runs on one process: its gradient steps are not split across ranks".into(),
        ));
    }
    let layers = std::cell::RefCell::new(Vec::new());
    let n_layers = model.num_blocks();
    let keeps_blocks = model.keeps_blocks();
    let mut quantize_block = |block: &mut shrink_models::Block,
                              stats: Option<&shrink_calib::BlockStats>,
                              inputs: Option<&shrink_calib::BlockInputs>|
     -> Result<()> {
        let names: Vec<String> = block.linears().iter().map(|(n, _)| n.to_string()).collect();
        // AWQ rescales the block first; its linears then see scaled inputs.
        let scaled = match (method, stats) {
            (Method::Awq { grid, .. }, Some(stats)) => {
                awq::apply(block, stats, &plan.default.simulation_scheme(), grid)?
            }
            (Method::SmoothQuant { alpha, .. }, Some(stats)) => {
                smooth::apply(block, stats, alpha, plan.activations.as_ref())?
            }
            (Method::Awq { .. }, None) => {
                return Err(QuantError::Scheme("AWQ needs calibration data".into()))
            }
            (Method::SmoothQuant { .. }, None) => {
                return Err(QuantError::Scheme(
                    "SmoothQuant needs calibration data".into(),
                ))
            }
            _ => BTreeMap::new(),
        };
        // SignRound learns every linear's codes of the block together; each linear's report
        // carries an equal share of that time.
        let learning = Instant::now();
        let mut learned = match (method, stats, inputs) {
            (Method::SignRound(cfg), Some(stats), Some(inputs)) => {
                let formats: Vec<(String, Format)> = names
                    .iter()
                    .map(|name| {
                        let cols = block_linear(block, name)?.weight().dim(1)?;
                        Ok((name.clone(), plan.format_for(name, cols, n_layers)))
                    })
                    .collect::<Result<_>>()?;
                signround::learn(block, stats, inputs, &formats, &cfg)?
            }
            (Method::SignRound(_), _, _) => {
                return Err(QuantError::Scheme(
                    "SignRound needs calibration data".into(),
                ))
            }
            _ => BTreeMap::new(),
        };
        let learned_any = !learned.is_empty();
        let learned_share = learning.elapsed().as_secs_f64() / names.len().max(1) as f64;
        let method = match method {
            Method::Awq {
                gptq: Some(cfg), ..
            } => Method::Gptq(cfg),
            Method::Awq { gptq: None, .. } => Method::Rtn,
            Method::SmoothQuant {
                gptq: Some(cfg), ..
            } => Method::Gptq(cfg),
            Method::SmoothQuant { gptq: None, .. } => Method::Rtn,
            m => m,
        };
        let mut quantized = BTreeMap::new();
        for name in names {
            let start = Instant::now();
            // The weight's own storage, read in place (the block gets a new tensor below).
            let weight = block_linear(block, &name)?.weight().clone();
            let (rows, cols) = weight.dims2()?;
            let w = shrink_models::F32Values::of(&weight)?;
            let format = plan.format_for(&name, cols, n_layers);
            let layer_stats = scaled
                .get(&name)
                .or_else(|| stats.and_then(|s| s.get(&name)));
            let read_back = layer_stats.is_some() || keeps_blocks;
            let q = match learned.remove(&name) {
                Some(q) => q,
                None => quantize_tensor(
                    &w,
                    rows,
                    cols,
                    method,
                    layer_stats,
                    format,
                    &name,
                    ggml && !read_back,
                )?,
            };
            // The dequantized weight is measured (output error) and goes back into the block
            // when something reads it after: the next block's calibration, or a model kept whole
            // (evaluated afterwards). A streamed block without calibration is only written, then
            // dropped, and never dequantized.
            let zeros = q.zero_fraction()?;
            let mut error = None;
            if read_back {
                let deq = q.dequantize()?;
                error = layer_stats
                    .map(|st| st.relative_output_error(&w, &deq))
                    .transpose()?;
                let linear = block_linear(block, &name)?;
                linear.set_weight(Tensor::from_vec(
                    deq,
                    (rows, cols),
                    linear.weight().device(),
                )?)?;
            }
            layers.borrow_mut().push(LayerReport {
                name: name.clone(),
                format: format.label(),
                shape: [rows, cols],
                bits_per_weight: q.bits_per_weight(),
                relative_output_error: error,
                zero_fraction: zeros,
                wall_s: start.elapsed().as_secs_f64()
                    + if learned_any { learned_share } else { 0.0 },
            });
            quantized.insert(format!("{name}.weight"), q);
        }
        done(block, &mut quantized)
    };
    match windows {
        Some(windows) => {
            shrink_calib::sequential_from(
                model,
                windows,
                batch,
                true,
                world,
                progress,
                start,
                keep,
                &mut |block, stats, inputs| quantize_block(block, Some(stats), Some(inputs)),
                &mut |index, xs| finished(index, Some(xs), &layers.borrow()),
            )?;
        }
        None => {
            let first = start.map_or(0, |s| s.block);
            progress.start("quantizing blocks", n_layers as u64);
            progress.advance(first as u64, None);
            for index in first..n_layers {
                model.with_block(index, |block| quantize_block(block, None, None))??;
                finished(index, None, &layers.borrow())?;
                progress.advance(1, None);
            }
            progress.finish();
        }
    }
    Ok(QuantizedModel {
        layers: layers.into_inner(),
        ..Default::default()
    })
}

fn block_linear<'a>(
    block: &'a mut shrink_models::Block,
    name: &str,
) -> Result<&'a mut shrink_models::Linear> {
    block.linear_mut(name).ok_or_else(|| {
        QuantError::Model(shrink_models::ModelError::UnknownLinear(name.to_string()))
    })
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod plan_tests {
    use super::*;

    #[test]
    fn overrides_match_by_substring_or_glob_last_wins() {
        let plan = QuantPlan {
            default: QuantScheme::Q4_0.into(),
            rules: vec![
                Rule::new("down_proj", QuantScheme::Q8_0),
                Rule::new("model.layers.1*.mlp.down_proj", QuantScheme::Q4_1),
            ],
            fallbacks: vec![],
            activations: None,
        };
        let f = |name: &str| plan.format_for(name, 1536, 30);
        assert_eq!(
            f("model.layers.0.self_attn.q_proj"),
            QuantScheme::Q4_0.into()
        );
        assert_eq!(f("model.layers.2.mlp.down_proj"), QuantScheme::Q8_0.into());
        assert_eq!(f("model.layers.12.mlp.down_proj"), QuantScheme::Q4_1.into());
        assert!(shrink_models::name_matches("*", "anything"));
        assert!(shrink_models::name_matches("a*b*c", "a-x-b-y-c"));
        assert!(!shrink_models::name_matches("a*b*c", "a-x-c-y-b"));
        assert!(!shrink_models::name_matches("ab*ba", "aba"));
    }

    #[test]
    fn layer_selection_and_fallbacks_follow_llama_cpp() {
        // use_more_bits for 30 layers: 0..3, 26..29 and every third from 3 + 2.
        let more: Vec<usize> = (0..30)
            .filter(|&i| Layers::MoreBits.contains(i, 30))
            .collect();
        assert_eq!(
            more,
            vec![0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
        );
        let q4k = Format::K(KQuant::Q4K);
        let q6k = Format::K(KQuant::Q6K);
        let plan = QuantPlan {
            default: q4k,
            rules: vec![Rule {
                pattern: "v_proj".into(),
                format: q6k,
                layers: Layers::MoreBits,
            }],
            fallbacks: vec![
                (q4k, QuantScheme::Q5_0.into()),
                (q6k, QuantScheme::Q8_0.into()),
            ],
            activations: None,
        };
        assert_eq!(
            plan.format_for("model.layers.4.mlp.down_proj", 1536, 30),
            q4k
        );
        assert_eq!(
            plan.format_for("model.layers.4.mlp.up_proj", 576, 30),
            QuantScheme::Q5_0.into()
        );
        assert_eq!(
            plan.format_for("model.layers.5.self_attn.v_proj", 576, 30),
            QuantScheme::Q8_0.into()
        );
        assert_eq!(
            plan.format_for("model.layers.4.self_attn.v_proj", 576, 30),
            QuantScheme::Q5_0.into()
        );
        assert_eq!(
            plan.format_for("model.layers.5.self_attn.v_proj", 512, 30),
            q6k
        );
    }
}

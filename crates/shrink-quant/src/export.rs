//! Hugging Face export in compressed-tensors' layout, the format vLLM and transformers load:
//! weight-only schemes as `pack-quantized` (int4/int8 codes packed into int32 along the input,
//! `weight_packed`, `weight_scale`, `weight_shape`), W8A8 as `int-quantized` (int8 `weight`,
//! per-channel `weight_scale`, dynamic per-token int8 activations). The codes and fp16 scales are
//! the quantizer's own: nothing is re-rounded.

use crate::{Granularity, Grid, QuantError, QuantizedWeight, Result};
use shrink_io::RawTensor;
use shrink_models::ActQuant;
use std::collections::BTreeMap;

/// Dynamic activation quantization: `quant` at the input of every block linear except those
/// whose name matches a pattern of `except` (as a rule's pattern: a substring, or a glob with
/// `*`), whose inputs stay in 16 bits (W8A8 with `mlp.down_proj` kept: its inputs, the gated
/// product, carry the outliers smoothing does not tame).
///
/// ```
/// use shrink_models::ActQuant;
/// let a = shrink_quant::Activations { quant: ActQuant::Int8PerToken, except: vec!["down_proj".into()] };
/// assert_eq!(a.for_linear("model.layers.3.mlp.up_proj"), Some(ActQuant::Int8PerToken));
/// assert_eq!(a.for_linear("model.layers.3.mlp.down_proj"), None);
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Activations {
    pub quant: ActQuant,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<String>,
}

impl Activations {
    /// How the inputs of the linear called `name` are quantized, if they are.
    pub fn for_linear(&self, name: &str) -> Option<ActQuant> {
        let kept = self
            .except
            .iter()
            .any(|p| shrink_models::name_matches(p, name));
        (!kept).then_some(self.quant)
    }
}

/// Tensors (by safetensors name) and the `quantization_config` for `config.json`.
#[derive(Debug, Clone)]
pub struct HfExport {
    pub tensors: BTreeMap<String, RawTensor>,
    pub quantization_config: serde_json::Value,
}

/// Why `format` cannot be written to a compressed-tensors folder (with int8 activations when
/// `activations`), if it cannot: checked when a job is resolved, before any work.
pub fn hf_unsupported(format: &crate::Format, activations: bool) -> Option<String> {
    let s = match format {
        crate::Format::Scheme(s) => s,
        crate::Format::K(_) | crate::Format::I(_) => {
            return Some(format!(
                "{} blocks exist in GGUF only; export to a Hugging Face folder with a grid scheme (e.g. the w4a16-g128 preset)",
                format.label()
            ))
        }
    };
    if s.grid == Grid::Asymmetric {
        return Some("asymmetric grids store a float minimum per group, which compressed-tensors cannot represent; use a symmetric grid".into());
    }
    if !(s.bits == 4 || s.bits == 8) {
        return Some(format!(
            "compressed-tensors packs 4- or 8-bit integers, not {}-bit",
            s.bits
        ));
    }
    if activations && (s.bits != 8 || s.granularity != Granularity::Channel) {
        return Some("int8 activations need int8 per-channel weights (the w8a8 preset)".into());
    }
    None
}

/// Converts quantized linears (by weight name, `….weight`) to compressed-tensors tensors. Grids
/// must be symmetric (compressed-tensors stores integer zero points, not float minima). `ignore`
/// names the model's other linears, kept in 16 bits
/// ([`shrink_models::ModelConfig::hf_linear_modules`]): the config's `ignore` list.
pub fn compressed_tensors(
    weights: &BTreeMap<String, QuantizedWeight>,
    activations: Option<&Activations>,
    ignore: Vec<String>,
) -> Result<HfExport> {
    let mut tensors = BTreeMap::new();
    let mut groups: Groups = BTreeMap::new();
    for (name, w) in weights {
        let q = match w {
            QuantizedWeight::Packed(q) => q,
            QuantizedWeight::Blocks(b) => {
                return Err(QuantError::Scheme(format!(
                    "'{name}' is stored as {:?} blocks, which exist in GGUF only; export it to a Hugging Face folder with a grid scheme (e.g. the w4a16-g128 preset)",
                    b.dtype
                )))
            }
        };
        let module = name
            .strip_suffix(".weight")
            .ok_or_else(|| QuantError::Scheme(format!("'{name}' is not a weight (….weight)")))?;
        let s = q.scheme;
        if let Some(why) = hf_unsupported(&crate::Format::Scheme(s), activations.is_some()) {
            return Err(QuantError::Scheme(format!("'{name}': {why}")));
        }
        let (_, _, scale_shape) = strategy_of(&s, q.rows, q.cols);
        let offset = 1i16 << (s.bits - 1);
        let signed: Vec<i8> = q
            .codes()
            .iter()
            .map(|&c| (c as i16 - offset) as i8)
            .collect();
        tensors.insert(
            format!("{module}.weight_scale"),
            RawTensor::f16(scale_shape, &q.scales),
        );
        if activations.is_some() {
            tensors.insert(
                format!("{module}.weight"),
                RawTensor::i8(vec![q.rows, q.cols], &signed),
            );
        } else {
            let packed = shrink_io::pack_rows(&signed, s.bits as u32, q.rows, q.cols);
            let per_row = packed.len() / q.rows;
            tensors.insert(
                format!("{module}.weight_packed"),
                RawTensor::i32(vec![q.rows, per_row], &packed),
            );
            tensors.insert(
                format!("{module}.weight_shape"),
                RawTensor::i64(vec![2], &[q.rows as i64, q.cols as i64]),
            );
        }
        groups
            .entry(group_key(&s, q.rows, q.cols, module, activations))
            .or_default()
            .push(module.to_string());
    }
    Ok(HfExport {
        tensors,
        quantization_config: quantization_config(groups, activations, ignore),
    })
}

/// compressed-tensors' strategy name, group size and scale shape of a `rows × cols` weight.
fn strategy_of(
    s: &crate::QuantScheme,
    rows: usize,
    cols: usize,
) -> (&'static str, Option<usize>, Vec<usize>) {
    match s.granularity {
        Granularity::Tensor => ("tensor", None, vec![1]),
        Granularity::Channel => ("channel", None, vec![rows, 1]),
        Granularity::Group(g) => ("group", Some(g), vec![rows, cols / g]),
    }
}

/// The tensors (name, safetensors type, shape) [`compressed_tensors`] writes for the weight of
/// `module` (`rows × cols`, quantized by `s`), known before it is quantized: what a folder written
/// as its blocks finish plans its shards from. `None` when compressed-tensors cannot hold it.
pub fn compressed_layout(
    module: &str,
    s: &crate::QuantScheme,
    rows: usize,
    cols: usize,
    activations: bool,
) -> Option<Vec<shrink_io::SafetensorsEntry>> {
    if hf_unsupported(&crate::Format::Scheme(*s), activations).is_some() {
        return None;
    }
    let entry = |suffix: &str, dtype, shape| shrink_io::SafetensorsEntry {
        name: format!("{module}.{suffix}"),
        dtype,
        shape,
    };
    let (_, _, scale_shape) = strategy_of(s, rows, cols);
    let scale = entry("weight_scale", safetensors::Dtype::F16, scale_shape);
    Some(if activations {
        vec![
            entry("weight", safetensors::Dtype::I8, vec![rows, cols]),
            scale,
        ]
    } else {
        let per_row = cols.div_ceil((32 / s.bits) as usize);
        vec![
            entry(
                "weight_packed",
                safetensors::Dtype::I32,
                vec![rows, per_row],
            ),
            scale,
            entry("weight_shape", safetensors::Dtype::I64, vec![2]),
        ]
    })
}

/// The `quantization_config` of a folder whose quantized modules are `modules` (name → scheme
/// and shape) and whose other linears are `ignore`, as [`compressed_tensors`] writes it.
pub fn quantization_config_of(
    modules: &BTreeMap<String, (crate::QuantScheme, usize, usize)>,
    activations: Option<&Activations>,
    ignore: Vec<String>,
) -> serde_json::Value {
    let mut groups: Groups = BTreeMap::new();
    for (module, (s, rows, cols)) in modules {
        groups
            .entry(group_key(s, *rows, *cols, module, activations))
            .or_default()
            .push(module.clone());
    }
    quantization_config(groups, activations, ignore)
}

/// (bits, strategy, group size, int8 inputs) → module names.
type Groups = BTreeMap<GroupKey, Vec<String>>;
type GroupKey = (u8, &'static str, Option<usize>, bool);

/// The config group of `module` (`rows × cols`, quantized by `s`).
fn group_key(
    s: &crate::QuantScheme,
    rows: usize,
    cols: usize,
    module: &str,
    activations: Option<&Activations>,
) -> GroupKey {
    let (strategy, group, _) = strategy_of(s, rows, cols);
    let a8 = activations.and_then(|a| a.for_linear(module)).is_some();
    (s.bits, strategy, group, a8)
}

/// The config: one group per distinct scheme, targeting every `Linear` when there is one (what
/// llm-compressor writes), else each group its modules by name; `ignore` lists the linears left
/// in 16 bits, which a `Linear` target would otherwise claim.
fn quantization_config(
    groups: Groups,
    activations: Option<&Activations>,
    ignore: Vec<String>,
) -> serde_json::Value {
    let uniform = groups.len() == 1;
    let format = if activations.is_some() {
        "int-quantized"
    } else {
        "pack-quantized"
    };
    let config_groups: serde_json::Map<String, serde_json::Value> = groups
        .into_iter()
        .enumerate()
        .map(|(i, ((bits, strategy, group, a8), modules))| {
            let input = a8.then(|| {
                serde_json::json!({
                    "num_bits": 8, "type": "int", "symmetric": true, "strategy": "token",
                    "dynamic": true, "group_size": null, "block_structure": null,
                    "actorder": null, "observer": null, "observer_kwargs": {}
                })
            });
            (
                format!("group_{i}"),
                serde_json::json!({
                    "targets": if uniform { vec!["Linear".to_string()] } else { modules },
                    "weights": {
                        "num_bits": bits, "type": "int", "symmetric": true,
                        "strategy": strategy, "group_size": group, "dynamic": false,
                        "block_structure": null, "actorder": null,
                        "observer": "minmax", "observer_kwargs": {}
                    },
                    "input_activations": input,
                    "output_activations": null,
                    // Each group's own: compressed-tensors otherwise infers a weight-only
                    // group's format (W8A8's down_proj) as pack-quantized and reads int8
                    // weights as packed words.
                    "format": format,
                }),
            )
        })
        .collect();
    serde_json::json!({
        "quant_method": "compressed-tensors",
        "format": format,
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ignore,
        "kv_cache_scheme": null,
        "global_compression_ratio": null,
    })
}

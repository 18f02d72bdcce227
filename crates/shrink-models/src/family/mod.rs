//! Model families: what each family's files call things. One module per family holds its
//! checkpoint (Hugging Face) tensor names, its GGUF tensor names and the config keys it spells its
//! own way; the model code, the GGUF reader and writer and the config parser read them from here.
//!
//! Adding a family: a module here with its [`Naming`] (and [`GgufNames`] when llama.cpp has a GGUF
//! architecture for it), a line in [`naming`] / [`gguf_names`], and its [`crate::Arch`] variant.

pub mod bert;
pub mod gemma3;
pub mod gpt2;
pub mod llama;

use crate::Arch;

/// Where a family keeps its weights: the checkpoint's own names (GPT-2's fused qkv appears as
/// `attn.c_attn.q`, `.k`, `.v`).
pub(crate) struct Naming {
    pub(crate) embed: &'static str,
    pub(crate) positions: Option<&'static str>,
    pub(crate) token_types: Option<&'static str>,
    pub(crate) embed_norm: Option<&'static str>,
    pub(crate) layers: &'static str,
    pub(crate) linears: [&'static str; 7],
    pub(crate) attn_norm: &'static str,
    pub(crate) mlp_norm: &'static str,
    /// The per-head query and key norms (QK-norm), for the configs that have them.
    pub(crate) qk_norms: [&'static str; 2],
    /// The norms on the attention and MLP outputs (Gemma's sandwich), for the configs that have
    /// them.
    pub(crate) post_norms: [&'static str; 2],
    pub(crate) final_norm: Option<&'static str>,
}

/// Every family's names (a linear's role is recognized under any of them).
pub(crate) const ALL_NAMES: [&Naming; 4] =
    [&llama::NAMES, &gemma3::NAMES, &bert::NAMES, &gpt2::NAMES];

/// The checkpoint names of `arch`'s family.
pub(crate) fn naming(arch: Arch) -> &'static Naming {
    match arch {
        Arch::Bert => &bert::NAMES,
        Arch::Gpt2 => &gpt2::NAMES,
        Arch::Llama | Arch::Mistral | Arch::Qwen2 | Arch::Qwen3 => &llama::NAMES,
        Arch::Gemma3 => &gemma3::NAMES,
    }
}

/// A family's tensor names in GGUF files against its Hugging Face names.
#[derive(Debug)]
pub struct GgufNames {
    /// Whole-model tensors: (GGUF name, Hugging Face name).
    pub fixed: &'static [(&'static str, &'static str)],
    /// Block tensors `blk.N.PART.KIND` ↔ `LAYERS.N.PART.KIND`: (GGUF part, Hugging Face part,
    /// whether the checkpoint stores the weight transposed, as GPT-2's Conv1D does).
    pub blocks: &'static [(&'static str, &'static str, bool)],
    /// The Hugging Face prefix of the blocks (`model.layers`, `h`).
    pub layers: &'static str,
    /// A prefix some checkpoints put before every name (GPT2LMHeadModel's `transformer.`).
    pub optional_prefix: Option<&'static str>,
    /// Whether a Hugging Face block tensor must be a `weight` or `bias` to have a GGUF name
    /// (else any last component is carried over).
    pub weights_and_biases_only: bool,
    /// What llama.cpp adds to every norm scale (`…norm.weight`) in the file: Gemma's are stored
    /// as `1 + w`, so that llama.cpp multiplies by them as they are.
    pub norm_shift: f32,
}

impl GgufNames {
    /// The value the GGUF file adds to the Hugging Face tensor `hf` (0 for all but norm scales
    /// of families with a [`GgufNames::norm_shift`]).
    pub fn shift_of(&self, hf: &str) -> f32 {
        if hf.ends_with("norm.weight") {
            self.norm_shift
        } else {
            0.0
        }
    }

    /// The Hugging Face name of a GGUF tensor, and whether that weight is stored transposed
    /// there; `None` for names the family does not have.
    pub fn to_hf(&self, gguf: &str) -> Option<(String, bool)> {
        if let Some((_, hf)) = self.fixed.iter().find(|(g, _)| *g == gguf) {
            return Some((hf.to_string(), false));
        }
        let (layer, rest) = gguf.strip_prefix("blk.")?.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let (part, kind) = rest.rsplit_once('.')?;
        let (_, hf, transposed) = self.blocks.iter().find(|(g, _, _)| *g == part)?;
        matches!(kind, "weight" | "bias").then(|| {
            (
                format!("{}.{layer}.{hf}.{kind}", self.layers),
                *transposed && kind == "weight",
            )
        })
    }

    /// The GGUF name of a Hugging Face tensor, and whether the checkpoint stores that weight
    /// transposed; `None` for names the family does not have.
    pub fn to_gguf(&self, hf: &str) -> Option<(String, bool)> {
        let hf = match self.optional_prefix {
            Some(prefix) => hf.strip_prefix(prefix).unwrap_or(hf),
            None => hf,
        };
        if let Some((g, _)) = self.fixed.iter().find(|(_, h)| *h == hf) {
            return Some((g.to_string(), false));
        }
        let rest = hf.strip_prefix(self.layers)?.strip_prefix('.')?;
        let (layer, rest) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let (part, kind) = rest.rsplit_once('.')?;
        let (g, _, transposed) = self.blocks.iter().find(|(_, h, _)| *h == part)?;
        (!self.weights_and_biases_only || matches!(kind, "weight" | "bias")).then(|| {
            (
                format!("blk.{layer}.{g}.{kind}"),
                *transposed && kind == "weight",
            )
        })
    }
}

/// The GGUF names of `arch`'s family, when llama.cpp has a GGUF architecture shrink writes for it.
pub fn gguf_names(arch: Arch) -> Option<&'static GgufNames> {
    match arch {
        Arch::Llama | Arch::Mistral | Arch::Qwen2 | Arch::Qwen3 => Some(&llama::GGUF),
        Arch::Gemma3 => Some(&gemma3::GGUF),
        Arch::Gpt2 => Some(&gpt2::GGUF),
        Arch::Bert => None,
    }
}

/// llama.cpp's GGUF architectures that shrink reads and writes: each `general.architecture` with
/// the Hugging Face `model_type`s written as it (a GGUF read back gets the first) and its tensor
/// names.
const GGUF_ARCHITECTURES: [(&str, &[&str], &GgufNames); 5] = [
    ("llama", &["llama", "mistral"], &llama::GGUF),
    ("qwen2", &["qwen2"], &llama::GGUF),
    ("qwen3", &["qwen3"], &llama::GGUF),
    ("gemma3", &["gemma3_text"], &gemma3::GGUF),
    ("gpt2", &["gpt2"], &gpt2::GGUF),
];

/// The GGUF architectures of [`GGUF_ARCHITECTURES`], as error messages list them.
pub const GGUF_SUPPORTED: &str = "llama, qwen2, qwen3, gemma3, gpt2";

/// The Hugging Face `model_type` a GGUF file of `architecture` reads as.
pub fn model_type_of_gguf(architecture: &str) -> Option<&'static str> {
    GGUF_ARCHITECTURES
        .iter()
        .find(|(gguf, _, _)| *gguf == architecture)
        .map(|(_, types, _)| types[0])
}

/// The tensor names of GGUF architecture `architecture`.
pub fn gguf_names_of(architecture: &str) -> Option<&'static GgufNames> {
    GGUF_ARCHITECTURES
        .iter()
        .find(|(gguf, _, _)| *gguf == architecture)
        .map(|(_, _, names)| *names)
}

/// The GGUF architecture a model of `model_type` is written as.
pub fn gguf_architecture_of(model_type: &str) -> Option<&'static str> {
    GGUF_ARCHITECTURES
        .iter()
        .find(|(_, types, _)| types.contains(&model_type))
        .map(|(gguf, _, _)| *gguf)
}

#[cfg(test)]
mod gguf_architecture_tests {
    use super::*;

    #[test]
    fn architectures_read_and_write_both_ways() {
        let listed: Vec<&str> = GGUF_ARCHITECTURES.iter().map(|(g, _, _)| *g).collect();
        assert_eq!(listed.join(", "), GGUF_SUPPORTED);
        assert_eq!(model_type_of_gguf("llama"), Some("llama"));
        assert_eq!(model_type_of_gguf("qwen2"), Some("qwen2"));
        assert_eq!(model_type_of_gguf("bert"), None);
        assert_eq!(gguf_architecture_of("mistral"), Some("llama"));
        assert_eq!(gguf_architecture_of("gpt2"), Some("gpt2"));
        assert_eq!(gguf_architecture_of("bert"), None);
        assert_eq!(model_type_of_gguf("gemma3"), Some("gemma3_text"));
        assert_eq!(gguf_names_of("gemma3").map(|n| n.norm_shift), Some(1.0));
        for (gguf, types, _) in GGUF_ARCHITECTURES {
            for t in types {
                assert_eq!(gguf_architecture_of(t), Some(gguf));
            }
        }
    }
}

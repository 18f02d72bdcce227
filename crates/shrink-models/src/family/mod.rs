//! Model families: what each family's files call things. One module per family holds its
//! checkpoint (Hugging Face) tensor names, its GGUF tensor names and the config keys it spells its
//! own way; the model code, the GGUF reader and writer and the config parser read them from here.
//!
//! Adding a family: a module here with its [`Naming`] (and [`GgufNames`] when llama.cpp has a GGUF
//! architecture for it), a line in [`naming`] / [`gguf_names`], and its [`crate::Arch`] variant.

pub mod bert;
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
    pub(crate) final_norm: Option<&'static str>,
}

/// Every family's names (a linear's role is recognized under any of them).
pub(crate) const ALL_NAMES: [&Naming; 3] = [&llama::NAMES, &bert::NAMES, &gpt2::NAMES];

/// The checkpoint names of `arch`'s family.
pub(crate) fn naming(arch: Arch) -> &'static Naming {
    match arch {
        Arch::Bert => &bert::NAMES,
        Arch::Gpt2 => &gpt2::NAMES,
        Arch::Llama | Arch::Mistral | Arch::Qwen2 => &llama::NAMES,
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
}

impl GgufNames {
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
        Arch::Llama | Arch::Mistral | Arch::Qwen2 => Some(&llama::GGUF),
        Arch::Gpt2 => Some(&gpt2::GGUF),
        Arch::Bert => None,
    }
}

/// llama.cpp's GGUF architectures that shrink reads and writes: each `general.architecture` with
/// the Hugging Face `model_type`s written as it (a GGUF read back gets the first).
const GGUF_ARCHITECTURES: [(&str, &[&str]); 3] = [
    ("llama", &["llama", "mistral"]),
    ("qwen2", &["qwen2"]),
    ("gpt2", &["gpt2"]),
];

/// The GGUF architectures of [`GGUF_ARCHITECTURES`], as error messages list them.
pub const GGUF_SUPPORTED: &str = "llama, qwen2, gpt2";

/// The Hugging Face `model_type` a GGUF file of `architecture` reads as.
pub fn model_type_of_gguf(architecture: &str) -> Option<&'static str> {
    GGUF_ARCHITECTURES
        .iter()
        .find(|(gguf, _)| *gguf == architecture)
        .map(|(_, types)| types[0])
}

/// The GGUF architecture a model of `model_type` is written as.
pub fn gguf_architecture_of(model_type: &str) -> Option<&'static str> {
    GGUF_ARCHITECTURES
        .iter()
        .find(|(_, types)| types.contains(&model_type))
        .map(|(gguf, _)| *gguf)
}

#[cfg(test)]
mod gguf_architecture_tests {
    use super::*;

    #[test]
    fn architectures_read_and_write_both_ways() {
        let listed: Vec<&str> = GGUF_ARCHITECTURES.iter().map(|(g, _)| *g).collect();
        assert_eq!(listed.join(", "), GGUF_SUPPORTED);
        assert_eq!(model_type_of_gguf("llama"), Some("llama"));
        assert_eq!(model_type_of_gguf("qwen2"), Some("qwen2"));
        assert_eq!(model_type_of_gguf("bert"), None);
        assert_eq!(gguf_architecture_of("mistral"), Some("llama"));
        assert_eq!(gguf_architecture_of("gpt2"), Some("gpt2"));
        assert_eq!(gguf_architecture_of("bert"), None);
        for (gguf, types) in GGUF_ARCHITECTURES {
            for t in types {
                assert_eq!(gguf_architecture_of(t), Some(gguf));
            }
        }
    }
}

//! Tokenizers: loaded from `tokenizer.json`, or rebuilt from GGUF metadata so that token ids match
//! llama.cpp's exactly (byte-level BPE, the `tokenizer.ggml.pre` pre-tokenizer, control tokens).

use crate::{IoError, Result};
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_NORMAL: i32 = 1;
const TOKEN_TYPE_UNKNOWN: i32 = 2;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;
const TOKEN_TYPE_UNUSED: i32 = 5;
const TOKEN_TYPE_BYTE: i32 = 6;

/// SentencePiece's word-boundary mark, which stands for a space in `llama` vocabularies.
const SPM_SPACE: &str = "\u{2581}";

/// llama.cpp's pre-tokenizer regexes (llama-vocab.cpp) for `llama-bpe` and `qwen2`.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The raw GGUF vocabulary, kept so that a GGUF written back carries it unchanged.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufVocab {
    pub model: String,
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    pub merges: Vec<String>,
    /// `tokenizer.ggml.scores`: the piece scores of a `llama` (SentencePiece) vocabulary, which
    /// order its merges; empty when the file has none (`gpt2` vocabularies rank merges instead).
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.add_space_prefix`: a space goes before the text (SentencePiece's dummy
    /// prefix). llama.cpp's default is true for `llama` vocabularies, false for `gpt2`.
    pub add_space_prefix: bool,
    /// `tokenizer.ggml.unknown_token_id` and `padding_token_id`, carried through when present.
    pub unknown_token_id: Option<u32>,
    pub padding_token_id: Option<u32>,
}

impl GgufVocab {
    /// A byte-level BPE vocabulary: `specials` (control tokens, ids from 0), the 256 byte tokens
    /// (GPT-2's byte-to-character table), then one token per merge, in merge order. Handy for
    /// building small models in tests and examples.
    pub fn byte_level(specials: &[&str], merges: &[&str], pre: Option<&str>) -> Self {
        let mut tokens: Vec<String> = specials.iter().map(|s| s.to_string()).collect();
        let mut token_types = vec![TOKEN_TYPE_CONTROL; specials.len()];
        let mut extra = 0;
        for b in 0..=255u32 {
            let printable =
                (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
            let c = if printable {
                b
            } else {
                extra += 1;
                255 + extra
            };
            tokens.push(char::from_u32(c).map(String::from).unwrap_or_default());
        }
        tokens.extend(merges.iter().map(|m| m.replace(' ', "")));
        token_types.resize(tokens.len(), 1);
        Self {
            model: "gpt2".into(),
            pre: pre.map(str::to_string),
            tokens,
            token_types,
            merges: merges.iter().map(|m| m.to_string()).collect(),
            scores: vec![],
            add_space_prefix: false,
            unknown_token_id: None,
            padding_token_id: None,
        }
    }
}

/// A tokenizer with the special-token facts evaluation and generation need.
#[derive(Debug, Clone)]
pub struct TokenizerBundle {
    pub tokenizer: Tokenizer,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Whether a BOS token starts every encoded text (`add_bos_token`).
    pub add_bos: bool,
    pub chat_template: Option<String>,
    pub gguf_vocab: Option<GgufVocab>,
    /// Why a Hugging Face tokenizer has no GGUF vocabulary (it cannot be written as GGUF).
    pub gguf_vocab_error: Option<String>,
}

impl TokenizerBundle {
    /// Encodes `text`, adding BOS if the model asks for it. With `parse_special = false`, text
    /// that looks like a special token (`<|im_start|>`) is tokenized as plain text, as
    /// `llama-perplexity` does; with `true` it becomes the special token (chat prompts).
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let encoding = if parse_special {
            self.tokenizer.encode_fast(text, false)
        } else {
            let mut plain = self.tokenizer.clone();
            plain.set_encode_special_tokens(true);
            plain.encode_fast(text, false)
        }
        .map_err(|e| IoError::Tokenizer {
            path: PathBuf::from("<tokenizer>"),
            message: format!("encoding failed: {e}"),
        })?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if self.add_bos {
            if let Some(bos) = self.bos_token_id {
                ids.push(bos);
            }
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// Encodes one sentence for an encoder, with the tokenizer's own special tokens (BERT's
    /// `[CLS] … [SEP]`), truncated to `max_len` tokens keeping the final special token, as
    /// sentence-transformers does with `max_seq_length`.
    pub fn encode_sentence(&self, text: &str, max_len: usize) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode_fast(text, true)
            .map_err(|e| IoError::Tokenizer {
                path: PathBuf::from("<tokenizer>"),
                message: format!("encoding failed: {e}"),
            })?;
        let mut ids = encoding.get_ids().to_vec();
        if ids.len() > max_len.max(2) {
            let last = ids[ids.len() - 1];
            ids.truncate(max_len.max(2) - 1);
            ids.push(last);
        }
        Ok(ids)
    }

    /// Decodes ids back to text (special tokens included when `keep_special`).
    pub fn decode(&self, ids: &[u32], keep_special: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, !keep_special)
            .map_err(|e| IoError::Tokenizer {
                path: PathBuf::from("<tokenizer>"),
                message: format!("decoding failed: {e}"),
            })
    }

    /// The text of a token id.
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Builds a byte-level BPE tokenizer from GGUF vocabulary metadata; `path` names the source
    /// in errors.
    pub fn from_gguf_vocab(
        path: &Path,
        vocab: GgufVocab,
        bos_token_id: Option<u32>,
        eos_token_id: Option<u32>,
        add_bos: bool,
        chat_template: Option<String>,
    ) -> Result<Self> {
        let bad = |message: String| IoError::Tokenizer {
            path: path.to_path_buf(),
            message,
        };
        if vocab.token_types.len() != vocab.tokens.len() {
            return Err(bad(format!(
                "tokenizer.ggml.token_type has {} entries for {} tokens",
                vocab.token_types.len(),
                vocab.tokens.len()
            )));
        }
        let map: tokenizers::models::bpe::Vocab = vocab
            .tokens
            .iter()
            .enumerate()
            .map(|(id, token)| (token.clone(), id as u32))
            .collect();
        let mut tokenizer = match vocab.model.as_str() {
            "gpt2" => {
                let mut merges = Vec::with_capacity(vocab.merges.len());
                for (i, merge) in vocab.merges.iter().enumerate() {
                    let (a, b) = merge.split_once(' ').ok_or_else(|| {
                        bad(format!(
                            "tokenizer.ggml.merges[{i}] '{merge}' is not two tokens separated by a space"
                        ))
                    })?;
                    merges.push((a.to_string(), b.to_string()));
                }
                let bpe = BPE::builder()
                    .vocab_and_merges(map, merges)
                    .build()
                    .map_err(|e| {
                        bad(format!(
                            "building BPE from tokenizer.ggml.tokens/merges: {e}"
                        ))
                    })?;
                let mut tokenizer = Tokenizer::new(bpe);
                tokenizer.with_pre_tokenizer(Some(pre_tokenizer(path, vocab.pre.as_deref())?));
                tokenizer.with_decoder(Some(ByteLevel::default()));
                tokenizer
            }
            "llama" => spm_tokenizer(&vocab, map).map_err(bad)?,
            other => {
                return Err(bad(format!(
                    "tokenizer.ggml.model '{other}' is not supported (supported: gpt2, i.e. byte-level BPE, and llama, i.e. SentencePiece BPE)"
                )))
            }
        };
        let added: Vec<AddedToken> = vocab
            .tokens
            .iter()
            .zip(&vocab.token_types)
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
            .map(|(tok, &t)| AddedToken::from(tok.clone(), t == TOKEN_TYPE_CONTROL))
            .collect();
        tokenizer.add_tokens(&added);
        if add_bos {
            let bos = bos_token_id
                .and_then(|id| vocab.tokens.get(id as usize).cloned())
                .ok_or_else(|| {
                    bad("add_bos_token is set but bos_token_id is missing or out of range".into())
                })?;
            let template = tokenizers::processors::template::TemplateProcessing::builder()
                .try_single(format!("{bos} $A"))
                .map_err(|e| bad(e.to_string()))?
                .special_tokens(vec![(bos.clone(), bos_token_id.unwrap_or(0))])
                .build()
                .map_err(|e| bad(e.to_string()))?;
            tokenizer.with_post_processor(Some(template));
        }
        for (key, id) in [
            ("bos_token_id", bos_token_id),
            ("eos_token_id", eos_token_id),
        ] {
            if let Some(id) = id {
                if id as usize >= vocab.tokens.len() {
                    return Err(bad(format!(
                        "tokenizer.ggml.{key} {id} is outside the vocabulary"
                    )));
                }
            }
        }
        Ok(Self {
            tokenizer,
            bos_token_id,
            eos_token_ids: eos_token_id.into_iter().collect(),
            add_bos,
            chat_template,
            gguf_vocab: Some(vocab),
            gguf_vocab_error: None,
        })
    }
}

/// llama.cpp's SentencePiece tokenizer (`llm_tokenizer_spm`) as a byte-fallback BPE. Spaces
/// become `▁` (one goes before the text with `add_space_prefix`); then, repeatedly, the two
/// neighbouring pieces whose concatenation is the highest-scoring token merge; what is left
/// outside the vocabulary becomes byte tokens `<0xNN>`. As BPE merges, that is every split of
/// every token into two tokens, ranked by the token's score (ties by token id, then by the ids of
/// the two halves), which is also how Hugging Face derives a `tokenizer.json` from a SentencePiece
/// model.
fn spm_tokenizer(
    vocab: &GgufVocab,
    map: tokenizers::models::bpe::Vocab,
) -> std::result::Result<Tokenizer, String> {
    use tokenizers::decoders::{
        byte_fallback::ByteFallback, fuse::Fuse, sequence::Sequence as Decoders, strip::Strip,
    };
    use tokenizers::normalizers::{Prepend, Replace, Sequence as Normalizers};
    if vocab.scores.len() != vocab.tokens.len() {
        return Err(format!(
            "tokenizer.ggml.scores has {} entries for {} tokens (a llama vocabulary orders its merges by score)",
            vocab.scores.len(),
            vocab.tokens.len()
        ));
    }
    if let Some(i) = vocab.scores.iter().position(|s| !s.is_finite()) {
        return Err(format!("tokenizer.ggml.scores[{i}] is {}", vocab.scores[i]));
    }
    let mut ranked: Vec<(f32, u32, u32, u32)> = Vec::new();
    for (id, token) in vocab.tokens.iter().enumerate() {
        for (split, _) in token.char_indices().skip(1) {
            if let (Some(&left), Some(&right)) =
                (map.get(&token[..split]), map.get(&token[split..]))
            {
                ranked.push((vocab.scores[id], id as u32, left, right));
            }
        }
    }
    ranked.sort_by(|a, b| {
        // Scores are finite (checked above); -0 and 0 tie, as in llama.cpp.
        b.0.partial_cmp(&a.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then((a.1, a.2, a.3).cmp(&(b.1, b.2, b.3)))
    });
    let text = |id: u32| vocab.tokens[id as usize].clone();
    let merges = ranked
        .iter()
        .map(|&(_, _, left, right)| (text(left), text(right)))
        .collect();
    let unknown = vocab
        .unknown_token_id
        .and_then(|id| vocab.tokens.get(id as usize))
        .or_else(|| {
            vocab
                .token_types
                .iter()
                .position(|&t| t == TOKEN_TYPE_UNKNOWN)
                .map(|i| &vocab.tokens[i])
        });
    let mut bpe = BPE::builder()
        .vocab_and_merges(map, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unknown) = unknown {
        bpe = bpe.unk_token(unknown.clone());
    }
    let bpe = bpe
        .build()
        .map_err(|e| format!("building BPE from tokenizer.ggml.tokens/scores: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let space = Replace::new(" ", SPM_SPACE).map_err(|e| e.to_string())?;
    let mut normalizers = Vec::new();
    if vocab.add_space_prefix {
        normalizers.push(Prepend::new(SPM_SPACE.into()).into());
    }
    normalizers.push(space.into());
    tokenizer.with_normalizer(Some(Normalizers::new(normalizers)));
    tokenizer.with_decoder(Some(Decoders::new(vec![
        Replace::new(SPM_SPACE, " ")
            .map_err(|e| e.to_string())?
            .into(),
        ByteFallback::default().into(),
        Fuse::default().into(),
        Strip::new(' ', usize::from(vocab.add_space_prefix), 0).into(),
    ])));
    Ok(tokenizer)
}

/// The pre-tokenizer llama.cpp uses for each `tokenizer.ggml.pre` value (llama-vocab.cpp).
fn pre_tokenizer(path: &Path, pre: Option<&str>) -> Result<PreTokenizerWrapper> {
    let byte_level = |use_regex: bool| -> PreTokenizerWrapper {
        ByteLevel::default()
            .add_prefix_space(false)
            .trim_offsets(false)
            .use_regex(use_regex)
            .into()
    };
    let split = |regex: &str| -> Result<PreTokenizerWrapper> {
        let pattern = SplitPattern::Regex(regex.to_string());
        Split::new(pattern, SplitDelimiterBehavior::Isolated, false)
            .map(Into::into)
            .map_err(|e| IoError::Tokenizer {
                path: path.to_path_buf(),
                message: format!("pre-tokenizer regex: {e}"),
            })
    };
    Ok(match pre.unwrap_or("default") {
        "default" | "gpt-2" | "gpt2" => byte_level(true),
        // Digits one by one, then the GPT-2 regex.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            Sequence::new(vec![Digits::new(true).into(), byte_level(true)]).into()
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => {
            Sequence::new(vec![split(LLAMA3_REGEX)?, byte_level(false)]).into()
        }
        "qwen2" | "deepseek-r1-qwen" => Sequence::new(vec![split(QWEN2_REGEX)?, byte_level(false)]).into(),
        other => {
            return Err(IoError::Metadata {
                path: path.to_path_buf(),
                key: "tokenizer.ggml.pre".into(),
                message: format!(
                    "pre-tokenizer '{other}' is not supported (supported: default, gpt2, smollm, starcoder, llama-bpe, qwen2)"
                ),
            })
        }
    })
}

/// Loads `tokenizer.json` plus `tokenizer_config.json` (BOS/EOS, chat template) from a folder.
pub(crate) fn load_hf_tokenizer(
    dir: &Path,
    config: &serde_json::Value,
) -> Result<Option<TokenizerBundle>> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Ok(None);
    }
    let mut tokenizer = Tokenizer::from_file(&path).map_err(|e| IoError::Tokenizer {
        path: path.clone(),
        message: e.to_string(),
    })?;
    // Truncation and padding are shrink's to decide (windows, sentence lengths), not the file's.
    tokenizer
        .with_truncation(None)
        .map_err(|e| IoError::Tokenizer {
            path: path.clone(),
            message: e.to_string(),
        })?
        .with_padding(None);
    let tc_path = dir.join("tokenizer_config.json");
    let tc: serde_json::Value = if tc_path.is_file() {
        let text = std::fs::read_to_string(&tc_path).map_err(crate::io_error(&tc_path))?;
        serde_json::from_str(&text).map_err(|e| IoError::Format {
            path: tc_path.clone(),
            message: format!("invalid JSON: {e}"),
        })?
    } else {
        serde_json::Value::Null
    };
    // A token given as a string or as {"content": ...} in tokenizer_config.json.
    let token_id = |key: &str| -> Option<u32> {
        let v = tc.get(key)?;
        let s = v
            .as_str()
            .or_else(|| v.get("content").and_then(|c| c.as_str()))?;
        tokenizer.token_to_id(s)
    };
    let config_id = |key: &str| config.get(key).and_then(|v| v.as_u64()).map(|v| v as u32);
    let bos_token_id = token_id("bos_token").or_else(|| config_id("bos_token_id"));
    let mut eos_token_ids: Vec<u32> = token_id("eos_token").into_iter().collect();
    match config.get("eos_token_id") {
        Some(serde_json::Value::Array(ids)) => {
            eos_token_ids.extend(ids.iter().filter_map(|v| v.as_u64()).map(|v| v as u32))
        }
        Some(v) => eos_token_ids.extend(v.as_u64().map(|v| v as u32)),
        None => {}
    }
    eos_token_ids.dedup();
    let add_bos = match tc.get("add_bos_token").and_then(|v| v.as_bool()) {
        Some(flag) => flag,
        // No explicit flag: whatever the tokenizer's own post-processor does.
        None => match (tokenizer.encode_fast("a", true), bos_token_id) {
            (Ok(enc), Some(bos)) => enc.get_ids().first() == Some(&bos),
            _ => false,
        },
    };
    let chat_template = tc
        .get("chat_template")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    // The GGUF vocabulary llama.cpp's converter would write, or why there is none (kept for the
    // GGUF writer to report, so that a folder that only evaluates still loads).
    let special = |key: &str| token_id(key);
    let (gguf_vocab, gguf_vocab_error) = match hf_gguf_vocab(&path, config) {
        Ok(mut v) => {
            v.unknown_token_id = special("unk_token").or(v.unknown_token_id);
            v.padding_token_id = special("pad_token");
            (Some(v), None)
        }
        Err(e) => (None, Some(e.to_string())),
    };
    Ok(Some(TokenizerBundle {
        tokenizer,
        bos_token_id,
        eos_token_ids,
        add_bos,
        chat_template,
        gguf_vocab,
        gguf_vocab_error,
    }))
}

/// The `tokenizer.ggml.pre` name of a byte-level BPE `tokenizer.json` pre-tokenizer: the ones
/// shrink's GGUF reader (and llama.cpp) implement, recognised by their structure and regex.
fn pre_tokenizer_name(pre: &serde_json::Value) -> Option<&'static str> {
    let kind = |v: &serde_json::Value| v["type"].as_str().unwrap_or_default().to_string();
    let byte_level = |v: &serde_json::Value, regex: bool| {
        kind(v) == "ByteLevel"
            && v["use_regex"].as_bool().unwrap_or(true) == regex
            && !v["add_prefix_space"].as_bool().unwrap_or(false)
    };
    let split = |v: &serde_json::Value, regex: &str| {
        kind(v) == "Split"
            && v["pattern"]["Regex"].as_str() == Some(regex)
            && v["behavior"].as_str() == Some("Isolated")
            && !v["invert"].as_bool().unwrap_or(false)
    };
    if byte_level(pre, true) {
        return Some("gpt-2");
    }
    if kind(pre) != "Sequence" {
        return None;
    }
    let parts: Vec<&serde_json::Value> = pre["pretokenizers"].as_array()?.iter().collect();
    match parts.as_slice() {
        [d, b] if kind(d) == "Digits" && d["individual_digits"].as_bool() == Some(true) => {
            byte_level(b, true).then_some("smollm")
        }
        [sp, b] if byte_level(b, false) && split(sp, LLAMA3_REGEX) => Some("llama-bpe"),
        [sp, b] if byte_level(b, false) && split(sp, QWEN2_REGEX) => Some("qwen2"),
        _ => None,
    }
}

/// A Hugging Face `tokenizer.json` as GGUF vocabulary metadata, as llama.cpp's converter writes
/// it. Byte-level BPE (GPT-2, Llama 3, SmolLM, Qwen2) becomes `tokenizer.ggml.model = gpt2`:
/// merges in order and the pre-tokenizer's name. SentencePiece-style BPE with byte fallback
/// (Llama 2, Mistral v0.1) becomes `llama`: no merges but scores, a token's score minus the rank
/// of the first merge that makes it (llama.cpp merges the highest-scoring pair first, as BPE the
/// lowest-ranked), byte tokens `<0xNN>` typed as bytes, and whether a space goes before the text.
/// Either way tokens are by id (added special tokens as control tokens, other added tokens
/// user-defined, ids the config's `vocab_size` has beyond the tokenizer as unused `[PAD{id}]`).
/// Other tokenizers (Unigram, WordPiece, unknown pre-tokenizers) are refused with the reason.
fn hf_gguf_vocab(path: &Path, config: &serde_json::Value) -> Result<GgufVocab> {
    let bad = |message: String| IoError::Tokenizer {
        path: path.to_path_buf(),
        message: format!("no GGUF vocabulary: {message}"),
    };
    let text = std::fs::read_to_string(path).map_err(crate::io_error(path))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let model = &json["model"];
    let model_type = model["type"].as_str().unwrap_or("?");
    if model_type != "BPE" {
        return Err(bad(format!(
            "the tokenizer is a {model_type} model; shrink writes GGUF vocabularies for BPE tokenizers: byte-level (GPT-2, Llama 3, SmolLM, Qwen2) or SentencePiece-style with byte fallback (Llama 2, Mistral v0.1)"
        )));
    }
    let spm = model["byte_fallback"].as_bool() == Some(true);
    let excerpt = |v: &serde_json::Value| -> String {
        serde_json::to_string(v)
            .unwrap_or_default()
            .chars()
            .take(200)
            .collect()
    };
    let (kind, pre, add_space_prefix) = if spm {
        let prefix = spm_space_prefix(&json).ok_or_else(|| {
            bad(format!(
                "its normalizer ({}) and pre-tokenizer ({}) are not SentencePiece's as llama.cpp implements it (spaces to \u{2581}, optionally one before the text, no splitting)",
                excerpt(&json["normalizer"]),
                excerpt(&json["pre_tokenizer"])
            ))
        })?;
        ("llama", "default", prefix)
    } else {
        let pre = match json.get("pre_tokenizer") {
            Some(p) if !p.is_null() => pre_tokenizer_name(p).ok_or_else(|| {
                bad(format!(
                    "its pre-tokenizer ({}) is not one llama.cpp implements as gpt-2, smollm, llama-bpe or qwen2, so llama.cpp would split text differently",
                    excerpt(p)
                ))
            })?,
            _ => return Err(bad("it has no pre-tokenizer".into())),
        };
        ("gpt2", pre, false)
    };
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("model.vocab is missing".into()))?;
    let unknown = model["unk_token"].as_str();
    let normal_type = |tok: &str| {
        if spm && Some(tok) == unknown {
            TOKEN_TYPE_UNKNOWN
        } else if spm && is_byte_token(tok) {
            TOKEN_TYPE_BYTE
        } else {
            TOKEN_TYPE_NORMAL
        }
    };
    let mut by_id: std::collections::BTreeMap<u64, (String, i32)> = vocab
        .iter()
        .filter_map(|(tok, id)| Some((id.as_u64()?, (tok.clone(), normal_type(tok)))))
        .collect();
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        if let (Some(id), Some(content)) = (added["id"].as_u64(), added["content"].as_str()) {
            let kind = if spm && Some(content) == unknown {
                TOKEN_TYPE_UNKNOWN
            } else if added["special"].as_bool() == Some(true) {
                TOKEN_TYPE_CONTROL
            } else {
                TOKEN_TYPE_USER_DEFINED
            };
            by_id.insert(id, (content.to_string(), kind));
        }
    }
    // The embedding may have more rows than the tokenizer has tokens.
    let size = config
        .get("vocab_size")
        .and_then(|v| v.as_u64())
        .unwrap_or(0)
        .max(by_id.keys().next_back().map_or(0, |k| k + 1));
    if size > 10_000_000 {
        return Err(bad(format!("vocab_size {size} is not plausible")));
    }
    let mut tokens = Vec::with_capacity(size as usize);
    let mut token_types = Vec::with_capacity(size as usize);
    for id in 0..size {
        let (token, kind) = by_id
            .remove(&id)
            .unwrap_or_else(|| (format!("[PAD{id}]"), TOKEN_TYPE_UNUSED));
        tokens.push(token);
        token_types.push(kind);
    }
    let merges = model["merges"]
        .as_array()
        .ok_or_else(|| bad("model.merges is missing".into()))?
        .iter()
        .map(|m| {
            let pair = match m {
                serde_json::Value::String(s) => s.split_once(' '),
                serde_json::Value::Array(pair) => match pair.as_slice() {
                    [a, b] => a.as_str().zip(b.as_str()),
                    _ => None,
                },
                _ => None,
            };
            pair.ok_or_else(|| bad(format!("merge {m} is neither \"a b\" nor [\"a\", \"b\"]")))
        })
        .collect::<Result<Vec<_>>>()?;
    let (merges, scores) = if spm {
        (vec![], spm_scores(&tokens, &token_types, &merges))
    } else {
        let merges = merges.iter().map(|(a, b)| format!("{a} {b}")).collect();
        (merges, vec![])
    };
    Ok(GgufVocab {
        model: kind.into(),
        pre: Some(pre.into()),
        tokens,
        token_types,
        merges,
        scores,
        add_space_prefix,
        unknown_token_id: unknown
            .and_then(|u| vocab.get(u))
            .and_then(|id| id.as_u64())
            .map(|id| id as u32),
        padding_token_id: None,
    })
}

/// `<0xNN>`: a SentencePiece byte token.
fn is_byte_token(token: &str) -> bool {
    token.len() == 6
        && token.starts_with("<0x")
        && token.ends_with('>')
        && token[3..5].bytes().all(|b| b.is_ascii_hexdigit())
}

/// Scores under which llama.cpp's SentencePiece tokenizer merges as BPE does with `merges`: a
/// token made by merges scores minus the rank of the first; a longer token no merge makes scores
/// below all of them (BPE never makes it; llama.cpp makes it only when nothing else merges);
/// single characters, bytes and special tokens score 0, which no merge consults.
fn spm_scores(tokens: &[String], types: &[i32], merges: &[(&str, &str)]) -> Vec<f32> {
    let mut first: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (rank, (a, b)) in merges.iter().enumerate() {
        first.entry(format!("{a}{b}")).or_insert(rank);
    }
    tokens
        .iter()
        .zip(types)
        .map(|(token, &kind)| match first.get(token) {
            Some(&rank) => 0.0 - rank as f32,
            None if kind == TOKEN_TYPE_NORMAL && token.chars().nth(1).is_some() => {
                -(merges.len() as f32) - 1.0
            }
            None => 0.0,
        })
        .collect()
}

/// Whether a byte-fallback BPE `tokenizer.json` prepares text as llama.cpp's SentencePiece
/// tokenizer does (spaces to `▁`, no splitting), and if so whether it puts a space before the
/// text. Two layouts do: Llama 2's (normalizer `Prepend("▁")` then `Replace(" ", "▁")`, no
/// pre-tokenizer) and the Metaspace one (no normalizer, `Metaspace` that does not split).
fn spm_space_prefix(json: &serde_json::Value) -> Option<bool> {
    let kind = |v: &serde_json::Value| v["type"].as_str().unwrap_or_default().to_string();
    let (normalizer, pre) = (&json["normalizer"], &json["pre_tokenizer"]);
    if pre.is_null() {
        let parts: Vec<&serde_json::Value> = match kind(normalizer).as_str() {
            "Sequence" => normalizer["normalizers"].as_array()?.iter().collect(),
            _ => vec![normalizer],
        };
        let replaces_spaces = |v: &serde_json::Value| {
            kind(v) == "Replace"
                && v["pattern"]["String"].as_str() == Some(" ")
                && v["content"].as_str() == Some(SPM_SPACE)
        };
        return match parts.as_slice() {
            [p, r] if kind(p) == "Prepend" && p["prepend"].as_str() == Some(SPM_SPACE) => {
                replaces_spaces(r).then_some(true)
            }
            [r] => replaces_spaces(r).then_some(false),
            _ => None,
        };
    }
    if !normalizer.is_null()
        || kind(pre) != "Metaspace"
        || pre["replacement"].as_str() != Some(SPM_SPACE)
        || pre["split"].as_bool() != Some(false)
    {
        return None;
    }
    match pre["prepend_scheme"].as_str()? {
        "first" | "always" => Some(true),
        "never" => Some(false),
        _ => None,
    }
}

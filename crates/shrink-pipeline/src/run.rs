//! Running a pipeline in its run folder. Every stage lives in `stages/NAME/` with a record keyed by
//! a hash of (its input's key, its job, its calibration data, shrink's version): a finished stage
//! whose key still matches is reused, a stage interrupted at any point left only a staging folder
//! that the next run removes before doing the stage again. Measurements are cached beside each
//! artifact under a key that adds the evaluation settings.

use crate::measure::{Bench, Metrics};
use crate::quantize::{build_model, Export};
use crate::report::{
    pareto_front, EvalSettings, GateResult, Generation, InputHash, LayerRow, ModelRow, Provenance,
    Report, StageLayers, SweepSummary,
};
use crate::stage::{StageContext, TrainingText};
use crate::{sys, Pipeline, PipelineError, PlannedStage, Result};
use candle_core::DType;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use shrink_core::{sha256_file, sha256_hex, AtomicDir, Progress};
use shrink_io::{Checkpoint, TokenizerBundle};
use shrink_models::Transformer;
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

/// Says through `log` that the demo model or dataset `spec` names is about to be fetched (a text
/// is named `DATASET:SPLIT`), when it is not in the cache yet.
fn announce_fetch(spec: &str, log: &dyn Fn(&str)) {
    if Path::new(spec).exists() {
        return;
    }
    let name = spec
        .parse::<shrink_data::TextRef>()
        .map_or_else(|_| spec.to_string(), |r| r.dataset);
    if let Ok(m) = shrink_data::find(&name) {
        if matches!(shrink_data::is_cached(&m), Ok(false)) {
            log(&format!(
                "fetching {} ({}=={}) ...",
                m.name, m.package.name, m.package.version
            ));
        }
    }
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
    log: &dyn Fn(&str),
) -> Result<(String, String)> {
    announce_fetch(spec, log);
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
        let mut input = stage.input.as_str();
        let mut same_shapes = true;
        while let Some(from) = plan.iter().find(|s| s.name == input) {
            same_shapes &= from.job.job().keeps_shapes();
            input = from.input.as_str();
        }
        if same_shapes {
            stage
                .job
                .job()
                .check_shapes(model)
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

    announce_fetch(&pipeline.model.source, log);
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
    // A model without a usable tokenizer is refused before any text is read.
    checkpoint.tokenizer()?;
    let mut inputs = vec![InputHash {
        role: "model".into(),
        path: model_path.display().to_string(),
        sha256: model_sha.clone(),
    }];
    let (eval_text, eval_sha) =
        read_text_input("evaluation text", &pipeline.data.eval, &mut inputs, log)?;
    let calibrates = pipeline.plan().iter().any(|s| s.calibrates);
    let calib = if calibrates {
        Some(read_text_input(
            "calibration text",
            &pipeline.data.calib,
            &mut inputs,
            log,
        )?)
    } else {
        None
    };
    let calib_sha = calib.as_ref().map(|(_, key)| key.clone());
    let trains = pipeline.plan().iter().any(|s| s.job.trains());
    let training = if trains {
        let (text, sha) = read_text_input("training text", &pipeline.data.train, &mut inputs, log)?;
        let tokenizer = checkpoint.tokenizer()?;
        Some(TrainingText {
            train: tokenizer.encode(&text, false)?,
            eval: tokenizer.encode(&eval_text, false)?,
            key: key_of(&serde_json::json!([sha, eval_sha])),
        })
    } else {
        None
    };

    let bench = Bench::new(pipeline, &checkpoint, &eval_text, progress)?;
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
        shrink_io::check_export(&checkpoint, &baseline, Export::Gguf)?;
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
                // Checkpoints of training stages live outside the staging folder, so a rerun
                // resumes.
                let workdir = dir.with_file_name(format!(
                    "{}.train",
                    dir.file_name().unwrap_or_default().to_string_lossy()
                ));
                let cx = StageContext {
                    checkpoint: &input,
                    input_key,
                    key: &key,
                    calibration: stage_windows,
                    teacher: teacher.as_ref(),
                    training: training.as_ref(),
                    workdir: &workdir,
                    progress,
                };
                let built = (stage.input == "model").then_some(&baseline);
                run_stage(stage, key.clone(), &cx, built, &dir).map_err(|e| {
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
        .flat_map(|r| crate::gates::check_gates(&pipeline.gates, r))
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

/// Runs one stage into `dir` (through a staging folder), on `built`, the input model when it is
/// already built (the baseline), else on the model built from `cx.checkpoint`.
fn run_stage(
    stage: &PlannedStage,
    key: String,
    cx: &StageContext,
    built: Option<&Transformer>,
    dir: &Path,
) -> Result<StageRecord> {
    let staged = AtomicDir::new(dir)?;
    let mut model = match built {
        Some(model) => model.clone(),
        None => build_model(cx.checkpoint, DType::F32)?,
    };
    let artifact = match stage.export {
        Export::Gguf => "model.gguf",
        Export::Hf => "model",
    };
    let out = staged.path().join(artifact);
    sys::reset_peak_rss();
    let start = Instant::now();
    let result = stage.job.job().run(cx, &mut model, &out)?;
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
        method: result.method,
        types: result.types,
        linear_bits_per_weight: result.linear_bits_per_weight,
        layers: result.layers,
        pruning: result.pruning,
        training: result.training,
        search: result.search,
        wall_s,
        peak_rss_bytes: sys::peak_rss_bytes(),
        shrink_version: VERSION.into(),
    };
    // The record is written last: its presence means the artifact beside it is complete.
    write_json(&staged.path().join("stage.json"), &record)?;
    staged.commit()?;
    if cx.workdir.exists() {
        std::fs::remove_dir_all(cx.workdir).map_err(io_error(cx.workdir))?;
    }
    Ok(record)
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

#[cfg(test)]
mod tests {
    use super::*;

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

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
use shrink_io::{Checkpoint, FileView, ModelFile};
use shrink_models::Transformer;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

mod files;
mod ranks;
mod runner;
mod stage;

use files::*;
pub use ranks::follow;
pub(crate) use stage::stage_folder;
use stage::*;

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

/// What `shrink run --json` prints (schema `shrink.run/v1`): the verdict, the gates, each model's
/// headline figures and where the report files are.
#[derive(Debug, serde::Serialize)]
pub struct RunSummary<'a> {
    schema: &'static str,
    name: &'a str,
    run_dir: String,
    passed: bool,
    failed_gates: Vec<&'a GateResult>,
    gates: &'a [GateResult],
    exported: &'a [String],
    models: Vec<ModelSummary<'a>>,
    report: ReportFiles,
    wall_s: f64,
}

/// One model of a [`RunSummary`]: a report row's headline figures.
#[derive(Debug, serde::Serialize)]
pub struct ModelSummary<'a> {
    name: &'a str,
    kind: &'a str,
    cached: bool,
    perplexity: f64,
    ppl_increase_pct: f64,
    kl_mean: Option<f64>,
    top1_agreement: Option<f64>,
    size_bytes: u64,
    bits_per_weight: f64,
    compression_ratio: f64,
    artifact: &'a str,
}

/// The report files of a [`RunSummary`].
#[derive(Debug, serde::Serialize)]
pub struct ReportFiles {
    json: String,
    md: String,
    html: String,
}

impl RunOutcome {
    /// The run's summary for `--json`.
    pub fn summary(&self) -> RunSummary<'_> {
        let r = &self.report;
        let dir = self.run_dir.display().to_string();
        RunSummary {
            schema: "shrink.run/v1",
            name: &r.name,
            run_dir: dir.clone(),
            passed: self.passed,
            failed_gates: r.gates.iter().filter(|g| !g.passed).collect(),
            gates: &r.gates,
            exported: &r.exported,
            models: r
                .rows
                .iter()
                .map(|m| ModelSummary {
                    name: &m.name,
                    kind: &m.kind,
                    cached: m.cached,
                    perplexity: m.perplexity,
                    ppl_increase_pct: m.ppl_increase_pct,
                    kl_mean: m.kl_mean,
                    top1_agreement: m.top1_agreement,
                    size_bytes: m.size_bytes,
                    bits_per_weight: m.bits_per_weight,
                    compression_ratio: m.compression_ratio,
                    artifact: &m.artifact,
                })
                .collect(),
            report: ReportFiles {
                json: format!("{dir}/report.json"),
                md: format!("{dir}/report.md"),
                html: format!("{dir}/report.html"),
            },
            wall_s: r.wall_s,
        }
    }
}

/// Runs `pipeline` (validated by [`crate::load`]): every stage not already done, the measurements,
/// the export to `model/`, the report files and the gates. `log` receives one line per step.
pub fn run(
    pipeline: &Pipeline,
    opts: &RunOptions,
    progress: &dyn Progress,
    log: &dyn Fn(&str),
) -> Result<RunOutcome> {
    run_in(&shrink_core::Alone, pipeline, opts, progress, log)
}

/// [`run`] as rank 0 of `world` (MPI): every stage that calibrates reading its model block by
/// block is split across the ranks, which run [`follow`] meanwhile; the same bytes as one
/// process.
pub fn run_in(
    world: &dyn shrink_core::Collective,
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

    let (given, view) = read_inputs(pipeline, opts, &run_dir, log)?;
    ranks::check_batches(world, pipeline, &given.checkpoint)?;
    let bench = Bench::new(pipeline, &given.checkpoint, &given.eval_text, progress)?;
    // Checked again with the evaluation text's own chunks: whether the run evaluates block by
    // block. Sweep variants dealt to ranks run at once: those on this machine share its memory.
    let sharing = match ranks::sweep_start(world, pipeline) {
        Some(_) => world.ranks_on_this_machine() as u64,
        None => 1,
    };
    let block_by_block = pipeline
        .check_memory(
            given.shape,
            Some(&given.checkpoint),
            given.limit / sharing,
            Some(bench.chunk_bound()),
        )?
        .block_by_block;
    log(&format!(
        "baseline  {}{}",
        given.model_path.display(),
        if block_by_block {
            " (evaluated block by block)"
        } else {
            ""
        }
    ));
    let config = shrink_models::ModelConfig::from_json(&given.checkpoint.config)?;
    check_stage_shapes(pipeline, &config)?;
    if pipeline.plan().iter().any(|s| s.export == Export::Gguf) {
        shrink_io::check_export(&given.checkpoint, config.arch()?, Export::Gguf)?;
    }
    // Evaluated block by block, no model is built whole (every stage streams too).
    let baseline = match block_by_block {
        true => None,
        false => Some(build_model(&given.checkpoint, DType::F32)?),
    };
    let mut runner = runner::Runner {
        pipeline,
        given: &given,
        bench: &bench,
        baseline: baseline.as_ref(),
        stages_dir: &stages_dir,
        eval_key: runner::eval_key(pipeline, &given.eval_sha, block_by_block),
        world,
        split: true,
        progress,
        log,
        keys: [("model".to_string(), given.model_sha.clone())].into(),
        artifacts: [("model".to_string(), given.model_path.clone())].into(),
        windows: None,
    };
    let base = runner.metrics(&run_dir.join("baseline"), &given.model_sha, &|key| {
        let world = runner.eval_world(None, false)?;
        match &baseline {
            Some(model) => {
                let packed = given.checkpoint.packed_source();
                bench.measure(world, key, model, None, &view, &*packed)
            }
            None => {
                let (input, limit) = (&given.checkpoint, given.limit);
                bench.measure_streamed(world, key, input, None, &view, limit)
            }
        }
    })?;
    // Measured: the input file's map is let go.
    drop(view);
    let mut rows = vec![row(
        "baseline",
        "baseline",
        None,
        &given.model_path,
        &given.model_path,
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
    // Under MPI, the sweep's variants are dealt to the ranks, each running its own whole.
    let sweep_from = ranks::sweep_start(world, pipeline);
    let mut run_by = BTreeMap::new();

    for (index, stage) in pipeline.plan().iter().enumerate() {
        if sweep_from == Some(index) {
            run_by = ranks::run_sweep(world, &mut runner, block_by_block)?;
        }
        let (record, reused) = runner.stage(index, stage)?;
        let cached = reused && !run_by.contains_key(&index);
        match run_by.get(&index) {
            _ if !reused => {}
            Some(0) => {}
            Some(rank) => log(&format!("stage     {}: run by rank {rank}", stage.name)),
            None => log(&format!("stage     {}: done before, reused", stage.name)),
        }
        let metrics = runner.measure(stage)?;
        let artifact = &runner.artifacts[&stage.name];
        rows.push(row(
            &stage.name,
            stage.kind.name(),
            Some(&stage.input),
            &run_dir,
            artifact,
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
    }

    ranks::send(world, &ranks::Message::Done)?;
    let exported = export_models(pipeline, &run_dir, &runner.artifacts)?;

    let gates: Vec<GateResult> = exported
        .iter()
        .filter_map(|name| rows.iter().find(|r| &r.name == name))
        .flat_map(|r| crate::gates::check_gates(&pipeline.gates, r))
        .collect();
    let passed = gates.iter().all(|g| g.passed);
    let sweep = sweep_summary(pipeline, &rows);
    let report = Report {
        schema: REPORT_SCHEMA.into(),
        name: pipeline.name.clone(),
        description: pipeline.description.clone(),
        pipeline_file: opts.pipeline_file.display().to_string(),
        provenance: Provenance {
            shrink_version: VERSION.into(),
            config_sha256: sha256_file(&opts.pipeline_file).unwrap_or_default(),
            inputs: given.inputs,
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
            block_by_block,
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
    write_report(&run_dir, &report)?;
    Ok(RunOutcome {
        run_dir,
        report,
        passed,
    })
}

/// What a run reads before any stage: the input model (resolved, checked against the run folder
/// and the memory budget, hashed, loaded) and the texts its stages need, each file hashed into the
/// provenance. [`read_inputs`] returns them with the model file's view, for the baseline's
/// measurement.
struct RunInputs {
    model_path: PathBuf,
    model_sha: String,
    /// The input model, read once.
    checkpoint: Checkpoint,
    /// The model's shape (from its header) and the memory the run may use.
    shape: Option<crate::memory::ModelShape>,
    limit: u64,
    inputs: Vec<InputHash>,
    eval_text: String,
    eval_sha: String,
    /// The calibration text and its key, when a stage calibrates.
    calib: Option<(String, String)>,
    training: Option<TrainingText>,
}

/// How a stage keeps its calibration activations: as `[data] activations` and `spill` say, for a
/// stage that calibrates reading `input` (of `shape`) block by block, spilled to a scratch file in
/// `scratch` when `spill = "auto"` finds that in memory they would exceed `limit` and spilled
/// they would not. Refuses those settings on a stage that holds its model whole
/// ([`Pipeline::check_kept_activations`]), and a spill the disk cannot hold. With the formula's
/// estimate of the stage's peak when it reads its input block by block.
fn stage_keep<'a>(
    pipeline: &Pipeline,
    stage: &PlannedStage,
    input: &Checkpoint,
    shape: Option<crate::memory::ModelShape>,
    limit: u64,
    scratch: &'a Path,
) -> Result<(shrink_calib::Keep<'a>, Option<u64>)> {
    use crate::memory::{self, Spill};
    let data = &pipeline.data;
    let dtype = data.activations.dtype();
    let job = stage.job.job();
    if stage.calibrates {
        pipeline.check_kept_activations(stage, input)?;
    }
    if !job.streams(input) {
        return Ok((shrink_calib::Keep::default(), None));
    }
    let calibration = stage
        .calibrates
        .then_some((data.samples as u64, data.seq_len as u64));
    let (spilled, estimate) = match (shape, job.streamed_job(input, calibration)) {
        (Some(shape), Some(streamed)) => {
            let bytes = dtype.size_in_bytes() as u64;
            let (streamed, _) =
                memory::keep_activations(&shape, &streamed, bytes, data.spill, 1, limit);
            memory::check_spill_disk(&shape, &streamed, 1, scratch)?;
            let estimate = memory::streamed_peak(&shape, &streamed).total();
            (streamed.spilled, Some(estimate))
        }
        _ => (data.spill == Spill::Always, None),
    };
    let keep = match stage.calibrates {
        true => shrink_calib::Keep {
            spill: spilled.then_some(scratch),
            dtype,
        },
        false => shrink_calib::Keep::default(),
    };
    Ok((keep, estimate))
}

fn read_inputs(
    pipeline: &Pipeline,
    opts: &RunOptions,
    run_dir: &Path,
    log: &dyn Fn(&str),
) -> Result<(RunInputs, FileView)> {
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
    let ModelFile { checkpoint, view } = shrink_io::open(&model_path)?;
    // Before any text is read, with the evaluation's chunk setting; again by the run with the
    // text's.
    let shape = crate::memory::model_shape(&model_path);
    let limit = crate::memory::memory_limit(opts.max_memory_bytes);
    pipeline.check_memory(shape, Some(&checkpoint), limit, None)?;
    let model_sha = hash_path(&model_path)?;
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

    let inputs = RunInputs {
        model_path,
        model_sha,
        checkpoint,
        shape,
        limit,
        inputs,
        eval_text,
        eval_sha,
        calib,
        training,
    };
    Ok((inputs, view))
}

/// The final models, copied to `model/`: for each export format, the last stage of the pipeline
/// as written that produces it. Returns the exported stages' names.
fn export_models(
    pipeline: &Pipeline,
    run_dir: &Path,
    artifacts: &BTreeMap<String, PathBuf>,
) -> Result<Vec<String>> {
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

    Ok(exported)
}

/// The swept stage's variants and their Pareto front of size against perplexity.
fn sweep_summary(pipeline: &Pipeline, rows: &[ModelRow]) -> Option<SweepSummary> {
    pipeline.sweep.as_ref().map(|s| {
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
    })
}

/// `report.json`, `report.md` and `report.html`, each written atomically.
fn write_report(run_dir: &Path, report: &Report) -> Result<()> {
    write_json(&run_dir.join("report.json"), report)?;
    shrink_core::atomic_write(
        &run_dir.join("report.md"),
        crate::render::to_markdown(report).as_bytes(),
    )?;
    shrink_core::atomic_write(
        &run_dir.join("report.html"),
        crate::render::to_html(report).as_bytes(),
    )?;
    Ok(())
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
        eval_load: m.eval.as_ref().and_then(|e| e.load),
        stage_wall_s: record.map_or(0.0, |r| r.wall_s),
        peak_rss_bytes: record.map_or(0, |r| r.peak_rss_bytes),
        decode: m.decode.clone(),
        tasks: tasks_of(m).to_vec(),
        acc_norm_drop: tasks_of(m)
            .iter()
            .filter_map(|t| {
                let b = tasks_of(base)
                    .iter()
                    .find(|b| b.task == t.task && b.docs == t.docs)?;
                Some((b.acc_norm - t.acc_norm) * 100.0)
            })
            .reduce(f64::max),
    }
}

/// The task scores of a model's evaluation.
fn tasks_of(m: &Metrics) -> &[shrink_eval::TaskReport] {
    m.eval.as_ref().map_or(&[], |e| &e.tasks)
}

#[cfg(test)]
mod tests;

//! A run over several ranks (MPI, `mpirun -n N shrink run …`): rank 0 runs the pipeline as one
//! process does (it alone reads the records, evaluates, exports and reports); a stage that
//! calibrates reading its model block by block is split across all ranks (its calibration
//! windows, and a search's sensitivity by tensors), the others doing only that part ([`follow`]).
//! Rank 0 tells them each such stage, with what it needs: its input's path, its keys, the
//! calibration windows and whether its activations are spilled.
//!
//! A sweep's variants are dealt out whole instead: variant `v` (the swept stage with one value and
//! the later stages that read it) goes to rank `v mod N`, which runs and measures its stages alone
//! and writes their folders, as one process would; rank 0 then reads them. The ranks must see the
//! run folder at the same path (one machine, or a shared folder).

use super::runner::{eval_key, Runner};
use super::{build_model, read_inputs, stage_folder, RunInputs, RunOptions};
use crate::measure::Bench;
use crate::stage::StageContext;
use crate::{Pipeline, PipelineError, PlannedStage, Result};
use candle_core::DType;
use serde::{Deserialize, Serialize};
use shrink_core::{share_json, Collective};
use shrink_io::Checkpoint;
use shrink_models::Transformer;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What rank 0 tells the other ranks.
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum Message {
    /// Run your part of a stage.
    Stage(Task),
    /// Run your variants of the sweep.
    Sweep(SweepTask),
    /// Evaluate your chunks of a model.
    Measure(Measure),
    /// The stages are done: nothing more to do.
    Done,
}

/// A stage split across the ranks.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Task {
    /// Its index in the pipeline's plan.
    pub stage: usize,
    /// The model it reads.
    pub input: PathBuf,
    pub input_key: String,
    pub key: String,
    pub windows: Vec<Vec<u32>>,
    /// Whether the calibration activations go to a scratch file in the run's `stages/`.
    pub spill: bool,
}

/// A model rank 0 evaluates, the ranks sharing its chunks out.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Measure {
    /// Its file (`None`: the run's input model).
    pub model: Option<PathBuf>,
    /// Whether against the run's input model.
    pub reference: bool,
    /// Whether read block by block (else built whole).
    pub block_by_block: bool,
    /// The sha256 of the run's input model, as rank 0 read it.
    pub model_sha: String,
}

/// What a rank needs to run sweep variants: what the stages before them left.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct SweepTask {
    keys: BTreeMap<String, String>,
    artifacts: BTreeMap<String, PathBuf>,
    windows: Option<Vec<Vec<u32>>>,
    /// Whether the run evaluates block by block (rank 0's judgement, part of the measurements'
    /// key).
    block_by_block: bool,
}

/// Whether `stage` (reading `input`) is split across the ranks of `world`: it calibrates,
/// reading its model block by block.
pub(super) fn splits(world: &dyn Collective, stage: &PlannedStage, input: &Checkpoint) -> bool {
    world.size() > 1 && stage.calibrates && stage.job.job().streams(input)
}

/// Refuses, before any work, a run whose stages split across the ranks (those that calibrate and
/// read `model`, the input model, block by block; a later stage's input is judged by the same
/// kind of reading) have fewer batches of windows (8 a pass) than there are ranks: some rank
/// would have none (a search's verified GPTQ calibrates on the windows its sensitivity and
/// scoring leave).
pub(super) fn check_batches(
    world: &dyn Collective,
    pipeline: &Pipeline,
    model: &Checkpoint,
) -> Result<()> {
    let ranks = world.size();
    // Variants run whole on one rank each, when there is a sweep to deal out.
    let dealt = sweep_start(world, pipeline).is_some();
    let split = |s: &&PlannedStage| splits(world, s, model) && !(dealt && s.sweep_value.is_some());
    for stage in pipeline.plan().iter().filter(split) {
        let samples = pipeline.data.samples;
        let windows = match &stage.job {
            crate::StageJob::Search(_) => samples - (samples / 2).min(8),
            _ => samples,
        };
        let batches = windows.div_ceil(8);
        if batches < ranks {
            return Err(PipelineError::Invalid(format!(
                "stage `{}`: {ranks} MPI processes need at least {ranks} batches of 8 \
                 calibration windows, and it has {batches} ({windows} windows): raise [data] \
                 samples",
                stage.name
            )));
        }
    }
    Ok(())
}

/// Rank 0 sends `message` to the other ranks.
pub(super) fn send(world: &dyn Collective, message: &Message) -> Result<()> {
    if world.size() > 1 {
        share_json(world, 0, Some(message))?;
    }
    Ok(())
}

/// What a rank other than 0 does in a run: its part of every stage rank 0 splits, until rank 0
/// says the stages are done. It writes nothing in the run folder (what it computes is exchanged
/// with rank 0); spilled activations go to unnamed scratch files in `stages/`.
pub fn follow(world: &dyn Collective, pipeline: &Pipeline, opts: &RunOptions) -> Result<()> {
    let run_dir = opts
        .run_dir
        .clone()
        .unwrap_or_else(|| Path::new("runs").join(&pipeline.name));
    let stages_dir = run_dir.join("stages");
    let plan = pipeline.plan();
    // The run's inputs, read as rank 0 read them (once it has: a demo model or text is fetched
    // by then), and the input model built whole, when first needed.
    let mut inputs = None;
    let mut baseline = None;
    loop {
        let task = match share_json::<Message>(world, 0, None)? {
            Message::Stage(task) => task,
            Message::Sweep(task) => {
                let model_sha = task.keys.get("model").cloned().unwrap_or_default();
                let mine = read_once(&mut inputs, world, pipeline, opts, &run_dir, &model_sha)
                    .and_then(|given| {
                        run_variants_here(world, pipeline, given, &mut baseline, &stages_dir, task)
                    });
                gather(world, mine)?;
                continue;
            }
            Message::Measure(task) => {
                let sha = &task.model_sha;
                let given = read_once(&mut inputs, world, pipeline, opts, &run_dir, sha)?;
                evaluate_here(world, pipeline, given, &mut baseline, task)?;
                continue;
            }
            Message::Done => return Ok(()),
        };
        let stage = plan.get(task.stage).ok_or_else(|| {
            PipelineError::Invalid(format!("rank 0 sent stage {}, not in the plan", task.stage))
        })?;
        let input = shrink_io::load(&task.input)?;
        let cx = StageContext {
            keep: shrink_calib::Keep {
                spill: task.spill.then_some(stages_dir.as_path()),
                dtype: pipeline.data.activations.dtype(),
            },
            checkpoint: &input,
            input_key: &task.input_key,
            key: &task.key,
            calibration: Some(&task.windows),
            teacher: None,
            training: None,
            workdir: &stages_dir,
            progress: &shrink_core::NoProgress,
            world,
        };
        // A rank other than 0 writes no model: only its job's resume folder, inside a folder
        // of its own, removed when the stage ends.
        let own = stages_dir.join(format!(
            ".rank{}-{}",
            world.rank(),
            stage_folder(&stage.name)
        ));
        // Removed whatever the outcome: rank 0 stages a stage in a fresh temporary folder, so a
        // pipeline stage never resumes mid-model.
        let ran = stage.job.job().run_streamed(&cx, &own.join("model"));
        if let Err(e) = std::fs::remove_dir_all(&own) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(shrink_core::CoreError::Io {
                    action: "removing",
                    path: own,
                    source: e,
                }
                .into());
            }
        }
        ran.map_err(|e| PipelineError::Stage {
            stage: stage.name.clone(),
            source: Box::new(e),
        })?;
    }
}

/// The plan's index of the first sweep variant, when `world` has ranks to deal variants to.
pub(super) fn sweep_start(world: &dyn Collective, pipeline: &Pipeline) -> Option<usize> {
    let plan = pipeline.plan();
    (world.size() > 1)
        .then(|| plan.iter().position(|s| s.sweep_value.is_some()))
        .flatten()
}

/// The sweep's variants: for each value, the plan's indices of its stages (which follow every
/// stage of the pipeline as written, a value's stages together).
fn variants(pipeline: &Pipeline) -> Vec<Vec<usize>> {
    let mut variants: Vec<(&str, Vec<usize>)> = Vec::new();
    for (index, stage) in pipeline.plan().iter().enumerate() {
        let Some(value) = stage.sweep_value.as_deref() else {
            continue;
        };
        match variants.last_mut() {
            Some((v, stages)) if *v == value => stages.push(index),
            _ => variants.push((value, vec![index])),
        }
    }
    variants.into_iter().map(|(_, stages)| stages).collect()
}

/// Rank 0 deals the sweep's variants out, runs its own, and waits for the others' (which leave
/// their stages' folders, records and measurements in the run folder). Returns the stages each
/// rank ran (those it found done are not counted).
pub(super) fn run_sweep(
    world: &dyn Collective,
    runner: &mut Runner,
    block_by_block: bool,
) -> Result<BTreeMap<usize, usize>> {
    let task = SweepTask {
        keys: runner.keys.clone(),
        artifacts: runner.artifacts.clone(),
        windows: runner.windows.clone(),
        block_by_block,
    };
    send(world, &Message::Sweep(task))?;
    // Each variant runs whole on its rank, the others busy with theirs.
    runner.split = false;
    let mine = run_variants(world, runner);
    runner.split = true;
    gather(world, mine)
}

/// This rank's variants (variant `v` is rank `v mod N`'s), each stage run (or found done) and
/// measured by `runner`. Returns the indices of the stages it ran.
fn run_variants(world: &dyn Collective, runner: &mut Runner) -> Result<Vec<usize>> {
    let plan = runner.pipeline.plan();
    let mut ran = Vec::new();
    for (v, stages) in variants(runner.pipeline).into_iter().enumerate() {
        if v % world.size() != world.rank() {
            continue;
        }
        for index in stages {
            let (_, reused) = runner.stage(index, &plan[index])?;
            runner.measure(&plan[index])?;
            if !reused {
                ran.push(index);
            }
        }
    }
    Ok(ran)
}

/// The run's inputs, read the first time they are needed, their model checked against rank 0's
/// (`model_sha`): a rank on another machine that finds another file at the model's path would
/// otherwise compute on it under rank 0's keys.
fn read_once<'a>(
    inputs: &'a mut Option<RunInputs>,
    world: &dyn Collective,
    pipeline: &Pipeline,
    opts: &RunOptions,
    run_dir: &Path,
    model_sha: &str,
) -> Result<&'a RunInputs> {
    if inputs.is_none() {
        let (given, view) = read_inputs(pipeline, opts, run_dir, &|_| {})?;
        drop(view);
        if given.model_sha != model_sha {
            return Err(PipelineError::Invalid(format!(
                "rank {}: the input model {} is not rank 0's (sha256 {}, rank 0 read {model_sha})",
                world.rank(),
                given.model_path.display(),
                given.model_sha
            )));
        }
        *inputs = Some(given);
    }
    inputs
        .as_ref()
        .ok_or_else(|| PipelineError::Invalid("the run's inputs were not read".into()))
}

/// The input model built whole, the first time it is needed.
fn built<'a>(baseline: &'a mut Option<Transformer>, given: &RunInputs) -> Result<&'a Transformer> {
    if baseline.is_none() {
        *baseline = Some(build_model(&given.checkpoint, DType::F32)?);
    }
    baseline
        .as_ref()
        .ok_or_else(|| PipelineError::Invalid("the input model was not built".into()))
}

/// A rank other than 0 evaluates its chunks of the model rank 0 evaluates (the evaluation's
/// scores go to every rank; only rank 0 keeps them). It reads the models block by block whenever
/// they can be (the same scores as built whole), so that it holds one block, not whole models,
/// beside rank 0.
fn evaluate_here(
    world: &dyn Collective,
    pipeline: &Pipeline,
    given: &RunInputs,
    baseline: &mut Option<Transformer>,
    task: Measure,
) -> Result<()> {
    let progress = shrink_core::NoProgress;
    let bench = Bench::new(pipeline, &given.checkpoint, &given.eval_text, &progress)?;
    let file = task.model.as_deref().map(shrink_io::load).transpose()?;
    let checkpoint = file.as_ref().unwrap_or(&given.checkpoint);
    let reference = task.reference.then_some(&given.checkpoint);
    let streams = crate::quantize::reads_block_by_block;
    if task.block_by_block || (streams(checkpoint) && reference.is_none_or(streams)) {
        bench.evaluate_streamed(world, &mut checkpoint.streamed(DType::F32)?, reference)?;
    } else {
        let model = match &file {
            Some(file) => Some(build_model(file, DType::F32)?),
            None => None,
        };
        let base = built(baseline, given)?;
        let reference = task.reference.then_some(base);
        bench.evaluate(world, model.as_ref().unwrap_or(base), reference)?;
    }
    Ok(())
}

/// A rank other than 0 runs its variants of the sweep, on the run's inputs as rank 0 read them
/// and what the stages before the sweep left (`task`), each stage alone.
fn run_variants_here(
    world: &dyn Collective,
    pipeline: &Pipeline,
    given: &RunInputs,
    baseline: &mut Option<Transformer>,
    stages_dir: &Path,
    task: SweepTask,
) -> Result<Vec<usize>> {
    let progress = shrink_core::NoProgress;
    let bench = Bench::new(pipeline, &given.checkpoint, &given.eval_text, &progress)?;
    let baseline = match task.block_by_block {
        true => None,
        false => Some(built(baseline, given)?),
    };
    let mut runner = Runner {
        pipeline,
        given,
        bench: &bench,
        baseline,
        stages_dir,
        eval_key: eval_key(pipeline, &given.eval_sha, task.block_by_block),
        world,
        split: false,
        progress: &progress,
        log: &|_| {},
        keys: task.keys,
        artifacts: task.artifacts,
        windows: task.windows,
    };
    run_variants(world, &mut runner)
}

/// Every rank's outcome of its variants, shared in rank order ([`shrink_core::share_dealt`],
/// one item per rank): which stages each rank ran, or this rank's own error, or the first error
/// another rank met.
fn gather(world: &dyn Collective, mine: Result<Vec<usize>>) -> Result<BTreeMap<usize, usize>> {
    let mine = mine.map(|stages| vec![stages]);
    let every = shrink_core::share_dealt(world, 0, world.size(), mine, |rank, message| {
        PipelineError::Rank { rank, message }
    })?;
    let by_rank = every.into_iter().enumerate();
    Ok(by_rank
        .flat_map(|(rank, stages)| stages.into_iter().map(move |s| (s, rank)))
        .collect())
}

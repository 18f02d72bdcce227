//! A run over several ranks (MPI, `mpirun -n N shrink run …`): rank 0 runs the pipeline as one
//! process does (it alone reads the records, writes the run folder, evaluates and reports); a
//! stage that calibrates reading its model block by block is split across all ranks (its
//! calibration windows, and a search's sensitivity by tensors), the others doing only that part
//! ([`follow`]). Rank 0 tells them each such stage, with what it needs: its input's path, its keys,
//! the calibration windows and whether its activations are spilled. The ranks must see the run
//! folder at the same path (one machine, or a shared folder).

use super::{stage_folder, RunOptions};
use crate::stage::StageContext;
use crate::{Pipeline, PipelineError, PlannedStage, Result};
use serde::{Deserialize, Serialize};
use shrink_core::{share_json, Collective};
use shrink_io::Checkpoint;
use std::path::{Path, PathBuf};

/// What rank 0 tells the other ranks.
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum Message {
    /// Run your part of a stage.
    Stage(Task),
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
    for stage in pipeline.plan().iter().filter(|s| splits(world, s, model)) {
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
    loop {
        let task = match share_json::<Message>(world, 0, None)? {
            Message::Stage(task) => task,
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
        // Never created: a rank other than 0 writes nothing.
        let out = stages_dir
            .join(format!(
                ".rank{}-{}",
                world.rank(),
                stage_folder(&stage.name)
            ))
            .join("model");
        stage
            .job
            .job()
            .run_streamed(&cx, &out)
            .map_err(|e| PipelineError::Stage {
                stage: stage.name.clone(),
                source: Box::new(e),
            })?;
    }
}

//! Structured pruning of a model read from its file one block at a time: the units to remove
//! are scored block by block (as [`super::prune_structured`] scores a model held whole, by the
//! same code), then the pruned model is written tensor by tensor, each cut from the original
//! file as it is written. Only one block (or one tensor) is in memory at a time.

use super::scores::{removal_by_blocks, Calibration, Scored};
use super::{
    check_structure, plan_cuts, scores_block_by_block, shape_keys, Importance, Structure,
    StructuredOutcome,
};
use crate::{PruneError, Result, StreamedRun};
use candle_core::DType;
use shrink_io::{Checkpoint, IoError};
use std::path::Path;
use std::sync::Arc;

/// [`super::prune_structured`] on the model read block by block from `checkpoint`, written to
/// `out` (a GGUF or a Hugging Face folder of `run`'s float type, atomically) with the bytes the
/// whole-model path writes. Heads, groups and channels are scored per block from the weights or
/// the calibration statistics; layers by block influence or the angular distance; the width
/// from the weights (the embedding widened a slice at a time) or the norms' outputs. Taylor
/// importance and the perplexity criterion need the model whole and are refused. Calibration is
/// split across the ranks of `run.world`, its activations kept as `run.keep` says; rank 0 alone
/// writes.
///
/// Memory: one block and the calibration activations while scoring (`span + 1` copies of the
/// activations for the angular criterion over `span` layers), then one tensor at a time.
///
/// The job records its progress beside `out` ([`shrink_calib::BlockJob`]): a scoring pass by
/// activation importance after each block (the scores so far and each rank's activations), the
/// writing after each tensor written; the same job run again after a kill continues there and
/// writes the same bytes. Scoring by magnitude (the weights alone, one read of each block) and
/// the layer criteria start their scoring over; their writing resumes.
pub fn prune_structured_streamed(
    checkpoint: &Checkpoint,
    structure: Structure,
    importance: Importance,
    run: &StreamedRun,
    out: &Path,
) -> Result<StructuredOutcome> {
    let mut model = checkpoint.streamed(DType::F32)?;
    let cfg = shrink_models::BlockModel::config(&model).clone();
    let arch = cfg.arch()?;
    check_structure(arch, &cfg, structure)?;
    if !scores_block_by_block(structure, importance) {
        return Err(PruneError::Config(format!(
            "{structure:?} by {importance:?} needs the model whole: it does not stream"
        )));
    }
    // Only a calibrated pass by activation importance records its blocks (and activations).
    let calibrated = importance == Importance::Activation
        && !matches!(structure, Structure::Layers { .. })
        && run.windows.is_some();
    let settings = format!(
        "structured pruning\n{structure:?} by {importance:?}\nwritten {:?} {:?}\nkept in {:?}",
        run.export, run.dtype, run.keep.dtype
    );
    let description =
        shrink_calib::job_description(&checkpoint.path, &settings, run.windows, run.batch);
    let job = shrink_calib::BlockJob::open(out, &description, calibrated, run.world)?;
    let recorded = job.resumed::<Progress>(run.keep, run.world)?;
    let n = shrink_models::BlockModel::num_blocks(&model);
    // The writing's records name block n + 1 (see below): reported as n, where it resumed.
    let resumed_at = recorded.as_ref().map(|(state, _)| state.blocks.min(n));
    let (written_so_far, removed) = match recorded {
        Some((state, _)) if state.report.removed.is_some() => (
            (state.tensors, state.bytes),
            state.report.removed.unwrap_or_default(),
        ),
        recorded => {
            let start = recorded.map(|(state, resume)| (state.report.scored, resume));
            let embedding = cfg.embedding_name();
            let removed = removal_by_blocks(
                &mut model,
                structure,
                importance,
                &|| Ok(checkpoint.load_stored(&embedding)?),
                Calibration {
                    windows: run.windows,
                    batch: run.batch,
                    world: run.world,
                    keep: run.keep,
                    progress: run.progress,
                },
                start,
                &mut |index, xs, scored| {
                    let due = run.world.rank() == 0 && job.due();
                    let state = due.then(|| shrink_calib::Recorded {
                        blocks: index + 1,
                        tensors: 0,
                        bytes: 0,
                        report: Progress {
                            scored: scored.clone(),
                            removed: None,
                        },
                    });
                    Ok(job.record(run.world, index + 1, state.as_ref(), Some(xs))?)
                },
            )?;
            ((0, 0), removed)
        }
    };
    drop(model);
    let source = Arc::new(checkpoint.tensors.clone());
    let (new_cfg, cuts) = plan_cuts(&cfg, arch, structure, &removed, source.names())?;
    // The pruned checkpoint: each tensor cut from the original file when it is loaded.
    let mut tensors = shrink_io::Tensors::empty(checkpoint.path.clone());
    let (mut before, mut after) = (0, 0);
    for name in source.names() {
        before += source
            .shape(name)
            .map_or(0, |s| s.iter().product::<usize>());
    }
    for (name, cut) in cuts {
        let missing = || PruneError::Config(format!("no tensor '{}'", cut.source));
        let shape = cut.shape(source.shape(&cut.source).ok_or_else(missing)?);
        after += shape.iter().product::<usize>();
        // Norms rescaled for the width are computed in f32, as a model held whole computes them.
        let widen = cut.scale.is_some();
        let stored = source.dtype(&cut.source).ok_or_else(missing)?;
        let (source, path, tensor) = (source.clone(), checkpoint.path.clone(), name.clone());
        let load = move |asked: DType| {
            let t = source.get_as(&cut.source, if widen { DType::F32 } else { asked })?;
            cut.apply(&t)
                .and_then(|t| Ok(t.to_dtype(asked)?))
                .map_err(|e| IoError::Tensor {
                    path: path.clone(),
                    tensor: tensor.clone(),
                    message: e.to_string(),
                })
        };
        let loads_in = if widen { DType::F32 } else { stored };
        tensors.insert_stored(name, shape, loads_in, Arc::new(load))?;
    }
    let written = Checkpoint {
        tensors,
        config: shrink_io::config_for(checkpoint, &new_cfg),
        ..checkpoint.clone()
    };
    // Rank 0 writes, recording after each tensor; the other ranks take part in each record.
    let partial = job.partial();
    let mut sink = match run.world.rank() {
        0 => Some(shrink_io::ModelStream::resumable(
            &written,
            &new_cfg,
            run.export,
            run.dtype,
            out,
            Some((partial.as_path(), written_so_far.0, written_so_far.1)),
        )?),
        _ => None,
    };
    let order =
        shrink_io::HfStream::model_order(written.tensors.names(), &new_cfg.embedding_name());
    let record = |sink: &mut Option<shrink_io::ModelStream>| -> Result<()> {
        let point = crate::resume_point(&job, sink.as_mut())?;
        // Block n + 1: the writing's records (an empty set of activations marks them) never
        // replace the activations the last scoring record names.
        let state = point.map(|(tensors, bytes)| shrink_calib::Recorded {
            blocks: n + 1,
            tensors,
            bytes,
            report: Progress {
                scored: Scored::default(),
                removed: Some(removed.clone()),
            },
        });
        let none = shrink_calib::Activations::in_memory(Vec::new()).kept_in(run.keep.dtype)?;
        Ok(job.record(run.world, n + 1, state.as_ref(), Some(&none))?)
    };
    let progress = run.progress;
    progress.start("writing tensors", order.len() as u64);
    record(&mut sink)?;
    for name in &order {
        if let Some(sink) = sink.as_mut() {
            written.supply_stored(sink, Some(name))?;
        }
        record(&mut sink)?;
        progress.advance(1, None);
    }
    progress.finish();
    let finished = match sink {
        Some(sink) => sink.finish().map_err(PruneError::from),
        None => Ok(()),
    };
    job.complete(run.world, finished)?;
    Ok(StructuredOutcome {
        structure,
        importance,
        removed,
        parameters_before: before,
        parameters_after: after,
        config: shape_keys(&new_cfg),
        resumed_at,
    })
}

/// A streamed structured pruning's record: while scoring, the finished blocks' scores; once
/// scoring is over, the units removed (and the tensors written so far).
#[derive(serde::Serialize, serde::Deserialize)]
struct Progress {
    scored: Scored,
    removed: Option<Vec<Vec<usize>>>,
}

//! The stages of a run, one at a time: each stage's key, its run (or its record, reused) and its
//! measurement. Rank 0 runs every stage through one [`Runner`]; under MPI, a rank given sweep
//! variants runs them through its own ([`super::ranks`]).

use super::*;
use crate::measure::Bench;

/// What every stage of a run needs, and what the stages done so far left: their keys, their
/// artifacts and the calibration windows.
pub(super) struct Runner<'a> {
    pub(super) pipeline: &'a Pipeline,
    pub(super) given: &'a RunInputs,
    pub(super) bench: &'a Bench<'a>,
    /// The input model, built, when the run evaluates whole models.
    pub(super) baseline: Option<&'a Transformer>,
    pub(super) stages_dir: &'a Path,
    /// The key of the evaluation settings, added to a model's key to key its measurements.
    pub(super) eval_key: String,
    /// The ranks of the run: a stage that calibrates block by block splits across them (when
    /// `split`: not a rank's sweep variants), and those on this machine share its memory.
    pub(super) world: &'a dyn shrink_core::Collective,
    pub(super) split: bool,
    pub(super) progress: &'a dyn Progress,
    pub(super) log: &'a dyn Fn(&str),
    pub(super) keys: BTreeMap<String, String>,
    pub(super) artifacts: BTreeMap<String, PathBuf>,
    pub(super) windows: Option<Vec<Vec<u32>>>,
}

/// The key of a run's evaluation settings.
pub(super) fn eval_key(pipeline: &Pipeline, eval_sha: &str, block_by_block: bool) -> String {
    key_of(&serde_json::json!({
        "shrink": VERSION, "text": eval_sha, "eval": pipeline.eval,
        "block_by_block": block_by_block,
    }))
}

impl Runner<'_> {
    /// The key of `stage`: a hash of its input's key, its job, its calibration data, its teacher,
    /// its training text and shrink's version.
    fn key(&self, stage: &PlannedStage) -> String {
        let pipeline = self.pipeline;
        let calibration = stage.calibrates.then(|| {
            let mut c = serde_json::json!({
                "text": self.given.calib.as_ref().map(|(_, key)| key),
                "samples": pipeline.data.samples,
                "seq_len": pipeline.data.seq_len, "seed": pipeline.seed,
            });
            // Rounded activations change the statistics (spilled ones do not).
            if pipeline.data.activations != crate::ActivationsType::F32 {
                c["activations"] = serde_json::json!(pipeline.data.activations);
            }
            c
        });
        let teacher_key = stage.teacher.as_ref().map(|t| self.keys[t].clone());
        let training_key = stage
            .job
            .trains()
            .then(|| self.given.training.as_ref().map(|t| t.key.clone()));
        key_of(&serde_json::json!({
            "shrink": VERSION, "input": self.keys[&stage.input], "job": stage.job,
            "calibration": calibration, "teacher": teacher_key, "training": training_key,
        }))
    }

    /// The measurements of the model keyed `model_key` in `dir`: reused while the model and the
    /// evaluation settings are unchanged, else made by `measure` and written beside it.
    pub(super) fn metrics(
        &self,
        dir: &Path,
        model_key: &str,
        measure: &dyn Fn(String) -> Result<Metrics>,
    ) -> Result<Metrics> {
        let key = key_of(&serde_json::json!([model_key, self.eval_key]));
        let path = dir.join("metrics.json");
        if let Some(m) = read_json::<Metrics>(&path).filter(|m| m.key == key) {
            return Ok(m);
        }
        let metrics = measure(key)?;
        write_json(&path, &metrics)?;
        Ok(metrics)
    }

    /// The ranks the evaluation of `model` (`None`: the input model), against the input model
    /// when `reference`, splits across: under MPI, rank 0 tells the others, which evaluate with
    /// it; alone for a rank's sweep variants and for encoders.
    pub(super) fn eval_world(
        &self,
        model: Option<&Path>,
        reference: bool,
    ) -> Result<&dyn shrink_core::Collective> {
        if !self.split || self.world.size() == 1 || self.bench.encoder() {
            return Ok(&shrink_core::Alone);
        }
        let task = ranks::Measure {
            model: model.map(Path::to_path_buf),
            reference,
            block_by_block: self.baseline.is_none(),
            model_sha: self.given.model_sha.clone(),
        };
        ranks::send(self.world, &ranks::Message::Measure(task))?;
        Ok(self.world)
    }

    /// The measurements of `stage`'s artifact (the stage done), against the input model.
    pub(super) fn measure(&self, stage: &PlannedStage) -> Result<Metrics> {
        let dir = self.stages_dir.join(stage_folder(&stage.name));
        let artifact = &self.artifacts[&stage.name];
        self.metrics(&dir, &self.keys[&stage.name], &|key| {
            let shrink_io::ModelFile { checkpoint, view } = shrink_io::open(artifact)?;
            let world = self.eval_world(Some(artifact), true)?;
            match self.baseline {
                Some(baseline) => {
                    let model = build_model(&checkpoint, DType::F32)?;
                    let packed = checkpoint.packed_source();
                    drop(checkpoint);
                    self.bench
                        .measure(world, key, &model, Some(baseline), &view, &*packed)
                }
                None => {
                    let reference = Some(&self.given.checkpoint);
                    let limit = self.given.limit;
                    self.bench
                        .measure_streamed(world, key, &checkpoint, reference, &view, limit)
                }
            }
        })
    }

    /// Runs `stage` (the `index`th of the plan) unless its folder holds a record with its key,
    /// and notes its key and artifact for the stages that read it. Returns its record and
    /// whether it was reused.
    pub(super) fn stage(
        &mut self,
        index: usize,
        stage: &PlannedStage,
    ) -> Result<(StageRecord, bool)> {
        let key = self.key(stage);
        let dir = self.stages_dir.join(stage_folder(&stage.name));
        let done = read_json::<StageRecord>(&dir.join("stage.json"))
            .filter(|r| r.key == key && dir.join(&r.artifact).exists());
        let cached = done.is_some();
        let record = match done {
            Some(record) => record,
            None => self
                .run(index, stage, &key, &dir)
                .map_err(|e| PipelineError::Stage {
                    stage: stage.name.clone(),
                    source: Box::new(e),
                })?,
        };
        self.artifacts
            .insert(stage.name.clone(), dir.join(&record.artifact));
        self.keys.insert(stage.name.clone(), key);
        Ok((record, cached))
    }

    /// Runs `stage`, keyed `key`, into `dir`.
    fn run(
        &mut self,
        index: usize,
        stage: &PlannedStage,
        key: &str,
        dir: &Path,
    ) -> Result<StageRecord> {
        let (pipeline, given) = (self.pipeline, self.given);
        (self.log)(&format!(
            "stage     {}: {} ← {}",
            stage.name,
            stage.kind.name(),
            stage.input
        ));
        let input = if stage.input == "model" {
            given.checkpoint.clone()
        } else {
            shrink_io::load(&self.artifacts[&stage.input])?
        };
        if let (true, None, Some((text, _))) = (stage.calibrates, &self.windows, &given.calib) {
            self.windows = Some(crate::encoder::calibration_windows(
                &input,
                text,
                pipeline.data.samples,
                pipeline.data.seq_len,
                pipeline.seed,
            )?);
        }
        let windows = self.windows.as_deref().filter(|_| stage.calibrates);
        let teacher = match stage.teacher.as_deref() {
            None => None,
            Some("model") => Some(match self.baseline {
                Some(model) => model.clone(),
                None => build_model(&given.checkpoint, DType::F32)?,
            }),
            Some(t) => Some(build_model(
                &shrink_io::load(&self.artifacts[t])?,
                DType::F32,
            )?),
        };
        // Checkpoints of training stages live outside the staging folder, so a rerun resumes.
        let workdir = dir.with_file_name(format!(
            "{}.train",
            dir.file_name().unwrap_or_default().to_string_lossy()
        ));
        let shape = match stage.input.as_str() {
            "model" => given.shape,
            other => crate::memory::model_shape(&self.artifacts[other]),
        };
        // Beside the baseline model, when the run holds it, as the estimate counts it.
        let held = match (self.baseline, given.shape) {
            (Some(_), Some(s)) => s.parameters.saturating_mul(4),
            _ => 0,
        };
        // Ranks on one machine share its memory.
        let ranks_here = self.world.ranks_on_this_machine() as u64;
        let room = given.limit.saturating_sub(held) / ranks_here;
        let (keep, estimate) = stage_keep(pipeline, stage, &input, shape, room, self.stages_dir)?;
        let estimate = estimate.map(|e| e.saturating_add(held));
        if keep.spill.is_some() {
            (self.log)(&format!(
                "stage     {}: calibration activations spilled to a scratch file in {}",
                stage.name,
                self.stages_dir.display()
            ));
        }
        let split = self.split && ranks::splits(self.world, stage, &input);
        if split {
            let task = ranks::Task {
                stage: index,
                input: match stage.input.as_str() {
                    "model" => given.model_path.clone(),
                    other => self.artifacts[other].clone(),
                },
                input_key: self.keys[&stage.input].clone(),
                key: key.to_string(),
                windows: windows.map(<[_]>::to_vec).unwrap_or_default(),
                spill: keep.spill.is_some(),
            };
            ranks::send(self.world, &ranks::Message::Stage(task))?;
        }
        let cx = StageContext {
            keep,
            checkpoint: &input,
            input_key: &self.keys[&stage.input],
            key,
            calibration: windows,
            teacher: teacher.as_ref(),
            training: given.training.as_ref(),
            workdir: &workdir,
            progress: self.progress,
            world: if split {
                self.world
            } else {
                &shrink_core::Alone
            },
        };
        let built = self.baseline.filter(|_| stage.input == "model");
        run_stage(stage, key.to_string(), &cx, built, dir, estimate)
    }
}

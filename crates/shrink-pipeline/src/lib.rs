//! Declarative compression pipelines: a TOML file names the input model, the data, an ordered list
//! of stages, the evaluation, the export, the quality gates and an optional sweep. [`load`] parses
//! and validates it (every mistake reported once, with `file:line:column` and a "did you mean" for
//! misspelt keys); [`run`] executes it in a run folder where every stage is keyed by a hash of its
//! inputs and settings, so a re-run skips finished stages and an interrupted one resumes; the run
//! ends with `report.json`, `report.md`, `report.html` and the gates' verdict.
//!
//! ```
//! let text = r#"
//! name = "w4"
//! [model]
//! source = "smollm2"
//! [[stage]]
//! kind = "quantize.gptq"
//! preset = "q4_k_m"
//! "#;
//! let p = shrink_pipeline::parse(text, "w4.toml").unwrap();
//! let plan = p.plan();
//! assert_eq!(plan[0].name, "quantize.gptq");
//! assert_eq!(plan[0].input, "model");
//! assert!(plan[0].calibrates);
//! let e = shrink_pipeline::parse(&text.replace("preset", "prest"), "w4.toml").unwrap_err();
//! assert!(e.to_string().starts_with("w4.toml:7:1: unknown key `prest`"), "{e}");
//! assert!(e.to_string().contains("did you mean `preset`?"));
//! ```
//!
//! Running it (`shrink_pipeline::run(&p, &RunOptions::new("w4.toml"), &NoProgress)`) fetches the
//! demo model, quantizes, evaluates and writes `runs/w4/`.

mod config;
pub mod encoder;
mod gates;
mod measure;
pub mod memory;
pub mod render;
pub mod report;
mod run;
mod stage;
mod sys;

pub use stage::{distill, prune, qat, quantize, search};

pub use config::{
    load, parse, ActivationsType, DataConfig, EvalConfig, ExportConfig, Gates, ModelConfig,
    Pipeline, PlannedStage, Stage, StageKeys, StreamEval, Sweep, SWEEP_KEYS,
};
pub use distill::{distill_and_write, DistillOutcome, DistillRequest, StudentInit, TrainKeys};
pub use measure::{eval_bos, eval_tokens, prompt_tokens, score_tasks, task_requests};
pub use prune::{PruneJob, PruneKind, PruneOutcome, PruneRequest, ResolvedPrune};
pub use qat::{qat_and_write, QatRequest};
pub use quantize::{
    build_model, Export, PresetChoice, QuantMethod, QuantizeOutcome, QuantizeRequest,
    ResolvedQuantize,
};
pub use run::{follow, run, run_in, RunOptions, RunOutcome};
pub use stage::{Compress, JobInput, StageJob, StageKind};
pub use sys::{free_disk_bytes, peak_rss_bytes};

/// A pipeline that cannot be used or run, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// `file:line:column: message`
    #[error("{file}:{line}:{column}: {message}")]
    Config {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{file}: {message}")]
    Io { file: String, message: String },
    /// A combination of settings that cannot be carried out.
    #[error("{0}")]
    Invalid(String),
    /// What another MPI rank met.
    #[error("MPI rank {rank}: {message}")]
    Rank { rank: usize, message: String },
    #[error("stage `{stage}`: {source}")]
    Stage {
        stage: String,
        source: Box<PipelineError>,
    },
    #[error(transparent)]
    Quant(#[from] shrink_quant::QuantError),
    #[error(transparent)]
    Model(#[from] shrink_models::ModelError),
    #[error(transparent)]
    ModelFile(#[from] shrink_io::IoError),
    #[error(transparent)]
    Eval(#[from] shrink_eval::EvalError),
    #[error(transparent)]
    Data(#[from] shrink_data::DataError),
    #[error(transparent)]
    Calib(#[from] shrink_calib::CalibError),
    #[error(transparent)]
    Prune(#[from] shrink_prune::PruneError),
    #[error(transparent)]
    Train(#[from] shrink_train::TrainError),
    #[error(transparent)]
    Distill(#[from] shrink_distill::DistillError),
    #[error(transparent)]
    Core(#[from] shrink_core::CoreError),
    #[error(transparent)]
    Search(#[from] shrink_search::SearchError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, PipelineError>;

//! Declarative compression pipelines: a TOML file names the input model, the data, an ordered list
//! of stages, the evaluation, the export and the quality gates. [`load`] parses and validates it;
//! every mistake is reported once, with `file:line:column`, and a "did you mean" for misspelt keys.
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
//! let e = shrink_pipeline::parse(&text.replace("preset", "prest"), "w4.toml").unwrap_err();
//! assert!(e.to_string().starts_with("w4.toml:7:1: unknown key `prest`"), "{e}");
//! assert!(e.to_string().contains("did you mean `preset`?"));
//! ```

mod config;

pub use config::{
    load, parse, DataConfig, EvalConfig, ExportConfig, Gates, ModelConfig, Pipeline, PlannedStage,
    Stage, StageKind,
};

/// A pipeline file that cannot be used, with where and why.
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
}

pub type Result<T> = std::result::Result<T, PipelineError>;

//! One module per subcommand: its arguments and its handler.

pub(crate) mod convert;
pub(crate) mod data;
pub(crate) mod distill;
pub(crate) mod embed;
pub(crate) mod eval;
pub(crate) mod generate;
pub(crate) mod inspect;
pub(crate) mod prune;
pub(crate) mod quantize;
pub(crate) mod run;
pub(crate) mod synth;
pub(crate) mod tokenize;
pub(crate) mod validate;

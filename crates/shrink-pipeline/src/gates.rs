//! The quality gates, in one table: what each key measures, its unit, its direction, the limits a
//! pipeline may set, and how a model row is checked against it.

use crate::config::Gates;
use crate::report::{GateResult, ModelRow};

/// One gate of `[gates]`.
pub(crate) struct Gate {
    pub key: &'static str,
    /// What the value measures, as the messages say it.
    what: &'static str,
    unit: &'static str,
    /// The value must be at most the limit (else at least).
    at_most: bool,
    /// The limits a pipeline may set.
    pub range: (f64, f64),
    pub limit: fn(&Gates) -> Option<f64>,
    value: fn(&ModelRow) -> Option<f64>,
}

const UNBOUNDED: (f64, f64) = (0.0, f64::MAX);

/// Every gate, in the order they are checked and reported: key, what it measures, unit, at most
/// (else at least), the limits a pipeline may set, the limit and the row's value.
#[rustfmt::skip]
pub(crate) const GATES: &[Gate] = &[
    Gate { key: "max_ppl_increase_pct", what: "perplexity increase", unit: "%", at_most: true, range: UNBOUNDED, limit: |g| g.max_ppl_increase_pct, value: |r| Some(r.ppl_increase_pct) },
    Gate { key: "min_top1_agreement", what: "top-1 agreement", unit: "", at_most: false, range: (0.0, 1.0), limit: |g| g.min_top1_agreement, value: |r| r.top1_agreement },
    Gate { key: "max_kl", what: "KL", unit: " nats", at_most: true, range: UNBOUNDED, limit: |g| g.max_kl, value: |r| r.kl_mean },
    Gate { key: "min_embedding_cosine", what: "embedding cosine", unit: "", at_most: false, range: (-1.0, 1.0), limit: |g| g.min_embedding_cosine, value: |r| r.embedding_cosine },
    Gate { key: "min_neighbour_agreement", what: "top-10 neighbour agreement", unit: "", at_most: false, range: (0.0, 1.0), limit: |g| g.min_neighbour_agreement, value: |r| r.neighbour_agreement },
    Gate { key: "max_size_mb", what: "size", unit: " MB", at_most: true, range: UNBOUNDED, limit: |g| g.max_size_mb, value: |r| Some(r.size_bytes as f64 / 1e6) },
    Gate { key: "min_compression_ratio", what: "compression ratio", unit: "×", at_most: false, range: UNBOUNDED, limit: |g| g.min_compression_ratio, value: |r| Some(r.compression_ratio) },
    Gate { key: "min_acc_norm", what: "lowest task acc_norm", unit: "", at_most: false, range: (0.0, 1.0), limit: |g| g.min_acc_norm, value: |r| r.tasks.iter().map(|t| t.acc_norm).reduce(f64::min) },
    Gate { key: "max_acc_norm_drop", what: "largest task acc_norm drop", unit: " points", at_most: true, range: (0.0, 100.0), limit: |g| g.max_acc_norm_drop, value: |r| r.acc_norm_drop },
];

/// Checks `[gates]` on one exported model.
pub(crate) fn check_gates(gates: &Gates, r: &ModelRow) -> Vec<GateResult> {
    let mut out = Vec::new();
    for gate in GATES {
        let Some(limit) = (gate.limit)(gates) else {
            continue;
        };
        let (what, unit, at_most) = (gate.what, gate.unit, gate.at_most);
        // A measurement that is missing (no reference) fails its gate rather than passing.
        let value = (gate.value)(r).unwrap_or(f64::NAN);
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
            gate: gate.key.into(),
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
mod tests;

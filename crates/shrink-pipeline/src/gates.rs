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
mod tests {
    use super::*;

    fn row_with(ppl_pct: f64, top1: f64, size: u64) -> ModelRow {
        ModelRow {
            name: "q".into(),
            kind: "quantize.rtn".into(),
            input: Some("model".into()),
            artifact: "stages/q/model.gguf".into(),
            format: "gguf".into(),
            cached: false,
            sweep_value: None,
            perplexity: 10.0,
            perplexity_stderr: 0.1,
            ppl_increase_pct: ppl_pct,
            kl_mean: Some(0.01),
            top1_agreement: Some(top1),
            embedding_cosine: None,
            neighbour_agreement: None,
            size_bytes: size,
            bits_per_weight: 4.5,
            parameters: 1000,
            shape: String::new(),
            sparsity: 0.0,
            compression_ratio: 2.0,
            eval_tokens_per_s: 1.0,
            eval_load: None,
            stage_wall_s: 1.0,
            peak_rss_bytes: 0,
            decode: None,
        }
    }

    #[test]
    fn gates_say_which_failed_and_by_how_much() {
        let gates = crate::Gates {
            max_ppl_increase_pct: Some(3.0),
            min_top1_agreement: Some(0.9),
            max_kl: None,
            max_size_mb: Some(100.0),
            min_compression_ratio: Some(2.5),
            ..Default::default()
        };
        let results = check_gates(&gates, &row_with(4.25, 0.95, 90_000_000));
        assert_eq!(results.len(), 4);
        let failed: Vec<&GateResult> = results.iter().filter(|g| !g.passed).collect();
        assert_eq!(failed.len(), 2);
        assert_eq!(failed[0].gate, "max_ppl_increase_pct");
        assert!(
            failed[0].message.contains("4.2500% > 3%")
                && failed[0].message.contains("off by 1.2500%"),
            "{}",
            failed[0].message
        );
        assert_eq!(failed[1].gate, "min_compression_ratio");
        assert!(
            failed[1].message.contains("2.0000× < 2.5×"),
            "{}",
            failed[1].message
        );
        // A fidelity gate without a measurement fails.
        let mut r = row_with(0.0, 1.0, 1);
        r.top1_agreement = None;
        let g = check_gates(&gates, &r);
        assert!(
            !g.iter()
                .find(|g| g.gate == "min_top1_agreement")
                .unwrap()
                .passed
        );
    }
}

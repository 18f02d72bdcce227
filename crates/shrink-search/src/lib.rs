//! Budget-driven search. [`sensitivity`] measures, for every linear and candidate format, the KL
//! its quantization alone adds; [`allocate`] chooses; [`refine`] verifies the choice by
//! quantizing the whole mix for real, corrects the table and chooses again.
//!
//! Allocation: given, for every tensor, the options it can be compressed with (a
//! format or a sparsity) and for each the size it takes and the quality it is predicted to cost
//! (a sensitivity measured with only that tensor compressed), choose one option per tensor. This is
//! a multiple-choice knapsack: minimise the summed predicted loss under a size budget
//! ([`Budget::MaxSize`]), or the size under a loss budget ([`Budget::MaxLoss`]). It is solved by
//! dynamic programming over sizes: exactly when sizes can be counted in bytes (up to about
//! 10⁹ / options size levels and a 256 MB table), otherwise in coarser units with every tensor's
//! size rounded up, so a size budget is never exceeded and at most one unit per tensor is left
//! unused. When no allocation meets the budget, the best effort is returned and said so.
//!
//! ```
//! use shrink_search::{allocate, Budget, Choice, Item};
//! let items = vec![
//!     Item::new("a", vec![Choice::new("q8_0", 100, 0.0), Choice::new("q4_0", 50, 1.0)]),
//!     Item::new("b", vec![Choice::new("q8_0", 100, 0.0), Choice::new("q4_0", 50, 5.0)]),
//! ];
//! let out = allocate(&items, Budget::MaxSize(150)).unwrap();
//! // Room for one 8-bit tensor: it goes to b, whose 4-bit loss is larger.
//! assert_eq!(out.choices, [1, 0]);
//! assert_eq!((out.size, out.met), (150, true));
//! ```

mod refine;
mod sensitivity;

pub use refine::{refine, Goal, Limits, Measurement, SearchOutcome, Tried, Verifier};

pub use sensitivity::{
    gguf_bytes, sensitivity, Measure, Score, Scorer, SensitivityConfig, EMBEDDINGS,
};

use serde::{Deserialize, Serialize};

/// Errors from allocation.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error("tensor '{0}' has no options to choose from")]
    NoOptions(String),
    #[error("tensor '{item}', option '{choice}': predicted loss {loss} is not a finite number")]
    BadLoss {
        item: String,
        choice: String,
        loss: f64,
    },
    #[error("the budget {0} is not a positive finite number")]
    BadBudget(String),
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Calib(#[from] shrink_calib::CalibError),
    #[error(transparent)]
    Quant(#[from] shrink_quant::QuantError),
    #[error(transparent)]
    Model(#[from] shrink_models::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Core(#[from] shrink_core::CoreError),
}

pub type Result<T> = std::result::Result<T, SearchError>;

/// One way to store a tensor: its name (`q4_k`, `50%`), the bytes it takes, and the predicted
/// quality loss of choosing it (e.g. the KL it alone adds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    pub name: String,
    pub size_bytes: u64,
    pub loss: f64,
    /// The tensor's relative output error ‖(W − Ŵ)X‖² / ‖WX‖² on the calibration inputs, when
    /// known: [`refine`] compares it with the error measured when the whole mix is quantized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<f64>,
}

impl Choice {
    pub fn new(name: &str, size_bytes: u64, loss: f64) -> Self {
        Self {
            name: name.into(),
            size_bytes,
            loss,
            error: None,
        }
    }
}

/// A tensor and its options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub name: String,
    pub choices: Vec<Choice>,
}

impl Item {
    pub fn new(name: &str, choices: Vec<Choice>) -> Self {
        Self {
            name: name.into(),
            choices,
        }
    }
}

/// What the allocation must meet.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Budget {
    /// At most this many bytes in all; the predicted loss is minimised.
    MaxSize(u64),
    /// At most this predicted loss in all; the size is minimised.
    MaxLoss(f64),
}

/// The chosen option per item (indices into each item's choices), their summed size and
/// predicted loss, and whether the budget is met (when not: the closest allocation).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Allocation {
    pub choices: Vec<usize>,
    pub size: u64,
    pub loss: f64,
    pub met: bool,
}

/// The dynamic programme's work (items × options × size units) and table memory (bytes) it may
/// use: sizes are counted in bytes when that fits, in coarser units otherwise.
const MAX_STEPS: u64 = 1_000_000_000;
const MAX_TABLE_BYTES: u64 = 256 << 20;

fn validate(items: &[Item]) -> Result<()> {
    for item in items {
        if item.choices.is_empty() {
            return Err(SearchError::NoOptions(item.name.clone()));
        }
        for c in &item.choices {
            if !c.loss.is_finite() {
                return Err(SearchError::BadLoss {
                    item: item.name.clone(),
                    choice: c.name.clone(),
                    loss: c.loss,
                });
            }
        }
    }
    Ok(())
}

fn summarise(items: &[Item], choices: Vec<usize>, budget: Budget) -> Allocation {
    let size = items
        .iter()
        .zip(&choices)
        .map(|(it, &c)| it.choices[c].size_bytes)
        .sum();
    let loss = items
        .iter()
        .zip(&choices)
        .map(|(it, &c)| it.choices[c].loss)
        .sum();
    let met = match budget {
        Budget::MaxSize(max) => size <= max,
        // A relative tolerance for the sums' rounding.
        Budget::MaxLoss(max) => loss <= max + 1e-9 * max.abs().max(1.0),
    };
    Allocation {
        choices,
        size,
        loss,
        met,
    }
}

/// The smallest allocation: every tensor at its smallest option (least loss among equals).
fn smallest(items: &[Item]) -> Vec<usize> {
    items
        .iter()
        .map(|it| {
            (0..it.choices.len())
                .min_by(|&a, &b| {
                    let (x, y) = (&it.choices[a], &it.choices[b]);
                    x.size_bytes
                        .cmp(&y.size_bytes)
                        .then(x.loss.total_cmp(&y.loss))
                })
                .unwrap_or(0)
        })
        .collect()
}

/// Chooses one option per item to meet `budget` (see the crate documentation).
pub fn allocate(items: &[Item], budget: Budget) -> Result<Allocation> {
    validate(items)?;
    match budget {
        Budget::MaxSize(max) if max == 0 => Err(SearchError::BadBudget(max.to_string())),
        Budget::MaxLoss(max) if !max.is_finite() || max < 0.0 => {
            Err(SearchError::BadBudget(max.to_string()))
        }
        _ => Ok(()),
    }?;
    let floor = smallest(items);
    let floor_size: u64 = items
        .iter()
        .zip(&floor)
        .map(|(it, &c)| it.choices[c].size_bytes)
        .sum();
    // The table spans sizes up to the budget (MaxSize) or up to the largest allocation (MaxLoss).
    let span = match budget {
        Budget::MaxSize(max) if max < floor_size => {
            return Ok(summarise(items, floor, budget)); // best effort: nothing fits
        }
        Budget::MaxSize(max) => max,
        Budget::MaxLoss(_) => items
            .iter()
            .map(|it| it.choices.iter().map(|c| c.size_bytes).max().unwrap_or(0))
            .sum::<u64>()
            .max(1),
    };
    let options: u64 = items.iter().map(|it| it.choices.len() as u64).sum();
    let levels =
        (MAX_STEPS / options.max(1)).min(MAX_TABLE_BYTES / (2 * items.len().max(1) as u64));
    let unit = span.div_ceil(levels.max(1)).max(1);
    // Sizes in units, rounded up: a chosen set's rounded sum ≥ its real sum / unit, so every
    // allocation the table admits fits the real budget.
    let units = |bytes: u64| bytes.div_ceil(unit) as usize;
    let cap = match budget {
        Budget::MaxSize(max) => (max / unit) as usize,
        Budget::MaxLoss(_) => items
            .iter()
            .map(|it| {
                it.choices
                    .iter()
                    .map(|c| units(c.size_bytes))
                    .max()
                    .unwrap_or(0)
            })
            .sum(),
    };
    // best[s]: the least loss of the items so far using exactly s units; from[i][s]: the choice.
    let mut best = vec![f64::INFINITY; cap + 1];
    best[0] = 0.0;
    let mut from: Vec<Vec<u16>> = Vec::with_capacity(items.len());
    for item in items {
        let mut next = vec![f64::INFINITY; cap + 1];
        let mut pick = vec![u16::MAX; cap + 1];
        for (ci, c) in item.choices.iter().enumerate() {
            let w = units(c.size_bytes);
            if w > cap {
                continue;
            }
            for s in 0..=cap - w {
                let v = best[s] + c.loss;
                if v < next[s + w] {
                    next[s + w] = v;
                    pick[s + w] = ci as u16;
                }
            }
        }
        best = next;
        from.push(pick);
    }
    let end = match budget {
        // The least loss at any size within the budget (ties: the smaller size).
        Budget::MaxSize(_) => (0..=cap)
            .filter(|&s| best[s].is_finite())
            .min_by(|&a, &b| best[a].total_cmp(&best[b]).then(a.cmp(&b))),
        // The smallest size whose least loss is within the budget.
        Budget::MaxLoss(max) => (0..=cap).find(|&s| best[s] <= max + 1e-9 * max.abs().max(1.0)),
    };
    let Some(s) = end else {
        // No allocation meets a loss budget: the one with the least loss, at its smallest size.
        let s = (0..=cap)
            .filter(|&s| best[s].is_finite())
            .min_by(|&a, &b| best[a].total_cmp(&best[b]).then(a.cmp(&b)));
        return Ok(match s {
            Some(s) => summarise(items, trace(items, &from, s, &units), budget),
            None => summarise(items, floor, budget),
        });
    };
    Ok(summarise(items, trace(items, &from, s, &units), budget))
}

/// Walks the table back from total `s` units to the choice of every item.
fn trace(
    items: &[Item],
    from: &[Vec<u16>],
    mut s: usize,
    units: &dyn Fn(u64) -> usize,
) -> Vec<usize> {
    let mut choices = vec![0; items.len()];
    for i in (0..items.len()).rev() {
        let c = from[i][s] as usize;
        choices[i] = c;
        s -= units(items[i].choices[c].size_bytes);
    }
    choices
}

#[cfg(test)]
mod tests;

use super::*;
use rand::{Rng, SeedableRng};
use shrink_core::NoProgress;

/// Every allocation, by brute force: the reference optimum for small cases.
fn brute_force(items: &[Item], budget: Budget) -> Option<(u64, f64)> {
    let mut best: Option<(u64, f64)> = None;
    let mut idx = vec![0usize; items.len()];
    loop {
        let size: u64 = items
            .iter()
            .zip(&idx)
            .map(|(it, &c)| it.choices[c].size_bytes)
            .sum();
        let loss: f64 = items
            .iter()
            .zip(&idx)
            .map(|(it, &c)| it.choices[c].loss)
            .sum();
        let better = match budget {
            Budget::MaxSize(max) => {
                size <= max
                    && best.is_none_or(|(bs, bl)| {
                        loss < bl - 1e-12 || (loss <= bl + 1e-12 && size < bs)
                    })
            }
            Budget::MaxLoss(max) => {
                loss <= max + 1e-9
                    && best.is_none_or(|(bs, bl)| size < bs || (size == bs && loss < bl))
            }
        };
        if better {
            best = Some((size, loss));
        }
        // Next combination.
        let mut i = 0;
        loop {
            if i == items.len() {
                return best;
            }
            idx[i] += 1;
            if idx[i] < items[i].choices.len() {
                break;
            }
            idx[i] = 0;
            i += 1;
        }
    }
}

/// Random tables shaped like real ones: per tensor, options from 8.5 down to 2.6 bits per weight
/// whose loss grows as the bits fall, at a tensor-specific sensitivity.
fn table(seed: u64, n: usize, max_blocks: u64) -> Vec<Item> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let formats = [
        ("q8_0", 8.5),
        ("q6_k", 6.5625),
        ("q5_k", 5.5),
        ("q4_k", 4.5),
        ("q3_k", 3.4375),
        ("q2_k", 2.625),
    ];
    (0..n)
        .map(|i| {
            let weights = rng.gen_range(max_blocks / 50..max_blocks) * 32;
            let sensitivity: f64 = rng.gen_range(0.01..10.0);
            let choices = formats
                .iter()
                .map(|(name, bpw)| {
                    let noise: f64 = rng.gen_range(0.8..1.2);
                    let loss = sensitivity * 2f64.powf(-2.0 * bpw) * 1e4 * noise;
                    Choice::new(name, (weights as f64 * bpw / 8.0) as u64, loss)
                })
                .collect();
            Item::new(&format!("t{i}"), choices)
        })
        .collect()
}

#[test]
fn small_cases_equal_brute_force_for_both_budgets() {
    for seed in 0..40 {
        let items = table(seed, 5, 500);
        let all8: u64 = items.iter().map(|it| it.choices[0].size_bytes).sum();
        let all2: u64 = items.iter().map(|it| it.choices[5].size_bytes).sum();
        for frac in [0.0, 0.2, 0.5, 0.8, 1.0] {
            let max = all2 + ((all8 - all2) as f64 * frac) as u64;
            let got = allocate(&items, Budget::MaxSize(max)).unwrap();
            let (size, loss) = brute_force(&items, Budget::MaxSize(max)).unwrap();
            assert!(
                got.met && got.size <= max,
                "seed {seed}: {got:?} over {max}"
            );
            assert!(
                (got.loss - loss).abs() <= 1e-9 * loss.max(1.0),
                "seed {seed} frac {frac}: {} vs optimum {loss} (size {size})",
                got.loss
            );
        }
        let min_loss: f64 = items.iter().map(|it| it.choices[0].loss).sum();
        let max_loss: f64 = items.iter().map(|it| it.choices[5].loss).sum();
        for frac in [0.0, 0.1, 0.5, 1.0] {
            let max = min_loss + (max_loss - min_loss) * frac;
            let got = allocate(&items, Budget::MaxLoss(max)).unwrap();
            let (size, _) = brute_force(&items, Budget::MaxLoss(max)).unwrap();
            assert!(got.met && got.loss <= max + 1e-9, "seed {seed}: {got:?}");
            // Sizes are exact here: the table's unit is one byte.
            assert_eq!(got.size, size, "seed {seed} frac {frac}");
        }
    }
}

/// A budget in real units (a 211-tensor model near 100 MB): the size budget is met to within one
/// table unit of the budget itself and never exceeded, and the loss is no worse than the best
/// uniform format that fits.
#[test]
fn large_tables_meet_the_size_budget_and_beat_uniform_formats() {
    let items = table(7, 211, 50_000);
    let total = |f: usize| -> (u64, f64) {
        (
            items.iter().map(|it| it.choices[f].size_bytes).sum(),
            items.iter().map(|it| it.choices[f].loss).sum(),
        )
    };
    for f in 1..5 {
        let (size, uniform_loss) = total(f);
        let got = allocate(&items, Budget::MaxSize(size)).unwrap();
        assert!(got.met && got.size <= size, "{} > {size}", got.size);
        // The room left is less than the cheapest upgrade of any tensor plus the rounding.
        let upgrade = items
            .iter()
            .zip(&got.choices)
            .filter(|(_, &c)| c > 0)
            .map(|(it, &c)| it.choices[c - 1].size_bytes - it.choices[c].size_bytes)
            .min()
            .unwrap();
        let options = 211 * 6;
        let unit = size.div_ceil((MAX_STEPS / options).min(MAX_TABLE_BYTES / (2 * 211)));
        assert!(
            size - got.size < upgrade + 211 * unit,
            "{} of {size}",
            got.size
        );
        assert!(
            got.loss <= uniform_loss,
            "{} vs uniform {uniform_loss}",
            got.loss
        );
    }
}

#[test]
fn unmeetable_budgets_return_the_best_effort_and_say_so() {
    let items = table(3, 4, 500);
    let smallest: u64 = items.iter().map(|it| it.choices[5].size_bytes).sum();
    let got = allocate(&items, Budget::MaxSize(smallest - 1)).unwrap();
    assert!(!got.met);
    assert_eq!(got.choices, [5, 5, 5, 5]);
    assert_eq!(got.size, smallest);
    let least: f64 = items.iter().map(|it| it.choices[0].loss).sum();
    let got = allocate(&items, Budget::MaxLoss(least * 0.5)).unwrap();
    assert!(!got.met);
    assert_eq!(got.choices, [0, 0, 0, 0], "the least loss there is");
}

#[test]
fn bad_tables_and_budgets_are_named() {
    let empty = vec![Item::new("blk.0.attn_q", vec![])];
    assert_eq!(
        allocate(&empty, Budget::MaxSize(1))
            .unwrap_err()
            .to_string(),
        "tensor 'blk.0.attn_q' has no options to choose from"
    );
    let nan = vec![Item::new("x", vec![Choice::new("q4_0", 10, f64::NAN)])];
    assert!(allocate(&nan, Budget::MaxSize(10))
        .unwrap_err()
        .to_string()
        .contains("'q4_0'"));
    let ok = vec![Item::new("x", vec![Choice::new("q4_0", 10, 1.0)])];
    assert!(allocate(&ok, Budget::MaxSize(0)).is_err());
    assert!(allocate(&ok, Budget::MaxLoss(f64::NAN)).is_err());
}

/// The block-cached sensitivity equals the KL of the whole model with that one weight swapped,
/// computed directly; 8 bits cost less than 4 everywhere; sizes are the packed sizes; and the
/// allocator fed the table meets a budget between the two uniform sizes with less predicted loss
/// than uniform 4 bits.
#[test]
fn sensitivity_equals_a_direct_computation_and_feeds_the_allocator() {
    use candle_core::{DType, Device, Tensor, D};
    use shrink_models::{ModelConfig, Transformer};
    use shrink_quant::Format;
    let mut cfg = ModelConfig::tiny_for_tests();
    cfg.intermediate_size = 64; // rows of down_proj: whole 32-value blocks
    let mut model = Transformer::random(&cfg, 3, &Device::Cpu).unwrap();
    let windows: Vec<Vec<u32>> = (0..3)
        .map(|w| {
            (0..20)
                .map(|i| ((w * 11 + i * 7 + i * i) % 64) as u32)
                .collect()
        })
        .collect();
    let formats = [
        Format::parse("q8_0").unwrap(),
        Format::parse("q4_0").unwrap(),
    ];
    let config = SensitivityConfig {
        formats: formats.to_vec(),
        embeddings: vec![],
        method: shrink_quant::Method::Rtn,
        measure: Measure::Every,
    };
    let alone = shrink_core::Alone;
    let items = sensitivity(&mut model, &windows, &config, &alone, &NoProgress).unwrap();
    assert_eq!(items.len(), 14);
    let ids = Tensor::new(windows.clone(), &Device::Cpu).unwrap();
    let logp = |m: &Transformer| {
        let l = m.forward(&ids).unwrap().narrow(1, 10, 10).unwrap();
        candle_nn::ops::log_softmax(&l, D::Minus1).unwrap()
    };
    let reference = logp(&model);
    for (k, item) in items.iter().enumerate() {
        let (q8, q4) = (&item.choices[0], &item.choices[1]);
        assert!(
            q8.loss < q4.loss,
            "{}: {} vs {}",
            item.name,
            q8.loss,
            q4.loss
        );
        if k % 5 != 0 {
            continue; // a direct check on every fifth linear
        }
        let mut m = model.clone();
        let linear = m.linear_mut(&item.name).unwrap();
        let (rows, cols) = linear.weight().dims2().unwrap();
        let w: Vec<f32> = linear.weight().flatten_all().unwrap().to_vec1().unwrap();
        let q = shrink_quant::rtn_format(&w, rows, cols, &formats[1], None, "x", false).unwrap();
        assert_eq!(q.size_bytes() as u64, q4.size_bytes);
        let t = Tensor::from_vec(q.dequantize().unwrap(), (rows, cols), &Device::Cpu).unwrap();
        linear.set_weight(t).unwrap();
        let direct = (reference.exp().unwrap() * (&reference - logp(&m)).unwrap())
            .unwrap()
            .sum(D::Minus1)
            .unwrap()
            .mean_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(
            (direct - q4.loss).abs() < 1e-6 + 1e-3 * direct,
            "{}: {direct} vs {}",
            item.name,
            q4.loss
        );
    }
    let size = |f: usize| items.iter().map(|it| it.choices[f].size_bytes).sum::<u64>();
    let budget = (size(0) + size(1)) / 2;
    // The scorer gives the same KL for a model with one weight changed as measured directly.
    let mut m = model.clone();
    let name = &items[3].name;
    let linear = m.linear_mut(name).unwrap();
    let (rows, cols) = linear.weight().dims2().unwrap();
    let w: Vec<f32> = linear.weight().flatten_all().unwrap().to_vec1().unwrap();
    let q = shrink_quant::rtn_format(&w, rows, cols, &formats[1], None, "x", false).unwrap();
    let t = Tensor::from_vec(q.dequantize().unwrap(), (rows, cols), &Device::Cpu).unwrap();
    linear.set_weight(t).unwrap();
    let scored = Scorer::new(&mut model.clone(), &windows)
        .unwrap()
        .score(&mut m)
        .unwrap();
    assert_eq!(scored.kl, items[3].choices[1].loss, "{name}");
    let got = allocate(&items, Budget::MaxSize(budget)).unwrap();
    let uniform4: f64 = items.iter().map(|it| it.choices[1].loss).sum();
    assert!(got.met && got.size <= budget && got.loss < uniform4);
}

/// A verifier whose "real" KL is each chosen option's loss times a per-item factor (the table
/// misjudges some tensors), reporting the real relative errors likewise.
struct Skewed {
    factor: Vec<f64>,
    fixed: u64,
    rounds: Vec<Vec<usize>>,
    kept: Vec<usize>,
}

impl Verifier for Skewed {
    fn measure(&mut self, _: usize, items: &[Item], c: &[usize]) -> Result<Measurement> {
        self.rounds.push(c.to_vec());
        let kl: f64 = items
            .iter()
            .zip(c)
            .zip(&self.factor)
            .map(|((it, &c), f)| it.choices[c].loss * f)
            .sum();
        let size = self.fixed
            + items
                .iter()
                .zip(c)
                .map(|(it, &c)| it.choices[c].size_bytes)
                .sum::<u64>();
        let errors = items
            .iter()
            .zip(c)
            .zip(&self.factor)
            .filter_map(|((it, &c), f)| it.choices[c].error.map(|e| (it.name.clone(), e * f)))
            .collect();
        Ok(Measurement {
            size_bytes: size,
            score: Score {
                kl,
                nll: 2.0 + kl,
                ppl_increase_pct: 100.0 * (kl.exp() - 1.0),
            },
            errors,
        })
    }
    fn keep(&mut self, round: usize) -> Result<()> {
        self.kept.push(round);
        Ok(())
    }
}

fn with_errors(items: Vec<Item>) -> Vec<Item> {
    items
        .into_iter()
        .map(|mut it| {
            for c in &mut it.choices {
                c.error = Some(c.loss);
            }
            it
        })
        .collect()
}

/// A size goal: the first allocation trusts the table; the measured errors show one tensor is 4×
/// more sensitive than measured alone, the corrected table moves bits to it, and the second
/// round, better as measured, is the one kept. Converges when the allocation repeats.
#[test]
fn refinement_corrects_a_misjudged_tensor_under_a_size_goal() {
    let items = with_errors(table(11, 12, 5000));
    let mut factor = vec![1.0; items.len()];
    // The tensor the first allocation squeezes hardest relative to its options.
    let first = allocate(&items, Budget::MaxSize(size_of(&items, 1))).unwrap();
    let victim = (0..items.len())
        .max_by(|&a, &b| {
            let r = |i: usize| items[i].choices[first.choices[i]].loss;
            r(a).total_cmp(&r(b))
        })
        .unwrap();
    factor[victim] = 4.0;
    let mut v = Skewed {
        factor,
        fixed: 1000,
        rounds: vec![],
        kept: vec![],
    };
    let goal = Goal::MaxSize(1000 + size_of(&items, 1));
    let limits = Limits {
        deadline: None,
        max_rounds: 6,
    };
    let out = refine(&items, 1000, goal, &limits, &mut v).unwrap();
    assert_eq!(v.rounds[0], first.choices);
    assert!(
        v.rounds.len() >= 2 && v.rounds.len() < 6,
        "{:?}",
        out.stopped
    );
    assert_eq!(out.stopped, "a repeated allocation");
    let best = &out.tried[out.best];
    assert!(out.met && best.size_bytes <= 1000 + size_of(&items, 1));
    assert!(best.score.kl < out.tried[0].score.kl, "{:?}", out.tried);
    assert_eq!(*v.kept.last().unwrap(), out.best);
    // The refined choice gives the misjudged tensor at least the bytes it had.
    let sizes = |c: &[usize]| items[victim].choices[c[victim]].size_bytes;
    assert!(sizes(&v.rounds[out.best]) > sizes(&v.rounds[0]));
}

/// The summed size of every item's option `c`.
fn size_of(items: &[Item], c: usize) -> u64 {
    items.iter().map(|it| it.choices[c].size_bytes).sum()
}

/// A quality goal where every tensor is 1.6× worse than measured: the first allocation misses,
/// the refined KL target meets the goal, and the smallest passing mix is kept. An unreachable
/// goal keeps the mix closest to it.
#[test]
fn refinement_meets_a_quality_goal_the_table_underestimates() {
    let mut items = table(5, 20, 5000);
    for c in items.iter_mut().flat_map(|it| it.choices.iter_mut()) {
        c.loss *= 1e-5;
    }
    let factor = vec![1.6; items.len()];
    let mut v = Skewed {
        factor: factor.clone(),
        fixed: 0,
        rounds: vec![],
        kept: vec![],
    };
    // A goal between the best (all q8_0-like) and the worst mix.
    let kl_best: f64 = items.iter().map(|it| it.choices[0].loss).sum::<f64>() * 1.6;
    let kl_worst: f64 = items.iter().map(|it| it.choices[5].loss).sum::<f64>() * 1.6;
    let kl_goal = (kl_best * kl_worst).sqrt();
    let pct = 100.0 * (kl_goal.exp() - 1.0);
    let limits = Limits {
        deadline: None,
        max_rounds: 8,
    };
    let out = refine(&items, 0, Goal::MaxPplIncrease(pct), &limits, &mut v).unwrap();
    assert!(
        !out.tried[0].met,
        "the table's own target misses: {:?}",
        out.tried[0]
    );
    assert!(out.met, "{:?}", out.tried);
    let best = &out.tried[out.best];
    assert!(best.score.ppl_increase_pct <= pct);
    for t in out.tried.iter().filter(|t| t.met) {
        assert!(best.size_bytes <= t.size_bytes);
    }
    // No mix meets 0.0001%: the one closest to it is kept, and said not to meet it.
    let mut v = Skewed {
        factor,
        fixed: 0,
        rounds: vec![],
        kept: vec![],
    };
    let out = refine(&items, 0, Goal::MaxPplIncrease(1e-4), &limits, &mut v).unwrap();
    assert!(!out.met);
    let least = out
        .tried
        .iter()
        .map(|t| t.score.ppl_increase_pct)
        .fold(f64::INFINITY, f64::min);
    assert_eq!(out.tried[out.best].score.ppl_increase_pct, least);
}

/// `f` run by `n` ranks (threads of one process), each given its handle; the results in rank
/// order.
fn on_ranks<T: Send>(n: usize, f: impl Fn(&shrink_core::ThreadGroup) -> T + Sync) -> Vec<T> {
    let ranks = shrink_core::ThreadGroup::new(n);
    std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .iter()
            .map(|rank| {
                let f = &f;
                s.spawn(move || f(rank))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The sensitivity of a model read block by block equals the model held whole's, bit for bit,
/// and so does the table measured by 3 ranks (threads) that share the tensors out: with GPTQ
/// codes, both measures, the embedding searched, tied and untied heads. The scorer too.
#[test]
fn sensitivity_read_block_by_block_or_split_across_ranks_is_the_same_table() {
    use candle_core::Device;
    use shrink_models::testing::streamed_copy;
    use shrink_models::{ModelConfig, Transformer};
    use shrink_quant::Format;
    let windows: Vec<Vec<u32>> = (0..3)
        .map(|w| {
            (0..16)
                .map(|i| ((w * 13 + i * 5 + i * i) % 64) as u32)
                .collect()
        })
        .collect();
    for (tied, measure) in [
        (true, Measure::Scaled),
        (false, Measure::Every),
        (true, Measure::Fisher),
    ] {
        let mut cfg = ModelConfig::tiny_for_tests();
        cfg.intermediate_size = 64;
        cfg.tie_word_embeddings = tied;
        let model = Transformer::random(&cfg, 5, &Device::Cpu).unwrap();
        let config = SensitivityConfig {
            formats: ["q8_0", "q4_0", "q2_k"]
                .map(|f| Format::parse(f).unwrap())
                .to_vec(),
            embeddings: ["q8_0", "q4_0"].map(|f| Format::parse(f).unwrap()).to_vec(),
            method: shrink_quant::Method::Gptq(shrink_quant::GptqConfig::default()),
            measure,
        };
        let alone = shrink_core::Alone;
        let whole =
            sensitivity(&mut model.clone(), &windows, &config, &alone, &NoProgress).unwrap();
        assert_eq!(whole.len(), 15);
        assert_eq!(whole[14].name, EMBEDDINGS);
        let streamed = sensitivity(
            &mut streamed_copy(&model),
            &windows,
            &config,
            &alone,
            &NoProgress,
        )
        .unwrap();
        assert_eq!(streamed, whole, "tied {tied}");
        let split = on_ranks(3, |rank| {
            let mut m = streamed_copy(&model);
            sensitivity(&mut m, &windows, &config, rank, &NoProgress).unwrap()
        });
        assert!(split.iter().all(|t| *t == whole), "tied {tied}");
        let scorer = Scorer::new(&mut streamed_copy(&model), &windows).unwrap();
        let held = Scorer::new(&mut model.clone(), &windows).unwrap();
        assert_eq!(
            scorer.score(&mut model.clone()).unwrap(),
            held.score(&mut streamed_copy(&model)).unwrap()
        );
    }
}

/// The gradient score of a linear equals `½ Σ F (W − Ŵ)²` with `F` computed independently: each
/// window's gradient (of the log-likelihood of the same tokens drawn from the model's
/// predictions) from candle's autodiff through the whole model (the score chains it block by
/// block), squared, summed and divided by the scored positions. It also ranks the linears as the
/// measured KL does.
#[test]
fn fisher_scores_equal_whole_model_gradients_and_rank_as_the_kl() {
    use candle_core::{Device, Tensor, Var, D};
    use shrink_models::{ModelConfig, Transformer};
    use shrink_quant::Format;
    let mut cfg = ModelConfig::tiny_for_tests();
    cfg.intermediate_size = 64;
    let model = Transformer::random(&cfg, 7, &Device::Cpu).unwrap();
    let (len, half) = (20usize, 10usize);
    let windows: Vec<Vec<u32>> = (0..3)
        .map(|w| {
            (0..len)
                .map(|i| ((w * 17 + i * 3 + i * i) % 64) as u32)
                .collect()
        })
        .collect();
    let formats = ["q8_0", "q4_0"].map(|f| Format::parse(f).unwrap()).to_vec();
    let config = |measure| SensitivityConfig {
        formats: formats.clone(),
        embeddings: vec![],
        method: shrink_quant::Method::Rtn,
        measure,
    };
    let alone = shrink_core::Alone;
    let fisher = sensitivity(
        &mut model.clone(),
        &windows,
        &config(Measure::Fisher),
        &alone,
        &NoProgress,
    )
    .unwrap();
    let kl = sensitivity(
        &mut model.clone(),
        &windows,
        &config(Measure::Every),
        &alone,
        &NoProgress,
    )
    .unwrap();
    assert_eq!(fisher.len(), 14);
    let positions = (windows.len() * (len - half)) as f64;
    // The first block's q_proj (its gradient passes every block) and the last block's down_proj.
    for k in [0, 13] {
        let name = &fisher[k].name;
        let mut m = model.clone();
        let linear = m.linear_mut(name).unwrap();
        let (rows, cols) = linear.weight().dims2().unwrap();
        let w: Vec<f32> = linear.weight().flatten_all().unwrap().to_vec1().unwrap();
        let var = Var::from_tensor(linear.weight()).unwrap();
        linear.set_weight(var.as_tensor().clone()).unwrap();
        let mut f = vec![0f64; w.len()];
        for (index, window) in windows.iter().enumerate() {
            let ids = Tensor::new(&window[..], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = m
                .forward(&ids)
                .unwrap()
                .narrow(1, half, len - half)
                .unwrap();
            let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)
                .unwrap()
                .squeeze(0)
                .unwrap();
            let targets = crate::sensitivity::sampled_targets(&lp, index).unwrap();
            let nll = lp
                .gather(&targets.unsqueeze(1).unwrap(), 1)
                .unwrap()
                .sum_all()
                .unwrap()
                .neg()
                .unwrap();
            let g: Vec<f32> = nll
                .backward()
                .unwrap()
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (a, v) in f.iter_mut().zip(g) {
                *a += (v as f64).powi(2);
            }
        }
        for (format, choice) in formats.iter().zip(&fisher[k].choices) {
            let q = shrink_quant::rtn_format(&w, rows, cols, format, None, "x", false).unwrap();
            let back = q.dequantize().unwrap();
            let expected: f64 = f
                .iter()
                .zip(w.iter().zip(&back))
                .map(|(f, (a, b))| f * ((a - b) as f64).powi(2))
                .sum::<f64>()
                * 0.5
                / positions;
            assert!(expected > 0.0);
            let rel = (choice.loss - expected).abs() / expected;
            assert!(
                rel < 1e-5,
                "{name} {}: {} vs {expected}",
                choice.name,
                choice.loss
            );
        }
    }
    // Ranked against the measured KL over every (linear, format).
    let pairs: Vec<(f64, f64)> = fisher
        .iter()
        .zip(&kl)
        .flat_map(|(a, b)| {
            a.choices
                .iter()
                .zip(&b.choices)
                .map(|(x, y)| (x.loss, y.loss))
        })
        .collect();
    let rho = spearman(&pairs);
    assert!(rho > 0.8, "rank correlation {rho}");
}

/// Every block type is a candidate where its blocks divide the rows: legacy, k- and i-quants on a
/// 256-wide down_proj (GPTQ codes inside each, the gradient score), only the 32-value types on
/// the 32-wide linears; 8 bits cost less than 4, and 4 less than 2.
#[test]
fn the_sensitivity_covers_every_block_type() {
    use candle_core::Device;
    use shrink_models::{ModelConfig, Transformer};
    use shrink_quant::{Format, IQuant, KQuant};
    let mut cfg = ModelConfig::tiny_for_tests();
    cfg.intermediate_size = 256;
    cfg.num_hidden_layers = 1;
    let mut model = Transformer::random(&cfg, 9, &Device::Cpu).unwrap();
    let windows: Vec<Vec<u32>> = (0..2)
        .map(|w| (0..16).map(|i| ((w * 5 + i * 11) % 64) as u32).collect())
        .collect();
    let legacy = ["q8_0", "q5_1", "q5_0", "q4_1", "q4_0"].map(|f| Format::parse(f).unwrap());
    let formats: Vec<Format> = legacy
        .into_iter()
        .chain(KQuant::ALL.into_iter().map(Format::K))
        .chain(IQuant::ALL.into_iter().map(Format::I))
        .collect();
    let config = SensitivityConfig {
        formats: formats.clone(),
        embeddings: vec![],
        method: shrink_quant::Method::Gptq(shrink_quant::GptqConfig::default()),
        measure: Measure::Fisher,
    };
    let items = sensitivity(
        &mut model,
        &windows,
        &config,
        &shrink_core::Alone,
        &NoProgress,
    )
    .unwrap();
    let loss = |item: &Item, f: &str| item.choices.iter().find(|c| c.name == f).unwrap().loss;
    for item in &items {
        let names: Vec<&str> = item.choices.iter().map(|c| c.name.as_str()).collect();
        if item.name.ends_with("down_proj") {
            assert_eq!(names.len(), formats.len(), "{names:?}");
            assert!(loss(item, "q8_0") < loss(item, "iq4_xs"));
            assert!(loss(item, "iq4_xs") < loss(item, "iq2_xxs"));
            assert!(loss(item, "q4_k") < loss(item, "q2_k"));
        } else {
            // 32 wide: the legacy types and IQ4_NL.
            assert_eq!(
                names,
                ["q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl"],
                "{}",
                item.name
            );
            assert!(loss(item, "q8_0") < loss(item, "q4_0"));
        }
    }
}

/// Spearman's rank correlation of the pairs (no ties expected).
fn spearman(pairs: &[(f64, f64)]) -> f64 {
    let ranks = |v: Vec<f64>| {
        let mut order: Vec<usize> = (0..v.len()).collect();
        order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
        let mut r = vec![0f64; v.len()];
        for (rank, i) in order.into_iter().enumerate() {
            r[i] = rank as f64;
        }
        r
    };
    let a = ranks(pairs.iter().map(|p| p.0).collect());
    let b = ranks(pairs.iter().map(|p| p.1).collect());
    let n = pairs.len() as f64;
    let d2: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
    1.0 - 6.0 * d2 / (n * (n * n - 1.0))
}

/// A tensor that no candidate fits fails the sensitivity on every rank, not only on the rank
/// that measures it (the others would wait for its result forever), and one process names it.
#[test]
fn a_failure_on_one_rank_ends_every_rank() {
    use candle_core::Device;
    use shrink_models::testing::streamed_copy;
    use shrink_models::{ModelConfig, Transformer};
    let mut cfg = ModelConfig::tiny_for_tests();
    // down_proj's rows of 48 hold no whole Q8_0 block; the other linears' rows of 32 do.
    cfg.intermediate_size = 48;
    let model = Transformer::random(&cfg, 5, &Device::Cpu).unwrap();
    let windows = vec![(0..16).map(|i| (i * 7 % 64) as u32).collect::<Vec<_>>(); 2];
    let config = SensitivityConfig {
        formats: vec![shrink_quant::Format::parse("q8_0").unwrap()],
        embeddings: vec![],
        method: shrink_quant::Method::Rtn,
        measure: Measure::Scaled,
    };
    let down = "model.layers.0.mlp.down_proj";
    let alone = shrink_core::Alone;
    let e = sensitivity(
        &mut streamed_copy(&model),
        &windows,
        &config,
        &alone,
        &NoProgress,
    )
    .unwrap_err();
    assert!(
        matches!(e, SearchError::NoOptions(ref n) if n == down),
        "{e}"
    );
    // down_proj is the 7th linear: rank 0 of 2 measures it, rank 1 hears of its failure.
    let errors = on_ranks(2, |rank| {
        let mut m = streamed_copy(&model);
        let e = sensitivity(&mut m, &windows, &config, rank, &NoProgress).unwrap_err();
        e.to_string()
    });
    assert_eq!(errors[0], e.to_string());
    assert_eq!(errors[1], format!("rank 0: {e}"));
}

use super::*;
use candle_core::Device;
use rand::{Rng, SeedableRng};
use shrink_calib::LinearStats;
use shrink_core::NoProgress;
use shrink_models::testing::max_abs_diff;
use shrink_models::ModelConfig;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

/// Inputs with strongly correlated channels of very different scales: `tokens × cols`.
fn correlated_inputs(tokens: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let factors = 4;
    let mix: Vec<f32> = (0..factors * cols)
        .map(|_| rng.gen_range(-1.0..1.0))
        .collect();
    let scale: Vec<f32> = (0..cols)
        .map(|j| 0.2 + 3.0 * ((j * 7 % 11) as f32 / 10.0))
        .collect();
    (0..tokens)
        .flat_map(|_| {
            let z: Vec<f32> = (0..factors).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let noise: Vec<f32> = (0..cols).map(|_| rng.gen_range(-0.1..0.1)).collect();
            (0..cols)
                .map(|j| {
                    let s: f32 = (0..factors).map(|f| z[f] * mix[f * cols + j]).sum();
                    (s + noise[j]) * scale[j]
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

fn stats_of(x: &[f32], cols: usize) -> LinearStats {
    let mut s = LinearStats::new(cols);
    s.accumulate(&Tensor::from_slice(x, (x.len() / cols, cols), &Device::Cpu).unwrap())
        .unwrap();
    s
}

fn zero_count(w: &[f32]) -> usize {
    w.iter().filter(|v| **v == 0.0).count()
}

#[test]
fn sparsity_parses_fractions_percentages_and_n_m() {
    assert_eq!(Sparsity::parse("0.5").unwrap(), Sparsity::Fraction(0.5));
    assert_eq!(Sparsity::parse("25%").unwrap(), Sparsity::Fraction(0.25));
    assert_eq!(Sparsity::parse("2:4").unwrap(), Sparsity::NM { n: 2, m: 4 });
    for bad in ["1.0", "-0.1", "4:4", "0:4", "x", "2:", "150%"] {
        let e = Sparsity::parse(bad).unwrap_err().to_string();
        assert!(e.contains(bad), "{e}");
    }
    assert_eq!(Sparsity::NM { n: 4, m: 8 }.fraction(), 0.5);
}

#[test]
fn every_method_hits_the_exact_sparsity_and_every_n_m_group() {
    let (rows, cols) = (24, 64);
    let x = correlated_inputs(200, cols, 1);
    let stats = stats_of(&x, cols);
    let w0 = random(rows * cols, 2);
    for sparsity in [
        Sparsity::Fraction(0.5),
        Sparsity::Fraction(0.3),
        Sparsity::NM { n: 2, m: 4 },
        Sparsity::NM { n: 4, m: 8 },
    ] {
        type Run<'a> = Box<dyn Fn(&mut [f32]) + 'a>;
        let runs: [(&str, Run); 3] = [
            (
                "magnitude",
                Box::new(|w| magnitude(w, rows, cols, sparsity, "t").unwrap()),
            ),
            (
                "wanda",
                Box::new(|w| wanda(w, rows, cols, &stats, sparsity, "t").unwrap()),
            ),
            (
                "sparsegpt",
                Box::new(|w| {
                    let cfg = SparseGptConfig {
                        damp: 0.01,
                        block_size: 24,
                    };
                    sparsegpt(w, rows, cols, &stats, sparsity, &cfg, "t").unwrap()
                }),
            ),
        ];
        for (method, run) in runs {
            let mut w = w0.clone();
            run(&mut w);
            let want = (sparsity.fraction() * (rows * cols) as f64).round() as usize;
            assert_eq!(zero_count(&w), want, "{method} {sparsity}");
            if let Sparsity::NM { n, m } = sparsity {
                for (g, group) in w.chunks(m).enumerate() {
                    assert_eq!(
                        group.iter().filter(|v| **v != 0.0).count(),
                        n,
                        "{method} group {g}"
                    );
                }
            }
            if method == "wanda" {
                // Wanda compares within rows: every row loses the same number.
                let per_row = sparsity.fraction() * cols as f64;
                for row in w.chunks(cols) {
                    let z = zero_count(row);
                    assert!(
                        z == per_row.floor() as usize || z == per_row.ceil() as usize,
                        "{z}"
                    );
                }
            }
            if method != "sparsegpt" {
                // Only SparseGPT changes the weights it keeps.
                assert!(w.iter().zip(&w0).all(|(a, b)| *a == 0.0 || a == b));
            }
        }
    }
}

/// The weights removed, by the definition: the `k` smallest scores of each range (the matrix,
/// a row or an N:M group), ties to the lower index, by a full sort.
fn removed_by_sorting(scores: &[f64], ranges: &[(usize, usize, usize)]) -> Vec<bool> {
    let mut removed = vec![false; scores.len()];
    for &(start, len, k) in ranges {
        let mut idx: Vec<usize> = (start..start + len).collect();
        idx.sort_by(|a, b| scores[*a].total_cmp(&scores[*b]).then(a.cmp(b)));
        for i in &idx[..k] {
            removed[*i] = true;
        }
    }
    removed
}

#[test]
fn magnitude_and_wanda_remove_the_smallest_scores_with_ties_to_the_lower_index() {
    // Few distinct magnitudes (many ties, ±, and zeros already there) so that the threshold's
    // tie-breaking decides most of the mask.
    let (rows, cols) = (12, 16);
    let n = rows * cols;
    let w0: Vec<f32> = (0..n)
        .map(|i| ((i * 7 % 5) as f32 - 2.0) * 0.25 * if i % 3 == 0 { -1.0 } else { 1.0 })
        .collect();
    let norms: Vec<f64> = (0..cols).map(|j| 1.0 + (j % 3) as f64).collect();
    let mut stats = LinearStats::new(cols);
    stats.channel_sq = norms.iter().map(|v| v * v).collect();
    let rows_of = |f: f64| -> Vec<(usize, usize, usize)> {
        (0..rows)
            .map(|r| {
                let k = (f * ((r + 1) * cols) as f64).round() as usize
                    - (f * (r * cols) as f64).round() as usize;
                (r * cols, cols, k)
            })
            .collect()
    };
    let groups = |n_keep: usize, m: usize| -> Vec<(usize, usize, usize)> {
        (0..n / m).map(|g| (g * m, m, m - n_keep)).collect()
    };
    let magnitudes: Vec<f64> = w0.iter().map(|v| v.abs() as f64).collect();
    let wanda_scores: Vec<f64> = w0
        .iter()
        .enumerate()
        .map(|(i, v)| v.abs() as f64 * norms[i % cols])
        .collect();
    for (sparsity, layer, rowwise) in [
        (
            Sparsity::Fraction(0.3),
            vec![(0, n, (0.3 * n as f64).round() as usize)],
            rows_of(0.3),
        ),
        (
            Sparsity::Fraction(0.55),
            vec![(0, n, (0.55 * n as f64).round() as usize)],
            rows_of(0.55),
        ),
        (Sparsity::NM { n: 2, m: 4 }, groups(2, 4), groups(2, 4)),
    ] {
        for (method, scores, ranges) in [
            ("magnitude", &magnitudes, &layer),
            ("wanda", &wanda_scores, &rowwise),
        ] {
            let mut w = w0.clone();
            match method {
                "magnitude" => magnitude(&mut w, rows, cols, sparsity, "t").unwrap(),
                _ => wanda(&mut w, rows, cols, &stats, sparsity, "t").unwrap(),
            }
            let want = removed_by_sorting(scores, ranges);
            for i in 0..n {
                let expect = if want[i] { 0.0 } else { w0[i] };
                assert_eq!(
                    w[i].to_bits(),
                    expect.to_bits(),
                    "{method} {sparsity} weight {i}"
                );
            }
        }
    }
}

#[test]
fn sparsegpt_beats_wanda_beats_magnitude_on_correlated_inputs() {
    let (rows, cols) = (64, 128);
    let x = correlated_inputs(1024, cols, 3);
    let stats = stats_of(&x, cols);
    let w0 = random(rows * cols, 4);
    for sparsity in [Sparsity::Fraction(0.5), Sparsity::NM { n: 2, m: 4 }] {
        let err = |w: &[f32]| stats.relative_output_error(&w0, w).unwrap();
        let mut m = w0.clone();
        magnitude(&mut m, rows, cols, sparsity, "t").unwrap();
        let mut wa = w0.clone();
        wanda(&mut wa, rows, cols, &stats, sparsity, "t").unwrap();
        let mut s = w0.clone();
        sparsegpt(
            &mut s,
            rows,
            cols,
            &stats,
            sparsity,
            &SparseGptConfig::default(),
            "t",
        )
        .unwrap();
        let (em, ew, es) = (err(&m), err(&wa), err(&s));
        assert!(
            es < ew && ew < em,
            "{sparsity}: sparsegpt {es} wanda {ew} magnitude {em}"
        );
        // The OBS updates are worth a lot here, not a rounding difference.
        assert!(es < 0.5 * ew, "{sparsity}: sparsegpt {es} wanda {ew}");
    }
}

#[test]
fn sparsegpt_obs_update_matches_the_hand_computed_value() {
    // One row [w0, w1] and H = [[a, b], [b, c]]: removing w0 moves w1 to w1 + w0·b/c, the
    // least-squares best w1 given x0 and x1.
    let x = [1.0f32, 2.0, 3.0, 1.0, -1.0, 0.5];
    let stats = stats_of(&x, 2);
    let (a, b, c) = (stats.hessian[0], stats.hessian[1], stats.hessian[3]);
    assert_eq!((a, b, c), (11.0, 4.5, 5.25));
    let mut w = [0.1f32, 0.8];
    let cfg = SparseGptConfig {
        damp: 0.0,
        block_size: 128,
    };
    sparsegpt(&mut w, 1, 2, &stats, Sparsity::Fraction(0.5), &cfg, "t").unwrap();
    // Saliency w²/[H⁻¹]_jj: [H⁻¹]_00 = c/det, [H⁻¹]_11 = a/det → w0 goes (0.01/c ≪ 0.64/a).
    assert_eq!(w[0], 0.0);
    let want = 0.8 + 0.1 * b / c;
    assert!((w[1] as f64 - want).abs() < 1e-6, "{} vs {want}", w[1]);
}

#[test]
fn bad_weights_and_groups_name_the_tensor() {
    let mut w = vec![1.0f32, f32::NAN, 2.0, 3.0];
    let e = magnitude(&mut w, 1, 4, Sparsity::Fraction(0.5), "blk.3.q").unwrap_err();
    assert!(e.to_string().contains("blk.3.q"), "{e}");
    let mut w = vec![1.0f32; 6];
    let e = magnitude(&mut w, 1, 6, Sparsity::NM { n: 2, m: 4 }, "blk.1.up").unwrap_err();
    assert!(
        e.to_string().contains("blk.1.up") && e.to_string().contains("groups of 4"),
        "{e}"
    );
    let stats = stats_of(&[1.0, 2.0, 3.0], 3);
    let mut w = vec![1.0f32; 8];
    let e = wanda(&mut w, 2, 4, &stats, Sparsity::Fraction(0.5), "blk.0.k").unwrap_err();
    assert!(e.to_string().contains("blk.0.k"), "{e}");
}

fn tiny() -> (Transformer, Vec<Vec<u32>>) {
    let model = Transformer::random(&ModelConfig::tiny_for_tests(), 5, &Device::Cpu).unwrap();
    let tokens: Vec<u32> = (0..600).map(|i| ((i * 17 + i / 7) % 64) as u32).collect();
    (
        model,
        shrink_calib::sample_windows(&tokens, 6, 24, 1).unwrap(),
    )
}

#[test]
fn model_pruning_reports_each_linear_and_keeps_embeddings_dense() {
    let (model, windows) = tiny();
    for method in [
        PruneMethod::Magnitude { global: false },
        PruneMethod::Wanda,
        PruneMethod::SparseGpt(SparseGptConfig::default()),
    ] {
        let mut m = model.clone();
        let mut plan = PrunePlan::uniform(method, Sparsity::Fraction(0.5));
        plan.rules
            .push(("down_proj".into(), Sparsity::Fraction(0.25)));
        let w = method.calibrates().then_some(windows.as_slice());
        let layers = prune_model(&mut m, &plan, w, 4, &NoProgress).unwrap();
        assert_eq!(layers.len(), 14);
        for l in &layers {
            let want = if l.name.contains("down_proj") {
                0.25
            } else {
                0.5
            };
            assert_eq!(l.sparsity, want, "{method:?} {}", l.name);
            let w = m.named_tensors()[&format!("{}.weight", l.name)].clone();
            let zeros = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(zero_count(&zeros) as f64 / zeros.len() as f64, want);
            let hessian = matches!(method, PruneMethod::SparseGpt(_));
            assert_eq!(l.relative_output_error.is_some(), hessian);
        }
        assert_eq!(
            m.embed_tokens.to_vec2::<f32>().unwrap(),
            model.embed_tokens.to_vec2::<f32>().unwrap()
        );
    }
    let mut m = model.clone();
    let e = prune_model(
        &mut m,
        &PrunePlan::uniform(PruneMethod::Wanda, Sparsity::Fraction(0.5)),
        None,
        4,
        &NoProgress,
    )
    .unwrap_err();
    assert!(e.to_string().contains("calibration"), "{e}");
}

#[test]
fn global_magnitude_removes_the_smallest_weights_of_the_whole_model() {
    let (model, _) = tiny();
    let mut m = model.clone();
    let plan = PrunePlan::uniform(
        PruneMethod::Magnitude { global: true },
        Sparsity::Fraction(0.4),
    );
    let layers = prune_model(&mut m, &plan, None, 4, &NoProgress).unwrap();
    let (mut before, mut after) = (vec![], vec![]);
    for (b0, b1) in model.blocks.iter().zip(&m.blocks) {
        for ((_, l0), (_, l1)) in b0.linears().iter().zip(b1.linears().iter()) {
            before.extend(l0.weight().flatten_all().unwrap().to_vec1::<f32>().unwrap());
            after.extend(l1.weight().flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
    }
    let k = (0.4 * before.len() as f64).round() as usize;
    assert_eq!(zero_count(&after), k);
    let kept_min = after
        .iter()
        .filter(|v| **v != 0.0)
        .map(|v| v.abs())
        .fold(f32::MAX, f32::min);
    let removed_max = before
        .iter()
        .zip(&after)
        .filter(|(_, a)| **a == 0.0)
        .map(|(b, _)| b.abs())
        .fold(0.0, f32::max);
    assert!(removed_max <= kept_min);
    // Per-layer sparsities differ: the threshold is shared, not the fraction.
    let s: Vec<f64> = layers.iter().map(|l| l.sparsity).collect();
    assert!(s.iter().any(|x| (x - s[0]).abs() > 1e-3), "{s:?}");
}

fn logits(model: &Transformer, windows: &[Vec<u32>]) -> Vec<f32> {
    let ids = Tensor::new(windows[..2].to_vec(), &Device::Cpu).unwrap();
    model
        .forward(&ids)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn zero_slice(t: &Tensor, dim: usize, idx: &[usize]) -> Tensor {
    let mut v = t.to_vec2::<f32>().unwrap();
    for (r, row) in v.iter_mut().enumerate() {
        for (c, x) in row.iter_mut().enumerate() {
            if idx.contains(if dim == 0 { &r } else { &c }) {
                *x = 0.0;
            }
        }
    }
    Tensor::new(v, &Device::Cpu).unwrap()
}

fn heads_config() -> ModelConfig {
    ModelConfig {
        hidden_size: 48,
        num_attention_heads: 6,
        num_key_value_heads: Some(2),
        head_dim: Some(8),
        ..ModelConfig::tiny_for_tests()
    }
}

#[test]
fn structurally_pruned_models_equal_the_zeroed_originals() {
    let tokens: Vec<u32> = (0..600).map(|i| ((i * 13 + i / 5) % 64) as u32).collect();
    let windows = shrink_calib::sample_windows(&tokens, 6, 24, 2).unwrap();
    let base = Transformer::random(&heads_config(), 9, &Device::Cpu).unwrap();
    let hd = 8;
    let cases = [
        Structure::QueryHeads { per_group: 1 },
        Structure::KvGroups { count: 1 },
        Structure::Channels { count: 20 },
        Structure::Layers {
            count: 1,
            criterion: LayerCriterion::BlockInfluence,
        },
        Structure::Width { count: 16 },
    ];
    for structure in cases {
        for importance in [
            Importance::Magnitude,
            Importance::Activation,
            Importance::Taylor,
        ] {
            let mut pruned = base.clone();
            let out = prune_structured(
                &mut pruned,
                structure,
                importance,
                Some(&windows),
                3,
                &NoProgress,
            )
            .unwrap();
            assert!(
                out.parameters_after < out.parameters_before,
                "{structure:?}"
            );
            assert_eq!(out.parameters_after, pruned.num_parameters());
            let mut zeroed = base.clone();
            match structure {
                Structure::QueryHeads { .. } | Structure::KvGroups { .. } => {
                    for (b, gone) in zeroed.blocks.iter_mut().zip(&out.removed) {
                        let heads: Vec<usize> = match structure {
                            Structure::KvGroups { .. } => {
                                gone.iter().flat_map(|g| g * 3..g * 3 + 3).collect()
                            }
                            _ => gone.clone(),
                        };
                        let cols: Vec<usize> =
                            heads.iter().flat_map(|h| h * hd..(h + 1) * hd).collect();
                        let w = zero_slice(b.o_proj.weight(), 1, &cols);
                        b.o_proj.set_weight(w).unwrap();
                    }
                    assert_eq!(
                        out.removed.iter().map(Vec::len).collect::<Vec<_>>(),
                        match structure {
                            Structure::KvGroups { .. } => vec![1, 1],
                            _ => vec![2, 2],
                        }
                    );
                }
                Structure::Channels { .. } => {
                    for (b, gone) in zeroed.blocks.iter_mut().zip(&out.removed) {
                        let w = zero_slice(b.down_proj.weight(), 1, gone);
                        b.down_proj.set_weight(w).unwrap();
                    }
                    assert_eq!(pruned.config.intermediate_size, 28);
                }
                Structure::Layers { .. } => {
                    for &i in &out.removed[0] {
                        let b = &mut zeroed.blocks[i];
                        b.o_proj
                            .set_weight(b.o_proj.weight().zeros_like().unwrap())
                            .unwrap();
                        b.down_proj
                            .set_weight(b.down_proj.weight().zeros_like().unwrap())
                            .unwrap();
                    }
                    assert_eq!(pruned.blocks.len(), 1);
                }
                Structure::Width { .. } => {
                    let gone = &out.removed[0];
                    zeroed.embed_tokens = zero_slice(&zeroed.embed_tokens, 1, gone);
                    for b in zeroed.blocks.iter_mut() {
                        let w = zero_slice(b.o_proj.weight(), 0, gone);
                        b.o_proj.set_weight(w).unwrap();
                        let w = zero_slice(b.down_proj.weight(), 0, gone);
                        b.down_proj.set_weight(w).unwrap();
                    }
                    assert_eq!(pruned.config.hidden_size, 32);
                    assert_eq!(pruned.config.head_dim(), 8);
                }
            }
            let d = max_abs_diff(&logits(&pruned, &windows), &logits(&zeroed, &windows));
            assert!(d < 1e-4, "{structure:?} {importance:?}: {d}");
            // And the removal changed the model (the test would pass trivially otherwise).
            let moved = max_abs_diff(&logits(&pruned, &windows), &logits(&base, &windows));
            assert!(moved > 1e-3, "{structure:?}: {moved}");
        }
    }
}

#[test]
fn importance_picks_the_silent_parts_and_layer_criteria_agree_on_an_identity_block() {
    let tokens: Vec<u32> = (0..600).map(|i| ((i * 13 + i / 5) % 64) as u32).collect();
    let windows = shrink_calib::sample_windows(&tokens, 6, 24, 2).unwrap();
    let mut cfg = heads_config();
    cfg.num_hidden_layers = 4;
    let mut base = Transformer::random(&cfg, 11, &Device::Cpu).unwrap();
    // Block 2 writes nothing: every criterion must remove it first.
    {
        let b = &mut base.blocks[2];
        b.o_proj
            .set_weight(b.o_proj.weight().zeros_like().unwrap())
            .unwrap();
        b.down_proj
            .set_weight(b.down_proj.weight().zeros_like().unwrap())
            .unwrap();
    }
    // MLP channel 5 of block 0 is scaled down 1000×: both importances must drop it.
    {
        let b = &mut base.blocks[0];
        let d = b.down_proj.weight().to_vec2::<f32>().unwrap();
        let d: Vec<Vec<f32>> = d
            .into_iter()
            .map(|mut r| {
                r[5] *= 1e-3;
                r
            })
            .collect();
        b.down_proj
            .set_weight(Tensor::new(d, &Device::Cpu).unwrap())
            .unwrap();
    }
    for criterion in [
        LayerCriterion::BlockInfluence,
        LayerCriterion::Angular,
        LayerCriterion::Perplexity,
    ] {
        let mut m = base.clone();
        let out = prune_structured(
            &mut m,
            Structure::Layers {
                count: 1,
                criterion,
            },
            Importance::Activation,
            Some(&windows),
            3,
            &NoProgress,
        )
        .unwrap();
        assert_eq!(out.removed, vec![vec![2]], "{criterion:?}");
    }
    for importance in [
        Importance::Magnitude,
        Importance::Activation,
        Importance::Taylor,
    ] {
        let mut m = base.clone();
        let out = prune_structured(
            &mut m,
            Structure::Channels { count: 1 },
            importance,
            Some(&windows),
            3,
            &NoProgress,
        )
        .unwrap();
        assert_eq!(out.removed[0], vec![5], "{importance:?}");
    }
    let mut m = base.clone();
    let e = prune_structured(
        &mut m,
        Structure::KvGroups { count: 2 },
        Importance::Magnitude,
        None,
        3,
        &NoProgress,
    )
    .unwrap_err();
    assert!(e.to_string().contains("at least one"), "{e}");
    let e = prune_structured(
        &mut m,
        Structure::Width { count: 3 },
        Importance::Activation,
        None,
        3,
        &NoProgress,
    )
    .unwrap_err();
    assert!(e.to_string().contains("calibration"), "{e}");
}

/// The streamed path (a model read block by block from its file, written as each block is
/// pruned) writes the very bytes of the whole-model path to a GGUF, and the same tensors to a
/// folder, for every method that streams, from a GGUF and from a safetensors folder.
#[test]
fn streamed_pruning_writes_what_the_whole_model_path_writes() {
    use shrink_io::{Export, GgufWriteType};
    let dir = tempfile::tempdir().unwrap();
    let shrink_io::testing::TinyStreamable {
        gguf, hf, windows, ..
    } = shrink_io::testing::tiny_streamable(7, dir.path()).unwrap();
    let mut mixed = PrunePlan::uniform(PruneMethod::Wanda, Sparsity::NM { n: 2, m: 4 });
    mixed
        .rules
        .push(("down_proj".into(), Sparsity::Fraction(0.3)));
    let plans = [
        (
            PrunePlan::uniform(
                PruneMethod::Magnitude { global: false },
                Sparsity::Fraction(0.5),
            ),
            false,
        ),
        (mixed, true),
        (
            PrunePlan::uniform(
                PruneMethod::SparseGpt(SparseGptConfig {
                    damp: 0.01,
                    block_size: 8,
                }),
                Sparsity::Fraction(0.5),
            ),
            true,
        ),
    ];
    for input in [&gguf, &hf] {
        let checkpoint = shrink_io::load(input).unwrap();
        for (plan, calibrates) in &plans {
            let windows = calibrates.then_some(&windows[..]);
            // Built as the pipeline builds it: from the file's own config.
            let config = ModelConfig::from_json(&checkpoint.config).unwrap();
            let mut whole = Transformer::from_checkpoint(
                &config,
                checkpoint.load_finite().unwrap(),
                DType::F32,
            )
            .unwrap();
            let a = prune_model(&mut whole, plan, windows, 2, &NoProgress).unwrap();
            for (export, dtype) in [
                (Export::Gguf, GgufWriteType::F16),
                (Export::Gguf, GgufWriteType::F32),
                (Export::Hf, GgufWriteType::F16),
            ] {
                let name = format!("{}-{dtype:?}", export.name());
                let (whole_path, streamed_path) = (
                    dir.path().join(format!("whole-{name}")),
                    dir.path().join(format!("streamed-{name}")),
                );
                shrink_io::write_model(&checkpoint, &whole, export, dtype, &whole_path).unwrap();
                // Folders are written with the activations spilled to a scratch file.
                let keep = shrink_calib::Keep {
                    spill: (export == Export::Hf).then_some(dir.path()),
                    ..Default::default()
                };
                let run = StreamedRun {
                    windows,
                    keep,
                    export,
                    dtype,
                    ..streamed_run(&[], &shrink_core::Alone)
                };
                let b = prune_streamed(&checkpoint, plan, &run, &streamed_path).unwrap();
                assert_eq!(b.resumed_at, None);
                let facts = |layers: &[LayerSparsity]| {
                    layers
                        .iter()
                        .map(|l| (l.name.clone(), l.sparsity, l.relative_output_error))
                        .collect::<Vec<_>>()
                };
                assert_eq!(facts(&a), facts(&b.layers), "{plan:?}");
                let case = format!("{:?} from {} to {name}", plan.method, input.display());
                assert_same_output(export, &whole_path, &streamed_path, &case);
            }
        }
    }
    // Global magnitude pruning ranks the whole model's weights: it does not stream.
    let checkpoint = shrink_io::load(&gguf).unwrap();
    let global = PrunePlan::uniform(
        PruneMethod::Magnitude { global: true },
        Sparsity::Fraction(0.5),
    );
    let out = dir.path().join("global.gguf");
    let run = StreamedRun {
        windows: None,
        ..streamed_run(&[], &shrink_core::Alone)
    };
    let e = prune_streamed(&checkpoint, &global, &run, &out).unwrap_err();
    assert!(e.to_string().contains("holds the model whole"), "{e}");
    assert!(!out.exists());
}

/// Checks that two outputs hold the same model: a GGUF byte for byte; a folder's config, tensor
/// names, types and values bit for bit.
pub(crate) fn assert_same_output(
    export: shrink_io::Export,
    a: &std::path::Path,
    b: &std::path::Path,
    case: &str,
) {
    match export {
        shrink_io::Export::Gguf => assert!(
            std::fs::read(a).unwrap() == std::fs::read(b).unwrap(),
            "{case}"
        ),
        shrink_io::Export::Hf => {
            let (x, y) = (shrink_io::load(a).unwrap(), shrink_io::load(b).unwrap());
            assert_eq!(x.config, y.config, "{case}");
            let names: Vec<&String> = x.tensors.names().collect();
            assert_eq!(names, y.tensors.names().collect::<Vec<_>>(), "{case}");
            for n in names {
                let (p, q) = (x.tensors.get(n).unwrap(), y.tensors.get(n).unwrap());
                assert_eq!(p.dtype(), q.dtype(), "{case}: {n}");
                let bits = |t: &Tensor| {
                    t.to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<_>>()
                };
                assert!(bits(&p) == bits(&q), "{case}: {n}");
            }
        }
    }
}

/// A streamed pruning's settings for tests: `windows` in batches of 2, activations in memory, an
/// F32 GGUF.
pub(crate) fn streamed_run<'a>(
    windows: &'a [Vec<u32>],
    world: &'a dyn shrink_core::Collective,
) -> StreamedRun<'a> {
    StreamedRun {
        windows: Some(windows),
        batch: 2,
        world,
        keep: Default::default(),
        export: shrink_io::Export::Gguf,
        dtype: shrink_io::GgufWriteType::F32,
        progress: &NoProgress,
    }
}

/// Width pruning is exact when the removed channels are silent (zero in the embedding and in
/// every row that writes the residual stream): Llama, and Gemma 3 with its embedding scaled by
/// √width (rescaled for the new width, the tied head's final norm left as it was), its norms
/// applied as `1 + w` and its QK-norms kept whole.
#[test]
fn width_pruning_of_silent_channels_keeps_the_logits() {
    for cfg in [
        ModelConfig::tiny_for_tests(),
        ModelConfig::tiny_gemma3_for_tests(),
    ] {
        let mut model = Transformer::random(&cfg, 4, &candle_core::Device::Cpu).unwrap();
        let silent = [3usize, 17, 30, 31];
        let zero = |t: &Tensor, dim: usize| -> Tensor {
            let mut mask = vec![1f32; t.dim(dim).unwrap()];
            for &c in &silent {
                mask[c] = 0.0;
            }
            let shape: Vec<usize> = (0..t.rank())
                .map(|d| if d == dim { mask.len() } else { 1 })
                .collect();
            let mask = Tensor::from_vec(mask, shape, t.device()).unwrap();
            t.broadcast_mul(&mask).unwrap()
        };
        model.embed_tokens = zero(&model.embed_tokens, 1);
        for b in &mut model.blocks {
            for l in [&mut b.o_proj, &mut b.down_proj] {
                let w = zero(l.weight(), 0);
                l.set_weight(w).unwrap();
            }
        }
        if let Some(head) = &mut model.lm_head {
            let w = zero(head.weight(), 1);
            head.set_weight(w).unwrap();
        }
        let ids = Tensor::new(&[[3u32, 9, 27, 40, 2, 61]], &candle_core::Device::Cpu).unwrap();
        let want: Vec<Vec<f32>> = model
            .forward(&ids)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        let mut pruned = model.clone();
        let out = prune_structured(
            &mut pruned,
            Structure::Width { count: 4 },
            Importance::Magnitude,
            None,
            2,
            &NoProgress,
        )
        .unwrap();
        assert_eq!(out.removed[0], silent.to_vec(), "{}", cfg.model_type);
        let got: Vec<Vec<f32>> = pruned
            .forward(&ids)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2()
            .unwrap();
        let diff =
            shrink_models::testing::max_abs_diff(got.iter().flatten(), want.iter().flatten());
        assert!(diff < 1e-3, "{}: {diff}", cfg.model_type);
    }
}

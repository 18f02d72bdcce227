use super::*;
use candle_core::Device;
use shrink_models::{ModelConfig, Transformer};

#[test]
fn windows_are_seeded_and_in_range() {
    let tokens: Vec<u32> = (0..100).collect();
    let a = sample_windows(&tokens, 5, 10, 3).unwrap();
    assert_eq!(a, sample_windows(&tokens, 5, 10, 3).unwrap());
    assert_ne!(a, sample_windows(&tokens, 5, 10, 4).unwrap());
    for w in &a {
        assert_eq!(w.len(), 10);
        assert_eq!(w[9], w[0] + 9, "contiguous");
    }
    assert!(sample_windows(&tokens, 1, 101, 0).is_err());
}

#[test]
fn sequential_feeds_compressed_outputs_forward() {
    let cfg = ModelConfig::tiny_for_tests();
    let mut model = Transformer::random(&cfg, 1, &Device::Cpu).unwrap();
    let reference = model.clone();
    let windows = vec![
        vec![1u32, 2, 3, 4, 5, 6],
        vec![7, 8, 9, 10, 11, 12],
        vec![3, 3, 3, 3, 3, 3],
    ];
    let mut hessians = vec![];
    sequential::<_, CalibError>(
        &mut model,
        &windows,
        2,
        true,
        &shrink_core::NoProgress,
        &mut |block, stats| {
            let s = stats
                .get(&format!("model.layers.{}.mlp.up_proj", block.index))
                .unwrap();
            assert_eq!(s.rows, 18);
            assert!(std::ptr::eq(
                s,
                stats
                    .get(&format!("model.layers.{}.mlp.gate_proj", block.index))
                    .unwrap()
            ));
            hessians.push(
                stats
                    .get(&format!("model.layers.{}.self_attn.k_proj", block.index))
                    .unwrap()
                    .hessian
                    .clone(),
            );
            // "Compress" block 0 by zeroing its MLP output.
            if block.index == 0 {
                let zeros = block.down_proj.weight().zeros_like()?;
                block.down_proj.set_weight(zeros)?;
            }
            Ok(())
        },
    )
    .unwrap();
    // Block 1's inputs were computed with block 0 compressed: its Hessian must equal the
    // one from a direct run of the modified model, not of the original.
    let ids = Tensor::new(windows.clone(), &Device::Cpu).unwrap();
    let ctx = model.attention_context(6, 0).unwrap();
    let x0 = model.embed(&ids).unwrap();
    let x1 = model.blocks[0]
        .forward(&x0, &ctx, None, &mut NoHook)
        .unwrap();
    let h1 = model.blocks[1].attn_norm.forward(&x1).unwrap();
    let mut direct = LinearStats::new(cfg.hidden_size);
    direct.accumulate(&h1).unwrap();
    let diff = hessians[1]
        .iter()
        .zip(&direct.hessian)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(diff < 1e-3, "{diff}");
    let x1_ref = reference.blocks[0]
        .forward(&x0, &ctx, None, &mut NoHook)
        .unwrap();
    let mut orig = LinearStats::new(cfg.hidden_size);
    orig.accumulate(&reference.blocks[1].attn_norm.forward(&x1_ref).unwrap())
        .unwrap();
    let moved = orig
        .hessian
        .iter()
        .zip(&direct.hessian)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(
        moved > 1e-2,
        "compression of block 0 must change block 1's statistics"
    );
}

#[test]
fn a_pass_resumed_from_recorded_activations_is_the_uninterrupted_pass() {
    let cfg = ModelConfig::tiny_for_tests();
    let windows: Vec<Vec<u32>> = (0..3)
        .map(|w| (0..6).map(|t| w * 7 + t).collect())
        .collect();
    // Block 0 "compressed" by halving its down projection; each block's Hessians recorded.
    let scratch = tempfile::tempdir().unwrap();
    let run_in = |model: &mut Transformer, start: Option<Resume>, keep: Keep| {
        let (mut hessians, mut after) = (vec![], vec![]);
        sequential_from::<_, CalibError>(
            model,
            &windows,
            2,
            true,
            &Alone,
            &shrink_core::NoProgress,
            start,
            keep,
            &mut |block, stats, _| {
                let q = format!("model.layers.{}.self_attn.q_proj", block.index);
                hessians.push((block.index, stats.get(&q).unwrap().hessian.clone()));
                let half = (block.down_proj.weight() * 0.5)?;
                block.down_proj.set_weight(half)?;
                Ok(())
            },
            &mut |index, xs| {
                let xs: Vec<Tensor> = (0..xs.len()).map(|k| xs.get(k).unwrap()).collect();
                after.push((index, xs));
                Ok(())
            },
        )
        .unwrap();
        (hessians, after)
    };
    let run = |model: &mut Transformer, start| run_in(model, start, Keep::default());
    let fresh = Transformer::random(&cfg, 3, &Device::Cpu).unwrap();
    let (whole, after) = run(&mut fresh.clone(), None);
    // Activations spilled to a scratch file: the same bits, and no file left behind.
    let (spilled, spilled_after) = run_in(&mut fresh.clone(), None, Keep::spilled(scratch.path()));
    assert!(spilled == whole, "bit-identical statistics");
    let bits = |xs: &[Tensor]| -> Vec<Vec<f32>> {
        xs.iter()
            .map(|x| x.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect()
    };
    for ((_, a), (_, b)) in after.iter().zip(&spilled_after) {
        assert!(bits(a) == bits(b));
    }
    assert_eq!(std::fs::read_dir(scratch.path()).unwrap().count(), 0);
    // Kept in bf16: the same statistics in memory and spilled, other bits than in f32 but
    // within bf16's rounding (2⁻⁹ relative per input value) of them.
    let bf16 = |spill| Keep {
        spill,
        dtype: candle_core::DType::BF16,
    };
    let (rounded, _) = run_in(&mut fresh.clone(), None, bf16(None));
    let (rounded_spilled, _) = run_in(&mut fresh.clone(), None, bf16(Some(scratch.path())));
    assert!(rounded == rounded_spilled);
    for ((_, exact), (_, rounded)) in whole.iter().zip(&rounded) {
        let difference: f64 = exact
            .iter()
            .zip(rounded)
            .map(|(a, b)| (a - b).powi(2))
            .sum();
        let norm: f64 = exact.iter().map(|a| a * a).sum();
        let relative = (difference / norm).sqrt();
        assert!(relative > 0.0 && relative < 1e-2, "{relative}");
    }
    assert_eq!(after.len(), 2);
    assert_eq!(after[0].1.len(), 2, "one tensor per batch of windows");
    // Resumed at block 1 with what block 0 left (on a model whose block 0 was never run).
    let (resumed, _) = run(
        &mut fresh.clone(),
        Some(Resume {
            block: 1,
            activations: Activations::in_memory(after[0].1.clone()),
        }),
    );
    assert_eq!(resumed.len(), 1);
    assert_eq!(resumed[0].0, 1);
    assert!(resumed[0].1 == whole[1].1, "bit-identical statistics");
    let wrong = sequential_from::<_, CalibError>(
        &mut fresh.clone(),
        &windows,
        2,
        true,
        &Alone,
        &shrink_core::NoProgress,
        Some(Resume {
            block: 1,
            activations: Activations::in_memory(vec![]),
        }),
        Keep::default(),
        &mut |_, _, _| Ok(()),
        &mut |_, _| Ok(()),
    )
    .unwrap_err();
    assert!(
        wrong.to_string().contains("resuming a killed job"),
        "{wrong}"
    );
}

#[test]
fn ranks_that_split_the_batches_get_one_process_statistics_bit_for_bit() {
    let cfg = ModelConfig::tiny_for_tests();
    let windows: Vec<Vec<u32>> = (0..7)
        .map(|w| (0..6).map(|t| (w * 11 + t * 5) % 64).collect())
        .collect();
    let fresh = Transformer::random(&cfg, 5, &Device::Cpu).unwrap();
    // Each block's statistics are recorded and steer its "compression" (down_proj scaled by
    // a factor of its Hessian), so that a difference in any block shows in the next ones.
    let run = |world: &dyn Collective| {
        let mut model = fresh.clone();
        let mut seen = vec![];
        sequential_from::<_, CalibError>(
            &mut model,
            &windows,
            2,
            true,
            world,
            &shrink_core::NoProgress,
            None,
            Keep::default(),
            &mut |block, stats, _| {
                let up = stats
                    .get(&format!("model.layers.{}.mlp.up_proj", block.index))
                    .unwrap();
                let o = stats
                    .get(&format!("model.layers.{}.self_attn.o_proj", block.index))
                    .unwrap();
                seen.push((up.clone(), o.clone()));
                let f = 1.0 / (1.0 + up.hessian[1].abs().sqrt());
                let w = (block.down_proj.weight() * f)?;
                block.down_proj.set_weight(w)?;
                Ok(())
            },
            &mut |_, _| Ok(()),
        )
        .unwrap();
        let weights: Vec<Vec<f32>> = model
            .blocks
            .iter()
            .map(|b| {
                b.down_proj
                    .weight()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect();
        (seen, weights)
    };
    let alone = run(&Alone);
    assert_eq!(alone.0[0].0.rows, 7 * 6);
    for size in [2, 3, 4] {
        let ranks = shrink_core::ThreadGroup::new(size);
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks.iter().map(|r| s.spawn(|| run(r))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (rank, got) in results.iter().enumerate() {
            assert!(
                *got == alone,
                "{size} ranks: rank {rank} differs from one process"
            );
        }
    }
    // Fewer batches than ranks is refused on every rank.
    let ranks = shrink_core::ThreadGroup::new(5);
    let errors: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .iter()
            .map(|r| {
                s.spawn(|| {
                    sequential_from::<_, CalibError>(
                        &mut fresh.clone(),
                        &windows,
                        2,
                        true,
                        r,
                        &shrink_core::NoProgress,
                        None,
                        Keep::default(),
                        &mut |_, _, _| Ok(()),
                        &mut |_, _| Ok(()),
                    )
                    .unwrap_err()
                    .to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        errors
            .iter()
            .all(|e| e.contains("5 ranks need at least 5 batches")),
        "{errors:?}"
    );
}

#[test]
fn the_exchange_adds_the_ranks_batches_in_batch_order() {
    // f64 addition is not associative: 1 − 1 + 2⁻⁶⁰ is 2⁻⁶⁰ in batch order, 0 in reverse.
    let values = [1.0f32, -1.0, 2f32.powi(-60)];
    let single = {
        let mut s = LinearStats::new(1);
        for v in values {
            s.add(&Partial {
                xtx: vec![v],
                channels: vec![v, v.abs(), v.abs()],
                rows: 1,
            });
        }
        s
    };
    assert_eq!(single.hessian[0], 2f64.powi(-60));
    let ranks = shrink_core::ThreadGroup::new(3);
    let got: Vec<LinearStats> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .iter()
            .zip(values)
            .map(|(rank, v)| {
                s.spawn(move || {
                    let mut hook = StatsHook {
                        stats: BlockStats {
                            stats: vec![LinearStats::new(1)],
                            index: BTreeMap::new(),
                        },
                        last: None,
                        hessian: true,
                        pending: Some(vec![Some(Partial {
                            xtx: vec![v],
                            channels: vec![v, v.abs(), v.abs()],
                            rows: 1,
                        })]),
                    };
                    exchange(rank, &mut hook, 3);
                    hook.stats.stats.remove(0)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for stats in got {
        assert!(stats == single, "{stats:?}");
    }
}

use super::*;

#[test]
fn greedy_generation_follows_the_full_forward() {
    let cfg = crate::ModelConfig::tiny_for_tests();
    let model = Transformer::random(&cfg, 3, &candle_core::Device::Cpu).unwrap();
    let prompt = [1u32, 4, 9];
    let mut sampler = Sampler::new(SamplingConfig::default());
    let g = generate(&model, &prompt, 5, &mut sampler, &[], |_| {
        Ok::<(), crate::ModelError>(())
    })
    .unwrap();
    assert_eq!(g.tokens.len(), 5);
    // Each token is the argmax of a full forward over everything before it.
    let mut ids = prompt.to_vec();
    for &t in &g.tokens {
        let x = Tensor::new(vec![ids.clone()], &candle_core::Device::Cpu).unwrap();
        let logits = model.forward(&x).unwrap();
        let last = logits.squeeze(0).unwrap().get(ids.len() - 1).unwrap();
        assert_eq!(
            Sampler::new(SamplingConfig::default())
                .sample(&last)
                .unwrap(),
            t
        );
        ids.push(t);
    }
    // A stop token ends generation before it is emitted.
    let mut sampler = Sampler::new(SamplingConfig::default());
    let stopped = generate(&model, &prompt, 5, &mut sampler, &[g.tokens[2]], |_| {
        Ok::<(), crate::ModelError>(())
    })
    .unwrap();
    assert_eq!(stopped.tokens, g.tokens[..2]);
}

#[test]
fn greedy_takes_argmax() {
    let mut s = Sampler::new(SamplingConfig::default());
    assert_eq!(s.sample_slice(&[0.1, 3.0, -1.0, 2.9]), 1);
}

#[test]
fn tiny_top_p_is_greedy_and_seed_is_reproducible() {
    let cfg = SamplingConfig {
        temperature: 1.0,
        top_p: 1e-9,
        seed: 1,
    };
    let mut s = Sampler::new(cfg);
    for _ in 0..20 {
        assert_eq!(s.sample_slice(&[0.1, 3.0, -1.0, 2.9]), 1);
    }
    let cfg = SamplingConfig {
        temperature: 1.0,
        top_p: 1.0,
        seed: 42,
    };
    let draw = |cfg| {
        let mut s = Sampler::new(cfg);
        (0..50)
            .map(|_| s.sample_slice(&[0.0, 0.0, 0.0, 0.0]))
            .collect::<Vec<_>>()
    };
    let a = draw(cfg);
    assert_eq!(a, draw(cfg));
    assert!(
        a.iter().any(|&t| t != a[0]),
        "uniform logits give varied draws"
    );
}

#[test]
fn top_p_excludes_the_tail() {
    // Probabilities ~ [0.5, 0.3, 0.2, ~0]: top_p 0.75 keeps only tokens 0 and 1.
    let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln(), -50.0];
    let mut s = Sampler::new(SamplingConfig {
        temperature: 1.0,
        top_p: 0.75,
        seed: 3,
    });
    for _ in 0..200 {
        assert!(s.sample_slice(&logits) < 2);
    }
}

use super::*;
use rand::{Rng, SeedableRng};

fn rows(n: usize, vocab: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n * vocab).map(|_| rng.gen_range(-6f32..6.0)).collect()
}

/// Log-softmax in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let z = max
        + row
            .iter()
            .map(|&v| (v as f64 - max).exp())
            .sum::<f64>()
            .ln();
    row.iter().map(|&v| v as f64 - z).collect()
}

/// The base row's log-probabilities as stored.
fn decoded(stored: &[u16]) -> Vec<f64> {
    let word = |i: usize| f32::from_bits(stored[2 * i] as u32 | (stored[2 * i + 1] as u32) << 16);
    stored[4..]
        .iter()
        .map(|&c| (word(0) * c as f32 + word(1)) as f64)
        .collect()
}

#[test]
fn nearest_int_rounds_half_to_even_like_llama_cpp() {
    for (x, want) in [
        (2.5, 2),
        (3.5, 4),
        (-0.5, 0),
        (0.49, 0),
        (65534.6, 65535),
        (7.0, 7),
    ] {
        assert_eq!(nearest_int(x), want, "{x}");
    }
}

#[test]
fn stored_rows_are_the_log_softmax_within_half_a_step() {
    let vocab = 37; // odd: the row is padded to an even count
    let mut row = rows(1, vocab, 1);
    row[3] = -40.0; // more than 16 below the maximum: stored as the minimum
    let mut stored = vec![7u16; row_len(vocab)];
    encode_row(&row, &mut stored);
    assert_eq!(stored.len(), 42);
    assert_eq!(stored[4 + vocab], 0, "padding");
    let exact = log_softmax(&row);
    let got = decoded(&stored);
    let step = 16.0 / 65535.0;
    let max = row.iter().cloned().fold(f32::MIN, f32::max);
    for (i, (&g, &e)) in got.iter().zip(&exact).enumerate().take(vocab) {
        if row[i] > max - 16.0 {
            assert!((g - e).abs() <= step * 0.51 + 1e-5, "{i}: {g} vs {e}");
        } else {
            // Below the range: stored as the range's minimum, above the true value.
            assert!(g > e, "{i}: {g} vs {e}");
            assert_eq!(stored[4 + i], 0, "{i} below the range");
        }
    }
}

#[test]
fn statistics_equal_a_direct_computation_from_the_stored_base() {
    let (vocab, n) = (50, 9);
    let model = rows(n, vocab, 2);
    let base_logits: Vec<f32> = model
        .iter()
        .enumerate()
        .map(|(i, &v)| v + 0.8 * ((i * 7919 % 13) as f32 / 13.0 - 0.5))
        .collect();
    let mut stored = vec![0u16; n * row_len(vocab)];
    for (out, row) in stored
        .chunks_mut(row_len(vocab))
        .zip(base_logits.chunks(vocab))
    {
        encode_row(row, out);
    }
    let targets: Vec<usize> = (0..n).map(|i| i * 5 % vocab).collect();
    let mut kl_sum = 0f64;
    let mut same = 0;
    for ((row, base), &t) in model
        .chunks(vocab)
        .zip(stored.chunks(row_len(vocab)))
        .zip(&targets)
    {
        let p = position(row, base, t);
        let (lm, lb) = (log_softmax(row), decoded(base));
        let kl: f64 = lb
            .iter()
            .zip(&lm)
            .filter(|(b, _)| **b > -16.0)
            .map(|(b, m)| b.exp() * (b - m))
            .sum();
        assert!((p.kld - kl).abs() < 1e-6, "KL {} vs {kl}", p.kld);
        assert!((p.nll as f64 + lm[t]).abs() < 1e-5);
        assert!((p.nll_base as f64 + lb[t]).abs() < 1e-6);
        assert!((p.p_diff as f64 - (lm[t].exp() - lb[t].exp())).abs() < 1e-6);
        let top = |v: &[f64]| (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b });
        assert_eq!(p.same_top, top(&lm) == top(&lb));
        kl_sum += kl;
        same += usize::from(p.same_top);
    }
    // Through a file: the report's mean KL and agreement are the positions'.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("base.kld");
    let ctx = 2 * n + 2; // ctx/2 .. ctx-2: n positions
    let mut tokens: Vec<u32> = (0..ctx as u32).map(|i| i % vocab as u32).collect();
    for (p, &t) in targets.iter().enumerate() {
        tokens[ctx / 2 + p + 1] = t as u32;
    }
    let mut w = BaseWriter::new(&path, ctx, 1, &tokens).unwrap();
    w.chunk(0, &base_logits, vocab).unwrap();
    w.finish().unwrap();
    let base = BaseLogits::open(&path).unwrap();
    assert_eq!(base.header.tokens, tokens);
    assert_eq!(
        (base.header.ctx, base.header.vocab, base.header.scored()),
        (ctx, vocab, n)
    );
    let mut k = KlAgainstBase::new(base);
    k.chunk(0, &model, vocab).unwrap();
    let r = k.finish(1).unwrap();
    assert_eq!(r.positions, n);
    assert!((r.kld.value - kl_sum / n as f64).abs() < 1e-6);
    assert_eq!(r.same_top.value, same as f64 / n as f64);
    assert_eq!(r.kld_percentiles.len(), 11);
    assert_eq!(r.p_diff_percentiles.len(), 13);
}

#[test]
fn a_model_against_its_own_saved_logits_has_no_divergence() {
    let (vocab, ctx) = (64, 16);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("self.kld");
    let scored = ctx - 1 - ctx / 2;
    let chunks: Vec<Vec<f32>> = (0..3).map(|c| rows(scored, vocab, 10 + c)).collect();
    let tokens: Vec<u32> = (0..3 * ctx as u32).map(|i| i * 7 % 64).collect();
    let mut w = BaseWriter::new(&path, ctx, 3, &tokens).unwrap();
    for (i, c) in chunks.iter().enumerate() {
        w.chunk(i, c, vocab).unwrap();
    }
    w.finish().unwrap();
    let mut k = KlAgainstBase::new(BaseLogits::open(&path).unwrap());
    for (i, c) in chunks.iter().enumerate() {
        k.chunk(i, c, vocab).unwrap();
    }
    let r = k.finish(3).unwrap();
    // Only the 16-bit steps and llama.cpp's f32 terms (which can make a sum slightly negative).
    assert!(r.kld.value.abs() < 1e-5, "{}", r.kld.value);
    assert_eq!(r.same_top.value, 1.0);
    assert!((r.ppl.value / r.ppl_base.value - 1.0).abs() < 1e-4);
}

#[test]
fn bad_base_files_are_refused_with_their_path() {
    let dir = tempfile::tempdir().unwrap();
    let (vocab, ctx) = (8, 8);
    let path = dir.path().join("b.kld");
    let tokens = vec![1u32; 2 * ctx];
    let mut w = BaseWriter::new(&path, ctx, 2, &tokens).unwrap();
    let one = rows(ctx - 1 - ctx / 2, vocab, 3);
    w.chunk(0, &one, vocab).unwrap();
    // A chunk out of order, then a writer stopped early: no file appears.
    assert!(w.chunk(5, &one, vocab).is_err());
    let err = w.finish().unwrap_err().to_string();
    assert!(
        err.contains("1 of 2 chunks") && err.contains("b.kld"),
        "{err}"
    );
    assert!(!path.exists());
    let mut w = BaseWriter::new(&path, ctx, 2, &tokens).unwrap();
    w.chunk(0, &one, vocab).unwrap();
    w.chunk(1, &one, vocab).unwrap();
    w.finish().unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let bad = dir.path().join("bad.kld");
    for (what, content) in [
        ("shorter than a header", bytes[..10].to_vec()),
        ("not a file of base", [b"_logitz_", &bytes[8..]].concat()),
        ("bytes, but 2 chunks", bytes[..bytes.len() - 2].to_vec()),
    ] {
        std::fs::write(&bad, content).unwrap();
        let err = BaseLogits::open(&bad).err().unwrap().to_string();
        assert!(
            err.contains(what) && err.contains("bad.kld"),
            "{what}: {err}"
        );
    }
    // A model with another vocabulary, or BOS the file's tokens do not start with.
    let base = BaseLogits::open(&path).unwrap();
    assert!(base.text_tokens(Some(9)).is_err());
    assert_eq!(base.text_tokens(Some(1)).unwrap().len(), 2 * ctx - 1);
    let mut k = KlAgainstBase::new(base);
    let err = k.chunk(0, &rows(3, 9, 1), 9).unwrap_err().to_string();
    assert!(err.contains("vocabulary 9"), "{err}");
}

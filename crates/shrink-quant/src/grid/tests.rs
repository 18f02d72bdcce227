use super::*;

#[test]
fn codes_match_llama_cpps_float_formulas_at_every_tie() {
    // The casts against the C formulas written with float rounding (roundf, truncf): a sweep
    // over quarter steps (exact ties at .5) and the floats either side of each.
    let mut xs = vec![];
    for k in -600..=600 {
        let x = k as f32 * 0.25;
        xs.extend([x, x.next_up(), x.next_down()]);
    }
    for (grid, bits, top) in [
        (Grid::Symmetric, 8u8, 127.0f32),
        (Grid::SymmetricFull, 4, -8.0),
        (Grid::SymmetricFull, 5, -16.0),
        (Grid::Asymmetric, 4, 15.0),
    ] {
        // Scale 1 (and minimum 0) so that x·id is x itself; then a scale of 1/3.
        for values in [vec![top, 0.0], vec![top / 3.0, 0.0]] {
            let p = grid.params(bits, &values, 1.0);
            let half = (1u32 << (bits - 1)) as f32;
            let levels = ((1u32 << bits) - 1) as f32;
            for &x in &xs {
                let reference = match grid {
                    Grid::Symmetric => {
                        (x * p.inv_scale).round().clamp(-(half - 1.0), half - 1.0) + half
                    }
                    Grid::SymmetricFull => {
                        (x * p.inv_scale + half + 0.5).trunc().clamp(0.0, levels)
                    }
                    Grid::Asymmetric => ((x - p.min_unrounded) * p.inv_scale + 0.5)
                        .trunc()
                        .clamp(0.0, levels),
                } as u8;
                assert_eq!(grid.code(bits, &p, x), reference, "{grid:?} {bits} {x}");
            }
        }
    }
    // An all-zero group keeps a +0 scale even when it starts with -0.0.
    let p = Grid::SymmetricFull.params(4, &[-0.0, 0.0], 1.0);
    assert_eq!(p.scale.to_bits(), half::f16::from_f32(0.0 / -8.0).to_bits());
}

#[test]
fn q4_0_hand_example() {
    // max |x| is -4 at index 1: d = -4 / -8 = 0.5; x/d + 8.5 truncated.
    let x = [1.0f32, -4.0, 0.3, 3.9];
    let p = Grid::SymmetricFull.params(4, &x, 1.0);
    assert_eq!(p.scale.to_f32(), 0.5);
    let codes: Vec<u8> = x
        .iter()
        .map(|&v| Grid::SymmetricFull.code(4, &p, v))
        .collect();
    assert_eq!(codes, vec![10, 0, 9, 15]);
    assert_eq!(Grid::SymmetricFull.value(4, &p, 10), 1.0);
    assert_eq!(Grid::SymmetricFull.value(4, &p, 0), -4.0);
}

#[test]
fn q8_0_and_q4_1_hand_examples() {
    let x = [127.0f32, -63.5, 0.0];
    let p = Grid::Symmetric.params(8, &x, 1.0);
    assert_eq!(p.scale.to_f32(), 1.0);
    let codes: Vec<u8> = x.iter().map(|&v| Grid::Symmetric.code(8, &p, v)).collect();
    assert_eq!(
        codes,
        vec![255, 64, 128],
        "-63.5 rounds away from zero to -64"
    );
    let x = [1.0f32, 2.5, 16.0];
    let p = Grid::Asymmetric.params(4, &x, 1.0);
    assert_eq!((p.scale.to_f32(), p.min.to_f32()), (1.0, 1.0));
    let codes: Vec<u8> = x.iter().map(|&v| Grid::Asymmetric.code(4, &p, v)).collect();
    assert_eq!(codes, vec![0, 2, 15]);
}

#[test]
fn clip_search_never_increases_weighted_error() {
    let values: Vec<f32> = (0..32)
        .map(|i| ((i * 37 % 17) as f32 - 8.0) / 3.0 + if i == 5 { 9.0 } else { 0.0 })
        .collect();
    let importance: Vec<f32> = (0..32).map(|i| 1.0 + (i % 4) as f32).collect();
    for grid in [Grid::Symmetric, Grid::SymmetricFull, Grid::Asymmetric] {
        let err = |search| {
            let mut codes = vec![0; 32];
            let p = grid.quantize_group(4, &values, Some(&importance), search, &mut codes);
            values
                .iter()
                .zip(&codes)
                .zip(&importance)
                .map(|((x, &c), w)| (x - grid.value(4, &p, c)).powi(2) * w)
                .sum::<f32>()
        };
        assert!(err(true) <= err(false), "{grid:?}");
    }
}

//! Speed of shrink's integer products (`shrink_core::qmatmul`) alone, for comparing two builds of
//! the kernels (issue #20, item 6): the seven linears of SmolLM2-135M's blocks (q, k, v, o, gate,
//! up, down; k-quants at 512 columns instead of 576, which they cannot divide) in random blocks of
//! each type, times `layers` copies, multiplied by `t` tokens inside a rayon pool as `shrink`'s
//! commands run them. One token over 30 layers is a decoding step's products with the weights out
//! of the caches (memory-bound); 512 tokens over one layer is a prefill's (compute-bound).
//!
//! `RAYON_NUM_THREADS=2 cargo run --release -p shrink-core --example qkernels -- T REPEATS LAYERS`
//! (defaults 1, 20, 30). Prints, per type, the best of 5 rounds of `REPEATS` passes: the time of
//! one pass over every layer's seven products. Compare builds by alternating their runs: this
//! machine's noise is larger than most changes.

use shrink_core::qmatmul::{BlockType, QMatrix};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arg = |i: usize, default: usize| -> Result<usize, std::num::ParseIntError> {
        std::env::args().nth(i).map_or(Ok(default), |s| s.parse())
    };
    let (t, repeats, layers) = (arg(1, 1)?, arg(2, 20)?, arg(3, 30)?);
    let pool = rayon::ThreadPoolBuilder::new().build()?;
    let types = [
        BlockType::Q4_0,
        BlockType::Q4_1,
        BlockType::Q4K,
        BlockType::Q6K,
        BlockType::Q8_0,
    ];
    for ty in types {
        let h = if ty.block_len() == 256 { 512 } else { 576 };
        let shapes = [
            (576, h),
            (192, h),
            (192, h),
            (576, h),
            (1536, h),
            (1536, h),
            (576, 1536),
        ];
        let shapes = shapes.repeat(layers);
        let mut s = 12345u64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        };
        let matrices = shapes
            .iter()
            .map(|&(rows, cols)| {
                let bytes = rows * cols / ty.block_len() * ty.block_bytes();
                // Random bits (the first four bytes of a block, where the legacy types and Q4_K
                // keep their f16 scales, set to 0x2c2c): only the speed is measured.
                let data = (0..bytes)
                    .map(|i| {
                        if i % ty.block_bytes() < 4 {
                            0x2c
                        } else {
                            next()
                        }
                    })
                    .collect();
                QMatrix::new(ty, rows, cols, data)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let x: Vec<f32> = (0..t * 1536)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let best = pool.install(|| {
            (0..5)
                .map(|_| {
                    let start = Instant::now();
                    for _ in 0..repeats {
                        for (m, &(_, cols)) in matrices.iter().zip(&shapes) {
                            std::hint::black_box(m.matmul(&x[..t * cols], t));
                        }
                    }
                    start.elapsed().as_secs_f64() / repeats as f64
                })
                .fold(f64::INFINITY, f64::min)
        });
        println!("{ty:?} t={t} layers={layers}: {:.1} us", best * 1e6);
    }
    Ok(())
}

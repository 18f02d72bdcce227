//! Times GPTQ's factorization (`damped_inverse_cholesky_upper`) of an `n × n` Hessian-like XᵀX
//! (X pseudo-random, `2n` rows; building it is not timed), and prints a checksum of the factor's
//! bits, so two builds can be compared for speed and for identical results:
//!
//!     cargo run --release -p shrink-calib --example factorize 4096
fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .expect("usage: factorize N");
    // A Hessian-like XᵀX from pseudo-random X (n × 2n).
    let m = 2 * n;
    let mut state = 12345u64;
    let x: Vec<f32> = (0..n * m)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        })
        .collect();
    let mut h = vec![0.0f64; n * n];
    use rayon::prelude::*;
    h.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        for t in 0..m {
            let xi = x[t * n + i] as f64;
            for (j, r) in row.iter_mut().enumerate() {
                *r += xi * x[t * n + j] as f64;
            }
        }
    });
    let t = std::time::Instant::now();
    let u = shrink_calib::damped_inverse_cholesky_upper(h, n, 0.01, "t").unwrap();
    let sum: f64 = u.iter().sum();
    println!(
        "n {n} {:.2} s checksum {:x}",
        t.elapsed().as_secs_f64(),
        sum.to_bits()
    );
}

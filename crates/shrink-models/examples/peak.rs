//! The machine's limits, to which every speed figure of shrink is a ratio (issue #20, item 1):
//!
//! - the f32 FMA peak: independent fused multiply-adds on registers only (AVX-512 and AVX2
//!   where the CPU has them), on 1 thread and on every thread;
//! - f32 GEMM at shrink's shapes through candle (its `gemm` crate), built with `--features
//!   shrink-models/openblas` through OpenBLAS's `cblas_sgemm` (Debian's `libopenblas-dev`), and through shrink's own `shrink_core::gemm` (one reduction
//!   order on every CPU: what the forward uses since issue #20, item 3), with the Hessian's `XᵀX`
//!   by candle's product and by shrink's `gram` (the upper triangle);
//! - the memory bandwidth: the STREAM triad `a = b + s·c` over arrays far larger than the caches;
//! - shrink's own forward pass (`Transformer::forward`, random weights of SmolLM2-135M's shapes,
//!   one window of 512 tokens): the useful flops it does (linears, causal attention, head) per
//!   second, which is what the GEMM rates above bound.
//!
//! `RAYON_NUM_THREADS=N cargo run --release -p shrink-models --example peak`;
//! `scripts/bench-peak.sh` runs it at 1 and 2 threads. Each figure is the median of its repeats, with the best and worst.

use candle_core::{Device, Tensor};
use std::time::Instant;

/// Median, best and worst of `repeats` timings (seconds) of `f`.
fn timed(repeats: usize, mut f: impl FnMut()) -> (f64, f64, f64) {
    f();
    let mut t: Vec<f64> = (0..repeats)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    (t[t.len() / 2], t[0], t[t.len() - 1])
}

/// `flops / seconds` in G, for the median, the best and the worst time.
fn rate(flops: f64, (median, best, worst): (f64, f64, f64)) -> String {
    format!(
        "{:7.1} (best {:.1}, worst {:.1})",
        flops / median / 1e9,
        flops / best / 1e9,
        flops / worst / 1e9
    )
}

const FMA_ITERATIONS: usize = 20_000_000;
const ACCUMULATORS: usize = 12;

/// Flops of `FMA_ITERATIONS` rounds of `ACCUMULATORS` independent 512-bit FMAs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn fma_avx512() -> f32 {
    use std::arch::x86_64::*;
    let a = _mm512_set1_ps(0.999_999);
    let b = _mm512_set1_ps(1e-7);
    let mut acc = [_mm512_set1_ps(1.0); ACCUMULATORS];
    for _ in 0..FMA_ITERATIONS {
        for x in acc.iter_mut() {
            *x = _mm512_fmadd_ps(*x, a, b);
        }
    }
    acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fma_avx2() -> f32 {
    use std::arch::x86_64::*;
    let a = _mm256_set1_ps(0.999_999);
    let b = _mm256_set1_ps(1e-7);
    let mut acc = [_mm256_set1_ps(1.0); ACCUMULATORS];
    for _ in 0..FMA_ITERATIONS {
        for x in acc.iter_mut() {
            *x = _mm256_fmadd_ps(*x, a, b);
        }
    }
    let mut out = [0f32; 8];
    acc.iter()
        .map(|&x| {
            // SAFETY: `out` holds the 8 floats stored.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), x) };
            out.iter().sum::<f32>()
        })
        .sum()
}

/// The FMA peak in GFLOP/s of `lanes`-wide FMAs run by `kernel` on `threads` threads at once.
fn fma_peak(threads: usize, lanes: usize, kernel: fn() -> f32) -> String {
    let flops = (threads * FMA_ITERATIONS * ACCUMULATORS * lanes * 2) as f64;
    rate(
        flops,
        timed(3, || {
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..threads).map(|_| s.spawn(kernel)).collect();
                let sum: f32 = handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum();
                std::hint::black_box(sum);
            })
        }),
    )
}

#[cfg(feature = "openblas")]
mod openblas {
    #[link(name = "openblas")]
    extern "C" {
        fn cblas_sgemm(
            layout: i32,
            trans_a: i32,
            trans_b: i32,
            m: i32,
            n: i32,
            k: i32,
            alpha: f32,
            a: *const f32,
            lda: i32,
            b: *const f32,
            ldb: i32,
            beta: f32,
            c: *mut f32,
            ldc: i32,
        );
        fn openblas_set_num_threads(n: i32);
    }

    /// `c = a · b` (row-major, `a` m × k, `b` k × n) on `threads` threads.
    pub fn sgemm(
        threads: usize,
        m: usize,
        k: usize,
        n: usize,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
    ) {
        const ROW_MAJOR: i32 = 101;
        const NO_TRANS: i32 = 111;
        // SAFETY: the slices hold m·k, k·n and m·n floats, as the dimensions passed say.
        unsafe {
            openblas_set_num_threads(threads as i32);
            cblas_sgemm(
                ROW_MAJOR,
                NO_TRANS,
                NO_TRANS,
                m as i32,
                n as i32,
                k as i32,
                1.0,
                a.as_ptr(),
                k as i32,
                b.as_ptr(),
                n as i32,
                0.0,
                c.as_mut_ptr(),
                n as i32,
            );
        }
    }
}

/// GEMM rates for `(m, k, n)` through candle and, when built with it, OpenBLAS.
fn gemm(threads: usize, m: usize, k: usize, n: usize, what: &str) -> candle_core::Result<()> {
    let a: Vec<f32> = (0..m * k)
        .map(|i| ((i * 7 % 13) as f32 - 6.0) / 13.0)
        .collect();
    let b: Vec<f32> = (0..k * n)
        .map(|i| ((i * 5 % 11) as f32 - 5.0) / 11.0)
        .collect();
    let flops = (2 * m * k * n) as f64;
    let repeats = if flops > 1e11 { 3 } else { 7 };
    let (ta, tb) = (
        Tensor::from_slice(&a, (m, k), &Device::Cpu)?,
        Tensor::from_slice(&b, (k, n), &Device::Cpu)?,
    );
    let mut failed = None;
    let candle = timed(repeats, || {
        if let Err(e) = ta.matmul(&tb) {
            failed = Some(e);
        }
    });
    if let Some(e) = failed {
        return Err(e);
    }
    println!(
        "gemm       {what:<34} {m:>5} × {k:>5} × {n:>5}  candle   {} GFLOP/s",
        rate(flops, candle)
    );
    {
        use shrink_core::gemm::{gemm, Operand};
        let mut c = vec![0f32; m * n];
        let own = timed(repeats, || {
            gemm(
                m,
                n,
                k,
                Operand::row_major(&a, k),
                Operand::row_major(&b, n),
                &mut c,
                false,
            )
        });
        println!(
            "gemm       {what:<34} {m:>5} × {k:>5} × {n:>5}  shrink   {} GFLOP/s",
            rate(flops, own)
        );
    }
    #[cfg(feature = "openblas")]
    {
        let mut c = vec![0f32; m * n];
        let blas = timed(repeats, || {
            openblas::sgemm(threads, m, k, n, &a, &b, &mut c)
        });
        println!(
            "gemm       {what:<34} {m:>5} × {k:>5} × {n:>5}  openblas {} GFLOP/s",
            rate(flops, blas)
        );
    }
    let _ = threads;
    Ok(())
}

/// The Hessian's `XᵀX` of `rows × n` activations: candle's full product against shrink's
/// [`shrink_core::gemm::gram`] (the upper triangle, mirrored), both as useful flops `rows · n²`
/// … counted as a full product's `2 · rows · n²` so the two compare directly.
fn gram(rows: usize, n: usize, what: &str) -> candle_core::Result<()> {
    let x: Vec<f32> = (0..rows * n)
        .map(|i| ((i * 7 % 13) as f32 - 6.0) / 13.0)
        .collect();
    let flops = (2 * rows * n * n) as f64;
    let tx = Tensor::from_slice(&x, (rows, n), &Device::Cpu)?;
    let mut failed = None;
    let candle = timed(7, || {
        if let Err(e) = tx.t().and_then(|t| t.matmul(&tx)) {
            failed = Some(e);
        }
    });
    if let Some(e) = failed {
        return Err(e);
    }
    let mut c = vec![0f32; n * n];
    let own = timed(7, || shrink_core::gemm::gram(&x, rows, n, &mut c));
    println!(
        "xᵀx        {what:<34} candle {} / shrink gram {} GFLOP/s (full-product flops)",
        rate(flops, candle),
        rate(flops, own)
    );
    Ok(())
}

/// The STREAM triad over `threads` threads, each on its own third of 3 × 512 MB.
fn triad(threads: usize) -> String {
    const N: usize = 128 << 20;
    let mut a = vec![0f32; N];
    let b = vec![1f32; N];
    let c = vec![2f32; N];
    let chunk = N.div_ceil(threads);
    let bytes = (3 * N * 4) as f64;
    rate(
        bytes,
        timed(5, || {
            std::thread::scope(|s| {
                for ((a, b), c) in a
                    .chunks_mut(chunk)
                    .zip(b.chunks(chunk))
                    .zip(c.chunks(chunk))
                {
                    s.spawn(move || {
                        for ((x, y), z) in a.iter_mut().zip(b).zip(c) {
                            *x = y + 3.0 * z;
                        }
                    });
                }
            });
            std::hint::black_box(&a);
        }),
    )
}

/// The forward pass of a SmolLM2-135M-shaped model (random weights) over one window of 512
/// tokens: its useful flops per second.
fn forward() -> Result<String, Box<dyn std::error::Error>> {
    let cfg = shrink_models::ModelConfig::from_json(&serde_json::json!({
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": true,
        "hidden_act": "silu"
    }))?;
    let model = shrink_models::Transformer::random(&cfg, 0, &Device::Cpu)?;
    let s = 512;
    let ids: Vec<u32> = (0..s as u32).map(|i| i * 97 % 49152).collect();
    let ids = Tensor::from_vec(ids, (1, s), &Device::Cpu)?;
    let (h, i, v) = (576.0, 1536.0, 49152.0);
    let kv = h / 3.0;
    // Per token: q, k, v, o, gate, up, down; causal attention (QKᵀ and AV over s/2 keys on
    // average); the tied head.
    let per_token = 30.0 * (2.0 * (2.0 * h * h + 2.0 * h * kv + 3.0 * h * i) + 2.0 * s as f64 * h)
        + 2.0 * v * h;
    let mut failed = None;
    let t = timed(5, || {
        if let Err(e) = model.forward(&ids) {
            failed = Some(e);
        }
    });
    if let Some(e) = failed {
        return Err(e.into());
    }
    Ok(format!(
        "{} GFLOP/s, {:.0} tokens/s",
        rate(per_token * s as f64, t),
        s as f64 / t.0
    ))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // candle's GEMM (through rayon) and this benchmark take the thread count from
    // RAYON_NUM_THREADS.
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    println!(
        "threads    {threads}; figures: median (best, worst) of the repeats; {}",
        std::fs::read_to_string("/proc/loadavg")
            .map(|l| format!("load {}", l.trim()))
            .unwrap_or_default()
    );
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            let kernel = || unsafe { fma_avx512() };
            println!(
                "fma peak   avx512 {} GFLOP/s",
                fma_peak(threads, 16, kernel)
            );
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA.
            let kernel = || unsafe { fma_avx2() };
            println!("fma peak   avx2   {} GFLOP/s", fma_peak(threads, 8, kernel));
        }
    }
    for (m, k, n, what) in [
        (512, 576, 1536, "SmolLM2 gate/up, 512 tokens"),
        (512, 1536, 576, "SmolLM2 down, 512 tokens"),
        (512, 576, 576, "SmolLM2 q/o, 512 tokens"),
        (2048, 2048, 2048, "square 2048"),
        (512, 4096, 14336, "Llama-3-8B gate/up, 512 tokens"),
    ] {
        gemm(threads, m, k, n, what)?;
    }
    for (rows, n, what) in [
        (2048, 576, "SmolLM2 q/k/v/gate/up input, 2048 rows"),
        (2048, 1536, "SmolLM2 down input, 2048 rows"),
    ] {
        gram(rows, n, what)?;
    }
    println!(
        "triad      a = b + s·c, 3 × 512 MB  {} GB/s",
        triad(threads)
    );
    println!("forward    SmolLM2 shapes, 1 × 512 tokens  {}", forward()?);
    Ok(())
}

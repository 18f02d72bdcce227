//! The integer kernels: one panel of [`LANES`] weight rows against every token. The portable
//! loop and the AVX-512 VNNI kernel compute each output with the same exact integer sums and the
//! same float operations in the same order, so their bits agree.

use super::{Activations, BlockType, Mins, RowPanels, LANES};

/// Tokens run against a panel at once (the VNNI kernel's register tile); twice as many for the
/// types without per-sub-block minima.
const TOKENS: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kernel {
    Portable,
    Vnni,
}

impl Kernel {
    /// VNNI when the f32 products run on AVX-512 (`SHRINK_KERNEL` and the CPU permitting) and the
    /// CPU has AVX-512 VNNI; the portable loop otherwise.
    pub(super) fn current() -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if crate::gemm::Kernel::current() == crate::gemm::Kernel::Avx512
            && std::arch::is_x86_feature_detected!("avx512vnni")
        {
            return Kernel::Vnni;
        }
        Kernel::Portable
    }

    #[cfg(test)]
    pub(super) fn available() -> Vec<Kernel> {
        let mut all = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512vnni") {
            all.push(Kernel::Vnni);
        }
        all
    }
}

/// A type's layout as the kernels walk it.
struct Layout {
    /// Codes per sub-block, sub-blocks per block, blocks per row.
    g: usize,
    per: usize,
    blocks: usize,
    offset: i32,
    mins: Mins,
    /// Whether sub-blocks carry integer scales (the k-quants).
    scaled: bool,
}

impl Layout {
    fn new(ty: BlockType, cols: usize) -> Self {
        let g = ty.sub_len();
        Layout {
            g,
            per: ty.block_len() / g,
            blocks: cols / ty.block_len(),
            offset: ty.offset(),
            mins: ty.mins(),
            scaled: ty.block_len() > 32,
        }
    }
}

/// From this many tokens on, a panel's 4-bit codes are spread to a byte each once (into
/// `scratch`) rather than unpacked at every step for every group of [`TOKENS`] tokens.
const UNPACK_TOKENS: usize = 4 * TOKENS;

/// Computes panel `p`'s outputs for every token: `out[token * LANES + lane]`. `scratch` is the
/// caller's buffer for the panel's unpacked codes.
pub(super) fn panel(
    kernel: Kernel,
    ty: BlockType,
    w: &RowPanels,
    p: usize,
    acts: &Activations,
    out: &mut [f32],
    scratch: &mut Vec<u8>,
) {
    let l = Layout::new(ty, acts.cols);
    let held = w.panel_codes(p, acts.cols / 4);
    let codes = match kernel == Kernel::Vnni && w.nibbles && acts.t >= UNPACK_TOKENS {
        true => {
            scratch.clear();
            // Each 64 bytes hold two steps: the even one in the low halves.
            for pair in held.chunks(LANES * 4) {
                scratch.extend(pair.iter().map(|&c| c & 15));
                scratch.extend(pair.iter().map(|&c| c >> 4));
            }
            Codes {
                bytes: scratch,
                nibbles: false,
            }
        }
        false => Codes {
            bytes: held,
            nibbles: w.nibbles,
        },
    };
    // Types without per-sub-block minima keep fewer sums per token in registers: twice the
    // tokens per tile.
    let tile = match l.mins {
        Mins::PerSub => TOKENS,
        _ => 2 * TOKENS,
    };
    for first in (0..acts.t).step_by(tile) {
        let tokens = (acts.t - first).min(tile);
        let out = &mut out[first * LANES..(first + tokens) * LANES];
        match kernel {
            Kernel::Portable => portable(&l, w, p, acts, first, out),
            // SAFETY (all four): `current`/`available` only choose Vnni where the CPU has
            // AVX-512 VNNI.
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni => match tokens {
                8 => unsafe { vnni::tile::<8>(&l, w, codes, p, acts, first, out) },
                7 => unsafe { vnni::tile::<7>(&l, w, codes, p, acts, first, out) },
                6 => unsafe { vnni::tile::<6>(&l, w, codes, p, acts, first, out) },
                5 => unsafe { vnni::tile::<5>(&l, w, codes, p, acts, first, out) },
                4 => unsafe { vnni::tile::<4>(&l, w, codes, p, acts, first, out) },
                3 => unsafe { vnni::tile::<3>(&l, w, codes, p, acts, first, out) },
                2 => unsafe { vnni::tile::<2>(&l, w, codes, p, acts, first, out) },
                _ => unsafe { vnni::tile::<1>(&l, w, codes, p, acts, first, out) },
            },
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Vnni => unreachable!("VNNI is only chosen on x86-64"),
        }
    }
}

/// One panel's codes as the VNNI kernel reads them: a step's 64 bytes each, or (`nibbles`) two
/// steps to 64 bytes.
#[derive(Clone, Copy)]
struct Codes<'a> {
    bytes: &'a [u8],
    nibbles: bool,
}

/// The definition, one output at a time: per block, the integer sum of each sub-block's code
/// products (less the offset's share), times its integer scale; then one fused multiply-add by
/// the two blocks' scales, and one for the minimum's term.
fn portable(
    l: &Layout,
    w: &RowPanels,
    p: usize,
    acts: &Activations,
    first: usize,
    out: &mut [f32],
) {
    let (cols, subs) = (acts.cols, l.blocks * l.per);
    let steps = cols / 4;
    let sixteens = cols / 16;
    let act_blocks = acts.d.len() / acts.t.max(1);
    for (i, out) in out.chunks_mut(LANES).enumerate() {
        let tok = first + i;
        let codes = &acts.codes[tok * cols..(tok + 1) * cols];
        for (lane, f) in out.iter_mut().enumerate() {
            let mut acc = 0f32;
            for b in 0..l.blocks {
                let (mut iacc, mut mint) = (0i32, 0i32);
                for j in b * l.per..(b + 1) * l.per {
                    let mut isum = 0i32;
                    for (k, &a) in codes.iter().enumerate().skip(j * l.g).take(l.g) {
                        isum += w.code(p, steps, k, lane) as i32 * a as i32;
                    }
                    let qsum: i32 = (0..l.g / 16)
                        .map(|s| acts.sums[tok * sixteens + j * l.g / 16 + s])
                        .sum();
                    let at = (p * subs + j) * LANES + lane;
                    iacc += w.scales[at] as i32 * (isum - l.offset * qsum);
                    mint += w.mins[at] as i32 * qsum;
                }
                let (at, a) = ((p * l.blocks + b) * LANES + lane, tok * act_blocks + b);
                let da = acts.d[a];
                let (d, dmin) = (w.d[at].to_f32(), w.dmin[at].to_f32());
                acc = (d * da).mul_add(iacc as f32, acc);
                match l.mins {
                    Mins::None => {}
                    Mins::PerSub => acc = (-(dmin * da)).mul_add(mint as f32, acc),
                    Mins::PerBlock => acc = dmin.mul_add(acts.s[a], acc),
                }
            }
            *f = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{Activations, Codes, Layout, Mins, RowPanels, LANES};
    use std::arch::x86_64::*;

    /// [`super::portable`] for `N` tokens at once, the panel's rows in the lanes: each step loads
    /// 4 codes of every row and multiplies them by each token's 4 codes, broadcast.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub(super) fn tile<const N: usize>(
        l: &Layout,
        w: &RowPanels,
        codes: Codes,
        p: usize,
        acts: &Activations,
        first: usize,
        out: &mut [f32],
    ) {
        debug_assert_eq!(out.len(), N * LANES);
        let (cols, subs) = (acts.cols, l.blocks * l.per);
        let act_blocks = acts.d.len() / acts.t.max(1);
        let zero = _mm512_setzero_si512();
        let load_i = |v: &[i8], at: usize| {
            // SAFETY: every caller's `at` leaves LANES values in `v`.
            unsafe { _mm512_cvtepi8_epi32(_mm_loadu_si128(v.as_ptr().add(at).cast())) }
        };
        let low = _mm512_set1_epi8(15);
        let load_f = |v: &[half::f16], at: usize| {
            // SAFETY: as for `load_i`.
            unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(v.as_ptr().add(at).cast())) }
        };
        let mut acc = [_mm512_setzero_ps(); N];
        for b in 0..l.blocks {
            let mut iacc = [zero; N];
            let mut mint = [zero; N];
            for j in b * l.per..(b + 1) * l.per {
                // Each sum starts from -offset · Σ(the token's codes): the offset comes out as
                // the products go in.
                let mut isum: [__m512i; N] =
                    std::array::from_fn(|t| _mm512_set1_epi32(acts.start[(first + t) * subs + j]));
                for step in j * l.g / 4..(j + 1) * l.g / 4 {
                    let step_at = |step: usize| {
                        debug_assert!((step + 1) * LANES * 4 <= codes.bytes.len());
                        // SAFETY: the panel holds `steps` steps of LANES × 4 codes (two steps to
                        // 64 bytes with nibbles).
                        unsafe {
                            _mm512_loadu_si512(codes.bytes.as_ptr().add(step * LANES * 4).cast())
                        }
                    };
                    let codes = match (codes.nibbles, step % 2) {
                        (false, _) => step_at(step),
                        (true, 0) => _mm512_and_si512(step_at(step / 2), low),
                        (true, _) => {
                            _mm512_and_si512(_mm512_srli_epi32::<4>(step_at(step / 2)), low)
                        }
                    };
                    for (t, isum) in isum.iter_mut().enumerate() {
                        let at = (first + t) * cols + step * 4;
                        debug_assert!(at + 4 <= acts.codes.len());
                        // SAFETY: token first + t < acts.t holds `cols` codes.
                        let a =
                            unsafe { acts.codes.as_ptr().add(at).cast::<i32>().read_unaligned() };
                        *isum = _mm512_dpbusd_epi32(*isum, codes, _mm512_set1_epi32(a));
                    }
                }
                let at = (p * subs + j) * LANES;
                for t in 0..N {
                    iacc[t] = match (l.scaled, l.per) {
                        (true, _) => _mm512_add_epi32(
                            iacc[t],
                            _mm512_mullo_epi32(load_i(&w.scales, at), isum[t]),
                        ),
                        (false, 1) => isum[t],
                        (false, _) => _mm512_add_epi32(iacc[t], isum[t]),
                    };
                    if l.mins == Mins::PerSub {
                        let qsum = _mm512_set1_epi32(acts.qsum[(first + t) * subs + j]);
                        let m = _mm512_mullo_epi32(load_i(&w.mins, at), qsum);
                        mint[t] = _mm512_add_epi32(mint[t], m);
                    }
                }
            }
            let at = (p * l.blocks + b) * LANES;
            let d = load_f(&w.d, at);
            let dmin = match l.mins {
                Mins::None => _mm512_setzero_ps(),
                _ => load_f(&w.dmin, at),
            };
            for t in 0..N {
                let a = (first + t) * act_blocks + b;
                let da = _mm512_set1_ps(acts.d[a]);
                let dd = _mm512_mul_ps(d, da);
                acc[t] = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(iacc[t]), acc[t]);
                match l.mins {
                    Mins::None => {}
                    Mins::PerSub => {
                        let dm = _mm512_mul_ps(dmin, da);
                        acc[t] = _mm512_fnmadd_ps(dm, _mm512_cvtepi32_ps(mint[t]), acc[t]);
                    }
                    Mins::PerBlock => {
                        acc[t] = _mm512_fmadd_ps(dmin, _mm512_set1_ps(acts.s[a]), acc[t]);
                    }
                }
            }
        }
        for (t, out) in out.chunks_mut(LANES).enumerate() {
            // SAFETY: each chunk of `out` holds LANES floats.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), acc[t]) };
        }
    }
}

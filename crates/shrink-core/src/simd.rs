//! Kernels compiled for the widest SIMD the CPU has, chosen at run time.

/// Defines `fn $name` calling `$imp` compiled for the widest SIMD this CPU has (AVX-512F, AVX2,
/// or the build's baseline), so the default build needs no `target-cpu` flag. `$imp` must be
/// `#[inline(always)]` and use only lane-wise multiplies and adds (never a fused multiply-add, which
/// Rust never forms on its own), so its bits do not depend on the width chosen.
///
/// ```
/// #[inline(always)]
/// fn dot_impl(a: &[f64], b: &[f64]) -> f64 {
///     a.iter().zip(b).map(|(x, y)| x * y).sum()
/// }
/// shrink_core::multiversion! {
///     /// `a · b`, terms summed in order.
///     fn dot(a: &[f64], b: &[f64]) -> f64 => dot_impl
/// }
/// assert_eq!(dot(&[1.0, 2.0], &[3.0, 4.0]), 11.0);
/// ```
#[macro_export]
macro_rules! multiversion {
    ($(#[$m:meta])* $v:vis fn $name:ident($($a:ident: $t:ty),*) => $imp:ident) => {
        $crate::multiversion! { $(#[$m])* $v fn $name($($a: $t),*) -> () => $imp }
    };
    ($(#[$m:meta])* $v:vis fn $name:ident($($a:ident: $t:ty),*) -> $r:ty => $imp:ident) => {
        $(#[$m])*
        #[allow(clippy::unused_unit)]
        $v fn $name($($a: $t),*) -> $r {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                #[allow(clippy::unused_unit)]
                fn avx512($($a: $t),*) -> $r {
                    $imp($($a),*)
                }
                #[target_feature(enable = "avx2")]
                #[allow(clippy::unused_unit)]
                fn avx2($($a: $t),*) -> $r {
                    $imp($($a),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F.
                    return unsafe { avx512($($a),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2.
                    return unsafe { avx2($($a),*) };
                }
            }
            $imp($($a),*)
        }
    };
}

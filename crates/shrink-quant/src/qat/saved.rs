//! The block types QAT trains on their saved grid with learned block scales ([`super::KGrid`]):
//! the k-quants and IQ4_XS, each a super-block of 256 weights with an fp16 scale `d` and an
//! integer scale per group (and, in Q2_K, Q4_K and Q5_K, `dmin` and an integer minimum).

use crate::iquant::{iq4xs_scales, write_indices, write_iq4xs_scales};
use crate::kquant::{KQuant, KScales, QK_K};
use half::f16;
use shrink_core::iquant::IQuant;
use shrink_io::ggml::GgmlType;

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Saved {
    /// `value = d·sc·(q − offset) − dmin·mn`.
    K(KQuant),
    /// `value = d·ls·KVALUES_IQ4NL[q]`, `ls` a signed 6-bit scale per 32 weights.
    IQ4XS,
}

impl Saved {
    pub fn of(dtype: GgmlType) -> Option<Saved> {
        match dtype.iquant() {
            Some(IQuant::IQ4XS) => Some(Saved::IQ4XS),
            Some(_) => None,
            None => KQuant::from_ggml(dtype).map(Saved::K),
        }
    }

    pub fn ggml(self) -> GgmlType {
        match self {
            Saved::K(k) => k.ggml(),
            Saved::IQ4XS => GgmlType::IQ4XS,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Saved::K(k) => k.name(),
            Saved::IQ4XS => IQuant::IQ4XS.name(),
        }
    }

    pub fn block_bytes(self) -> usize {
        self.ggml().type_size()
    }

    /// Weights per integer scale.
    pub fn group(self) -> usize {
        match self {
            Saved::K(k) => k.group(),
            Saved::IQ4XS => 32,
        }
    }

    /// Integer scales per block.
    pub fn groups(self) -> usize {
        QK_K / self.group()
    }

    /// The range of the integer group scales.
    pub fn scale_range(self) -> (i32, i32) {
        match self {
            Saved::K(k) => k.scale_range(),
            Saved::IQ4XS => (-32, 31),
        }
    }

    /// The largest integer minimum, for the types with minima.
    pub fn min_max(self) -> Option<i32> {
        match self {
            Saved::K(k) => k.min_max(),
            Saved::IQ4XS => None,
        }
    }

    /// The codes' values relative to the group's zero: their range, and whether they are
    /// IQ4_NL's levels over 128 ([`super::nearest_level`]) rather than the range's integers.
    pub fn codes(self) -> (f32, f32, bool) {
        match self {
            Saved::K(k) => (
                -k.offset(),
                ((1u32 << k.bits()) - 1) as f32 - k.offset(),
                false,
            ),
            Saved::IQ4XS => (super::LEVELS_SPAN.0, super::LEVELS_SPAN.1, true),
        }
    }

    /// The stored code of a value of [`codes`](Self::codes).
    pub fn stored(self, value: f32) -> u8 {
        match self {
            Saved::K(k) => (value + k.offset()) as u8,
            Saved::IQ4XS => super::nearest_level(value).0,
        }
    }

    /// What QAT holds the super-block scale `d` times: 128 for IQ4_XS, whose codes it holds as
    /// the levels over 128 ([`super::nearest_level`]).
    pub fn held(self) -> f32 {
        match self {
            Saved::K(_) => 1.0,
            Saved::IQ4XS => super::LEVELS_HELD,
        }
    }

    /// One block's scales as stored.
    pub fn scales(self, b: &[u8]) -> KScales {
        match self {
            Saved::K(k) => k.scales(b),
            Saved::IQ4XS => {
                let (d, ls) = iq4xs_scales(b);
                KScales {
                    d,
                    dmin: f16::ZERO,
                    sc: ls.to_vec(),
                    mn: vec![0; ls.len()],
                }
            }
        }
    }

    /// Writes one block: its scales and its stored codes.
    pub fn write(self, b: &mut [u8], s: &KScales, codes: &[u8]) {
        match self {
            Saved::K(k) => {
                k.write_codes(b, codes);
                k.write_scales(b, s);
            }
            Saved::IQ4XS => {
                let ls: [i32; 8] = s.sc.as_slice().try_into().expect("8 sub-block scales");
                write_iq4xs_scales(b, s.d, &ls);
                write_indices(IQuant::IQ4XS, b, codes);
            }
        }
    }
}

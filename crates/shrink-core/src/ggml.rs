//! ggml's tensor types as GGUF files name them (ggml.h `enum ggml_type`): the float types, the
//! legacy and k-quant blocks candle also knows, and the i-quants ([`crate::iquant`]) it does not.
//! shrink reads and writes GGUF tensors through this one type; candle's `GgmlDType` is used only
//! where a candle kernel does the work.
//!
//! ```
//! use shrink_core::ggml::GgmlType;
//! let t = GgmlType::from_id(23).unwrap();
//! assert_eq!(t, GgmlType::IQ4XS);
//! assert_eq!((t.block_size(), t.type_size()), (256, 136));
//! assert_eq!(t.row_bytes(512), Some(272));
//! assert_eq!(t.row_bytes(576), None); // not whole super-blocks
//! ```

use crate::iquant::IQuant;

/// A ggml tensor type that shrink reads and writes.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    IQ4NL,
    IQ4XS,
    IQ3XXS,
    IQ3S,
    IQ2XXS,
    IQ2XS,
    IQ2S,
}

/// (type, ggml's id, weights per block, bytes per block).
const TYPES: [(GgmlType, u32, usize, usize); 22] = [
    (GgmlType::F32, 0, 1, 4),
    (GgmlType::F16, 1, 1, 2),
    (GgmlType::BF16, 30, 1, 2),
    (GgmlType::Q4_0, 2, 32, 18),
    (GgmlType::Q4_1, 3, 32, 20),
    (GgmlType::Q5_0, 6, 32, 22),
    (GgmlType::Q5_1, 7, 32, 24),
    (GgmlType::Q8_0, 8, 32, 34),
    (GgmlType::Q8_1, 9, 32, 36),
    (GgmlType::Q2K, 10, 256, 84),
    (GgmlType::Q3K, 11, 256, 110),
    (GgmlType::Q4K, 12, 256, 144),
    (GgmlType::Q5K, 13, 256, 176),
    (GgmlType::Q6K, 14, 256, 210),
    (GgmlType::Q8K, 15, 256, 292),
    (GgmlType::IQ4NL, 20, 32, 18),
    (GgmlType::IQ4XS, 23, 256, 136),
    (GgmlType::IQ3XXS, 18, 256, 98),
    (GgmlType::IQ3S, 21, 256, 110),
    (GgmlType::IQ2XXS, 16, 256, 66),
    (GgmlType::IQ2XS, 17, 256, 74),
    (GgmlType::IQ2S, 22, 256, 82),
];

impl GgmlType {
    /// Every type, in ggml's id order within each family.
    pub fn all() -> impl Iterator<Item = GgmlType> {
        TYPES.iter().map(|t| t.0)
    }

    fn entry(self) -> &'static (GgmlType, u32, usize, usize) {
        // Every variant has its row in TYPES (checked by a test).
        TYPES.iter().find(|t| t.0 == self).unwrap_or(&TYPES[0])
    }

    /// ggml's type id.
    pub fn id(self) -> u32 {
        self.entry().1
    }

    /// The type of ggml's type id, if shrink knows it.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TYPES.iter().find(|t| t.1 == id).map(|t| t.0)
    }

    /// Weights per block (1 for the float types).
    pub fn block_size(self) -> usize {
        self.entry().2
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        self.entry().3
    }

    /// Bytes of `n` weights, if they are whole blocks.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        n.is_multiple_of(self.block_size())
            .then(|| n / self.block_size() * self.type_size())
    }

    /// Whether values are stored as they are (F32, F16, BF16) rather than in blocks.
    pub fn is_float(self) -> bool {
        self.block_size() == 1
    }

    /// The i-quant of an i-quant type.
    pub fn iquant(self) -> Option<IQuant> {
        match self {
            GgmlType::IQ4NL => Some(IQuant::IQ4NL),
            GgmlType::IQ4XS => Some(IQuant::IQ4XS),
            GgmlType::IQ3XXS => Some(IQuant::IQ3XXS),
            GgmlType::IQ3S => Some(IQuant::IQ3S),
            GgmlType::IQ2XXS => Some(IQuant::IQ2XXS),
            GgmlType::IQ2XS => Some(IQuant::IQ2XS),
            GgmlType::IQ2S => Some(IQuant::IQ2S),
            _ => None,
        }
    }

    /// The type of an i-quant.
    pub fn of_iquant(q: IQuant) -> GgmlType {
        match q {
            IQuant::IQ4NL => GgmlType::IQ4NL,
            IQuant::IQ4XS => GgmlType::IQ4XS,
            IQuant::IQ3XXS => GgmlType::IQ3XXS,
            IQuant::IQ3S => GgmlType::IQ3S,
            IQuant::IQ2XXS => GgmlType::IQ2XXS,
            IQuant::IQ2XS => GgmlType::IQ2XS,
            IQuant::IQ2S => GgmlType::IQ2S,
        }
    }

    /// llama.cpp's `llama_ftype` of a file whose weight matrices are mostly of this type
    /// (llama.h `LLAMA_FTYPE_MOSTLY_*`), for `general.file_type`.
    pub fn file_type(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 7,
            GgmlType::Q5_0 => 8,
            GgmlType::Q5_1 => 9,
            GgmlType::Q2K => 10,
            GgmlType::Q3K => 12,
            GgmlType::Q4K => 15,
            GgmlType::Q5K => 17,
            GgmlType::Q6K => 18,
            GgmlType::IQ4NL => 25,
            GgmlType::IQ4XS => 30,
            GgmlType::IQ3XXS => 23,
            GgmlType::IQ3S => 26,
            GgmlType::IQ2XXS => 19,
            GgmlType::IQ2XS => 20,
            GgmlType::IQ2S => 28,
            GgmlType::BF16 => 32,
            // No file is "mostly" these: the activation-side types.
            GgmlType::Q8_1 | GgmlType::Q8K => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_has_one_row_and_ids_round_trip() {
        let all: Vec<_> = GgmlType::all().collect();
        assert_eq!(all.len(), TYPES.len());
        for t in all {
            assert_eq!(TYPES.iter().filter(|e| e.0 == t).count(), 1);
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
            if let Some(q) = t.iquant() {
                assert_eq!(GgmlType::of_iquant(q), t);
                assert_eq!((q.ggml_id(), q.block_size()), (t.id(), t.block_size()));
                assert_eq!(q.type_size(), t.type_size());
            }
        }
        assert_eq!(GgmlType::from_id(19), None); // IQ1_S: not yet
    }
}

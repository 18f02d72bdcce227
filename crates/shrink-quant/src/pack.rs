//! Codes packed at their real bit width: `bits` ∈ 1..=8, little-endian bit order, a row-major
//! stream with no padding between rows.

/// Packs unsigned codes (each `< 2^bits`) into a byte stream.
pub fn pack(codes: &[u8], bits: u8) -> Vec<u8> {
    assert!((1..=8).contains(&bits), "bits must be 1..=8");
    match bits {
        8 => return codes.to_vec(),
        4 => {
            return codes
                .chunks(2)
                .map(|p| p[0] | p.get(1).map_or(0, |&h| h << 4))
                .collect()
        }
        _ => {}
    }
    let mut out = vec![0u8; (codes.len() * bits as usize).div_ceil(8)];
    let mut bit = 0usize;
    for &c in codes {
        debug_assert!(u16::from(c) < 1u16 << bits);
        let v = u16::from(c) << (bit % 8);
        out[bit / 8] |= v as u8;
        if bit % 8 + bits as usize > 8 {
            out[bit / 8 + 1] |= (v >> 8) as u8;
        }
        bit += bits as usize;
    }
    out
}

/// Unpacks `count` codes of `bits` bits.
pub fn unpack(bytes: &[u8], bits: u8, count: usize) -> Vec<u8> {
    let mut out = vec![0u8; count];
    unpack_into(bytes, bits, &mut out);
    out
}

/// Unpacks the first `out.len()` codes of `bits` bits in `bytes` into `out`.
pub fn unpack_into(bytes: &[u8], bits: u8, out: &mut [u8]) {
    match bits {
        8 => out.copy_from_slice(&bytes[..out.len()]),
        4 => {
            for (pair, &b) in out.chunks_mut(2).zip(bytes) {
                pair[0] = b & 15;
                if let Some(h) = pair.get_mut(1) {
                    *h = b >> 4;
                }
            }
        }
        _ => {
            let mask = (1u16 << bits) - 1;
            for (k, o) in out.iter_mut().enumerate() {
                let bit = k * bits as usize;
                let lo = u16::from(bytes[bit / 8]);
                let hi = bytes.get(bit / 8 + 1).copied().map(u16::from).unwrap_or(0);
                *o = (((lo | hi << 8) >> (bit % 8)) & mask) as u8;
            }
        }
    }
}

#[cfg(test)]
mod tests;

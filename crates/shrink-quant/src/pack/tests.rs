use super::*;
use rand::{Rng, SeedableRng};

#[test]
fn round_trip_every_width_and_length() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    for bits in 1..=8u8 {
        for len in [0, 1, 7, 8, 9, 31, 32, 33, 1000] {
            let codes: Vec<u8> = (0..len)
                .map(|_| rng.gen_range(0..(1u16 << bits)) as u8)
                .collect();
            let packed = pack(&codes, bits);
            assert_eq!(
                packed.len(),
                (len * bits as usize).div_ceil(8),
                "real bit width"
            );
            assert_eq!(unpack(&packed, bits, len), codes, "bits {bits} len {len}");
        }
    }
}

#[test]
fn layout_is_little_endian_bits() {
    assert_eq!(pack(&[1, 2, 3], 4), vec![0x21, 0x03]);
    assert_eq!(pack(&[0b101, 0b011, 0b111], 3), vec![0b11_011_101, 0b1]);
}

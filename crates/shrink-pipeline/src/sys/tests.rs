use super::*;

#[test]
fn dates_match_known_instants() {
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(rfc3339(1_795_624_697), "2026-11-25T16:38:17Z");
}

#[test]
fn peak_memory_is_measured_on_linux() {
    if cfg!(target_os = "linux") {
        let big = std::hint::black_box(vec![1u8; 64 << 20]);
        assert!(peak_rss_bytes() >= 64 << 20);
        drop(big);
    }
}

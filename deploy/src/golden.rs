//! Golden files: `UPDATE_GOLDEN=1` rewrites them; otherwise a difference fails with the
//! diff.

use std::path::Path;
use std::process::Command;

/// Compares `actual` with the golden file at `path` (or writes it under `UPDATE_GOLDEN=1`).
pub fn check(path: &Path, actual: &str) {
    if std::env::var("UPDATE_GOLDEN").as_deref() == Ok("1") {
        std::fs::create_dir_all(path.parent().expect("golden files live in a directory"))
            .expect("create the golden directory");
        std::fs::write(path, actual).expect("write the golden file");
        eprintln!("updated {}", path.display());
        return;
    }
    let expected = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "cannot read golden file {}: {e} (UPDATE_GOLDEN=1 writes it)",
            path.display()
        )
    });
    if expected != actual {
        panic!(
            "{} differs from the output (UPDATE_GOLDEN=1 rewrites it after review):\n{}",
            path.display(),
            diff(path, &expected, actual)
        );
    }
}

/// A unified diff of `expected` (the golden file) and `actual`, from `diff -u` if there is
/// one, else the first differing line.
fn diff(path: &Path, expected: &str, actual: &str) -> String {
    let actual_path = std::env::temp_dir().join(format!(
        "palisade-golden-{}-{}",
        std::process::id(),
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("actual")
    ));
    if std::fs::write(&actual_path, actual).is_ok() {
        let out = Command::new("diff")
            .arg("-u")
            .arg(path)
            .arg(&actual_path)
            .output();
        let _ = std::fs::remove_file(&actual_path);
        if let Ok(out) = out {
            if !out.stdout.is_empty() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
        }
    }
    let line = expected
        .lines()
        .zip(actual.lines())
        .position(|(e, a)| e != a)
        .unwrap_or_else(|| expected.lines().count().min(actual.lines().count()));
    format!(
        "first difference at line {}:\n- {}\n+ {}",
        line + 1,
        expected.lines().nth(line).unwrap_or("<end>"),
        actual.lines().nth(line).unwrap_or("<end>")
    )
}

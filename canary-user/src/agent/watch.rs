//! Notices config changes by polling a fingerprint of the files once a
//! second. Polling (rather than inotify) also sees Kubernetes ConfigMap
//! updates, which swap a symlinked directory instead of writing files.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

/// A hash over the names and contents of every YAML file under `path`.
pub fn fingerprint(path: &Path) -> u64 {
    let mut files = Vec::new();
    if path.is_dir() {
        collect(path, &mut files);
    } else {
        files.push(path.to_path_buf());
    }
    files.sort();
    let mut h = DefaultHasher::new();
    for f in files {
        f.hash(&mut h);
        if let Ok(bytes) = std::fs::read(&f) {
            bytes.hash(&mut h);
        }
    }
    h.finish()
}

/// How long the files must stay unchanged before a reload.
const QUIET: std::time::Duration = std::time::Duration::from_millis(300);
/// A reload happens at the latest this long after the first change, even
/// if something keeps writing.
const SETTLE_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits until the fingerprint has stayed the same for `QUIET` (at most
/// `SETTLE_MAX`), starting from `current`; returns the settled one.
pub async fn settle(path: &Path, mut current: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + SETTLE_MAX;
    loop {
        tokio::time::sleep(QUIET).await;
        let next = fingerprint(path);
        if next == current || tokio::time::Instant::now() >= deadline {
            return next;
        }
        current = next;
    }
}

fn collect(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        if let Ok(entries) = std::fs::read_dir(path) {
            for e in entries.flatten() {
                collect(&e.path(), out);
            }
        }
    } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
        out.push(path.to_path_buf());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_with_content_not_with_time() {
        let dir = std::env::temp_dir().join(format!("canary-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), "x: 1").unwrap();
        let first = fingerprint(&dir);
        assert_eq!(first, fingerprint(&dir));
        std::fs::write(dir.join("a.yaml"), "x: 2").unwrap();
        assert_ne!(first, fingerprint(&dir));
        std::fs::write(dir.join("notes.txt"), "ignored").unwrap();
        let second = fingerprint(&dir);
        std::fs::write(dir.join("notes.txt"), "still ignored").unwrap();
        assert_eq!(second, fingerprint(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

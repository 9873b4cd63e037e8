//! Container log rotation, as the kubelet's `containerLogMaxSize` and
//! `containerLogMaxFiles` do it: when a container's CRI log file reaches
//! the size limit it is renamed `<name>.<UTC timestamp>` and a new file
//! starts; of the rotated files only the newest `max_files - 1` are kept.
//! Readers (`kubectl logs`) read the current file; a follower notices the
//! rename (the path holds a new inode) and carries on in the new file.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// When a log file is rotated and how many files a container keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRotation {
    /// Size at which the current file is rotated (upstream: 10Mi).
    pub max_bytes: u64,
    /// Files per container, the current one included (upstream: 5; at
    /// least 2).
    pub max_files: usize,
}

impl Default for LogRotation {
    fn default() -> Self {
        Self {
            max_bytes: 10 * 1024 * 1024,
            max_files: 5,
        }
    }
}

/// The rotated files of `path`, oldest first (their suffix is a UTC
/// timestamp, so name order is time order).
pub fn rotated(path: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Vec::new();
    };
    let prefix = format!("{}.", name.to_string_lossy());
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

/// Renames `path` to its rotated name and removes rotated files beyond
/// `max_files - 1`. The writer then opens `path` afresh.
pub fn rotate(path: &Path, max_files: usize) -> std::io::Result<()> {
    let stamp = chrono::Utc::now().format("%Y%m%d-%H%M%S%.6f");
    let mut target = path.as_os_str().to_owned();
    target.push(format!(".{stamp}"));
    std::fs::rename(path, &target)?;
    let old = rotated(path);
    let keep = max_files.saturating_sub(1).max(1);
    for p in &old[..old.len().saturating_sub(keep)] {
        if let Err(e) = std::fs::remove_file(p) {
            tracing::debug!(file = %p.display(), error = %e, "removing an old rotated log failed");
        }
    }
    Ok(())
}

/// Whether `path` names another file than the open `file` (it was
/// rotated: everything left in `file` is still readable, what follows is
/// in the new file). A path missing for the moment between the rename and
/// the new file counts as not yet rotated.
pub async fn rotated_away(file: &tokio::fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata().await, tokio::fs::metadata(path).await) {
        (Ok(open), Ok(now)) => open.ino() != now.ino() || open.dev() != now.dev(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rotation_keeps_the_newest_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        for i in 0..6 {
            std::fs::write(&path, format!("file {i}\n")).unwrap();
            rotate(&path, 3).unwrap();
            assert!(!path.exists());
        }
        let kept = rotated(&path);
        assert_eq!(kept.len(), 2, "{kept:?}");
        assert_eq!(std::fs::read_to_string(&kept[0]).unwrap(), "file 4\n");
        assert_eq!(std::fs::read_to_string(&kept[1]).unwrap(), "file 5\n");
        // Another container's files in the same directory are not touched.
        std::fs::write(dir.path().join("1.log.20260101-000000.000000"), "x").unwrap();
        assert_eq!(rotated(&path).len(), 2);
    }
}

//! Copies a container's output from docker into the CRI log file the pod
//! manager reads (`<RFC3339Nano> <stdout|stderr> <F|P> <text>` per line).
//!
//! Docker keeps its own log (json-file); a follower streams it with
//! docker's timestamps and appends CRI records. A follower restarted after
//! an agent restart resumes after the last record already in the file, so
//! nothing is written twice.

use std::{
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
};

use bollard::{Docker, container::LogOutput, query_parameters::LogsOptionsBuilder};
use chrono::{DateTime, SecondsFormat, Utc};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::runtime::logrotate::{self, LogRotation};

/// How much of the file's end is read to find its last record.
const TAIL: u64 = 64 * 1024;

/// Starts following container `id` into `path`; the task ends with the
/// container's output (it exits, or is removed).
pub(crate) fn spawn(
    docker: Docker,
    id: String,
    path: PathBuf,
    rotation: LogRotation,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = follow(&docker, &id, &path, rotation).await {
            tracing::debug!(container = %id, log = %path.display(), error = %e, "log follower stopped");
        }
    })
}

async fn open_append(path: &Path) -> Result<tokio::fs::File, String> {
    tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
        .map_err(|e| format!("opening {}: {e}", path.display()))
}

async fn follow(
    docker: &Docker,
    id: &str,
    path: &Path,
    rotation: LogRotation,
) -> Result<(), String> {
    let last = {
        let p = path.to_owned();
        tokio::task::spawn_blocking(move || last_timestamp(&p))
            .await
            .map_err(|e| e.to_string())?
    };
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let mut file = open_append(path).await?;
    let mut size = file
        .metadata()
        .await
        .map_err(|e| format!("reading {}: {e}", path.display()))?
        .len();
    // Docker's `since` has whole seconds; records of that second already
    // written are skipped by timestamp below.
    let since = last
        .map(|t| i32::try_from(t.timestamp()).unwrap_or(0))
        .unwrap_or(0);
    let opts = LogsOptionsBuilder::new()
        .follow(true)
        .stdout(true)
        .stderr(true)
        .timestamps(true)
        .since(since)
        .build();
    let mut stream = docker.logs(id, Some(opts));
    while let Some(item) = stream.next().await {
        let (name, tty, message) = match item.map_err(|e| e.to_string())? {
            LogOutput::StdOut { message } => ("stdout", false, message),
            LogOutput::Console { message } => ("stdout", true, message),
            LogOutput::StdErr { message } => ("stderr", false, message),
            LogOutput::StdIn { .. } => continue,
        };
        let Some(record) = cri_record(&message, name, tty, last) else {
            continue;
        };
        // One write per record: readers following the file see whole lines.
        file.write_all(&record)
            .await
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        size += record.len() as u64;
        if size >= rotation.max_bytes {
            let p = path.to_owned();
            tokio::task::spawn_blocking(move || logrotate::rotate(&p, rotation.max_files))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("rotating {}: {e}", path.display()))?;
            file = open_append(path).await?;
            size = 0;
        }
    }
    Ok(())
}

/// Turns one docker log message (`<timestamp> <text>`, a whole line ending
/// in `\n` or a partial one) into a CRI record; None for what was already
/// written (at or before `after`) or what is not a timestamped message.
fn cri_record(
    message: &[u8],
    stream: &str,
    tty: bool,
    after: Option<DateTime<Utc>>,
) -> Option<Vec<u8>> {
    let sp = message.iter().position(|&b| b == b' ')?;
    let ts = std::str::from_utf8(&message[..sp]).ok()?;
    let ts = DateTime::parse_from_rfc3339(ts).ok()?.with_timezone(&Utc);
    if after.is_some_and(|a| ts <= a) {
        return None;
    }
    let text = &message[sp + 1..];
    let (mut text, partial) = match text.strip_suffix(b"\n") {
        Some(t) => (t, false),
        None => (text, true),
    };
    // A terminal ends lines with \r\n.
    if tty && !partial {
        text = text.strip_suffix(b"\r").unwrap_or(text);
    }
    let mut rec = Vec::with_capacity(text.len() + 48);
    rec.extend_from_slice(ts.to_rfc3339_opts(SecondsFormat::Nanos, true).as_bytes());
    rec.push(b' ');
    rec.extend_from_slice(stream.as_bytes());
    rec.extend_from_slice(if partial { b" P " } else { b" F " });
    rec.extend_from_slice(text);
    rec.push(b'\n');
    Some(rec)
}

/// The timestamp of the last record in a CRI log file, if any.
/// The time of the last record written: in the current file, or (just
/// after a rotation, when it is empty) in the newest rotated one.
fn last_timestamp(path: &Path) -> Option<DateTime<Utc>> {
    last_timestamp_in(path).or_else(|| {
        logrotate::rotated(path)
            .last()
            .and_then(|p| last_timestamp_in(p))
    })
}

fn last_timestamp_in(path: &Path) -> Option<DateTime<Utc>> {
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(TAIL))).ok()?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).ok()?;
    buf.split(|&b| b == b'\n').rev().find_map(|line| {
        let sp = line.iter().position(|&b| b == b' ')?;
        let ts = std::str::from_utf8(&line[..sp]).ok()?;
        Some(DateTime::parse_from_rfc3339(ts).ok()?.with_timezone(&Utc))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn records() {
        let r = cri_record(b"2026-01-01T00:00:00.5Z hello\n", "stdout", false, None).unwrap();
        assert_eq!(r, b"2026-01-01T00:00:00.500000000Z stdout F hello\n");
        let r = cri_record(b"2026-01-01T00:00:01Z par", "stderr", false, None).unwrap();
        assert_eq!(r, b"2026-01-01T00:00:01.000000000Z stderr P par\n");
        let r = cri_record(b"2026-01-01T00:00:01Z t\r\n", "stdout", true, None).unwrap();
        assert_eq!(r, b"2026-01-01T00:00:01.000000000Z stdout F t\n");
        let after = DateTime::parse_from_rfc3339("2026-01-01T00:00:01Z")
            .unwrap()
            .with_timezone(&Utc);
        assert!(cri_record(b"2026-01-01T00:00:01Z old\n", "stdout", false, Some(after)).is_none());
    }
}

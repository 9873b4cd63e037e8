//! The CRI container log format: one record per line of output,
//! `<RFC3339Nano UTC> <stdout|stderr> <F|P> <text>\n`; lines longer than
//! 16 KiB are split into `P` (partial) records ending with an `F` one.

use crate::runtime::logrotate::{self, LogRotation};
use std::{
    fs::File,
    io::Write,
    path::{Path, PathBuf},
};

/// Longest text in one record.
const MAX_RECORD: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }
}

/// Turns the container's output into log records.
#[derive(Debug)]
pub(crate) struct LogWriter {
    file: File,
    path: PathBuf,
    /// Bytes in the current file.
    size: u64,
    rotation: LogRotation,
    /// The unfinished line of each stream.
    pending: [Vec<u8>; 2],
}

fn open_append(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

impl LogWriter {
    pub(crate) fn open(path: &Path, rotation: LogRotation) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            file,
            path: path.to_owned(),
            size,
            rotation,
            pending: [Vec::new(), Vec::new()],
        })
    }

    fn record(&mut self, stream: Stream, partial: bool, text: &[u8]) -> std::io::Result<()> {
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
        let mut line = Vec::with_capacity(text.len() + 48);
        line.extend_from_slice(now.as_bytes());
        line.push(b' ');
        line.extend_from_slice(stream.name().as_bytes());
        line.extend_from_slice(if partial { b" P " } else { b" F " });
        line.extend_from_slice(text);
        line.push(b'\n');
        // One write per record so readers following the file see whole
        // lines (O_APPEND); records never straddle two files.
        self.file.write_all(&line)?;
        self.size += line.len() as u64;
        if self.size >= self.rotation.max_bytes {
            logrotate::rotate(&self.path, self.rotation.max_files)?;
            self.file = open_append(&self.path)?;
            self.size = 0;
        }
        Ok(())
    }

    /// Adds output of `stream`, writing every completed line.
    pub(crate) fn write(&mut self, stream: Stream, mut data: &[u8]) -> std::io::Result<()> {
        let idx = stream as usize;
        while !data.is_empty() {
            match data.iter().position(|&b| b == b'\n') {
                Some(pos) => {
                    let mut line = std::mem::take(&mut self.pending[idx]);
                    line.extend_from_slice(&data[..pos]);
                    self.emit(stream, &line, true)?;
                    data = &data[pos + 1..];
                }
                None => {
                    self.pending[idx].extend_from_slice(data);
                    data = &[];
                }
            }
        }
        // A long unfinished line goes out in partial records now.
        if self.pending[idx].len() >= MAX_RECORD {
            let pending = std::mem::take(&mut self.pending[idx]);
            let full = pending.len() / MAX_RECORD * MAX_RECORD;
            for chunk in pending[..full].chunks(MAX_RECORD) {
                self.record(stream, true, chunk)?;
            }
            self.pending[idx] = pending[full..].to_vec();
        }
        Ok(())
    }

    /// Writes a line: its last chunk is `F` when `complete`.
    fn emit(&mut self, stream: Stream, line: &[u8], complete: bool) -> std::io::Result<()> {
        let mut chunks = line.chunks(MAX_RECORD).peekable();
        if chunks.peek().is_none() {
            return self.record(stream, !complete, b"");
        }
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            self.record(stream, !(last && complete), chunk)?;
        }
        Ok(())
    }

    /// At the end of the output: an unfinished last line is written as a
    /// complete record.
    pub(crate) fn finish(&mut self) -> std::io::Result<()> {
        for stream in [Stream::Stdout, Stream::Stderr] {
            let line = std::mem::take(&mut self.pending[stream as usize]);
            if !line.is_empty() {
                self.emit(stream, &line, true)?;
            }
        }
        self.file.flush()
    }
}

/// One parsed record: `(stream, partial, text)`.
pub(crate) fn parse_record(line: &[u8]) -> Option<(Stream, bool, &[u8])> {
    let mut parts = line.splitn(4, |&b| b == b' ');
    let _time = parts.next()?;
    let stream = match parts.next()? {
        b"stdout" => Stream::Stdout,
        b"stderr" => Stream::Stderr,
        _ => return None,
    };
    let partial = parts.next()? == b"P";
    let text = parts.next().unwrap_or(b"");
    Some((stream, partial, text.strip_suffix(b"\n").unwrap_or(text)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn lines_and_partials() {
        let dir = std::env::temp_dir().join(format!("skep-logfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.log");
        let mut w = LogWriter::open(&path, LogRotation::default()).unwrap();
        w.write(Stream::Stdout, b"he").unwrap();
        w.write(Stream::Stderr, b"err\n").unwrap();
        w.write(Stream::Stdout, b"llo\nx").unwrap();
        w.write(Stream::Stdout, &vec![b'a'; MAX_RECORD + 10])
            .unwrap();
        w.write(Stream::Stdout, b"\n").unwrap();
        w.write(Stream::Stdout, b"tail").unwrap();
        w.finish().unwrap();
        let text = std::fs::read(&path).unwrap();
        let recs: Vec<_> = text
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (s, p, t) = parse_record(l).unwrap();
                (s, p, t.len())
            })
            .collect();
        assert_eq!(
            recs,
            vec![
                (Stream::Stderr, false, 3),
                (Stream::Stdout, false, 5),
                (Stream::Stdout, true, MAX_RECORD),
                (Stream::Stdout, false, 11),
                (Stream::Stdout, false, 4),
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rotates_at_the_size_limit_and_keeps_whole_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let rotation = LogRotation {
            max_bytes: 1000,
            max_files: 3,
        };
        let mut w = LogWriter::open(&path, rotation).unwrap();
        for i in 0..100 {
            w.write(Stream::Stdout, format!("line {i:03}\n").as_bytes())
                .unwrap();
        }
        w.finish().unwrap();
        let old = logrotate::rotated(&path);
        assert_eq!(
            old.len(),
            2,
            "max_files 3: the current file and two rotated"
        );
        let mut lines = Vec::new();
        for f in old.iter().chain([&path]) {
            let text = std::fs::read(f).unwrap();
            assert!(
                text.len() < 1000 + 64,
                "{} is {} bytes",
                f.display(),
                text.len()
            );
            for l in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let (_, partial, t) = parse_record(l).unwrap();
                assert!(!partial);
                lines.push(String::from_utf8(t.to_vec()).unwrap());
            }
        }
        // The newest records, in order, none cut: what older files held
        // was dropped whole.
        let first: usize = lines[0][5..].parse().unwrap();
        let want: Vec<String> = (first..100).map(|i| format!("line {i:03}")).collect();
        assert_eq!(lines, want);
        assert!(first > 0, "something was rotated away");
    }
}

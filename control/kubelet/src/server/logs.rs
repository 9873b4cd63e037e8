//! `GET /containerLogs/{ns}/{pod}/{container}`: the container's CRI log
//! file turned back into the text the container wrote.
//!
//! CRI log lines are `<RFC3339Nano> <stdout|stderr> <F|P> <text>`; `P`
//! marks a partial line continued by the next entry. Options as the
//! kubelet's: `tailLines`, `sinceSeconds`/`sinceTime`, `timestamps`,
//! `limitBytes`, `follow` (keep reading appended data until the instance
//! stops, then drain and end) and `previous`.

use super::{Body, query_flag, query_pairs, query_value, stream_error, text};
use crate::streams::{ContainerRef, PodStreams};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use std::{path::PathBuf, sync::Arc, time::Duration};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// How often `follow` looks for appended data.
const FOLLOW_POLL: Duration = Duration::from_millis(100);

/// One logical line: the joined text of its entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// The timestamp of its first entry, as written.
    pub timestamp: String,
    pub time: Option<DateTime<Utc>>,
    /// The text, with its newline.
    pub text: Vec<u8>,
}

/// Parses CRI log data as it arrives: keeps an incomplete trailing line
/// and partial (`P`) entries until they are completed.
#[derive(Debug, Default)]
pub struct CriParser {
    rest: Vec<u8>,
    partial: Option<LogLine>,
}

impl CriParser {
    pub fn feed(&mut self, data: &[u8]) -> Vec<LogLine> {
        self.rest.extend_from_slice(data);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(nl) = self.rest[start..].iter().position(|&b| b == b'\n') {
            let line = self.rest[start..start + nl].to_vec();
            start += nl + 1;
            self.entry(&line, &mut out);
        }
        self.rest.drain(..start);
        out
    }

    /// What is left when the writer is gone: a partial line is still text.
    pub fn finish(&mut self) -> Option<LogLine> {
        if !self.rest.is_empty() {
            let rest = std::mem::take(&mut self.rest);
            let mut out = Vec::new();
            self.entry(&rest, &mut out);
            if let Some(line) = out.pop() {
                return Some(line);
            }
        }
        self.partial.take()
    }

    fn entry(&mut self, line: &[u8], out: &mut Vec<LogLine>) {
        let mut fields = line.splitn(4, |&b| b == b' ');
        let (Some(ts), Some(_stream), Some(tag)) = (fields.next(), fields.next(), fields.next())
        else {
            return;
        };
        let content = fields.next().unwrap_or_default();
        let timestamp = String::from_utf8_lossy(ts).into_owned();
        let partial = tag.split(|&b| b == b':').next() == Some(b"P");
        let line = self.partial.get_or_insert_with(|| LogLine {
            time: DateTime::parse_from_rfc3339(&timestamp)
                .ok()
                .map(|t| t.with_timezone(&Utc)),
            timestamp,
            text: Vec::new(),
        });
        line.text.extend_from_slice(content);
        if !partial {
            line.text.push(b'\n');
            if let Some(done) = self.partial.take() {
                out.push(done);
            }
        }
    }
}

/// The query options of a log request.
#[derive(Debug, Clone, Default)]
pub struct LogOptions {
    pub follow: bool,
    pub previous: bool,
    pub timestamps: bool,
    pub tail_lines: Option<usize>,
    pub since: Option<DateTime<Utc>>,
    pub limit_bytes: Option<usize>,
}

impl LogOptions {
    pub fn parse(q: &[(String, String)]) -> Result<Self, String> {
        let number = |name: &str| -> Result<Option<i64>, String> {
            query_value(q, name)
                .map(|v| {
                    v.parse::<i64>()
                        .map_err(|_| format!("{name}={v:?} is not a number"))
                })
                .transpose()
        };
        let since = match (query_value(q, "sinceTime"), number("sinceSeconds")?) {
            (Some(t), _) => Some(
                DateTime::parse_from_rfc3339(t)
                    .map_err(|e| format!("sinceTime={t:?}: {e}"))?
                    .with_timezone(&Utc),
            ),
            (None, Some(s)) if s > 0 => Some(Utc::now() - chrono::Duration::seconds(s)),
            (None, Some(_)) => return Err("sinceSeconds must be greater than 0".into()),
            (None, None) => None,
        };
        let tail_lines = match number("tailLines")? {
            Some(n) if n >= 0 => Some(n as usize),
            // Negative: everything (kubectl sends -1 for "all").
            Some(_) | None => None,
        };
        let limit_bytes = match number("limitBytes")? {
            Some(n) if n > 0 => Some(n as usize),
            Some(_) => return Err("limitBytes must be greater than 0".into()),
            None => None,
        };
        Ok(Self {
            follow: query_flag(q, "follow"),
            previous: query_flag(q, "previous"),
            timestamps: query_flag(q, "timestamps"),
            tail_lines,
            since,
            limit_bytes,
        })
    }

    fn wanted(&self, line: &LogLine) -> bool {
        match (self.since, line.time) {
            (Some(since), Some(t)) => t >= since,
            _ => true,
        }
    }

    fn render(&self, line: &LogLine, out: &mut Vec<u8>) {
        if self.timestamps {
            out.extend_from_slice(line.timestamp.as_bytes());
            out.push(b' ');
        }
        out.extend_from_slice(&line.text);
    }
}

/// Sends rendered output to the response body, honouring `limitBytes`;
/// false once the output is complete (limit reached or client gone).
struct Output {
    tx: tokio::sync::mpsc::Sender<Bytes>,
    left: Option<usize>,
}

impl Output {
    async fn send(&mut self, mut data: Vec<u8>) -> bool {
        if data.is_empty() {
            return true;
        }
        let mut done = false;
        if let Some(left) = &mut self.left {
            if data.len() >= *left {
                data.truncate(*left);
                done = true;
            }
            *left -= data.len();
        }
        if !data.is_empty() && self.tx.send(Bytes::from(data)).await.is_err() {
            return false;
        }
        !done
    }
}

pub(super) async fn handle(
    req: Request<Incoming>,
    c: ContainerRef,
    streams: Arc<dyn PodStreams>,
) -> Response<Body> {
    let q = query_pairs(&req);
    let opts = match LogOptions::parse(&q) {
        Ok(o) => o,
        Err(e) => return text(StatusCode::BAD_REQUEST, e),
    };
    let source = match streams.log_source(&c, opts.previous).await {
        Ok(s) => s,
        Err(e) => return stream_error(&e),
    };
    let file = match tokio::fs::File::open(&source.path).await {
        Ok(f) => Some(f),
        // No output yet: an empty log (the file appears with the first line).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading {}: {e}", source.path.display()),
            );
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    let out = Output {
        tx,
        left: opts.limit_bytes,
    };
    let follow = opts.follow && source.running;
    tokio::spawn(produce(file, source.path, opts, follow, out, streams, c));
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) })
            .map(|b| Ok::<_, std::convert::Infallible>(Frame::data(b)));
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    resp
}

async fn read_more(file: &mut Option<tokio::fs::File>, path: &PathBuf, pos: &mut u64) -> Vec<u8> {
    if file.is_none() {
        *file = tokio::fs::File::open(path).await.ok();
    }
    let Some(f) = file else {
        return Vec::new();
    };
    let mut data = Vec::new();
    if f.seek(std::io::SeekFrom::Start(*pos)).await.is_err() {
        return data;
    }
    match f.read_to_end(&mut data).await {
        Ok(n) => *pos += n as u64,
        Err(e) => tracing::debug!(path = %path.display(), error = %e, "reading a log file failed"),
    }
    // Rotated while we read: the old file is read to its end, the rest is
    // in the new one (records never straddle the two).
    if crate::runtime::logrotate::rotated_away(f, path).await {
        *pos = 0;
        *file = tokio::fs::File::open(path).await.ok();
        if let Some(f) = file {
            match f.read_to_end(&mut data).await {
                Ok(n) => *pos = n as u64,
                Err(e) => {
                    tracing::debug!(path = %path.display(), error = %e, "reading a log file failed")
                }
            }
        }
    }
    data
}

async fn produce(
    mut file: Option<tokio::fs::File>,
    path: PathBuf,
    opts: LogOptions,
    follow: bool,
    mut out: Output,
    streams: Arc<dyn PodStreams>,
    c: ContainerRef,
) {
    let mut parser = CriParser::default();
    let mut pos = 0u64;
    let first = read_more(&mut file, &path, &mut pos).await;
    let mut lines: Vec<LogLine> = parser.feed(&first);
    if !follow && let Some(last) = parser.finish() {
        lines.push(last);
    }
    lines.retain(|l| opts.wanted(l));
    if let Some(n) = opts.tail_lines {
        let skip = lines.len().saturating_sub(n);
        lines.drain(..skip);
    }
    let mut buf = Vec::new();
    for line in &lines {
        opts.render(line, &mut buf);
    }
    if !out.send(buf).await || !follow {
        return;
    }
    loop {
        // Ask before reading, so everything written before the instance
        // stopped is read after it is known to have stopped.
        let running = streams.still_running(&c, &path).await;
        let data = read_more(&mut file, &path, &mut pos).await;
        let mut lines = parser.feed(&data);
        if !running && let Some(last) = parser.finish() {
            lines.push(last);
        }
        let mut buf = Vec::new();
        for line in lines.iter().filter(|l| opts.wanted(l)) {
            opts.render(line, &mut buf);
        }
        if !out.send(buf).await || !running {
            return;
        }
        if out.tx.is_closed() {
            return;
        }
        tokio::time::sleep(FOLLOW_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn partial_entries_are_joined() {
        let mut p = CriParser::default();
        let lines = p.feed(
            b"2024-01-01T00:00:00.1Z stdout P hel\n2024-01-01T00:00:00.2Z stdout F lo\n2024-01-01T00:00:01Z stderr F \n2024-01-01T00:00:02Z stdout F x",
        );
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].text, b"hello\n");
        assert_eq!(lines[0].timestamp, "2024-01-01T00:00:00.1Z");
        assert_eq!(lines[1].text, b"\n");
        let more = p.feed(b"yz\n");
        assert_eq!(more[0].text, b"xyz\n");
        assert!(p.finish().is_none());
    }

    #[test]
    fn options() {
        let q = |s: &str| -> Vec<(String, String)> {
            form_urlencoded::parse(s.as_bytes()).into_owned().collect()
        };
        let o = LogOptions::parse(&q("tailLines=2&timestamps=true&limitBytes=10")).unwrap();
        assert_eq!(o.tail_lines, Some(2));
        assert!(o.timestamps);
        assert_eq!(o.limit_bytes, Some(10));
        assert!(LogOptions::parse(&q("tailLines=x")).is_err());
        let o = LogOptions::parse(&q("sinceTime=2024-01-01T00:00:01Z")).unwrap();
        let line = |t: &str| LogLine {
            timestamp: t.into(),
            time: Some(DateTime::parse_from_rfc3339(t).unwrap().with_timezone(&Utc)),
            text: vec![],
        };
        assert!(!o.wanted(&line("2024-01-01T00:00:00Z")));
        assert!(o.wanted(&line("2024-01-01T00:00:01Z")));
    }
}

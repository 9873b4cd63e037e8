//! Runs an exec/attach session against the client's streams, whatever
//! carries them (SPDY streams or WebSocket channels): stdin and resize
//! events in, stdout/stderr out, and the final status for the error stream.

use crate::runtime::ExecSession;
use bytes::Bytes;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
};

/// The remotecommand channels (also the WebSocket channel numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Chan {
    Stdin = 0,
    Stdout = 1,
    Stderr = 2,
    Error = 3,
    Resize = 4,
}

/// Output for the client.
#[derive(Debug)]
pub enum Output {
    Data(Chan, Bytes),
    /// No more data on this channel.
    End(Chan),
}

/// How the process ended, for the error stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Exited(i32),
    Failed(String),
}

impl Outcome {
    /// The metav1.Status of protocol v4 and later (client-go turns
    /// `NonZeroExitCode` into the exit code kubectl exits with).
    pub fn status_json(&self) -> Vec<u8> {
        let v = match self {
            Self::Exited(0) => json!({"metadata": {}, "status": "Success"}),
            Self::Exited(code) => json!({
                "metadata": {},
                "status": "Failure",
                "message": format!("command terminated with non-zero exit code: exit status {code}"),
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
            }),
            Self::Failed(msg) => json!({
                "metadata": {},
                "status": "Failure",
                "message": msg,
                "reason": "InternalError",
                "code": 500,
            }),
        };
        serde_json::to_vec(&v).unwrap_or_default()
    }

    /// The plain-text error of protocols v1–v3 (nothing on success).
    pub fn status_text(&self) -> Vec<u8> {
        match self {
            Self::Exited(0) => Vec::new(),
            Self::Exited(code) => {
                format!("command terminated with non-zero exit code: exit status {code}")
                    .into_bytes()
            }
            Self::Failed(msg) => msg.clone().into_bytes(),
        }
    }
}

/// Parses a resize event, `{"Width":80,"Height":24}`.
pub fn parse_resize(data: &[u8]) -> Option<(u16, u16)> {
    let v: serde_json::Value = serde_json::from_slice(data).ok()?;
    let w = u16::try_from(v.get("Width")?.as_u64()?).ok()?;
    let h = u16::try_from(v.get("Height")?.as_u64()?).ok()?;
    Some((w, h))
}

async fn pump(
    mut from: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    chan: Chan,
    out: mpsc::Sender<Output>,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                if out
                    .send(Output::Data(chan, Bytes::copy_from_slice(&buf[..n])))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            // A pty reports EIO once the process is gone: that is the end.
            Err(_) => break,
        }
    }
    let _ = out.send(Output::End(chan)).await;
}

/// Runs the session to its end: copies stdin from `stdin` (closed = EOF),
/// forwards resizes, sends stdout/stderr to `out`, and returns how the
/// process ended once it exited and its output was delivered.
pub async fn drive(
    mut session: ExecSession,
    stdin: Option<mpsc::Receiver<Bytes>>,
    resize: Option<mpsc::Receiver<(u16, u16)>>,
    out: mpsc::Sender<Output>,
) -> Outcome {
    let stdin_task = match (session.stdin.take(), stdin) {
        (Some(mut w), Some(mut rx)) => Some(tokio::spawn(async move {
            while let Some(b) = rx.recv().await {
                if w.write_all(&b).await.is_err() || w.flush().await.is_err() {
                    break;
                }
            }
            let _ = w.shutdown().await;
        })),
        _ => None,
    };
    let resize_task = match (session.resize.take(), resize) {
        (Some(tx), Some(mut rx)) => Some(tokio::spawn(async move {
            while let Some(size) = rx.recv().await {
                if tx.send(size).await.is_err() {
                    break;
                }
            }
        })),
        _ => None,
    };
    let mut pumps = Vec::new();
    if let Some(r) = session.stdout.take() {
        pumps.push(tokio::spawn(pump(r, Chan::Stdout, out.clone())));
    }
    if let Some(r) = session.stderr.take() {
        pumps.push(tokio::spawn(pump(r, Chan::Stderr, out.clone())));
    }
    let outcome = match (&mut session.exit).await {
        Ok(code) => Outcome::Exited(code),
        Err(_) => Outcome::Failed("the process's exit status was lost".into()),
    };
    for p in pumps {
        let _ = p.await;
    }
    for t in [stdin_task, resize_task].into_iter().flatten() {
        t.abort();
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let s = String::from_utf8(Outcome::Exited(3).status_json()).unwrap_or_default();
        assert!(
            s.contains("NonZeroExitCode") && s.contains("\"message\":\"3\""),
            "{s}"
        );
        assert!(Outcome::Exited(0).status_text().is_empty());
        assert_eq!(parse_resize(br#"{"Width":80,"Height":24}"#), Some((80, 24)));
    }
}

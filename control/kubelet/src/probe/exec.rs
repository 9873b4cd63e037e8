//! `exec` probes: the command runs inside the container through the
//! runtime (no tty, no stdin); exit code 0 is success. Output (stdout then
//! stderr, at most 10 KiB) becomes the failure message, as in the kubelet.

use super::{MAX_OUTPUT, ProbeResult, ProbeTarget};
use serde_json::Value;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};

pub(super) async fn probe(spec: &Value, target: &ProbeTarget, timeout: Duration) -> ProbeResult {
    let command: Vec<String> = spec
        .get("command")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect();
    if command.is_empty() {
        return ProbeResult::Failure("the exec probe has no command".into());
    }
    let shown = command.join(" ");
    let work = async {
        let session = target
            .runtime
            .exec(&target.container_id, &command, false, false)
            .await
            .map_err(|e| format!("exec {shown:?}: {e}"))?;
        let output = async {
            let (out, err) =
                tokio::join!(read_limited(session.stdout), read_limited(session.stderr));
            let mut all = out;
            let room = MAX_OUTPUT.saturating_sub(all.len());
            all.extend_from_slice(&err[..err.len().min(room)]);
            all
        };
        let (code, output) = tokio::join!(session.exit, output);
        let code =
            code.map_err(|_| format!("exec {shown:?}: the session ended without an exit code"))?;
        Ok::<_, String>((code, output))
    };
    // Dropping the session on timeout closes its pipes; the runtime decides
    // what happens to the process (the kubelet leaves it running too).
    match tokio::time::timeout(timeout, work).await {
        Err(_) => ProbeResult::Failure(format!(
            "command {shown:?} timed out after {}s",
            timeout.as_secs_f64()
        )),
        Ok(Err(e)) => ProbeResult::Failure(e),
        Ok(Ok((0, _))) => ProbeResult::Success,
        Ok(Ok((code, output))) => {
            let text = String::from_utf8_lossy(&output);
            let text = text.trim_end();
            ProbeResult::Failure(if text.is_empty() {
                format!("command {shown:?} exited with {code}")
            } else {
                text.to_string()
            })
        }
    }
}

/// Reads a stream to its end, keeping the first MAX_OUTPUT bytes (the rest
/// is drained so the process never blocks on a full pipe).
async fn read_limited(reader: Option<Box<dyn AsyncRead + Send + Unpin>>) -> Vec<u8> {
    let mut kept = Vec::new();
    let Some(mut reader) = reader else {
        return kept;
    };
    let mut buf = [0u8; 4096];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = MAX_OUTPUT.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

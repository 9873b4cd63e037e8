//! kubectl exec/attach over docker's hijacked connections: the
//! multiplexed output is split into stdout/stderr pipes, and the exit code
//! is looked up once the output ends.

use std::{pin::Pin, time::Duration};

use bollard::{Docker, container::LogOutput, errors::Error};
use futures::{Stream, StreamExt};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::runtime::ExecSession;

/// Pipe buffer between docker's stream and the session's reader.
const PIPE: usize = 64 * 1024;

pub(crate) type Output = Pin<Box<dyn Stream<Item = Result<LogOutput, Error>> + Send>>;

/// Where the exit code comes from once the output has ended.
pub(crate) enum Exit {
    Exec { docker: Docker, id: String },
    Container { docker: Docker, id: String },
}

pub(crate) fn session(
    output: Output,
    input: Pin<Box<dyn AsyncWrite + Send>>,
    stdin: bool,
    tty: bool,
    resize: Option<tokio::sync::mpsc::Sender<(u16, u16)>>,
    exit: Exit,
) -> ExecSession {
    let (out_w, out_r) = tokio::io::duplex(PIPE);
    let (err_w, err_r) = tokio::io::duplex(PIPE);
    let (exit_tx, exit_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        pump(output, out_w, err_w).await;
        let code = exit_code(exit).await;
        let _ = exit_tx.send(code);
    });
    ExecSession {
        stdin: stdin.then(|| Box::new(input) as Box<dyn AsyncWrite + Send + Unpin>),
        stdout: Some(Box::new(out_r)),
        stderr: (!tty).then(|| Box::new(err_r) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        resize,
        exit: exit_rx,
    }
}

async fn pump(
    mut output: Output,
    mut out: tokio::io::DuplexStream,
    mut err: tokio::io::DuplexStream,
) {
    let (mut out_open, mut err_open) = (true, true);
    while let Some(item) = output.next().await {
        let Ok(item) = item else { break };
        match item {
            LogOutput::StdOut { message } | LogOutput::Console { message } if out_open => {
                out_open = out.write_all(&message).await.is_ok();
            }
            LogOutput::StdErr { message } if err_open => {
                err_open = err.write_all(&message).await.is_ok();
            }
            _ => {}
        }
    }
    let _ = out.shutdown().await;
    let _ = err.shutdown().await;
}

/// The exit code; -1 when docker cannot tell.
async fn exit_code(exit: Exit) -> i32 {
    match exit {
        Exit::Exec { docker, id } => {
            // The output can end a moment before docker records the exit.
            for _ in 0..100 {
                match docker.inspect_exec(&id).await {
                    Ok(i) if i.running != Some(true) => {
                        return i
                            .exit_code
                            .and_then(|c| i32::try_from(c).ok())
                            .unwrap_or(-1);
                    }
                    Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    Err(_) => return -1,
                }
            }
            -1
        }
        Exit::Container { docker, id } => {
            let mut s = docker.wait_container(&id, None);
            match s.next().await {
                Some(Ok(r)) => i32::try_from(r.status_code).unwrap_or(-1),
                Some(Err(Error::DockerContainerWaitError { code, .. })) => {
                    i32::try_from(code).unwrap_or(-1)
                }
                _ => -1,
            }
        }
    }
}

//! `/exec/{ns}/{pod}/{container}` and `/attach/…`: the remotecommand
//! protocols over SPDY/3.1 (`X-Stream-Protocol-Version` v5…v2
//! `.channel.k8s.io`, one SPDY stream per `streamType`) or over a
//! WebSocket (subprotocol `v5.channel.k8s.io` … `channel.k8s.io`, each
//! message prefixed by its channel byte; v5 adds 255 = "close channel").

use super::{
    Body, Upgrade,
    channels::{Chan, Outcome, Output, drive, parse_resize},
    full, header_list, query_flag, query_pairs,
    spdy::{Event, Out, SpdyConn},
    stream_error, text, upgrade_of,
    websocket::{Outgoing, WsConn, accept_key},
};
use crate::{
    runtime::ExecSession,
    streams::{ContainerRef, PodStreams},
};
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::{collections::HashMap, sync::Arc, time::Duration};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Exec,
    Attach,
}

/// Channel protocols we speak, best first.
const CHANNEL_PROTOCOLS: &[&str] = &[
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
];

/// How long the client has to open the SPDY streams it asked for.
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);

/// The first protocol of the client's list that we support (the client
/// lists its preference first).
pub(super) fn negotiate(client: &[String], ours: &[&str]) -> Option<String> {
    client
        .iter()
        .find(|c| ours.iter().any(|o| o.eq_ignore_ascii_case(c)))
        .cloned()
}

/// The 101 answer accepting `upgrade` with `protocol` (or, when the
/// request cannot be accepted, the error to answer instead).
pub(super) fn switching(
    req: &Request<Incoming>,
    upgrade: Upgrade,
    protocol: &str,
) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let Ok(protocol) = header::HeaderValue::from_str(protocol) else {
        return text(StatusCode::BAD_REQUEST, "invalid protocol name");
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("Upgrade"),
    );
    match upgrade {
        Upgrade::WebSocket => {
            let Some(key) = req
                .headers()
                .get("sec-websocket-key")
                .and_then(|k| k.to_str().ok())
            else {
                return text(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key");
            };
            let Ok(accept) = header::HeaderValue::from_str(&accept_key(key)) else {
                return text(StatusCode::BAD_REQUEST, "invalid Sec-WebSocket-Key");
            };
            h.insert(
                header::UPGRADE,
                header::HeaderValue::from_static("websocket"),
            );
            h.insert("sec-websocket-accept", accept);
            h.insert("sec-websocket-protocol", protocol);
        }
        Upgrade::Spdy => {
            h.insert(
                header::UPGRADE,
                header::HeaderValue::from_static("SPDY/3.1"),
            );
            h.insert("x-stream-protocol-version", protocol);
        }
    }
    resp
}

/// What the client asked for.
#[derive(Debug, Clone, Copy)]
struct Want {
    stdin: bool,
    stdout: bool,
    stderr: bool,
    tty: bool,
}

pub(super) async fn handle(
    mut req: Request<Incoming>,
    c: ContainerRef,
    streams: Arc<dyn PodStreams>,
    kind: Kind,
) -> Response<Body> {
    let q = query_pairs(&req);
    let command: Vec<String> = q
        .iter()
        .filter(|(k, _)| k == "command")
        .map(|(_, v)| v.clone())
        .collect();
    let tty = query_flag(&q, "tty");
    let want = Want {
        stdin: query_flag(&q, "stdin"),
        stdout: query_flag(&q, "stdout"),
        // With a tty, stderr is part of the terminal.
        stderr: query_flag(&q, "stderr") && !tty,
        tty,
    };
    if kind == Kind::Exec && command.is_empty() {
        return text(
            StatusCode::BAD_REQUEST,
            "you must specify at least one command for the container",
        );
    }
    if !want.stdin && !want.stdout && !query_flag(&q, "stderr") {
        return text(
            StatusCode::BAD_REQUEST,
            "you must specify at least one of stdin, stdout, stderr",
        );
    }
    let Some(upgrade) = upgrade_of(&req) else {
        return text(
            StatusCode::BAD_REQUEST,
            "this endpoint needs an upgrade to SPDY/3.1 or websocket",
        );
    };
    let offered = match upgrade {
        Upgrade::WebSocket => header_list(&req, "sec-websocket-protocol"),
        Upgrade::Spdy => header_list(&req, "x-stream-protocol-version"),
    };
    let Some(protocol) = negotiate(&offered, CHANNEL_PROTOCOLS) else {
        return text(
            StatusCode::BAD_REQUEST,
            format!(
                "unable to upgrade: none of the offered protocols {offered:?} is supported; supported: {CHANNEL_PROTOCOLS:?}"
            ),
        );
    };
    // Starting the process before upgrading lets a missing container or
    // command be answered with a plain HTTP error.
    let session = match kind {
        Kind::Exec => streams.exec(&c, &command, want.tty, want.stdin).await,
        Kind::Attach => streams.attach(&c, want.stdin).await,
    };
    let session = match session {
        Ok(s) => s,
        Err(e) => return stream_error(&e),
    };
    let resp = switching(&req, upgrade, &protocol);
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return resp;
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let io = match on_upgrade.await {
            Ok(u) => TokioIo::new(u),
            Err(e) => {
                tracing::debug!(error = %e, "exec: the upgrade failed");
                return;
            }
        };
        let v4 = !protocol.starts_with("v2") && !protocol.starts_with("v3");
        match upgrade {
            Upgrade::WebSocket => run_websocket(io, session, &protocol, want, v4).await,
            Upgrade::Spdy => run_spdy(io, session, want, v4).await,
        }
    });
    resp
}

fn status_bytes(outcome: &Outcome, v4: bool) -> Vec<u8> {
    if v4 {
        outcome.status_json()
    } else {
        outcome.status_text()
    }
}

async fn run_websocket<IO>(io: IO, session: ExecSession, protocol: &str, want: Want, v4: bool)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let mut ws = WsConn::spawn(io);
    let v5 = protocol.starts_with("v5");
    let (stdin_tx, stdin_rx) = mpsc::channel::<Bytes>(16);
    let (resize_tx, resize_rx) = mpsc::channel::<(u16, u16)>(4);
    let mut incoming = std::mem::replace(&mut ws.incoming, mpsc::channel(1).1);
    let router = tokio::spawn(async move {
        let mut stdin_tx = Some(stdin_tx);
        while let Some(msg) = incoming.recv().await {
            let Some((&chan, data)) = msg.split_first() else {
                continue;
            };
            match chan {
                0 => {
                    if let Some(tx) = &stdin_tx
                        && !data.is_empty()
                        && tx.send(Bytes::copy_from_slice(data)).await.is_err()
                    {
                        stdin_tx = None;
                    }
                }
                4 => {
                    if let Some(size) = parse_resize(data) {
                        let _ = resize_tx.send(size).await;
                    }
                }
                // v5: the client closed one of its channels.
                255 if v5 && data.first() == Some(&0) => stdin_tx = None,
                _ => {}
            }
        }
        // The client went away or closed: stdin ends with it.
    });
    let (out_tx, mut out_rx) = mpsc::channel::<Output>(64);
    let outgoing = ws.outgoing.clone();
    let forward = tokio::spawn(async move {
        while let Some(o) = out_rx.recv().await {
            if let Output::Data(chan, data) = o {
                let mut msg = Vec::with_capacity(data.len() + 1);
                msg.push(chan as u8);
                msg.extend_from_slice(&data);
                if outgoing.send(Outgoing::Binary(msg)).await.is_err() {
                    break;
                }
            }
        }
    });
    let outcome = drive(
        session,
        want.stdin.then_some(stdin_rx),
        want.tty.then_some(resize_rx),
        out_tx,
    )
    .await;
    let _ = forward.await;
    let status = status_bytes(&outcome, v4);
    if !status.is_empty() {
        let mut msg = vec![Chan::Error as u8];
        msg.extend_from_slice(&status);
        let _ = ws.outgoing.send(Outgoing::Binary(msg)).await;
    }
    router.abort();
    ws.close().await;
}

fn chan_of(headers: &[(String, String)]) -> Option<Chan> {
    let t = headers.iter().find(|(k, _)| k == "streamtype")?.1.as_str();
    Some(match t {
        "error" => Chan::Error,
        "stdin" => Chan::Stdin,
        "stdout" => Chan::Stdout,
        "stderr" => Chan::Stderr,
        "resize" => Chan::Resize,
        _ => return None,
    })
}

async fn run_spdy<IO>(io: IO, session: ExecSession, want: Want, v4: bool)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let mut conn = match SpdyConn::spawn(io) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "exec: SPDY setup failed");
            return;
        }
    };
    let mut required = vec![Chan::Error];
    for (on, chan) in [
        (want.stdin, Chan::Stdin),
        (want.stdout, Chan::Stdout),
        (want.stderr, Chan::Stderr),
    ] {
        if on {
            required.push(chan);
        }
    }
    let mut ids: HashMap<Chan, u32> = HashMap::new();
    let mut early = Vec::new();
    let deadline = tokio::time::sleep(STREAM_CREATION_TIMEOUT);
    tokio::pin!(deadline);
    while !required.iter().all(|c| ids.contains_key(c)) {
        tokio::select! {
            ev = conn.events.recv() => match ev {
                Some(Event::Stream { id, headers }) => {
                    if let Some(chan) = chan_of(&headers) {
                        ids.insert(chan, id);
                    }
                }
                Some(other) => early.push(other),
                None => return,
            },
            _ = &mut deadline => {
                tracing::debug!(?ids, "exec: the client did not open its streams in time");
                conn.close().await;
                return;
            }
        }
    }
    let (stdin_tx, stdin_rx) = mpsc::channel::<Bytes>(16);
    let (resize_tx, resize_rx) = mpsc::channel::<(u16, u16)>(4);
    let mut events = std::mem::replace(&mut conn.events, mpsc::channel(1).1);
    let router_ids = ids.clone();
    let router = tokio::spawn(async move {
        let mut ids = router_ids;
        let mut stdin_tx = Some(stdin_tx);
        let mut resize_buf = Vec::new();
        let mut pending = early.into_iter();
        loop {
            let ev = match pending.next() {
                Some(e) => e,
                None => match events.recv().await {
                    Some(e) => e,
                    None => break,
                },
            };
            match ev {
                Event::Stream { id, headers } => {
                    if let Some(chan) = chan_of(&headers) {
                        ids.insert(chan, id);
                    }
                }
                Event::Data { id, data } if ids.get(&Chan::Stdin) == Some(&id) => {
                    if let Some(tx) = &stdin_tx
                        && tx.send(data).await.is_err()
                    {
                        stdin_tx = None;
                    }
                }
                Event::Data { id, data } if ids.get(&Chan::Resize) == Some(&id) => {
                    // Resize events are JSON objects back to back.
                    resize_buf.extend_from_slice(&data);
                    let mut it = serde_json::Deserializer::from_slice(&resize_buf)
                        .into_iter::<serde_json::Value>();
                    let mut used = 0;
                    while let Some(Ok(v)) = it.next() {
                        used = it.byte_offset();
                        if let Some(size) = parse_resize(v.to_string().as_bytes()) {
                            let _ = resize_tx.send(size).await;
                        }
                    }
                    resize_buf.drain(..used);
                }
                Event::Fin { id } | Event::Reset { id } if ids.get(&Chan::Stdin) == Some(&id) => {
                    stdin_tx = None;
                }
                _ => {}
            }
        }
    });
    let (out_tx, mut out_rx) = mpsc::channel::<Output>(64);
    let out = conn.out.clone();
    let out_ids = ids.clone();
    let forward = tokio::spawn(async move {
        while let Some(o) = out_rx.recv().await {
            let msg = match o {
                Output::Data(chan, data) => out_ids.get(&chan).map(|&id| Out::Data(id, data)),
                Output::End(chan) => out_ids.get(&chan).map(|&id| Out::Fin(id)),
            };
            if let Some(msg) = msg
                && out.send(msg).await.is_err()
            {
                break;
            }
        }
    });
    let outcome = drive(
        session,
        want.stdin.then_some(stdin_rx),
        want.tty.then_some(resize_rx),
        out_tx,
    )
    .await;
    let _ = forward.await;
    if let Some(&id) = ids.get(&Chan::Error) {
        let status = status_bytes(&outcome, v4);
        if !status.is_empty() {
            let _ = conn.out.send(Out::Data(id, Bytes::from(status))).await;
        }
        let _ = conn.out.send(Out::Fin(id)).await;
    }
    router.abort();
    conn.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clients_first_supported_protocol_wins() {
        let offered = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            negotiate(
                &offered(&["v5.channel.k8s.io", "v4.channel.k8s.io"]),
                CHANNEL_PROTOCOLS
            )
            .as_deref(),
            Some("v5.channel.k8s.io")
        );
        assert_eq!(
            negotiate(
                &offered(&["base64.channel.k8s.io", "v4.channel.k8s.io"]),
                CHANNEL_PROTOCOLS
            )
            .as_deref(),
            Some("v4.channel.k8s.io")
        );
        assert_eq!(
            negotiate(&offered(&["channel.k8s.io"]), CHANNEL_PROTOCOLS),
            None
        );
    }
}

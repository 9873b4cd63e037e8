//! `/portForward/{ns}/{pod}`: protocol `portforward.k8s.io` over SPDY/3.1,
//! either directly (kubectl ≤ 1.30) or tunnelled through a WebSocket whose
//! binary messages carry the SPDY byte stream (subprotocol
//! `SPDY/3.1+portforward.k8s.io`, kubectl ≥ 1.31). For every forwarded
//! connection the client opens an `error` and a `data` stream with the
//! same `requestid` and the `port` header; we splice the data stream with
//! a TCP connection to that port inside the pod.
//!
//! Other WebSocket clients (the Python client) use the channel protocol
//! `v4.channel.k8s.io` with `?ports=a,b`: port i has data channel 2i and
//! error channel 2i+1, each opened by a message holding the port number
//! (little-endian u16); one TCP connection per port.

use super::{
    Body, Upgrade,
    exec::{negotiate, switching},
    header_list, query_pairs,
    spdy::{Event, MAX_DATA, Out, SpdyConn},
    text, upgrade_of,
    websocket::{Outgoing, WsConn, tunnel},
};
use crate::streams::PodStreams;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::{collections::HashMap, sync::Arc};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
};

const PROTOCOL: &str = "portforward.k8s.io";
const TUNNEL_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";
const CHANNEL_PROTOCOLS: &[&str] = &["v4.channel.k8s.io", "channel.k8s.io"];

pub(super) async fn handle(
    mut req: Request<Incoming>,
    namespace: String,
    pod: String,
    streams: Arc<dyn PodStreams>,
) -> Response<Body> {
    let Some(upgrade) = upgrade_of(&req) else {
        return text(
            StatusCode::BAD_REQUEST,
            "port-forward needs an upgrade to SPDY/3.1 or websocket",
        );
    };
    let (offered, ours): (_, &[&str]) = match upgrade {
        Upgrade::Spdy => (header_list(&req, "x-stream-protocol-version"), &[PROTOCOL]),
        Upgrade::WebSocket => {
            let offered = header_list(&req, "sec-websocket-protocol");
            if negotiate(&offered, &[TUNNEL_PROTOCOL]).is_some() {
                (offered, &[TUNNEL_PROTOCOL])
            } else {
                (offered, CHANNEL_PROTOCOLS)
            }
        }
    };
    let Some(protocol) = negotiate(&offered, ours) else {
        return text(
            StatusCode::BAD_REQUEST,
            format!(
                "unable to upgrade: port-forward supports {ours:?}, the client offered {offered:?}"
            ),
        );
    };
    let channel_ports = if upgrade == Upgrade::WebSocket && protocol != TUNNEL_PROTOCOL {
        let mut ports = Vec::new();
        for (k, v) in query_pairs(&req) {
            if k != "port" && k != "ports" {
                continue;
            }
            for p in v.split(',').filter(|p| !p.is_empty()) {
                match p.trim().parse::<u16>() {
                    Ok(port) if port > 0 => ports.push(port),
                    _ => {
                        return text(StatusCode::BAD_REQUEST, format!("invalid port {p:?}"));
                    }
                }
            }
        }
        if ports.is_empty() {
            return text(
                StatusCode::BAD_REQUEST,
                "query parameter \"port\" is required",
            );
        }
        Some(ports)
    } else {
        None
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
                tracing::debug!(error = %e, "port-forward: the upgrade failed");
                return;
            }
        };
        if let Some(ports) = channel_ports {
            run_channels(WsConn::spawn(io), namespace, pod, ports, streams).await;
            return;
        }
        let conn = match upgrade {
            Upgrade::Spdy => SpdyConn::spawn(io),
            Upgrade::WebSocket => SpdyConn::spawn(tunnel(io)),
        };
        match conn {
            Ok(conn) => run(conn, namespace, pod, streams).await,
            Err(e) => tracing::warn!(error = %e, "port-forward: SPDY setup failed"),
        }
    });
    resp
}

#[derive(Debug, Default)]
struct Pair {
    port: Option<u16>,
    error: Option<u32>,
    data: Option<u32>,
}

async fn run(mut conn: SpdyConn, namespace: String, pod: String, streams: Arc<dyn PodStreams>) {
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    // Data stream id → the pair's TCP writer (dropped = client closed).
    let mut to_pod: HashMap<u32, mpsc::Sender<Bytes>> = HashMap::new();
    while let Some(ev) = conn.events.recv().await {
        match ev {
            Event::Stream { id, headers } => {
                let get = |name: &str| {
                    headers
                        .iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.clone())
                };
                let kind = get("streamtype").unwrap_or_default();
                // Without a request id (old clients) the data stream
                // follows its error stream.
                let request = get("requestid").unwrap_or_else(|| match kind.as_str() {
                    "data" => id.saturating_sub(2).to_string(),
                    _ => id.to_string(),
                });
                let port = get("port").and_then(|p| p.parse::<u16>().ok());
                let pair = pairs.entry(request.clone()).or_default();
                match kind.as_str() {
                    "error" => pair.error = Some(id),
                    "data" => pair.data = Some(id),
                    _ => {
                        let _ = conn.out.send(Out::Reset(id)).await;
                        continue;
                    }
                }
                if pair.port.is_none() {
                    pair.port = port;
                }
                if let Pair {
                    port,
                    error: Some(error),
                    data: Some(data),
                } = *pair
                {
                    pairs.remove(&request);
                    let (tx, rx) = mpsc::channel(32);
                    to_pod.insert(data, tx);
                    tokio::spawn(forward(
                        port,
                        error,
                        data,
                        rx,
                        conn.out.clone(),
                        streams.clone(),
                        namespace.clone(),
                        pod.clone(),
                    ));
                }
            }
            Event::Data { id, data } => {
                if let Some(tx) = to_pod.get(&id)
                    && tx.send(data).await.is_err()
                {
                    to_pod.remove(&id);
                }
            }
            Event::Fin { id } | Event::Reset { id } => {
                to_pod.remove(&id);
            }
        }
    }
    conn.close().await;
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    port: Option<u16>,
    error: u32,
    data: u32,
    mut from_client: mpsc::Receiver<Bytes>,
    out: mpsc::Sender<Out>,
    streams: Arc<dyn PodStreams>,
    namespace: String,
    pod: String,
) {
    let fail = |msg: String| {
        let out = out.clone();
        async move {
            let _ = out.send(Out::Data(error, Bytes::from(msg))).await;
            let _ = out.send(Out::Fin(error)).await;
            let _ = out.send(Out::Fin(data)).await;
        }
    };
    let Some(port) = port else {
        fail("the port-forward request has no valid port header".into()).await;
        return;
    };
    let tcp = match streams.port_forward(&namespace, &pod, port).await {
        Ok(t) => t,
        Err(e) => {
            fail(format!(
                "error forwarding port {port} to pod {namespace}/{pod}: {e}"
            ))
            .await;
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    let (mut rd, mut wr) = tcp.into_split();
    tokio::spawn(async move {
        while let Some(b) = from_client.recv().await {
            if wr.write_all(&b).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let mut buf = vec![0u8; MAX_DATA];
    loop {
        match rd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if out
                    .send(Out::Data(data, Bytes::copy_from_slice(&buf[..n])))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
    let _ = out.send(Out::Fin(data)).await;
    let _ = out.send(Out::Fin(error)).await;
}

/// The WebSocket channel protocol: one TCP connection per requested port.
async fn run_channels(
    mut ws: WsConn,
    namespace: String,
    pod: String,
    ports: Vec<u16>,
    streams: Arc<dyn PodStreams>,
) {
    let mut to_pod: Vec<Option<mpsc::Sender<Bytes>>> = Vec::new();
    for (i, &port) in ports.iter().enumerate() {
        let (data, error) = ((2 * i) as u8, (2 * i + 1) as u8);
        let [lo, hi] = port.to_le_bytes();
        for chan in [data, error] {
            let _ = ws.outgoing.send(Outgoing::Binary(vec![chan, lo, hi])).await;
        }
        let tcp = match streams.port_forward(&namespace, &pod, port).await {
            Ok(t) => t,
            Err(e) => {
                let mut msg = vec![error];
                msg.extend_from_slice(
                    format!("error forwarding port {port} to pod {namespace}/{pod}: {e}")
                        .as_bytes(),
                );
                let _ = ws.outgoing.send(Outgoing::Binary(msg)).await;
                to_pod.push(None);
                continue;
            }
        };
        let (mut rd, mut wr) = tcp.into_split();
        let (tx, mut rx) = mpsc::channel::<Bytes>(32);
        to_pod.push(Some(tx));
        tokio::spawn(async move {
            while let Some(b) = rx.recv().await {
                if wr.write_all(&b).await.is_err() {
                    break;
                }
            }
            let _ = wr.shutdown().await;
        });
        let out = ws.outgoing.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATA];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut msg = Vec::with_capacity(n + 1);
                        msg.push(data);
                        msg.extend_from_slice(&buf[..n]);
                        if out.send(Outgoing::Binary(msg)).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
    let mut incoming = std::mem::replace(&mut ws.incoming, mpsc::channel(1).1);
    while let Some(msg) = incoming.recv().await {
        let Some((&chan, data)) = msg.split_first() else {
            continue;
        };
        let index = usize::from(chan / 2);
        if chan % 2 == 0
            && !data.is_empty()
            && let Some(Some(tx)) = to_pod.get(index)
            && tx.send(Bytes::copy_from_slice(data)).await.is_err()
        {
            to_pod[index] = None;
        }
    }
    drop(to_pod);
    ws.close().await;
}

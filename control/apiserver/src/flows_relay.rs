//! `GET /skep/v1/flows`: the flows of every node, for `skep ctl flows`.
//!
//! The relay dials each Node's flow observer (its InternalIP and the port
//! in the annotation `skep.io/flows-port`) over TLS with the API server's
//! kubelet-client certificate, asks it for the request's flows (gRPC
//! `skep.flows.v1.Observer/GetFlows`), merges the answers — the histories
//! of all nodes sorted by time, then live flows as they come — and streams
//! them to the client as JSON lines, one event per line, in the shape of a
//! watch event so that watch clients read it:
//!
//! ```text
//! {"type":"FLOW","object":{"time":"…","node":"n1","verdict":"DROPPED","drop_reason":"policy-denied-ingress",…}}
//! {"type":"ERROR","object":{"node":"n2","error":"…"}}   a node that cannot be read
//! {"type":"LOST","object":{"node":"n1","count":12}}      a node skipped flows (slow reader)
//! ```
//!
//! Query: `follow`, `since` (a duration back from now such as `5m`, or an
//! RFC 3339 time), `first`/`last` N, and the filters `namespace`, `pod`,
//! `from`, `to`, `verdict` (FORWARDED|DROPPED), `protocol` (tcp, udp, sctp,
//! icmp or a number), `port`, each applied by the nodes.
//!
//! The observer's messages (control/kubelet/proto/flows.proto) are
//! mirrored below with this crate's prost; keep them in step.

use crate::{
    api::{Api, Query},
    pki::Credentials,
    routes::ResourceRoute,
    server::Body,
    status::ApiError,
};
use bytes::Bytes;
use futures::StreamExt;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::{
    collections::BTreeSet,
    convert::Infallible,
    future::Future,
    marker::PhantomData,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;

/// The Node annotation holding the observer's port (set by the agent).
pub const FLOWS_PORT_ANNOTATION: &str = "skep.io/flows-port";

/// How long reaching a node's observer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

const GET_FLOWS_PATH: &str = "/skep.flows.v1.Observer/GetFlows";

/// The observer's messages (flows.proto, package `skep.flows.v1`).
pub mod pb {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GetFlowsRequest {
        #[prost(bool, tag = "1")]
        pub follow: bool,
        #[prost(int64, tag = "2")]
        pub since_unix_nanos: i64,
        #[prost(uint32, tag = "3")]
        pub first: u32,
        #[prost(uint32, tag = "4")]
        pub last: u32,
        #[prost(message, optional, tag = "5")]
        pub filter: Option<FlowFilter>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct FlowFilter {
        #[prost(string, tag = "1")]
        pub namespace: String,
        #[prost(string, tag = "2")]
        pub pod: String,
        #[prost(string, tag = "3")]
        pub from: String,
        #[prost(string, tag = "4")]
        pub to: String,
        /// `Verdict`: 1 FORWARDED, 2 DROPPED.
        #[prost(int32, tag = "5")]
        pub verdict: i32,
        #[prost(uint32, tag = "6")]
        pub protocol: u32,
        #[prost(uint32, tag = "7")]
        pub port: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GetFlowsResponse {
        #[prost(oneof = "Event", tags = "1, 2, 3")]
        pub event: Option<Event>,
    }

    // Mirrors prost's generated oneof (messages inline, not boxed).
    #[allow(clippy::large_enum_variant)]
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Event {
        #[prost(message, tag = "1")]
        Flow(Flow),
        #[prost(message, tag = "2")]
        HistoryEnd(HistoryEnd),
        #[prost(message, tag = "3")]
        LostEvents(LostEvents),
    }

    #[derive(Clone, Copy, PartialEq, prost::Message)]
    pub struct HistoryEnd {}

    #[derive(Clone, Copy, PartialEq, prost::Message)]
    pub struct LostEvents {
        #[prost(uint64, tag = "1")]
        pub count: u64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Endpoint {
        #[prost(string, tag = "1")]
        pub ip: String,
        #[prost(uint32, tag = "2")]
        pub port: u32,
        #[prost(string, tag = "3")]
        pub namespace: String,
        #[prost(string, tag = "4")]
        pub pod: String,
        #[prost(uint32, tag = "5")]
        pub identity: u32,
        #[prost(string, repeated, tag = "6")]
        pub labels: Vec<String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ServiceFrontend {
        #[prost(string, tag = "1")]
        pub ip: String,
        #[prost(uint32, tag = "2")]
        pub port: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Flow {
        #[prost(int64, tag = "1")]
        pub time_unix_nanos: i64,
        #[prost(string, tag = "2")]
        pub node_name: String,
        #[prost(int32, tag = "3")]
        pub verdict: i32,
        #[prost(int32, tag = "4")]
        pub drop_reason: i32,
        #[prost(int32, tag = "5")]
        pub observation: i32,
        #[prost(uint32, tag = "6")]
        pub protocol: u32,
        #[prost(message, optional, tag = "7")]
        pub source: Option<Endpoint>,
        #[prost(message, optional, tag = "8")]
        pub destination: Option<Endpoint>,
        #[prost(string, repeated, tag = "9")]
        pub tcp_flags: Vec<String>,
        #[prost(message, optional, tag = "10")]
        pub service: Option<ServiceFrontend>,
        #[prost(string, tag = "11")]
        pub policy_name: String,
        #[prost(uint32, tag = "12")]
        pub policy_id: u32,
        #[prost(uint32, tag = "13")]
        pub ifindex: u32,
    }
}

/// tonic's codec over this crate's prost (tonic's own `ProstCodec` is
/// built on an older prost).
struct Codec<E, D>(PhantomData<fn(E) -> D>);

impl<E, D> Default for Codec<E, D> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

struct Enc<E>(PhantomData<fn(E)>);
struct Dec<D>(PhantomData<fn() -> D>);

impl<E, D> tonic::codec::Codec for Codec<E, D>
where
    E: prost::Message + Send + 'static,
    D: prost::Message + Default + Send + 'static,
{
    type Encode = E;
    type Decode = D;
    type Encoder = Enc<E>;
    type Decoder = Dec<D>;

    fn encoder(&mut self) -> Enc<E> {
        Enc(PhantomData)
    }

    fn decoder(&mut self) -> Dec<D> {
        Dec(PhantomData)
    }
}

impl<E: prost::Message> tonic::codec::Encoder for Enc<E> {
    type Item = E;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: E,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        item.encode(buf)
            .map_err(|e| tonic::Status::internal(format!("encoding the request: {e}")))
    }
}

impl<D: prost::Message + Default> tonic::codec::Decoder for Dec<D> {
    type Item = D;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<D>, tonic::Status> {
        D::decode(buf)
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("decoding a flow: {e}")))
    }
}

/// Dials one node's observer: TCP, then TLS with the kubelet-client
/// certificate (tonic then speaks HTTP/2 over it).
#[derive(Clone)]
struct Dialer {
    addr: SocketAddr,
    connector: TlsConnector,
}

type DialFuture = Pin<
    Box<
        dyn Future<
                Output = Result<
                    TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
                    std::io::Error,
                >,
            > + Send,
    >,
>;

impl tower_service::Service<http::Uri> for Dialer {
    type Response = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = DialFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let addr = self.addr;
        let connector = self.connector.clone();
        Box::pin(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let _ = tcp.set_nodelay(true);
            let name = rustls::pki_types::ServerName::from(addr.ip());
            let tls = connector.connect(name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// The relay: the API server's TLS client towards flow observers.
#[derive(Clone)]
pub struct FlowsRelay {
    connector: TlsConnector,
}

impl std::fmt::Debug for FlowsRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowsRelay").finish_non_exhaustive()
    }
}

/// One node to read from.
#[derive(Debug, Clone)]
struct Target {
    node: String,
    /// Why the node cannot be dialled, else its observer's address.
    addr: Result<SocketAddr, String>,
}

/// What a node's stream produced.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeEvent {
    Flow(Box<pb::Flow>),
    HistoryEnd(String),
    Lost(String, u64),
    Error(String, String),
    /// The node's stream ended.
    Done(String),
}

impl FlowsRelay {
    /// The same client identity and server-certificate rule as the node
    /// proxy (`node_proxy.rs`), with HTTP/2 for gRPC.
    pub fn new(credentials: &Credentials) -> Result<Self, String> {
        Ok(Self {
            connector: crate::node_proxy::kubelet_client_tls(credentials, b"h2")?,
        })
    }

    /// Serves `GET /skep/v1/flows` (the caller has authenticated and
    /// authorized the request).
    pub async fn handle(&self, api: &Api, query: &Query) -> Result<Response<Body>, ApiError> {
        let req = parse_query(query, SystemTime::now())?;
        let targets = targets(api).await?;
        let (events_tx, mut events_rx) = mpsc::channel::<NodeEvent>(1024);
        let mut tasks = tokio::task::JoinSet::new();
        let mut merge = Merge::new(
            targets.iter().map(|t| t.node.clone()),
            req.first as usize,
            req.last as usize,
        );
        // Per node, each applies `first`/`last`; the merge applies them
        // again over all nodes.
        for t in targets {
            tasks.spawn(read_node(
                self.connector.clone(),
                t,
                req.clone(),
                events_tx.clone(),
            ));
        }
        drop(events_tx);
        let (out_tx, out_rx) = mpsc::channel::<Bytes>(64);
        tokio::spawn(async move {
            // Owning the node tasks here ends them when the client leaves.
            let _tasks = tasks;
            let mut pending = merge.start();
            loop {
                for line in pending.drain(..) {
                    let mut bytes = line.to_string().into_bytes();
                    bytes.push(b'\n');
                    if out_tx.send(Bytes::from(bytes)).await.is_err() {
                        return;
                    }
                }
                let ev = tokio::select! {
                    ev = events_rx.recv() => ev,
                    _ = out_tx.closed() => return,
                };
                match ev {
                    Some(ev) => pending = merge.on(ev),
                    None => return,
                }
            }
        });
        let stream =
            futures::stream::unfold(
                out_rx,
                |mut rx| async move { rx.recv().await.map(|b| (b, rx)) },
            )
            .map(|b| Ok::<_, Infallible>(Frame::data(b)));
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CACHE_CONTROL, "no-cache, private")
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .map_err(|e| ApiError::internal(e.to_string()))
    }
}

impl FlowsRelay {
    /// Reads the observer of `node` at `addr` into `tx` until its stream
    /// ends: its events, then `Done`, or an `Error` naming the node.
    pub async fn read_node(
        &self,
        node: &str,
        addr: SocketAddr,
        req: pb::GetFlowsRequest,
        tx: mpsc::Sender<NodeEvent>,
    ) {
        let target = Target {
            node: node.to_owned(),
            addr: Ok(addr),
        };
        read_node(self.connector.clone(), target, req, tx).await;
    }
}

/// Reads one node's flows into `tx` until its stream ends.
async fn read_node(
    connector: TlsConnector,
    target: Target,
    req: pb::GetFlowsRequest,
    tx: mpsc::Sender<NodeEvent>,
) {
    let node = target.node.clone();
    let ev = match target.addr {
        Err(why) => NodeEvent::Error(node.clone(), why),
        Ok(addr) => match stream_node(connector, &node, addr, req, &tx).await {
            Ok(()) => NodeEvent::Done(node.clone()),
            Err(e) => NodeEvent::Error(node.clone(), e),
        },
    };
    let _ = tx.send(ev).await;
}

async fn stream_node(
    connector: TlsConnector,
    node: &str,
    addr: SocketAddr,
    req: pb::GetFlowsRequest,
    tx: &mpsc::Sender<NodeEvent>,
) -> Result<(), String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("node {node}: bad observer address {addr}: {e}"))?
        .connect_timeout(CONNECT_TIMEOUT);
    let channel = tokio::time::timeout(
        CONNECT_TIMEOUT,
        endpoint.connect_with_connector(Dialer { addr, connector }),
    )
    .await
    .map_err(|_| {
        format!(
            "node {node}: no answer from its flow observer at {addr} within {CONNECT_TIMEOUT:?}"
        )
    })?
    .map_err(|e| {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        // tonic's transport error hides its cause; some causes repeat
        // their own source in their text.
        while let Some(s) = src {
            let text = s.to_string();
            if !msg.contains(&text) {
                msg.push_str(&format!(": {text}"));
            }
            src = s.source();
        }
        format!("node {node}: cannot reach its flow observer at {addr}: {msg}")
    })?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| format!("node {node}: flow observer at {addr} not ready: {e}"))?;
    let status_err = |s: tonic::Status| {
        format!(
            "node {node}: the flow observer at {addr} answered {:?}: {}",
            s.code(),
            s.message()
        )
    };
    let mut stream = grpc
        .server_streaming(
            tonic::Request::new(req),
            http::uri::PathAndQuery::from_static(GET_FLOWS_PATH),
            Codec::<pb::GetFlowsRequest, pb::GetFlowsResponse>::default(),
        )
        .await
        .map_err(status_err)?
        .into_inner();
    while let Some(msg) = stream.message().await.map_err(status_err)? {
        let ev = match msg.event {
            Some(pb::Event::Flow(f)) => NodeEvent::Flow(Box::new(f)),
            Some(pb::Event::HistoryEnd(_)) => NodeEvent::HistoryEnd(node.to_owned()),
            Some(pb::Event::LostEvents(l)) => NodeEvent::Lost(node.to_owned(), l.count),
            None => continue,
        };
        if tx.send(ev).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// Every node and where its observer listens.
async fn targets(api: &Api) -> Result<Vec<Target>, ApiError> {
    let info = api
        .registry
        .lookup("", "v1", "nodes")
        .ok_or_else(|| ApiError::internal("nodes are not registered"))?;
    let route = ResourceRoute {
        info,
        namespace: None,
        name: None,
        subresource: None,
    };
    let nodes = api.list(&route, &Query::new()).await?;
    Ok(nodes.items.iter().filter_map(target).collect())
}

fn target(node: &Value) -> Option<Target> {
    let name = node.pointer("/metadata/name")?.as_str()?.to_owned();
    let port = node
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(FLOWS_PORT_ANNOTATION))
        .and_then(Value::as_str)
        .and_then(|p| p.parse::<u16>().ok())
        .filter(|p| *p != 0);
    let addresses = node
        .pointer("/status/addresses")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let ip = ["InternalIP", "ExternalIP"].iter().find_map(|kind| {
        addresses.iter().find_map(|a| {
            (a.get("type").and_then(Value::as_str) == Some(kind))
                .then(|| a.get("address").and_then(Value::as_str))
                .flatten()
                .and_then(|s| s.parse::<std::net::IpAddr>().ok())
        })
    });
    let addr = match (port, ip) {
        (None, _) => Err(format!(
            "node {name} does not advertise a flow observer (annotation {FLOWS_PORT_ANNOTATION})"
        )),
        (_, None) => Err(format!(
            "node {name} has no InternalIP or ExternalIP address"
        )),
        (Some(port), Some(ip)) => Ok(SocketAddr::new(ip, port)),
    };
    Some(Target { node: name, addr })
}

/// Merges the nodes' streams: flows that come before every node has sent
/// its whole history are held, then emitted sorted by time (with the
/// request's `first`/`last` applied over all nodes); later flows go out
/// as they come.
#[derive(Debug)]
pub struct Merge {
    /// Nodes whose history is not complete yet.
    pending: BTreeSet<String>,
    history: Vec<pb::Flow>,
    /// Live flows of nodes that finished their history early.
    held: Vec<pb::Flow>,
    first: usize,
    last: usize,
    live: bool,
}

impl Merge {
    pub fn new(nodes: impl IntoIterator<Item = String>, first: usize, last: usize) -> Self {
        Self {
            pending: nodes.into_iter().collect(),
            history: Vec::new(),
            held: Vec::new(),
            first,
            last,
            live: false,
        }
    }

    /// Lines due before any event (none, unless there is no node at all).
    pub fn start(&mut self) -> Vec<Value> {
        if self.pending.is_empty() {
            self.flush()
        } else {
            Vec::new()
        }
    }

    fn flush(&mut self) -> Vec<Value> {
        self.live = true;
        let mut history = std::mem::take(&mut self.history);
        history.sort_by_key(|f| f.time_unix_nanos);
        if self.first > 0 {
            history.truncate(self.first);
        }
        if self.last > 0 && history.len() > self.last {
            history.drain(..history.len() - self.last);
        }
        let mut held = std::mem::take(&mut self.held);
        held.sort_by_key(|f| f.time_unix_nanos);
        history.iter().chain(&held).map(flow_line).collect()
    }

    fn history_done(&mut self, node: &str) -> Vec<Value> {
        if self.pending.remove(node) && self.pending.is_empty() && !self.live {
            self.flush()
        } else {
            Vec::new()
        }
    }

    /// The lines to send after `ev`.
    pub fn on(&mut self, ev: NodeEvent) -> Vec<Value> {
        match ev {
            NodeEvent::Flow(f) => {
                if self.live {
                    vec![flow_line(&f)]
                } else if self.pending.contains(&f.node_name) {
                    self.history.push(*f);
                    Vec::new()
                } else {
                    self.held.push(*f);
                    Vec::new()
                }
            }
            NodeEvent::HistoryEnd(node) | NodeEvent::Done(node) => self.history_done(&node),
            NodeEvent::Lost(node, count) => {
                vec![json!({"type": "LOST", "object": {"node": node, "count": count}})]
            }
            NodeEvent::Error(node, error) => {
                let mut lines =
                    vec![json!({"type": "ERROR", "object": {"node": node, "error": error}})];
                lines.extend(self.history_done(&node));
                lines
            }
        }
    }
}

fn verdict_name(v: i32) -> &'static str {
    match v {
        1 => "FORWARDED",
        2 => "DROPPED",
        _ => "UNKNOWN",
    }
}

fn drop_reason_name(r: i32) -> &'static str {
    match r {
        1 => "policy-denied-egress",
        2 => "policy-denied-ingress",
        3 => "no-backend",
        _ => "unknown",
    }
}

fn observation_name(o: i32) -> &'static str {
    match o {
        1 => "from-pod",
        2 => "to-pod",
        3 => "xdp",
        _ => "unknown",
    }
}

/// IANA protocol name of the common ones, else the number.
pub fn protocol_name(p: u32) -> String {
    match p {
        1 => "ICMP".into(),
        6 => "TCP".into(),
        17 => "UDP".into(),
        132 => "SCTP".into(),
        n => n.to_string(),
    }
}

fn endpoint_json(e: Option<&pb::Endpoint>) -> Value {
    let Some(e) = e else { return json!({}) };
    let mut o = json!({"ip": e.ip, "port": e.port, "identity": e.identity, "labels": e.labels});
    if !e.namespace.is_empty() {
        o["namespace"] = json!(e.namespace);
    }
    if !e.pod.is_empty() {
        o["pod"] = json!(e.pod);
    }
    o
}

/// A flow as its JSON line. Verdicts are upper case (`FORWARDED`,
/// `DROPPED`), drop reasons and observation points the dataplane's names
/// (`policy-denied-ingress`, `to-pod`).
pub fn flow_line(f: &pb::Flow) -> Value {
    let secs = f.time_unix_nanos.div_euclid(1_000_000_000);
    let nanos = f.time_unix_nanos.rem_euclid(1_000_000_000) as u32;
    let time = chrono::DateTime::from_timestamp(secs, nanos)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true))
        .unwrap_or_default();
    let mut o = json!({
        "time": time,
        "node": f.node_name,
        "verdict": verdict_name(f.verdict),
        "observation": observation_name(f.observation),
        "protocol": protocol_name(f.protocol),
        "source": endpoint_json(f.source.as_ref()),
        "destination": endpoint_json(f.destination.as_ref()),
        "source_port": f.source.as_ref().map_or(0, |e| e.port),
        "destination_port": f.destination.as_ref().map_or(0, |e| e.port),
        "tcp_flags": f.tcp_flags,
        "policy_id": f.policy_id,
    });
    if f.drop_reason != 0 {
        o["drop_reason"] = json!(drop_reason_name(f.drop_reason));
    }
    if let Some(s) = &f.service {
        o["service"] = json!({"ip": s.ip, "port": s.port});
    }
    if !f.policy_name.is_empty() {
        o["policy"] = json!(f.policy_name);
    }
    json!({"type": "FLOW", "object": o})
}

/// `5m`, `30s`, `1h30m`, `250ms`, `2d`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60)?),
            "h" => Duration::from_secs(n.checked_mul(3600)?),
            "d" => Duration::from_secs(n.checked_mul(86400)?),
            _ => return None,
        };
        total = total.checked_add(unit)?;
        rest = &rest[unit_len..];
    }
    Some(total)
}

fn flag(query: &Query, name: &str) -> bool {
    query
        .get(name)
        .is_some_and(|v| matches!(v.as_str(), "" | "1" | "true" | "True" | "TRUE"))
}

/// The request to send each node, from the query.
pub fn parse_query(query: &Query, now: SystemTime) -> Result<pb::GetFlowsRequest, ApiError> {
    let get = |name: &str| {
        query
            .get(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let number = |name: &str, max: u64| -> Result<u64, ApiError> {
        match get(name) {
            None => Ok(0),
            Some(v) => v.parse::<u64>().ok().filter(|n| *n <= max).ok_or_else(|| {
                ApiError::bad_request(format!("{name} {v:?} is not a number from 0 to {max}"))
            }),
        }
    };
    let since_unix_nanos = match get("since") {
        None => 0,
        Some(v) => {
            let at = match parse_duration(&v) {
                Some(d) => now.checked_sub(d).unwrap_or(UNIX_EPOCH),
                None => chrono::DateTime::parse_from_rfc3339(&v)
                    .map(SystemTime::from)
                    .map_err(|_| {
                        ApiError::bad_request(format!(
                            "since {v:?} is neither a duration (30s, 5m, 1h) nor an RFC 3339 time"
                        ))
                    })?,
            };
            at.duration_since(UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
                .unwrap_or(0)
        }
    };
    let verdict = match get("verdict").map(|v| v.to_ascii_uppercase()).as_deref() {
        None => 0,
        Some("FORWARDED") => 1,
        Some("DROPPED") => 2,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "verdict {other:?} is not FORWARDED or DROPPED"
            )));
        }
    };
    let protocol = match get("protocol").map(|v| v.to_ascii_lowercase()).as_deref() {
        None => 0,
        Some("tcp") => 6,
        Some("udp") => 17,
        Some("sctp") => 132,
        Some("icmp") => 1,
        Some(other) => other.parse::<u8>().map(u32::from).map_err(|_| {
            ApiError::bad_request(format!(
                "protocol {other:?} is not tcp, udp, sctp, icmp or a protocol number"
            ))
        })?,
    };
    let first = number("first", u64::from(u32::MAX))? as u32;
    let last = number("last", u64::from(u32::MAX))? as u32;
    if first > 0 && last > 0 {
        return Err(ApiError::bad_request("first and last exclude each other"));
    }
    Ok(pb::GetFlowsRequest {
        follow: flag(query, "follow"),
        since_unix_nanos,
        first,
        last,
        filter: Some(pb::FlowFilter {
            namespace: get("namespace").unwrap_or_default(),
            pod: get("pod").unwrap_or_default(),
            from: get("from").unwrap_or_default(),
            to: get("to").unwrap_or_default(),
            verdict,
            protocol,
            port: number("port", 65535)? as u32,
        }),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn flow(node: &str, t: i64) -> NodeEvent {
        NodeEvent::Flow(Box::new(pb::Flow {
            time_unix_nanos: t,
            node_name: node.into(),
            verdict: 1,
            ..Default::default()
        }))
    }

    fn times(lines: &[Value]) -> Vec<String> {
        lines
            .iter()
            .map(|l| {
                let o = &l["object"];
                format!(
                    "{}@{}",
                    o["node"].as_str().unwrap(),
                    o["time"].as_str().unwrap_or("")
                )
            })
            .collect()
    }

    #[test]
    fn histories_are_merged_by_time_then_live_flows_pass() {
        let mut m = Merge::new(["a".to_owned(), "b".to_owned()], 0, 0);
        assert!(m.start().is_empty());
        assert!(m.on(flow("a", 3_000_000_000)).is_empty());
        assert!(m.on(flow("a", 1_000_000_000)).is_empty());
        assert!(m.on(NodeEvent::HistoryEnd("a".into())).is_empty());
        // Node a is live already; its new flow waits for b's history.
        assert!(m.on(flow("a", 5_000_000_000)).is_empty());
        assert!(m.on(flow("b", 2_000_000_000)).is_empty());
        let out = m.on(NodeEvent::HistoryEnd("b".into()));
        assert_eq!(
            times(&out),
            [
                "a@1970-01-01T00:00:01.000000000Z",
                "b@1970-01-01T00:00:02.000000000Z",
                "a@1970-01-01T00:00:03.000000000Z",
                "a@1970-01-01T00:00:05.000000000Z",
            ]
        );
        let out = m.on(flow("b", 4_000_000_000));
        assert_eq!(times(&out), ["b@1970-01-01T00:00:04.000000000Z"]);
    }

    #[test]
    fn an_unreachable_node_is_reported_and_the_rest_continue() {
        let mut m = Merge::new(["a".to_owned(), "b".to_owned()], 0, 2);
        assert!(m.on(flow("a", 1)).is_empty());
        assert!(m.on(flow("a", 2)).is_empty());
        assert!(m.on(flow("a", 3)).is_empty());
        assert!(m.on(NodeEvent::Done("a".into())).is_empty());
        let out = m.on(NodeEvent::Error("b".into(), "node b: refused".into()));
        assert_eq!(out[0]["type"], "ERROR");
        assert_eq!(out[0]["object"]["node"], "b");
        assert_eq!(out[0]["object"]["error"], "node b: refused");
        // `last 2` over all nodes.
        assert_eq!(out.len(), 3);
        assert_eq!(out[1]["object"]["time"], "1970-01-01T00:00:00.000000002Z");
    }

    #[test]
    fn queries_are_checked() {
        let now = UNIX_EPOCH + Duration::from_secs(1000);
        let q = |pairs: &[(&str, &str)]| -> Query {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let r = parse_query(
            &q(&[
                ("follow", "true"),
                ("since", "5m"),
                ("verdict", "dropped"),
                ("protocol", "udp"),
                ("port", "53"),
                ("from", "x/a"),
            ]),
            now,
        )
        .unwrap();
        assert!(r.follow);
        assert_eq!(r.since_unix_nanos, 700 * 1_000_000_000);
        let f = r.filter.unwrap();
        assert_eq!((f.verdict, f.protocol, f.port), (2, 17, 53));
        assert_eq!(f.from, "x/a");
        for (k, v) in [
            ("since", "5x"),
            ("verdict", "MAYBE"),
            ("protocol", "tcpx"),
            ("port", "70000"),
            ("last", "-1"),
        ] {
            let e = parse_query(&q(&[(k, v)]), now).unwrap_err();
            assert!(e.to_string().contains(k), "{e}");
        }
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("m"), None);
    }
}

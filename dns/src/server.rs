//! The hickory-server side: a [`RequestHandler`] that answers from the
//! current snapshot or forwards, and the sockets it serves on.

use crate::{
    answer::{self, Outcome, ZoneSettings},
    forward::Forwarder,
    metrics::Proto,
    model::Snapshot,
};
use arc_swap::ArcSwapOption;
use hickory_server::{
    net::runtime::Time,
    proto::{
        op::{Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode},
        rr::{Record, RecordType},
    },
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponseBuilder,
};
use std::{net::SocketAddr, sync::Arc};

std::thread_local! {
    /// Set when the answer being built asked the upstream resolvers (a
    /// forwarded name or a chased ExternalName): such an answer depends
    /// on the upstream's data and TTLs, so the UDP threads must not keep
    /// it as a prepared reply (`udp::AnswerCache`). Read on the thread
    /// that polled the request first, which is where it is set.
    static UPSTREAM_USED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Clears the upstream flag before a request is polled.
pub(crate) fn reset_upstream_used() {
    UPSTREAM_USED.with(|u| u.set(false));
}

/// Whether the request polled since [`reset_upstream_used`] went upstream.
pub(crate) fn upstream_used() -> bool {
    UPSTREAM_USED.with(std::cell::Cell::get)
}

fn note_upstream() {
    UPSTREAM_USED.with(|u| u.set(true));
}

/// Largest UDP payload we send, whatever a client advertises (DNS Flag Day 2020
/// advice is ~1232 to avoid fragmentation; 4096 is the common ceiling).
const MAX_UDP_PAYLOAD: u16 = 4096;

#[derive(Debug)]
pub(crate) struct Handler {
    pub snapshot: Arc<ArcSwapOption<Snapshot>>,
    pub settings: ZoneSettings,
    pub forwarder: Forwarder,
    pub metrics: Arc<crate::metrics::Metrics>,
}

fn failed(request: &Request, rcode: ResponseCode) -> ResponseInfo {
    let mut metadata = Metadata::new(
        request.metadata.id,
        MessageType::Response,
        request.metadata.op_code,
    );
    metadata.response_code = rcode;
    ResponseInfo::from(Header {
        metadata,
        counts: HeaderCounts::default(),
    })
}

/// The handler shared by the TCP server (hickory's) and the UDP threads.
#[derive(Debug, Clone)]
pub(crate) struct SharedHandler(pub Arc<Handler>);

#[async_trait::async_trait]
impl RequestHandler for SharedHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        self.0
            .handle_request::<R, T>(request, response_handle)
            .await
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        let started = std::time::Instant::now();
        let info = self.respond(request, response_handle).await;
        let qtype = match request.queries.queries() {
            [q] => q.query_type(),
            _ => RecordType::Unknown(0),
        };
        let proto = match request.protocol() {
            hickory_server::net::xfer::Protocol::Udp => Proto::Udp,
            _ => Proto::Tcp,
        };
        let ipv6 = request.src().is_ipv6();
        self.metrics
            .query(proto, ipv6, qtype, info.response_code, started.elapsed());
        info
    }
}

impl Handler {
    async fn respond<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.recursion_available = true;
        // Echo EDNS with our own payload size; hickory truncates the reply
        // (TC) to it on UDP, or to 512 bytes when the query had no EDNS.
        let mut edns = request.edns.as_ref().map(|req| {
            let mut e = Edns::new();
            e.set_max_payload(req.max_payload().clamp(512, MAX_UDP_PAYLOAD));
            e
        });
        // RFC 6891 §6.1.3: we speak EDNS version 0 only; a higher version
        // gets BADVERS (16: its upper bits travel in the OPT record, the
        // header's rcode is 0) and our own version-0 OPT, nothing else.
        if let (Some(req), Some(e)) = (request.edns.as_ref(), edns.as_mut())
            && req.version() != 0
        {
            e.set_version(0);
            e.set_rcode_high(ResponseCode::BADVERS.high());
            let builder = MessageResponseBuilder::new(&request.queries, Some(&*e));
            let mut m = metadata;
            m.response_code = ResponseCode::BADVERS;
            return match response_handle
                .send_response(builder.build_no_records(m))
                .await
            {
                Ok(info) => info,
                Err(e) => {
                    tracing::debug!(error = %e, "sending a DNS response failed");
                    failed(request, ResponseCode::ServFail)
                }
            };
        }
        let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());

        let send_error = |rcode| {
            let mut m = metadata;
            m.response_code = rcode;
            m
        };
        let queries = request.queries.queries();
        let outcome = if request.metadata.op_code != OpCode::Query {
            Err(ResponseCode::NotImp)
        } else if queries.len() != 1 {
            Err(ResponseCode::FormErr)
        } else {
            let q = queries[0].original();
            let snap = self.snapshot.load();
            match answer::answer(snap.as_deref(), &self.settings, q.name(), q.query_type()) {
                Outcome::Answer(reply) => Ok(Some(reply)),
                Outcome::Refused => Err(ResponseCode::Refused),
                Outcome::ServFail => Err(ResponseCode::ServFail),
                Outcome::Forward => Ok(None),
            }
        };
        let result = match outcome {
            Err(rcode) => {
                response_handle
                    .send_response(builder.build_no_records(send_error(rcode)))
                    .await
            }
            Ok(Some(mut reply)) => {
                metadata.authoritative = true;
                if let Some(target) = reply.chase.take() {
                    self.chase_upstream(&mut reply, &target, queries[0].original())
                        .await;
                }
                metadata.response_code = reply.rcode;
                response_handle
                    .send_response(builder.build(
                        metadata,
                        reply.answers.iter(),
                        reply.authorities.iter(),
                        reply.soa.iter(),
                        reply.additionals.iter(),
                    ))
                    .await
            }
            Ok(None) => {
                note_upstream();
                let q = queries[0].original();
                // The snapshot guard is gone here: nothing is held across
                // the upstream round trip.
                match self
                    .forwarder
                    .resolve(q.name(), q.query_type(), q.query_class())
                    .await
                {
                    Ok((up, cached)) => {
                        self.metrics.cache(cached);
                        metadata.response_code = up.rcode;
                        // Upstream answers carry the lowercase name we asked;
                        // give the client back its own spelling.
                        let mut answers = up.answers;
                        let lower = q.name().to_lowercase();
                        for r in &mut answers {
                            if r.name == lower {
                                r.name = q.name().clone();
                            }
                        }
                        response_handle
                            .send_response(builder.build(
                                metadata,
                                answers.iter(),
                                up.authorities.iter(),
                                std::iter::empty::<&Record>(),
                                up.additionals.iter(),
                            ))
                            .await
                    }
                    Err(e) => {
                        tracing::debug!(name = %q.name(), error = %e, "forwarding failed");
                        response_handle
                            .send_response(
                                builder.build_no_records(send_error(ResponseCode::ServFail)),
                            )
                            .await
                    }
                }
            }
        };
        match result {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, "sending a DNS response failed");
                failed(request, ResponseCode::ServFail)
            }
        }
    }
}

impl Handler {
    /// An ExternalName's CNAME points outside the zone: resolve the target
    /// through the forwarder (same upstreams and cache as forwarded names)
    /// and append its records, as CoreDNS does, so clients get addresses in
    /// one round trip. The rcode becomes the target's (RFC 6604: it
    /// describes the last name of the chain). If the upstreams fail, the
    /// CNAME alone is still a correct NOERROR answer: the client's resolver
    /// may follow it itself, which beats a SERVFAIL for a name that exists.
    async fn chase_upstream(
        &self,
        reply: &mut answer::Reply,
        target: &hickory_server::proto::rr::Name,
        q: &hickory_server::proto::op::Query,
    ) {
        note_upstream();
        match self
            .forwarder
            .resolve(target, q.query_type(), q.query_class())
            .await
        {
            Ok((up, cached)) => {
                self.metrics.cache(cached);
                if !matches!(up.rcode, ResponseCode::NoError | ResponseCode::NXDomain) {
                    tracing::debug!(%target, rcode = %up.rcode, "upstream refused an ExternalName target");
                    return;
                }
                reply.rcode = up.rcode;
                let found = !up.answers.is_empty();
                reply.answers.extend(up.answers);
                if !found {
                    // The upstream's SOA explains the negative answer.
                    reply.authorities.extend(up.authorities);
                }
            }
            Err(e) => {
                tracing::debug!(%target, error = %e, "chasing an ExternalName target failed");
            }
        }
    }
}

/// The UDP sockets (blocking std sockets for [`crate::udp`]'s threads), the
/// TCP listener and the address bound.
type Bound = (
    Vec<std::net::UdpSocket>,
    tokio::net::TcpListener,
    SocketAddr,
);

/// Binds `count` UDP sockets on one address with SO_REUSEPORT (the kernel
/// spreads datagrams over them, so each core can serve its own socket) and
/// a TCP listener on the same port.
pub(crate) fn bind(addr: SocketAddr, count: usize) -> std::io::Result<Bound> {
    // Port 0: the kernel picks the TCP port, and the UDP port may then be
    // taken by someone else; pick again a few times.
    let attempts = if addr.port() == 0 { 20 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        match bind_once(addr, count) {
            Ok(r) => return Ok(r),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::from(std::io::ErrorKind::AddrInUse)))
}

fn bind_once(addr: SocketAddr, count: usize) -> std::io::Result<Bound> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = Domain::for_address(addr);
    // TCP first, without SO_REUSEPORT: owning the TCP port keeps another
    // skep DNS (which binds the same way) off this port's UDP sockets.
    let t = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    t.set_reuse_address(true)?;
    t.set_nonblocking(true)?;
    t.bind(&addr.into())?;
    t.listen(1024)?;
    let addr = t.local_addr()?.as_socket().unwrap_or(addr);
    let tcp = tokio::net::TcpListener::from_std(t.into())?;
    let mut udp = Vec::with_capacity(count.max(1));
    for _ in 0..count.max(1) {
        let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
        s.set_reuse_port(true)?;
        // Bursts (many clients behind one node, a busy CPU) must queue in
        // the kernel rather than be dropped; the default (~200 KiB) holds
        // only a few thousand small queries. The kernel caps this at
        // net.core.rmem_max, which is fine.
        let _ = s.set_recv_buffer_size(4 << 20);
        let _ = s.set_send_buffer_size(4 << 20);
        s.bind(&addr.into())?;
        udp.push(s.into());
    }
    Ok((udp, tcp, addr))
}

//! The UDP side, on plain OS threads instead of hickory's UDP loop: one
//! thread per SO_REUSEPORT socket does blocking receive → answer → send.
//!
//! Why: hickory spawns a Tokio task per datagram, so each query costs a
//! task allocation, cross-thread wake-ups and an epoll round; profiles under
//! dnsperf showed the scheduler and wake-ups, not the answer, dominating,
//! and at a fixed 20k queries/s skep's p99 was several times unbound's. A
//! query the snapshot answers needs no I/O, so it is answered inline: the
//! request future is polled once and is ready. One that needs the network
//! (forwarding, chasing an ExternalName) is not ready after that first poll
//! and moves to the Tokio runtime to finish, so a slow upstream never
//! blocks a socket's thread.

use crate::{
    metrics::Proto,
    model::Snapshot,
    server::{self, SharedHandler},
};
use arc_swap::ArcSwapOption;
use hickory_server::{
    net::{NetError, runtime::TokioTime, xfer::Protocol},
    proto::{
        op::ResponseCode,
        rr::{Record, RecordType},
        serialize::binary::BinEncoder,
    },
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponse,
};
use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    future::Future,
    net::{SocketAddr, UdpSocket},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Waker},
    time::{Duration, Instant},
};

/// How often a blocked receive wakes up to notice a shutdown.
const STOP_CHECK: Duration = Duration::from_millis(200);

/// Prepared replies a UDP thread keeps (see [`AnswerCache`]).
const CACHE_ENTRIES: usize = 16_384;

std::thread_local! {
    /// True while a UDP thread polls a request for the first time: the
    /// reply encoded then is kept here for [`AnswerCache`]. Replies sent
    /// later, from Tokio's threads, see it false and are not kept.
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
    static CAPTURED: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// A reply ready to send again: the whole message but its ID.
struct Prepared {
    reply: Box<[u8]>,
    qtype: RecordType,
    rcode: ResponseCode,
}

/// The answers a UDP thread has already built, by the query's bytes after
/// its ID. Cluster answers depend only on the question, the EDNS the query
/// carries (both inside those bytes) and the snapshot: so an identical
/// query gets the identical reply with its own ID patched in, without
/// parsing, answering or encoding again — what makes repeated names (the
/// common case: every pod asks for the same services) cost two syscalls
/// and a hash lookup. Entries live as long as the snapshot they came from
/// (a new snapshot empties the cache) and never hold what the upstream
/// resolvers said (their TTLs run; `server::upstream_used`). Per thread,
/// so no locks; bounded, emptied when full.
#[derive(Default)]
struct AnswerCache {
    /// The snapshot the entries were answered from, held so that its
    /// address cannot be reused by a newer one while we compare.
    snapshot: Option<Arc<Snapshot>>,
    entries: HashMap<Box<[u8]>, Prepared, foldhash::fast::RandomState>,
}

impl AnswerCache {
    /// Empties the cache when the snapshot changed since it was filled.
    fn follow(&mut self, current: &ArcSwapOption<Snapshot>) {
        let now = current.load();
        let same = match (now.as_ref(), self.snapshot.as_ref()) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if !same {
            self.entries.clear();
            self.snapshot = now.clone();
        }
    }

    fn get(&self, query: &[u8]) -> Option<&Prepared> {
        self.entries.get(query.get(2..)?)
    }

    fn insert(&mut self, query: &[u8], prepared: Prepared) {
        let Some(key) = query.get(2..) else { return };
        if self.entries.len() >= CACHE_ENTRIES {
            self.entries.clear();
        }
        self.entries.insert(key.into(), prepared);
    }
}

/// Sends one encoded reply to the query's source (blocking send: on a
/// local UDP socket with a 4 MiB buffer it does not wait).
#[derive(Clone)]
struct Reply {
    socket: Arc<UdpSocket>,
    dst: SocketAddr,
}

#[async_trait::async_trait]
impl ResponseHandler for Reply {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        // Without EDNS a UDP reply holds 512 bytes (RFC 1035 §4.2.1); with
        // it, the payload size the handler put in the reply's OPT. Records
        // that do not fit are dropped and TC set by the encoder.
        let max = response.edns().map_or(512, |e| e.max_payload().max(512));
        let mut bytes = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut bytes);
        encoder.set_max_size(max);
        let info = response.destructive_emit(&mut encoder)?;
        self.socket.send_to(&bytes, self.dst)?;
        if CAPTURING.with(Cell::get) {
            CAPTURED.with(|c| *c.borrow_mut() = Some(bytes));
        }
        Ok(info)
    }
}

/// Stops the threads when dropped.
#[derive(Debug)]
pub(crate) struct UdpThreads {
    stop: Arc<AtomicBool>,
}

impl Drop for UdpThreads {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Starts one serving thread per socket. Must be called inside a Tokio
/// runtime (queries that need the network finish there).
pub(crate) fn spawn(
    sockets: Vec<UdpSocket>,
    handler: SharedHandler,
) -> std::io::Result<UdpThreads> {
    let stop = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Handle::current();
    for (i, socket) in sockets.into_iter().enumerate() {
        socket.set_nonblocking(false)?;
        socket.set_read_timeout(Some(STOP_CHECK))?;
        let (handler, stop, rt) = (handler.clone(), stop.clone(), rt.clone());
        std::thread::Builder::new()
            .name(format!("dns-udp-{i}"))
            .spawn(move || serve(Arc::new(socket), handler, &stop, &rt))?;
    }
    Ok(UdpThreads { stop })
}

fn serve(
    socket: Arc<UdpSocket>,
    handler: SharedHandler,
    stop: &AtomicBool,
    rt: &tokio::runtime::Handle,
) {
    // Forwarding creates Tokio sockets and timers on its first poll.
    let _in_runtime = rt.enter();
    let mut buf = vec![0u8; 4096];
    let mut out = Vec::with_capacity(512);
    let mut cx = Context::from_waker(Waker::noop());
    let mut cache = AnswerCache::default();
    let snapshots = handler.0.snapshot.clone();
    let metrics = handler.0.metrics.clone();
    while !stop.load(Ordering::Relaxed) {
        let (n, src) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(e) => {
                // ICMP errors from earlier sends surface here; the socket
                // is still usable.
                tracing::debug!(error = %e, "receiving a DNS query failed");
                continue;
            }
        };
        if !answerable(src) {
            // Spoofed or broken sources: a reply would go nowhere or to
            // everyone.
            continue;
        }
        let datagram = &buf[..n];
        let started = Instant::now();
        cache.follow(&snapshots);
        if let Some(p) = cache.get(datagram) {
            out.clear();
            out.extend_from_slice(&p.reply);
            out[..2].copy_from_slice(&datagram[..2]);
            if let Err(e) = socket.send_to(&out, src) {
                tracing::debug!(%src, error = %e, "sending a DNS reply failed");
            }
            metrics.query(
                Proto::Udp,
                src.is_ipv6(),
                p.qtype,
                p.rcode,
                started.elapsed(),
            );
            continue;
        }
        let request = match Request::from_bytes(datagram.to_vec(), src, Protocol::Udp) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%src, error = %e, "malformed DNS query");
                if let Some(reply) = format_error(datagram) {
                    let _ = socket.send_to(&reply, src);
                }
                continue;
            }
        };
        if request.metadata.message_type == hickory_server::proto::op::MessageType::Response {
            // Never answer responses (reflection loops).
            continue;
        }
        let qtype = match request.queries.queries() {
            [q] => Some(q.query_type()),
            _ => None,
        };
        let reply = Reply {
            socket: socket.clone(),
            dst: src,
        };
        let handler = handler.clone();
        let mut fut: Pin<Box<dyn Future<Output = ResponseInfo> + Send>> = Box::pin(async move {
            // The inner handler directly: one boxed future less.
            handler
                .0
                .handle_request::<Reply, TokioTime>(&request, reply)
                .await
        });
        server::reset_upstream_used();
        CAPTURING.with(|c| c.set(true));
        let polled = fut.as_mut().poll(&mut cx);
        CAPTURING.with(|c| c.set(false));
        let sent = CAPTURED.with(|c| c.borrow_mut().take());
        match polled {
            std::task::Poll::Pending => {
                // Network I/O ahead: Tokio re-polls it with a real waker.
                rt.spawn(fut);
            }
            std::task::Poll::Ready(info) => {
                let rcode = info.response_code;
                let keep = matches!(rcode, ResponseCode::NoError | ResponseCode::NXDomain)
                    && !server::upstream_used();
                if let (true, Some(reply), Some(qtype)) = (keep, sent, qtype)
                    && reply.len() >= 12
                {
                    cache.insert(
                        datagram,
                        Prepared {
                            reply: reply.into_boxed_slice(),
                            qtype,
                            rcode,
                        },
                    );
                }
            }
        }
    }
}

fn answerable(src: SocketAddr) -> bool {
    src.port() != 0
        && !src.ip().is_unspecified()
        && !src.ip().is_multicast()
        && src.ip() != std::net::Ipv4Addr::BROADCAST
}

/// FORMERR for a datagram that does not parse, when its header does (as
/// hickory's server does); a datagram shorter than a header, or itself a
/// response, gets nothing.
fn format_error(datagram: &[u8]) -> Option<Vec<u8>> {
    let header = datagram.get(..12)?;
    if header[2] & 0x80 != 0 {
        return None;
    }
    let mut reply = header.to_vec();
    // QR=1, keep opcode and RD; AA/TC/RA=0, rcode 1; no sections.
    reply[2] = 0x80 | (header[2] & 0x79);
    reply[3] = 0x01;
    reply[4..12].fill(0);
    Some(reply)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::{answerable, format_error};

    #[test]
    fn replies_only_to_real_sources() {
        assert!(answerable("127.0.0.1:5353".parse().unwrap()));
        assert!(!answerable("127.0.0.1:0".parse().unwrap()));
        assert!(!answerable("0.0.0.0:53".parse().unwrap()));
        assert!(!answerable("255.255.255.255:53".parse().unwrap()));
        assert!(!answerable("[ff02::1]:53".parse().unwrap()));
    }

    #[test]
    fn format_error_echoes_id_and_opcode() {
        let q = [0xab, 0xcd, 0x01, 0x20, 0, 1, 0, 0, 0, 0, 0, 1, 0xff];
        let r = format_error(&q).unwrap();
        assert_eq!(r, [0xab, 0xcd, 0x81, 0x01, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(format_error(&q[..11]).is_none());
        let mut resp = q;
        resp[2] |= 0x80;
        assert!(format_error(&resp).is_none());
    }
}

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

use crate::server::SharedHandler;
use hickory_server::{
    net::{NetError, runtime::TokioTime, xfer::Protocol},
    proto::{rr::Record, serialize::binary::BinEncoder},
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponse,
};
use std::{
    future::Future,
    net::{SocketAddr, UdpSocket},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Waker},
    time::Duration,
};

/// How often a blocked receive wakes up to notice a shutdown.
const STOP_CHECK: Duration = Duration::from_millis(200);

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
    let mut cx = Context::from_waker(Waker::noop());
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
        if fut.as_mut().poll(&mut cx).is_pending() {
            // Network I/O ahead: Tokio re-polls it with a real waker.
            rt.spawn(fut);
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

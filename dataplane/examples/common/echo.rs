//! The benchmarks' echo server and closed-loop client (lb_bench,
//! policy_bench): what they measure is the path between two pods, so the
//! server is as cheap as a server gets. The tests' echo server spawns a
//! thread per connection, formats each reply and its client reads byte by
//! byte; at ~20 µs per thread start that hid the datapath's cost (about
//! 1,500 connections/s on every path, rates swinging 3× between runs).

use crate::harness::{self, Topology};
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

/// A lean echo server (one connection at a time, as the client makes
/// them): the harness's server spawns a thread per connection, whose cost
/// would hide the datapath's. Stops on drop.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    wake: std::os::fd::RawFd,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(pod: &harness::Pod, port: u16) -> Self {
        let listener = pod
            .ns
            .run(|| TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)))
            .unwrap()
            .expect("bind the echo server");
        let wake = listener.as_raw_fd();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => echo_until_closed(conn, &s),
                    Err(_) if s.load(Ordering::Relaxed) => break,
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        Self {
            stop,
            wake,
            handle: Some(handle),
        }
    }
}

fn echo_until_closed(mut conn: TcpStream, stop: &AtomicBool) {
    let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::Relaxed) {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return,
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // SAFETY: the listener lives in the accept thread until it is
        // joined below; shutdown(2) only wakes its accept().
        unsafe { libc::shutdown(self.wake, libc::SHUT_RDWR) };
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// One request/response: a short line, echoed.
pub fn echo(conn: &mut TcpStream) -> std::io::Result<()> {
    const REQ: &[u8] = b"ping\n";
    conn.write_all(REQ)?;
    let mut buf = [0u8; REQ.len()];
    conn.read_exact(&mut buf)?;
    assert_eq!(buf, REQ, "echo mismatch");
    Ok(())
}

#[derive(Clone, Copy)]
pub struct Rates {
    pub conn_rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub rr_rate: f64,
}

pub fn measure(topo: &Topology, target: SocketAddrV4, secs: f64) -> Rates {
    let client = &topo.pods[0];
    client_room(topo);
    // Warm up (neighbours, caches) and check the pair is allowed.
    for _ in 0..50 {
        let mut c = client
            .connect(target)
            .expect("the probed pair must be allowed");
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        echo(&mut c).unwrap();
    }
    let max_conns = (secs * 200_000.0) as usize;
    let (lat, elapsed) = client
        .ns
        .run(|| {
            let mut lat = Vec::with_capacity(max_conns.min(1 << 20));
            let start = Instant::now();
            while start.elapsed().as_secs_f64() < secs && lat.len() < max_conns {
                let t = Instant::now();
                let mut c = TcpStream::connect(target).unwrap();
                echo(&mut c).unwrap();
                drop(c);
                lat.push(t.elapsed());
            }
            (lat, start.elapsed())
        })
        .unwrap();
    let mut sorted = lat.clone();
    sorted.sort();
    let pct = |p: f64| sorted[((sorted.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
    let mut c = client.connect(target).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs && n < max_conns as u64 * 10 {
        echo(&mut c).unwrap();
        n += 1;
    }
    Rates {
        conn_rate: lat.len() as f64 / elapsed.as_secs_f64(),
        p50_us: pct(0.5),
        p99_us: pct(0.99),
        rr_rate: n as f64 / start.elapsed().as_secs_f64(),
    }
}

/// Room in the client's namespace for the TIME_WAITs of tens of thousands
/// of short connections (the client closes first; these sysctls are the
/// namespace's own, so writing them again is harmless).
fn client_room(topo: &Topology) {
    topo.pods[0]
        .ns
        .run(|| {
            for (key, value) in [
                ("net/ipv4/tcp_tw_reuse", "1"),
                ("net/ipv4/ip_local_port_range", "1024 65000"),
            ] {
                std::fs::write(format!("/proc/sys/{key}"), value)
                    .unwrap_or_else(|e| panic!("sysctl {key} in the client pod: {e}"));
            }
        })
        .unwrap();
}

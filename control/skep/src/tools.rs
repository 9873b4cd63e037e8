//! `skep tools`: the built-in test workload (skep's agnhost).
//!
//! * `serve --tcp PORTS --udp PORTS --http PORTS`: echo servers that answer
//!   with the host name (the pod's name inside a pod), so a client sees
//!   which backend answered.
//! * `probe tcp|udp|http HOST:PORT [--timeout 2s]`: exit 0 when the peer
//!   answered (printing the answer), 1 otherwise (printing what happened).
//!
//! Plain threads and std sockets: it must start in milliseconds and stay
//! tiny in every pod.

use anyhow::{Context, Result, bail};
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket},
    time::Duration,
};

#[derive(Debug, clap::Subcommand)]
pub enum Tools {
    /// Echo servers answering with the host name.
    Serve(ServeArgs),
    /// Connect to a server and report whether it answered.
    Probe(ProbeArgs),
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// TCP ports (comma separated): the answer is the host name, then every
    /// line received is echoed back.
    #[arg(long, value_delimiter = ',')]
    tcp: Vec<u16>,
    /// UDP ports: every datagram is answered with the host name.
    #[arg(long, value_delimiter = ',')]
    udp: Vec<u16>,
    /// HTTP ports: every request is answered 200 with the host name.
    #[arg(long, value_delimiter = ',')]
    http: Vec<u16>,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    bind: std::net::IpAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Proto {
    Tcp,
    Udp,
    Http,
}

#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    proto: Proto,
    /// HOST:PORT
    target: String,
    /// How long to wait for the answer (e.g. 500ms, 2s).
    #[arg(long, default_value = "2s", value_parser = parse_timeout)]
    timeout: Duration,
    /// Attempts before giving up (one per timeout, 500 ms apart).
    #[arg(long, default_value_t = 1)]
    tries: u32,
    /// Succeed when the peer does NOT answer (checks that a policy denies);
    /// the name must still resolve.
    #[arg(long)]
    expect_fail: bool,
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms or 2s"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        _ => Err(format!("{s:?}: use ms or s")),
    }
}

fn hostname() -> String {
    nix_hostname().unwrap_or_else(|| "unknown".into())
}

fn nix_hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: buf is valid for its length; gethostname NUL-terminates
    // within it on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..end]).into_owned())
}

pub fn run(tools: Tools) -> Result<()> {
    match tools {
        Tools::Serve(args) => serve(args),
        Tools::Probe(args) => {
            if args.expect_fail {
                // A name that does not resolve is a failure of the check,
                // not a denial.
                resolve(&args.target)?;
            }
            let mut answered = false;
            for attempt in 0..args.tries.max(1) {
                if attempt > 0 {
                    std::thread::sleep(Duration::from_millis(500));
                }
                answered = probe(&args)?;
                if answered {
                    break;
                }
            }
            if answered == args.expect_fail {
                if args.expect_fail {
                    println!(
                        "FAIL {:?} {}: answered, expected no answer",
                        args.proto, args.target
                    );
                }
                std::process::exit(1);
            }
            if args.expect_fail {
                println!(
                    "OK {:?} {}: no answer, as expected",
                    args.proto, args.target
                );
            }
            Ok(())
        }
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    if args.tcp.is_empty() && args.udp.is_empty() && args.http.is_empty() {
        bail!("nothing to serve: give at least one of --tcp, --udp, --http");
    }
    let name = hostname();
    let mut threads = Vec::new();
    for port in args.tcp {
        let l = TcpListener::bind((args.bind, port))
            .with_context(|| format!("binding tcp port {port}"))?;
        let name = name.clone();
        threads.push(std::thread::spawn(move || accept_loop(l, name, false)));
    }
    for port in args.http {
        let l = TcpListener::bind((args.bind, port))
            .with_context(|| format!("binding http port {port}"))?;
        let name = name.clone();
        threads.push(std::thread::spawn(move || accept_loop(l, name, true)));
    }
    for port in args.udp {
        let s = UdpSocket::bind((args.bind, port))
            .with_context(|| format!("binding udp port {port}"))?;
        let name = name.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            loop {
                match s.recv_from(&mut buf) {
                    Ok((_, peer)) => {
                        let _ = s.send_to(format!("{name}\n").as_bytes(), peer);
                    }
                    Err(e) => tracing::warn!(error = %e, "udp receive failed"),
                }
            }
        }));
    }
    tracing::info!(host = %name, "serving");
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn accept_loop(listener: TcpListener, name: String, http: bool) {
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let name = name.clone();
        std::thread::spawn(move || {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
            let result = if http {
                answer_http(stream, &name)
            } else {
                answer_tcp(stream, &name)
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended");
            }
        });
    }
}

fn answer_tcp(mut stream: TcpStream, name: &str) -> std::io::Result<()> {
    stream.write_all(format!("{name}\n").as_bytes())?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    while reader.read_line(&mut line)? > 0 {
        stream.write_all(line.as_bytes())?;
        line.clear();
    }
    Ok(())
}

fn answer_http(stream: TcpStream, name: &str) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        // Request line and headers; the body (if any) is skipped by length.
        let mut length = 0usize;
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let keep_alive = !line.contains("HTTP/1.0");
        let mut close = !keep_alive;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
                break;
            }
            let lower = h.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            if lower.starts_with("connection:") && lower.contains("close") {
                close = true;
            }
        }
        let mut body = vec![0u8; length.min(1 << 20)];
        reader.read_exact(&mut body)?;
        let payload = format!("{name}\n");
        // One write per response: `write!` on the stream would send each
        // piece as its own segment, and on a keep-alive connection Nagle
        // plus the client's delayed ACK stalls the tail ~40 ms.
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{payload}",
            payload.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        writer.write_all(response.as_bytes())?;
        if close {
            return Ok(());
        }
    }
}

fn resolve(target: &str) -> Result<SocketAddr> {
    target
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {target:?} (HOST:PORT)"))?
        .next()
        .with_context(|| format!("{target:?} resolved to no address"))
}

/// Returns whether the peer answered; prints the answer or the failure.
fn probe(args: &ProbeArgs) -> Result<bool> {
    let addr = match resolve(&args.target) {
        Ok(a) => a,
        Err(e) => {
            println!("FAIL {:?} {}: {e:#}", args.proto, args.target);
            return Ok(false);
        }
    };
    let outcome: std::io::Result<String> = (|| match args.proto {
        Proto::Tcp => {
            let mut s = TcpStream::connect_timeout(&addr, args.timeout)?;
            s.set_read_timeout(Some(args.timeout))?;
            let mut line = String::new();
            BufReader::new(&mut s).read_line(&mut line)?;
            Ok(line)
        }
        Proto::Udp => {
            let local: SocketAddr = if addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            }
            .parse()
            .map_err(std::io::Error::other)?;
            let s = UdpSocket::bind(local)?;
            s.set_read_timeout(Some(args.timeout))?;
            s.connect(addr)?;
            s.send(b"probe\n")?;
            let mut buf = [0u8; 2048];
            let n = s.recv(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        }
        Proto::Http => {
            let mut s = TcpStream::connect_timeout(&addr, args.timeout)?;
            s.set_read_timeout(Some(args.timeout))?;
            write!(
                s,
                "GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                args.target
            )?;
            let mut resp = String::new();
            s.read_to_string(&mut resp)?;
            let status = resp.lines().next().unwrap_or("").to_owned();
            if !status.contains(" 200 ") {
                return Err(std::io::Error::other(format!("HTTP status {status:?}")));
            }
            Ok(resp.split("\r\n\r\n").nth(1).unwrap_or("").to_owned())
        }
    })();
    match outcome {
        Ok(answer) if !answer.is_empty() => {
            println!(
                "OK {:?} {} answered by {}",
                args.proto,
                args.target,
                answer.trim()
            );
            Ok(true)
        }
        Ok(_) => {
            println!(
                "FAIL {:?} {}: connected but got no answer",
                args.proto, args.target
            );
            Ok(false)
        }
        Err(e) => {
            println!("FAIL {:?} {}: {e}", args.proto, args.target);
            Ok(false)
        }
    }
}

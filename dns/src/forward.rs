//! Forwarding of names outside the cluster to the upstream resolvers, with a
//! positive and negative cache. The cache lock is held only to read or
//! insert an entry, never across network I/O.

use hickory_server::proto::{
    op::{Edns, Message, Query, ResponseCode},
    rr::{DNSClass, Name, Record, RecordType},
};
use std::{
    collections::HashMap,
    net::SocketAddr,
    path::Path,
    sync::Mutex,
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream DNS servers are configured (none found in resolv.conf)")]
    NoUpstreams,
    #[error("every upstream failed; last error: {0}")]
    Upstreams(String),
}

/// Cache and upstream settings.
#[derive(Debug, Clone)]
pub struct ForwardConfig {
    pub upstreams: Vec<SocketAddr>,
    /// Per-upstream attempt timeout.
    pub timeout: Duration,
    /// Cap on how long a positive answer is cached.
    pub max_ttl: Duration,
    /// How long NXDOMAIN/NODATA is cached at most (the SOA minimum when lower).
    pub negative_ttl: Duration,
    /// Entries kept at most; beyond, the cache is emptied (cheap, rare).
    pub cache_entries: usize,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        Self {
            upstreams: Vec::new(),
            timeout: Duration::from_secs(2),
            max_ttl: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(30),
            cache_entries: 100_000,
        }
    }
}

/// Upstream nameservers of a resolv.conf (port 53).
pub fn upstreams_from_resolv_conf(path: &Path) -> std::io::Result<Vec<SocketAddr>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "nameserver").then_some(())?;
            let ip: std::net::IpAddr = w.next()?.split('%').next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect())
}

/// An upstream answer, as cached.
#[derive(Debug, Clone)]
pub(crate) struct Upstream {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
}

#[derive(Debug)]
struct Entry {
    value: Upstream,
    stored: Instant,
    expires: Instant,
}

type Key = (String, RecordType, DNSClass);

#[derive(Debug)]
pub(crate) struct Forwarder {
    config: ForwardConfig,
    cache: Mutex<HashMap<Key, Entry>>,
}

impl Forwarder {
    pub fn new(config: ForwardConfig) -> Self {
        Self {
            config,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, key: &Key) -> Option<Upstream> {
        let cache = self.cache.lock().ok()?;
        let e = cache.get(key)?;
        let now = Instant::now();
        if now >= e.expires {
            return None;
        }
        // Count the TTLs down so clients do not cache past our expiry.
        let age = u32::try_from(now.duration_since(e.stored).as_secs()).unwrap_or(u32::MAX);
        let mut v = e.value.clone();
        for r in v
            .answers
            .iter_mut()
            .chain(v.authorities.iter_mut())
            .chain(v.additionals.iter_mut())
        {
            r.ttl = r.ttl.saturating_sub(age);
        }
        Some(v)
    }

    fn store(&self, key: Key, value: &Upstream) {
        let ttl = if value.rcode == ResponseCode::NoError && !value.answers.is_empty() {
            let min = value.answers.iter().map(|r| r.ttl).min().unwrap_or(0);
            Duration::from_secs(min.into()).min(self.config.max_ttl)
        } else if matches!(value.rcode, ResponseCode::NoError | ResponseCode::NXDomain) {
            // RFC 2308: the negative TTL is the SOA's minimum (bounded by its TTL).
            let soa = value.authorities.iter().find_map(|r| match &r.data {
                hickory_server::proto::rr::RData::SOA(soa) => Some(soa.minimum.min(r.ttl)),
                _ => None,
            });
            soa.map(|s| Duration::from_secs(s.into()))
                .unwrap_or(self.config.negative_ttl)
                .min(self.config.negative_ttl)
        } else {
            // SERVFAIL and friends are not cached.
            return;
        };
        if ttl.is_zero() {
            return;
        }
        let Ok(mut cache) = self.cache.lock() else {
            return;
        };
        if cache.len() >= self.config.cache_entries {
            cache.clear();
        }
        let now = Instant::now();
        cache.insert(
            key,
            Entry {
                value: value.clone(),
                stored: now,
                expires: now + ttl,
            },
        );
    }

    /// The upstreams' answer to `name`/`qtype`, from the cache when fresh.
    /// Returns whether it came from the cache.
    pub async fn resolve(
        &self,
        name: &Name,
        qtype: RecordType,
        qclass: DNSClass,
    ) -> Result<(Upstream, bool), ForwardError> {
        let lower = name.to_lowercase();
        let key = (lower.to_ascii(), qtype, qclass);
        if let Some(hit) = self.cached(&key) {
            return Ok((hit, true));
        }
        if self.config.upstreams.is_empty() {
            return Err(ForwardError::NoUpstreams);
        }
        let mut query = Query::query(lower, qtype);
        query.set_query_class(qclass);
        let mut last = String::new();
        for up in &self.config.upstreams {
            match self.ask(*up, &query).await {
                Ok(msg) => {
                    let value = Upstream {
                        rcode: msg.metadata.response_code,
                        answers: msg.answers,
                        authorities: msg.authorities,
                        additionals: msg
                            .additionals
                            .into_iter()
                            .filter(|r| r.record_type() != RecordType::OPT)
                            .collect(),
                    };
                    self.store(key, &value);
                    return Ok((value, false));
                }
                Err(e) => {
                    tracing::debug!(upstream = %up, error = %e, "upstream DNS query failed");
                    last = format!("{up}: {e}");
                }
            }
        }
        Err(ForwardError::Upstreams(last))
    }

    async fn ask(&self, upstream: SocketAddr, query: &Query) -> std::io::Result<Message> {
        let mut msg = Message::query();
        msg.metadata.recursion_desired = true;
        msg.add_query(query.clone());
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        msg.set_edns(edns);
        let id = msg.metadata.id;
        let bytes = msg.to_vec().map_err(std::io::Error::other)?;
        let bind: SocketAddr = if upstream.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = UdpSocket::bind(bind).await?;
        sock.connect(upstream).await?;
        sock.send(&bytes).await?;
        let mut buf = vec![0u8; 4096];
        let reply = tokio::time::timeout(self.config.timeout, async {
            loop {
                let n = sock.recv(&mut buf).await?;
                // A connected socket only hears from the upstream; still skip
                // stray datagrams that are not our answer.
                if let Ok(m) = Message::from_vec(&buf[..n])
                    && m.metadata.id == id
                {
                    return Ok::<_, std::io::Error>(m);
                }
            }
        })
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
        if !reply.metadata.truncation {
            return Ok(reply);
        }
        // Too big for UDP: ask again over TCP.
        tokio::time::timeout(self.config.timeout, async {
            let mut tcp = TcpStream::connect(upstream).await?;
            let len = u16::try_from(bytes.len()).map_err(std::io::Error::other)?;
            tcp.write_all(&len.to_be_bytes()).await?;
            tcp.write_all(&bytes).await?;
            let n = tcp.read_u16().await?;
            let mut buf = vec![0u8; n.into()];
            tcp.read_exact(&mut buf).await?;
            Message::from_vec(&buf).map_err(std::io::Error::other)
        })
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer over TCP"))?
    }
}

//! The filters of a flow request ([`proto::FlowFilter`]), checked once
//! when the request arrives and then matched against every flow.

use super::proto;
use std::net::Ipv4Addr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error(
        "{field} {value:?} is not NAMESPACE/POD, POD, an IPv4 address, a CIDR (10.42.0.0/16) or a label (key=value)"
    )]
    BadPeer { field: &'static str, value: String },
    #[error("pod {0:?} is not NAME or NAMESPACE/NAME")]
    BadPod(String),
    #[error("unknown verdict {0}")]
    BadVerdict(i32),
}

/// One side of a flow, as `--from`/`--to` name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A pod in a namespace, or by name in any namespace.
    Pod {
        namespace: Option<String>,
        name: String,
    },
    Ip(Ipv4Addr),
    Cidr {
        addr: u32,
        mask: u32,
    },
    /// `key=value` among the endpoint's identity labels (with or without
    /// a source prefix like `k8s:`).
    Label(String),
}

impl Peer {
    /// Parses `NS/POD`, `POD`, an IPv4 address, a CIDR or `key=value`.
    /// `field` names the option in errors.
    pub fn parse(field: &'static str, s: &str) -> Result<Self, FilterError> {
        let bad = || FilterError::BadPeer {
            field,
            value: s.to_owned(),
        };
        let s = s.trim();
        if s.is_empty() {
            return Err(bad());
        }
        if s.contains('=') {
            let (k, v) = s.split_once('=').ok_or_else(bad)?;
            if k.is_empty() || v.contains('=') {
                return Err(bad());
            }
            return Ok(Peer::Label(s.to_owned()));
        }
        if let Ok(ip) = s.parse::<Ipv4Addr>() {
            return Ok(Peer::Ip(ip));
        }
        if let Some((left, right)) = s.split_once('/') {
            if let Ok(ip) = left.parse::<Ipv4Addr>() {
                let len: u32 = right.parse().ok().filter(|l| *l <= 32).ok_or_else(bad)?;
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                return Ok(Peer::Cidr {
                    addr: u32::from(ip) & mask,
                    mask,
                });
            }
            if !name_ok(left) || !name_ok(right) {
                return Err(bad());
            }
            return Ok(Peer::Pod {
                namespace: Some(left.to_owned()),
                name: right.to_owned(),
            });
        }
        if !name_ok(s) {
            return Err(bad());
        }
        Ok(Peer::Pod {
            namespace: None,
            name: s.to_owned(),
        })
    }

    fn matches(&self, e: &proto::Endpoint, default_ns: Option<&str>) -> bool {
        match self {
            Peer::Pod { namespace, name } => {
                let ns = namespace.as_deref().or(default_ns);
                e.pod == *name && ns.is_none_or(|ns| e.namespace == ns)
            }
            Peer::Ip(ip) => e.ip.parse::<Ipv4Addr>().is_ok_and(|a| a == *ip),
            Peer::Cidr { addr, mask } => {
                e.ip.parse::<Ipv4Addr>()
                    .is_ok_and(|a| u32::from(a) & mask == *addr)
            }
            Peer::Label(l) => e
                .labels
                .iter()
                .any(|x| x == l || x.rsplit_once(':').is_some_and(|(_, kv)| kv == l)),
        }
    }
}

/// A DNS-1123-ish name: what a namespace or pod name may be.
fn name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
}

/// A request's filter, parsed.
#[derive(Debug, Clone, Default)]
pub struct FlowFilter {
    namespace: Option<String>,
    pod: Option<Peer>,
    from: Option<Peer>,
    to: Option<Peer>,
    verdict: Option<proto::Verdict>,
    protocol: Option<u32>,
    port: Option<u32>,
}

fn non_empty(s: &str) -> Option<&str> {
    let s = s.trim();
    (!s.is_empty()).then_some(s)
}

impl FlowFilter {
    pub fn parse(f: &proto::FlowFilter) -> Result<Self, FilterError> {
        let pod = match non_empty(&f.pod) {
            None => None,
            Some(p) => match Peer::parse("pod", p) {
                Ok(peer @ Peer::Pod { .. }) => Some(peer),
                _ => return Err(FilterError::BadPod(p.to_owned())),
            },
        };
        let verdict = match proto::Verdict::try_from(f.verdict) {
            Ok(proto::Verdict::Unspecified) => None,
            Ok(v) => Some(v),
            Err(_) => return Err(FilterError::BadVerdict(f.verdict)),
        };
        Ok(Self {
            namespace: non_empty(&f.namespace).map(str::to_owned),
            pod,
            from: non_empty(&f.from)
                .map(|s| Peer::parse("from", s))
                .transpose()?,
            to: non_empty(&f.to).map(|s| Peer::parse("to", s)).transpose()?,
            verdict,
            protocol: (f.protocol != 0).then_some(f.protocol),
            port: (f.port != 0).then_some(f.port),
        })
    }

    pub fn matches(&self, flow: &proto::Flow) -> bool {
        let empty = proto::Endpoint::default();
        let src = flow.source.as_ref().unwrap_or(&empty);
        let dst = flow.destination.as_ref().unwrap_or(&empty);
        let ns = self.namespace.as_deref();
        if let Some(ns) = ns
            && src.namespace != ns
            && dst.namespace != ns
        {
            return false;
        }
        if let Some(pod) = &self.pod
            && !pod.matches(src, ns)
            && !pod.matches(dst, ns)
        {
            return false;
        }
        if let Some(from) = &self.from
            && !from.matches(src, ns)
        {
            return false;
        }
        if let Some(to) = &self.to
            && !to.matches(dst, ns)
        {
            return false;
        }
        if let Some(v) = self.verdict
            && flow.verdict != v as i32
        {
            return false;
        }
        if let Some(p) = self.protocol
            && flow.protocol != p
        {
            return false;
        }
        if let Some(port) = self.port
            && src.port != port
            && dst.port != port
        {
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn peers_parse_in_every_form() {
        assert_eq!(
            Peer::parse("from", "x/a").unwrap(),
            Peer::Pod {
                namespace: Some("x".into()),
                name: "a".into()
            }
        );
        assert_eq!(
            Peer::parse("from", "a").unwrap(),
            Peer::Pod {
                namespace: None,
                name: "a".into()
            }
        );
        assert_eq!(
            Peer::parse("to", "10.42.1.7").unwrap(),
            Peer::Ip("10.42.1.7".parse().unwrap())
        );
        assert_eq!(
            Peer::parse("to", "10.42.1.7/16").unwrap(),
            Peer::Cidr {
                addr: u32::from(Ipv4Addr::new(10, 42, 0, 0)),
                mask: 0xffff_0000
            }
        );
        assert_eq!(
            Peer::parse("to", "app=web").unwrap(),
            Peer::Label("app=web".into())
        );
        for bad in ["", "10.0.0.0/40", "a/b/c", "=x", "a b"] {
            let e = Peer::parse("to", bad).unwrap_err();
            assert!(e.to_string().starts_with("to "), "{e}");
        }
    }
}

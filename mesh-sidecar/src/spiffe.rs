//! SPIFFE IDs as the mesh uses them:
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;

/// A workload identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }

    /// Parses the Kubernetes form; anything else (other paths, empty parts,
    /// query or fragment) is not a mesh identity.
    pub fn parse(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix("spiffe://")?;
        let (td, path) = rest.split_once('/')?;
        let mut parts = path.split('/');
        let (ns_kw, ns, sa_kw, sa) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let valid = |s: &str| !s.is_empty() && !s.contains(['?', '#', ':']);
        if parts.next().is_some()
            || ns_kw != "ns"
            || sa_kw != "sa"
            || !valid(td)
            || !valid(ns)
            || !valid(sa)
        {
            return None;
        }
        Some(Self::new(td, ns, sa))
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// The SPIFFE ID in a certificate: its one `spiffe://` URI SAN. A
/// certificate with none, or with several (the SPIFFE X.509 profile allows
/// exactly one), has no identity.
pub fn from_certificate(der: &[u8]) -> Option<SpiffeId> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
        _ => None,
    });
    let first = uris.next()?;
    if uris.next().is_some() {
        return None;
    }
    SpiffeId::parse(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_the_kubernetes_form() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "web");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/c",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://cluster.local/x/a/sa/b",
        ] {
            assert_eq!(SpiffeId::parse(bad), None, "{bad}");
        }
    }
}

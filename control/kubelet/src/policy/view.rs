//! Explaining one pod's policy (`skep ctl policy POD`): the same compile
//! the pod's node runs, read back as identities, peers, ports and the
//! NetworkPolicies each rule comes from.

use super::{cluster::ClusterView, compile::Compiler};
use skep_dataplane::policy::{ID_ANY, ID_CIDR_FIRST, ID_POD_FIRST, PolicyDirection, PortMatch};
use std::{fmt, net::Ipv4Addr};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExplainError {
    #[error("pod {namespace}/{name} not found")]
    NotFound { namespace: String, name: String },
    #[error(
        "pod {namespace}/{name} uses the host network: NetworkPolicy does not apply to it (its traffic is the node's)"
    )]
    HostNetwork { namespace: String, name: String },
    #[error("pod {namespace}/{name} has no IP address yet (not scheduled or not started)")]
    NoAddress { namespace: String, name: String },
    #[error("pod {namespace}/{name} has finished; it is no longer a policy endpoint")]
    Finished { namespace: String, name: String },
}

/// One effective allow rule of the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExplainedRule {
    pub direction: PolicyDirection,
    pub identity: u32,
    /// `any`, `NS {labels}` for a pod identity, `cidr:…`, `reserved:…`.
    pub peer: String,
    pub ports: String,
    /// `namespace/name` of every policy giving the rule, lowest id first.
    pub policies: Vec<String>,
}

/// What `skep ctl policy POD` prints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPolicy {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub identity: u32,
    pub labels: Vec<String>,
    pub ingress_isolated: bool,
    pub egress_isolated: bool,
    pub rules: Vec<ExplainedRule>,
}

fn proto_name(p: u8) -> String {
    match p {
        6 => "TCP".into(),
        17 => "UDP".into(),
        132 => "SCTP".into(),
        n => format!("proto-{n}"),
    }
}

pub fn ports_text(m: &PortMatch) -> String {
    match m {
        PortMatch::Any => "any".into(),
        PortMatch::AnyPort { proto } => format!("{}/*", proto_name(*proto)),
        PortMatch::Range { proto, first, last } if first == last => {
            format!("{}/{first}", proto_name(*proto))
        }
        PortMatch::Range { proto, first, last } => {
            format!("{}/{first}-{last}", proto_name(*proto))
        }
    }
}

/// Compiles `view` for the pod's node and reads back the pod's rules.
pub fn explain(view: &ClusterView, namespace: &str, name: &str) -> Result<PodPolicy, ExplainError> {
    explain_with(view, namespace, name, Compiler::recording_sources())
}

/// [`explain`] with a given compiler (e.g. one numbering pod identities
/// as the cluster's SecurityIdentity objects do); it must record sources.
pub fn explain_with(
    view: &ClusterView,
    namespace: &str,
    name: &str,
    mut compiler: Compiler,
) -> Result<PodPolicy, ExplainError> {
    let ns = namespace.to_owned();
    let nm = name.to_owned();
    let pod = view
        .pods
        .get(&format!("{namespace}/{name}"))
        .ok_or_else(|| ExplainError::NotFound {
            namespace: ns.clone(),
            name: nm.clone(),
        })?;
    if pod.host_network {
        return Err(ExplainError::HostNetwork {
            namespace: ns,
            name: nm,
        });
    }
    if pod.terminal {
        return Err(ExplainError::Finished {
            namespace: ns,
            name: nm,
        });
    }
    let Some(ip) = pod.ip else {
        return Err(ExplainError::NoAddress {
            namespace: ns,
            name: nm,
        });
    };
    let compiled = compiler.compile(view, &pod.node);
    let ep = compiled
        .state
        .endpoints
        .get(&ip)
        .copied()
        .ok_or_else(|| ExplainError::NoAddress {
            namespace: ns.clone(),
            name: nm.clone(),
        })?;
    let names = &compiled.snapshot.identities;
    let describe = |id: u32| -> String {
        if id == ID_ANY {
            return "any".into();
        }
        let Some(labels) = names.get(&id) else {
            return format!("identity {id}");
        };
        if (ID_POD_FIRST..ID_CIDR_FIRST).contains(&id) {
            // First label is the namespace; the rest the pod's labels.
            let ns = labels
                .first()
                .and_then(|l| l.split_once('='))
                .map(|(_, v)| v)
                .unwrap_or("");
            format!("{ns} {{{}}}", labels.get(1..).unwrap_or(&[]).join(","))
        } else {
            labels.join(",")
        }
    };
    let rules = compiled
        .sources
        .iter()
        .filter(|(r, _)| r.endpoint == ep.endpoint)
        .map(|(r, ids)| ExplainedRule {
            direction: r.direction,
            identity: r.identity,
            peer: describe(r.identity),
            ports: ports_text(&r.ports),
            policies: ids
                .iter()
                .map(|id| {
                    compiled
                        .snapshot
                        .policy_names
                        .get(id)
                        .cloned()
                        .unwrap_or_else(|| format!("policy {id}"))
                })
                .collect(),
        })
        .collect();
    Ok(PodPolicy {
        namespace: ns,
        name: nm,
        node: pod.node.clone(),
        ip,
        identity: ep.identity,
        labels: names.get(&ep.identity).cloned().unwrap_or_default(),
        ingress_isolated: ep.ingress_isolated,
        egress_isolated: ep.egress_isolated,
        rules,
    })
}

impl fmt::Display for PodPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "Pod:       {}/{}", self.namespace, self.name)?;
        writeln!(f, "Node:      {}", self.node)?;
        writeln!(f, "IP:        {}", self.ip)?;
        writeln!(f, "Identity:  {}", self.identity)?;
        writeln!(f, "Labels:    {}", self.labels.join(", "))?;
        for (dir, isolated) in [
            (PolicyDirection::Ingress, self.ingress_isolated),
            (PolicyDirection::Egress, self.egress_isolated),
        ] {
            let title = match dir {
                PolicyDirection::Ingress => "Ingress",
                PolicyDirection::Egress => "Egress",
            };
            writeln!(f)?;
            if !isolated {
                writeln!(
                    f,
                    "{title}: not isolated (no policy selects the pod for {}): all traffic allowed",
                    title.to_lowercase()
                )?;
                continue;
            }
            let rules: Vec<&ExplainedRule> =
                self.rules.iter().filter(|r| r.direction == dir).collect();
            if rules.is_empty() {
                writeln!(f, "{title}: isolated, nothing allowed")?;
                continue;
            }
            writeln!(f, "{title}: isolated, allowed:")?;
            let peer_title = if dir == PolicyDirection::Ingress {
                "FROM"
            } else {
                "TO"
            };
            let w_id = rules
                .iter()
                .map(|r| r.identity.to_string().len())
                .max()
                .unwrap_or(0)
                .max(8);
            let w_peer = rules.iter().map(|r| r.peer.len()).max().unwrap_or(0).max(4);
            let w_ports = rules
                .iter()
                .map(|r| r.ports.len())
                .max()
                .unwrap_or(0)
                .max(5);
            writeln!(
                f,
                "  {:<w_id$}  {peer_title:<w_peer$}  {:<w_ports$}  POLICY",
                "IDENTITY", "PORTS"
            )?;
            for r in rules {
                writeln!(
                    f,
                    "  {:<w_id$}  {:<w_peer$}  {:<w_ports$}  {}",
                    r.identity,
                    r.peer,
                    r.ports,
                    r.policies.join(", ")
                )?;
            }
        }
        if self.ingress_isolated {
            writeln!(f)?;
            writeln!(
                f,
                "Traffic from the pod's own node (probes) is always allowed; replies of allowed connections pass."
            )?;
        }
        Ok(())
    }
}

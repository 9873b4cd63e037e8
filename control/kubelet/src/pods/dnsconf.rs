//! /etc/resolv.conf, /etc/hosts and /etc/hostname of a pod.

use crate::json::{str_at as s, strings_at as strings};
use serde_json::Value;
use std::net::IpAddr;

/// The cluster's DNS settings as the node knows them.
#[derive(Debug, Clone)]
pub struct ClusterDns {
    pub server: IpAddr,
    pub domain: String,
}

/// resolv.conf for a pod, following dnsPolicy and dnsConfig.
pub fn resolv_conf(pod: &Value, dns: &ClusterDns, host_resolv: &str) -> String {
    let ns = s(pod, "/metadata/namespace").unwrap_or("default");
    let host_network = pod
        .pointer("/spec/hostNetwork")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let policy = s(pod, "/spec/dnsPolicy").unwrap_or("ClusterFirst");
    let (mut servers, mut searches, mut options): (Vec<String>, Vec<String>, Vec<String>) =
        match policy {
            "None" => (vec![], vec![], vec![]),
            // hostNetwork pods with ClusterFirst use the node's resolver
            // (Kubernetes' rule); ClusterFirstWithHostNet opts in.
            "Default" => parse_host(host_resolv),
            "ClusterFirst" if host_network => parse_host(host_resolv),
            _ => {
                let d = &dns.domain;
                (
                    vec![dns.server.to_string()],
                    vec![format!("{ns}.svc.{d}"), format!("svc.{d}"), d.clone()],
                    vec!["ndots:5".into()],
                )
            }
        };
    if let Some(cfg) = pod.pointer("/spec/dnsConfig") {
        for n in strings(cfg, "/nameservers") {
            if !servers.contains(&n) {
                servers.push(n);
            }
        }
        for sr in strings(cfg, "/searches") {
            if !searches.contains(&sr) {
                searches.push(sr);
            }
        }
        for o in cfg
            .get("options")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = s(o, "/name").unwrap_or("");
            let opt = match s(o, "/value") {
                Some(v) => format!("{name}:{v}"),
                None => name.to_owned(),
            };
            options.retain(|x| x.split(':').next() != Some(name));
            options.push(opt);
        }
    }
    servers.truncate(3);
    searches.truncate(32);
    let mut out = String::new();
    for n in &servers {
        out.push_str(&format!("nameserver {n}\n"));
    }
    if !searches.is_empty() {
        out.push_str(&format!("search {}\n", searches.join(" ")));
    }
    if !options.is_empty() {
        out.push_str(&format!("options {}\n", options.join(" ")));
    }
    out
}

fn parse_host(text: &str) -> (Vec<String>, Vec<String>, Vec<String>) {
    let (mut n, mut sr, mut o) = (vec![], vec![], vec![]);
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => n.extend(words.next().map(str::to_owned)),
            Some("search" | "domain") => sr.extend(words.map(str::to_owned)),
            Some("options") => o.extend(words.map(str::to_owned)),
            _ => {}
        }
    }
    (n, sr, o)
}

/// The pod's hostname (spec.hostname or the pod name, at most 63 chars).
pub fn hostname(pod: &Value) -> String {
    let h = s(pod, "/spec/hostname")
        .filter(|h| !h.is_empty())
        .or_else(|| s(pod, "/metadata/name"))
        .unwrap_or("pod");
    h.chars()
        .take(63)
        .collect::<String>()
        .trim_end_matches(['-', '.'])
        .to_owned()
}

/// /etc/hosts for a pod (hostNetwork pods get the node's).
pub fn hosts(pod: &Value, pod_ip: Option<IpAddr>, domain: &str) -> String {
    let mut out = String::from(
        "# Kubernetes-managed hosts file (skep).\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
    );
    if let Some(ip) = pod_ip {
        let name = hostname(pod);
        match s(pod, "/spec/subdomain").filter(|x| !x.is_empty()) {
            Some(sub) => {
                let ns = s(pod, "/metadata/namespace").unwrap_or("default");
                out.push_str(&format!("{ip}\t{name}.{sub}.{ns}.svc.{domain}\t{name}\n"));
            }
            None => out.push_str(&format!("{ip}\t{name}\n")),
        }
    }
    for alias in pod
        .pointer("/spec/hostAliases")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let names = strings(alias, "/hostnames");
        if let Some(ip) = s(alias, "/ip") {
            out.push_str(&format!(
                "# Entries added by HostAliases.\n{ip}\t{}\n",
                names.join("\t")
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dns() -> ClusterDns {
        ClusterDns {
            server: "10.43.0.10".parse().unwrap(),
            domain: "cluster.local".into(),
        }
    }

    #[test]
    fn cluster_first() {
        let pod = json!({"metadata": {"namespace": "demo", "name": "p"}, "spec": {}});
        assert_eq!(
            resolv_conf(&pod, &dns(), ""),
            "nameserver 10.43.0.10\nsearch demo.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
        );
    }

    #[test]
    fn dns_config_and_policies() {
        let pod = json!({"metadata": {"namespace": "d"}, "spec": {"dnsPolicy": "None",
            "dnsConfig": {"nameservers": ["1.2.3.4"], "searches": ["x.y"], "options": [{"name": "ndots", "value": "2"}, {"name": "edns0"}]}}});
        assert_eq!(
            resolv_conf(&pod, &dns(), ""),
            "nameserver 1.2.3.4\nsearch x.y\noptions ndots:2 edns0\n"
        );
        let host = json!({"metadata": {"namespace": "d"}, "spec": {"hostNetwork": true}});
        assert_eq!(
            resolv_conf(&host, &dns(), "nameserver 9.9.9.9\n"),
            "nameserver 9.9.9.9\n"
        );
        let hn = json!({"metadata": {"namespace": "d"}, "spec": {"hostNetwork": true, "dnsPolicy": "ClusterFirstWithHostNet"}});
        assert!(
            resolv_conf(&hn, &dns(), "nameserver 9.9.9.9\n").starts_with("nameserver 10.43.0.10")
        );
    }

    #[test]
    fn hosts_file() {
        let pod = json!({"metadata": {"namespace": "d", "name": "web-0"}, "spec": {"subdomain": "web",
            "hostAliases": [{"ip": "1.2.3.4", "hostnames": ["a", "b"]}]}});
        let h = hosts(&pod, Some("10.42.0.5".parse().unwrap()), "cluster.local");
        assert!(h.contains("10.42.0.5\tweb-0.web.d.svc.cluster.local\tweb-0\n"));
        assert!(h.contains("1.2.3.4\ta\tb\n"));
    }
}

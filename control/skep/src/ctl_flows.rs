//! `skep ctl flows`: the flows of every node, through the API server's
//! relay (`GET /skep/v1/flows`), printed like `hubble observe` or as JSON
//! lines.

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use serde_json::Value;
use skep_kubelet::flows::filter::Peer;
use std::io::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum VerdictArg {
    Forwarded,
    Dropped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProtocolArg {
    Tcp,
    Udp,
    Sctp,
    Icmp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FlowsOutput {
    Table,
    Json,
}

#[derive(Debug, Clone, clap::Args)]
pub struct FlowsArgs {
    /// Keep streaming new flows after the recent ones.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Flows from or to pods of this namespace (ctl's global `-n`; unset:
    /// every namespace). Set by the caller, not parsed here.
    #[arg(skip)]
    pub namespace: Option<String>,
    /// Flows from or to this pod: NAME (in -n's namespace when given) or
    /// NAMESPACE/NAME.
    #[arg(long)]
    pub pod: Option<String>,
    /// The source: NAMESPACE/POD, POD, an IP, a CIDR or a label key=value.
    #[arg(long)]
    pub from: Option<String>,
    /// The destination, same forms as --from.
    #[arg(long)]
    pub to: Option<String>,
    #[arg(long, value_enum, ignore_case = true)]
    pub verdict: Option<VerdictArg>,
    #[arg(long, value_enum, ignore_case = true)]
    pub protocol: Option<ProtocolArg>,
    /// Source or destination port.
    #[arg(long)]
    pub port: Option<u16>,
    /// Only flows of the last DURATION (30s, 5m, 1h30m) or since an RFC 3339
    /// time.
    #[arg(long, value_parser = parse_since)]
    pub since: Option<String>,
    /// Only the last N matching flows (of the history).
    #[arg(long, conflicts_with = "first")]
    pub last: Option<u32>,
    /// Only the first N matching flows (of the history).
    #[arg(long)]
    pub first: Option<u32>,
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: FlowsOutput,
}

/// `--since`: a duration (`30s`, `5m`, `1h30m`, `250ms`, `2d`) or an RFC 3339
/// time (the server checks the latter precisely).
fn parse_since(s: &str) -> Result<String, String> {
    let s = s.trim();
    let duration = !s.is_empty()
        && s.starts_with(|c: char| c.is_ascii_digit())
        && s.split(|c: char| c.is_ascii_digit())
            .all(|u| matches!(u, "" | "ms" | "s" | "m" | "h" | "d"))
        && s.ends_with(|c: char| c.is_ascii_alphabetic());
    let looks_like_time = s.len() >= 20 && s.as_bytes().get(10) == Some(&b'T');
    if duration || looks_like_time {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is neither a duration (30s, 5m, 1h30m) nor an RFC 3339 time (2026-01-02T15:04:05Z)"
        ))
    }
}

/// Percent-encodes a query value.
fn encode(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The relay path for `args`, after checking the filters.
pub fn relay_path(args: &FlowsArgs) -> Result<String> {
    for (flag, value) in [("--from", &args.from), ("--to", &args.to)] {
        if let Some(v) = value {
            Peer::parse(flag, v)?;
        }
    }
    if let Some(p) = &args.pod
        && !matches!(Peer::parse("--pod", p), Ok(Peer::Pod { .. }))
    {
        bail!("--pod {p:?} is not NAME or NAMESPACE/NAME");
    }
    let mut q: Vec<(&str, String)> = Vec::new();
    if args.follow {
        q.push(("follow", "true".into()));
    }
    let text = [
        ("namespace", &args.namespace),
        ("pod", &args.pod),
        ("from", &args.from),
        ("to", &args.to),
        ("since", &args.since),
    ];
    for (k, v) in text {
        if let Some(v) = v {
            q.push((k, v.clone()));
        }
    }
    if let Some(v) = args.verdict {
        q.push((
            "verdict",
            match v {
                VerdictArg::Forwarded => "FORWARDED",
                VerdictArg::Dropped => "DROPPED",
            }
            .into(),
        ));
    }
    if let Some(p) = args.protocol {
        q.push((
            "protocol",
            match p {
                ProtocolArg::Tcp => "tcp",
                ProtocolArg::Udp => "udp",
                ProtocolArg::Sctp => "sctp",
                ProtocolArg::Icmp => "icmp",
            }
            .into(),
        ));
    }
    if let Some(p) = args.port {
        q.push(("port", p.to_string()));
    }
    if let Some(n) = args.last {
        q.push(("last", n.to_string()));
    }
    if let Some(n) = args.first {
        q.push(("first", n.to_string()));
    }
    let query: Vec<String> = q
        .iter()
        .map(|(k, v)| format!("{k}={}", encode(v)))
        .collect();
    Ok(if query.is_empty() {
        "/skep/v1/flows".to_owned()
    } else {
        format!("/skep/v1/flows?{}", query.join("&"))
    })
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// `ns/pod:port`, else `ip:port`, with the reserved identity when there
/// is one (`1.2.3.4:80 (world)`).
fn endpoint(e: &Value) -> String {
    let port = e.get("port").and_then(Value::as_u64).unwrap_or(0);
    let mut out = if s(e, "pod").is_empty() {
        s(e, "ip").to_owned()
    } else {
        format!("{}/{}", s(e, "namespace"), s(e, "pod"))
    };
    if port != 0 {
        out.push_str(&format!(":{port}"));
    }
    let reserved = e
        .get("labels")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .find_map(|l| l.strip_prefix("reserved:"));
    if let Some(r) = reserved {
        out.push_str(&format!(" ({r})"));
    }
    out
}

/// `12-03 21:27:21.123` (UTC) from the RFC 3339 time.
fn short_time(t: &str) -> String {
    match (t.get(5..10), t.get(11..23)) {
        (Some(date), Some(time)) => format!("{date} {time}"),
        _ => t.to_owned(),
    }
}

/// The table's header, aligned with [`table_row`].
pub fn table_header() -> String {
    format!(
        "{:<19} {:<13} {:<33}    {:<33} {:<6} {:<12} {:<10} {}",
        "TIME", "NODE", "SOURCE", "DESTINATION", "PROTO", "FLAGS", "VERDICT", "REASON / POLICY"
    )
}

/// One flow as a table row.
pub fn table_row(f: &Value) -> String {
    let empty = Value::Null;
    let flags = f
        .get("tcp_flags")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let mut extra = Vec::new();
    if let Some(r) = f.get("drop_reason").and_then(Value::as_str) {
        extra.push(r.to_owned());
    }
    if let Some(p) = f.get("policy").and_then(Value::as_str) {
        extra.push(format!("policy {p}"));
    }
    if let Some(svc) = f.get("service") {
        extra.push(format!(
            "via service {}:{}",
            s(svc, "ip"),
            svc.get("port").and_then(Value::as_u64).unwrap_or(0)
        ));
    }
    format!(
        "{:<19} {:<13} {:<33} -> {:<33} {:<6} {:<12} {:<10} {}",
        short_time(s(f, "time")),
        s(f, "node"),
        endpoint(f.get("source").unwrap_or(&empty)),
        endpoint(f.get("destination").unwrap_or(&empty)),
        s(f, "protocol"),
        if flags.is_empty() { "-" } else { &flags },
        s(f, "verdict"),
        extra.join(", "),
    )
    .trim_end()
    .to_owned()
}

pub async fn run(client: &skep_client::Client, args: FlowsArgs) -> Result<()> {
    let path = relay_path(&args)?;
    let mut events = client
        .watch(&path)
        .await
        .context("reading flows from the server (GET /skep/v1/flows)")?;
    let stdout = std::io::stdout();
    let mut header = args.output == FlowsOutput::Table;
    while let Some(ev) = events.next().await {
        let ev = ev.context("the server's flow stream broke")?;
        let line = match ev.kind.as_str() {
            "FLOW" => match args.output {
                FlowsOutput::Json => ev.object.to_string(),
                FlowsOutput::Table => {
                    let row = table_row(&ev.object);
                    if std::mem::take(&mut header) {
                        format!("{}\n{row}", table_header())
                    } else {
                        row
                    }
                }
            },
            "ERROR" => {
                eprintln!("warning: {}", s(&ev.object, "error"));
                continue;
            }
            "LOST" => {
                eprintln!(
                    "warning: node {} skipped {} flows (this reader fell behind)",
                    s(&ev.object, "node"),
                    ev.object.get("count").and_then(Value::as_u64).unwrap_or(0)
                );
                continue;
            }
            _ => continue,
        };
        let mut out = stdout.lock();
        // `skep ctl flows | head`: a closed pipe ends the command quietly.
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        flows: FlowsArgs,
    }

    fn parse(args: &[&str]) -> Result<FlowsArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("flows").chain(args.iter().copied())).map(|c| c.flows)
    }

    #[test]
    fn flags_become_the_relay_query() {
        let mut a = parse(&[
            "--follow",
            "--from",
            "x/a",
            "--to",
            "10.42.0.0/16",
            "--verdict",
            "DROPPED",
            "--protocol",
            "udp",
            "--port",
            "53",
            "--since",
            "5m",
            "--last",
            "20",
        ])
        .unwrap();
        a.namespace = Some("x".into());
        assert_eq!(
            relay_path(&a).unwrap(),
            "/skep/v1/flows?follow=true&namespace=x&from=x%2Fa&to=10.42.0.0%2F16&since=5m&verdict=DROPPED&protocol=udp&port=53&last=20"
        );
    }

    #[test]
    fn bad_values_name_their_flag() {
        let e = parse(&["--verdict", "MAYBE"]).unwrap_err().to_string();
        assert!(e.contains("--verdict"), "{e}");
        let e = parse(&["--since", "5 minutes"]).unwrap_err().to_string();
        assert!(e.contains("--since"), "{e}");
        let e = parse(&["--port", "70000"]).unwrap_err().to_string();
        assert!(e.contains("--port"), "{e}");
        let e = relay_path(&parse(&["--from", "a b"]).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--from"), "{e}");
        let e = relay_path(&parse(&["--pod", "app=web"]).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--pod"), "{e}");
    }

    #[test]
    fn rows_read_like_hubble() {
        let f = serde_json::json!({
            "time": "2026-12-03T21:27:21.123456789Z", "node": "n1", "verdict": "DROPPED",
            "drop_reason": "policy-denied-ingress", "protocol": "TCP", "tcp_flags": ["SYN"],
            "source": {"ip": "10.42.0.5", "port": 43210, "namespace": "x", "pod": "a"},
            "destination": {"ip": "10.42.1.7", "port": 80, "namespace": "y", "pod": "b"},
            "policy": "y/deny-all"
        });
        let row = table_row(&f);
        assert!(row.starts_with("12-03 21:27:21.123  n1 "), "{row}");
        assert_eq!(
            row.find("->"),
            table_header().find("DESTINATION").map(|i| i - 3)
        );
        assert!(row.contains("x/a:43210"), "{row}");
        assert!(row.contains("-> y/b:80"), "{row}");
        assert!(
            row.ends_with("DROPPED    policy-denied-ingress, policy y/deny-all"),
            "{row}"
        );
    }
}

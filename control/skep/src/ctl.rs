//! `skep ctl`: the command-line client. Resource names are resolved through
//! the server's discovery (plural, singular, kind or short name, like
//! kubectl); `apply` is server-side apply; `get` prints the server's Table.

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::{Value, json};
use skep_client::Client;
use std::{io::Read, path::PathBuf};

#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    /// Kubeconfig to use (else $KUBECONFIG, else ~/.kube/config).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// Namespace (else the kubeconfig context's).
    #[arg(short = 'n', long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Table,
    Wide,
    Json,
    Yaml,
    Name,
}

#[derive(Debug, clap::Subcommand)]
enum CtlCommand {
    /// List or show objects.
    Get {
        /// Resource (pods, deploy, svc, …).
        resource: String,
        name: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
        /// Across all namespaces.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// Label selector.
        #[arg(short = 'l', long)]
        selector: Option<String>,
    },
    /// Create or update objects from YAML/JSON files (server-side apply).
    Apply {
        /// File, or - for stdin; multi-document YAML allowed.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
    },
    /// Delete an object, or the objects of files.
    Delete {
        resource: Option<String>,
        name: Option<String>,
        #[arg(short = 'f', long = "filename")]
        files: Vec<String>,
    },
    /// Health of the cluster: control-plane checks (store, DNS), the
    /// controller leader, nodes with their eBPF dataplane (programs, links,
    /// map fill), cluster DNS, pods and mesh; exits 1 when unhealthy.
    Status,
    /// Deploy test pods in a temporary namespace and check pod-to-pod,
    /// pod-to-Service, DNS and a NetworkPolicy (like `cilium connectivity test`).
    ConnectivityTest(crate::ctl_connectivity::ConnectivityArgs),
    /// The service mesh: meshed namespaces, workloads, identities.
    #[command(subcommand)]
    Mesh(crate::ctl_mesh::MeshCommand),
    /// The effective NetworkPolicy of a pod: its identity, whether it is
    /// isolated, and each allowed peer and port with the policies behind it.
    Policy(crate::ctl_policy::PolicyArgs),
    /// Flows the kernel reported on every node (new connections and drops,
    /// with verdict, reason and policy), like `hubble observe`.
    Flows(crate::ctl_flows::FlowsArgs),
    /// The dataplane's view of services on this node, read from the pinned
    /// eBPF maps (works while the agent is down; needs root).
    Svc {
        /// bpffs directory of the load balancer's pins.
        #[arg(long, default_value = "/sys/fs/bpf/skep")]
        pin_root: PathBuf,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
}

/// One resource as discovery describes it.
#[derive(Debug, Clone)]
pub(crate) struct Resource {
    group: String,
    version: String,
    plural: String,
    kind: String,
    namespaced: bool,
    names: Vec<String>,
}

impl Resource {
    fn base(&self) -> String {
        if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        }
    }

    fn collection(&self, ns: Option<&str>) -> String {
        match (self.namespaced, ns) {
            (true, Some(ns)) => format!("{}/namespaces/{ns}/{}", self.base(), self.plural),
            _ => format!("{}/{}", self.base(), self.plural),
        }
    }
}

pub(crate) async fn discover(client: &Client) -> Result<Vec<Resource>> {
    const ACCEPT: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";
    let mut out = Vec::new();
    for path in ["/api", "/apis"] {
        let doc = client
            .request_raw(http::Method::GET, path, None, "", ACCEPT)
            .await
            .with_context(|| format!("discovery ({path})"))?;
        for group in doc
            .get("items")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let gname = group
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("");
            // The first version listed is the preferred one.
            let Some(version) = group
                .get("versions")
                .and_then(Value::as_array)
                .and_then(|v| v.first())
            else {
                continue;
            };
            let vname = version.get("version").and_then(Value::as_str).unwrap_or("");
            for r in version
                .get("resources")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let s = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                let kind = r
                    .pointer("/responseKind/kind")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                let mut names = vec![s("resource"), s("singularResource"), kind.to_lowercase()];
                names.extend(
                    r.get("shortNames")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(|n| n.as_str().map(str::to_owned)),
                );
                out.push(Resource {
                    group: gname.to_owned(),
                    version: vname.to_owned(),
                    plural: s("resource"),
                    kind,
                    namespaced: r.get("scope").and_then(Value::as_str) == Some("Namespaced"),
                    names,
                });
            }
        }
    }
    Ok(out)
}

fn find<'a>(resources: &'a [Resource], name: &str) -> Result<&'a Resource> {
    let (name, group) = name.split_once('.').unwrap_or((name, ""));
    resources
        .iter()
        .find(|r| r.names.iter().any(|n| n == name) && (group.is_empty() || r.group == group))
        .with_context(|| format!("the server doesn't have a resource type {name:?}"))
}

fn by_kind<'a>(resources: &'a [Resource], api_version: &str, kind: &str) -> Result<&'a Resource> {
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    resources
        .iter()
        .find(|r| r.kind == kind && r.group == group)
        .with_context(|| {
            format!("no resource for kind {kind:?} in {api_version:?}; is its CRD installed?")
        })
}

/// Server-side applies each document (as field manager `skep-ctl`);
/// documents without a namespace go to `namespace`. Returns each object
/// (`kind/name`) with its outcome, in order; one failure does not stop
/// the others.
pub(crate) async fn apply_docs(
    client: &Client,
    resources: &[Resource],
    docs: Vec<Value>,
    namespace: &str,
) -> Vec<(String, Result<()>)> {
    let mut out = Vec::new();
    for doc in docs {
        let av = doc.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("");
        let name = doc
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        let what = format!("{}/{name}", kind.to_lowercase());
        if av.is_empty() || kind.is_empty() || name.is_empty() {
            out.push((
                what,
                Err(anyhow::anyhow!(
                    "every document needs apiVersion, kind and metadata.name"
                )),
            ));
            continue;
        }
        let r = match by_kind(resources, av, kind) {
            Ok(r) => r,
            Err(e) => {
                out.push((what, Err(e)));
                continue;
            }
        };
        let ns = doc
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or(namespace);
        let path = format!("{}/{name}", r.collection(Some(ns)));
        let result = client
            .apply(&path, &doc, "skep-ctl")
            .await
            .map(|_| ())
            .map_err(anyhow::Error::from);
        out.push((what, result));
    }
    out
}

/// The documents of one YAML/JSON text (multi-document YAML allowed;
/// a `List` is expanded to its items).
pub(crate) fn parse_docs(text: &str, source: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let v = Value::deserialize(doc)
            .with_context(|| format!("{source}: document {} is not valid YAML", i + 1))?;
        if v.get("kind").and_then(Value::as_str) == Some("List") {
            docs.extend(
                v.get("items")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default(),
            );
        } else if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

fn read_docs(files: &[String]) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for f in files {
        let text = if f == "-" {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading stdin")?;
            s
        } else {
            std::fs::read_to_string(f).with_context(|| format!("reading {f}"))?
        };
        docs.extend(parse_docs(&text, f)?);
    }
    Ok(docs)
}

fn print_table(table: &Value, wide: bool, with_namespace: bool) {
    let cols: Vec<(usize, String)> = table
        .get("columnDefinitions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
        .filter(|(_, c)| wide || c.get("priority").and_then(Value::as_i64).unwrap_or(0) == 0)
        .map(|(i, c)| {
            (
                i,
                c.get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_uppercase(),
            )
        })
        .collect();
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut header: Vec<String> = cols.iter().map(|(_, n)| n.clone()).collect();
    if with_namespace {
        header.insert(0, "NAMESPACE".into());
    }
    rows.push(header);
    for row in table
        .get("rows")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let cells = row
            .get("cells")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut line: Vec<String> = cols
            .iter()
            .map(|(i, _)| match cells.get(*i) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(v) => v.to_string(),
            })
            .collect();
        if with_namespace {
            let ns = row
                .pointer("/object/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("");
            line.insert(0, ns.to_owned());
        }
        rows.push(line);
    }
    if rows.len() == 1 {
        eprintln!("No resources found.");
        return;
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, String::len))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, s)| format!("{s:<w$}", w = widths[c]))
            .collect();
        println!("{}", line.join("   ").trim_end());
    }
}

/// `skep ctl svc`: frontends, backends, affinity and connection counts from
/// the pinned maps.
fn svc(pin_root: &std::path::Path, output: Output) -> Result<()> {
    let lb = skep_dataplane::lb::PinnedLb::open(pin_root)?;
    let snap = lb.snapshot()?;
    if matches!(output, Output::Json | Output::Yaml) {
        let frontends: Vec<Value> = snap
            .frontends
            .iter()
            .map(|f| {
                json!({
                    "vip": f.frontend.vip.to_string(),
                    "port": f.frontend.port,
                    "protocol": format!("{:?}", f.frontend.protocol).to_uppercase(),
                    "id": f.id,
                    "readyBackends": f.ready,
                    "affinityTimeoutSeconds": f.affinity_timeout_s,
                    "connections": f.connections,
                    "backends": f.backends.iter().map(|b| json!({
                        "address": b.addr.to_string(), "port": b.port,
                        "terminating": b.terminating, "connections": b.connections,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let doc = json!({"frontends": frontends, "connections": snap.connections, "counters": snap.counters.0});
        if output == Output::Json {
            println!("{}", serde_json::to_string_pretty(&doc)?);
        } else {
            print!("{}", serde_yaml::to_string(&doc)?);
        }
        return Ok(());
    }
    let mut rows = vec![vec![
        "FRONTEND".to_string(),
        "PROTO".into(),
        "READY".into(),
        "AFFINITY".into(),
        "CONNS".into(),
        "BACKENDS".into(),
    ]];
    for f in &snap.frontends {
        let backends: Vec<String> = f
            .backends
            .iter()
            .map(|b| {
                format!(
                    "{}:{}{}",
                    b.addr,
                    b.port,
                    if b.terminating { " (terminating)" } else { "" }
                )
            })
            .collect();
        rows.push(vec![
            format!("{}:{}", f.frontend.vip, f.frontend.port),
            format!("{:?}", f.frontend.protocol).to_uppercase(),
            f.ready.to_string(),
            if f.affinity_timeout_s == 0 {
                "-".into()
            } else {
                format!("ClientIP {}s", f.affinity_timeout_s)
            },
            f.connections.to_string(),
            if backends.is_empty() {
                "<none: refused>".into()
            } else {
                backends.join(", ")
            },
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, s)| format!("{s:<w$}", w = widths[c]))
            .collect();
        println!("{}", line.join("   ").trim_end());
    }
    println!(
        "\n{} frontends, {} tracked connections",
        snap.frontends.len(),
        snap.connections
    );
    Ok(())
}

pub async fn run(args: CtlArgs) -> Result<()> {
    if let CtlCommand::Svc { pin_root, output } = &args.command {
        return svc(pin_root, *output);
    }
    let path = args
        .kubeconfig
        .clone()
        .or_else(|| std::env::var_os("KUBECONFIG").map(PathBuf::from))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".kube/config")))
        .context("no kubeconfig: pass --kubeconfig or set KUBECONFIG")?;
    let kc = skep_client::Kubeconfig::load(&path)?;
    let explicit_namespace = args.namespace.clone();
    let namespace = args.namespace.clone().unwrap_or(kc.namespace.clone());
    let client = Client::new(&kc.server, &kc.ca_pem, kc.auth)?;
    match args.command {
        CtlCommand::Svc { .. } => Ok(()),
        CtlCommand::Status => crate::ctl_status::status(&client).await,
        CtlCommand::ConnectivityTest(a) => crate::ctl_connectivity::run(&client, a).await,
        CtlCommand::Mesh(cmd) => crate::ctl_mesh::run(&client, cmd).await,
        CtlCommand::Flows(mut a) => {
            // Only an explicit -n filters flows; the kubeconfig's default
            // namespace would hide every other namespace's flows.
            a.namespace = explicit_namespace;
            crate::ctl_flows::run(&client, a).await
        }
        CtlCommand::Policy(mut a) => {
            a.namespace = Some(namespace.clone());
            crate::ctl_policy::run(&client, a).await
        }
        CtlCommand::Get {
            resource,
            name,
            output,
            all_namespaces,
            selector,
        } => {
            let resources = discover(&client).await?;
            let r = find(&resources, &resource)?;
            let ns = (!all_namespaces).then_some(namespace.as_str());
            let mut path = r.collection(ns);
            if let Some(n) = &name {
                path = format!("{path}/{n}");
            }
            if let Some(sel) = &selector {
                path = format!(
                    "{path}?labelSelector={}",
                    sel.replace(' ', "%20")
                        .replace('=', "%3D")
                        .replace(',', "%2C")
                );
            }
            match output {
                Output::Table | Output::Wide => {
                    let table = client
                        .request_raw(
                            http::Method::GET,
                            &path,
                            None,
                            "",
                            "application/json;as=Table;v=v1;g=meta.k8s.io",
                        )
                        .await?;
                    print_table(
                        &table,
                        output == Output::Wide,
                        all_namespaces && r.namespaced,
                    );
                }
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&client.get(&path).await?)?
                ),
                Output::Yaml => print!("{}", serde_yaml::to_string(&client.get(&path).await?)?),
                Output::Name => {
                    let v = client.get(&path).await?;
                    let items = match v.get("items").and_then(Value::as_array) {
                        Some(items) => items.clone(),
                        None => vec![v],
                    };
                    let prefix = if r.group.is_empty() {
                        r.kind.to_lowercase()
                    } else {
                        format!("{}.{}", r.kind.to_lowercase(), r.group)
                    };
                    for i in items {
                        println!(
                            "{prefix}/{}",
                            i.pointer("/metadata/name")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                        );
                    }
                }
            }
            Ok(())
        }
        CtlCommand::Apply { files } => {
            let resources = discover(&client).await?;
            let results = apply_docs(&client, &resources, read_docs(&files)?, &namespace).await;
            let mut failed = 0;
            for (what, result) in results {
                match result {
                    Ok(()) => println!("{what} applied"),
                    Err(e) => {
                        eprintln!("{what}: {e:#}");
                        failed += 1;
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} object(s) could not be applied");
            }
            Ok(())
        }
        CtlCommand::Delete {
            resource,
            name,
            files,
        } => {
            let resources = discover(&client).await?;
            let mut targets = Vec::new();
            for doc in read_docs(&files)? {
                let r = by_kind(
                    &resources,
                    doc.get("apiVersion").and_then(Value::as_str).unwrap_or(""),
                    doc.get("kind").and_then(Value::as_str).unwrap_or(""),
                )?
                .clone();
                let ns = doc
                    .pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .unwrap_or(&namespace)
                    .to_owned();
                let n = doc
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                targets.push((r, ns, n));
            }
            if let (Some(res), Some(n)) = (resource, name) {
                targets.push((find(&resources, &res)?.clone(), namespace.clone(), n));
            }
            if targets.is_empty() {
                bail!("nothing to delete: give RESOURCE NAME or -f FILE");
            }
            // Reverse file order: a Namespace listed first goes last.
            for (r, ns, n) in targets.into_iter().rev() {
                match client
                    .delete(&format!("{}/{n}", r.collection(Some(&ns))))
                    .await
                {
                    Ok(_) => println!("{}/{n} deleted", r.kind.to_lowercase()),
                    Err(e) if e.is_not_found() => {
                        println!("{}/{n} already gone", r.kind.to_lowercase())
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        }
    }
}

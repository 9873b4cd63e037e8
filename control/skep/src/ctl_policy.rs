//! `skep ctl policy POD`: the pod's identity, isolation and effective
//! NetworkPolicy rules, computed by the agent's own compiler from what the
//! API server holds (as the pod's node would compile it). Pod identities
//! are the cluster's shared numbers (`skep.io/v1` SecurityIdentity), the
//! ones the agents program and flows show; a label set the server has not
//! numbered yet shows a temporary node-local number, as on the node. CIDR
//! identities are node-local and numbered as a fresh compile would.

use anyhow::{Context, Result};
use skep_client::Client;
use skep_kubelet::policy::{
    ClusterView, Compiler,
    cluster::Kind,
    identities::{ClusterIdentities, IdentityTable},
    view,
};

#[derive(Debug, clap::Args)]
pub struct PolicyArgs {
    /// The pod: NAME, or NAMESPACE/NAME.
    pub pod: String,
    /// The pod's namespace when POD has none (filled from `skep ctl -n`;
    /// default "default").
    #[arg(skip)]
    pub namespace: Option<String>,
}

pub async fn run(client: &Client, args: PolicyArgs) -> Result<()> {
    let (namespace, name) = match args.pod.split_once('/') {
        Some((ns, name)) => (ns.to_owned(), name.to_owned()),
        None => (
            args.namespace.unwrap_or_else(|| "default".to_owned()),
            args.pod.clone(),
        ),
    };
    let mut cluster = ClusterView::default();
    for kind in Kind::ALL {
        let list = client
            .get(kind.path())
            .await
            .with_context(|| format!("listing {}", kind.path()))?;
        cluster.replace_all(kind, &list);
    }
    let table = IdentityTable::default();
    let identities = client
        .get("/apis/skep.io/v1/securityidentities")
        .await
        .context("listing securityidentities")?;
    table.replace_all(&identities);
    let compiler = Compiler::recording_sources_with(Box::new(ClusterIdentities::new(table)));
    let explained = view::explain_with(&cluster, &namespace, &name, compiler)?;
    print!("{explained}");
    Ok(())
}

//! `skep ctl policy POD`: the pod's identity, isolation and effective
//! NetworkPolicy rules, computed by the agent's own compiler from what the
//! API server holds (as the pod's node would compile it). Identity numbers
//! are those a fresh compile assigns; a long-running agent keeps numbers
//! across churn, so its flows may show other numbers for the same labels.

use anyhow::{Context, Result};
use skep_client::Client;
use skep_kubelet::policy::{ClusterView, cluster::Kind, view};

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
    let explained = view::explain(&cluster, &namespace, &name)?;
    print!("{explained}");
    Ok(())
}

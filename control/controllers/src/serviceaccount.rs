//! ServiceAccount controller: every active namespace has a `default`
//! ServiceAccount (pods name it unless they say otherwise).

use crate::{
    client::{Client, NAMESPACES, SERVICE_ACCOUNTS},
    error::Result,
    informer::{Change, Informer, Informers},
    meta,
    queue::Queue,
    runner::{Reconciler, Requeue},
};
use serde_json::json;
use std::sync::Arc;

#[derive(Debug)]
pub struct ServiceAccountController {
    client: Client,
    namespaces: Arc<Informer>,
    accounts: Arc<Informer>,
}

impl ServiceAccountController {
    pub fn start(
        client: &Client,
        informers: &Informers,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>> {
        let queue = Queue::new();
        let c = Arc::new(Self {
            client: client.clone(),
            namespaces: informers.get_or_create(client.info(NAMESPACES)?),
            accounts: informers.get_or_create(client.info(SERVICE_ACCOUNTS)?),
        });
        let q = queue.clone();
        c.namespaces.on_change(Arc::new(move |ch: &Change| {
            if let Some(n) = &ch.new {
                q.add(meta::name(n));
            }
        }));
        let q = queue.clone();
        c.accounts.on_change(Arc::new(move |ch: &Change| {
            // A deleted default account is recreated.
            if let (Some(old), None) = (&ch.old, &ch.new)
                && meta::name(old) == "default"
                && let Some(ns) = meta::namespace(old)
            {
                q.add(ns);
            }
        }));
        Ok(crate::runner::spawn(c, queue, 1))
    }
}

#[async_trait::async_trait]
impl Reconciler for ServiceAccountController {
    fn name(&self) -> &'static str {
        "serviceaccount"
    }

    async fn reconcile(&self, ns: &str) -> Result<Requeue> {
        let Some(n) = self.namespaces.get(ns) else {
            return Ok(Requeue::No);
        };
        if meta::is_deleting(&n) || self.accounts.get(&format!("{ns}/default")).is_some() {
            return Ok(Requeue::No);
        }
        let sa = json!({"apiVersion": "v1", "kind": "ServiceAccount",
                        "metadata": {"name": "default", "namespace": ns}});
        match self.client.create(SERVICE_ACCOUNTS, Some(ns), sa).await {
            Ok(_) => {
                tracing::debug!(namespace = %ns, "created the default ServiceAccount");
                Ok(Requeue::No)
            }
            Err(e) if e.is_already_exists() => Ok(Requeue::No),
            // The namespace started terminating meanwhile.
            Err(crate::Error::Api(skep_apiserver::status::ApiError::Forbidden { .. })) => {
                Ok(Requeue::No)
            }
            Err(e) => Err(e),
        }
    }
}

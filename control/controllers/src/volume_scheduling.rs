//! What the scheduler needs to know about a pod's PersistentVolumeClaims
//! (upstream's VolumeBinding plugin, reduced to what skep provisions).
//!
//! Before the node search, [`plan`] resolves every `persistentVolumeClaim`
//! volume of the pod: a missing or deleting claim, a claim bound to a
//! volume that does not exist, or an unbound claim that is not
//! WaitForFirstConsumer makes the pod unschedulable on every node (the
//! message says which). During the search, [`node_misfit`] rejects nodes a
//! bound volume's node affinity excludes, and nodes where an unbound
//! WaitForFirstConsumer claim can be neither bound to an existing volume
//! nor provisioned. Once a node is chosen, the scheduler writes it into
//! each such claim's `volume.kubernetes.io/selected-node` annotation, which
//! the binder and the node's provisioner act on.

use crate::{
    informer::Informer,
    meta,
    pv_binder::{self, ANN_SELECTED_NODE},
};
use serde_json::Value;
use std::{collections::HashMap, sync::Arc};

/// The informers the volume checks read.
#[derive(Debug, Clone)]
pub struct VolumeInformers {
    pub claims: Arc<Informer>,
    pub volumes: Arc<Informer>,
    pub classes: Arc<Informer>,
}

/// One claim of the pod and what it asks of the node.
#[derive(Debug, Clone)]
pub enum ClaimPlan {
    /// Bound: the node must satisfy the volume's node affinity.
    Bound { volume: Arc<Value> },
    /// Unbound, WaitForFirstConsumer: the chosen node decides.
    Delayed {
        /// `namespace/name` of the claim.
        key: String,
        /// Already decided (annotation, or by an earlier decision of this
        /// scheduler not yet visible in the cache).
        selected: Option<String>,
        /// Existing volumes the claim could bind to.
        candidates: Vec<Arc<Value>>,
        /// The class names a provisioner, so a new volume can be made on
        /// any node.
        provisionable: bool,
    },
}

/// Why a node cannot host the pod's volumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeMisfit {
    /// A bound volume's node affinity excludes the node.
    AffinityConflict,
    /// An unbound claim has no volume there and none can be provisioned.
    NoVolume,
}

/// Names of the pod's `persistentVolumeClaim` volumes (claim names).
pub fn claim_names(pod: &Value) -> Vec<String> {
    pod.pointer("/spec/volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| {
            v.pointer("/persistentVolumeClaim/claimName")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .collect()
}

/// Whether `node` satisfies the volume's required node affinity (a volume
/// without one fits everywhere).
pub fn volume_fits_node(pv: &Value, node: &Value) -> bool {
    let Some(terms) = pv
        .pointer("/spec/nodeAffinity/required/nodeSelectorTerms")
        .and_then(Value::as_array)
    else {
        return true;
    };
    let labels = meta::labels(node);
    terms
        .iter()
        .any(|t| crate::scheduler::term_matches(t, &labels, meta::name(node)))
}

/// Resolves the pod's claims; `Err` is the reason no node can take the pod
/// now (worded as upstream's scheduler does).
///
/// `assumed` maps claims this scheduler already chose a node for (claim
/// key → node) whose annotation the cache may not show yet.
pub fn plan(
    pod: &Value,
    inf: &VolumeInformers,
    assumed: &HashMap<String, String>,
) -> Result<Vec<ClaimPlan>, String> {
    let ns = meta::namespace(pod).unwrap_or("default");
    let mut out = Vec::new();
    let classes = inf.classes.list();
    for name in claim_names(pod) {
        let key = format!("{ns}/{name}");
        let Some(pvc) = inf.claims.get(&key) else {
            return Err(format!("persistentvolumeclaim \"{name}\" not found"));
        };
        if meta::is_deleting(&pvc) {
            return Err(format!("persistentvolumeclaim \"{name}\" is being deleted"));
        }
        let volume_name = pv_binder::volume_name(&pvc);
        if !volume_name.is_empty() {
            let Some(volume) = inf.volumes.get(volume_name) else {
                return Err("pvc(s) bound to non-existent pv(s)".into());
            };
            out.push(ClaimPlan::Bound { volume });
            continue;
        }
        let class_name = pv_binder::effective_class(&pvc, &classes);
        let class = (!class_name.is_empty())
            .then(|| inf.classes.get(&class_name))
            .flatten();
        if !class_name.is_empty() && class.is_none() {
            return Err(format!(
                "storageclass.storage.k8s.io \"{class_name}\" not found"
            ));
        }
        if !class
            .as_deref()
            .is_some_and(pv_binder::wait_for_first_consumer)
        {
            // Immediate binding is the binder's job; the pod waits for it.
            return Err("pod has unbound immediate PersistentVolumeClaims".into());
        }
        let selected = meta::annotation(&pvc, ANN_SELECTED_NODE)
            .map(str::to_owned)
            .or_else(|| assumed.get(&key).cloned());
        let candidates = inf
            .volumes
            .list()
            .into_iter()
            .filter(|pv| {
                pv_binder::volume_available_for(pv, &pvc)
                    && pv_binder::volume_matches_claim(pv, &pvc, &class_name)
            })
            .collect();
        out.push(ClaimPlan::Delayed {
            key,
            selected,
            candidates,
            provisionable: class.as_deref().is_some_and(pv_binder::has_provisioner),
        });
    }
    Ok(out)
}

/// The first reason `node` cannot host the planned claims, if any.
pub fn node_misfit(plans: &[ClaimPlan], node: &Value) -> Option<VolumeMisfit> {
    if plans.is_empty() {
        return None;
    }
    let name = meta::name(node);
    for p in plans {
        match p {
            ClaimPlan::Bound { volume } => {
                if !volume_fits_node(volume, node) {
                    return Some(VolumeMisfit::AffinityConflict);
                }
            }
            ClaimPlan::Delayed {
                selected,
                candidates,
                provisionable,
                ..
            } => {
                if let Some(s) = selected {
                    if s != name {
                        return Some(VolumeMisfit::AffinityConflict);
                    }
                    continue;
                }
                if !provisionable && !candidates.iter().any(|pv| volume_fits_node(pv, node)) {
                    return Some(VolumeMisfit::NoVolume);
                }
            }
        }
    }
    None
}

/// Claims the chosen node must be written into (unbound, not yet decided).
pub fn claims_to_select(plans: &[ClaimPlan]) -> Vec<String> {
    plans
        .iter()
        .filter_map(|p| match p {
            ClaimPlan::Delayed {
                key,
                selected: None,
                ..
            } => Some(key.clone()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::json;

    fn node(name: &str) -> Value {
        json!({"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}})
    }

    fn local_pv(node: &str) -> Arc<Value> {
        Arc::new(
            json!({"metadata": {"name": "pv"}, "spec": {"nodeAffinity": {"required": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}}}}),
        )
    }

    #[test]
    fn bound_volumes_pin_the_pod_to_their_node() {
        let plans = vec![ClaimPlan::Bound {
            volume: local_pv("a"),
        }];
        assert_eq!(node_misfit(&plans, &node("a")), None);
        assert_eq!(
            node_misfit(&plans, &node("b")),
            Some(VolumeMisfit::AffinityConflict)
        );
        let anywhere = vec![ClaimPlan::Bound {
            volume: Arc::new(json!({"metadata": {"name": "pv"}, "spec": {}})),
        }];
        assert_eq!(node_misfit(&anywhere, &node("b")), None);
    }

    #[test]
    fn delayed_claims_go_where_a_volume_can_be() {
        let provisioned = vec![ClaimPlan::Delayed {
            key: "ns/c".into(),
            selected: None,
            candidates: vec![],
            provisionable: true,
        }];
        assert_eq!(node_misfit(&provisioned, &node("x")), None);
        assert_eq!(claims_to_select(&provisioned), vec!["ns/c".to_string()]);
        let static_only = vec![ClaimPlan::Delayed {
            key: "ns/c".into(),
            selected: None,
            candidates: vec![local_pv("a")],
            provisionable: false,
        }];
        assert_eq!(node_misfit(&static_only, &node("a")), None);
        assert_eq!(
            node_misfit(&static_only, &node("b")),
            Some(VolumeMisfit::NoVolume)
        );
        let decided = vec![ClaimPlan::Delayed {
            key: "ns/c".into(),
            selected: Some("a".into()),
            candidates: vec![],
            provisionable: true,
        }];
        assert_eq!(node_misfit(&decided, &node("a")), None);
        assert_eq!(
            node_misfit(&decided, &node("b")),
            Some(VolumeMisfit::AffinityConflict)
        );
        assert!(claims_to_select(&decided).is_empty());
    }
}

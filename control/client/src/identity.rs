//! Security identities shared across nodes: the `skep.io/v1`
//! `SecurityIdentity` resource the server's allocator writes and every
//! agent reads, and the label set behind an identity number.
//!
//! Lives here because both the allocator (skep-controllers) and the agents'
//! policy compiler (skep-kubelet) must compute the very same key from a pod,
//! and both already speak JSON objects.
//!
//! Object shape (cluster-scoped, name = the number in decimal):
//!
//! ```yaml
//! apiVersion: skep.io/v1
//! kind: SecurityIdentity
//! metadata: {name: "256"}
//! securityLabels:
//!   k8s:io.kubernetes.pod.namespace: web   # the pod's namespace
//!   pod:app: frontend                      # each pod label
//!   namespace:team: blue                   # each namespace label
//! ```
//!
//! The three prefixes keep the map unambiguous: a pod label can never be
//! mistaken for a namespace label or for the namespace itself (Cilium's
//! single `k8s:` prefix cannot tell a pod label
//! `io.kubernetes.pod.namespace` from the namespace).

use serde_json::{Value, json};
use std::collections::BTreeMap;

pub type Labels = BTreeMap<String, String>;

pub const GROUP: &str = "skep.io";
pub const VERSION: &str = "v1";
pub const KIND: &str = "SecurityIdentity";
pub const PLURAL: &str = "securityidentities";
/// The collection's path.
pub const PATH: &str = "/apis/skep.io/v1/securityidentities";

/// Numbers the cluster allocator hands out: the lower half of the
/// dataplane's pod identity range (`ID_POD_FIRST..ID_CIDR_FIRST`).
pub const CLUSTER_FIRST: u32 = 256;
pub const CLUSTER_LAST: u32 = (1 << 23) - 1;
/// Node-local numbers an agent gives a label set until the allocator's
/// number arrives: the upper half of the pod range, never allocated
/// cluster-wide, so a temporary number can never be mistaken for another
/// label set's shared one.
pub const LOCAL_FIRST: u32 = 1 << 23;
pub const LOCAL_LAST: u32 = (1 << 24) - 1;

/// Kubernetes' label on every namespace with its name; added when the
/// namespace lacks it so selectors by name work (as the policy view does).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

const NS_KEY: &str = "k8s:io.kubernetes.pod.namespace";
const POD_PREFIX: &str = "pod:";
const NAMESPACE_PREFIX: &str = "namespace:";

/// What makes two pods share an identity.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IdentityKey {
    pub namespace: String,
    pub pod_labels: Labels,
    /// With [`NAMESPACE_NAME_LABEL`] (see [`namespace_labels`]).
    pub namespace_labels: Labels,
}

/// A namespace's labels as selectors see them: its own, plus the name label
/// when missing. `labels` is `None` for a namespace not (yet) known.
pub fn namespace_labels(namespace: &str, labels: Option<&Labels>) -> Labels {
    let mut out = labels.cloned().unwrap_or_default();
    out.entry(NAMESPACE_NAME_LABEL.to_owned())
        .or_insert_with(|| namespace.to_owned());
    out
}

fn labels_of(v: Option<&Value>) -> Labels {
    v.and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
        .collect()
}

/// The labels of an object (`metadata.labels`).
pub fn object_labels(obj: &Value) -> Labels {
    labels_of(obj.pointer("/metadata/labels"))
}

/// Whether a pod is (or will be) a policy endpoint with an identity: it
/// has, or will get, its own address (not hostNetwork) and has not ended.
/// The allocator numbers pods from creation on, so the number usually
/// exists before the pod's address does.
pub fn pod_needs_identity(pod: &Value) -> bool {
    let host_network = pod
        .pointer("/spec/hostNetwork")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let phase = pod
        .pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or("");
    !host_network && phase != "Succeeded" && phase != "Failed"
}

impl IdentityKey {
    /// The key of a pod, given its namespace's labels (`None`: unknown).
    pub fn of_pod(pod: &Value, ns_labels: Option<&Labels>) -> Self {
        let namespace = pod
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        Self {
            namespace_labels: namespace_labels(&namespace, ns_labels),
            pod_labels: object_labels(pod),
            namespace,
        }
    }

    /// The `securityLabels` map of this key.
    pub fn security_labels(&self) -> Labels {
        let mut out = Labels::new();
        out.insert(NS_KEY.to_owned(), self.namespace.clone());
        for (k, v) in &self.pod_labels {
            out.insert(format!("{POD_PREFIX}{k}"), v.clone());
        }
        for (k, v) in &self.namespace_labels {
            out.insert(format!("{NAMESPACE_PREFIX}{k}"), v.clone());
        }
        out
    }

    /// The key back from a `securityLabels` map; `None` when it has no
    /// namespace or an entry of no known kind (written by something else).
    pub fn from_security_labels(labels: &Labels) -> Option<Self> {
        let mut key = Self {
            namespace: labels.get(NS_KEY)?.clone(),
            pod_labels: Labels::new(),
            namespace_labels: Labels::new(),
        };
        for (k, v) in labels {
            if k == NS_KEY {
                continue;
            } else if let Some(l) = k.strip_prefix(POD_PREFIX) {
                key.pod_labels.insert(l.to_owned(), v.clone());
            } else if let Some(l) = k.strip_prefix(NAMESPACE_PREFIX) {
                key.namespace_labels.insert(l.to_owned(), v.clone());
            } else {
                return None;
            }
        }
        Some(key)
    }

    /// `k8s:io.kubernetes.pod.namespace=NS` then the pod's `k=v`, as flows
    /// and `skep ctl policy` show an identity.
    pub fn display_labels(&self) -> Vec<String> {
        let mut out = vec![format!("{NS_KEY}={}", self.namespace)];
        out.extend(self.pod_labels.iter().map(|(k, v)| format!("{k}={v}")));
        out
    }
}

/// The SecurityIdentity object numbering `key` as `id`.
pub fn object(id: u32, key: &IdentityKey) -> Value {
    json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": KIND,
        "metadata": {"name": id.to_string()},
        "securityLabels": key.security_labels(),
    })
}

/// The number and key of a SecurityIdentity object; `None` for a name that
/// is not a number of the cluster range or labels that are no key.
pub fn parse_object(obj: &Value) -> Option<(u32, IdentityKey)> {
    let name = obj.pointer("/metadata/name").and_then(Value::as_str)?;
    let id: u32 = name.parse().ok()?;
    if !(CLUSTER_FIRST..=CLUSTER_LAST).contains(&id) || id.to_string() != name {
        return None;
    }
    let key = IdentityKey::from_security_labels(&labels_of(obj.get("securityLabels")))?;
    Some((id, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> IdentityKey {
        IdentityKey {
            namespace: "web".into(),
            pod_labels: Labels::from([
                ("app".into(), "fe".into()),
                ("io.kubernetes.pod.namespace".into(), "evil".into()),
            ]),
            namespace_labels: namespace_labels(
                "web",
                Some(&Labels::from([("team".into(), "b".into())])),
            ),
        }
    }

    #[test]
    fn objects_round_trip_without_ambiguity() {
        let k = key();
        let obj = object(300, &k);
        assert_eq!(obj["metadata"]["name"], "300");
        assert_eq!(
            obj["securityLabels"]["k8s:io.kubernetes.pod.namespace"],
            "web"
        );
        assert_eq!(
            obj["securityLabels"]["pod:io.kubernetes.pod.namespace"],
            "evil"
        );
        assert_eq!(
            obj["securityLabels"]["namespace:kubernetes.io/metadata.name"],
            "web"
        );
        assert_eq!(parse_object(&obj), Some((300, k)));
    }

    #[test]
    fn foreign_objects_are_ignored() {
        let mut obj = object(300, &key());
        obj["securityLabels"]["other"] = json!("x");
        assert_eq!(parse_object(&obj), None, "unknown label kind");
        let local = object(LOCAL_FIRST, &key());
        assert_eq!(parse_object(&local), None, "outside the cluster range");
        let mut padded = object(300, &key());
        padded["metadata"]["name"] = json!("0300");
        assert_eq!(parse_object(&padded), None, "not canonical");
    }

    #[test]
    fn pod_keys_add_the_namespace_name_label() {
        let pod = json!({"metadata": {"namespace": "x", "labels": {"pod": "a"}},
                         "spec": {}, "status": {"phase": "Running"}});
        let k = IdentityKey::of_pod(&pod, None);
        assert_eq!(k.namespace_labels[NAMESPACE_NAME_LABEL], "x");
        assert_eq!(k.pod_labels["pod"], "a");
        assert!(pod_needs_identity(&pod));
        let host = json!({"spec": {"hostNetwork": true}});
        assert!(!pod_needs_identity(&host));
        let done = json!({"status": {"phase": "Succeeded"}});
        assert!(!pod_needs_identity(&done));
    }
}

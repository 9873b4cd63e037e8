//! RBAC authorization: Roles, ClusterRoles, RoleBindings and
//! ClusterRoleBindings, evaluated from an in-memory snapshot that a watch on
//! the store keeps current (so a request never reads the store to be
//! authorized). Members of `system:masters` bypass RBAC, as upstream.

use crate::{api::Api, objects, server::User};
use serde_json::{Value, json};
use skep_store::ListRequest;
use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Duration,
};

/// What a request wants to do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    pub verb: String,
    /// API group; empty for core.
    pub group: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    /// Set for non-resource requests (`/healthz`, `/api`, …).
    pub path: Option<String>,
}

#[derive(Debug, Clone, Default)]
struct Rule {
    verbs: Vec<String>,
    groups: Vec<String>,
    resources: Vec<String>,
    names: Vec<String>,
    urls: Vec<String>,
}

impl Rule {
    fn from_json(v: &Value) -> Self {
        let list = |k: &str| -> Vec<String> {
            v.get(k)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        Self {
            verbs: list("verbs"),
            groups: list("apiGroups"),
            resources: list("resources"),
            names: list("resourceNames"),
            urls: list("nonResourceURLs"),
        }
    }

    fn allows(&self, a: &Attributes) -> bool {
        let any = |l: &[String], x: &str| l.iter().any(|i| i == "*" || i == x);
        if !any(&self.verbs, &a.verb) {
            return false;
        }
        if let Some(path) = &a.path {
            return self.urls.iter().any(|u| {
                u == "*" || u == path || u.strip_suffix('*').is_some_and(|p| path.starts_with(p))
            });
        }
        let resource = if a.subresource.is_empty() {
            a.resource.clone()
        } else {
            format!("{}/{}", a.resource, a.subresource)
        };
        let resource_ok = self.resources.iter().any(|r| {
            r == "*"
                || *r == resource
                || (!a.subresource.is_empty() && *r == format!("*/{}", a.subresource))
                || (!a.subresource.is_empty() && r.strip_suffix("/*") == Some(a.resource.as_str()))
        });
        any(&self.groups, &a.group)
            && resource_ok
            && (self.names.is_empty() || (!a.name.is_empty() && self.names.contains(&a.name)))
    }
}

#[derive(Debug, Clone)]
struct Binding {
    /// Namespace of a RoleBinding; None for ClusterRoleBindings.
    namespace: Option<String>,
    role_kind: String,
    role_name: String,
    subjects: Vec<(String, String, String)>, // kind, name, namespace
}

/// The RBAC objects, by key.
#[derive(Debug, Default)]
struct Snapshot {
    roles: HashMap<(String, String), Vec<Rule>>, // (ns, name)
    cluster_roles: HashMap<String, Vec<Rule>>,
    bindings: Vec<Binding>,
}

/// The authorizer; cheap to share.
#[derive(Debug, Default)]
pub struct Authorizer {
    snapshot: RwLock<Snapshot>,
}

fn rules_of(v: &Value) -> Vec<Rule> {
    v.get("rules")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(Rule::from_json).collect())
        .unwrap_or_default()
}

fn binding_of(v: &Value, namespaced: bool) -> Binding {
    let subjects = v
        .get("subjects")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|s| {
                    let f = |k: &str| s.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                    (f("kind"), f("name"), f("namespace"))
                })
                .collect()
        })
        .unwrap_or_default();
    Binding {
        namespace: namespaced.then(|| objects::namespace(v).unwrap_or("").to_owned()),
        role_kind: v
            .pointer("/roleRef/kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
        role_name: v
            .pointer("/roleRef/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
        subjects,
    }
}

fn subject_matches(user: &User, (kind, name, namespace): &(String, String, String)) -> bool {
    match kind.as_str() {
        "User" => *name == user.name,
        "Group" => user.groups.iter().any(|g| g == name),
        "ServiceAccount" => user.name == format!("system:serviceaccount:{namespace}:{name}"),
        _ => false,
    }
}

impl Authorizer {
    /// Whether `user` may do `a`, and why (for SubjectAccessReview).
    pub fn authorize(&self, user: &User, a: &Attributes) -> (bool, String) {
        if user.groups.iter().any(|g| g == "system:masters") {
            return (true, "the user is a member of system:masters".into());
        }
        let snap = self.snapshot.read().unwrap_or_else(|e| e.into_inner());
        for b in &snap.bindings {
            if !b.subjects.iter().any(|s| subject_matches(user, s)) {
                continue;
            }
            // A RoleBinding only grants within its namespace.
            if let Some(ns) = &b.namespace
                && (a.path.is_some() || *ns != a.namespace)
            {
                continue;
            }
            let rules = match (b.role_kind.as_str(), &b.namespace) {
                ("ClusterRole", _) => snap.cluster_roles.get(&b.role_name),
                ("Role", Some(ns)) => snap.roles.get(&(ns.clone(), b.role_name.clone())),
                _ => None,
            };
            if rules.is_some_and(|rules| rules.iter().any(|r| r.allows(a))) {
                let how = match &b.namespace {
                    Some(ns) => format!("RoleBinding {ns}/… to {} {}", b.role_kind, b.role_name),
                    None => format!("ClusterRoleBinding to ClusterRole {}", b.role_name),
                };
                return (true, format!("RBAC: allowed by {how}"));
            }
        }
        (false, String::new())
    }

    fn rebuild(
        &self,
        roles: Vec<Value>,
        cluster_roles: Vec<Value>,
        bindings: Vec<Value>,
        cluster_bindings: Vec<Value>,
    ) {
        let mut snap = Snapshot::default();
        for r in roles {
            snap.roles.insert(
                (
                    objects::namespace(&r).unwrap_or("").to_owned(),
                    objects::name(&r).to_owned(),
                ),
                rules_of(&r),
            );
        }
        for r in cluster_roles {
            snap.cluster_roles
                .insert(objects::name(&r).to_owned(), rules_of(&r));
        }
        snap.bindings
            .extend(bindings.iter().map(|b| binding_of(b, true)));
        snap.bindings
            .extend(cluster_bindings.iter().map(|b| binding_of(b, false)));
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = snap;
    }
}

const PLURALS: [&str; 4] = [
    "roles",
    "clusterroles",
    "rolebindings",
    "clusterrolebindings",
];

async fn load(api: &Api) -> Result<(i64, [Vec<Value>; 4]), skep_store::StoreError> {
    let revision = api.store.revision().await?;
    let mut out: [Vec<Value>; 4] = Default::default();
    for (i, plural) in PLURALS.iter().enumerate() {
        let Some(info) = api
            .registry
            .lookup("rbac.authorization.k8s.io", "v1", plural)
        else {
            continue;
        };
        let page = api
            .store
            .list(ListRequest {
                prefix: &info.storage_prefix(),
                revision: Some(revision),
                ..Default::default()
            })
            .await?;
        out[i] = page
            .items
            .iter()
            .filter_map(|kv| objects::from_kv(kv).ok())
            .collect();
    }
    Ok((revision, out))
}

/// Loads the RBAC objects once, so the server authorizes correctly from its
/// first request (the watch in [`sync`] keeps it current afterwards).
pub async fn initial_load(
    api: &Api,
    authorizer: &Authorizer,
) -> Result<(), skep_store::StoreError> {
    let (_, [roles, cluster_roles, bindings, cluster_bindings]) = load(api).await?;
    authorizer.rebuild(roles, cluster_roles, bindings, cluster_bindings);
    Ok(())
}

/// Keeps `authorizer` in step with the stored RBAC objects.
pub async fn sync(api: Arc<Api>, authorizer: Arc<Authorizer>) {
    // One watch over all of rbac.authorization.k8s.io; any change reloads
    // the (small) set of RBAC objects.
    let prefix = "/registry/rbac.authorization.k8s.io/";
    loop {
        match load(&api).await {
            Ok((revision, [roles, cluster_roles, bindings, cluster_bindings])) => {
                authorizer.rebuild(roles, cluster_roles, bindings, cluster_bindings);
                match api.store.watch(prefix, revision).await {
                    Ok(mut w) => {
                        // Wait for a change, then reload.
                        if w.next().await.is_none() {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "RBAC watch failed; reloading");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "loading RBAC objects failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The default roles every cluster has, as upstream names them.
pub fn bootstrap_objects() -> Vec<(&'static str, Value)> {
    let cr = |name: &str, rules: Value| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
               "rules": rules})
    };
    let crb = |name: &str, role: &str, subjects: Value| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
               "subjects": subjects})
    };
    let read = json!(["get", "list", "watch"]);
    let write = json!([
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch"
    ]);
    let workloads = json!([
        "pods",
        "pods/log",
        "pods/status",
        "services",
        "endpoints",
        "configmaps",
        "persistentvolumeclaims",
        "serviceaccounts",
        "events",
        "replicationcontrollers",
        "deployments",
        "deployments/scale",
        "replicasets",
        "replicasets/scale",
        "statefulsets",
        "statefulsets/scale",
        "daemonsets",
        "jobs",
        "cronjobs",
        "horizontalpodautoscalers",
        "networkpolicies",
        "ingresses",
        "endpointslices",
        "poddisruptionbudgets",
        "leases",
        "controllerrevisions"
    ]);
    let groups = json!([
        "",
        "apps",
        "batch",
        "autoscaling",
        "networking.k8s.io",
        "discovery.k8s.io",
        "policy",
        // PodMetrics (`kubectl top pod`) for whoever may read pods.
        "metrics.k8s.io",
        "coordination.k8s.io"
    ]);
    vec![
        (
            "clusterroles",
            cr(
                "cluster-admin",
                json!([
            {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
            {"nonResourceURLs": ["*"], "verbs": ["*"]}]),
            ),
        ),
        (
            "clusterroles",
            cr(
                "admin",
                json!([
            {"apiGroups": groups, "resources": workloads, "verbs": write},
            {"apiGroups": [""], "resources": ["secrets", "pods/exec", "pods/attach", "pods/portforward", "serviceaccounts/token"], "verbs": write},
            {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"], "verbs": write}]),
            ),
        ),
        (
            "clusterroles",
            cr(
                "edit",
                json!([
            {"apiGroups": groups, "resources": workloads, "verbs": write},
            {"apiGroups": [""], "resources": ["secrets", "pods/exec", "pods/attach", "pods/portforward"], "verbs": write}]),
            ),
        ),
        (
            "clusterroles",
            cr(
                "view",
                json!([{"apiGroups": groups, "resources": workloads, "verbs": read}]),
            ),
        ),
        (
            "clusterroles",
            cr(
                "system:discovery",
                json!([{"nonResourceURLs": ["/api", "/api/*", "/apis", "/apis/*", "/openapi", "/openapi/*", "/version", "/version/"], "verbs": ["get"]}]),
            ),
        ),
        (
            "clusterroles",
            cr(
                "system:public-info-viewer",
                json!([{"nonResourceURLs": ["/healthz", "/livez", "/readyz", "/version", "/version/"], "verbs": ["get"]}]),
            ),
        ),
        (
            "clusterroles",
            cr(
                "system:basic-user",
                json!([
            {"apiGroups": ["authorization.k8s.io"], "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"], "verbs": ["create"]},
            {"apiGroups": ["authentication.k8s.io"], "resources": ["selfsubjectreviews"], "verbs": ["create"]}]),
            ),
        ),
        // Nodes: what the kubelet and dataplane of an agent need.
        (
            "clusterroles",
            cr(
                "system:node",
                json!([
            {"apiGroups": [""], "resources": ["nodes", "nodes/status", "pods", "pods/status", "events", "configmaps", "secrets", "services", "endpoints", "serviceaccounts/token", "persistentvolumeclaims", "persistentvolumes", "namespaces"], "verbs": write},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": write},
            {"apiGroups": ["discovery.k8s.io", "networking.k8s.io"], "resources": ["*"], "verbs": read},
            {"apiGroups": ["skep.io"], "resources": ["securityidentities"], "verbs": ["get", "list", "watch", "create"]}]),
            ),
        ),
        // Scrapers of the API server's /metrics (kube-apiserver's role).
        (
            "clusterroles",
            cr(
                "system:monitoring",
                json!([{"nonResourceURLs": ["/healthz", "/healthz/*", "/livez", "/livez/*", "/readyz", "/readyz/*", "/metrics"], "verbs": ["get"]}]),
            ),
        ),
        (
            "clusterrolebindings",
            crb(
                "system:monitoring",
                "system:monitoring",
                json!([{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:monitoring"}]),
            ),
        ),
        (
            "clusterrolebindings",
            crb(
                "cluster-admin",
                "cluster-admin",
                json!([{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:masters"}]),
            ),
        ),
        (
            "clusterrolebindings",
            crb(
                "system:discovery",
                "system:discovery",
                json!([{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:authenticated"}]),
            ),
        ),
        (
            "clusterrolebindings",
            crb(
                "system:public-info-viewer",
                "system:public-info-viewer",
                json!([{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:authenticated"}, {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:unauthenticated"}]),
            ),
        ),
        (
            "clusterrolebindings",
            crb(
                "system:basic-user",
                "system:basic-user",
                json!([{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:authenticated"}]),
            ),
        ),
        (
            "clusterrolebindings",
            crb(
                "system:node",
                "system:node",
                json!([{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:nodes"}]),
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, groups: &[&str]) -> User {
        User {
            name: name.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    fn attrs(
        verb: &str,
        group: &str,
        resource: &str,
        sub: &str,
        ns: &str,
        name: &str,
    ) -> Attributes {
        Attributes {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            subresource: sub.into(),
            namespace: ns.into(),
            name: name.into(),
            path: None,
        }
    }

    #[test]
    fn role_bindings_grant_within_their_namespace_only() {
        let a = Authorizer::default();
        let role = json!({"metadata": {"name": "cm-reader", "namespace": "team"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"], "resourceNames": []}]});
        let named = json!({"metadata": {"name": "one-secret", "namespace": "team"},
            "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"], "resourceNames": ["token"]}]});
        let rb = json!({"metadata": {"name": "b", "namespace": "team"},
            "roleRef": {"kind": "Role", "name": "cm-reader"}, "subjects": [{"kind": "User", "name": "alice"}]});
        let rb2 = json!({"metadata": {"name": "b2", "namespace": "team"},
            "roleRef": {"kind": "Role", "name": "one-secret"}, "subjects": [{"kind": "ServiceAccount", "name": "bot", "namespace": "team"}]});
        let crb = json!({"metadata": {"name": "c"}, "roleRef": {"kind": "ClusterRole", "name": "view-pods"},
            "subjects": [{"kind": "Group", "name": "devs"}]});
        let cr = json!({"metadata": {"name": "view-pods"}, "rules": [{"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get"]}]});
        a.rebuild(vec![role, named], vec![cr], vec![rb, rb2], vec![crb]);
        let alice = user("alice", &["system:authenticated"]);
        assert!(
            a.authorize(&alice, &attrs("list", "", "configmaps", "", "team", ""))
                .0
        );
        assert!(
            !a.authorize(&alice, &attrs("list", "", "configmaps", "", "other", ""))
                .0
        );
        assert!(
            !a.authorize(&alice, &attrs("create", "", "configmaps", "", "team", ""))
                .0
        );
        let bot = user(
            "system:serviceaccount:team:bot",
            &["system:serviceaccounts"],
        );
        assert!(
            a.authorize(&bot, &attrs("get", "", "secrets", "", "team", "token"))
                .0
        );
        assert!(
            !a.authorize(&bot, &attrs("get", "", "secrets", "", "team", "other"))
                .0
        );
        let dev = user("bob", &["devs"]);
        assert!(
            a.authorize(&dev, &attrs("get", "", "pods", "log", "any", "p"))
                .0
        );
        assert!(
            !a.authorize(&dev, &attrs("get", "", "pods", "exec", "any", "p"))
                .0
        );
        assert!(
            a.authorize(
                &user("root", &["system:masters"]),
                &attrs("delete", "x", "y", "", "", "")
            )
            .0
        );
    }
}

//! The registry of API resources the server serves: group, version, kind,
//! plural, scope, short names and subresources. Discovery, routing, storage
//! keys and Table output all start here.

use std::sync::{Arc, RwLock};

/// One served resource (one group/version/plural).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceInfo {
    /// API group; empty for the core group.
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub singular: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    /// Subresources served under `<name>/<sub>`.
    pub subresources: Vec<String>,
    /// Verbs on the main resource.
    pub verbs: Vec<String>,
    /// Structural schema of custom resources (`openAPIV3Schema`); built-in
    /// types are validated by `validation` instead.
    pub schema: Option<serde_json::Value>,
}

impl ResourceInfo {
    /// `v1` or `apps/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// `pods` or `deployments.apps`: how errors name the resource.
    pub fn group_resource(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// Storage prefix of all objects of this resource, ending in `/`.
    /// Core resources use `/registry/<plural>/`, others
    /// `/registry/<group>/<plural>/`, as kube-apiserver does for most.
    pub fn storage_prefix(&self) -> String {
        if self.group.is_empty() {
            format!("/registry/{}/", self.plural)
        } else {
            format!("/registry/{}/{}/", self.group, self.plural)
        }
    }

    /// Storage prefix of one namespace (or of everything for cluster-scoped
    /// resources and all-namespace lists).
    pub fn prefix_in(&self, namespace: Option<&str>) -> String {
        match (self.namespaced, namespace) {
            (true, Some(ns)) => format!("{}{}/", self.storage_prefix(), ns),
            _ => self.storage_prefix(),
        }
    }

    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        format!("{}{}", self.prefix_in(namespace), name)
    }

    pub fn has_subresource(&self, sub: &str) -> bool {
        self.subresources.iter().any(|s| s == sub)
    }

    /// Resources that only accept `create` (reviews), never stored.
    pub fn is_virtual(&self) -> bool {
        self.verbs == ["create"]
    }
}

const ALL_VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

struct Def {
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
    short: &'static [&'static str],
    subresources: &'static [&'static str],
    all: bool,
    create_only: bool,
}

const fn def(
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
    short: &'static [&'static str],
    subresources: &'static [&'static str],
) -> Def {
    Def {
        group,
        version,
        kind,
        plural,
        namespaced,
        short,
        subresources,
        all: false,
        create_only: false,
    }
}

const fn in_all(mut d: Def) -> Def {
    d.all = true;
    d
}

const fn create_only(mut d: Def) -> Def {
    d.create_only = true;
    d
}

/// The built-in resources.
const BUILTIN: &[Def] = &[
    // core/v1
    def(
        "",
        "v1",
        "Namespace",
        "namespaces",
        false,
        &["ns"],
        &["status", "finalize"],
    ),
    in_all(def(
        "",
        "v1",
        "Pod",
        "pods",
        true,
        &["po"],
        &[
            "status",
            "binding",
            "eviction",
            "log",
            "exec",
            "attach",
            "portforward",
            "ephemeralcontainers",
        ],
    )),
    in_all(def(
        "",
        "v1",
        "Service",
        "services",
        true,
        &["svc"],
        &["status", "proxy"],
    )),
    def("", "v1", "Endpoints", "endpoints", true, &["ep"], &[]),
    def("", "v1", "ConfigMap", "configmaps", true, &["cm"], &[]),
    def("", "v1", "Secret", "secrets", true, &[], &[]),
    def(
        "",
        "v1",
        "ServiceAccount",
        "serviceaccounts",
        true,
        &["sa"],
        &["token"],
    ),
    def(
        "",
        "v1",
        "Node",
        "nodes",
        false,
        &["no"],
        &["status", "proxy"],
    ),
    def("", "v1", "Event", "events", true, &["ev"], &[]),
    def(
        "",
        "v1",
        "PersistentVolumeClaim",
        "persistentvolumeclaims",
        true,
        &["pvc"],
        &["status"],
    ),
    def(
        "",
        "v1",
        "PersistentVolume",
        "persistentvolumes",
        false,
        &["pv"],
        &["status"],
    ),
    in_all(def(
        "",
        "v1",
        "ReplicationController",
        "replicationcontrollers",
        true,
        &["rc"],
        &["status", "scale"],
    )),
    def(
        "",
        "v1",
        "ResourceQuota",
        "resourcequotas",
        true,
        &["quota"],
        &["status"],
    ),
    def(
        "",
        "v1",
        "LimitRange",
        "limitranges",
        true,
        &["limits"],
        &[],
    ),
    def("", "v1", "PodTemplate", "podtemplates", true, &[], &[]),
    // apps/v1
    in_all(def(
        "apps",
        "v1",
        "Deployment",
        "deployments",
        true,
        &["deploy"],
        &["status", "scale"],
    )),
    in_all(def(
        "apps",
        "v1",
        "ReplicaSet",
        "replicasets",
        true,
        &["rs"],
        &["status", "scale"],
    )),
    in_all(def(
        "apps",
        "v1",
        "StatefulSet",
        "statefulsets",
        true,
        &["sts"],
        &["status", "scale"],
    )),
    in_all(def(
        "apps",
        "v1",
        "DaemonSet",
        "daemonsets",
        true,
        &["ds"],
        &["status"],
    )),
    def(
        "apps",
        "v1",
        "ControllerRevision",
        "controllerrevisions",
        true,
        &[],
        &[],
    ),
    // batch/v1
    in_all(def("batch", "v1", "Job", "jobs", true, &[], &["status"])),
    in_all(def(
        "batch",
        "v1",
        "CronJob",
        "cronjobs",
        true,
        &["cj"],
        &["status"],
    )),
    // autoscaling
    in_all(def(
        "autoscaling",
        "v2",
        "HorizontalPodAutoscaler",
        "horizontalpodautoscalers",
        true,
        &["hpa"],
        &["status"],
    )),
    in_all(def(
        "autoscaling",
        "v1",
        "HorizontalPodAutoscaler",
        "horizontalpodautoscalers",
        true,
        &["hpa"],
        &["status"],
    )),
    // networking
    def(
        "networking.k8s.io",
        "v1",
        "NetworkPolicy",
        "networkpolicies",
        true,
        &["netpol"],
        &[],
    ),
    def(
        "networking.k8s.io",
        "v1",
        "Ingress",
        "ingresses",
        true,
        &["ing"],
        &["status"],
    ),
    def(
        "networking.k8s.io",
        "v1",
        "IngressClass",
        "ingressclasses",
        false,
        &[],
        &[],
    ),
    def(
        "discovery.k8s.io",
        "v1",
        "EndpointSlice",
        "endpointslices",
        true,
        &[],
        &[],
    ),
    def(
        "coordination.k8s.io",
        "v1",
        "Lease",
        "leases",
        true,
        &[],
        &[],
    ),
    def(
        "policy",
        "v1",
        "PodDisruptionBudget",
        "poddisruptionbudgets",
        true,
        &["pdb"],
        &["status"],
    ),
    def(
        "scheduling.k8s.io",
        "v1",
        "PriorityClass",
        "priorityclasses",
        false,
        &["pc"],
        &[],
    ),
    def(
        "storage.k8s.io",
        "v1",
        "StorageClass",
        "storageclasses",
        false,
        &["sc"],
        &[],
    ),
    // rbac
    def(
        "rbac.authorization.k8s.io",
        "v1",
        "Role",
        "roles",
        true,
        &[],
        &[],
    ),
    def(
        "rbac.authorization.k8s.io",
        "v1",
        "RoleBinding",
        "rolebindings",
        true,
        &[],
        &[],
    ),
    def(
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRole",
        "clusterroles",
        false,
        &[],
        &[],
    ),
    def(
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRoleBinding",
        "clusterrolebindings",
        false,
        &[],
        &[],
    ),
    // CRDs
    def(
        "apiextensions.k8s.io",
        "v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
        false,
        &["crd", "crds"],
        &["status"],
    ),
    // skep's own: pod security identities shared by every node (the
    // allocator in skep-controllers' `identity`; agents read them).
    def(
        "skep.io",
        "v1",
        "SecurityIdentity",
        "securityidentities",
        false,
        &["sid"],
        &[],
    ),
    // reviews (create only, never stored)
    create_only(def(
        "authorization.k8s.io",
        "v1",
        "SelfSubjectAccessReview",
        "selfsubjectaccessreviews",
        false,
        &[],
        &[],
    )),
    create_only(def(
        "authorization.k8s.io",
        "v1",
        "SubjectAccessReview",
        "subjectaccessreviews",
        false,
        &[],
        &[],
    )),
    create_only(def(
        "authorization.k8s.io",
        "v1",
        "SelfSubjectRulesReview",
        "selfsubjectrulesreviews",
        false,
        &[],
        &[],
    )),
    create_only(def(
        "authentication.k8s.io",
        "v1",
        "TokenReview",
        "tokenreviews",
        false,
        &[],
        &[],
    )),
    create_only(def(
        "authentication.k8s.io",
        "v1",
        "SelfSubjectReview",
        "selfsubjectreviews",
        false,
        &[],
        &[],
    )),
];

/// The group versions served, in discovery order (preferred first within a
/// group).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupVersions {
    pub group: String,
    pub versions: Vec<String>,
}

/// All served resources. Custom resources are added and removed at run time
/// as CRDs come and go, hence the lock.
#[derive(Debug, Default)]
pub struct Registry {
    resources: RwLock<Vec<Arc<ResourceInfo>>>,
    /// Bumped on every change, so derived documents (OpenAPI) know when to
    /// rebuild.
    generation: std::sync::atomic::AtomicU64,
}

impl Registry {
    pub fn builtin() -> Self {
        let resources = BUILTIN
            .iter()
            .map(|d| {
                Arc::new(ResourceInfo {
                    group: d.group.into(),
                    version: d.version.into(),
                    kind: d.kind.into(),
                    plural: d.plural.into(),
                    singular: d.kind.to_lowercase(),
                    namespaced: d.namespaced,
                    short_names: d.short.iter().map(|s| s.to_string()).collect(),
                    categories: if d.all { vec!["all".into()] } else { vec![] },
                    subresources: d.subresources.iter().map(|s| s.to_string()).collect(),
                    verbs: if d.create_only {
                        vec!["create".into()]
                    } else {
                        ALL_VERBS.iter().map(|s| s.to_string()).collect()
                    },
                    schema: None,
                })
            })
            .collect();
        Self {
            resources: RwLock::new(resources),
            generation: Default::default(),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<ResourceInfo>>> {
        // A poisoned lock only means a panic elsewhere while holding it; the
        // Vec itself is always consistent (writes are single push/retain).
        self.resources.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn lookup(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceInfo>> {
        self.read()
            .iter()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
            .cloned()
    }

    /// The resource a kind is stored as (its first, preferred version).
    pub fn by_kind(&self, group: &str, kind: &str) -> Option<Arc<ResourceInfo>> {
        self.read()
            .iter()
            .find(|r| r.group == group && r.kind == kind)
            .cloned()
    }

    pub fn in_group_version(&self, group: &str, version: &str) -> Vec<Arc<ResourceInfo>> {
        self.read()
            .iter()
            .filter(|r| r.group == group && r.version == version)
            .cloned()
            .collect()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    fn bump(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    pub fn all(&self) -> Vec<Arc<ResourceInfo>> {
        self.read().clone()
    }

    /// Groups and their versions, core group first.
    pub fn groups(&self) -> Vec<GroupVersions> {
        let mut out: Vec<GroupVersions> = Vec::new();
        for r in self.read().iter() {
            match out.iter_mut().find(|g| g.group == r.group) {
                Some(g) => {
                    if !g.versions.contains(&r.version) {
                        g.versions.push(r.version.clone());
                    }
                }
                None => out.push(GroupVersions {
                    group: r.group.clone(),
                    versions: vec![r.version.clone()],
                }),
            }
        }
        out
    }

    /// Adds (or replaces) a resource, for custom resources.
    pub fn upsert(&self, info: ResourceInfo) {
        let mut w = self.resources.write().unwrap_or_else(|e| e.into_inner());
        w.retain(|r| {
            !(r.group == info.group && r.version == info.version && r.plural == info.plural)
        });
        w.push(Arc::new(info));
        drop(w);
        self.bump();
    }

    /// Removes every version of a custom resource.
    pub fn remove(&self, group: &str, plural: &str) {
        let mut w = self.resources.write().unwrap_or_else(|e| e.into_inner());
        w.retain(|r| !(r.group == group && r.plural == plural));
        drop(w);
        self.bump();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_keys_follow_kube_apiserver() {
        let reg = Registry::builtin();
        let pods = reg.lookup("", "v1", "pods").unwrap();
        assert_eq!(
            pods.key(Some("default"), "web"),
            "/registry/pods/default/web"
        );
        let deploy = reg.lookup("apps", "v1", "deployments").unwrap();
        assert_eq!(
            deploy.key(Some("ns"), "d"),
            "/registry/apps/deployments/ns/d"
        );
        let nodes = reg.lookup("", "v1", "nodes").unwrap();
        assert_eq!(nodes.key(Some("ignored"), "n1"), "/registry/nodes/n1");
        assert_eq!(deploy.group_resource(), "deployments.apps");
    }

    #[test]
    fn groups_list_core_first_and_every_version() {
        let reg = Registry::builtin();
        let groups = reg.groups();
        assert_eq!(groups[0].group, "");
        let autoscaling = groups.iter().find(|g| g.group == "autoscaling").unwrap();
        assert_eq!(autoscaling.versions, ["v2", "v1"]);
    }
}

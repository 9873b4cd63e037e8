//! The docker labels that tie a container to its pod, so a restarted agent
//! finds (and re-adopts) everything it started before, and the names
//! containers get (readable in `docker ps`, unique per attempt).

use std::collections::HashMap;

use crate::runtime::ContainerLabels;

pub(crate) const POD_UID: &str = "io.skep.pod-uid";
pub(crate) const POD_NAMESPACE: &str = "io.skep.pod-namespace";
pub(crate) const POD_NAME: &str = "io.skep.pod-name";
pub(crate) const CONTAINER_NAME: &str = "io.skep.container-name";
pub(crate) const ATTEMPT: &str = "io.skep.attempt";
pub(crate) const INIT: &str = "io.skep.init";
/// Where the container's CRI log goes (needed again after a restart).
pub(crate) const LOG_PATH: &str = "io.skep.log-path";
/// Marks a pod's pause container; its value is the netns path it backs.
pub(crate) const SANDBOX: &str = "io.skep.sandbox-netns";

/// The first 8 characters of a pod UID: enough to keep names of pods that
/// share namespace/name (a deleted and recreated pod) apart.
fn short_uid(uid: &str) -> &str {
    uid.get(..8).unwrap_or(uid)
}

/// `skep_<pod>_<ns>_<container>_<attempt>_<short uid>`.
pub(crate) fn container_name(l: &ContainerLabels) -> String {
    format!(
        "skep_{}_{}_{}_{}_{}",
        l.pod_name,
        l.pod_namespace,
        l.container_name,
        l.attempt,
        short_uid(&l.pod_uid)
    )
}

/// `skep_<pod>_<ns>_POD_<short uid>` for the pause container.
pub(crate) fn sandbox_name(l: &ContainerLabels) -> String {
    format!(
        "skep_{}_{}_POD_{}",
        l.pod_name,
        l.pod_namespace,
        short_uid(&l.pod_uid)
    )
}

pub(crate) fn pod_labels(l: &ContainerLabels) -> HashMap<String, String> {
    HashMap::from([
        (POD_UID.to_owned(), l.pod_uid.clone()),
        (POD_NAMESPACE.to_owned(), l.pod_namespace.clone()),
        (POD_NAME.to_owned(), l.pod_name.clone()),
    ])
}

pub(crate) fn to_docker(
    l: &ContainerLabels,
    log_path: &std::path::Path,
) -> HashMap<String, String> {
    let mut m = pod_labels(l);
    m.insert(CONTAINER_NAME.to_owned(), l.container_name.clone());
    m.insert(ATTEMPT.to_owned(), l.attempt.to_string());
    m.insert(INIT.to_owned(), l.init.to_string());
    m.insert(LOG_PATH.to_owned(), log_path.to_string_lossy().into_owned());
    m
}

/// The labels of an app container; None for anything else (pause
/// containers, containers someone else started).
pub(crate) fn from_docker(m: &HashMap<String, String>) -> Option<ContainerLabels> {
    if m.contains_key(SANDBOX) {
        return None;
    }
    Some(ContainerLabels {
        pod_uid: m.get(POD_UID)?.clone(),
        pod_namespace: m.get(POD_NAMESPACE)?.clone(),
        pod_name: m.get(POD_NAME)?.clone(),
        container_name: m.get(CONTAINER_NAME)?.clone(),
        attempt: m.get(ATTEMPT)?.parse().ok()?,
        init: m.get(INIT).is_some_and(|v| v == "true"),
    })
}

/// A `label=` filter for list_containers.
pub(crate) fn filter(label: &str) -> HashMap<String, Vec<String>> {
    HashMap::from([("label".to_owned(), vec![label.to_owned()])])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn labels_round_trip() {
        let l = ContainerLabels {
            pod_uid: "0123456789abcdef".into(),
            pod_namespace: "default".into(),
            pod_name: "web".into(),
            container_name: "app".into(),
            attempt: 2,
            init: true,
        };
        let m = to_docker(&l, std::path::Path::new("/x.log"));
        assert_eq!(from_docker(&m).unwrap(), l);
        assert_eq!(container_name(&l), "skep_web_default_app_2_01234567");
        assert_eq!(sandbox_name(&l), "skep_web_default_POD_01234567");
    }
}

//! A ContainerSpec as docker's create request.

use bollard::models::{ContainerCreateBody, HostConfig, RestartPolicy, RestartPolicyNameEnum};

use super::labels;
use crate::runtime::{ContainerSpec, Resources};

/// CFS period the CPU limit is expressed in (the kubelet's default).
const CPU_PERIOD: i64 = 100_000;

/// `pause`: the pod's pause container ID (None for a hostNetwork pod);
/// `image_user`: the image's USER, for a runAsGroup without runAsUser.
pub(crate) fn body(
    spec: &ContainerSpec,
    pause: Option<&str>,
    image_user: Option<&str>,
) -> ContainerCreateBody {
    let (network_mode, ipc_mode, uts_mode) = match pause {
        Some(p) => (
            format!("container:{p}"),
            Some(format!("container:{p}")),
            None,
        ),
        None => ("host".to_owned(), None, Some("host".to_owned())),
    };
    let binds = spec
        .mounts
        .iter()
        .map(|m| {
            format!(
                "{}:{}{}",
                m.host_path.display(),
                m.container_path,
                if m.read_only { ":ro" } else { "" }
            )
        })
        .collect();
    let mut host = HostConfig {
        binds: Some(binds),
        network_mode: Some(network_mode),
        ipc_mode,
        uts_mode,
        group_add: Some(
            spec.supplemental_groups
                .iter()
                .map(u32::to_string)
                .collect(),
        ),
        // The pod manager restarts containers, not docker.
        restart_policy: Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::NO),
            maximum_retry_count: None,
        }),
        ..Default::default()
    };
    resources(&mut host, &spec.resources);
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        // Kubernetes' rules were applied already: a non-empty command
        // replaces the image's entrypoint, args its cmd.
        entrypoint: (!spec.command.is_empty()).then(|| spec.command.clone()),
        cmd: (!spec.command.is_empty() || !spec.args.is_empty()).then(|| spec.args.clone()),
        env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        working_dir: spec.working_dir.clone(),
        user: user(spec.run_as_user, spec.run_as_group, image_user),
        labels: Some(labels::to_docker(&spec.labels, &spec.log_path)),
        tty: Some(spec.tty),
        open_stdin: Some(spec.stdin),
        stdin_once: Some(spec.stdin_once),
        attach_stdin: Some(false),
        attach_stdout: Some(false),
        attach_stderr: Some(false),
        host_config: Some(host),
        ..Default::default()
    }
}

fn resources(host: &mut HostConfig, r: &Resources) {
    if let Some(m) = r.memory_limit_bytes.and_then(|m| i64::try_from(m).ok()) {
        host.memory = Some(m);
        // No swap on top of the limit, as the kubelet does.
        host.memory_swap = Some(m);
    }
    if let Some(c) = r.cpu_limit_millis.and_then(|c| i64::try_from(c).ok()) {
        host.cpu_period = Some(CPU_PERIOD);
        // The kernel's minimum quota is 1ms.
        host.cpu_quota = Some((c * CPU_PERIOD / 1000).max(1000));
    }
    if let Some(c) = r.cpu_request_millis.and_then(|c| i64::try_from(c).ok()) {
        host.cpu_shares = Some((c * 1024 / 1000).max(2));
    }
}

fn user(uid: Option<u32>, gid: Option<u32>, image_user: Option<&str>) -> Option<String> {
    match (uid, gid) {
        (Some(u), Some(g)) => Some(format!("{u}:{g}")),
        (Some(u), None) => Some(u.to_string()),
        (None, Some(g)) => {
            let u = image_user
                .and_then(|s| s.split(':').next())
                .filter(|s| !s.is_empty())
                .unwrap_or("0");
            Some(format!("{u}:{g}"))
        }
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users() {
        assert_eq!(user(Some(1), Some(2), None).as_deref(), Some("1:2"));
        assert_eq!(user(None, Some(2), Some("app:x")).as_deref(), Some("app:2"));
        assert_eq!(user(None, None, Some("app")), None);
    }
}

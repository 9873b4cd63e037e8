//! Docker's container state (inspect) in the runtime's terms.

use bollard::models::ContainerState as DockerState;
use chrono::{DateTime, Utc};

use crate::runtime::ContainerState;

/// Docker's times; its zero time (`0001-01-01T00:00:00Z`) means never.
fn time(s: Option<&str>) -> Option<DateTime<Utc>> {
    let t = DateTime::parse_from_rfc3339(s?).ok()?.with_timezone(&Utc);
    (t.timestamp() > 0).then_some(t)
}

pub(crate) fn from_docker(s: &DockerState) -> ContainerState {
    let started_at = time(s.started_at.as_deref());
    let finished_at = time(s.finished_at.as_deref());
    let error = s.error.clone().filter(|e| !e.is_empty());
    if s.running == Some(true) {
        return ContainerState::Running {
            started_at: started_at.unwrap_or_else(Utc::now),
        };
    }
    // Never ran: either not started yet, or docker could not start it (the
    // executable is missing…), which it records in State.Error.
    if started_at.is_none() {
        return match error {
            Some(message) => ContainerState::Exited {
                started_at: None,
                finished_at: finished_at.unwrap_or_else(Utc::now),
                exit_code: 128,
                reason: "StartError".into(),
                message: Some(message),
            },
            None => ContainerState::Created,
        };
    }
    let exit_code = s
        .exit_code
        .and_then(|c| i32::try_from(c).ok())
        .unwrap_or(-1);
    let reason = if s.oom_killed == Some(true) {
        "OOMKilled"
    } else if exit_code == 0 {
        "Completed"
    } else {
        "Error"
    };
    ContainerState::Exited {
        started_at,
        finished_at: finished_at.unwrap_or_else(Utc::now),
        exit_code,
        reason: reason.into(),
        message: error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states() {
        let zero = Some("0001-01-01T00:00:00Z".to_owned());
        let created = DockerState {
            running: Some(false),
            started_at: zero.clone(),
            finished_at: zero.clone(),
            ..Default::default()
        };
        assert_eq!(from_docker(&created), ContainerState::Created);
        let failed = DockerState {
            error: Some("exec: \"nope\": executable file not found".into()),
            ..created
        };
        assert!(matches!(
            from_docker(&failed),
            ContainerState::Exited { exit_code: 128, ref reason, .. } if reason == "StartError"
        ));
        let oom = DockerState {
            running: Some(false),
            oom_killed: Some(true),
            exit_code: Some(137),
            started_at: Some("2026-01-01T00:00:00.5Z".into()),
            finished_at: Some("2026-01-01T00:00:01Z".into()),
            ..Default::default()
        };
        assert!(matches!(
            from_docker(&oom),
            ContainerState::Exited { exit_code: 137, ref reason, .. } if reason == "OOMKilled"
        ));
    }
}

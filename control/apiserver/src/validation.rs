//! Validation of object metadata and of the fields of built-in types that a
//! client gets wrong most often. Failures become 422 with field causes.

use crate::{resources::ResourceInfo, status::Cause};
use serde_json::Value;

/// RFC 1123 subdomain: what most object names must be.
pub fn dns1123_subdomain(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("a lowercase RFC 1123 subdomain must not be empty".into());
    }
    if name.len() > 253 {
        return Some("must be no more than 253 characters".into());
    }
    let ok = name.split('.').all(|label| {
        !label.is_empty()
            && label
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    });
    (!ok).then(|| {
        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')".into()
    })
}

/// RFC 1123 label: namespaces, services, container names, port names.
pub fn dns1123_label(name: &str) -> Option<String> {
    if name.len() > 63 {
        return Some("must be no more than 63 characters".into());
    }
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    (!ok).then(|| {
        "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')".into()
    })
}

/// Label keys: optional DNS-subdomain prefix, then a name of up to 63
/// characters of alphanumerics, '-', '_', '.'.
fn label_key(key: &str) -> Option<String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && let Some(e) = dns1123_subdomain(p)
    {
        return Some(format!("prefix part {e}"));
    }
    label_value(name, false)
}

fn label_value(v: &str, may_be_empty: bool) -> Option<String> {
    if v.is_empty() {
        return (!may_be_empty).then(|| "name part must be non-empty".into());
    }
    if v.len() > 63 {
        return Some("must be no more than 63 characters".into());
    }
    let first_last_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    let ok = v
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && first_last_ok(v.chars().next())
        && first_last_ok(v.chars().last());
    (!ok).then(|| {
        "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character".into()
    })
}

/// Resources whose names must be DNS labels rather than subdomains.
fn needs_label_name(info: &ResourceInfo) -> bool {
    info.group.is_empty() && matches!(info.plural.as_str(), "namespaces" | "services")
}

/// Validates metadata common to every object.
pub fn metadata(info: &ResourceInfo, obj: &Value, causes: &mut Vec<Cause>) {
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    if !name.is_empty() {
        let problem = if needs_label_name(info) {
            dns1123_label(name)
        } else if info.group == "rbac.authorization.k8s.io" {
            // RBAC names may contain ':' (system:… roles).
            (name.contains('/') || name.contains('%')).then(|| "may not contain '/' or '%'".into())
        } else {
            dns1123_subdomain(name)
        };
        if let Some(msg) = problem {
            causes.push(Cause::invalid(
                "metadata.name",
                format!("Invalid value: {name:?}: {msg}"),
            ));
        }
    }
    for (path, may_be_empty_value) in [("labels", true), ("annotations", true)] {
        let Some(map) = obj.pointer(&format!("/metadata/{path}")) else {
            continue;
        };
        if map.is_null() {
            continue;
        }
        let Some(map) = map.as_object() else {
            causes.push(Cause::invalid(
                format!("metadata.{path}"),
                "must be a map of strings",
            ));
            continue;
        };
        for (k, v) in map {
            if let Some(e) = label_key(k) {
                causes.push(Cause::invalid(
                    format!("metadata.{path}"),
                    format!("Invalid value: {k:?}: {e}"),
                ));
            }
            match v.as_str() {
                Some(v) if path == "labels" => {
                    if let Some(e) = label_value(v, may_be_empty_value) {
                        causes.push(Cause::invalid(
                            "metadata.labels".to_string(),
                            format!("Invalid value: {v:?}: {e}"),
                        ));
                    }
                }
                Some(_) => {}
                None => causes.push(Cause::invalid(
                    format!("metadata.{path}.{k}"),
                    "must be a string",
                )),
            }
        }
    }
}

fn port_number(v: &Value) -> Option<i64> {
    v.as_i64()
}

fn check_port(field: &str, v: Option<&Value>, required: bool, causes: &mut Vec<Cause>) {
    match v {
        None if required => causes.push(Cause::required(field)),
        None => {}
        Some(v) => match port_number(v) {
            Some(p) if (1..=65535).contains(&p) => {}
            _ => causes.push(Cause::invalid(
                field,
                format!("Invalid value: {v}: must be between 1 and 65535, inclusive"),
            )),
        },
    }
}

fn containers(spec: &Value, base: &str, causes: &mut Vec<Cause>) {
    let list = spec.get("containers").and_then(Value::as_array);
    match list {
        None => causes.push(Cause::required(format!("{base}.containers"))),
        Some(l) if l.is_empty() => causes.push(Cause::required(format!("{base}.containers"))),
        Some(_) => {}
    }
    let mut names = Vec::new();
    for kind in ["initContainers", "containers"] {
        for (i, c) in spec
            .get(kind)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let field = format!("{base}.{kind}[{i}]");
            match c.get("name").and_then(Value::as_str) {
                None | Some("") => causes.push(Cause::required(format!("{field}.name"))),
                Some(n) => {
                    if let Some(e) = dns1123_label(n) {
                        causes.push(Cause::invalid(
                            format!("{field}.name"),
                            format!("Invalid value: {n:?}: {e}"),
                        ));
                    }
                    if names.contains(&n) {
                        causes.push(Cause {
                            reason: "FieldValueDuplicate",
                            field: format!("{field}.name"),
                            message: format!("Duplicate value: {n:?}"),
                        });
                    }
                    names.push(n);
                }
            }
            if c.get("image")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                causes.push(Cause::required(format!("{field}.image")));
            }
            for (j, p) in c
                .get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                check_port(
                    &format!("{field}.ports[{j}].containerPort"),
                    p.get("containerPort"),
                    true,
                    causes,
                );
                protocol(
                    &format!("{field}.ports[{j}].protocol"),
                    p.get("protocol"),
                    causes,
                );
            }
        }
    }
}

fn protocol(field: &str, v: Option<&Value>, causes: &mut Vec<Cause>) {
    if let Some(v) = v
        && !matches!(v.as_str(), Some("TCP" | "UDP" | "SCTP"))
    {
        causes.push(Cause {
            reason: "FieldValueNotSupported",
            field: field.into(),
            message: format!(
                "Unsupported value: {v}: supported values: \"SCTP\", \"TCP\", \"UDP\""
            ),
        });
    }
}

/// A label selector must select the template's labels (workloads).
fn selector_matches_template(obj: &Value, causes: &mut Vec<Cause>) {
    let Some(selector) = obj.pointer("/spec/selector") else {
        causes.push(Cause::required("spec.selector"));
        return;
    };
    let labels = crate::selectors::labels_of(obj.pointer("/spec/template").unwrap_or(&Value::Null));
    match crate::selectors::LabelSelector::from_json(selector) {
        Ok(s) if s.is_empty() => causes.push(Cause::invalid(
            "spec.selector",
            "Invalid value: empty selector is invalid for deployment",
        )),
        Ok(s) => {
            if !s.matches(&labels) {
                causes.push(Cause::invalid(
                    "spec.template.metadata.labels",
                    "Invalid value: `selector` does not match template `labels`",
                ));
            }
        }
        Err(e) => causes.push(Cause::invalid("spec.selector", e.to_string())),
    }
}

/// Type-specific validation of built-in resources.
pub fn spec(info: &ResourceInfo, obj: &Value, causes: &mut Vec<Cause>) {
    let spec = obj.get("spec").unwrap_or(&Value::Null);
    match (info.group.as_str(), info.plural.as_str()) {
        ("", "pods") => containers(spec, "spec", causes),
        ("scheduling.k8s.io", "priorityclasses") => {
            crate::pod_admission::validate_class(obj, causes)
        }
        ("", "services") => {
            let ty = spec
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("ClusterIP");
            if !matches!(
                ty,
                "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
            ) {
                causes.push(Cause {
                    reason: "FieldValueNotSupported",
                    field: "spec.type".into(),
                    message: format!("Unsupported value: {ty:?}: supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\""),
                });
            }
            let ports = spec.get("ports").and_then(Value::as_array);
            let headless = spec.get("clusterIP").and_then(Value::as_str) == Some("None");
            if ty != "ExternalName" && !headless && ports.is_none_or(Vec::is_empty) {
                causes.push(Cause::required("spec.ports"));
            }
            if ty == "ExternalName"
                && spec
                    .get("externalName")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
            {
                causes.push(Cause::required("spec.externalName"));
            }
            let many = ports.is_some_and(|p| p.len() > 1);
            for (i, p) in ports.into_iter().flatten().enumerate() {
                check_port(
                    &format!("spec.ports[{i}].port"),
                    p.get("port"),
                    true,
                    causes,
                );
                protocol(
                    &format!("spec.ports[{i}].protocol"),
                    p.get("protocol"),
                    causes,
                );
                if many
                    && p.get("name")
                        .and_then(Value::as_str)
                        .is_none_or(str::is_empty)
                {
                    causes.push(Cause::required(format!("spec.ports[{i}].name")));
                }
                if let Some(tp) = p.get("targetPort")
                    && tp.is_number()
                {
                    check_port(
                        &format!("spec.ports[{i}].targetPort"),
                        Some(tp),
                        false,
                        causes,
                    );
                }
            }
        }
        ("apps", "deployments" | "replicasets" | "statefulsets" | "daemonsets") => {
            selector_matches_template(obj, causes);
            if let Some(r) = spec.get("replicas")
                && r.as_i64().is_none_or(|r| r < 0)
            {
                causes.push(Cause::invalid(
                    "spec.replicas",
                    format!("Invalid value: {r}: must be greater than or equal to 0"),
                ));
            }
            containers(
                obj.pointer("/spec/template/spec").unwrap_or(&Value::Null),
                "spec.template.spec",
                causes,
            );
        }
        ("batch", "jobs") => {
            let tmpl = obj.pointer("/spec/template/spec").unwrap_or(&Value::Null);
            containers(tmpl, "spec.template.spec", causes);
            let rp = tmpl
                .get("restartPolicy")
                .and_then(Value::as_str)
                .unwrap_or("");
            if !matches!(rp, "Never" | "OnFailure") {
                causes.push(Cause {
                    reason: "FieldValueNotSupported",
                    field: "spec.template.spec.restartPolicy".into(),
                    message: format!(
                        "Unsupported value: {rp:?}: supported values: \"OnFailure\", \"Never\""
                    ),
                });
            }
        }
        ("", "configmaps" | "secrets") => {
            for field in ["data", "binaryData", "stringData"] {
                if let Some(map) = obj.get(field).and_then(Value::as_object) {
                    for k in map.keys() {
                        let ok = !k.is_empty()
                            && k.len() <= 253
                            && k.chars()
                                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
                        if !ok {
                            causes.push(Cause::invalid(
                                format!("{field}[{k}]"),
                                "a valid config key must consist of alphanumeric characters, '-', '_' or '.'",
                            ));
                        }
                    }
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(dns1123_subdomain("web-1.example").is_none());
        assert!(dns1123_subdomain("Web").is_some());
        assert!(dns1123_subdomain("-a").is_some());
        assert!(dns1123_label("a.b").is_some());
        assert!(dns1123_label("abc-1").is_none());
        assert!(label_key("app.kubernetes.io/name").is_none());
        assert!(label_key("bad key").is_some());
        assert!(label_value("", true).is_none());
    }
}

//! Kubernetes label selectors (`matchLabels` + `matchExpressions`), as
//! NetworkPolicy uses them for pods and namespaces.

use serde_json::Value;
use std::collections::BTreeMap;

/// Labels of a pod or namespace.
pub type Labels = BTreeMap<String, String>;

/// One `matchExpressions` entry.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A parsed label selector. The empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelSelector {
    pub match_labels: Labels,
    pub requirements: Vec<Requirement>,
    /// An operator this code does not know: such a selector would have been
    /// refused by validation, so it matches nothing rather than everything.
    pub invalid: bool,
}

impl LabelSelector {
    /// Parses a selector object; `null` or a non-object is the empty selector.
    pub fn parse(v: &Value) -> Self {
        let mut sel = Self::default();
        if let Some(m) = v.get("matchLabels").and_then(Value::as_object) {
            for (k, val) in m {
                match val.as_str() {
                    Some(s) => {
                        sel.match_labels.insert(k.clone(), s.to_owned());
                    }
                    None => sel.invalid = true,
                }
            }
        }
        for e in v
            .get("matchExpressions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let key = e
                .get("key")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            let values: Vec<String> = e
                .get("values")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect();
            let req = match e.get("operator").and_then(Value::as_str) {
                Some("In") => Requirement::In(key, values),
                Some("NotIn") => Requirement::NotIn(key, values),
                Some("Exists") => Requirement::Exists(key),
                Some("DoesNotExist") => Requirement::DoesNotExist(key),
                _ => {
                    sel.invalid = true;
                    continue;
                }
            };
            sel.requirements.push(req);
        }
        sel
    }

    pub fn is_empty(&self) -> bool {
        !self.invalid && self.match_labels.is_empty() && self.requirements.is_empty()
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        if self.invalid {
            return false;
        }
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.requirements.iter().all(|r| match r {
                Requirement::In(k, vals) => labels.get(k).is_some_and(|v| vals.contains(v)),
                // NotIn admits objects without the key, as in Kubernetes.
                Requirement::NotIn(k, vals) => labels.get(k).is_none_or(|v| !vals.contains(v)),
                Requirement::Exists(k) => labels.contains_key(k),
                Requirement::DoesNotExist(k) => !labels.contains_key(k),
            })
    }
}

impl std::fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.invalid {
            return f.write_str("<invalid>");
        }
        let mut parts: Vec<String> = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for r in &self.requirements {
            parts.push(match r {
                Requirement::In(k, v) => format!("{k} in ({})", v.join(",")),
                Requirement::NotIn(k, v) => format!("{k} notin ({})", v.join(",")),
                Requirement::Exists(k) => k.clone(),
                Requirement::DoesNotExist(k) => format!("!{k}"),
            });
        }
        if parts.is_empty() {
            f.write_str("<all>")
        } else {
            f.write_str(&parts.join(","))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn expressions_follow_kubernetes() {
        let s = LabelSelector::parse(&json!({"matchLabels": {"a": "1"}, "matchExpressions": [
            {"key": "b", "operator": "In", "values": ["x", "y"]},
            {"key": "c", "operator": "NotIn", "values": ["z"]},
            {"key": "d", "operator": "Exists"},
            {"key": "e", "operator": "DoesNotExist"}]}));
        assert!(s.matches(&labels(&[("a", "1"), ("b", "x"), ("d", "")])));
        assert!(s.matches(&labels(&[("a", "1"), ("b", "y"), ("c", "q"), ("d", "")])));
        assert!(!s.matches(&labels(&[("a", "1"), ("b", "x"), ("c", "z"), ("d", "")])));
        assert!(!s.matches(&labels(&[("a", "1"), ("b", "x")])));
        assert!(!s.matches(&labels(&[("a", "1"), ("b", "x"), ("d", ""), ("e", "")])));
        assert!(LabelSelector::parse(&json!({})).matches(&Labels::new()));
        let bad =
            LabelSelector::parse(&json!({"matchExpressions": [{"key": "a", "operator": "Gt"}]}));
        assert!(!bad.matches(&Labels::new()));
    }
}

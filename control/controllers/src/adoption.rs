//! Adoption and release by a workload's selector, as upstream's
//! ControllerRefManager: dependents without a controller that the selector
//! matches are taken, owned ones it no longer matches are let go.

use crate::{client::Client, error::Result, informer::Informer, meta, own_writes::OwnWrites};
use serde_json::{Value, json};

/// Adopts and releases `owner`'s dependents in `dependents` (those of its
/// namespace for which `candidate` holds), writing on behalf of `key`;
/// `controller_ref` is the reference an adopted one gets. True if it
/// changed anything. Each write carries the dependent's resourceVersion,
/// so it loses to any concurrent change; a dependent already gone is fine.
pub async fn adopt_and_release(
    client: &Client,
    written: &OwnWrites,
    key: &str,
    owner: &Value,
    controller_ref: Value,
    dependents: &Informer,
    candidate: impl Fn(&Value) -> bool,
) -> Result<bool> {
    let Some(selector) = meta::selector(owner) else {
        return Ok(false);
    };
    let uid = meta::uid(owner);
    let mut changed = false;
    for o in dependents.list_ns(meta::namespace(owner).unwrap_or("default")) {
        if !candidate(&o) {
            continue;
        }
        let matches = selector.matches(&meta::labels(&o));
        let refs = meta::owner_refs(&o);
        let next: Vec<Value> = match meta::controller_uid(&o) {
            None if matches => {
                let mut r = refs;
                r.push(controller_ref.clone());
                r
            }
            Some(u) if u == uid && !matches => refs
                .into_iter()
                .filter(|r| r.get("uid").and_then(Value::as_str) != Some(uid))
                .collect(),
            _ => continue,
        };
        let patch = json!({"metadata": {
            "ownerReferences": if next.is_empty() { Value::Null } else { json!(next) },
            "resourceVersion": meta::resource_version(&o).to_string(),
        }});
        match client
            .patch_in(
                &dependents.info,
                meta::namespace(&o),
                meta::name(&o),
                None,
                patch,
            )
            .await
        {
            Ok(out) => {
                written.note(key, meta::resource_version(&out));
                changed = true;
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(changed)
}

//! Workload labels of a pod as Istio derives them: `destination_workload`
//! is the Deployment's name, which Flagger matches
//! (`destination_workload=~"podinfo"`).
//!
//! The name, first rule that applies:
//! 1. the `service.istio.io/workload-name` label (Istio's override);
//! 2. the pod's controlling owner (`controller: true`, else its only
//!    owner), as Istio's `GetDeployMetaFromPod` reads it: a ReplicaSet
//!    minus its `-<pod-template-hash>` (or Argo Rollouts'
//!    `rollouts-pod-template-hash`) suffix; a ReplicaSet whose hash label is
//!    missing loses a last name segment that looks like such a hash
//!    (`checkout-v2-7d9f8b6c5` → `checkout-v2`); a Job named
//!    `<cronjob>-<8 to 10 digits>` gives the CronJob's name; an OpenShift
//!    ReplicationController its `deploymentconfig` label; any other owner
//!    its own name (StatefulSet, DaemonSet, ...);
//! 3. a pod without owner: its `app` (or `app.kubernetes.io/name`) label,
//!    followed by `-<version>` when it has a `version` label that the app
//!    name does not already end with: a pod `checkout-v2-a` labelled
//!    `app=checkout-service, version=v2` is workload `checkout-service-v2`,
//!    the way Bookinfo names its Deployments (`reviews-v2` for
//!    `app=reviews, version=v2`). Istio would report the bare pod name here;
//!    canary prefers a name that stays the same across the pods of one
//!    version, since such pods come from hand-written files, not a
//!    Deployment;
//! 4. the pod's name.

use std::collections::BTreeMap;

use crate::config::{OwnerReference, Pod};
use crate::observe::Workload;

/// Labels a controller puts on its pods and at the end of the ReplicaSet
/// name: Deployments, then Argo Rollouts.
const OWNER_HASH_LABELS: [&str; 2] = ["pod-template-hash", "rollouts-pod-template-hash"];

const UNKNOWN: &str = "unknown";

/// The workload labels of a pod from its name, namespace, labels and
/// `metadata.ownerReferences`.
pub fn workload_of(
    name: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    owners: &[OwnerReference],
) -> Workload {
    let label = |keys: &[&str]| {
        keys.iter()
            .filter_map(|k| labels.get(*k))
            .find(|v| !v.is_empty())
            .cloned()
    };
    let app = label(&["app", "app.kubernetes.io/name"]);
    let version = label(&["version", "app.kubernetes.io/version"]);
    let workload = label(&["service.istio.io/workload-name"])
        .or_else(|| owner_workload(labels, owners))
        .or_else(|| {
            app.as_ref().map(|app| match &version {
                Some(v) if !app.ends_with(&format!("-{v}")) => format!("{app}-{v}"),
                _ => app.clone(),
            })
        })
        .unwrap_or_else(|| name.to_string());
    Workload {
        workload: workload.into(),
        namespace: if namespace.is_empty() {
            UNKNOWN.into()
        } else {
            namespace.to_string().into()
        },
        app: app.map_or_else(|| UNKNOWN.into(), Into::into),
        version: version.map_or_else(|| UNKNOWN.into(), Into::into),
    }
}

/// [`workload_of`] for a pod of the config model.
pub fn workload_of_pod(pod: &Pod) -> Workload {
    workload_of(
        &pod.meta.name,
        &pod.meta.namespace,
        &pod.meta.labels,
        &pod.owners,
    )
}

/// The destination labels of an endpoint `pod` reached through `subset`
/// (its name and labels): as [`workload_of_pod`], with the version Istio
/// reports for a subset, its `version` label, else its name.
pub fn destination_workload(
    pod: &Pod,
    subset: Option<(&str, &BTreeMap<String, String>)>,
) -> Workload {
    let mut w = workload_of_pod(pod);
    if let Some((name, labels)) = subset {
        w.version = labels
            .get("version")
            .filter(|v| !v.is_empty())
            .map_or_else(|| name.into(), |v| v.as_str().into());
    }
    w
}

/// Rule 2 of the module doc.
fn owner_workload(labels: &BTreeMap<String, String>, owners: &[OwnerReference]) -> Option<String> {
    let owner = match owners.iter().find(|o| o.controller) {
        Some(o) => o,
        None if owners.len() == 1 => &owners[0],
        None => return None,
    };
    if owner.name.is_empty() {
        return None;
    }
    let name = owner.name.as_str();
    let trimmed = match owner.kind.as_str() {
        "ReplicaSet" => OWNER_HASH_LABELS
            .iter()
            .filter_map(|k| labels.get(*k).filter(|h| !h.is_empty()))
            .find_map(|hash| name.strip_suffix(hash.as_str())?.strip_suffix('-'))
            .or_else(|| {
                let (base, last) = name.rsplit_once('-')?;
                (!base.is_empty() && looks_like_hash(last)).then_some(base)
            }),
        "Job" => name.rsplit_once('-').and_then(|(base, stamp)| {
            let digits =
                (8..=10).contains(&stamp.len()) && stamp.bytes().all(|b| b.is_ascii_digit());
            (!base.is_empty() && digits).then_some(base)
        }),
        "ReplicationController" => labels
            .get("deploymentconfig")
            .filter(|d| !d.is_empty())
            .map(String::as_str),
        _ => None,
    };
    Some(trimmed.unwrap_or(name).to_string())
}

/// A pod-template-hash: 5 to 10 lowercase letters and digits, at least one
/// a digit (Kubernetes encodes a number; the digit keeps words like
/// `frontend` from being taken for one).
fn looks_like_hash(s: &str) -> bool {
    (5..=10).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && s.bytes().any(|b| b.is_ascii_digit())
}

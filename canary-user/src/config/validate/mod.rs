//! Typed objects → validated model. Every object is checked on its own,
//! then against the others (hosts, subsets, ports). Nothing stops at the
//! first problem: every error goes into `Diagnostics`.

mod annotation;
mod destination_rule;
mod http;
mod kube;
mod virtual_service;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use super::error::{Diagnostics, Origin};
use super::istio::Extra;
use super::kube::ObjectMetaSpec;
use super::load::{Parsed, ParsedObjects};
use super::model::{DestinationRule, LoadedConfig, ObjectKind, ObjectMeta, Service};

pub(crate) fn validate(
    parsed: ParsedObjects,
    files: Vec<PathBuf>,
    diags: &mut Diagnostics,
) -> LoadedConfig {
    let ParsedObjects {
        services,
        pods,
        destination_rules,
        virtual_services,
        broken_services,
        broken_destination_rules,
    } = parsed;

    let mut services: Vec<Service> = services
        .into_iter()
        .map(|p| kube::service(p, diags))
        .collect();
    let mut pods: Vec<_> = pods.into_iter().map(|p| kube::pod(p, diags)).collect();
    // A duplicate rejects the config, but both copies stay in the lists so
    // that cross-object checks do not report their host as missing.
    let metas = services
        .iter()
        .map(|s| &s.meta)
        .chain(pods.iter().map(|p| &p.meta));
    duplicate_objects(metas, diags);
    services.sort_by(|a, b| a.host.cmp(&b.host));
    pods.sort_by(|a, b| (&a.meta.namespace, &a.meta.name).cmp(&(&b.meta.namespace, &b.meta.name)));

    let mut refs = Refs {
        services: &services,
        destination_rules: &[],
        broken_services: &broken_services,
        broken_destination_rules: &broken_destination_rules,
    };
    let destination_rules = destination_rule::validate_all(destination_rules, &refs, diags);
    refs.destination_rules = &destination_rules;
    let virtual_services = virtual_service::validate_all(virtual_services, &refs, diags);
    duplicate_objects(
        destination_rules
            .iter()
            .map(|d| &d.meta)
            .chain(virtual_services.iter().map(|v| &v.meta)),
        diags,
    );

    LoadedConfig {
        services,
        pods,
        destination_rules,
        virtual_services,
        warnings: Vec::new(),
        files,
    }
}

/// What cross-object checks look things up in.
pub(super) struct Refs<'a> {
    pub services: &'a [Service],
    pub destination_rules: &'a [DestinationRule],
    /// Hosts of objects that failed to parse: already reported, so not
    /// reported again as missing.
    pub broken_services: &'a BTreeSet<String>,
    pub broken_destination_rules: &'a BTreeSet<String>,
}

impl Refs<'_> {
    pub fn service(&self, host: &str) -> Option<&Service> {
        // Sorted by host.
        let i = self.services.partition_point(|s| s.host.as_str() < host);
        self.services.get(i).filter(|s| s.host == host)
    }

    pub fn destination_rule(&self, host: &str) -> Option<&DestinationRule> {
        self.destination_rules.iter().find(|d| d.host == host)
    }

    /// "a Service host: a.prod.svc.cluster.local, b.prod.svc.cluster.local"
    pub fn valid_service_hosts(&self) -> String {
        if self.services.is_empty() {
            return "a Service host; the config defines no Service".into();
        }
        let hosts: Vec<&str> = self.services.iter().map(|s| s.host.as_str()).collect();
        format!("a Service host: {}", list(&hosts, 12))
    }
}

/// `a, b, c` with at most `max` entries shown.
pub(super) fn list(items: &[&str], max: usize) -> String {
    if items.len() <= max {
        items.join(", ")
    } else {
        format!(
            "{}, ... ({} more)",
            items[..max].join(", "),
            items.len() - max
        )
    }
}

pub(super) fn object_meta<T>(kind: ObjectKind, p: &Parsed<T>, m: &ObjectMetaSpec) -> ObjectMeta {
    ObjectMeta {
        kind,
        // Presence was checked when the document was read.
        name: m.name.clone().unwrap_or_default(),
        namespace: m.namespace.clone().unwrap_or_else(|| "default".into()),
        labels: m.labels.clone(),
        file: p.file.clone(),
        line: p.line,
    }
}

/// Warns about fields a struct does not model (often a typo: `wieght`).
pub(super) fn unknown_fields(
    diags: &mut Diagnostics,
    at: &Origin,
    field: &str,
    extra: &Extra,
    valid: &[&str],
) {
    for key in extra.keys() {
        let path = if field.is_empty() {
            key.clone()
        } else {
            format!("{field}.{key}")
        };
        diags.warn(
            at,
            &path,
            format!("unknown field, ignored (known here: {})", valid.join(", ")),
        );
    }
}

/// Reports objects of one kind, namespace and name defined more than once.
fn duplicate_objects<'a>(metas: impl Iterator<Item = &'a ObjectMeta>, diags: &mut Diagnostics) {
    let mut first: BTreeMap<String, &ObjectMeta> = BTreeMap::new();
    for meta in metas {
        match first.get(&meta.key()) {
            Some(prev) => {
                diags.error(
                    &meta.origin(),
                    "metadata.name",
                    format!(
                        "defined twice (first in {} line {})",
                        prev.file.display(),
                        prev.line
                    ),
                    "each object once per kind, namespace and name",
                );
            }
            None => {
                first.insert(meta.key(), meta);
            }
        }
    }
}

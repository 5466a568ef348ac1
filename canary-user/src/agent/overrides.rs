//! Live weight overrides from `canary weights`.
//!
//! An override replaces the file's weights for one route until either the
//! operator resets it or the file itself changes that route's weights (a
//! GitOps edit wins over a hand-made change). Overrides are saved in the
//! state directory, so an agent restart keeps them.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::compile::{RoutingTable, apply_weights};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Override {
    /// Fully qualified service host.
    pub host: String,
    pub route: Option<String>,
    pub weights: Vec<(String, i64)>,
    /// The file's weights when the override was made.
    pub file_weights: Vec<(String, u32)>,
}

#[derive(Debug, Default)]
pub struct Overrides {
    path: PathBuf,
    list: Vec<Override>,
}

impl Overrides {
    pub fn load(state_dir: &Path) -> Result<Self> {
        let path = state_dir.join("overrides.json");
        let list = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!("{} is corrupt; delete it to drop overrides", path.display())
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Self { path, list })
    }

    fn save(&self) -> Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.list)?)?;
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("writing {}", self.path.display()))
    }

    /// Records an override (replacing an earlier one for the same route).
    pub fn set(&mut self, o: Override) -> Result<()> {
        self.list
            .retain(|x| !(x.host == o.host && x.route == o.route));
        self.list.push(o);
        self.save()
    }

    /// Drops every override of `host`; returns how many there were.
    pub fn reset(&mut self, host: &str) -> Result<usize> {
        let before = self.list.len();
        self.list.retain(|x| x.host != host);
        self.save()?;
        Ok(before - self.list.len())
    }

    /// Applies the overrides still valid for `file_table`; drops (and
    /// reports) those whose route's file weights changed or that no longer
    /// apply.
    pub fn apply(&mut self, file_table: &RoutingTable) -> (RoutingTable, Vec<String>) {
        let mut table = file_table.clone();
        let mut dropped = Vec::new();
        let mut keep = Vec::new();
        for o in self.list.drain(..) {
            if file_weights(file_table, &o.host, o.route.as_deref()) != o.file_weights {
                dropped.push(format!("{}: the file changed this route's weights", o.host));
                continue;
            }
            match apply_weights(&table, &o.host, o.route.as_deref(), &o.weights) {
                Ok(t) => {
                    table = t;
                    keep.push(o);
                }
                Err(e) => dropped.push(format!("{}: {e}", o.host)),
            }
        }
        self.list = keep;
        if !dropped.is_empty() {
            let _ = self.save();
        }
        (table, dropped)
    }

    pub fn contains(&self, host: &str, route: Option<&str>) -> bool {
        self.list
            .iter()
            .any(|o| o.host == host && (o.route.is_none() || o.route.as_deref() == route))
    }
}

/// The file weights of the route an override addresses (its first port).
pub fn file_weights(table: &RoutingTable, host: &str, route: Option<&str>) -> Vec<(String, u32)> {
    let Some(svc) = table.find(host) else {
        return Vec::new();
    };
    // A named route may be a port's kernel route or any weighted http rule.
    let found = svc
        .ports
        .iter()
        .map(|p| &p.route)
        .chain(&svc.http_routes)
        .find(|r| route.is_none() || r.name.as_deref() == route);
    found
        .map(|r| {
            r.destinations
                .iter()
                .map(|d| {
                    (
                        d.subset.clone().unwrap_or_else(|| d.host.clone()),
                        d.file_weight,
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

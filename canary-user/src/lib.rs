//! canary: Istio canary routing executed in the kernel.
//!
//! The modules follow the data flow:
//! `config` (YAML → validated objects) → `compile` (routing table) →
//! `dataplane` (kernel maps) — with `agent` driving it and `admin` (socket,
//! CLI rendering) at the edge.

pub mod admin;
pub mod agent;
pub mod compile;
pub mod config;
pub mod dataplane;
pub mod metrics;
pub mod observe;
pub mod shim;
pub mod train;

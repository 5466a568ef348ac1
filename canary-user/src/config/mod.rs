//! The first half of the config path: YAML files → typed objects
//! (`kube`, `istio`) → validated model (`LoadedConfig`).
//!
//! `load_path` reads a file or a directory, parses every document, checks
//! every object on its own and against the others, and returns either the
//! validated config (with warnings) or every error found. Nothing here
//! touches the node; a rejected config leaves the last good one in force.

pub mod annotation;
pub mod duration;
mod error;
pub mod host;
pub mod istio;
pub mod kube;
mod load;
mod model;
mod validate;

pub use error::{ConfigError, ConfigErrors, ConfigWarning, dedup_warnings};
pub use load::{load_documents, load_path, load_str};
pub use model::{
    ContainerPort, DestinationRule, LoadedConfig, ObjectKind, ObjectMeta, OwnerReference, Pod,
    Protocol, Service, ServicePort, TargetPort, VirtualService,
};

#[cfg(test)]
pub(crate) mod tests;

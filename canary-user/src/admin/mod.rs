//! The admin edge: a Unix socket (mode 0600, no TCP) that the CLI talks to,
//! one JSON request and one JSON response per connection.

pub mod client;
pub mod protocol;
pub mod render;
pub mod server;

/// Default socket path; `--admin-socket` changes it.
pub const DEFAULT_SOCKET: &str = "/run/canary/canary.sock";

//! The map key and value types shared by canary's kernel programs
//! (`canary-ebpf`) and its agent (`canary-user`), plus the one hash function
//! both sides must agree on.
//!
//! Every type is `#[repr(C)]`, `Copy`, has explicit padding, and a
//! compile-time size check: a layout change that would make the kernel and
//! the agent disagree fails the build instead of corrupting a map.
//!
//! Addresses are stored as four 32-bit words in network byte order, exactly
//! as the kernel hands them to cgroup sock_addr programs (`user_ip4` in word
//! 0, `user_ip6` in words 0..4). Ports are in network byte order in the low
//! 16 bits.
#![no_std]

pub mod hash;
pub mod maps;
pub mod tcp;

pub use hash::{maglev_slot, source_hash, subset_point};
pub use maps::*;

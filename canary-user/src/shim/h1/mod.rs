//! HTTP/1.1 on both sides of the shim, driven by the request's own task
//! (`client`: to an upstream; `server`: from a client), on the wire pieces
//! in `wire`. hyper serves h2c and the HTTP/1.1 requests `server` hands
//! it (see there).

mod client;
mod server;
mod wire;

pub(crate) use client::{Conn, Failure, H1Body, Home};
pub(crate) use server::{Served, serve};

#[cfg(test)]
mod fuzz;

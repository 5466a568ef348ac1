//! Client identities for sticky choices of unbound sockets.
//!
//! At `connect()` an unbound socket has no source address, so the kernel
//! hashes the client's network namespace cookie instead. To make a pod's
//! unbound sockets hash exactly like its IP (so the same client lands on
//! the same subset whether it binds or not, and operators can predict it),
//! the agent maps each named network namespace (`/run/netns/*`, where CNI
//! runtimes such as containerd keep pod namespaces) to the first address
//! configured in it, and writes cookie → address into `CLIENT_IDS`.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Named network namespaces live here (iproute2, containerd's CNI).
pub const NETNS_DIR: &str = "/run/netns";

/// A named network namespace on the node.
#[derive(Debug)]
pub struct Namespace {
    pub cookie: u64,
    /// Its first global address (IPv4 preferred): the pod's IP.
    pub addr: Option<IpAddr>,
    /// Keeps the namespace reachable for the shim (listeners, connects).
    pub file: File,
}

/// Every namespace under `dir`.
pub fn scan(dir: &Path) -> Vec<Namespace> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let Ok(file) = File::open(entry.path()) else {
            continue;
        };
        // setns affects only the calling thread: do it on a throwaway one.
        let found = std::thread::spawn(move || inspect(&file).map(|(c, a)| (c, a, file)))
            .join()
            .ok()
            .flatten();
        if let Some((cookie, addr, file)) = found {
            out.push(Namespace { cookie, addr, file });
        }
    }
    out
}

/// Names and inodes under `dir`: changes when a namespace comes or goes.
pub fn listing(dir: &Path) -> Vec<(String, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut out: Vec<(String, u64)> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    Some((
                        e.file_name().to_string_lossy().into_owned(),
                        e.metadata().ok()?.ino(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Cookie → address, for the kernel's `CLIENT_IDS`.
pub fn identities(namespaces: &[Namespace]) -> BTreeMap<u64, IpAddr> {
    namespaces
        .iter()
        .filter_map(|n| Some((n.cookie, n.addr?)))
        .collect()
}

/// The cookie of the calling thread's network namespace.
pub fn own_cookie() -> Option<u64> {
    netns_cookie()
}

/// Joins the namespace behind `ns` and reads its cookie and address.
fn inspect(ns: &File) -> Option<(u64, Option<IpAddr>)> {
    // SAFETY: setns on a valid fd; the thread is discarded after.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return None;
    }
    Some((netns_cookie()?, first_address()))
}

/// SO_NETNS_COOKIE of a throwaway socket in the current namespace.
fn netns_cookie() -> Option<u64> {
    // SAFETY: plain socket calls; the socket is closed before returning.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if sock < 0 {
            return None;
        }
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let ok = libc::getsockopt(
            sock,
            libc::SOL_SOCKET,
            71, // SO_NETNS_COOKIE (Linux 5.14+)
            (&mut cookie as *mut u64).cast(),
            &mut len,
        ) == 0;
        libc::close(sock);
        ok.then_some(cookie)
    }
}

/// The namespace's first global address, IPv4 preferred (a pod's IP).
fn first_address() -> Option<IpAddr> {
    let mut addrs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we walk read-only and free.
    unsafe {
        if libc::getifaddrs(&mut addrs) != 0 {
            return None;
        }
        let (mut v4, mut v6) = (None, None);
        let mut cur = addrs;
        while !cur.is_null() {
            let sa = (*cur).ifa_addr;
            if !sa.is_null() {
                match i32::from((*sa).sa_family) {
                    libc::AF_INET if v4.is_none() => {
                        let sin = &*(sa as *const libc::sockaddr_in);
                        let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                        if !ip.is_loopback() {
                            v4 = Some(IpAddr::V4(ip));
                        }
                    }
                    libc::AF_INET6 if v6.is_none() => {
                        let sin6 = &*(sa as *const libc::sockaddr_in6);
                        let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                        if !ip.is_loopback() && (ip.segments()[0] & 0xffc0) != 0xfe80 {
                            v6 = Some(IpAddr::V6(ip));
                        }
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(addrs);
        v4.or(v6)
    }
}

//! Socket calls that std does not offer: a listener with a deep backlog, a
//! connect from a chosen source address with a timeout, and errno names.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// Listens on `addr` with `SO_REUSEADDR` and the given backlog (std's is
/// 128, too shallow for hundreds of simultaneous connects). IPv6 sockets
/// are IPv6-only, so `0.0.0.0:P` and `[::]:P` can both be listened on.
pub fn listen_tcp(addr: SocketAddr, backlog: i32) -> io::Result<TcpListener> {
    let fd = socket(&addr)?;
    setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    if addr.is_ipv6() {
        setsockopt_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    }
    bind(&fd, &addr)?;
    // SAFETY: plain syscall on an fd we own.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), backlog) })?;
    Ok(TcpListener::from(fd))
}

/// Bounds how long `accept()` on `listener` blocks (`SO_RCVTIMEO`); a
/// timed-out accept fails with `WouldBlock`.
pub fn set_accept_timeout(listener: &TcpListener, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs().try_into().unwrap_or(libc::time_t::MAX),
        tv_usec: timeout.subsec_micros().into(),
    };
    // SAFETY: `tv` is a valid timeval of the size passed.
    cvt(unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Connects to `target`, optionally from `source` (port chosen by the
/// kernel at connect time), within `timeout`, and returns a blocking stream
/// whose write timeout is `timeout`.
///
/// The connect blocks under `SO_SNDTIMEO` (Linux bounds a blocking connect
/// by it), which costs three system calls fewer than non-blocking connect,
/// poll and `SO_ERROR`; a fast probe notices.
pub fn connect_tcp(
    source: Option<IpAddr>,
    target: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let fd = socket(&target)?;
    let stream = TcpStream::from(fd);
    stream.set_write_timeout(Some(timeout.max(Duration::from_micros(1))))?;
    if let Some(source) = source {
        // Without this, bind(port 0) reserves a port for every 4-tuple and
        // a busy source address runs out of ports.
        let _ = setsockopt_int(&stream, libc::SOL_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1);
        bind(&stream, &SocketAddr::new(source, 0))?;
    }
    let (storage, len) = sockaddr(&target);
    // SAFETY: `storage` holds a valid sockaddr of `len` bytes.
    let rc = unsafe { libc::connect(stream.as_raw_fd(), (&raw const storage).cast(), len) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        // A blocking connect that runs out of SO_SNDTIMEO says EINPROGRESS.
        if err.raw_os_error() == Some(libc::EINPROGRESS) {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
        }
        return Err(err);
    }
    Ok(stream)
}

/// Closes with an RST instead of a FIN, leaving no TIME_WAIT behind.
pub fn set_linger_zero(stream: &TcpStream) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `linger` is a valid struct of the size passed.
    cvt(unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// A short name for why a connection failed: the errno name
/// (`ECONNREFUSED`, `EHOSTUNREACH`, ...), `timeout`, `eof` or
/// `bad_response`.
pub fn error_kind(err: &io::Error) -> String {
    if let Some(errno) = err.raw_os_error() {
        let name = match errno {
            libc::EAGAIN | libc::ETIMEDOUT => "timeout",
            libc::ECONNREFUSED => "ECONNREFUSED",
            libc::ECONNRESET => "ECONNRESET",
            libc::ECONNABORTED => "ECONNABORTED",
            libc::EHOSTUNREACH => "EHOSTUNREACH",
            libc::ENETUNREACH => "ENETUNREACH",
            libc::ENETDOWN => "ENETDOWN",
            libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
            libc::EADDRINUSE => "EADDRINUSE",
            libc::EPIPE => "EPIPE",
            libc::EPERM => "EPERM",
            libc::EACCES => "EACCES",
            libc::EINVAL => "EINVAL",
            libc::EAFNOSUPPORT => "EAFNOSUPPORT",
            libc::ENOTCONN => "ENOTCONN",
            libc::EMFILE => "EMFILE",
            libc::ENFILE => "ENFILE",
            libc::ENOBUFS => "ENOBUFS",
            libc::EINTR => "EINTR",
            other => return format!("errno_{other}"),
        };
        return name.to_owned();
    }
    match err.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "timeout",
        io::ErrorKind::UnexpectedEof => "eof",
        io::ErrorKind::InvalidData => "bad_response",
        _ => "other",
    }
    .to_owned()
}

/// `addr` as a C socket address and its length.
pub fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero bytes are a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in>().write(sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in6>().write(sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn socket(addr: &SocketAddr) -> io::Result<OwnedFd> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscall; the fd is owned right away.
    let fd = cvt(unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn bind(fd: &impl AsRawFd, addr: &SocketAddr) -> io::Result<()> {
    let (storage, len) = sockaddr(addr);
    // SAFETY: `storage` holds a valid sockaddr of `len` bytes.
    cvt(unsafe { libc::bind(fd.as_raw_fd(), (&raw const storage).cast(), len) }).map(drop)
}

fn setsockopt_int(fd: &impl AsRawFd, level: i32, name: i32, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `value` is a valid c_int of the size passed.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn connects_over_loopback_from_a_source_address() -> io::Result<()> {
        let listener = listen_tcp("127.0.0.1:0".parse().expect("addr"), 16)?;
        let target = listener.local_addr()?;
        let server = std::thread::spawn(move || -> io::Result<SocketAddr> {
            let (mut conn, peer) = listener.accept()?;
            conn.write_all(b"hi")?;
            Ok(peer)
        });
        let mut stream = connect_tcp(
            Some("127.0.0.2".parse().expect("addr")),
            target,
            Duration::from_secs(2),
        )?;
        assert_eq!(stream.peer_addr()?, target);
        let mut buf = String::new();
        stream.read_to_string(&mut buf)?;
        assert_eq!(buf, "hi");
        let peer = server.join().expect("server thread")?;
        assert_eq!(peer.ip(), IpAddr::from([127, 0, 0, 2]));
        Ok(())
    }

    #[test]
    fn refused_connects_are_named() {
        // A port that was just free again.
        let target = listen_tcp("127.0.0.1:0".parse().expect("addr"), 1)
            .and_then(|l| l.local_addr())
            .expect("ephemeral listener");
        let err =
            connect_tcp(None, target, Duration::from_secs(2)).expect_err("the listener is closed");
        assert_eq!(error_kind(&err), "ECONNREFUSED");
    }
}

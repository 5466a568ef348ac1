//! Working inside client network namespaces.
//!
//! The shim serves redirected connections on the client's own loopback, so
//! it needs a listener in every client namespace, and it connects to pods
//! from the client's namespace (where pod IPs route, and where the client's
//! identity lives — what a sidecar would do). Sockets keep the namespace
//! they were created in, so one dedicated thread enters a namespace, makes
//! the socket and hands the file descriptor back; no other thread ever
//! changes namespace.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;

use tokio::sync::oneshot;

/// The shim listeners' accept queue (nginx's own default is 511).
const LISTEN_BACKLOG: libc::c_int = 4096;

type Job = Box<dyn FnOnce() -> io::Result<OwnedFd> + Send>;

struct Request {
    netns: Option<std::sync::Arc<File>>,
    job: Job,
    reply: oneshot::Sender<io::Result<OwnedFd>>,
}

/// Makes sockets inside a given network namespace.
#[derive(Clone)]
pub struct SocketFactory {
    tx: mpsc::Sender<Request>,
}

impl SocketFactory {
    pub fn start() -> io::Result<Self> {
        let home = File::open("/proc/self/ns/net")?;
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("canary-netns".into())
            .spawn(move || {
                // Which namespace the thread is in: None = the agent's own.
                let mut here: Option<std::sync::Arc<File>> = None;
                for req in rx {
                    let same = match (&here, &req.netns) {
                        (None, None) => true,
                        (Some(a), Some(b)) => std::sync::Arc::ptr_eq(a, b),
                        _ => false,
                    };
                    if !same {
                        let target = req.netns.as_deref().unwrap_or(&home);
                        // SAFETY: setns on a valid namespace fd, affecting only this thread.
                        if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                            let _ = req.reply.send(Err(io::Error::last_os_error()));
                            continue;
                        }
                        here = req.netns.clone();
                    }
                    let _ = req.reply.send((req.job)());
                }
            })?;
        Ok(Self { tx })
    }

    async fn run(&self, netns: Option<std::sync::Arc<File>>, job: Job) -> io::Result<OwnedFd> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request { netns, job, reply })
            .map_err(|_| io::Error::other("netns socket thread is gone"))?;
        rx.await
            .map_err(|_| io::Error::other("netns socket thread dropped the request"))?
    }

    /// A non-blocking TCP socket for connecting to `addr`, created in `netns`.
    pub async fn tcp_socket(
        &self,
        netns: Option<std::sync::Arc<File>>,
        addr: SocketAddr,
    ) -> io::Result<tokio::net::TcpSocket> {
        let domain = if addr.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        let fd = self
            .run(
                netns,
                Box::new(move || {
                    // SAFETY: plain socket(2); the fd is owned right away.
                    let fd = unsafe {
                        libc::socket(
                            domain,
                            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                            0,
                        )
                    };
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
                }),
            )
            .await?;
        Ok(tokio::net::TcpSocket::from_std_stream(
            std::net::TcpStream::from(fd),
        ))
    }

    /// A listener bound to `addr` inside `netns`, non-blocking, not yet
    /// registered with any runtime (the one that accepts on it must).
    pub async fn listener(
        &self,
        netns: Option<std::sync::Arc<File>>,
        addr: SocketAddr,
    ) -> io::Result<std::net::TcpListener> {
        let fd = self
            .run(
                netns,
                // std binds with SO_REUSEADDR and listens; no runtime needed
                // on this thread.
                Box::new(move || Ok(OwnedFd::from(std::net::TcpListener::bind(addr)?))),
            )
            .await?;
        // std listens with a backlog of 128. Every pod on the node that
        // opens connections to an L7 service at once lands in this queue:
        // beyond it, the kernel drops handshakes and clients wait out SYN
        // retransmits (1 s, 3 s, 7 s, ...). Listening again only raises the
        // queue; the kernel caps it at `net.core.somaxconn`.
        // SAFETY: `fd` is a bound, listening TCP socket this function owns.
        if unsafe { libc::listen(fd.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let std = std::net::TcpListener::from(fd);
        std.set_nonblocking(true)?;
        Ok(std)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The accept queue the kernel reports for a listener (`ss`'s Send-Q).
    fn backlog(port: u16) -> u32 {
        let out = std::process::Command::new("ss")
            .args(["-Hltn", &format!("sport = :{port}")])
            .output()
            .expect("ss (iproute2)");
        let text = String::from_utf8_lossy(&out.stdout);
        let fields: Vec<&str> = text.split_whitespace().collect();
        fields[2]
            .parse()
            .unwrap_or_else(|_| panic!("ss output: {text}"))
    }

    #[tokio::test]
    async fn shim_listeners_queue_more_than_std_s_128_handshakes() {
        let factory = SocketFactory::start().expect("factory");
        let listener = factory
            .listener(None, "127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("listener");
        let port = listener.local_addr().expect("addr").port();
        let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .expect("somaxconn")
            .trim()
            .parse()
            .expect("number");
        assert_eq!(backlog(port), somaxconn.min(LISTEN_BACKLOG as u32));
    }
}

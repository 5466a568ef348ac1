//! Hosting the L7 shim: a listener on the loopback of every client network
//! namespace (where the kernel sends redirected connections), the
//! original-destination look-up, and outbound connections made from the
//! client's namespace.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use super::netns::SocketFactory;
use crate::config::LoadedConfig;
use crate::dataplane::identities::Namespace;
use crate::dataplane::orig_dst::OrigDst;
use crate::shim::{ConnInfo, Connector, Shim, SourcePod};

/// Namespace cookie → its file, shared by listeners and the connector.
type NamespaceFiles = Arc<RwLock<HashMap<u64, Arc<File>>>>;

pub struct ShimHost {
    pub shim: Arc<Shim>,
    /// The shim's own runtime (see `start_runtime`): every connection,
    /// upstream connection and mirror task runs there.
    runtime: Handle,
    orig: Arc<OrigDst>,
    factory: SocketFactory,
    port: u16,
    own_cookie: u64,
    files: NamespaceFiles,
    /// Namespace cookie → the client's pod address.
    clients: RwLock<HashMap<u64, IpAddr>>,
    pods: RwLock<HashMap<IpAddr, SourcePod>>,
    listeners: std::sync::Mutex<HashMap<u64, Vec<JoinHandle<()>>>>,
}

/// Connects from the client's namespace, so pod IPs route as they do for
/// the client, and the backend sees the client's address.
struct NetnsConnector {
    factory: SocketFactory,
    files: NamespaceFiles,
}

impl Connector for NetnsConnector {
    fn connect(
        &self,
        netns: u64,
        addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>> {
        let file = self
            .files
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&netns)
            .cloned();
        let factory = self.factory.clone();
        Box::pin(async move {
            let socket = factory.tcp_socket(file, addr).await?;
            let stream = socket.connect(addr).await?;
            stream.set_nodelay(true)?;
            Ok(stream)
        })
    }
}

impl ShimHost {
    pub fn new(
        port: u16,
        orig: OrigDst,
        own_cookie: u64,
        build: impl FnOnce(Arc<dyn Connector>) -> Arc<Shim>,
    ) -> io::Result<Arc<Self>> {
        let runtime = start_runtime()?;
        let factory = SocketFactory::start()?;
        let files: NamespaceFiles = Arc::default();
        let connector = Arc::new(NetnsConnector {
            factory: factory.clone(),
            files: files.clone(),
        });
        Ok(Arc::new(Self {
            shim: build(connector),
            runtime,
            orig: Arc::new(orig),
            factory,
            port,
            own_cookie,
            files,
            clients: RwLock::default(),
            pods: RwLock::default(),
            listeners: std::sync::Mutex::default(),
        }))
    }

    /// Pod IP → the pod, for `sourceLabels` matches and source metrics.
    pub fn set_pods(&self, cfg: &LoadedConfig) {
        let mut map = HashMap::new();
        for pod in &cfg.pods {
            for ip in &pod.ips {
                map.insert(
                    *ip,
                    SourcePod {
                        name: pod.meta.name.clone(),
                        namespace: pod.meta.namespace.clone(),
                        labels: pod.meta.labels.clone(),
                    },
                );
            }
        }
        *self.pods.write().unwrap_or_else(|e| e.into_inner()) = map;
    }

    /// Keeps one listener pair (127.0.0.1 and ::1) in the agent's own
    /// namespace and in each of `namespaces`; closes those whose namespace
    /// is gone, so the agent never keeps a deleted namespace alive.
    /// `None` closes every listener (no service needs the shim).
    pub async fn sync(self: &Arc<Self>, namespaces: Option<Vec<Namespace>>) {
        let mut wanted: BTreeMap<u64, Option<File>> = BTreeMap::new();
        if let Some(namespaces) = namespaces {
            wanted.extend(namespaces.into_iter().map(|n| (n.cookie, Some(n.file))));
            wanted.entry(self.own_cookie).or_insert(None);
        }
        let present: Vec<u64> = self
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        for cookie in present.iter().filter(|c| !wanted.contains_key(c)) {
            if let Some(tasks) = self
                .listeners
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(cookie)
            {
                for t in tasks {
                    t.abort();
                }
            }
            self.files
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(cookie);
            // Pooled upstream sockets would keep the namespace alive too.
            let closed = self.shim.forget_namespace(*cookie);
            if closed > 0 {
                tracing::debug!(
                    netns = cookie,
                    closed,
                    "namespace gone; pooled upstream connections closed"
                );
            }
        }
        for (cookie, file) in wanted {
            if present.contains(&cookie) {
                continue;
            }
            let file = file.map(Arc::new);
            if let Some(f) = &file {
                self.files
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(cookie, f.clone());
            }
            let mut tasks = Vec::new();
            for ip in [
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ] {
                match self
                    .factory
                    .listener(file.clone(), SocketAddr::new(ip, self.port))
                    .await
                {
                    Ok(listener) => tasks.push(
                        self.runtime
                            .spawn(self.clone().accept_loop(listener, cookie)),
                    ),
                    // No IPv6 loopback in that namespace, or the port is
                    // taken by the pod itself: say so, keep going.
                    Err(e) => tracing::debug!(netns = cookie, %ip, error = %e, "no shim listener"),
                }
            }
            self.listeners
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(cookie, tasks);
        }
    }

    /// Records the pod address of each namespace (for ConnInfo).
    pub fn set_clients(&self, ids: &BTreeMap<u64, IpAddr>) {
        let mut clients = self.clients.write().unwrap_or_else(|e| e.into_inner());
        clients.clear();
        clients.extend(ids.iter().map(|(c, a)| (*c, *a)));
    }

    /// Runs on the shim's runtime, so the listener and the connections it
    /// accepts are driven there too.
    async fn accept_loop(self: Arc<Self>, listener: std::net::TcpListener, netns: u64) {
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(netns, error = %e, "shim listener could not be registered");
                return;
            }
        };
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(netns, error = %e, "shim accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(orig_dst) = self.orig.lookup(netns, peer) else {
                // Not sent by the kernel (someone dialled the shim port
                // directly): there is no service to route for.
                tracing::debug!(netns, %peer, "connection to the shim without an original destination; closing");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let client_ip = self
                .clients
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(&netns)
                .copied();
            let source_pod = client_ip.and_then(|ip| {
                self.pods
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&ip)
                    .cloned()
            });
            let conn = ConnInfo {
                orig_dst,
                peer,
                client_ip,
                netns,
                source_pod,
            };
            tokio::spawn(self.shim.clone().serve_connection(stream, conn));
        }
    }
}

/// Starts the shim's runtime: one thread, a current-thread scheduler. A
/// request then never crosses threads (no work-stealing queues, no
/// cross-thread wake-ups), as in nginx's single-threaded workers, and the
/// control plane (reloads that compile thousands of services, scrapes,
/// the admin socket) runs on the agent's runtime without stalling it.
fn start_runtime() -> io::Result<Handle> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = runtime.handle().clone();
    std::thread::Builder::new()
        .name("canary-shim".into())
        .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
    Ok(handle)
}

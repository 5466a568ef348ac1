//! The peers the shim is measured against, from Debian: nginx and HAProxy,
//! each configured for the composite-routing scenario
//! (`deploy/examples/composite-routing`): `x-canary-user: true` → v2, else
//! 95/5 between v1 (two pods) and v2 (one pod), chosen per request, with
//! keep-alive connection pools to the pods. Each runs single-worker,
//! sidecar-style: inside the client's network namespace, listening on its
//! loopback, in a cgroup of its own (so every process it forks is found,
//! and killed on drop).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use canary_tests::checkout::{PODS, PORT};
use canary_tests::{ChildGuard, Netns, TestCgroup, spawn_in, wait_for_tcp};

use super::cpu;

/// Where nginx and HAProxy listen, on the client namespace's loopback.
pub const NGINX_ADDR: &str = "127.0.0.1:18080";
pub const HAPROXY_ADDR: &str = "127.0.0.1:18081";

/// Idle keep-alive connections each proxy keeps per upstream (nginx
/// `keepalive`; canary keeps up to 64 per endpoint by default).
const UPSTREAM_IDLE: usize = 64;

/// (version, address) of every checkout pod.
fn pods() -> Vec<(&'static str, String)> {
    PODS.iter()
        .map(|(version, _, v4, _)| (*version, format!("{v4}:{PORT}")))
        .collect()
}

/// nginx: `worker_processes 1`, an upstream per version with a keep-alive
/// pool, `map $http_x_canary_user` for the header route, `split_clients`
/// on `$request_id` (a new random id per request) for 95/5. Access log
/// off (canary keeps its metrics on).
pub fn nginx_conf(dir: &Path, listen: SocketAddr) -> String {
    let d = dir.display();
    let mut upstreams = String::new();
    for version in ["v1", "v2"] {
        let _ = writeln!(upstreams, "    upstream {version} {{");
        for (v, addr) in pods() {
            if v == version {
                let _ = writeln!(upstreams, "        server {addr};");
            }
        }
        let _ = writeln!(
            upstreams,
            "        keepalive {UPSTREAM_IDLE};\n        keepalive_requests 1000000;\n    }}"
        );
    }
    format!(
        "# canary bench (L7): nginx beside the shim. Generated; removed after the run.
user root;
worker_processes 1;
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
worker_rlimit_nofile 16384;
events {{
    worker_connections 8192;
}}
http {{
    access_log off;
    client_body_temp_path {d}/nginx-client-body;
    proxy_temp_path {d}/nginx-proxy;
    fastcgi_temp_path {d}/nginx-fastcgi;
    uwsgi_temp_path {d}/nginx-uwsgi;
    scgi_temp_path {d}/nginx-scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
{upstreams}
    # Istio's weighted split is random per request: so is $request_id.
    split_clients \"${{request_id}}\" $split {{
        95% v1;
        *   v2;
    }}
    map $http_x_canary_user $pool {{
        \"true\"  v2;
        default $split;
    }}
    server {{
        listen {listen} backlog=4096;
        location / {{
            proxy_pass http://$pool;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}
}}
"
    )
}

/// HAProxy: `nbthread 1`, a backend per version, the header ACL first,
/// then `rand(100) lt 5` → v2 (a fresh draw per request), `http-reuse
/// always` to the pods. No logging.
pub fn haproxy_cfg(dir: &Path, listen: SocketAddr) -> String {
    let d = dir.display();
    let servers = |version: &str| {
        pods()
            .into_iter()
            .enumerate()
            .filter(|(_, (v, _))| *v == version)
            .map(|(i, (_, addr))| format!("    server pod{i} {addr}\n"))
            .collect::<String>()
    };
    format!(
        "# canary bench (L7): HAProxy beside the shim. Generated; removed after the run.
global
    nbthread 1
    maxconn 4096
    pidfile {d}/haproxy.pid

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 10s
    timeout client 75s
    timeout server 75s
    timeout http-keep-alive 75s

frontend checkout
    bind {listen}
    maxconn 4096
    use_backend v2 if {{ req.hdr(x-canary-user) -i true }}
    use_backend v2 if {{ rand(100) lt 5 }}
    default_backend v1

backend v1
    balance roundrobin
{v1}
backend v2
    balance roundrobin
{v2}",
        v1 = servers("v1"),
        v2 = servers("v2"),
    )
}

/// A proxy process (and whatever it forks) in a cgroup of its own,
/// stopped on drop: SIGTERM and a wait, then the cgroup kills whatever is
/// left (nginx's worker if its master died first).
pub struct Proxy {
    pub addr: SocketAddr,
    child: Option<ChildGuard>,
    log: PathBuf,
    // Dropped after `child` is stopped: kills leftovers, removes the dir.
    cgroup: TestCgroup,
}

// === impl Proxy ===

impl Proxy {
    /// Checks the config with `check`, then starts `cmd` in `netns` and a
    /// new cgroup `canary-<prefix>-<name>`, pinned to `cpu`, and waits
    /// until `addr` accepts connections.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        name: &'static str,
        prefix: &str,
        netns: &Netns,
        mut check: Command,
        mut cmd: Command,
        addr: SocketAddr,
        log: PathBuf,
        cpu: Option<usize>,
    ) -> Result<Self> {
        let out = check
            .output()
            .with_context(|| format!("checking the {name} config ({check:?})"))?;
        if !out.status.success() {
            bail!(
                "{name} rejects its config: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let cgroup = TestCgroup::new(prefix, name)?;
        let file = std::fs::File::create(&log)?;
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        if let Some(cpu) = cpu {
            cpu::pin_command(&mut cmd, cpu);
        }
        let child = spawn_in(cmd, Some(netns), Some(&cgroup))?;
        let mut proxy = Proxy {
            addr,
            child: Some(child),
            log,
            cgroup,
        };
        if let Err(e) = wait_for_tcp(Some(netns), addr, Duration::from_secs(10)) {
            bail!(
                "{name} did not start: {e:#}; its log:\n{}",
                proxy.log_text()
            );
        }
        if let Some(child) = proxy.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            bail!("{name} exited ({status}); its log:\n{}", proxy.log_text());
        }
        Ok(proxy)
    }

    /// Every process of this proxy (nginx: master and worker).
    pub fn pids(&self) -> Result<Vec<u32>> {
        Ok(self
            .cgroup
            .procs()?
            .into_iter()
            .filter_map(|p| u32::try_from(p).ok())
            .collect())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // nginx: fast shutdown (the master stops its worker);
            // HAProxy: hard stop.
            let _ = child.terminate(Duration::from_secs(5));
        }
    }
}

pub fn nginx(prefix: &str, dir: &Path, netns: &Netns, cpu: Option<usize>) -> Result<Proxy> {
    let addr: SocketAddr = NGINX_ADDR.parse().expect("constant");
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, nginx_conf(dir, addr))?;
    let cmd = |test: bool| {
        let mut c = Command::new("nginx");
        if test {
            c.arg("-t");
        }
        c.arg("-q")
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("nginx-error.log"))
            .arg("-c")
            .arg(&conf);
        c
    };
    Proxy::start(
        "nginx",
        prefix,
        netns,
        cmd(true),
        cmd(false),
        addr,
        dir.join("nginx.out"),
        cpu,
    )
}

pub fn haproxy(prefix: &str, dir: &Path, netns: &Netns, cpu: Option<usize>) -> Result<Proxy> {
    let addr: SocketAddr = HAPROXY_ADDR.parse().expect("constant");
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, haproxy_cfg(dir, addr))?;
    let mut check = Command::new("haproxy");
    check.arg("-c").arg("-q").arg("-f").arg(&cfg);
    let mut cmd = Command::new("haproxy");
    // -db: foreground, no master process, no daemon.
    cmd.arg("-db").arg("-f").arg(&cfg);
    Proxy::start(
        "haproxy",
        prefix,
        netns,
        check,
        cmd,
        addr,
        dir.join("haproxy.out"),
        cpu,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_carry_the_split_and_the_header_route() {
        let dir = Path::new("/tmp/x");
        let addr: SocketAddr = NGINX_ADDR.parse().expect("constant");
        let n = nginx_conf(dir, addr);
        assert!(n.contains("worker_processes 1;"));
        assert!(n.contains("split_clients \"${request_id}\" $split"));
        assert!(n.contains("95% v1;"));
        assert!(n.contains("\"true\"  v2;"));
        assert!(n.contains("server 10.77.0.11:8080;\n        server 10.77.0.12:8080;"));
        assert!(n.contains("upstream v2 {\n        server 10.77.0.21:8080;"));
        let h = haproxy_cfg(dir, addr);
        assert!(h.contains("nbthread 1"));
        assert!(h.contains("http-reuse always"));
        assert!(h.contains("req.hdr(x-canary-user) -i true"));
        assert!(h.contains("rand(100) lt 5"));
        assert!(h.contains("backend v2\n    balance roundrobin\n    server pod2 10.77.0.21:8080"));
    }
}

//! Child processes started inside a test's namespace and cgroup, and killed
//! when their guard drops.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cgroup::TestCgroup;
use crate::netns::Netns;

/// A child process that is killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct ChildGuard {
    // `None` once waited for by a consuming method.
    child: Option<Child>,
    label: String,
}

/// Starts `cmd` inside `netns` and `cgroup` (each optional).
///
/// The child joins both between fork and exec, so not one instruction of the
/// program runs outside them, and the cgroup's programs govern its very
/// first connect. The namespace is entered with `setns`, not `ip netns exec`,
/// which would remount `/sys` and hide bpffs and cgroup2 from the child.
pub fn spawn_in(
    mut cmd: Command,
    netns: Option<&Netns>,
    cgroup: Option<&TestCgroup>,
) -> Result<ChildGuard> {
    let label = label(&cmd);
    // Opened before fork: the child may only make async-signal-safe calls.
    let ns_file: Option<File> = netns.map(Netns::open).transpose()?;
    let procs_file: Option<File> = cgroup
        .map(|cg| {
            OpenOptions::new()
                .write(true)
                .open(cg.procs_file())
                .with_context(|| format!("opening {}", cg.procs_file().display()))
        })
        .transpose()?;
    let ns_fd = ns_file.as_ref().map(AsRawFd::as_raw_fd);
    let procs_fd = procs_file.as_ref().map(AsRawFd::as_raw_fd);
    // SAFETY: the closure only calls write(2) and setns(2), both
    // async-signal-safe, on fds that stay open until spawn returns, and
    // allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = procs_fd {
                // "0" means the writing process itself.
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(fd) = ns_fd
                && libc::setns(fd, libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let where_ = match (netns, cgroup) {
        (Some(ns), Some(cg)) => {
            format!(" in netns {} and cgroup {}", ns.name(), cg.path().display())
        }
        (Some(ns), None) => format!(" in netns {}", ns.name()),
        (None, Some(cg)) => format!(" in cgroup {}", cg.path().display()),
        (None, None) => String::new(),
    };
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {label}{where_}"))?;
    drop((ns_file, procs_file));
    Ok(ChildGuard {
        child: Some(child),
        label,
    })
}

/// Runs `cmd` inside `netns` and `cgroup` to completion (at most `timeout`)
/// and returns its stdout; a non-zero exit is an error that quotes stderr.
pub fn run_in(
    mut cmd: Command,
    netns: Option<&Netns>,
    cgroup: Option<&TestCgroup>,
    timeout: Duration,
) -> Result<String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = spawn_in(cmd, netns, cgroup)?;
    let label = child.label.clone();
    let out = child.wait_with_output(timeout)?;
    if !out.status.success() {
        bail!(
            "{label} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The path of one of this crate's binaries (`canary-backend`,
/// `canary-probe`) or of another workspace binary.
///
/// Integration tests should prefer `env!("CARGO_BIN_EXE_<name>")`. Library
/// callers get `$CARGO_BIN_EXE_<name>` if set at run time, else the file
/// next to the running executable (`target/<profile>/`), or next to its
/// directory when that is `target/<profile>/deps/`.
pub fn bin_path(name: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(format!("CARGO_BIN_EXE_{name}")) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dirs: Vec<&Path> = exe.parent().into_iter().collect();
    if let Some(dir) = dirs.first().copied()
        && dir.file_name().is_some_and(|n| n == "deps")
        && let Some(parent) = dir.parent()
    {
        dirs.push(parent);
    }
    dirs.iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "binary {name} not found next to {} (build it first: `cargo build -p canary-tests --bins`)",
                exe.display()
            )
        })
}

fn label(cmd: &Command) -> String {
    let program = cmd.get_program().to_string_lossy();
    Path::new(program.as_ref())
        .file_name()
        .map_or_else(|| program.to_string(), |n| n.to_string_lossy().into_owned())
}

// === impl ChildGuard ===

impl ChildGuard {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The program name, for messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The inner child, for its stdin/stdout/stderr handles.
    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("ChildGuard used after wait")
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) unless the child was reaped
    /// already (then its pid may belong to someone else).
    pub fn kill_with(&mut self, signal: libc::c_int) -> Result<()> {
        let label = self.label.clone();
        let child = self.child_mut();
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = child.id() as libc::pid_t;
        // SAFETY: kill has no memory-safety preconditions; `pid` is our
        // unreaped child, so it cannot have been reused.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("signal {signal} to {label} ({pid})"));
        }
        Ok(())
    }

    /// The exit status if the child has exited (and reaps it).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child_mut().try_wait()?)
    }

    /// Waits at most `timeout` for the child to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        let mut nap = Duration::from_millis(1);
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            std::thread::sleep(nap.min(left));
            nap = (nap * 2).min(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits up to `timeout`; SIGKILL and an error if the
    /// child did not exit by then.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.kill_with(libc::SIGTERM)?;
        match self.wait_timeout(timeout)? {
            Some(status) => Ok(status),
            None => {
                self.kill_with(libc::SIGKILL)?;
                self.child_mut().wait()?;
                bail!("{} ignored SIGTERM for {timeout:?}", self.label)
            }
        }
    }

    /// Collects stdout and stderr (when piped) until the child exits, for
    /// at most `timeout`; on timeout the child is killed and this fails.
    pub fn wait_with_output(mut self, timeout: Duration) -> Result<Output> {
        let deadline = Instant::now() + timeout;
        let child = self.child_mut();
        let stdout = child.stdout.take().map(read_in_background);
        let stderr = child.stderr.take().map(read_in_background);
        let Some(status) = self.wait_timeout(timeout)? else {
            self.kill_with(libc::SIGKILL)?;
            let _ = self.child_mut().wait();
            let err = stderr
                .and_then(|rx| rx.recv_timeout(Duration::from_millis(100)).ok())
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                .unwrap_or_default();
            bail!(
                "{} did not finish within {timeout:?}; killed. stderr: {}",
                self.label,
                err.trim()
            );
        };
        self.child = None;
        // A grandchild could hold the pipes open; do not wait for ever.
        let collect = |rx: Option<mpsc::Receiver<Vec<u8>>>| -> Result<Vec<u8>> {
            let Some(rx) = rx else { return Ok(Vec::new()) };
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_secs(1));
            rx.recv_timeout(left)
                .with_context(|| format!("{}: output pipe still open after exit", self.label))
        };
        Ok(Output {
            status,
            stdout: collect(stdout)?,
            stderr: collect(stderr)?,
        })
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Ok(None) = child.try_wait()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn read_in_background<R: Read + Send + 'static>(mut pipe: R) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

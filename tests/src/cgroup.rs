//! A cgroup v2 directory for the processes under test.
//!
//! canary's programs attach to a cgroup, so each test makes its own,
//! places only its own client processes there, and removes it afterwards.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long drop waits for killed processes to leave the cgroup.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// `<cgroup2 mount>/canary-<prefix>-<name>`; on drop its processes are
/// killed and the directory removed.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

/// The mount point of the cgroup v2 hierarchy, from `/proc/self/mounts`.
///
/// It is `/sys/fs/cgroup` on most systems but `/sys/fs/cgroup/unified` on
/// hybrid ones, so it is never assumed.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    parse_cgroup2_mount(&mounts).context("no cgroup2 file system in /proc/self/mounts")
}

fn parse_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(target)))
    })
}

/// `/proc/self/mounts` writes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let d = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(d, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// === impl TestCgroup ===

impl TestCgroup {
    /// Creates `<cgroup2 mount>/canary-<prefix>-<name>`; fails if it exists.
    pub fn new(prefix: &str, name: &str) -> Result<Self> {
        let path = cgroup2_mount()?.join(format!("canary-{prefix}-{name}"));
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(TestCgroup { path })
    }

    /// The cgroup directory, as given to canary's attach calls.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `<path>/cgroup.procs`; writing a pid (or "0" for oneself) moves it in.
    pub fn procs_file(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// The pids now in the cgroup.
    pub fn procs(&self) -> Result<Vec<libc::pid_t>> {
        let text = fs::read_to_string(self.procs_file())
            .with_context(|| format!("reading {}", self.procs_file().display()))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Kills every process in the cgroup and waits until it is empty.
    pub fn kill_all(&self) -> Result<()> {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            let mut pids = self.procs()?;
            if pids.is_empty() {
                return Ok(());
            }
            // The test process itself may have joined to connect through
            // canary; move it out rather than kill it.
            let own = std::process::id() as libc::pid_t;
            if pids.contains(&own) {
                let parent = self.path.parent().unwrap_or(&self.path);
                fs::write(parent.join("cgroup.procs"), own.to_string())
                    .context("moving the test process out of its test cgroup")?;
                pids.retain(|p| *p != own);
            }
            // The cgroup is ours and only our children were put in it.
            for pid in pids {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if Instant::now() >= deadline {
                bail!(
                    "cgroup {} still holds {:?} after {DRAIN_TIMEOUT:?}",
                    self.path.display(),
                    self.procs()?
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn remove(&self) -> Result<()> {
        self.kill_all()?;
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                // Exiting tasks can keep it busy for a moment.
                Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("removing {}", self.path.display()));
                }
            }
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("canary-tests: cleanup: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_a_hybrid_layout() {
        let mounts = "\
sysfs /sys sysfs rw,nosuid 0 0
tmpfs /sys/fs/cgroup tmpfs ro,nosuid 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0
";
        assert_eq!(
            parse_cgroup2_mount(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(parse_cgroup2_mount("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn unescapes_mount_paths() {
        assert_eq!(unescape_mount_path(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape_mount_path(r"/plain"), "/plain");
        assert_eq!(unescape_mount_path(r"/odd\"), r"/odd\");
    }
}

//! The canary configs the bench serves, generated from
//! `deploy/examples/checkout` into a temporary directory.
//!
//! - `small/`: the example (checkout-service, 90/10 between v1 and v2)
//!   plus `checkout-one`, a Service whose only endpoint is `checkout-v1-a`,
//!   the pod the direct baseline talks to.
//! - `10k/`: the same plus 10,000 generated Services `bench-NNNNN` on
//!   10.100.x.y:8080, one pod each. The measured service stays
//!   checkout-service, one of 10,002.
//!
//! The generated Services are spread over files of [`SERVICES_PER_FILE`]:
//! the YAML loader's time grows with the square of the documents in one
//! file (10,000 in one file took 10–15 s to load here, 80% of it in
//! `unsafe_libyaml`'s scanner; the same in 20 files, 1.1 s), and the test
//! kit gives an agent 30 s to come up.

use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use canary_tests::checkout::{PODS, PORT};

use super::iptables::generated_vip;

/// The one-endpoint Service's ClusterIP and port.
pub const ONE_VIP: &str = "10.96.0.11:8080";
/// The pod behind [`ONE_VIP`], and the direct baseline's target.
pub const ONE_POD: &str = "checkout-v1-a";
/// Label added to every pod, so a Service can select exactly one.
const POD_LABEL: &str = "bench-pod";
/// Generated Services per YAML file.
pub const SERVICES_PER_FILE: usize = 500;

/// Both config directories; removed on drop.
pub struct Configs {
    root: PathBuf,
    pub small: PathBuf,
    pub large: PathBuf,
}

pub fn one_vip() -> SocketAddr {
    ONE_VIP.parse().expect("constant")
}

// === impl Configs ===

impl Configs {
    /// Writes both directories under `/tmp/canary-<prefix>-bench`.
    pub fn generate(prefix: &str, example: &Path, services: usize) -> Result<Self> {
        let root = std::env::temp_dir().join(format!("canary-{prefix}-bench"));
        fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        let configs = Configs {
            small: root.join("small"),
            large: root.join("10k"),
            root,
        };
        for dir in [&configs.small, &configs.large] {
            copy_example(example, dir)?;
            fs::write(dir.join("bench-one.yaml"), one_service())?;
        }
        for (n, start) in (0..services).step_by(SERVICES_PER_FILE).enumerate() {
            let end = (start + SERVICES_PER_FILE).min(services);
            fs::write(
                configs.large.join(format!("bench-generated-{n:03}.yaml")),
                generated_services(start..end),
            )?;
        }
        Ok(configs)
    }
}

impl Drop for Configs {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// Copies the example's YAML and labels each pod with its own name.
fn copy_example(example: &Path, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir)?;
    for entry in fs::read_dir(example).with_context(|| format!("reading {}", example.display()))? {
        let path = entry?.path();
        let Some(name) = path.file_name() else {
            continue;
        };
        let mut text = fs::read_to_string(&path)?;
        if name == "pods.yaml" {
            text = label_pods(&text)?;
        }
        fs::write(dir.join(name), text)?;
    }
    Ok(())
}

fn label_pods(pods: &str) -> Result<String> {
    let mut text = pods.to_owned();
    for (_, pod, _, _) in PODS {
        let anchor = format!("  name: {pod}\n  namespace: prod\n  labels:\n");
        if !text.contains(&anchor) {
            bail!("pods.yaml no longer has the layout the bench edits: {anchor:?} not found");
        }
        text = text.replacen(&anchor, &format!("{anchor}    {POD_LABEL}: {pod}\n"), 1);
    }
    Ok(text)
}

fn one_service() -> String {
    let (ip, port) = ONE_VIP.split_once(':').expect("constant");
    format!(
        "# The bench's one-endpoint Service: canary's cost without the split.\n\
         apiVersion: v1\nkind: Service\nmetadata:\n  name: checkout-one\n  namespace: prod\n\
         spec:\n  clusterIP: {ip}\n  selector:\n    {POD_LABEL}: {ONE_POD}\n  ports:\n\
         \x20 - name: http\n    port: {port}\n    targetPort: {PORT}\n"
    )
}

/// Services number `range`, one document each, one pod each
/// (round-robin).
fn generated_services(range: std::ops::Range<usize>) -> String {
    let mut out = String::with_capacity(range.len() * 240);
    for i in range {
        let pod = PODS[i % PODS.len()].1;
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: bench-{i:05}\n  \
             namespace: prod\nspec:\n  clusterIP: {}\n  selector:\n    {POD_LABEL}: {pod}\n  \
             ports:\n  - name: http\n    port: {PORT}\n    targetPort: {PORT}\n",
            generated_vip(i)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_every_pod_of_the_example() -> Result<()> {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/checkout");
        let labelled = label_pods(&fs::read_to_string(example.join("pods.yaml"))?)?;
        for (_, pod, _, _) in PODS {
            assert!(
                labelled.contains(&format!("    {POD_LABEL}: {pod}\n")),
                "{pod}"
            );
        }
        Ok(())
    }

    #[test]
    fn generates_distinct_services() {
        let text = generated_services(0..3);
        assert_eq!(text.matches("kind: Service").count(), 3);
        assert!(text.contains("name: bench-00002"));
        assert!(text.contains("clusterIP: 10.100.0.3"));
        assert!(one_service().contains("clusterIP: 10.96.0.11"));
    }
}

//! The data path's life: it outlives the agent (even SIGKILL), a restarted
//! agent adopts it with the same state, a broken config never reaches it,
//! a subset without endpoints fails connections at once, and a `--cgroup`
//! that is not one is refused before anything is created.
//!
//! Privileged: run with `cargo xtask test` (as root).

use std::path::PathBuf;

use canary_tests::agent::{Agent, canary_bin, counter_total};
use canary_tests::checkout::vip4;
use canary_tests::e2e::*;
use canary_tests::probe::ProbeArgs;
use canary_tests::{require_root, unique_prefix};

#[test]
#[ignore = "privileged: run with cargo xtask test"]
fn sigkilled_agent_leaves_the_data_path_serving_and_a_restart_adopts_it() {
    require_root();
    let prefix = unique_prefix();
    let world = start(&prefix);
    let mut agent = Agent::start(&prefix, &example("checkout"), &world.cgroup).expect("agent");
    agent
        .weights("checkout-service", &["v1=70", "v2=30"])
        .expect("weights");

    let background = BackgroundProbe::start(&world, &prefix, vip4());

    agent.kill9().expect("kill -9");
    // No agent at all: the pinned programs and maps still split 70/30.
    let orphaned = probe(&world, ProbeArgs::count(vip4(), 1000));
    assert_clean(&orphaned, 1000);
    assert_share(&orphaned, "v2", 0.30);

    agent.restart().expect("restart");
    let status = agent.status().expect("status");
    assert_eq!(weights_of(&status), pair("v1", 70, "v2", 30), "{status:#}");
    assert_eq!(status["services"][0]["ports"][0]["overridden"], true);
    let after = probe(&world, ProbeArgs::count(vip4(), 1000));
    assert_clean(&after, 1000);
    assert_share(&after, "v2", 0.30);

    background.finish_without_failures("across kill and restart");
    // Counters live in pinned maps: the restarted agent still has them all.
    let counted = counter_total(&agent.status().expect("status"), HOST, "opened");
    assert!(
        counted >= orphaned.ok + after.ok,
        "counters lost across restart: {counted}"
    );
}

#[test]
#[ignore = "privileged: run with cargo xtask test"]
fn a_broken_config_is_rejected_readably_and_the_split_stays() {
    require_root();
    let prefix = unique_prefix();
    let world = start(&prefix);
    let config = ConfigCopy::of("checkout", &prefix);
    let agent = Agent::start(&prefix, &config.0, &world.cgroup).expect("agent");

    // Three mistakes at once: a negative weight, an unknown subset, and a
    // VirtualService for a service that does not exist.
    config.edit("virtualservice.yaml", "weight: 10", "weight: -5");
    config.edit("virtualservice.yaml", "subset: v1", "subset: v3");
    std::fs::write(
        config.0.join("orphan.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: payments\n  namespace: prod\n\
         spec:\n  hosts: [payments]\n  http:\n  - route:\n    - destination:\n        host: payments\n",
    )
    .expect("write");
    let status = wait_status(&agent, "the reload to be rejected", |s| {
        s["rejected_reloads"].as_u64() >= Some(1)
    });
    let error = status["last_error"]
        .as_str()
        .expect("last_error")
        .to_string();
    for needle in ["-5", "v3", "payments", "virtualservice.yaml", "weight"] {
        assert!(
            error.contains(needle),
            "error does not mention {needle:?}:\n{error}"
        );
    }
    assert_eq!(
        weights_of(&status),
        pair("v1", 90, "v2", 10),
        "the old split stays in force"
    );

    let validate = agent
        .cli_plain(&["validate", config.0.to_str().expect("utf8")])
        .expect("validate");
    assert!(
        !validate.status.success(),
        "canary validate must exit non-zero"
    );
    let text = String::from_utf8_lossy(&validate.stderr);
    for needle in ["-5", "v3", "payments"] {
        assert!(
            text.contains(needle),
            "validate output does not mention {needle:?}:\n{text}"
        );
    }

    let r = probe(&world, ProbeArgs::count(vip4(), 2000));
    assert_clean(&r, 2000);
    assert_share(&r, "v2", 0.10);

    // Bad live weights are refused too, and change nothing.
    let negative = agent
        .weights("checkout-service", &["v1=-5", "v2=10"])
        .expect_err("negative weight");
    assert!(negative.to_string().contains("-5"), "{negative}");
    let unknown = agent
        .weights("checkout-service", &["v9=10"])
        .expect_err("unknown subset");
    assert!(
        unknown.to_string().contains("v9") && unknown.to_string().contains("v1"),
        "{unknown}"
    );
    assert_eq!(
        weights_of(&agent.status().expect("status")),
        pair("v1", 90, "v2", 10)
    );

    // Fixing the files clears the error.
    std::fs::remove_file(config.0.join("orphan.yaml")).expect("rm");
    config.edit("virtualservice.yaml", "weight: -5", "weight: 10");
    config.edit("virtualservice.yaml", "subset: v3", "subset: v1");
    wait_status(&agent, "the fixed config to load", |s| {
        s["last_error"].is_null()
    });
}

#[test]
#[ignore = "privileged: run with cargo xtask test"]
fn a_subset_without_endpoints_fails_connections_at_once() {
    require_root();
    let prefix = unique_prefix();
    let world = start(&prefix);
    let config = ConfigCopy::of("checkout", &prefix);
    // The only v2 pod is not ready: v2 has no endpoint.
    config.edit("virtualservice.yaml", "weight: 90", "weight: 50");
    config.edit("virtualservice.yaml", "weight: 10", "weight: 50");
    unready_v2(&config);
    let agent = Agent::start(&prefix, &config.0, &world.cgroup).expect("agent");

    let r = probe(&world, ProbeArgs::count(vip4(), 400));
    assert_eq!(r.attempted, 400);
    assert!(r.failed > 100 && r.ok > 100, "{r:?}");
    assert_eq!(
        r.errors.keys().collect::<Vec<_>>(),
        vec!["EHOSTUNREACH"],
        "only fast EHOSTUNREACH failures: {:?}",
        r.errors
    );
    assert_eq!(r.by_version.keys().collect::<Vec<_>>(), vec!["v1"]);
    let status = agent.status().expect("status");
    let refused = counter_total(&status, HOST, "no_endpoint");
    assert_eq!(refused, r.failed, "{status:#}");
}

/// Marks checkout-v2-a not Ready in the copied pods.yaml.
fn unready_v2(config: &ConfigCopy) {
    let path = config.0.join("pods.yaml");
    let text = std::fs::read_to_string(&path).expect("read");
    let doc_start = text.find("name: checkout-v2-a").expect("v2 pod");
    let (head, tail) = text.split_at(doc_start);
    let tail = tail.replacen("status: \"True\"", "status: \"False\"", 1);
    std::fs::write(&path, format!("{head}{tail}")).expect("write");
}

#[test]
#[ignore = "privileged: run with cargo xtask test"]
fn an_agent_given_a_directory_that_is_not_a_cgroup_says_so_and_creates_nothing() {
    require_root();
    let prefix = unique_prefix();
    let plain = std::env::temp_dir().join(format!("canary-not-a-cgroup-{prefix}"));
    std::fs::create_dir_all(&plain).expect("dir");
    let pins = PathBuf::from(format!("/sys/fs/bpf/canary-test-{prefix}"));
    let run = PathBuf::from(format!("/run/canary-test-{prefix}"));
    let out = std::process::Command::new(canary_bin().expect("canary"))
        .arg("agent")
        .arg("--config")
        .arg(example("checkout"))
        .arg("--cgroup")
        .arg(&plain)
        .arg("--pin-path")
        .arg(&pins)
        .arg("--admin-socket")
        .arg(run.join("canary.sock"))
        .arg("--state-dir")
        .arg(run.join("state"))
        .output()
        .expect("run canary agent");
    let _ = std::fs::remove_dir(&plain);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("is not a cgroup v2 directory") && stderr.contains("cgroup2"),
        "{stderr}"
    );
    assert!(!pins.exists(), "nothing pinned");
    assert!(!run.exists(), "no state written");
}

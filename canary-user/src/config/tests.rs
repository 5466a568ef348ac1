//! Config path tests on real Istio and Kubernetes YAML.

use std::path::{Path, PathBuf};

use super::*;

/// The checkout Service, its three pods and its DestinationRule.
pub(crate) const BASE: &str = include_str!("../../tests/fixtures/base.yaml");

/// Loads `BASE` (as `base.yaml`) and `extra` (as `test.yaml`).
pub(crate) fn load_with(extra: &str) -> Result<LoadedConfig, ConfigErrors> {
    load_documents(&[
        (PathBuf::from("base.yaml"), BASE.to_string()),
        (PathBuf::from("test.yaml"), extra.to_string()),
    ])
}

pub(crate) fn must_load(extra: &str) -> LoadedConfig {
    match load_with(extra) {
        Ok(cfg) => cfg,
        Err(e) => panic!("config rejected:\n{e}"),
    }
}

pub(crate) fn must_fail(extra: &str) -> ConfigErrors {
    match load_with(extra) {
        Ok(_) => panic!("config accepted, expected errors"),
        Err(e) => {
            // Shown with --nocapture: errors must read well to a human.
            println!("{e}");
            e
        }
    }
}

/// The one error whose field is `field`.
fn error_at<'a>(errors: &'a ConfigErrors, field: &str) -> &'a ConfigError {
    let hits: Vec<&ConfigError> = errors
        .iter()
        .filter(|e| e.field.as_deref() == Some(field))
        .collect();
    assert_eq!(hits.len(), 1, "one error at {field}, got:\n{errors}");
    hits[0]
}

fn has_warning(cfg: &LoadedConfig, needle: &str) -> bool {
    cfg.warnings.iter().any(|w| w.to_string().contains(needle))
}

pub(crate) const VS_9010: &str = r#"
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: checkout-service-vs
  namespace: prod
spec:
  hosts: [checkout-service.prod.svc.cluster.local]
  http:
  - route:
    - destination: {host: checkout-service.prod.svc.cluster.local, subset: v1}
      weight: 90
    - destination: {host: checkout-service.prod.svc.cluster.local, subset: v2}
      weight: 10
"#;

#[test]
fn every_istio_api_version_parses() {
    for api in [
        "networking.istio.io/v1alpha3",
        "networking.istio.io/v1beta1",
        "networking.istio.io/v1",
    ] {
        let text = BASE.replace("networking.istio.io/v1alpha3", api)
            + "---\n"
            + &VS_9010.replace("networking.istio.io/v1alpha3", api);
        let cfg = load_str("all.yaml", &text).unwrap_or_else(|e| panic!("{api}: {e}"));
        assert_eq!(cfg.virtual_services.len(), 1, "{api}");
        assert_eq!(cfg.destination_rules.len(), 1, "{api}");
    }
}

#[test]
fn unknown_istio_api_version_is_an_error_naming_the_valid_ones() {
    let errors =
        must_fail(&VS_9010.replace("networking.istio.io/v1alpha3", "networking.istio.io/v2"));
    let e = error_at(&errors, "apiVersion");
    assert_eq!(
        e.object.as_deref(),
        Some("VirtualService prod/checkout-service-vs")
    );
    let valid = e.valid.as_deref().unwrap_or_default();
    assert!(
        valid.contains("networking.istio.io/v1alpha3")
            && valid.contains("networking.istio.io/v1beta1")
    );
}

#[test]
fn other_kinds_are_ignored_with_a_warning() {
    let cfg = must_load(
        r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: prod}
data: {a: b}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: checkout-v1, namespace: prod}
---
# A Knative Service is not a Kubernetes Service.
apiVersion: serving.knative.dev/v1
kind: Service
metadata: {name: hello}
"#,
    );
    assert!(has_warning(
        &cfg,
        "ConfigMap prod/settings (v1) is not read by canary; ignored"
    ));
    assert!(has_warning(&cfg, "Deployment prod/checkout-v1"));
    assert!(has_warning(
        &cfg,
        "Service default/hello (serving.knative.dev/v1)"
    ));
    assert_eq!(cfg.services.len(), 1);
}

#[test]
fn documents_load_in_any_order_across_files() {
    // Everything reversed, VirtualService first, split over two files.
    let mut docs: Vec<&str> = BASE.split("\n---\n").collect();
    docs.reverse();
    let reversed = docs.join("\n---\n");
    let cfg = load_documents(&[
        (PathBuf::from("a-vs.yaml"), VS_9010.to_string()),
        (PathBuf::from("b-rest.yaml"), reversed),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    let ordered = must_load(VS_9010);
    assert_eq!(
        crate::compile::compile(&cfg),
        crate::compile::compile(&ordered)
    );
    assert_eq!(cfg.pods.len(), 3);
    // A comment-only document and a `...` end marker are fine.
    let cfg = load_str(
        "x.yaml",
        &format!("# nothing\n---\n{BASE}\n...\n---\n# trailing\n"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.services.len(), 1);
}

#[test]
fn kubectl_list_output_loads() {
    let cfg = must_load(
        r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: payments, namespace: prod}
  spec:
    clusterIP: 10.96.0.20
    selector: {app: payments}
    ports: [{port: 80, targetPort: 8080}]
"#,
    );
    assert!(cfg.service("payments.prod.svc.cluster.local").is_some());
}

#[test]
fn load_path_reads_a_directory_recursively_and_skips_hidden_entries() {
    let dir = std::env::temp_dir().join(format!("canary-config-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let write = |rel: &str, text: &str| {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap_or(Path::new("/"))).expect("mkdir");
        std::fs::write(p, text).expect("write");
    };
    write("base.yaml", BASE);
    write("routes/checkout.yml", VS_9010);
    write("README.md", "not yaml");
    // A ConfigMap volume's second copy of every file.
    write("..2024_01_01/base.yaml", BASE);
    let result = load_path(&dir);
    let files = result.as_ref().map(|c| c.files.clone()).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = result.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        files,
        vec![dir.join("base.yaml"), dir.join("routes/checkout.yml")]
    );
    assert_eq!(cfg.virtual_services.len(), 1);

    let missing = load_path(Path::new("/nonexistent/canary")).expect_err("no such path");
    assert!(
        missing
            .to_string()
            .starts_with("/nonexistent/canary: cannot read"),
        "{missing}"
    );
}

#[test]
fn invalid_yaml_is_reported_with_file_and_line() {
    let errors =
        must_fail("apiVersion: v1\nkind: Pod\nmetadata:\n  name: [oops\n  namespace: prod\n");
    assert_eq!(errors.len(), 1);
    let e = &errors.0[0];
    assert_eq!(e.file, PathBuf::from("test.yaml"));
    assert!(e.line.is_some_and(|l| l >= 4), "{e}");
    assert!(e.to_string().starts_with("test.yaml:"), "{e}");
    // A type error names the object and the field.
    let errors = must_fail(&VS_9010.replace("weight: 10", "weight: ten"));
    let e = error_at(&errors, "spec.http[0].route[1].weight");
    assert!(e.message.contains("invalid type"), "{e}");
}

#[test]
fn short_hosts_resolve_in_the_objects_namespace() {
    let cfg = must_load(
        r#"
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: checkout-service-vs, namespace: prod}
spec:
  hosts: [checkout-service]
  http:
  - route:
    - destination: {host: checkout-service, subset: v1}
      weight: 90
    - destination: {host: checkout-service.prod, subset: v2}
      weight: 10
"#,
    );
    let vs = &cfg.virtual_services[0];
    assert_eq!(vs.hosts, vec!["checkout-service.prod.svc.cluster.local"]);
    let hosts: Vec<_> = vs.spec.http[0]
        .route
        .iter()
        .filter_map(|d| d.destination.as_ref()?.host.clone())
        .collect();
    assert_eq!(hosts, vec!["checkout-service.prod.svc.cluster.local"; 2]);

    // The same short name from namespace staging means another service.
    let errors = must_fail(
        r#"
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: checkout-service-vs, namespace: staging}
spec:
  hosts: [checkout-service]
  http:
  - route:
    - destination: {host: checkout-service.prod.svc}
"#,
    );
    let e = error_at(&errors, "spec.hosts[0]");
    assert_eq!(
        e.message,
        "missing service: no Service checkout-service.staging.svc.cluster.local in the config"
    );
    assert_eq!(
        e.valid.as_deref(),
        Some("a Service host: checkout-service.prod.svc.cluster.local")
    );
    assert_eq!(errors.len(), 1, "the FQDN destination resolves:\n{errors}");
}

fn weighted(weights: &[Option<i64>]) -> String {
    let mut text = String::from(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: checkout-service-vs, namespace: prod}\nspec:\n  hosts: [checkout-service]\n  http:\n  - route:\n",
    );
    for (i, w) in weights.iter().enumerate() {
        let subset = if i == 0 { "v1" } else { "v2" };
        text.push_str(&format!(
            "    - destination: {{host: checkout-service, subset: {subset}}}\n"
        ));
        if let Some(w) = w {
            text.push_str(&format!("      weight: {w}\n"));
        }
    }
    text
}

#[test]
fn a_negative_weight_is_rejected() {
    let errors = must_fail(&weighted(&[Some(105), Some(-5)]));
    let e = error_at(&errors, "spec.http[0].route[1].weight");
    assert_eq!(
        e.to_string(),
        "test.yaml: VirtualService prod/checkout-service-vs: spec.http[0].route[1].weight: weight -5 is \
         negative (valid: an integer >= 0; weights are normalised by their sum)"
    );
}

#[test]
fn weights_that_are_all_zero_or_missing_are_rejected() {
    for weights in [[Some(0), Some(0)], [None, None], [Some(0), None]] {
        let errors = must_fail(&weighted(&weights));
        let e = error_at(&errors, "spec.http[0].route");
        assert_eq!(e.message, "total destination weight = 0");
    }
}

#[test]
fn weights_need_not_sum_to_100_and_a_missing_weight_is_0() {
    // Accepted: Istio ≥ 1.15 normalises by the sum.
    must_load(&weighted(&[Some(3), Some(1)]));
    must_load(&weighted(&[Some(100), None]));
    // A single destination needs no weight, or any weight.
    must_load(&weighted(&[None]));
    must_load(&weighted(&[Some(0)]));
    must_load(&weighted(&[Some(30)]));
}

#[test]
fn an_unknown_subset_is_rejected_with_the_valid_names() {
    let errors = must_fail(&VS_9010.replace("subset: v2", "subset: v3"));
    let e = error_at(&errors, "spec.http[0].route[1].destination.subset");
    assert_eq!(
        e.message,
        "subset \"v3\" is not defined by DestinationRule prod/checkout-service-dr"
    );
    assert_eq!(e.valid.as_deref(), Some("one of its subsets: v1, v2"));

    // No DestinationRule at all for the host.
    let text = BASE
        .split("\n---\n")
        .filter(|d| !d.contains("kind: DestinationRule"))
        .collect::<Vec<_>>()
        .join("\n---\n");
    let errors = load_documents(&[
        ("base.yaml".into(), text),
        ("test.yaml".into(), VS_9010.into()),
    ])
    .expect_err("no DR");
    println!("{errors}");
    assert_eq!(errors.len(), 2);
    assert!(errors.iter().all(|e| {
        e.message
            .contains("no DestinationRule has host checkout-service.prod.svc.cluster.local")
    }));
}

#[test]
fn a_missing_service_is_rejected() {
    let errors = must_fail(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: checkout-service-vs, namespace: prod}
spec:
  hosts: [checkout-service]
  http:
  - route:
    - destination: {host: checkout-service-primary}
      weight: 90
    - destination: {host: checkout-service-canary}
      weight: 10
"#,
    );
    assert_eq!(errors.len(), 2);
    let e = error_at(&errors, "spec.http[0].route[0].destination.host");
    assert_eq!(
        e.message,
        "missing service: no Service checkout-service-primary.prod.svc.cluster.local in the config"
    );
}

#[test]
fn two_virtual_services_for_one_host_are_rejected() {
    let second = VS_9010
        .replace("name: checkout-service-vs", "name: checkout-canary-vs")
        .replace(
            "hosts: [checkout-service.prod.svc.cluster.local]",
            "hosts: [checkout-service]",
        );
    let errors = must_fail(&format!("{VS_9010}\n---\n{second}"));
    assert_eq!(errors.len(), 1);
    let e = error_at(&errors, "spec.hosts[0]");
    assert_eq!(
        e.object.as_deref(),
        Some("VirtualService prod/checkout-canary-vs")
    );
    assert!(
        e.message
            .contains("already routed by VirtualService prod/checkout-service-vs")
    );
    assert!(e.message.contains("IST0109"));
}

#[test]
fn two_destination_rules_for_one_host_are_rejected() {
    let errors = must_fail(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: checkout-service-dr-2, namespace: prod}
spec:
  host: checkout-service
  subsets: [{name: v3, labels: {version: v3}}]
"#,
    );
    let e = error_at(&errors, "spec.host");
    assert!(
        e.message
            .contains("already has DestinationRule prod/checkout-service-dr"),
        "{e}"
    );
}

#[test]
fn a_route_without_destination_is_rejected() {
    let errors = must_fail(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: checkout-service-vs, namespace: prod}
spec:
  hosts: [checkout-service]
  http:
  - name: nothing
    timeout: 2s
  - route:
    - weight: 100
"#,
    );
    assert_eq!(
        error_at(&errors, "spec.http[0].route").message,
        "route has no destination"
    );
    assert_eq!(
        error_at(&errors, "spec.http[1].route[0].destination").message,
        "missing"
    );
}

#[test]
fn more_than_max_subsets_destinations_are_rejected() {
    let mut text = String::from(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: checkout-service-vs, namespace: prod}\nspec:\n  hosts: [checkout-service]\n  tcp:\n  - route:\n",
    );
    for i in 0..9 {
        text.push_str(&format!("    - destination: {{host: checkout-service, port: {{number: 8080}}}}\n      weight: {i}\n"));
    }
    let errors = must_fail(&text);
    let e = error_at(&errors, "spec.tcp[0].route");
    assert!(
        e.message
            .contains("9 destinations in one route; canary splits between at most 8"),
        "{e}"
    );
    // The nine identical destinations are also reported as duplicates.
    assert!(errors.iter().any(|e| e.message.contains("appears twice")));
}

#[test]
fn a_destination_port_must_exist() {
    let errors = must_fail(&VS_9010.replace("subset: v2}", "subset: v2, port: {number: 9090}}"));
    let e = error_at(&errors, "spec.http[0].route[1].destination.port.number");
    assert_eq!(
        e.message,
        "Service checkout-service.prod.svc.cluster.local has no port 9090"
    );
    assert_eq!(e.valid.as_deref(), Some("one of its ports: 8080 (http)"));
}

#[test]
fn wildcard_hosts_are_not_supported() {
    let errors = must_fail(&VS_9010.replace(
        "hosts: [checkout-service.prod.svc.cluster.local]",
        "hosts: [\"*.prod.svc.cluster.local\"]",
    ));
    assert!(
        error_at(&errors, "spec.hosts[0]")
            .message
            .contains("not supported")
    );
    // A mesh-wide DestinationRule (mTLS settings) is common: it is ignored.
    let cfg = must_load(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: mesh-mtls, namespace: istio-system}
spec:
  host: "*.local"
  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}
"#,
    );
    assert!(has_warning(
        &cfg,
        "wildcard host \"*.local\" is not supported by canary; this DestinationRule is ignored"
    ));
}

#[test]
fn passthrough_and_unknown_load_balancers_are_rejected() {
    let dr = |lb: &str| {
        BASE.replace(
            "  host: checkout-service.prod.svc.cluster.local\n",
            &format!("  host: checkout-service.prod.svc.cluster.local\n  trafficPolicy:\n    loadBalancer:\n{lb}"),
        )
    };
    let load = |text: String| load_str("dr.yaml", &text);
    let errors = load(dr("      simple: PASSTHROUGH\n")).expect_err("PASSTHROUGH");
    println!("{errors}");
    assert!(
        errors.0[0]
            .message
            .contains("PASSTHROUGH is not supported by canary")
    );
    let errors = load(dr("      simple: FASTEST\n")).expect_err("unknown");
    assert_eq!(
        errors.0[0].field.as_deref(),
        Some("spec.trafficPolicy.loadBalancer.simple")
    );
    let errors = load(dr(
        "      consistentHash: {httpHeaderName: a, useSourceIp: true}\n",
    ))
    .expect_err("two keys");
    assert!(
        errors.0[0]
            .message
            .contains("several hash keys (useSourceIp, httpHeaderName)")
    );
    let errors = load(dr("      consistentHash: {minimumRingSize: 1024}\n")).expect_err("no key");
    assert_eq!(errors.0[0].message, "no hash key");
    for simple in [
        "UNSPECIFIED",
        "RANDOM",
        "ROUND_ROBIN",
        "LEAST_REQUEST",
        "LEAST_CONN",
    ] {
        load(dr(&format!("      simple: {simple}\n"))).unwrap_or_else(|e| panic!("{simple}: {e}"));
    }
}

#[test]
fn other_traffic_policy_sections_are_kept_not_rejected() {
    let cfg = load_str(
        "dr.yaml",
        &BASE.replace(
            "  host: checkout-service.prod.svc.cluster.local\n",
            "  host: checkout-service.prod.svc.cluster.local\n  trafficPolicy:\n    connectionPool:\n      tcp: {maxConnections: 100}\n    outlierDetection:\n      consecutive5xxErrors: 7\n      interval: 5m\n    tls: {mode: ISTIO_MUTUAL}\n",
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let policy = cfg.policy("checkout-service.prod.svc.cluster.local", Some("v1"), 8080);
    assert_eq!(
        policy
            .outlier_detection
            .as_ref()
            .and_then(|o| o.get("consecutive5xxErrors"))
            .and_then(|v| v.as_u64()),
        Some(7)
    );
    assert!(policy.connection_pool.is_some() && policy.tls.is_some());
}

#[test]
fn subset_names_must_be_dns_labels() {
    let errors = load_str("dr.yaml", &BASE.replace("- name: v2", "- name: V2_canary"))
        .expect_err("bad name");
    println!("{errors}");
    assert!(
        errors
            .iter()
            .any(|e| e.field.as_deref() == Some("spec.subsets[1].name")
                && e.message.contains("not a DNS-1123 label"))
    );
}

#[test]
fn unknown_fields_are_warnings_not_errors() {
    let cfg = must_load(&VS_9010.replace("weight: 10", "wieght: 10"));
    let w = cfg
        .warnings
        .iter()
        .find(|w| w.field.as_deref() == Some("spec.http[0].route[1].wieght"))
        .unwrap_or_else(|| panic!("no warning: {:?}", cfg.warnings));
    println!("{w}");
    assert!(
        w.message
            .contains("unknown field, ignored (known here: destination, weight, headers)")
    );
}

#[test]
fn pods_that_are_not_running_or_not_ready_are_not_endpoints() {
    let pod = |name: &str, status: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: prod\n  labels: {{app: checkout-service, version: v2}}\nstatus:\n{status}---\n"
        )
    };
    let text = [
        pod("v2-pending", "  phase: Pending\n"),
        pod("v2-not-ready", "  phase: Running\n  podIP: 10.77.0.31\n  conditions: [{type: Ready, status: \"False\"}]\n"),
        pod("v2-failed", "  phase: Failed\n  podIP: 10.77.0.32\n"),
        pod("v2-no-conditions", "  phase: Running\n  podIP: 10.77.0.33\n"),
        pod("v2-ready-no-ip", "  phase: Running\n  conditions: [{type: Ready, status: \"True\"}]\n"),
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: v2-terminating\n  namespace: prod\n  deletionTimestamp: \"2026-01-01T00:00:00Z\"\n  labels: {app: checkout-service, version: v2}\nstatus:\n  phase: Running\n  podIP: 10.77.0.34\n---\n"
            .to_string(),
        // Right labels, wrong namespace.
        pod("v2-other-namespace", "  phase: Running\n  podIP: 10.77.0.35\n").replace("namespace: prod", "namespace: staging"),
        VS_9010.to_string(),
    ]
    .concat();
    let cfg = must_load(&text);
    let eps = crate::compile::endpoints(
        &cfg,
        "checkout-service.prod.svc.cluster.local",
        Some("v2"),
        8080,
    );
    let pods: Vec<&str> = eps.iter().map(|e| e.pod.as_str()).collect();
    assert_eq!(
        pods,
        vec!["checkout-v2-a", "checkout-v2-a", "v2-no-conditions"]
    );
    assert!(has_warning(
        &cfg,
        "Pod prod/v2-ready-no-ip: status.podIP: Running and Ready but has no IP"
    ));
}

#[test]
fn a_named_target_port_resolves_per_pod() {
    let cfg = must_load(
        r#"
apiVersion: v1
kind: Service
metadata: {name: payments, namespace: prod}
spec:
  clusterIP: 10.96.0.20
  selector: {app: payments}
  ports:
  - {name: http, port: 80, targetPort: http-alt}
---
apiVersion: v1
kind: Pod
metadata: {name: payments-a, namespace: prod, labels: {app: payments}}
spec:
  containers:
  - name: app
    ports: [{name: metrics, containerPort: 9090}, {name: http-alt, containerPort: 9080}]
status: {phase: Running, podIP: 10.77.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: payments-b, namespace: prod, labels: {app: payments}}
spec:
  containers:
  - name: app
    ports: [{name: http, containerPort: 8080}]
status: {phase: Running, podIP: 10.77.1.2}
"#,
    );
    let eps = crate::compile::endpoints(&cfg, "payments.prod.svc.cluster.local", None, 80);
    let addrs: Vec<String> = eps.iter().map(|e| e.addr.to_string()).collect();
    assert_eq!(addrs, vec!["10.77.1.1:9080"]);
    let w = cfg
        .warnings
        .iter()
        .find(|w| w.object.as_deref() == Some("Pod prod/payments-b"))
        .expect("warning");
    println!("{w}");
    assert!(
        w.message
            .contains("no TCP container port named \"http-alt\"")
    );
}

#[test]
fn ipv6_and_dual_stack_cluster_ips() {
    let cfg = must_load(
        r#"
apiVersion: v1
kind: Service
metadata: {name: inventory, namespace: prod}
spec:
  clusterIPs: ["fd00:96::30"]
  selector: {app: inventory}
  ports: [{port: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: inventory-a, namespace: prod, labels: {app: inventory}}
status:
  phase: Running
  podIPs: [{ip: "fd00:77::41"}]
"#,
    );
    let svc = cfg
        .service("inventory.prod.svc.cluster.local")
        .expect("service");
    assert_eq!(
        svc.vips,
        vec!["fd00:96::30".parse::<std::net::IpAddr>().expect("ip")]
    );
    let checkout = cfg
        .service("checkout-service.prod.svc.cluster.local")
        .expect("checkout");
    let vips: Vec<String> = checkout.vips.iter().map(|v| v.to_string()).collect();
    assert_eq!(vips, vec!["10.96.0.10", "fd00:96::10"]);
    let eps = crate::compile::endpoints(&cfg, "inventory.prod.svc.cluster.local", None, 8080);
    assert_eq!(eps[0].addr.to_string(), "[fd00:77::41]:8080");

    let errors = must_fail(
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: prod}\nspec:\n  clusterIPs: [10.96.0.40, 10.96.0.41, not-an-ip]\n  clusterIP: 10.96.0.49\n  ports: [{port: 80}]\n",
    );
    assert_eq!(errors.len(), 3);
}

#[test]
fn headless_udp_and_selectorless_services_are_warned_about() {
    let cfg = must_load(
        r#"
apiVersion: v1
kind: Service
metadata: {name: db, namespace: prod}
spec:
  clusterIP: None
  selector: {app: db}
  ports: [{port: 5432}]
---
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: prod}
spec:
  clusterIP: 10.96.0.53
  selector: {app: dns}
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata: {name: external, namespace: prod}
spec:
  clusterIP: 10.96.0.60
  ports: [{port: 443}]
"#,
    );
    for w in &cfg.warnings {
        println!("{w}");
    }
    assert!(has_warning(
        &cfg,
        "Service prod/db: spec.clusterIP: headless Service"
    ));
    assert!(has_warning(
        &cfg,
        "spec.ports[0].protocol: UDP port 53 is not served by canary (TCP only)"
    ));
    assert!(has_warning(
        &cfg,
        "Service prod/external: spec.selector: no selector"
    ));
    let table = crate::compile::compile(&cfg);
    assert!(table.find("db.prod.svc.cluster.local").is_none());
    let dns = table.find("dns.prod").expect("dns");
    assert_eq!(dns.ports.len(), 1);
    assert_eq!(dns.ports[0].name.as_deref(), Some("dns-tcp"));
}

#[test]
fn a_virtual_service_bound_only_to_gateways_does_not_apply() {
    let cfg = must_load(&VS_9010.replace(
        "spec:\n",
        "spec:\n  gateways: [istio-system/public-gateway]\n",
    ));
    assert!(cfg.virtual_services.is_empty());
    assert!(has_warning(
        &cfg,
        "applies only to gateways istio-system/public-gateway"
    ));
    let with_mesh =
        must_load(&VS_9010.replace("spec:\n", "spec:\n  gateways: [public-gateway, mesh]\n"));
    assert_eq!(with_mesh.virtual_services.len(), 1);
}

#[test]
fn tls_routes_and_unreachable_rules_are_warned_about() {
    let cfg = must_load(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: checkout-service-vs, namespace: prod}
spec:
  hosts: [checkout-service]
  tls:
  - match: [{sniHosts: [checkout.example.com]}]
    route: [{destination: {host: checkout-service}}]
  http:
  - route: [{destination: {host: checkout-service, subset: v1}}]
  - route: [{destination: {host: checkout-service, subset: v2}}]
"#,
    );
    for w in &cfg.warnings {
        println!("{w}");
    }
    assert!(has_warning(
        &cfg,
        "spec.tls: tls routes are not supported by canary; ignored"
    ));
    assert!(has_warning(
        &cfg,
        "spec.http[1]: unreachable: http[0] has no match"
    ));
}

#[test]
fn http_feature_validation_reads_well() {
    let errors = must_fail(
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: checkout-service-vs, namespace: prod}
spec:
  hosts: [checkout-service]
  http:
  - match:
    - uri: {regex: "/api/(v1"}
      headers:
        x-user: {exact: a, prefix: b}
    route: [{destination: {host: checkout-service, subset: v2}}]
    timeout: 2 seconds
    retries: {attempts: 2, retryOn: "5xx, reset"}
    mirror: {host: checkout-service, subset: v2}
    mirrorPercentage: {value: 150}
    fault: {abort: {httpStatus: 700}}
  - route: [{destination: {host: checkout-service, subset: v1}}]
    redirect: {uri: /new, redirectCode: 200}
"#,
    );
    let fields: Vec<&str> = errors.iter().filter_map(|e| e.field.as_deref()).collect();
    for f in [
        "spec.http[0].match[0].uri.regex",
        "spec.http[0].match[0].headers.x-user",
        "spec.http[0].timeout",
        "spec.http[0].retries.retryOn",
        "spec.http[0].mirrorPercentage.value",
        "spec.http[0].fault.abort.httpStatus",
        "spec.http[1]",
        "spec.http[1].redirect.redirectCode",
    ] {
        assert!(fields.contains(&f), "no error at {f}:\n{errors}");
    }
    let regex = error_at(&errors, "spec.http[0].match[0].uri.regex");
    assert!(!regex.message.contains('\n'), "one line: {regex}");
}

#[test]
fn a_broken_config_reports_every_error_at_once() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/broken");
    let errors = load_path(&dir).expect_err("broken config");
    println!("{errors}");
    assert_eq!(errors.len(), 3, "{errors}");
    let vs_file = dir.join("checkout-vs.yaml");
    let negative = error_at(&errors, "spec.http[1].route[1].weight");
    assert_eq!(negative.file, vs_file);
    assert_eq!(
        negative.object.as_deref(),
        Some("VirtualService prod/checkout-service-vs")
    );
    assert_eq!(negative.message, "weight -5 is negative");
    let subset = error_at(&errors, "spec.http[1].route[2].destination.subset");
    assert_eq!(subset.file, vs_file);
    assert_eq!(subset.valid.as_deref(), Some("one of its subsets: v1, v2"));
    let missing = error_at(&errors, "spec.hosts[0]");
    assert_eq!(missing.file, dir.join("payments-vs.yaml"));
    assert_eq!(
        missing.object.as_deref(),
        Some("VirtualService prod/payments-vs")
    );
    assert!(
        missing
            .message
            .starts_with("missing service: no Service payments.prod.svc.cluster.local")
    );
    assert_eq!(
        missing.valid.as_deref(),
        Some("a Service host: checkout-service.prod.svc.cluster.local")
    );
    // One line per error, each naming file, object and field.
    for line in errors.to_string().lines() {
        assert!(
            line.contains(".yaml: VirtualService prod/") && line.contains(": spec."),
            "{line}"
        );
    }
}

#[test]
fn a_missing_name_and_a_non_object_document_are_errors() {
    let errors = must_fail(
        "apiVersion: v1\nkind: Service\nspec: {}\n---\n- just\n- a list\n---\nkind: Service\n",
    );
    assert_eq!(errors.len(), 3);
    assert_eq!(
        errors.0[0].to_string(),
        "test.yaml:1: Service (no name): metadata.name: missing (valid: a non-empty object name)"
    );
    assert_eq!(errors.0[1].line, Some(5));
    assert_eq!(errors.0[2].line, Some(8));
}

#[test]
fn duplicate_objects_are_rejected() {
    let errors = must_fail(BASE.split("\n---\n").next().unwrap_or_default());
    let e = error_at(&errors, "metadata.name");
    assert_eq!(e.object.as_deref(), Some("Service prod/checkout-service"));
    assert!(
        e.message
            .starts_with("defined twice (first in base.yaml line"),
        "{e}"
    );
}

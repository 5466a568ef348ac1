//! Compile tests: real YAML in, routing table out.

use std::path::Path;

use super::*;
use crate::config::tests::{BASE, VS_9010, must_load};
use crate::config::{LoadedConfig, load_documents, load_path, load_str};

const CHECKOUT: &str = "checkout-service.prod.svc.cluster.local";

fn route_of<'a>(table: &'a RoutingTable, host: &str, port: u16) -> &'a KernelRoute {
    let svc = table
        .find(host)
        .unwrap_or_else(|| panic!("no service {host}"));
    &svc.ports
        .iter()
        .find(|p| p.port == port)
        .unwrap_or_else(|| panic!("no port {port}"))
        .route
}

/// `(subset or host, weight)` of each destination, in compiled order.
fn split(route: &KernelRoute) -> Vec<(String, u32)> {
    route
        .destinations
        .iter()
        .map(|d| (d.subset.clone().unwrap_or_else(|| d.host.clone()), d.weight))
        .collect()
}

fn reasons(table: &RoutingTable, host: &str) -> Vec<String> {
    match &table.find(host).expect("service").path {
        DataPath::Kernel => Vec::new(),
        DataPath::Shim { reasons } => reasons.clone(),
    }
}

fn examples_dir(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples")
        .join(name)
}

#[test]
fn every_example_loads_and_compiles_to_the_expected_path() {
    let expected: &[(&str, &[&str])] = &[
        ("checkout", &[]),
        ("composite-routing", &["http[0].match.headers"]),
        ("mirroring", &["http[0].mirror"]),
        (
            "session-affinity",
            &["DestinationRule consistentHash.httpHeaderName"],
        ),
        ("source-ip-affinity", &[]),
        (
            "per-route-policy",
            &[
                "http[0].match.headers",
                "http[0].timeout",
                "http[0].retries",
                "http[1].timeout",
                "http[1].retries",
            ],
        ),
    ];
    let mut dirs: Vec<String> = std::fs::read_dir(examples_dir(""))
        .expect("deploy/examples")
        .filter_map(|e| Some(e.ok()?.file_name().to_str()?.to_string()))
        .collect();
    dirs.sort();
    let mut listed: Vec<&str> = expected.iter().map(|(d, _)| *d).collect();
    listed.sort();
    assert_eq!(
        dirs, listed,
        "every example directory has an expectation here"
    );

    for (dir, want) in expected {
        let cfg = load_path(&examples_dir(dir)).unwrap_or_else(|e| panic!("{dir}:\n{e}"));
        assert!(cfg.warnings.is_empty(), "{dir} warns: {:?}", cfg.warnings);
        assert_eq!(cfg.files.len(), 4, "{dir}");
        let table = compile(&cfg);
        assert_eq!(reasons(&table, CHECKOUT), *want, "{dir}");
        print!("{dir}: {}", summary(&table));
    }
}

#[test]
fn the_checkout_example_compiles_to_a_kernel_90_10_split() {
    let cfg = load_path(&examples_dir("checkout")).unwrap_or_else(|e| panic!("{e}"));
    let table = compile(&cfg);
    assert_eq!(table.services.len(), 1);
    let svc = &table.services[0];
    assert_eq!(svc.host, CHECKOUT);
    assert_eq!(
        (svc.name.as_str(), svc.namespace.as_str()),
        ("checkout-service", "prod")
    );
    let vips: Vec<String> = svc.vips.iter().map(|v| v.to_string()).collect();
    assert_eq!(vips, vec!["10.96.0.10", "fd00:96::10"]);
    assert_eq!(svc.path, DataPath::Kernel);
    assert_eq!(
        svc.virtual_service.as_deref(),
        Some("VirtualService/prod/checkout-service-vs")
    );
    assert_eq!(
        svc.destination_rule.as_deref(),
        Some("DestinationRule/prod/checkout-service-dr")
    );
    assert_eq!(svc.ports.len(), 1);
    assert_eq!(
        (svc.ports[0].port, svc.ports[0].name.as_deref()),
        (8080, Some("http"))
    );
    let route = &svc.ports[0].route;
    assert_eq!(route.name.as_deref(), Some("public-traffic-split"));
    assert_eq!(route.origin, "virtualservice http[0]");
    assert_eq!(route.sticky, None);
    assert_eq!(split(route), vec![("v1".into(), 90), ("v2".into(), 10)]);
    let v1 = &route.destinations[0];
    assert_eq!(
        (v1.host.as_str(), v1.file_weight, v1.pick),
        (CHECKOUT, 90, EndpointPick::Random)
    );
    let addrs: Vec<String> = v1
        .endpoints
        .iter()
        .map(|e| format!("{} {}", e.pod, e.addr))
        .collect();
    assert_eq!(
        addrs,
        vec![
            "checkout-v1-a 10.77.0.11:8080",
            "checkout-v1-a [fd00:77::11]:8080",
            "checkout-v1-b 10.77.0.12:8080",
            "checkout-v1-b [fd00:77::12]:8080",
        ]
    );
    assert_eq!(route.destinations[1].endpoints.len(), 2);
    let weights: Vec<u32> = route.destinations.iter().map(|d| d.weight).collect();
    assert_eq!(bands(&weights), vec![9000, 10000]);
}

#[test]
fn summary_reads_like_the_cli_shows_it() {
    let table = compile(&load_path(&examples_dir("checkout")).unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(
        summary(&table),
        "checkout-service.prod.svc.cluster.local  10.96.0.10:8080,[fd00:96::10]:8080  kernel  \
         v1 90% (2 endpoints)  v2 10% (1 endpoint)  via virtualservice http[0] \"public-traffic-split\"\n"
    );
    let overridden = apply_weights(
        &table,
        "checkout-service",
        None,
        &[("v1".into(), 1), ("v2".into(), 2)],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let text = summary(&overridden);
    println!("{text}");
    assert!(text.contains("v1 33.33% (2 endpoints; file 90%)  v2 66.67% (1 endpoint; file 10%)"));
    let shim =
        compile(&load_path(&examples_dir("composite-routing")).unwrap_or_else(|e| panic!("{e}")));
    assert!(
        summary(&shim)
            .contains("  shim (http[0].match.headers)  v1 95% (2 endpoints)  v2 5% (1 endpoint)")
    );
    let sticky =
        compile(&load_path(&examples_dir("source-ip-affinity")).unwrap_or_else(|e| panic!("{e}")));
    assert!(summary(&sticky).contains("  sticky: source IP  "));
    assert_eq!(summary(&RoutingTable::default()), "no services to route\n");
}

#[test]
fn without_a_virtual_service_the_whole_service_gets_everything() {
    let cfg = load_str("base.yaml", BASE).unwrap_or_else(|e| panic!("{e}"));
    let table = compile(&cfg);
    let route = route_of(&table, CHECKOUT, 8080);
    assert_eq!(route.origin, "service default");
    assert_eq!(split(route), vec![(CHECKOUT.into(), 100)]);
    assert_eq!(route.destinations[0].endpoints.len(), 6);
    assert_eq!(table.services[0].virtual_service, None);
    assert_eq!(table.services[0].path, DataPath::Kernel);
}

#[test]
fn destinations_keep_the_destination_rule_order_and_zero_weights() {
    // v2 listed first, and with weight 0: still [v1, v2], band kept.
    let cfg = must_load(
        &VS_9010
            .replace(
                "subset: v1}\n      weight: 90",
                "subset: v9}\n      weight: 0",
            )
            .replace(
                "subset: v2}\n      weight: 10",
                "subset: v1}\n      weight: 10",
            )
            .replace("subset: v9}", "subset: v2}"),
    );
    let route = route_of(&compile(&cfg), CHECKOUT, 8080).clone();
    assert_eq!(split(&route), vec![("v1".into(), 10), ("v2".into(), 0)]);
    let weights: Vec<u32> = route.destinations.iter().map(|d| d.weight).collect();
    assert_eq!(bands(&weights), vec![10000, 10000]);
}

#[test]
fn missing_weight_is_0_a_single_destination_is_100_and_sums_are_normalised() {
    let cfg = must_load(&VS_9010.replace("      weight: 10\n", ""));
    assert_eq!(
        split(route_of(&compile(&cfg), CHECKOUT, 8080)),
        vec![("v1".into(), 90), ("v2".into(), 0)]
    );

    let single = VS_9010
        .replace("      weight: 90\n", "      weight: 30\n")
        .replace("    - destination: {host: checkout-service.prod.svc.cluster.local, subset: v2}\n      weight: 10\n", "");
    let route = route_of(&compile(&must_load(&single)), CHECKOUT, 8080).clone();
    assert_eq!(split(&route), vec![("v1".into(), 100)]);
    assert_eq!(route.destinations[0].file_weight, 100);

    let cfg = must_load(
        &VS_9010
            .replace("weight: 90", "weight: 3")
            .replace("weight: 10", "weight: 1"),
    );
    let route = route_of(&compile(&cfg), CHECKOUT, 8080).clone();
    let weights: Vec<u32> = route.destinations.iter().map(|d| d.weight).collect();
    assert_eq!(bands(&weights), vec![7500, 10000]);
}

/// `BASE` with `policy` as the DestinationRule's traffic policy.
fn with_policy(policy: &str, subset_v2_policy: &str) -> LoadedConfig {
    let base = BASE
        .replace(
            "  host: checkout-service.prod.svc.cluster.local\n",
            &format!("  host: checkout-service.prod.svc.cluster.local\n{policy}"),
        )
        .replace(
            "  - name: v2\n    labels:\n      version: v2\n",
            &format!("  - name: v2\n    labels:\n      version: v2\n{subset_v2_policy}"),
        )
        // A second port, for port-level settings.
        .replace(
            "  - name: http\n    port: 8080\n    targetPort: 8080\n",
            "  - name: http\n    port: 8080\n    targetPort: 8080\n  - name: admin\n    port: 9090\n",
        );
    load_documents(&[
        ("base.yaml".into(), base),
        ("vs.yaml".into(), VS_9010.into()),
    ])
    .unwrap_or_else(|e| panic!("{e}"))
}

fn picks(route: &KernelRoute) -> Vec<EndpointPick> {
    route.destinations.iter().map(|d| d.pick).collect()
}

const SOURCE_IP: &str =
    "  trafficPolicy:\n    loadBalancer:\n      consistentHash: {useSourceIp: true}\n";

#[test]
fn use_source_ip_makes_the_route_sticky() {
    let table = compile(&with_policy(SOURCE_IP, ""));
    let route = route_of(&table, CHECKOUT, 8080);
    assert_eq!(route.sticky, Some(StickyKey::SourceIp));
    assert_eq!(picks(route), vec![EndpointPick::Maglev; 2]);
    assert_eq!(table.services[0].path, DataPath::Kernel);
}

#[test]
fn a_subset_policy_replaces_the_whole_load_balancer() {
    // v2's own loadBalancer replaces the destination-level one whole: no
    // field-level merge, so v2 does not hash.
    let v2 = "    trafficPolicy:\n      loadBalancer: {simple: ROUND_ROBIN}\n";
    let table = compile(&with_policy(SOURCE_IP, v2));
    let route = route_of(&table, CHECKOUT, 8080);
    assert_eq!(
        picks(route),
        vec![EndpointPick::Maglev, EndpointPick::Random]
    );
    assert_eq!(route.sticky, None);

    // A subset policy without loadBalancer keeps the parent's.
    let v2 = "    trafficPolicy:\n      connectionPool: {tcp: {maxConnections: 10}}\n";
    let route = route_of(&compile(&with_policy(SOURCE_IP, v2)), CHECKOUT, 8080).clone();
    assert_eq!(route.sticky, Some(StickyKey::SourceIp));

    // And the reverse: only v2 hashes.
    let v2 =
        "    trafficPolicy:\n      loadBalancer:\n        consistentHash: {useSourceIp: true}\n";
    let route = route_of(&compile(&with_policy("", v2)), CHECKOUT, 8080).clone();
    assert_eq!(
        picks(&route),
        vec![EndpointPick::Random, EndpointPick::Maglev]
    );
    assert_eq!(route.sticky, None);
}

#[test]
fn port_level_settings_override_and_do_not_inherit() {
    // Port 8080 gets its own loadBalancer; port 9090 keeps source-IP hashing.
    let policy = format!(
        "{SOURCE_IP}    portLevelSettings:\n    - port: {{number: 8080}}\n      loadBalancer: {{simple: RANDOM}}\n"
    );
    let cfg = with_policy(&policy, "");
    let table = compile(&cfg);
    // The VirtualService has no port-restricted rule: its http[0] applies
    // to both ports, each with the destination's own port.
    assert_eq!(
        picks(route_of(&table, CHECKOUT, 8080)),
        vec![EndpointPick::Random; 2]
    );
    assert_eq!(
        picks(route_of(&table, CHECKOUT, 9090)),
        vec![EndpointPick::Maglev; 2]
    );

    // A port-level entry that leaves loadBalancer out resets it to the
    // default: port-level settings do not inherit.
    let policy = format!(
        "{SOURCE_IP}    portLevelSettings:\n    - port: {{number: 8080}}\n      connectionPool: {{tcp: {{maxConnections: 5}}}}\n"
    );
    let table = compile(&with_policy(&policy, ""));
    assert_eq!(
        picks(route_of(&table, CHECKOUT, 8080)),
        vec![EndpointPick::Random; 2]
    );

    // A subset's port-level entry wins over everything for that subset.
    let v2 = "    trafficPolicy:\n      portLevelSettings:\n      - port: {number: 9090}\n        loadBalancer: {simple: LEAST_REQUEST}\n";
    let table = compile(&with_policy(SOURCE_IP, v2));
    assert_eq!(
        picks(route_of(&table, CHECKOUT, 9090)),
        vec![EndpointPick::Maglev, EndpointPick::Random]
    );
    assert_eq!(
        route_of(&table, CHECKOUT, 8080).sticky,
        Some(StickyKey::SourceIp)
    );
}

#[test]
fn seed_patterns_give_the_shim_reasons() {
    let cases: &[(&str, &[&str])] = &[
        (
            // The seed's sourceLabels edge case.
            "  - name: internal-service-canary\n    match:\n    - sourceLabels: {app: qa-tools}\n    route: [{destination: {host: checkout-service, subset: v2}}]\n  - route: [{destination: {host: checkout-service, subset: v1}}]\n",
            &["http[0].match.sourceLabels"],
        ),
        // An explicit 0% turns mirroring off; attempts 0 and timeout 0s ask
        // for nothing: the kernel can serve these.
        (
            "  - route: [{destination: {host: checkout-service, subset: v1}}]\n    mirror: {host: checkout-service, subset: v2}\n    mirrorPercentage: {value: 0}\n    retries: {attempts: 0}\n    timeout: 0s\n",
            &[],
        ),
        (
            "  - route:\n    - destination: {host: checkout-service, subset: v1}\n      headers: {request: {set: {x-version: v1}}}\n    corsPolicy: {allowOrigins: [{exact: https://example.com}]}\n",
            &["http[0].corsPolicy", "http[0].route[0].headers"],
        ),
        (
            "  - match:\n    - uri: {prefix: /api}\n      method: {exact: GET}\n    - queryParams: {beta: {exact: \"1\"}}\n    route: [{destination: {host: checkout-service, subset: v2}}]\n    fault: {delay: {fixedDelay: 5s, percentage: {value: 1}}}\n  - route: [{destination: {host: checkout-service, subset: v1}}]\n    mirrors:\n    - destination: {host: checkout-service, subset: v2}\n      percentage: {value: 5}\n",
            &[
                "http[0].match.uri",
                "http[0].match.method",
                "http[0].match.queryParams",
                "http[0].fault",
                "http[1].mirrors",
            ],
        ),
        // A match on the port alone is a static filter: kernel.
        (
            "  - match: [{port: 8080}]\n    route: [{destination: {host: checkout-service, subset: v1}}]\n",
            &[],
        ),
    ];
    for (http, want) in cases {
        let vs = format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: checkout-service-vs, namespace: prod}}\nspec:\n  hosts: [checkout-service]\n  http:\n{http}"
        );
        let table = compile(&must_load(&vs));
        assert_eq!(reasons(&table, CHECKOUT), *want, "{http}");
    }
    // Cookie and query hashing need the shim too; with no VirtualService
    // the DestinationRule's hash applies to the default route.
    for (key, field) in [
        ("httpCookie: {name: user, ttl: 0s}", "httpCookie"),
        ("httpQueryParameterName: uid", "httpQueryParameterName"),
    ] {
        let text = BASE.replace(
            "  host: checkout-service.prod.svc.cluster.local\n",
            &format!("  host: checkout-service.prod.svc.cluster.local\n  trafficPolicy:\n    loadBalancer:\n      consistentHash: {{{key}}}\n"),
        );
        let table = compile(&load_str("base.yaml", &text).unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(
            reasons(&table, CHECKOUT),
            vec![format!("DestinationRule consistentHash.{field}")]
        );
    }
}

#[test]
fn the_kernel_route_per_port_follows_tcp_then_http_rules() {
    let two_ports = BASE.replace(
        "  - name: http\n    port: 8080\n    targetPort: 8080\n",
        "  - name: http\n    port: 8080\n    targetPort: 8080\n  - name: grpc\n    port: 9090\n",
    );
    let tcp = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: checkout-service-vs, namespace: prod}
spec:
  hosts: [checkout-service]
  tcp:
  - match: [{port: 9090}]
    route: [{destination: {host: checkout-service, subset: v2}}]
  - match: [{sourceLabels: {app: qa-tools}}]
    route: [{destination: {host: checkout-service, subset: v2}}]
  - route:
    - destination: {host: checkout-service, subset: v1}
      weight: 80
    - destination: {host: checkout-service, subset: v2}
      weight: 20
"#;
    let cfg = load_documents(&[
        ("base.yaml".into(), two_ports.clone()),
        ("vs.yaml".into(), tcp.into()),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    for w in &cfg.warnings {
        println!("{w}");
    }
    assert!(cfg.warnings.iter().any(|w| w.to_string().contains(
        "spec.tcp[1].match: matches on sourceLabels cannot be evaluated by canary; rule skipped"
    )));
    let table = compile(&cfg);
    let r8080 = route_of(&table, CHECKOUT, 8080);
    assert_eq!(r8080.origin, "virtualservice tcp[2]");
    assert_eq!(split(r8080), vec![("v1".into(), 80), ("v2".into(), 20)]);
    let r9090 = route_of(&table, CHECKOUT, 9090);
    assert_eq!(r9090.origin, "virtualservice tcp[0]");
    assert_eq!(split(r9090), vec![("v2".into(), 100)]);
    // Endpoints use the destination's port: the one the client dialled.
    assert_eq!(r9090.destinations[0].endpoints[0].addr.port(), 9090);

    // An http rule restricted to port 8080: port 9090 falls back to the
    // service default, with a warning.
    let http = VS_9010.replace("  - route:\n", "  - match: [{port: 8080}]\n    route:\n");
    let cfg = load_documents(&[("base.yaml".into(), two_ports), ("vs.yaml".into(), http)])
        .unwrap_or_else(|e| panic!("{e}"));
    let table = compile(&cfg);
    assert_eq!(table.services[0].path, DataPath::Kernel);
    assert_eq!(
        route_of(&table, CHECKOUT, 8080).origin,
        "virtualservice http[0]"
    );
    let fallback = route_of(&table, CHECKOUT, 9090);
    assert_eq!(fallback.origin, "service default");
    assert_eq!(split(fallback), vec![(CHECKOUT.into(), 100)]);
    assert!(
        cfg.warnings
            .iter()
            .any(|w| w.message.contains("no http rule applies to port 9090"))
    );
}

#[test]
fn a_subset_without_ready_pods_is_warned_about() {
    let base = BASE.replace(
        "  - name: v2\n    labels:\n      version: v2\n",
        "  - name: v2\n    labels:\n      version: v2\n  - name: v3\n    labels:\n      version: v3\n",
    );
    let vs = VS_9010.replace("subset: v2}", "subset: v3}");
    let cfg = load_documents(&[("base.yaml".into(), base), ("vs.yaml".into(), vs)])
        .unwrap_or_else(|e| panic!("{e}"));
    let w = cfg
        .warnings
        .iter()
        .find(|w| w.message.contains("no ready endpoints"))
        .unwrap_or_else(|| panic!("{:?}", cfg.warnings));
    assert_eq!(
        w.to_string(),
        "vs.yaml: VirtualService prod/checkout-service-vs: spec.http[0].route[1]: \
         checkout-service.prod.svc.cluster.local subset v3 has no ready endpoints; connections sent to it will fail"
    );
    assert!(
        route_of(&compile(&cfg), CHECKOUT, 8080).destinations[1]
            .endpoints
            .is_empty()
    );
}

/// Flagger's layout: a `-primary` and a `-canary` Service, no subsets.
const FLAGGER: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: checkout-primary, namespace: prod}
spec:
  clusterIP: 10.96.0.11
  selector: {app: checkout-primary}
  ports: [{name: http, port: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: checkout-canary, namespace: prod}
spec:
  clusterIP: 10.96.0.12
  selector: {app: checkout-canary}
  ports: [{name: http, port: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: checkout-primary-a, namespace: prod, labels: {app: checkout-primary}}
status: {phase: Running, podIP: 10.77.2.1}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: checkout, namespace: prod}
spec:
  hosts: [checkout-service]
  http:
  - name: checkout
    route:
    - destination: {host: checkout-primary}
      weight: 100
    - destination: {host: checkout-canary}
      weight: 0
"#;

#[test]
fn destinations_on_other_hosts_are_ordered_by_host_and_warned_when_empty() {
    let cfg = must_load(FLAGGER);
    for w in &cfg.warnings {
        println!("{w}");
    }
    // No pods behind the canary, but weight 0 in the route: no warning
    // about the route (only about the canary Service itself).
    assert!(
        !cfg.warnings
            .iter()
            .any(|w| w.message.contains("no ready endpoints")
                && w.object.as_deref() == Some("VirtualService prod/checkout"))
    );
    let table = compile(&cfg);
    let route = route_of(&table, CHECKOUT, 8080).clone();
    assert_eq!(
        split(&route),
        vec![
            ("checkout-canary.prod.svc.cluster.local".into(), 0),
            ("checkout-primary.prod.svc.cluster.local".into(), 100),
        ]
    );
    // Moving weight to the canary: named by service name.
    let moved = apply_weights(
        &table,
        CHECKOUT,
        Some("checkout"),
        &[
            ("checkout-primary".into(), 90),
            ("checkout-canary".into(), 10),
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        split(route_of(&moved, CHECKOUT, 8080)),
        vec![
            ("checkout-canary.prod.svc.cluster.local".into(), 10),
            ("checkout-primary.prod.svc.cluster.local".into(), 90),
        ]
    );
    let text = summary(&moved);
    println!("{text}");
    assert!(text.contains(
        "checkout-canary 10% (0 endpoints; file 0%)  checkout-primary 90% (1 endpoint; file 100%)"
    ));

    // With weight on it, an empty destination is a warning.
    let cfg = must_load(
        &FLAGGER
            .replace("weight: 100", "weight: 50")
            .replace("weight: 0", "weight: 50"),
    );
    assert!(cfg.warnings.iter().any(|w| w
        .to_string()
        .contains("VirtualService prod/checkout: spec.http[0].route[1]: checkout-canary.prod.svc.cluster.local has no ready endpoints")));
}

fn checkout_table() -> RoutingTable {
    compile(&load_path(&examples_dir("checkout")).unwrap_or_else(|e| panic!("{e}")))
}

fn w(pairs: &[(&str, i64)]) -> Vec<(String, i64)> {
    pairs.iter().map(|(n, w)| (n.to_string(), *w)).collect()
}

#[test]
fn apply_weights_moves_the_split_and_keeps_the_file_weights() {
    let table = checkout_table();
    for host in [
        CHECKOUT,
        "checkout-service.prod",
        "checkout-service.prod.svc",
        "checkout-service",
    ] {
        let new = apply_weights(&table, host, None, &w(&[("v1", 50), ("v2", 50)]))
            .unwrap_or_else(|e| panic!("{e}"));
        let route = route_of(&new, CHECKOUT, 8080);
        assert_eq!(split(route), vec![("v1".into(), 50), ("v2".into(), 50)]);
        let file: Vec<u32> = route.destinations.iter().map(|d| d.file_weight).collect();
        assert_eq!(file, vec![90, 10]);
    }
    // Unnamed destinations get 0; by route name; the input is unchanged.
    let new = apply_weights(
        &table,
        CHECKOUT,
        Some("public-traffic-split"),
        &w(&[("v2", 100)]),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        split(route_of(&new, CHECKOUT, 8080)),
        vec![("v1".into(), 0), ("v2".into(), 100)]
    );
    assert_eq!(
        split(route_of(&table, CHECKOUT, 8080)),
        vec![("v1".into(), 90), ("v2".into(), 10)]
    );
    // host/subset form.
    apply_weights(&table, CHECKOUT, None, &w(&[("checkout-service/v1", 1)]))
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn apply_weights_errors_say_what_is_valid() {
    let table = checkout_table();
    let err = |host: &str, route: Option<&str>, pairs: &[(&str, i64)]| {
        let e = apply_weights(&table, host, route, &w(pairs)).expect_err("should fail");
        println!("{e}");
        e
    };
    assert_eq!(
        err("payments", None, &[("v1", 1)]).to_string(),
        "unknown service \"payments\" (valid: checkout-service.prod.svc.cluster.local)"
    );
    assert_eq!(
        err(CHECKOUT, None, &[("v1", 90), ("v3", 10)]).to_string(),
        "port 8080 route \"public-traffic-split\" (virtualservice http[0]) of \
         checkout-service.prod.svc.cluster.local has no destination \"v3\" (valid: v1, v2)"
    );
    assert_eq!(
        err(CHECKOUT, None, &[("v1", 90), ("v1", 10)]),
        WeightsError::DuplicateSubset { name: "v1".into() }
    );
    assert_eq!(
        err(CHECKOUT, None, &[("v1", 105), ("v2", -5)]).to_string(),
        "weight -5 for v2 is negative (valid: an integer >= 0; weights are normalised by their sum)"
    );
    assert_eq!(
        err(CHECKOUT, None, &[("v1", 0), ("v2", 0)]),
        WeightsError::AllZero
    );
    assert_eq!(err(CHECKOUT, None, &[("v1", 0)]), WeightsError::AllZero);
    assert_eq!(
        err(CHECKOUT, Some("canary"), &[("v1", 1)]).to_string(),
        "service checkout-service.prod.svc.cluster.local has no route named \"canary\" (valid: public-traffic-split)"
    );
    assert_eq!(
        err(CHECKOUT, None, &[]).to_string(),
        "no weights given (valid: SUBSET=WEIGHT for one or more of: v1, v2)"
    );
    assert!(matches!(
        err(CHECKOUT, None, &[("v1", i64::from(u32::MAX)), ("v2", 1)]),
        WeightsError::WeightTooLarge { .. }
    ));
    let empty = RoutingTable::default();
    assert!(
        apply_weights(&empty, CHECKOUT, None, &w(&[("v1", 1)]))
            .expect_err("empty")
            .to_string()
            .contains("valid: none")
    );
}

#[test]
fn compile_is_deterministic() {
    let a = compile(&must_load(VS_9010));
    let b = compile(&must_load(VS_9010));
    assert_eq!(a, b);
    assert_eq!(
        serde_json::to_string(&a).unwrap_or_default(),
        serde_json::to_string(&b).unwrap_or_default()
    );
}

/// Loads the seed article's YAML verbatim (`tests/fixtures/seed`).
fn seed(files: &[&str]) -> LoadedConfig {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/seed");
    let texts: Vec<(std::path::PathBuf, String)> = ["services-pods.yaml"]
        .iter()
        .chain(files)
        .map(|f| {
            let p = dir.join(f);
            let text =
                std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, text)
        })
        .collect();
    load_documents(&texts).unwrap_or_else(|e| panic!("{files:?}:\n{e}"))
}

#[test]
fn the_seed_articles_yaml_loads_as_written() {
    let table = compile(&seed(&["destinationrule.yaml", "vs-composite.yaml"]));
    assert_eq!(reasons(&table, CHECKOUT), vec!["http[0].match.headers"]);
    let route = route_of(&table, CHECKOUT, 8080);
    assert_eq!(route.name.as_deref(), Some("public-traffic-split"));
    assert_eq!(split(route), vec![("v1".into(), 95), ("v2".into(), 5)]);
    // The objects have no namespace: `default`, routing an FQDN in `prod`.
    assert_eq!(
        table.services[0].virtual_service.as_deref(),
        Some("VirtualService/default/checkout-service-vs")
    );

    let table = compile(&seed(&["destinationrule.yaml", "vs-mirror.yaml"]));
    assert_eq!(reasons(&table, CHECKOUT), vec!["http[0].mirror"]);
    assert_eq!(
        split(route_of(&table, CHECKOUT, 8080)),
        vec![("v1".into(), 100)]
    );

    let table = compile(&seed(&["destinationrule-session.yaml", "vs-session.yaml"]));
    assert_eq!(
        reasons(&table, CHECKOUT),
        vec!["DestinationRule consistentHash.httpHeaderName"]
    );

    // The article's "common mistake": valid Istio, but its second rule can
    // never match. Loads, with a warning that says so.
    let cfg = seed(&["destinationrule.yaml", "vs-per-subset-mistake.yaml"]);
    let w = cfg
        .warnings
        .iter()
        .find(|w| w.field.as_deref() == Some("spec.http[1]"))
        .unwrap_or_else(|| panic!("{:?}", cfg.warnings));
    println!("{w}");
    assert!(w.message.starts_with("unreachable: http[0] has no match"));
    let table = compile(&cfg);
    assert_eq!(
        reasons(&table, CHECKOUT),
        vec![
            "http[0].timeout",
            "http[0].retries",
            "http[1].timeout",
            "http[1].retries"
        ]
    );
}

#[test]
fn apply_weights_rejects_an_ambiguous_subset_name() {
    // Two hosts, each with a subset called stable.
    let mut text = String::from(FLAGGER)
        .replace(
            "destination: {host: checkout-primary}",
            "destination: {host: checkout-primary, subset: stable}",
        )
        .replace(
            "destination: {host: checkout-canary}",
            "destination: {host: checkout-canary, subset: stable}",
        );
    for host in ["checkout-primary", "checkout-canary"] {
        text.push_str(&format!(
            "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {host}, namespace: prod}}\nspec:\n  host: {host}\n  subsets: [{{name: stable, labels: {{}}}}]\n"
        ));
    }
    let table = compile(&must_load(&text));
    let e = apply_weights(&table, CHECKOUT, None, &w(&[("stable", 10)])).expect_err("ambiguous");
    println!("{e}");
    assert_eq!(
        e.to_string(),
        "\"stable\" names several destinations of port 8080 route \"checkout\" (virtualservice http[0]) of \
         checkout-service.prod.svc.cluster.local (valid: one of checkout-canary/stable, checkout-primary/stable)"
    );
    let moved = apply_weights(
        &table,
        CHECKOUT,
        None,
        &w(&[
            ("checkout-canary/stable", 10),
            ("checkout-primary/stable", 90),
        ]),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let weights: Vec<u32> = route_of(&moved, CHECKOUT, 8080)
        .destinations
        .iter()
        .map(|d| d.weight)
        .collect();
    assert_eq!(weights, vec![10, 90]);
}

#[test]
fn the_split_annotation_moves_a_weighted_route_to_the_shim_and_rejects_typos() {
    let per_request = VS_9010.replace(
        "  namespace: prod\n",
        "  namespace: prod\n  annotations:\n    canary.io/split: per-request\n",
    );
    let table = compile(&must_load(&per_request));
    assert_eq!(
        reasons(&table, CHECKOUT),
        vec!["canary.io/split: per-request"]
    );
    let per_connection = per_request.replace("per-request", "per-connection");
    assert!(reasons(&compile(&must_load(&per_connection)), CHECKOUT).is_empty());
    let typo = per_request.replace("per-request", "per_request");
    let errors = crate::config::tests::must_fail(&typo);
    let text = errors.to_string();
    assert!(
        text.contains("canary.io/split") && text.contains("per-request"),
        "{text}"
    );
}

//! Session affinity: a `session-id` header keeps a client on one version
//! across a weighted split, and a cookie is issued when absent.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_id_sticks_to_one_version_and_a_weight_change_moves_only_its_band() {
    let net = 4;
    let [_a, _b, _c] = pods(net, None, None).await;
    let mut w = World::new(
        load(&localize(&examples("session-affinity"), net)),
        ShimOptions::default(),
        None,
    )
    .await;
    let mut conn = w.h1().await;
    let mut version: BTreeMap<String, String> = BTreeMap::new();
    let mut pod: BTreeMap<String, String> = BTreeMap::new();
    for s in 0..200 {
        let sid = format!("session-{s}");
        for _ in 0..20 {
            let r = conn.get("/cart", &[("session-id", &sid)]).await;
            assert_eq!(r.status, StatusCode::OK);
            let v = r.backend()[..2].to_string();
            let prev = version.entry(sid.clone()).or_insert_with(|| v.clone());
            assert_eq!(*prev, v, "{sid} changed version");
            // Maglev inside the subset: the same pod too.
            let p = pod
                .entry(sid.clone())
                .or_insert_with(|| r.backend().to_string());
            assert_eq!(p, r.backend(), "{sid} changed pod");
        }
    }
    let on_v2 = version.values().filter(|v| *v == "v2").count();
    assert!(
        within_sigma(on_v2, 200, 0.5, 4.0),
        "{on_v2} of 200 sessions on v2"
    );

    // 50/50 → 40/60: only sessions in the moved band [4000, 5000) move,
    // and only from v1 to v2.
    w.set_weights(None, &[("v1", 40), ("v2", 60)]);
    let mut moved = 0;
    for (sid, before) in &version {
        let r = conn.get("/cart", &[("session-id", sid)]).await;
        let now = &r.backend()[..2];
        if now != before {
            assert_eq!(
                (before.as_str(), now),
                ("v1", "v2"),
                "{sid} moved the wrong way"
            );
            moved += 1;
        }
    }
    assert!(
        within_sigma(moved, 200, 0.10, 4.0),
        "{moved} sessions moved"
    );

    // Istio's behaviour on request: the hash only picks the pod.
    let w2 = World::new(
        load(&localize(&examples("session-affinity"), net)),
        ShimOptions {
            sticky_subsets: false,
            ..ShimOptions::default()
        },
        None,
    )
    .await;
    let mut conn = w2.h1().await;
    let versions: std::collections::BTreeSet<String> = {
        let mut set = std::collections::BTreeSet::new();
        for _ in 0..60 {
            set.insert(conn.get("/", &[("session-id", "one")]).await.backend()[..2].to_string());
        }
        set
    };
    assert_eq!(
        versions.len(),
        2,
        "random subset per request without the extension"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_affinity_issues_the_cookie_when_absent() {
    let net = 5;
    let [_a, _b, _c] = pods(net, None, None).await;
    let text = localize(&examples("session-affinity"), net).replace(
        "httpHeaderName: session-id",
        "httpCookie: {name: canary-session, path: /, ttl: 3600s}",
    );
    let w = World::new(load(&text), ShimOptions::default(), None).await;
    let mut conn = w.h1().await;
    let mut seen_versions = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let first = conn.get("/", &[]).await;
        let set = first
            .headers
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .expect("Set-Cookie issued")
            .to_string();
        assert!(
            set.starts_with("canary-session=\"")
                && set.ends_with("; Max-Age=3600; Path=/; HttpOnly"),
            "{set}"
        );
        let cookie = set.split(';').next().expect("pair").to_string();
        for _ in 0..10 {
            let again = conn
                .get("/", &[("cookie", &format!("a=b; {cookie}"))])
                .await;
            assert_eq!(again.backend(), first.backend(), "the cookie keeps the pod");
            assert!(
                again.headers.get("set-cookie").is_none(),
                "no new cookie when present"
            );
        }
        seen_versions.insert(first.backend()[..2].to_string());
    }
    assert_eq!(
        seen_versions.len(),
        2,
        "new sessions spread over both versions"
    );
}

//! Mirroring (the seed's 10% to v2): the copies, their shadow host, and
//! the bound on mirrors in flight.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirroring_copies_10_percent_with_shadow_host_and_never_slows_the_primary() {
    let net = 2;
    let hang = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let h = hang.clone();
    let v2 = handler(move |_| {
        let hang = h.load(Ordering::SeqCst);
        async move {
            if hang {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            text(200, "v2")
        }
    });
    let [a, b, c] = pods(net, None, Some(v2)).await;
    let w = World::new(
        load(&localize(&examples("mirroring"), net)),
        ShimOptions::default(),
        None,
    )
    .await;

    let n = 2000;
    let mut conn = w.h1().await;
    let mut plain = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let r = conn
            .send(
                "POST",
                &format!("/order/{i}"),
                &[("content-type", "text/plain")],
                Bytes::from("item=1"),
            )
            .await;
        plain.push(t.elapsed());
        assert_eq!(r.status, StatusCode::OK);
        assert!(
            r.backend().starts_with("v1-"),
            "primary answered by {}",
            r.backend()
        );
    }
    assert_eq!(a.hits() + b.hits(), n);
    assert!(
        eventually(|| w.recorder.records().iter().filter(|r| r.mirrored).count() == c.hits()).await
    );
    let copies = c.hits();
    assert!(
        within_sigma(copies, n, 0.10, 4.0),
        "v2 got {copies} copies of {n}"
    );
    for s in c.seen() {
        assert_eq!(
            s.headers.get("host").and_then(|v| v.to_str().ok()),
            Some("checkout-service.prod.svc.cluster.local-shadow:8080")
        );
        assert!(s.path.starts_with("/order/"));
        assert_eq!(s.body, Bytes::from("item=1"), "the copy carries the body");
    }
    let mirrored: Vec<_> = w
        .recorder
        .records()
        .into_iter()
        .filter(|r| r.mirrored)
        .collect();
    assert!(
        mirrored
            .iter()
            .all(|r| r.subset.as_deref() == Some("v2") && r.response_code == 200)
    );

    // The mirror target hangs for 5 s: the primary does not notice.
    hang.store(true, Ordering::SeqCst);
    let m = 400;
    let mut hung = Vec::with_capacity(m);
    for i in 0..m {
        let t = Instant::now();
        let r = conn
            .send("POST", &format!("/order/{i}"), &[], Bytes::from("item=1"))
            .await;
        hung.push(t.elapsed());
        assert_eq!(r.status, StatusCode::OK, "no primary request fails");
    }
    plain.sort();
    hung.sort();
    let (p50, h50) = (plain[plain.len() / 2], hung[hung.len() / 2]);
    assert!(
        h50.as_secs_f64() < 3.0 * p50.as_secs_f64() + 0.002,
        "median {h50:?} with a hanging mirror vs {p50:?} without"
    );
    assert!(
        hung[hung.len() * 99 / 100] < Duration::from_secs(1),
        "p99 {:?}",
        hung[hung.len() * 99 / 100]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_beyond_the_bound_are_dropped_and_reported() {
    let net = 3;
    let v2 = handler(|_| async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        text(200, "v2")
    });
    let [_a, _b, c] = pods(net, None, Some(v2)).await;
    let vs = examples("mirroring").replace("value: 10.0", "value: 100.0");
    let options = ShimOptions {
        max_mirrors_in_flight: 3,
        ..ShimOptions::default()
    };
    let w = World::new(load(&localize(&vs, net)), options, None).await;
    let mut conn = w.h1().await;
    for _ in 0..10 {
        assert_eq!(conn.get("/", &[]).await.status, StatusCode::OK);
    }
    assert!(eventually(|| c.hits() == 3).await);
    let dropped = w
        .recorder
        .events()
        .iter()
        .filter(|e| matches!(e, ShimEvent::MirrorDropped { .. }))
        .count();
    assert_eq!(dropped, 7);
}

//! Series whose values are the kernel's own cumulative counters (sockops,
//! pinned maps): kept as the last snapshot handed over and encoded as
//! counters with those values. They survive agent restarts with the maps,
//! and a counter that goes down (maps recreated) is a reset to Prometheus.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, LabelSetEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use crate::admin::protocol::Totals;
use crate::observe::Workload;

/// Kernel counters of one destination workload of one service, labelled as
/// Istio labels its TCP series (`reporter="destination"`,
/// `request_protocol="tcp"`, `response_flags="-"`,
/// `connection_security_policy="unknown"`, no `response_code`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpSample {
    /// The client workload; [`Workload::unknown`] when the counters are not
    /// kept per client (the kernel's are not).
    pub source: Workload,
    /// The endpoints' workload, with `version` the subset's version label
    /// (else the subset name), as for HTTP series.
    pub destination: Workload,
    /// FQDN, e.g. `checkout-service.prod.svc.cluster.local`.
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    /// The DestinationRule subset: not a label, it keys
    /// [`Metrics::live`](super::Metrics::live)'s connections/s.
    pub subset: Option<String>,
    pub counts: TcpCounts,
}

/// Cumulative totals, in Istio's (the destination's) point of view.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpCounts {
    pub opened: u64,
    pub closed: u64,
    /// Bytes the destination sent (responses): `istio_tcp_sent_bytes_total`.
    pub sent_bytes: u64,
    /// Bytes the destination received (requests):
    /// `istio_tcp_received_bytes_total`.
    pub received_bytes: u64,
}

/// The last snapshot handed over, encoded at scrape time.
#[derive(Debug, Default)]
pub(super) struct KernelSnapshot {
    tcp: Mutex<Vec<(TcpKey, TcpCounts)>>,
    no_endpoint: Mutex<BTreeMap<String, u64>>,
}

/// The labels of one TCP series.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct TcpKey {
    source: Workload,
    destination: Workload,
    destination_service: String,
    destination_service_name: String,
    destination_service_namespace: String,
}

/// Encodes a [`KernelSnapshot`].
#[derive(Debug)]
pub(super) struct KernelCollector(pub Arc<KernelSnapshot>);

// === impl TcpCounts ===

impl TcpCounts {
    pub fn add(&mut self, o: &TcpCounts) {
        self.opened += o.opened;
        self.closed += o.closed;
        self.sent_bytes += o.sent_bytes;
        self.received_bytes += o.received_bytes;
    }
}

/// The kernel counts on the client's socket: what the client sent is what
/// the destination received, and the other way round.
impl From<&Totals> for TcpCounts {
    fn from(t: &Totals) -> Self {
        TcpCounts {
            opened: t.opened,
            closed: t.closed,
            sent_bytes: t.bytes_received,
            received_bytes: t.bytes_sent,
        }
    }
}

// === impl KernelSnapshot ===

impl KernelSnapshot {
    pub fn set_tcp(&self, samples: &[TcpSample]) {
        let mut summed: HashMap<TcpKey, TcpCounts> = HashMap::new();
        for s in samples {
            summed.entry(TcpKey::from(s)).or_default().add(&s.counts);
        }
        let mut series: Vec<(TcpKey, TcpCounts)> = summed.into_iter().collect();
        series.sort_by(|(a, _), (b, _)| a.sort_key().cmp(&b.sort_key()));
        *self.tcp.lock().unwrap_or_else(|e| e.into_inner()) = series;
    }

    pub fn set_no_endpoint(&self, service: &str, total: u64) {
        self.no_endpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(service.to_string(), total);
    }
}

// === impl TcpKey ===

impl TcpKey {
    fn sort_key(&self) -> [&str; 5] {
        [
            &self.destination_service,
            &self.destination.workload,
            &self.destination.version,
            &self.source.workload,
            &self.source.namespace,
        ]
    }
}

impl From<&TcpSample> for TcpKey {
    fn from(s: &TcpSample) -> Self {
        TcpKey {
            source: s.source.clone(),
            destination: s.destination.clone(),
            destination_service: s.destination_service.clone(),
            destination_service_name: s.destination_service_name.clone(),
            destination_service_namespace: s.destination_service_namespace.clone(),
        }
    }
}

impl EncodeLabelSet for TcpKey {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        super::peer_labels(
            &self.source,
            &self.destination,
            &self.destination_service,
            &self.destination_service_name,
            &self.destination_service_namespace,
        )
        .encode(encoder)?;
        [
            ("request_protocol", "tcp"),
            ("response_flags", "-"),
            ("connection_security_policy", "unknown"),
        ]
        .encode(encoder)
    }
}

// === impl KernelCollector ===

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let tcp = self.0.tcp.lock().unwrap_or_else(|e| e.into_inner()).clone();
        type Value = fn(&TcpCounts) -> u64;
        let families: [(&str, &str, Value); 4] = [
            (
                "istio_tcp_connections_opened",
                "TCP connections opened to the destination.",
                |c| c.opened,
            ),
            (
                "istio_tcp_connections_closed",
                "TCP connections to the destination closed.",
                |c| c.closed,
            ),
            (
                "istio_tcp_sent_bytes",
                "Bytes the destination sent on TCP connections, counted at close.",
                |c| c.sent_bytes,
            ),
            (
                "istio_tcp_received_bytes",
                "Bytes the destination received on TCP connections, counted at close.",
                |c| c.received_bytes,
            ),
        ];
        for (name, help, value) in families {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (key, counts) in &tcp {
                family
                    .encode_family(key)?
                    .encode_counter::<NoLabelSet, u64, u64>(&value(counts), None)?;
            }
        }

        let no_endpoint = self
            .0
            .no_endpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut family = encoder.encode_descriptor(
            "canary_kernel_no_endpoint",
            "connect() calls the kernel refused because the chosen subset had no endpoint.",
            None,
            MetricType::Counter,
        )?;
        for (service, total) in &no_endpoint {
            family
                .encode_family(&[("destination_service", service.as_str())])?
                .encode_counter::<NoLabelSet, u64, u64>(total, None)?;
        }
        Ok(())
    }
}

//! Prometheus metrics of a node, served at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of the HTTP request counter: bounded (route templates, not paths).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// HTTP method.
    pub method: String,
    /// The matched route template, or `unmatched`.
    pub route: String,
    /// Response status code.
    pub status: u16,
}

/// The node's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests by method, route and status.
    pub http_requests: Family<HttpLabels, Counter>,
    /// Bytes accepted into the blob store.
    pub blob_bytes_received: Counter,
    /// Bytes of blob data sent, raw or verified.
    pub blob_bytes_sent: Counter,
    /// Blobs newly stored.
    pub blobs_stored: Counter,
    /// Blobs that failed verification and were put aside.
    pub corrupt_blobs: Counter,
    /// Models newly published.
    pub models_published: Counter,
    /// Uploads in progress.
    pub uploads_in_flight: Gauge,
    /// Inferences answered with a signed receipt.
    pub inferences: Counter,
}

impl Metrics {
    /// Registers every metric under the `vouch` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("vouch");
        let metrics = Self {
            http_requests: Family::default(),
            blob_bytes_received: Counter::default(),
            blob_bytes_sent: Counter::default(),
            blobs_stored: Counter::default(),
            corrupt_blobs: Counter::default(),
            models_published: Counter::default(),
            uploads_in_flight: Gauge::default(),
            inferences: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "http_requests",
            "HTTP requests by method, route and status",
            metrics.http_requests.clone(),
        );
        registry.register(
            "blob_received_bytes",
            "Bytes accepted into the blob store",
            metrics.blob_bytes_received.clone(),
        );
        registry.register(
            "blob_sent_bytes",
            "Bytes of blob data sent",
            metrics.blob_bytes_sent.clone(),
        );
        registry.register("blobs_stored", "Blobs newly stored", metrics.blobs_stored.clone());
        registry.register(
            "corrupt_blobs",
            "Blobs that failed verification and were put aside",
            metrics.corrupt_blobs.clone(),
        );
        registry.register(
            "inferences",
            "Inferences answered with a signed receipt",
            metrics.inferences.clone(),
        );
        registry.register(
            "models_published",
            "Models newly published",
            metrics.models_published.clone(),
        );
        registry.register(
            "uploads_in_flight",
            "Uploads in progress",
            metrics.uploads_in_flight.clone(),
        );
        Self { registry, ..metrics }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

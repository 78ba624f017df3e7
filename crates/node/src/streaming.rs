//! Bridges between the blocking store and async HTTP bodies.

use std::io;
use std::sync::Arc;

use axum::body::Body;
use futures::StreamExt;
use vouch_store::bridge::ChunkWriter;
use vouch_store::{BlobStore, StoreError};

use crate::error::ApiError;
use crate::metrics::Metrics;

/// Runs `produce` on a blocking thread and streams what it writes as a response body.
///
/// The first chunk is awaited before the response is built, so a failure that happens before
/// any data (a missing or corrupt blob, for most blobs) becomes a proper JSON error. A failure
/// after data has been sent aborts the body, which the client sees as a broken transfer.
pub async fn stream_body(
    store: Arc<dyn BlobStore>,
    metrics: Arc<Metrics>,
    produce: impl FnOnce(&dyn BlobStore, &mut dyn io::Write) -> Result<(), StoreError> + Send + 'static,
) -> Result<Body, ApiError> {
    let (mut writer, mut rx) = ChunkWriter::new();
    let task_metrics = metrics.clone();
    let task = tokio::task::spawn_blocking(move || {
        let result =
            produce(&*store, &mut writer).and_then(|()| io::Write::flush(&mut writer).map_err(StoreError::Output));
        if let Err(error) = &result {
            if matches!(error, StoreError::Corrupt { .. }) {
                task_metrics.corrupt_blobs.inc();
            }
            writer.fail(io::Error::other(error.to_string()));
        }
        result
    });
    let first = match rx.recv().await {
        Some(Ok(first)) => first,
        _ => {
            task.await??;
            return Ok(Body::empty());
        }
    };
    let rest = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    let counted = futures::stream::once(async move { Ok(first) })
        .chain(rest)
        .map(move |item| {
            if let Ok(chunk) = &item {
                metrics.blob_bytes_sent.inc_by(chunk.len() as u64);
            }
            item
        });
    Ok(Body::from_stream(counted))
}

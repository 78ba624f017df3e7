//! Bridges between the blocking store and async HTTP bodies.

use std::io;
use std::sync::Arc;

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::sync::mpsc;
use vouch_store::{BlobStore, StoreError};

use crate::error::ApiError;
use crate::metrics::Metrics;

/// Size of the chunks handed to the HTTP layer.
const CHUNK_BYTES: usize = 256 * 1024;
/// Chunks buffered between the store thread and the connection.
const CHANNEL_CHUNKS: usize = 4;

/// A `Write` that hands full chunks to an async receiver, blocking when it is behind.
struct ChannelWriter {
    tx: mpsc::Sender<Result<Bytes, io::Error>>,
    buf: BytesMut,
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))
    }
}

impl io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK_BYTES {
            self.send()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

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
    let (tx, mut rx) = mpsc::channel(CHANNEL_CHUNKS);
    let error_tx = tx.clone();
    let task_metrics = metrics.clone();
    let task = tokio::task::spawn_blocking(move || {
        let mut writer = ChannelWriter {
            tx,
            buf: BytesMut::with_capacity(CHUNK_BYTES),
        };
        let result =
            produce(&*store, &mut writer).and_then(|()| io::Write::flush(&mut writer).map_err(StoreError::Output));
        if let Err(error) = &result {
            if matches!(error, StoreError::Corrupt { .. }) {
                task_metrics.corrupt_blobs.inc();
            }
            let _ = error_tx.blocking_send(Err(io::Error::other(error.to_string())));
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

//! Projects one stream: reads it from where its last commit left off, folds batches of
//! events into writes and commits each batch with the offset after it.

use std::time::Duration;

use eventlog::log::{LogError, ReadFrom, Record, StreamLog};
use thiserror::Error;

use crate::metrics;
use crate::projection::{Fold, StreamKind};
use crate::store::{Position, Store, StoreError};

/// How long a batch waits for more events once it has one.
const BATCH_WINDOW: Duration = Duration::from_millis(20);

#[derive(Debug, Error)]
pub enum ProjectError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0} ended")]
    StreamEnded(String),
}

/// Projects `stream` until it fails. `batch_max` events at most per transaction.
pub async fn project(
    log: StreamLog,
    store: Store,
    stream: String,
    kind: StreamKind,
    batch_max: usize,
) -> Result<(), ProjectError> {
    let position = store.position(&stream).await?;
    let from = match position {
        Some(p) => ReadFrom::Offset(p.next_offset),
        None => ReadFrom::Start,
    };
    let mut next_offset = position.map(|p| p.next_offset);
    let mut fold = Fold::new(kind, position.and_then(|p| p.highest_token));
    let mut reader = log.reader(&stream, from, None).await?;
    tracing::info!(%stream, ?from, "projecting");
    loop {
        let Some(first) = reader.next().await else {
            return Err(ProjectError::StreamEnded(stream));
        };
        let mut batch: Vec<Record> = vec![first?];
        while batch.len() < batch_max {
            match tokio::time::timeout(BATCH_WINDOW, reader.next()).await {
                Ok(Some(record)) => batch.push(record?),
                Ok(None) | Err(_) => break,
            }
        }
        if let Some(expected) = next_offset
            && batch[0].offset > expected
        {
            // The broker's retention dropped events before they were projected.
            let lost = batch[0].offset - expected;
            metrics::records_lost(&stream, lost);
            tracing::error!(%stream, expected, first = batch[0].offset, lost, "events were dropped by retention before they were projected");
        }
        let events: Vec<(u64, eventlog::Envelope)> =
            batch.into_iter().map(|r| (r.offset, r.envelope)).collect();
        let needed = fold.needs(&events);
        if !needed.is_empty() {
            let stored = store.stored_results(&needed).await?;
            for session in needed {
                fold.restore(session, &stored.get(&session).cloned().unwrap_or_default());
            }
        }
        let writes: Vec<_> = events
            .iter()
            .flat_map(|(offset, envelope)| fold.apply(*offset, envelope))
            .collect();
        let (last_offset, last) = events.last().expect("a batch has an event");
        let position = Position {
            next_offset: last_offset + 1,
            highest_token: fold.highest_token(),
        };
        let started = std::time::Instant::now();
        store.commit(&stream, position, &writes).await?;
        metrics::batch_committed(&stream, events.len(), started.elapsed(), last.at_ms);
        next_offset = Some(position.next_offset);
    }
}

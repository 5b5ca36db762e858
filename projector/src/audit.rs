//! Reading the read models back, for audit and replay tooling.

use eventlog::{AudioEncoding, AudioFormat, SessionId};
use sqlx::{PgPool, Row};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum AuditError {
    #[error("PostgreSQL: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("no session {0} in the read models (not projected yet, or never opened)")]
    UnknownSession(SessionId),
    #[error("session {session} stores encoding {encoding:?}, which this build cannot read")]
    UnknownEncoding {
        session: SessionId,
        encoding: String,
    },
    #[error("session {session}'s archived audio misses chunks {missing:?}")]
    MissingChunks {
        session: SessionId,
        missing: Vec<u64>,
    },
}

/// A session's audio exactly as the client sent it: its declared format and its PCM
/// bytes, chunk after chunk in sequence order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchivedAudio {
    pub format: AudioFormat,
    pub pcm: Vec<u8>,
    pub chunks: u64,
}

/// The archived audio of `session`; an error if a chunk in the sequence is missing.
pub async fn session_audio(pool: &PgPool, session: SessionId) -> Result<ArchivedAudio, AuditError> {
    let row = sqlx::query("SELECT sample_rate, encoding FROM sessions WHERE session_id = $1")
        .bind(session)
        .fetch_optional(pool)
        .await?
        .ok_or(AuditError::UnknownSession(session))?;
    let encoding: String = row.get("encoding");
    let format = AudioFormat {
        sample_rate: row.get::<i32, _>("sample_rate") as u32,
        encoding: AudioEncoding::from_name(&encoding)
            .ok_or(AuditError::UnknownEncoding { session, encoding })?,
    };
    let rows = sqlx::query("SELECT seq, pcm FROM audio_chunks WHERE session_id = $1 ORDER BY seq")
        .bind(session)
        .fetch_all(pool)
        .await?;
    let (mut pcm, mut missing, mut next) = (Vec::new(), Vec::new(), 0u64);
    for row in &rows {
        let seq = row.get::<i64, _>("seq") as u64;
        missing.extend(next..seq);
        next = seq + 1;
        pcm.extend_from_slice(row.get::<&[u8], _>("pcm"));
    }
    if !missing.is_empty() {
        return Err(AuditError::MissingChunks { session, missing });
    }
    Ok(ArchivedAudio {
        format,
        pcm,
        chunks: rows.len() as u64,
    })
}

/// The session's transcript as the read models hold it: its accepted finals in segment
/// order, trimmed, empty ones skipped, joined by single spaces (as the client got it).
pub async fn session_transcript(pool: &PgPool, session: SessionId) -> Result<String, AuditError> {
    let known: Option<i64> =
        sqlx::query_scalar("SELECT 1::bigint FROM sessions WHERE session_id = $1")
            .bind(session)
            .fetch_optional(pool)
            .await?;
    if known.is_none() {
        return Err(AuditError::UnknownSession(session));
    }
    let texts: Vec<String> = sqlx::query_scalar(
        "SELECT text FROM transcript_segments WHERE session_id = $1 ORDER BY segment",
    )
    .bind(session)
    .fetch_all(pool)
    .await?;
    Ok(eventlog::results::join_finals(
        texts.iter().map(String::as_str),
    ))
}

//! One streaming session from the client's side: open, send paced audio frames, read
//! acknowledgements and results, end, and wait for the completed transcript.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use ingest::protocol::{
    ClientMessage, OpenRequest, SEQ_HEADER_BYTES, Secret, Segment, ServerMessage,
};
use thiserror::Error;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use crate::wav::Recording;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot connect to {url}: {message} (is `asr up` running?)")]
    Connect { url: String, message: String },
    #[error("the server refused the session: {code}: {message}")]
    Server { code: String, message: String },
    #[error("the connection closed before the transcript was complete ({0})")]
    Closed(String),
    #[error("unexpected message from the server: {0}")]
    Protocol(String),
    #[error("no completed transcript within {0:?} after the end of the audio")]
    Timeout(Duration),
}

/// How to stream.
#[derive(Clone, Debug)]
pub struct StreamOptions {
    /// The ingest endpoint, for instance `ws://127.0.0.1:8080/v1/stream`.
    pub url: String,
    pub model: String,
    /// Audio per frame.
    pub chunk_ms: u32,
    /// 1.0 = real time, N = N times faster, 0 = as fast as acknowledgements allow.
    pub speed: f64,
    /// Frames sent but not yet acknowledged, at most (unpaced streaming).
    pub max_in_flight: usize,
    /// How long to wait for `completed` once all audio is sent.
    pub completion_timeout: Duration,
    /// The tenant's API key, sent in `open`.
    pub api_key: Option<Secret>,
}

impl Default for StreamOptions {
    fn default() -> Self {
        Self {
            url: "ws://127.0.0.1:8080/v1/stream".into(),
            model: "whisper-tiny.en".into(),
            chunk_ms: 100,
            speed: 1.0,
            max_in_flight: 64,
            completion_timeout: Duration::from_secs(120),
            api_key: None,
        }
    }
}

/// A result as it arrived, with when.
#[derive(Clone, Debug)]
pub struct Observed {
    pub at: Instant,
    pub segment: Segment,
}

/// Everything the session produced, with client-side timings.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub session_id: Uuid,
    /// The finals joined by single spaces, as the server sent it in `completed`.
    pub transcript: String,
    pub finals: Vec<Observed>,
    pub partials: Vec<Observed>,
    /// When each frame (by seq) was sent and acknowledged.
    pub sent_at: Vec<Instant>,
    pub acked_at: Vec<Option<Instant>>,
    /// The queue position the server reported, if the session had to wait.
    pub queued: Option<u32>,
    pub missing_segments: Vec<u32>,
    /// Audio per frame, to map a time in the audio to the frame carrying it.
    pub chunk_ms: u32,
}

impl Outcome {
    /// The seq of the frame carrying the audio at `ms`.
    pub fn frame_at(&self, ms: u64) -> usize {
        ((ms / u64::from(self.chunk_ms)) as usize).min(self.sent_at.len().saturating_sub(1))
    }
}

/// Streams `recording` as one session. `on_message` sees every server message as it
/// arrives (for live display).
pub async fn stream(
    options: &StreamOptions,
    recording: &Recording,
    mut on_message: impl FnMut(&ServerMessage),
) -> Result<Outcome, ClientError> {
    let (socket, _) = tokio_tungstenite::connect_async(&options.url)
        .await
        .map_err(|e| ClientError::Connect {
            url: options.url.clone(),
            message: e.to_string(),
        })?;
    let (mut sink, mut source) = socket.split();
    let open = ClientMessage::Open(OpenRequest {
        model: options.model.clone(),
        sample_rate: recording.format.sample_rate,
        encoding: recording.format.encoding.name().into(),
        api_key: options.api_key.clone(),
    });
    sink.send(Message::text(open.to_json()))
        .await
        .map_err(|e| ClientError::Closed(e.to_string()))?;

    let frame_bytes = (options.chunk_ms as usize * recording.format.sample_rate as usize / 1000)
        * recording.format.encoding.bytes_per_sample();
    let frames: Vec<&[u8]> = recording.pcm.chunks(frame_bytes.max(1)).collect();
    let mut outcome = Outcome {
        session_id: Uuid::nil(),
        transcript: String::new(),
        finals: Vec::new(),
        partials: Vec::new(),
        sent_at: Vec::with_capacity(frames.len()),
        acked_at: vec![None; frames.len()],
        queued: None,
        missing_segments: Vec::new(),
        chunk_ms: options.chunk_ms,
    };

    // The first message is `opened` (or the refusal): no audio before it.
    let first = next_message(&mut source).await?;
    on_message(&first);
    match first {
        ServerMessage::Opened { session_id, .. } => outcome.session_id = session_id,
        ServerMessage::Error { code, message, .. } => {
            return Err(ClientError::Server {
                code: code.into_owned(),
                message,
            });
        }
        other => return Err(ClientError::Protocol(format!("{other:?} before opened"))),
    }

    let (acked_tx, acked_rx) = watch::channel(0usize);
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel();
    let pace = options.speed;
    let chunk = Duration::from_millis(u64::from(options.chunk_ms));
    let window = options.max_in_flight.max(1);
    let sender = async move {
        let start = Instant::now();
        let mut acked_rx = acked_rx;
        for (seq, pcm) in frames.iter().enumerate() {
            if pace > 0.0 {
                tokio::time::sleep_until(start + chunk.mul_f64(seq as f64 / pace)).await;
            } else {
                // Unpaced: keep at most `window` frames unacknowledged.
                let _ = acked_rx.wait_for(|acked| seq < acked + window).await;
            }
            let mut frame = Vec::with_capacity(SEQ_HEADER_BYTES + pcm.len());
            frame.extend_from_slice(&(seq as u64).to_le_bytes());
            frame.extend_from_slice(pcm);
            sink.send(Message::binary(frame)).await?;
            let _ = sent_tx.send(Instant::now());
        }
        sink.send(Message::text(ClientMessage::End.to_json()))
            .await?;
        // Keep the sink alive (and the socket open) until the reader is done.
        std::future::pending::<()>().await;
        Ok::<_, tokio_tungstenite::tungstenite::Error>(())
    };
    tokio::pin!(sender);

    let total = outcome.acked_at.len();
    let mut deadline: Option<Instant> = None;
    loop {
        if deadline.is_none() && outcome.sent_at.len() == total {
            deadline = Some(Instant::now() + options.completion_timeout);
        }
        let message = tokio::select! {
            sent = sent_rx.recv() => {
                if let Some(at) = sent {
                    outcome.sent_at.push(at);
                }
                continue;
            }
            result = &mut sender => {
                let e = result.err().map(|e| e.to_string()).unwrap_or_default();
                return Err(ClientError::Closed(e));
            }
            _ = sleep_until_opt(deadline) => {
                return Err(ClientError::Timeout(options.completion_timeout));
            }
            message = next_message(&mut source) => message?,
        };
        on_message(&message);
        let now = Instant::now();
        match message {
            ServerMessage::Ack { seq } => {
                if let Some(slot) = outcome.acked_at.get_mut(seq as usize) {
                    *slot = Some(now);
                }
                let acked = outcome.acked_at.iter().take_while(|a| a.is_some()).count();
                let _ = acked_tx.send(acked);
            }
            ServerMessage::Queued { position } => outcome.queued = Some(position),
            ServerMessage::Started | ServerMessage::Opened { .. } => {}
            ServerMessage::Partial(segment) => outcome.partials.push(Observed { at: now, segment }),
            ServerMessage::Final(segment) => outcome.finals.push(Observed { at: now, segment }),
            ServerMessage::Completed {
                transcript,
                missing_segments,
                ..
            } => {
                outcome.transcript = transcript;
                outcome.missing_segments = missing_segments;
                return Ok(outcome);
            }
            ServerMessage::Error { code, message, .. } => {
                return Err(ClientError::Server {
                    code: code.into_owned(),
                    message,
                });
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The next server message, skipping pings and pongs.
async fn next_message<S>(source: &mut S) -> Result<ServerMessage, ClientError>
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match source.next().await {
            Some(Ok(Message::Text(text))) => {
                return ServerMessage::from_json(&text)
                    .map_err(|e| ClientError::Protocol(format!("{e}: {text}")));
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(ClientError::Closed(
                    frame
                        .map(|f| format!("close {} {}", u16::from(f.code), f.reason))
                        .unwrap_or_default(),
                ));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(ClientError::Closed(e.to_string())),
            None => return Err(ClientError::Closed("end of stream".into())),
        }
    }
}

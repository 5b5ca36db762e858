//! One streaming session from the client's side: open, send paced audio frames, read
//! acknowledgements and results, end, and wait for the completed transcript; when the
//! connection drops, reconnect (to any of the endpoints) and resume the session where
//! the server says its stored audio ends, so the outcome is the uninterrupted run's.

use std::time::Duration;

use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use ingest::protocol::{
    ClientMessage, OpenRequest, ResumeRequest, SEQ_HEADER_BYTES, Secret, Segment, ServerMessage,
};
use thiserror::Error;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

use crate::wav::Recording;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

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

/// Server error codes after which the session lives on and is resumed: the
/// connection failed, not the session (docs/protocol.md).
const RESUMABLE: &[&str] = &[
    "idle_timeout",
    "client_too_slow",
    "shutting_down",
    "broker_unavailable",
    "orchestrator_unavailable",
    "internal_error",
];

/// How to stream.
#[derive(Clone, Debug)]
pub struct StreamOptions {
    /// Ingest endpoints, for instance `ws://127.0.0.1:8080/v1/stream`: each connection
    /// goes to the first that accepts it.
    pub urls: Vec<String>,
    pub model: String,
    /// Audio per frame.
    pub chunk_ms: u32,
    /// 1.0 = real time, N = N times faster, 0 = as fast as acknowledgements allow.
    pub speed: f64,
    /// Frames sent but not yet acknowledged, at most (unpaced streaming).
    pub max_in_flight: usize,
    /// How long to wait for `completed` once all audio is sent.
    pub completion_timeout: Duration,
    /// How long to keep trying the endpoints, with backoff, while none accepts a
    /// connection: at the start, and after each drop before resuming.
    pub reconnect_patience: Duration,
    /// The tenant's API key, sent in `open` and `resume`.
    pub api_key: Option<Secret>,
}

impl Default for StreamOptions {
    fn default() -> Self {
        Self {
            urls: vec!["ws://127.0.0.1:8080/v1/stream".into()],
            model: "whisper-tiny.en".into(),
            chunk_ms: 100,
            speed: 1.0,
            max_in_flight: 64,
            completion_timeout: Duration::from_secs(120),
            reconnect_patience: Duration::from_secs(60),
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
    /// When each frame (by seq) was first sent and first acknowledged (by its `ack`,
    /// or by a `resumed` whose `next_seq` is above it).
    pub sent_at: Vec<Instant>,
    pub acked_at: Vec<Option<Instant>>,
    /// The queue position the server reported, if the session had to wait.
    pub queued: Option<u32>,
    pub missing_segments: Vec<u32>,
    /// Audio per frame, to map a time in the audio to the frame carrying it.
    pub chunk_ms: u32,
    /// Times the connection dropped and the session was resumed.
    pub resumes: u32,
    /// Result indices that arrived although an earlier result had the same or a
    /// higher one: a result received twice. Empty when resume works.
    pub repeated_results: Vec<u64>,
}

impl Outcome {
    /// The seq of the frame carrying the audio at `ms`.
    pub fn frame_at(&self, ms: u64) -> usize {
        ((ms / u64::from(self.chunk_ms)) as usize).min(self.sent_at.len().saturating_sub(1))
    }
}

/// Why one connection of the session ended.
enum Interrupted {
    /// The session lives on: reconnect and resume.
    Lost(String),
    /// The session cannot go on.
    Fatal(ClientError),
}

/// Where the session stands, across its connections.
struct Progress<'r> {
    options: &'r StreamOptions,
    frames: Vec<&'r [u8]>,
    outcome: Outcome,
    /// The first frame the current connection sends.
    next_seq: u64,
    /// The server holds the end of stream.
    ended: bool,
    last_result: Option<u64>,
    /// When the first connection started sending: the pace's origin.
    start: Instant,
    deadline: Option<Instant>,
}

/// Streams `recording` as one session, resuming it after dropped connections.
/// `on_message` sees every server message as it arrives (for live display).
pub async fn stream(
    options: &StreamOptions,
    recording: &Recording,
    mut on_message: impl FnMut(&ServerMessage),
) -> Result<Outcome, ClientError> {
    let frame_bytes = (options.chunk_ms as usize * recording.format.sample_rate as usize / 1000)
        * recording.format.encoding.bytes_per_sample();
    let frames: Vec<&[u8]> = recording.pcm.chunks(frame_bytes.max(1)).collect();
    let total = frames.len();

    let mut socket = connect_any(&options.urls, options.reconnect_patience).await?;
    let open = ClientMessage::Open(OpenRequest {
        model: options.model.clone(),
        sample_rate: recording.format.sample_rate,
        encoding: recording.format.encoding.name().into(),
        api_key: options.api_key.clone(),
    });
    socket
        .send(Message::text(open.to_json()))
        .await
        .map_err(|e| ClientError::Closed(e.to_string()))?;
    // The first message is `opened` (or the refusal): no audio before it.
    let first = next_message(&mut socket).await?;
    on_message(&first);
    let (session_id, token) = match first {
        ServerMessage::Opened {
            session_id,
            resume_token,
            ..
        } => (session_id, resume_token),
        ServerMessage::Error { code, message, .. } => {
            return Err(ClientError::Server {
                code: code.into_owned(),
                message,
            });
        }
        other => return Err(ClientError::Protocol(format!("{other:?} before opened"))),
    };

    let mut progress = Progress {
        options,
        frames,
        outcome: Outcome {
            session_id,
            transcript: String::new(),
            finals: Vec::new(),
            partials: Vec::new(),
            sent_at: Vec::with_capacity(total),
            acked_at: vec![None; total],
            queued: None,
            missing_segments: Vec::new(),
            chunk_ms: options.chunk_ms,
            resumes: 0,
            repeated_results: Vec::new(),
        },
        next_seq: 0,
        ended: false,
        last_result: None,
        start: Instant::now(),
        deadline: None,
    };
    loop {
        match progress.serve(socket, &mut on_message).await {
            Ok(()) => return Ok(progress.outcome),
            Err(Interrupted::Fatal(e)) => return Err(e),
            Err(Interrupted::Lost(reason)) => {
                tracing::info!(session = %session_id, %reason, "connection lost; resuming");
            }
        }
        socket = progress.resume(&token, &mut on_message).await?;
    }
}

impl Progress<'_> {
    /// Reconnects and resumes until a node takes the session back, for up to the
    /// reconnect patience.
    async fn resume(
        &mut self,
        token: &Secret,
        on_message: &mut impl FnMut(&ServerMessage),
    ) -> Result<Socket, ClientError> {
        let patience = self.options.reconnect_patience;
        let deadline = Instant::now() + patience;
        let mut backoff = Duration::from_millis(50);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut socket = connect_any(&self.options.urls, left).await?;
            let resume = ClientMessage::Resume(ResumeRequest {
                session_id: self.outcome.session_id,
                resume_token: token.clone(),
                last_result: self.last_result,
                api_key: self.options.api_key.clone(),
            });
            let answer = match socket.send(Message::text(resume.to_json())).await {
                Ok(()) => next_message(&mut socket).await,
                Err(e) => Err(ClientError::Closed(e.to_string())),
            };
            let lost = match answer {
                Ok(ServerMessage::Resumed {
                    session_id,
                    next_seq,
                    ended,
                    limits,
                }) => {
                    on_message(&ServerMessage::Resumed {
                        session_id,
                        next_seq,
                        ended,
                        limits,
                    });
                    // `resumed` acknowledges every frame below `next_seq` at once:
                    // they are stored, whichever acks the drop took.
                    let now = Instant::now();
                    for slot in self.outcome.acked_at.iter_mut().take(next_seq as usize) {
                        slot.get_or_insert(now);
                    }
                    self.next_seq = next_seq;
                    self.ended = ended;
                    self.outcome.resumes += 1;
                    return Ok(socket);
                }
                Ok(ServerMessage::Error { code, message, .. }) if !RESUMABLE.contains(&&*code) => {
                    return Err(ClientError::Server {
                        code: code.into_owned(),
                        message,
                    });
                }
                Ok(ServerMessage::Error { code, message, .. }) => format!("{code}: {message}"),
                Ok(other) => {
                    return Err(ClientError::Protocol(format!("{other:?} before resumed")));
                }
                Err(e) => e.to_string(),
            };
            if Instant::now() + backoff > deadline {
                return Err(ClientError::Closed(format!(
                    "could not resume within {patience:?}: {lost}"
                )));
            }
            tracing::info!(session = %self.outcome.session_id, reason = %lost, "resume failed; trying again in {backoff:?}");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Serves one connection: sends the frames from `next_seq` on and the end, and
    /// reads until `completed` (`Ok`) or until the connection ends.
    async fn serve(
        &mut self,
        socket: Socket,
        on_message: &mut impl FnMut(&ServerMessage),
    ) -> Result<(), Interrupted> {
        let (sink, mut source) = socket.split();
        let acked = self.acked_prefix();
        let (acked_tx, acked_rx) = watch::channel(acked);
        let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel();
        let sender = send_frames(
            sink,
            self.frames.clone(),
            self.next_seq as usize,
            !self.ended,
            Pace {
                start: self.start,
                chunk: Duration::from_millis(u64::from(self.options.chunk_ms)),
                speed: self.options.speed,
                window: self.options.max_in_flight.max(1),
            },
            acked_rx,
            sent_tx,
        );
        tokio::pin!(sender);
        let total = self.frames.len();
        loop {
            if self.deadline.is_none() && self.outcome.sent_at.len() == total {
                self.deadline = Some(Instant::now() + self.options.completion_timeout);
            }
            let message = tokio::select! {
                sent = sent_rx.recv() => {
                    // Only a frame's first sending counts: a resumed connection sends
                    // some again.
                    if let Some((seq, at)) = sent
                        && seq == self.outcome.sent_at.len()
                    {
                        self.outcome.sent_at.push(at);
                    }
                    continue;
                }
                result = &mut sender => {
                    let e = result.err().map(|e| e.to_string()).unwrap_or_default();
                    return Err(Interrupted::Lost(format!("sending: {e}")));
                }
                _ = sleep_until_opt(self.deadline) => {
                    return Err(Interrupted::Fatal(ClientError::Timeout(self.options.completion_timeout)));
                }
                message = next_message(&mut source) => match message {
                    Ok(message) => message,
                    Err(ClientError::Protocol(e)) => return Err(Interrupted::Fatal(ClientError::Protocol(e))),
                    Err(e) => return Err(Interrupted::Lost(e.to_string())),
                },
            };
            on_message(&message);
            let now = Instant::now();
            match message {
                ServerMessage::Ack { seq } => {
                    if let Some(slot @ None) = self.outcome.acked_at.get_mut(seq as usize) {
                        *slot = Some(now);
                    }
                    let _ = acked_tx.send(self.acked_prefix());
                }
                ServerMessage::Queued { position } => self.outcome.queued = Some(position),
                ServerMessage::Opened { .. } | ServerMessage::Resumed { .. } => {}
                ServerMessage::Started { result } => self.received(result),
                ServerMessage::Partial(segment) => {
                    self.received(segment.result);
                    self.outcome.partials.push(Observed { at: now, segment });
                }
                ServerMessage::Final(segment) => {
                    self.received(segment.result);
                    self.outcome.finals.push(Observed { at: now, segment });
                }
                ServerMessage::Completed {
                    result,
                    transcript,
                    missing_segments,
                    ..
                } => {
                    self.received(result);
                    self.outcome.transcript = transcript;
                    self.outcome.missing_segments = missing_segments;
                    return Ok(());
                }
                ServerMessage::Error { code, message, .. } => {
                    return Err(if RESUMABLE.contains(&&*code) {
                        Interrupted::Lost(format!("{code}: {message}"))
                    } else {
                        Interrupted::Fatal(ClientError::Server {
                            code: code.into_owned(),
                            message,
                        })
                    });
                }
            }
        }
    }

    /// Records a result's index; one at or below the last is a result received twice.
    fn received(&mut self, result: u64) {
        if self.last_result.is_some_and(|last| result <= last) {
            self.outcome.repeated_results.push(result);
        } else {
            self.last_result = Some(result);
        }
    }

    /// Frames acknowledged without a gap from the first.
    fn acked_prefix(&self) -> usize {
        self.outcome
            .acked_at
            .iter()
            .take_while(|a| a.is_some())
            .count()
    }
}

#[derive(Clone, Copy)]
struct Pace {
    start: Instant,
    chunk: Duration,
    speed: f64,
    window: usize,
}

/// Sends `frames[from..]` on the pace (real time from `pace.start` scaled by the speed,
/// or unpaced within a window of unacknowledged frames), then `end` if asked; reports
/// each frame sent. Runs until the connection fails.
async fn send_frames(
    mut sink: SplitSink<Socket, Message>,
    frames: Vec<&[u8]>,
    from: usize,
    end: bool,
    pace: Pace,
    mut acked: watch::Receiver<usize>,
    sent: tokio::sync::mpsc::UnboundedSender<(usize, Instant)>,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    for (seq, pcm) in frames.iter().enumerate().skip(from) {
        if pace.speed > 0.0 {
            tokio::time::sleep_until(pace.start + pace.chunk.mul_f64(seq as f64 / pace.speed))
                .await;
        } else {
            let _ = acked.wait_for(|acked| seq < acked + pace.window).await;
        }
        let mut frame = Vec::with_capacity(SEQ_HEADER_BYTES + pcm.len());
        frame.extend_from_slice(&(seq as u64).to_le_bytes());
        frame.extend_from_slice(pcm);
        sink.send(Message::binary(frame)).await?;
        let _ = sent.send((seq, Instant::now()));
    }
    if end {
        sink.send(Message::text(ClientMessage::End.to_json()))
            .await?;
    }
    // Keep the sink alive (and the socket open) until the reader is done.
    std::future::pending::<()>().await;
    Ok(())
}

/// A connection to the first of `urls` that accepts one, trying them in turn, with
/// backoff, for up to `patience` while none does.
async fn connect_any(urls: &[String], patience: Duration) -> Result<Socket, ClientError> {
    let deadline = Instant::now() + patience;
    let mut backoff = Duration::from_millis(50);
    loop {
        let mut refused = None;
        for url in urls {
            match tokio_tungstenite::connect_async(url).await {
                Ok((socket, _)) => return Ok(socket),
                Err(e) => {
                    refused = Some(ClientError::Connect {
                        url: url.clone(),
                        message: e.to_string(),
                    })
                }
            }
        }
        let Some(refused) = refused else {
            return Err(ClientError::Connect {
                url: String::new(),
                message: "no ingest URL given".into(),
            });
        };
        if Instant::now() + backoff > deadline {
            return Err(refused);
        }
        tracing::info!(error = %refused, "no endpoint accepts a connection; trying again in {backoff:?}");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
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

//! One assignment, start to finish: replay the session's audio from its checkpoint,
//! decode, append results, checkpoint after each confirmed final, complete.
//!
//! Order of effects, which the failover guarantees rest on:
//!
//! 1. `EpochStarted` is confirmed before any result of the epoch is appended, so every
//!    consumer's result filter knows the epoch before it sees a result of it;
//! 2. a checkpoint is saved only after the finals before its replay point are
//!    confirmed, so a checkpoint never skips a final that is not in the log;
//! 3. a final appended but not checkpointed (a crash in between) is decoded again by
//!    the replacement with the same index, and the result filter keeps the first.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use eventlog::checkpoint::{Checkpoint, CheckpointError, ReplayPoint};
use eventlog::log::{Appender, LogError, ReadFrom, Reader, Record};
use eventlog::{AudioFormat, Event, SessionId, now_ms};
use thiserror::Error;
use tracing::{debug, error, info, warn};

use super::Ctx;
use super::partials::{PartialDecision, PartialSchedule};
use super::tracking::{ChunkMap, SeqCheck, SeqTracker};
use crate::audio::{AudioError, Converter, InputFormat, samples_to_ms};
use crate::engine::{DecoderEvent, EngineError, ResumePoint, SessionDecoder, Transcript};
use crate::segmenter::{Segmenter, SegmenterConfig};

/// Audio before `opened_at_ms` read when there is no checkpoint: the broker's
/// timestamp lookup is per chunk of messages, and clocks differ a little.
const OPENED_AT_SLACK_MS: u64 = 5_000;

/// A session assigned to this worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub session: SessionId,
    pub epoch: u64,
    pub tenant: String,
    pub model: String,
    pub opened_at_ms: u64,
    pub format: AudioFormat,
}

#[derive(Debug, Error)]
pub enum SessionError {
    #[error(transparent)]
    Audio(#[from] AudioError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("a newer epoch saved this session's checkpoint: the assignment moved on")]
    Fenced,
    #[error("the audio stream closed before the session ended")]
    StreamClosed,
    #[error("replay point {sample} is outside the chunks read (a bug)")]
    Unmappable { sample: u64 },
    #[error("decoder thread failed: {0}")]
    Decoder(String),
}

impl SessionError {
    /// Errors that retrying cannot fix.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            SessionError::Audio(_) | SessionError::Engine(EngineError::MissingModel { .. })
        )
    }
}

type Decoder =
    Segmenter<crate::engine::sherpa::WhisperModel, crate::engine::sherpa::SileroVadFactory>;

/// A named point where a test can stop this session (compiled in only with the
/// `failpoints` feature; armed through `FAILPOINTS`, see [`super::arm_failpoints`]).
/// The `return` action stops the session's task here for good: it logs
/// `failpoint reached` and waits forever, while the rest of the process (heartbeats,
/// the orchestrator stream) goes on, so the test can SIGKILL the process exactly at
/// this point. The fail crate's other actions (`sleep`, `pause`, `panic`, `print`) do
/// what they do anywhere; `off` counts evaluations, so `40*off->return` stops at the
/// 41st time the point is reached.
async fn stop_point(name: &'static str) {
    if stops_at(name) {
        warn!(
            failpoint = name,
            "failpoint reached: this session stops here"
        );
        std::future::pending::<()>().await;
    }
}

#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
fn stops_at(name: &'static str) -> bool {
    fail::fail_point!(name, |_| true);
    false
}

/// Runs `f` on the decoder on a blocking thread (decoding takes ~0.3 s of CPU).
async fn on_decoder<T: Send + 'static>(
    decoder: &mut Option<Decoder>,
    f: impl FnOnce(&mut Decoder) -> T + Send + 'static,
) -> Result<T, SessionError> {
    let mut d = decoder
        .take()
        .expect("the decoder is put back after every call");
    let (d, out) = tokio::task::spawn_blocking(move || {
        let out = f(&mut d);
        (d, out)
    })
    .await
    .map_err(|e| SessionError::Decoder(e.to_string()))?;
    *decoder = Some(d);
    Ok(out)
}

/// One run of an assignment, from the checkpoint to the end of the session.
pub(crate) struct SessionRun {
    ctx: Arc<Ctx>,
    a: Assignment,
    results: Appender,
    progress: Arc<AtomicU64>,
    input: InputFormat,
    converter: Converter,
    decoder: Option<Decoder>,
    chunks: ChunkMap,
    seq: SeqTracker,
    partials: Option<PartialSchedule>,
}

/// Decodes the session until its end; returns the number of final segments.
pub(crate) async fn run(
    ctx: Arc<Ctx>,
    a: Assignment,
    progress: Arc<AtomicU64>,
) -> Result<u32, SessionError> {
    let session = a.session;
    let input = InputFormat::new(a.format)?;
    // Announcing the epoch (a producer to open, a confirmed append) and preparing the
    // replay (checkpoint, audio reader, decoder) are independent: overlap them. No
    // result is appended before both are done, so `EpochStarted` still comes first.
    let announce = async {
        let results = ctx.results_appender(session).await?;
        results
            .append_confirmed(&ctx.envelope(
                session,
                Event::EpochStarted {
                    epoch: a.epoch,
                    worker: ctx.worker_id.clone(),
                },
            ))
            .await?;
        Ok::<_, SessionError>(results)
    };
    let (results, prepared) = tokio::try_join!(announce, prepare(&ctx, &a, &input))?;
    let Prepared {
        mut reader,
        decoder,
        resume,
        mut skip,
        first_seq,
        first_sample,
        mut opened,
    } = prepared;
    progress.store(samples_to_ms(resume.session_sample), Ordering::Relaxed);

    let partials = ctx.partial_interval.map(PartialSchedule::new);
    let mut run = SessionRun {
        ctx,
        a,
        results,
        progress,
        converter: input.converter(),
        input,
        decoder: Some(decoder),
        chunks: ChunkMap::starting_at(first_sample),
        seq: SeqTracker::starting_at(first_seq),
        partials,
    };

    loop {
        let Ok(next) = tokio::time::timeout(run.ctx.abandon_after, reader.next()).await else {
            warn!(%session, after = ?run.ctx.abandon_after, "no input: the client left and did not resume; completing what was received");
            return run.complete().await;
        };
        let Some(record) = next else { break };
        let Record { offset, envelope } = record?;
        match envelope.event {
            Event::SessionOpened { format, .. } if !opened => {
                opened = true;
                if format != run.input.format() {
                    warn!(%session, ?format, assigned = ?run.input.format(), "the log's format differs from the assignment's; using the log's");
                    run.input = InputFormat::new(format)?;
                    run.converter = run.input.converter();
                }
            }
            Event::AudioChunk(chunk) if opened => {
                let bytes = chunk.bytes;
                match run.seq.check(chunk.seq) {
                    SeqCheck::InOrder => {}
                    SeqCheck::Duplicate { expected } => {
                        warn!(%session, seq = chunk.seq, expected, offset, "duplicate audio chunk skipped");
                        continue;
                    }
                    SeqCheck::Gap { expected, got } => {
                        metrics::counter!("recognizer_sequence_gaps_total").increment(1);
                        error!(%session, expected, got, offset, missing = got - expected, "audio sequence gap: chunks are missing; decoding on");
                    }
                }
                let client_samples = run.input.client_samples(bytes.len()) as u64;
                run.chunks
                    .push(offset, chunk.seq, client_samples, envelope.at_ms);
                // The first chunk after a checkpoint: its head was decoded before. The
                // converter starts at the replay point, as the straight run's had.
                let head = run.input.client_bytes(std::mem::take(&mut skip) as usize);
                let decoded = run.converter.push(&bytes[head.min(bytes.len())..]);
                if decoded.trailing_bytes > 0 {
                    warn!(%session, seq = chunk.seq, trailing_bytes = decoded.trailing_bytes, "chunk ends in a partial sample; dropped");
                }
                let samples = decoded.samples;
                run.feed(samples, envelope.at_ms).await?;
            }
            Event::EndOfStream { last_seq } if opened => {
                let expected_last = run.seq.expected().checked_sub(1);
                if last_seq > expected_last {
                    metrics::counter!("recognizer_sequence_gaps_total").increment(1);
                    error!(%session, ?last_seq, ?expected_last, "end of stream after missing chunks");
                }
                return run.complete().await;
            }
            Event::SessionClosed { reason } if opened => {
                warn!(%session, %reason, "session closed without end of stream; completing what was received");
                return run.complete().await;
            }
            _ => {}
        }
    }
    Err(SessionError::StreamClosed)
}

/// Where a run starts reading and decoding.
struct Prepared {
    reader: Reader,
    decoder: Decoder,
    resume: ResumePoint,
    /// Client samples at the head of the first chunk that were decoded before.
    skip: u64,
    first_seq: u64,
    /// The session sample where the first chunk read begins (client rate).
    first_sample: u64,
    /// Whether `SessionOpened` lies before the first record read.
    opened: bool,
}

/// Loads the checkpoint, opens the session's audio there (or at its start) and
/// builds the decoder at the same replay point.
async fn prepare(ctx: &Ctx, a: &Assignment, input: &InputFormat) -> Result<Prepared, SessionError> {
    let session = a.session;
    let checkpoint = ctx.checkpoints.load(session).await?;
    let (from, resume, skip, first_seq, first_sample, opened) = match checkpoint {
        Some(Checkpoint { epoch, point }) => {
            info!(%session, epoch = a.epoch, checkpoint_epoch = epoch, ?point, "resuming from checkpoint");
            (
                ReadFrom::Offset(point.chunk_offset),
                ResumePoint {
                    session_sample: input.client_to_model(point.session_sample),
                    next_segment: point.next_segment,
                },
                u64::from(point.sample_in_chunk),
                point.chunk_seq,
                point.session_sample - u64::from(point.sample_in_chunk),
                true,
            )
        }
        None => {
            info!(%session, epoch = a.epoch, "no checkpoint: decoding from the session's start");
            (
                ReadFrom::Timestamp(a.opened_at_ms.saturating_sub(OPENED_AT_SLACK_MS)),
                ResumePoint::default(),
                0,
                0,
                0,
                false,
            )
        }
    };
    let audio_stream = ctx.layout.audio_stream(session);
    let reader = ctx.log.reader(&audio_stream, from, Some(session)).await?;
    let (model, vads) = (ctx.model.clone(), ctx.vads.clone());
    let decoder = tokio::task::spawn_blocking(move || {
        Segmenter::new(model, vads, SegmenterConfig::default(), resume)
    })
    .await
    .map_err(|e| SessionError::Decoder(e.to_string()))??;
    Ok(Prepared {
        reader,
        decoder,
        resume,
        skip,
        first_seq,
        first_sample,
        opened,
    })
}

impl SessionRun {
    fn session(&self) -> SessionId {
        self.a.session
    }

    async fn feed(&mut self, samples: Vec<f32>, appended_at_ms: u64) -> Result<(), SessionError> {
        let events = on_decoder(&mut self.decoder, move |d| d.accept(&samples)).await??;
        self.emit(events).await?;
        let decoder = self.decoder.as_ref().expect("decoder present");
        self.progress
            .store(samples_to_ms(decoder.position()), Ordering::Relaxed);
        if decoder.in_speech() {
            stop_point("recognizer::mid_segment").await;
            self.maybe_partial(appended_at_ms).await?;
        }
        Ok(())
    }

    /// Re-decodes the open segment when [`PartialSchedule`] says so.
    async fn maybe_partial(&mut self, appended_at_ms: u64) -> Result<(), SessionError> {
        let Some(schedule) = self.partials.as_mut() else {
            return Ok(());
        };
        let lag = Duration::from_millis(now_ms().saturating_sub(appended_at_ms));
        match schedule.decide(Instant::now(), lag) {
            PartialDecision::Wait => return Ok(()),
            PartialDecision::Skip => {
                metrics::counter!("recognizer_partials_skipped_total").increment(1);
                debug!(session = %self.session(), lag_ms = lag.as_millis() as u64, "behind: partial skipped");
                return Ok(());
            }
            PartialDecision::Decode => {}
        }
        if let Some(partial) = on_decoder(&mut self.decoder, |d| d.partial()).await?? {
            let event = self.result_event(false, &partial);
            // Partials are best effort: not awaited, superseded by the final anyway.
            drop(
                self.results
                    .append(&self.ctx.envelope(self.session(), event))
                    .await?,
            );
        }
        Ok(())
    }

    fn result_event(&self, is_final: bool, t: &Transcript) -> Event {
        let (epoch, segment, text) = (self.a.epoch, t.segment, t.text.clone());
        let start_ms = samples_to_ms(t.start_sample);
        let end_ms = samples_to_ms(t.end_sample);
        if is_final {
            Event::Final {
                epoch,
                segment,
                text,
                start_ms,
                end_ms,
            }
        } else {
            Event::Partial {
                epoch,
                segment,
                text,
                start_ms,
                end_ms,
            }
        }
    }

    async fn emit(&mut self, events: Vec<DecoderEvent>) -> Result<(), SessionError> {
        for event in events {
            match event {
                DecoderEvent::Partial(t) => {
                    let event = self.result_event(false, &t);
                    drop(
                        self.results
                            .append(&self.ctx.envelope(self.session(), event))
                            .await?,
                    );
                }
                DecoderEvent::Final(t) => self.append_final(&t).await?,
                DecoderEvent::ReplayPoint(p) => self.checkpoint(p).await?,
            }
        }
        Ok(())
    }

    async fn append_final(&mut self, t: &Transcript) -> Result<(), SessionError> {
        let event = self.result_event(true, t);
        self.results
            .append(&self.ctx.envelope(self.session(), event))
            .await?
            .confirmed()
            .await?;
        let last_sample = self.input.model_to_client(t.end_sample.saturating_sub(1));
        if let Some(at) = self.chunks.appended_at_ms(last_sample) {
            let latency = now_ms().saturating_sub(at) as f64 / 1000.0;
            metrics::histogram!("recognizer_result_latency_seconds").record(latency);
        }
        info!(session = %self.session(), epoch = self.a.epoch, segment = t.segment, start_ms = samples_to_ms(t.start_sample), end_ms = samples_to_ms(t.end_sample), text = %t.text, "final");
        stop_point("recognizer::after_final_before_checkpoint").await;
        Ok(())
    }

    async fn checkpoint(&mut self, p: ResumePoint) -> Result<(), SessionError> {
        let sample = self.input.model_to_client(p.session_sample);
        let at = self
            .chunks
            .locate(sample)
            .ok_or(SessionError::Unmappable { sample })?;
        let checkpoint = Checkpoint {
            epoch: self.a.epoch,
            point: ReplayPoint {
                chunk_offset: at.chunk_offset,
                chunk_seq: at.chunk_seq,
                sample_in_chunk: at.sample_in_chunk,
                session_sample: sample,
                next_segment: p.next_segment,
            },
        };
        if !self
            .ctx
            .checkpoints
            .save(self.session(), &checkpoint)
            .await?
        {
            return Err(SessionError::Fenced);
        }
        self.chunks.forget_before(sample);
        debug!(session = %self.session(), ?checkpoint, "checkpoint saved");
        stop_point("recognizer::after_checkpoint").await;
        Ok(())
    }

    /// End of the session's audio: the remaining finals, then `TranscriptCompleted`.
    async fn complete(mut self) -> Result<u32, SessionError> {
        stop_point("recognizer::end_of_stream").await;
        let tail = self.converter.finish();
        let events = on_decoder(&mut self.decoder, move |d| {
            let mut events = d.accept(&tail)?;
            events.extend(d.finish()?);
            Ok::<_, EngineError>(events)
        })
        .await??;
        self.emit(events).await?;
        let segments = self
            .decoder
            .as_ref()
            .expect("decoder present")
            .next_segment();
        self.results
            .append_confirmed(&self.ctx.envelope(
                self.session(),
                Event::TranscriptCompleted {
                    epoch: self.a.epoch,
                    segments,
                },
            ))
            .await?;
        info!(session = %self.session(), epoch = self.a.epoch, segments, "transcript completed");
        Ok(segments)
    }
}

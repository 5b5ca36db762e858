//! Bookkeeping of the audio a session task has read (pure): sequence continuity, and
//! which chunk holds a given session sample, so that a segmenter boundary becomes a
//! replay point (chunk offset, sample within it).
//!
//! Samples here are at the client's rate: replay points are stored that way.

use std::collections::VecDeque;

/// The outcome of checking one chunk's sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqCheck {
    /// The expected chunk.
    InOrder,
    /// A chunk already seen (a re-delivery); skipping it is correct.
    Duplicate { expected: u64 },
    /// Chunks are missing before this one: reported, never hidden.
    Gap { expected: u64, got: u64 },
}

/// Expects client sequence numbers one after another.
#[derive(Clone, Copy, Debug)]
pub struct SeqTracker {
    expected: u64,
}

impl SeqTracker {
    pub fn starting_at(expected: u64) -> Self {
        Self { expected }
    }

    pub fn expected(&self) -> u64 {
        self.expected
    }

    pub fn check(&mut self, seq: u64) -> SeqCheck {
        use std::cmp::Ordering::*;
        match seq.cmp(&self.expected) {
            Equal => {
                self.expected += 1;
                SeqCheck::InOrder
            }
            Less => SeqCheck::Duplicate {
                expected: self.expected,
            },
            Greater => {
                let expected = self.expected;
                self.expected = seq + 1;
                SeqCheck::Gap { expected, got: seq }
            }
        }
    }
}

/// A chunk that was read, and the session samples it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRef {
    /// Offset in the audio partition.
    pub offset: u64,
    pub seq: u64,
    /// Session sample of the chunk's first sample.
    pub first_sample: u64,
    pub samples: u64,
    /// When ingest appended it (Unix ms).
    pub appended_at_ms: u64,
}

/// Where a session sample lies, as a replay point wants it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkPosition {
    pub chunk_offset: u64,
    pub chunk_seq: u64,
    pub sample_in_chunk: u32,
}

/// The chunks read since the last replay point.
#[derive(Clone, Debug)]
pub struct ChunkMap {
    chunks: VecDeque<ChunkRef>,
    next_sample: u64,
}

impl ChunkMap {
    /// `first_sample`: the session sample the next chunk starts at.
    pub fn starting_at(first_sample: u64) -> Self {
        Self {
            chunks: VecDeque::new(),
            next_sample: first_sample,
        }
    }

    /// Records the next chunk; returns the session sample it starts at.
    pub fn push(&mut self, offset: u64, seq: u64, samples: u64, appended_at_ms: u64) -> u64 {
        let first_sample = self.next_sample;
        self.chunks.push_back(ChunkRef {
            offset,
            seq,
            first_sample,
            samples,
            appended_at_ms,
        });
        self.next_sample += samples;
        first_sample
    }

    fn holding(&self, sample: u64) -> Option<&ChunkRef> {
        self.chunks
            .iter()
            .find(|c| c.first_sample <= sample && sample < c.first_sample + c.samples)
    }

    /// The chunk holding `sample`. A sample just past everything read (a boundary at
    /// the end of the last chunk) is the last chunk's end: resuming there skips all of
    /// that chunk, which is exact without knowing the next chunk's offset.
    pub fn locate(&self, sample: u64) -> Option<ChunkPosition> {
        let chunk = self.holding(sample).or_else(|| {
            self.chunks
                .iter()
                .rev()
                .find(|c| c.first_sample + c.samples == sample)
        })?;
        Some(ChunkPosition {
            chunk_offset: chunk.offset,
            chunk_seq: chunk.seq,
            sample_in_chunk: u32::try_from(sample - chunk.first_sample).ok()?,
        })
    }

    /// When the chunk holding `sample` was appended.
    pub fn appended_at_ms(&self, sample: u64) -> Option<u64> {
        self.holding(sample).map(|c| c.appended_at_ms)
    }

    /// Forgets the chunks entirely before `sample` (after a replay point there).
    pub fn forget_before(&mut self, sample: u64) {
        while self
            .chunks
            .front()
            .is_some_and(|c| c.first_sample + c.samples <= sample && self.chunks.len() > 1)
        {
            self.chunks.pop_front();
        }
    }

    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_gaps_and_duplicates_are_told_apart() {
        let mut seq = SeqTracker::starting_at(3);
        assert_eq!(seq.check(3), SeqCheck::InOrder);
        assert_eq!(seq.check(3), SeqCheck::Duplicate { expected: 4 });
        assert_eq!(
            seq.check(6),
            SeqCheck::Gap {
                expected: 4,
                got: 6
            }
        );
        assert_eq!(seq.check(7), SeqCheck::InOrder);
        assert_eq!(seq.expected(), 8);
    }

    #[test]
    fn boundaries_map_to_chunks() {
        let mut map = ChunkMap::starting_at(1000);
        assert_eq!(map.push(10, 0, 100, 5), 1000);
        assert_eq!(map.push(14, 1, 100, 6), 1100);
        assert_eq!(map.push(15, 2, 0, 7), 1200); // an empty chunk
        assert_eq!(map.push(20, 3, 100, 8), 1200);
        let at = |o, s, i| {
            Some(ChunkPosition {
                chunk_offset: o,
                chunk_seq: s,
                sample_in_chunk: i,
            })
        };
        assert_eq!(map.locate(1000), at(10, 0, 0));
        assert_eq!(map.locate(1150), at(14, 1, 50));
        assert_eq!(map.locate(1200), at(20, 3, 0));
        assert_eq!(map.locate(1300), at(20, 3, 100), "end of the last chunk");
        assert_eq!(map.locate(999), None);
        assert_eq!(map.locate(1301), None);
        assert_eq!(map.appended_at_ms(1199), Some(6));

        map.forget_before(1150);
        assert_eq!(map.len(), 3, "the chunk holding the boundary stays");
        assert_eq!(map.locate(1150), at(14, 1, 50));
        map.forget_before(1300);
        assert_eq!(map.len(), 1, "the last chunk always stays");
        assert_eq!(map.locate(1300), at(20, 3, 100));
    }
}

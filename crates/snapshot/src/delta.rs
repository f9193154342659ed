//! Delta files: the accounts that changed between two revisions on top of one base, framed and
//! signed exactly as a base is (another magic, another header), and verified the same way
//! before anything reads them. [`pieces`] splits a feed answer that carries several files
//! (a base and the deltas after it, or only deltas) back into files.

use std::ops::Range;

use ed25519_dalek::SigningKey;
use rkyv::util::AlignedVec;
use serde::{Deserialize, Serialize};

use super::{DELTA_MAGIC, FORMAT, Framed, Framing, Header, MAGIC, SIGNATURE_LEN, SnapshotError, TrustedKeys};
use tollgate_core::model::{ArchivedDeltaData, DeltaData};

/// The signed, human-readable part of a delta file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaHeader {
    pub format: u32,
    /// The revision of the base this delta applies to.
    pub base_revision: u64,
    /// The revision a sidecar must be serving for this delta to apply.
    pub follows: u64,
    /// The revision serving once it is applied.
    pub revision: u64,
    pub key_id: String,
    /// Unix milliseconds.
    pub created_at_ms: i64,
    pub payload_len: u64,
    /// Accounts added or replaced.
    pub accounts: u64,
    /// Accounts removed.
    pub removed: u64,
}

impl Framed for DeltaHeader {
    fn format(&self) -> u32 {
        self.format
    }

    fn payload_len(&self) -> u64 {
        self.payload_len
    }
}

/// A delta whose signature, header and archive have been verified. Read zero-copy.
pub struct Delta {
    header: DeltaHeader,
    bytes: AlignedVec,
    payload: Range<usize>,
}

impl std::fmt::Debug for Delta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delta").field("header", &self.header).field("size", &self.bytes.len()).finish()
    }
}

impl Delta {
    /// Verifies a delta file's bytes: framing, trusted key, signature, the header's own
    /// consistency, then the archive and the header's counts against it.
    pub fn verify(bytes: &[u8], trusted: &TrustedKeys) -> Result<Delta, SnapshotError> {
        let mut aligned = AlignedVec::with_capacity(bytes.len());
        aligned.extend_from_slice(bytes);
        let Framing { header, payload, signed } = super::parse_framing_of::<DeltaHeader>(&aligned, DELTA_MAGIC)?;
        super::check_signature(&aligned, &header.key_id, signed, trusted)?;
        if header.base_revision > header.follows || header.follows >= header.revision {
            return Err(SnapshotError::DeltaHeader(format!(
                "it applies to base {} after revision {} to make revision {}; a delta must follow its base and move forward",
                header.base_revision, header.follows, header.revision
            )));
        }
        let archive = aligned.get(payload.clone()).ok_or(SnapshotError::Truncated(aligned.len()))?;
        let data = rkyv::access::<ArchivedDeltaData, rkyv::rancor::Error>(archive).map_err(SnapshotError::Invalid)?;
        if data.accounts.len() as u64 != header.accounts || data.removed.len() as u64 != header.removed {
            return Err(SnapshotError::DeltaHeader(format!(
                "it counts {} accounts and {} removals, but the payload holds {} and {}",
                header.accounts,
                header.removed,
                data.accounts.len(),
                data.removed.len()
            )));
        }
        Ok(Delta { header, bytes: aligned, payload })
    }

    pub fn header(&self) -> &DeltaHeader {
        &self.header
    }

    pub fn revision(&self) -> u64 {
        self.header.revision
    }

    /// Size of the delta file in bytes.
    pub fn size(&self) -> usize {
        self.bytes.len()
    }

    pub fn data(&self) -> &ArchivedDeltaData {
        let archive = self.bytes.get(self.payload.clone()).unwrap_or_default();
        // SAFETY: `archive` was validated by `rkyv::access` in `verify`, the only constructor;
        // `bytes` is never mutated afterwards, and the payload's offset is a multiple of 16
        // inside a 16-aligned buffer.
        #[expect(unsafe_code, reason = "zero-copy access after the one validation at load, as for a base")]
        unsafe {
            rkyv::access_unchecked::<ArchivedDeltaData>(archive)
        }
    }
}

/// Archives and signs a delta: `data` applied to base `base_revision` after revision `follows`
/// makes revision `revision`.
pub fn build_delta(
    data: &DeltaData,
    base_revision: u64,
    follows: u64,
    revision: u64,
    created_at_ms: i64,
    key: &SigningKey,
) -> Result<Vec<u8>, SnapshotError> {
    let payload = rkyv::to_bytes::<rkyv::rancor::Error>(data).map_err(SnapshotError::Serialize)?;
    let header = DeltaHeader {
        format: FORMAT,
        base_revision,
        follows,
        revision,
        key_id: super::key_id(&key.verifying_key()),
        created_at_ms,
        payload_len: payload.len() as u64,
        accounts: data.accounts.len() as u64,
        removed: data.removed.len() as u64,
    };
    super::frame_as(DELTA_MAGIC, &header, &payload, key)
}

/// One file of a feed answer, not yet verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece<'a> {
    Base(&'a [u8]),
    Delta(&'a [u8]),
}

/// The header of a base or a delta, read without verifying anything: for `inspect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Described {
    Base(Header),
    Delta(DeltaHeader),
}

/// Reads the header of a base or delta file, unverified.
pub fn describe(bytes: &[u8]) -> Result<Described, SnapshotError> {
    match bytes.get(..MAGIC.len()) {
        Some(magic) if magic == DELTA_MAGIC => Ok(Described::Delta(super::parse_framing_of::<DeltaHeader>(bytes, DELTA_MAGIC)?.header)),
        _ => Ok(Described::Base(super::parse_framing(bytes)?.header)),
    }
}

/// Only the length field of any header, to find where a file ends.
#[derive(Deserialize)]
struct PayloadLength {
    payload_len: u64,
}

/// Splits a feed answer into its files, in order. Each is still unverified; a malformed one
/// ends the iteration with an error.
pub fn pieces(bytes: &[u8]) -> Pieces<'_> {
    Pieces { rest: bytes, failed: false }
}

pub struct Pieces<'a> {
    rest: &'a [u8],
    failed: bool,
}

impl<'a> Pieces<'a> {
    fn next_piece(&mut self) -> Result<Piece<'a>, SnapshotError> {
        let rest = self.rest;
        let truncated = || SnapshotError::Truncated(rest.len());
        let magic = rest.get(..MAGIC.len()).ok_or_else(truncated)?;
        let is_delta = if magic == MAGIC {
            false
        } else if magic == DELTA_MAGIC {
            true
        } else {
            return Err(SnapshotError::BadMagic);
        };
        let len_bytes: [u8; 4] = rest.get(MAGIC.len()..MAGIC.len() + 4).and_then(|slice| slice.try_into().ok()).ok_or_else(truncated)?;
        let header_len = u32::from_le_bytes(len_bytes) as usize;
        if header_len == 0 || header_len > super::MAX_HEADER_LEN {
            return Err(SnapshotError::HeaderLength(header_len));
        }
        let header_end = MAGIC.len() + 4 + header_len;
        let header_bytes = rest.get(MAGIC.len() + 4..header_end).ok_or_else(truncated)?;
        let PayloadLength { payload_len } = serde_json::from_slice(header_bytes).map_err(SnapshotError::Header)?;
        let end = usize::try_from(payload_len)
            .ok()
            .and_then(|payload_len| header_end.checked_add(payload_len))
            .and_then(|end| end.checked_add(SIGNATURE_LEN))
            .filter(|end| *end <= rest.len())
            .ok_or_else(truncated)?;
        let (file, after) = rest.split_at(end);
        self.rest = after;
        Ok(if is_delta { Piece::Delta(file) } else { Piece::Base(file) })
    }
}

impl<'a> Iterator for Pieces<'a> {
    type Item = Result<Piece<'a>, SnapshotError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        let piece = self.next_piece();
        self.failed = piece.is_err();
        Some(piece)
    }
}

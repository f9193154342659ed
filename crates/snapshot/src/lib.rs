//! Signed snapshot files: the framing, ed25519 signing and verification, and [`Snapshot`],
//! the only way to hold snapshot data that has passed its signature and rkyv validation.
//! Key files are read and written here; nothing here decides anything.
//!
//! File layout (all integers little-endian):
//! `magic (8) | header_len u32 (4) | header JSON | rkyv payload | signature (64)`.
//! The header is padded with spaces so the payload starts at a multiple of 16 bytes: a file
//! read into an aligned buffer is then accessed in place, with no copy. The signature covers
//! everything before it.

use std::fmt;
use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rkyv::util::AlignedVec;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use tollgate_core::model::{ArchivedSnapshotData, SnapshotData};

mod delta;
mod view;

pub use delta::{Delta, DeltaHeader, Described, Piece, build_delta, describe, pieces};
pub use view::{ApplyError, ServingView};

const MAGIC: &[u8; 8] = b"TGSNAP\x00\x01";
/// The magic of a delta file (`delta`): the same framing, another payload.
const DELTA_MAGIC: &[u8; 8] = b"TGDELT\x00\x01";
/// Version of the archived data model; bumped whenever `model` changes shape, so an old file
/// is refused with a clear message instead of failing validation.
pub const FORMAT: u32 = 4;
const SIGNATURE_LEN: usize = 64;
/// The payload's offset in the file is a multiple of this.
const PAYLOAD_ALIGN: usize = 16;
/// Headers are a few hundred bytes; anything far larger is not ours.
const MAX_HEADER_LEN: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot is truncated: {0} bytes is shorter than its framing")]
    Truncated(usize),
    #[error("not a tollgate snapshot: bad magic bytes")]
    BadMagic,
    #[error("a delta snapshot was given where a base was expected, or a base where a delta was")]
    WrongKind,
    #[error("delta header is inconsistent: {0}")]
    DeltaHeader(String),
    #[error("snapshot format {found} is not the format this build reads ({FORMAT}); recompile it with this version")]
    Format { found: u32 },
    #[error("snapshot header length {0} is out of range or leaves the payload unaligned")]
    HeaderLength(usize),
    #[error("snapshot header is not valid: {0}")]
    Header(serde_json::Error),
    #[error("snapshot payload is {actual} bytes but its header says {expected}")]
    PayloadLength { expected: u64, actual: usize },
    #[error("snapshot is signed by key `{0}`, which is not trusted")]
    UntrustedKey(String),
    #[error("snapshot signature does not verify against key `{0}`")]
    BadSignature(String),
    #[error("snapshot payload failed validation: {0}")]
    Invalid(rkyv::rancor::Error),
    #[error("cannot serialize snapshot: {0}")]
    Serialize(rkyv::rancor::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file `{path}`: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("cannot write key file `{path}`: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("`{0}` is not a key file: expected a PEM ed25519 key (`tollgate keygen` writes them)")]
    Format(String),
    #[error("`{0}` is not a regular file of at most 64 KiB, so it is not a key file")]
    NotAKeyFile(String),
    #[error(
        "`{0}` holds a bare hexadecimal key, which does not say whether it is secret or public; write a new pair with `tollgate keygen --out DIR` (PEM files that say what they are)"
    )]
    LegacyHex(String),
    #[error("`{path}` holds {}, but {} is needed here", found.as_str(), expected.as_str())]
    WrongKind { path: String, expected: KeyKind, found: KeyKind },
    #[error("`{path}` does not hold a valid ed25519 key ({})", kind.as_str())]
    Invalid { path: String, kind: KeyKind },
    #[error("`{0}` already exists; choose another directory or pass `--force` to replace the key pair")]
    Exists(String),
    #[error("cannot encode the key as PEM")]
    Encode,
    #[error("cannot gather randomness for a new key: {0}")]
    Random(getrandom::Error),
}

/// Counts of what a snapshot holds, for `inspect` and `/v1/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub features: u64,
    pub meters: u64,
    pub plans: u64,
    pub addons: u64,
    pub roles: u64,
    pub accounts: u64,
}

/// The signed, human-readable part of a snapshot file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub format: u32,
    pub revision: u64,
    pub key_id: String,
    /// Unix milliseconds.
    pub created_at_ms: i64,
    pub payload_len: u64,
    pub counts: Counts,
}

/// A short, stable name for a public key: the first 8 bytes of its SHA-256, in hex.
pub fn key_id(key: &VerifyingKey) -> String {
    let digest = Sha256::digest(key.to_bytes());
    hex::encode(digest.get(..8).unwrap_or_default())
}

/// The public keys whose signatures a sidecar accepts.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: Vec<(String, VerifyingKey)>,
}

impl TrustedKeys {
    pub fn new(keys: impl IntoIterator<Item = VerifyingKey>) -> TrustedKeys {
        TrustedKeys { keys: keys.into_iter().map(|key| (key_id(&key), key)).collect() }
    }

    pub fn add(&mut self, key: VerifyingKey) {
        self.keys.push((key_id(&key), key));
    }

    fn find(&self, key_id: &str) -> Option<&VerifyingKey> {
        self.keys.iter().find(|(id, _)| id == key_id).map(|(_, key)| key)
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|(id, _)| id.as_str())
    }
}

/// Snapshot data whose signature and archive have been verified. Read zero-copy.
pub struct Snapshot {
    header: Header,
    /// The whole file; the archive is `bytes[payload]`.
    bytes: AlignedVec,
    payload: std::ops::Range<usize>,
}

/// A copy of a verified snapshot is still verified: the bytes are the same.
impl Clone for Snapshot {
    fn clone(&self) -> Snapshot {
        let mut bytes = AlignedVec::with_capacity(self.bytes.len());
        bytes.extend_from_slice(&self.bytes);
        Snapshot { header: self.header.clone(), bytes, payload: self.payload.clone() }
    }
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot").field("header", &self.header).field("size", &self.bytes.len()).finish()
    }
}

/// Where the parts of a signed file lie.
struct Framing<H = Header> {
    header: H,
    payload: std::ops::Range<usize>,
    signed: std::ops::Range<usize>,
}

impl Snapshot {
    /// Verifies a snapshot file's bytes: framing, trusted key, signature, then the archive.
    pub fn verify(bytes: &[u8], trusted: &TrustedKeys) -> Result<Snapshot, SnapshotError> {
        let mut aligned = AlignedVec::with_capacity(bytes.len());
        aligned.extend_from_slice(bytes);
        Snapshot::verify_owned(aligned, trusted)
    }

    /// Verifies a snapshot file already in an aligned buffer, without copying it.
    pub fn verify_owned(bytes: AlignedVec, trusted: &TrustedKeys) -> Result<Snapshot, SnapshotError> {
        let Framing { header, payload, signed } = parse_framing(&bytes)?;
        check_signature(&bytes, &header.key_id, signed, trusted)?;
        let archive = bytes.get(payload.clone()).ok_or(SnapshotError::Truncated(bytes.len()))?;
        rkyv::access::<ArchivedSnapshotData, rkyv::rancor::Error>(archive).map_err(SnapshotError::Invalid)?;
        Ok(Snapshot { header, bytes, payload })
    }

    /// Reads a snapshot file of at most [`DEFAULT_MAX_FILE_BYTES`] into an aligned buffer and
    /// verifies it.
    pub fn read_file(path: &Path, trusted: &TrustedKeys) -> Result<Snapshot, ReadError> {
        Snapshot::read_file_into(path, trusted, None, DEFAULT_MAX_FILE_BYTES)
    }

    /// Like [`Snapshot::read_file`], reading into `spare` (a retired snapshot's buffer) when it
    /// is large enough. Reusing memory that is already mapped spares the kernel faulting in a
    /// fresh buffer the size of the snapshot, which is most of what a swap costs the rest of
    /// the machine (loadtest/README.md).
    ///
    /// What is at `path` is untrusted until verified: it is opened without blocking (a FIFO
    /// does not hang the loader), must be a regular file (not a device such as `/dev/zero`
    /// behind a symlink) of at most `max_bytes`, and its framing is checked from the first
    /// bytes, so a file that is not a snapshot, or whose header disagrees with its size, is
    /// refused before memory for the whole of it is taken. The read stops at the size seen.
    pub fn read_file_into(path: &Path, trusted: &TrustedKeys, spare: Option<AlignedVec>, max_bytes: u64) -> Result<Snapshot, ReadError> {
        use std::io::{Read, Seek};
        use std::os::unix::fs::OpenOptionsExt;
        let display = || path.display().to_string();
        let read_error = |source| ReadError::Io { path: display(), source };
        let mut file =
            std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(path).map_err(read_error)?;
        let metadata = file.metadata().map_err(read_error)?;
        if !metadata.is_file() {
            return Err(ReadError::NotAFile { path: display(), kind: file_kind(&metadata) });
        }
        let len = metadata.len();
        if len > max_bytes {
            return Err(ReadError::TooLarge { path: display(), len, max: max_bytes });
        }
        let mut head = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX).min(MAGIC.len() + 4 + MAX_HEADER_LEN)];
        file.read_exact(&mut head).map_err(read_error)?;
        check_head(&head, len)?;
        file.rewind().map_err(read_error)?;
        let len = usize::try_from(len).map_err(|_| ReadError::TooLarge { path: display(), len, max: max_bytes })?;
        let mut bytes = reusable(spare, len);
        bytes.extend_from_reader(&mut file.take(len as u64)).map_err(read_error)?;
        Ok(Snapshot::verify_owned(bytes, trusted)?)
    }

    /// Like [`Snapshot::verify`], copying into `spare` when it is large enough.
    pub fn verify_into(bytes: &[u8], trusted: &TrustedKeys, spare: Option<AlignedVec>) -> Result<Snapshot, SnapshotError> {
        let mut aligned = reusable(spare, bytes.len());
        aligned.extend_from_slice(bytes);
        Snapshot::verify_owned(aligned, trusted)
    }

    /// Gives back the buffer, emptied, for the next load; the snapshot is gone.
    pub fn into_buffer(self) -> AlignedVec {
        let mut bytes = self.bytes;
        bytes.clear();
        bytes
    }

    /// Reads the header without verifying anything: for `inspect`.
    pub fn read_header(bytes: &[u8]) -> Result<Header, SnapshotError> {
        parse_framing(bytes).map(|framing| framing.header)
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn revision(&self) -> u64 {
        self.header.revision
    }

    /// Size of the snapshot file in bytes.
    pub fn size(&self) -> usize {
        self.bytes.len()
    }

    pub fn data(&self) -> &ArchivedSnapshotData {
        // `payload` lies inside `bytes`: `verify_owned` checked it.
        let archive = self.bytes.get(self.payload.clone()).unwrap_or_default();
        // SAFETY: `archive` was validated by `rkyv::access` in `verify_owned`, the only
        // constructor; `bytes` is never mutated afterwards, and the payload's offset is a
        // multiple of 16 inside a 16-aligned buffer, so the archive is well-formed and aligned.
        #[expect(unsafe_code, reason = "zero-copy access after the one validation at load is the point of the format")]
        unsafe {
            rkyv::access_unchecked::<ArchivedSnapshotData>(archive)
        }
    }
}

/// Checks that `bytes[signed]` is signed, by the trusted key `key_id`, with the signature that
/// follows it.
fn check_signature(bytes: &[u8], key_id: &str, signed: std::ops::Range<usize>, trusted: &TrustedKeys) -> Result<(), SnapshotError> {
    let key = trusted.find(key_id).ok_or_else(|| SnapshotError::UntrustedKey(key_id.to_string()))?;
    let bad_signature = || SnapshotError::BadSignature(key_id.to_string());
    let signature = bytes.get(signed.end..).and_then(|slice| Signature::from_slice(slice).ok()).ok_or_else(bad_signature)?;
    let message = bytes.get(signed).ok_or_else(bad_signature)?;
    key.verify_strict(message, &signature).map_err(|_| bad_signature())
}

/// An empty aligned buffer with room for `len` bytes: `spare` when it has the room.
fn reusable(spare: Option<AlignedVec>, len: usize) -> AlignedVec {
    match spare {
        Some(mut spare) if spare.capacity() >= len => {
            spare.clear();
            spare
        }
        _ => AlignedVec::with_capacity(len),
    }
}

/// Largest snapshot file read unless configured otherwise: 1 GiB, room for several million
/// accounts (a million take about 160 MB).
pub const DEFAULT_MAX_FILE_BYTES: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read `{path}`: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("`{path}` is {kind}, not a regular file; a snapshot is read only from a regular file")]
    NotAFile { path: String, kind: &'static str },
    #[error("`{path}` is {len} bytes, more than the largest snapshot accepted ({max} bytes; see --max-snapshot-bytes)")]
    TooLarge { path: String, len: u64, max: u64 },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

/// What kind of file `metadata` describes, in words.
fn file_kind(metadata: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let kind = metadata.file_type();
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Checks the start of a snapshot file of `len` bytes: magic, format and a header whose
/// payload length adds up to `len`. `head` is the file's first bytes (all of them when the file
/// is short).
fn check_head(head: &[u8], len: u64) -> Result<(), SnapshotError> {
    let magic = head.get(..MAGIC.len()).ok_or(SnapshotError::Truncated(head.len()))?;
    if magic != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    let len_bytes: [u8; 4] =
        head.get(MAGIC.len()..MAGIC.len() + 4).and_then(|slice| slice.try_into().ok()).ok_or(SnapshotError::Truncated(head.len()))?;
    let header_len = u32::from_le_bytes(len_bytes) as usize;
    let header_end = MAGIC.len() + 4 + header_len;
    if header_len == 0 || header_len > MAX_HEADER_LEN || !header_end.is_multiple_of(PAYLOAD_ALIGN) {
        return Err(SnapshotError::HeaderLength(header_len));
    }
    let header_bytes = head.get(MAGIC.len() + 4..header_end).ok_or(SnapshotError::Truncated(head.len()))?;
    let header: Header = serde_json::from_slice(header_bytes).map_err(SnapshotError::Header)?;
    if header.format != FORMAT {
        return Err(SnapshotError::Format { found: header.format });
    }
    let expected = (header_end as u64).saturating_add(header.payload_len).saturating_add(SIGNATURE_LEN as u64);
    if expected != len {
        let actual = usize::try_from(len.saturating_sub(header_end as u64 + SIGNATURE_LEN as u64)).unwrap_or(usize::MAX);
        return Err(SnapshotError::PayloadLength { expected: header.payload_len, actual });
    }
    Ok(())
}

/// A signed file's header: what the framing needs from it.
trait Framed: serde::de::DeserializeOwned {
    fn format(&self) -> u32;
    fn payload_len(&self) -> u64;
}

impl Framed for Header {
    fn format(&self) -> u32 {
        self.format
    }

    fn payload_len(&self) -> u64 {
        self.payload_len
    }
}

fn parse_framing(bytes: &[u8]) -> Result<Framing, SnapshotError> {
    parse_framing_of(bytes, MAGIC)
}

/// Parses the framing of a signed file whose magic is `magic` and whose header is an `H`.
fn parse_framing_of<H: Framed>(bytes: &[u8], magic: &[u8; 8]) -> Result<Framing<H>, SnapshotError> {
    let found = bytes.get(..magic.len()).ok_or(SnapshotError::Truncated(bytes.len()))?;
    if found != magic {
        return Err(if found == DELTA_MAGIC || found == MAGIC { SnapshotError::WrongKind } else { SnapshotError::BadMagic });
    }
    let len_bytes: [u8; 4] =
        bytes.get(MAGIC.len()..MAGIC.len() + 4).and_then(|slice| slice.try_into().ok()).ok_or(SnapshotError::Truncated(bytes.len()))?;
    let header_len = u32::from_le_bytes(len_bytes) as usize;
    let header_start = MAGIC.len() + 4;
    let header_end = header_start + header_len;
    if header_len == 0 || header_len > MAX_HEADER_LEN || !header_end.is_multiple_of(PAYLOAD_ALIGN) {
        return Err(SnapshotError::HeaderLength(header_len));
    }
    let header_bytes = bytes.get(header_start..header_end).ok_or(SnapshotError::Truncated(bytes.len()))?;
    let header: H = serde_json::from_slice(header_bytes).map_err(SnapshotError::Header)?;
    if header.format() != FORMAT {
        return Err(SnapshotError::Format { found: header.format() });
    }
    let signed_end =
        bytes.len().checked_sub(SIGNATURE_LEN).filter(|&end| end >= header_end).ok_or(SnapshotError::Truncated(bytes.len()))?;
    let payload_len = signed_end - header_end;
    if header.payload_len() != payload_len as u64 {
        return Err(SnapshotError::PayloadLength { expected: header.payload_len(), actual: payload_len });
    }
    Ok(Framing { header, payload: header_end..signed_end, signed: 0..signed_end })
}

/// Archives and signs snapshot data into the bytes of a snapshot file.
pub fn build(data: &SnapshotData, revision: u64, created_at_ms: i64, key: &SigningKey) -> Result<Vec<u8>, SnapshotError> {
    // Sized up front (an account archives to about 220 bytes): growing by doubling copied a
    // large archive several times over.
    let capacity = data.accounts.len().saturating_mul(256).saturating_add(1 << 16);
    let payload = rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Error>(data, rkyv::util::AlignedVec::<16>::with_capacity(capacity))
        .map_err(SnapshotError::Serialize)?;
    let header = Header {
        format: FORMAT,
        revision,
        key_id: key_id(&key.verifying_key()),
        created_at_ms,
        payload_len: payload.len() as u64,
        counts: Counts {
            features: data.features.len() as u64,
            meters: data.meters.len() as u64,
            plans: data.plans.len() as u64,
            addons: data.addons.len() as u64,
            roles: data.roles.len() as u64,
            accounts: data.accounts.len() as u64,
        },
    };
    frame(&header, &payload, key)
}

/// Lays out and signs a snapshot file from its header and archived payload.
fn frame(header: &Header, payload: &[u8], key: &SigningKey) -> Result<Vec<u8>, SnapshotError> {
    frame_as(MAGIC, header, payload, key)
}

/// Lays out and signs a file of kind `magic` from its header and archived payload.
fn frame_as(magic: &[u8; 8], header: &impl Serialize, payload: &[u8], key: &SigningKey) -> Result<Vec<u8>, SnapshotError> {
    let mut header_json = serde_json::to_vec(header).map_err(SnapshotError::Header)?;
    while !(magic.len() + 4 + header_json.len()).is_multiple_of(PAYLOAD_ALIGN) {
        header_json.push(b' ');
    }
    let mut bytes = Vec::with_capacity(magic.len() + 4 + header_json.len() + payload.len() + SIGNATURE_LEN);
    bytes.extend_from_slice(magic);
    bytes.extend_from_slice(&(header_json.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&header_json);
    bytes.extend_from_slice(payload);
    let signature = key.sign(&bytes);
    bytes.extend_from_slice(&signature.to_bytes());
    Ok(bytes)
}

/// Re-signs a snapshot file's payload under another revision (and `key`): the same data as a
/// new revision without recompiling, for load tests that swap a large snapshot every second.
/// The payload is copied as is; it is not validated here (the sidecar does that on load).
pub fn resign(bytes: &[u8], revision: u64, created_at_ms: i64, key: &SigningKey) -> Result<Vec<u8>, SnapshotError> {
    let Framing { mut header, payload, .. } = parse_framing(bytes)?;
    header.revision = revision;
    header.created_at_ms = created_at_ms;
    header.key_id = key_id(&key.verifying_key());
    frame(&header, bytes.get(payload).ok_or(SnapshotError::Truncated(bytes.len()))?, key)
}

/// A new random signing key.
pub fn generate_key() -> Result<SigningKey, KeyError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(KeyError::Random)?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Largest key file read: PEM keys are a few hundred bytes, so anything far larger is not one.
const MAX_KEY_FILE: u64 = 64 * 1024;

/// What a key file holds, by its PEM label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// `-----BEGIN PRIVATE KEY-----` (PKCS#8): signs snapshots and tokens.
    Secret,
    /// `-----BEGIN PUBLIC KEY-----` (SubjectPublicKeyInfo): verifies them.
    Public,
}

impl KeyKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            KeyKind::Secret => "a secret (private) key",
            KeyKind::Public => "a public key",
        }
    }
}

fn read_key_text(path: &Path) -> Result<String, KeyError> {
    let read_error = |source| KeyError::Read { path: path.display().to_string(), source };
    let metadata = std::fs::metadata(path).map_err(read_error)?;
    if !metadata.is_file() || metadata.len() > MAX_KEY_FILE {
        return Err(KeyError::NotAKeyFile(path.display().to_string()));
    }
    std::fs::read_to_string(path).map_err(read_error)
}

/// Which kind of key `text` holds; `Err` names what it is instead.
fn kind_of(path: &Path, text: &str) -> Result<KeyKind, KeyError> {
    if text.contains("-----BEGIN PRIVATE KEY-----") {
        return Ok(KeyKind::Secret);
    }
    if text.contains("-----BEGIN PUBLIC KEY-----") {
        return Ok(KeyKind::Public);
    }
    let trimmed = text.trim();
    if trimmed.len() == 64 && trimmed.bytes().all(|byte| byte.is_ascii_hexdigit()) {
        return Err(KeyError::LegacyHex(path.display().to_string()));
    }
    Err(KeyError::Format(path.display().to_string()))
}

/// Reads a secret key file (PKCS#8 PEM, as `tollgate keygen` writes); a public key file is
/// refused by name, so nothing is ever signed with a key that sidecars cannot trust.
pub fn read_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    use ed25519_dalek::pkcs8::DecodePrivateKey;
    let text = read_key_text(path)?;
    match kind_of(path, &text)? {
        KeyKind::Secret => {
            SigningKey::from_pkcs8_pem(&text).map_err(|_| KeyError::Invalid { path: path.display().to_string(), kind: KeyKind::Secret })
        }
        found => Err(KeyError::WrongKind { path: path.display().to_string(), expected: KeyKind::Secret, found }),
    }
}

/// Reads a public key file (SubjectPublicKeyInfo PEM); a secret key file is refused, so a
/// secret never ends up distributed as a trust anchor.
pub fn read_public_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    use ed25519_dalek::pkcs8::DecodePublicKey;
    let text = read_key_text(path)?;
    match kind_of(path, &text)? {
        KeyKind::Public => VerifyingKey::from_public_key_pem(&text)
            .map_err(|_| KeyError::Invalid { path: path.display().to_string(), kind: KeyKind::Public }),
        found => Err(KeyError::WrongKind { path: path.display().to_string(), expected: KeyKind::Public, found }),
    }
}

/// The PEM texts of a key pair: (secret PKCS#8, public SPKI).
pub fn key_pair_pem(key: &SigningKey) -> Result<(String, String), KeyError> {
    use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
    use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
    let secret = key.to_pkcs8_pem(LineEnding::LF).map_err(|_| KeyError::Encode)?;
    let public = key.verifying_key().to_public_key_pem(LineEnding::LF).map_err(|_| KeyError::Encode)?;
    Ok((secret.to_string(), public))
}

/// The file names `write_key_pair` uses inside its directory.
pub const SECRET_KEY_FILE: &str = "tollgate.key";
pub const PUBLIC_KEY_FILE: &str = "tollgate.pub";

/// Writes `DIR/tollgate.key` (PKCS#8 PEM, mode 0600) and `DIR/tollgate.pub` (SPKI PEM). An
/// existing pair is replaced only with `force`; otherwise the error says so.
pub fn write_key_pair(dir: &Path, key: &SigningKey, force: bool) -> Result<(), KeyError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let write_error = |path: &Path| {
        let path = path.display().to_string();
        move |source| KeyError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(write_error(dir))?;
    let secret_path = dir.join(SECRET_KEY_FILE);
    let public_path = dir.join(PUBLIC_KEY_FILE);
    for path in [&secret_path, &public_path] {
        if path.exists() {
            if !force {
                return Err(KeyError::Exists(path.display().to_string()));
            }
            std::fs::remove_file(path).map_err(write_error(path))?;
        }
    }
    let (secret_pem, public_pem) = key_pair_pem(key)?;
    let mut secret =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&secret_path).map_err(write_error(&secret_path))?;
    secret.write_all(secret_pem.as_bytes()).map_err(write_error(&secret_path))?;
    secret.sync_all().map_err(write_error(&secret_path))?;
    std::fs::write(&public_path, public_pem).map_err(write_error(&public_path))?;
    Ok(())
}

#[cfg(test)]
mod key_tests {
    use super::*;

    #[test]
    fn key_files_say_what_they_are_and_each_reader_refuses_the_other_kind() {
        let dir = tempfile::tempdir().unwrap();
        let key = generate_key().unwrap();
        write_key_pair(dir.path(), &key, false).unwrap();
        let secret = dir.path().join(SECRET_KEY_FILE);
        let public = dir.path().join(PUBLIC_KEY_FILE);
        assert_eq!(read_signing_key(&secret).unwrap().to_bytes(), key.to_bytes());
        assert_eq!(read_public_key(&public).unwrap(), key.verifying_key());
        let wrong = read_signing_key(&public).unwrap_err().to_string();
        assert!(wrong.contains("holds a public key") && wrong.contains("secret"), "{wrong}");
        let wrong = read_public_key(&secret).unwrap_err().to_string();
        assert!(wrong.contains("holds a secret (private) key"), "{wrong}");
        assert!(matches!(write_key_pair(dir.path(), &key, false), Err(KeyError::Exists(_))));
        let other = generate_key().unwrap();
        write_key_pair(dir.path(), &other, true).unwrap();
        assert_eq!(read_public_key(&public).unwrap(), other.verifying_key());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn bare_hex_and_garbage_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let hex_file = dir.path().join("old.key");
        std::fs::write(&hex_file, format!("{}\n", "ab".repeat(32))).unwrap();
        assert!(matches!(read_signing_key(&hex_file), Err(KeyError::LegacyHex(_))));
        let garbage = dir.path().join("garbage.pub");
        std::fs::write(&garbage, "hello").unwrap();
        assert!(matches!(read_public_key(&garbage), Err(KeyError::Format(_))));
        assert!(matches!(read_public_key(dir.path()), Err(KeyError::NotAKeyFile(_))));
        let broken = dir.path().join("broken.pub");
        std::fs::write(&broken, "-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n").unwrap();
        assert!(matches!(read_public_key(&broken), Err(KeyError::Invalid { .. })));
    }
}

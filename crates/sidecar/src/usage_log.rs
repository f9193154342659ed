//! The durable usage log in `DATA_DIR/usage/`: append-only segment files of checksummed
//! records, one per accepted metering event, written by one writer thread with group commit
//! (every event that arrives while a write is in progress goes into the next write, and one
//! `fdatasync` serves them all). An event is acknowledged only after its record is synced.
//! At start the segments are read back; a torn or corrupt tail of the last segment (a crash in
//! mid-write) is cut off. Segments whose events the control plane has counted are deleted
//! (compaction). `state.json` beside them keeps how far shipping got and the last global
//! totals. This module does file I/O only; it decides nothing.
//!
//! Record framing: `len: u32 LE | crc32(payload): u32 LE | payload`, payload a JSON
//! [`LoggedEvent`].

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};

use serde::{Deserialize, Serialize};

use crate::usage::GlobalTotal;

/// The log's folder inside the data directory.
pub const USAGE_DIR: &str = "usage";
const STATE_FILE: &str = "state.json";
const SEGMENT_SUFFIX: &str = ".log";
/// A segment is closed and a new one started past this size (small in unit tests, so that
/// rotation and compaction are reached with few events).
#[cfg(not(test))]
const SEGMENT_BYTES: u64 = 4 << 20;
#[cfg(test)]
const SEGMENT_BYTES: u64 = 64 << 10;
/// Largest record accepted when reading back (a larger length field is corruption).
const MAX_RECORD: u32 = 64 << 10;
/// Most commands folded into one write.
const MAX_GROUP: usize = 8_192;

/// One accepted metering event as it is logged and shipped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedEvent {
    /// Position in the log, assigned by the writer; shipping goes in this order.
    #[serde(default)]
    pub seq: u64,
    pub account: String,
    pub meter: String,
    pub id: String,
    pub amount: u64,
    /// The event's own time, unix seconds.
    pub at: i64,
    /// Start of the period the event belongs to, unix seconds.
    pub period_start: i64,
    /// When the sidecar accepted it, unix seconds (for the idempotency window on replay).
    pub recorded_at: i64,
}

/// How far shipping got, and the control plane's totals as of then; written atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipState {
    /// Every event with `seq` up to this has been counted by the control plane.
    pub shipped_through: u64,
    /// The usage feed cursor to send next.
    pub cursor: u64,
    pub totals: Vec<GlobalTotal>,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot use usage log folder `{path}`: {source}")]
    Folder { path: String, source: std::io::Error },
    #[error("cannot read usage log segment `{path}`: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("cannot write usage log segment `{path}`: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("usage state file `{path}` is unreadable: {message}")]
    State { path: String, message: String },
    #[error("the usage log is unusable after a failed write; restart the sidecar")]
    Broken,
    #[error("the usage log has stopped")]
    Stopped,
}

/// What was found when the log was opened.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Every readable event, in log order.
    pub events: Vec<LoggedEvent>,
    pub state: ShipState,
    /// Bytes cut off the end of the last segment (a torn write).
    pub truncated_bytes: u64,
    /// Records skipped inside older segments because they failed their checksum.
    pub corrupt_records: u64,
}

enum Command {
    Append { event: LoggedEvent, done: tokio::sync::oneshot::Sender<Result<u64, String>> },
    Barrier { done: tokio::sync::oneshot::Sender<Result<(), String>> },
    Compact { shipped_through: u64 },
    Stop,
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    last_seq: u64,
}

/// A handle on the log: appends go to the writer thread.
pub struct UsageLog {
    dir: PathBuf,
    commands: Mutex<Option<mpsc::Sender<Command>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Durable events not yet counted by the control plane, in log order; kept only when
    /// something ships them.
    pending: Arc<Mutex<VecDeque<LoggedEvent>>>,
    track_pending: bool,
    health: Arc<LogHealth>,
}

/// How the writer is doing, shared with the readers of `/readyz` and `/v1/status`.
#[derive(Debug, Default)]
struct LogHealth {
    /// A failed write could not be cut back: nothing more is appended until a restart.
    broken: AtomicBool,
    /// The last write failed (a full disk, an I/O error): events are not being acknowledged.
    /// Cleared by the next write that succeeds.
    failing: Mutex<Option<String>>,
}

impl std::fmt::Debug for UsageLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageLog").field("dir", &self.dir).finish()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave its data half-changed (each
    // critical section is a single push, drain or take), so a poisoned lock is still usable.
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}{SEGMENT_SUFFIX}")
}

fn encode(event: &LoggedEvent, out: &mut Vec<u8>) {
    // Serializing a struct of strings and integers to a Vec cannot fail.
    let payload = serde_json::to_vec(event).unwrap_or_default();
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
}

/// Reads the records of one segment; returns them and the offset where good data ends.
fn read_segment(bytes: &[u8]) -> (Vec<LoggedEvent>, usize) {
    let mut events = Vec::new();
    let mut offset = 0;
    while let Some(header) = bytes.get(offset..offset + 8) {
        let (len_bytes, crc_bytes) = header.split_at(4);
        let len = u32::from_le_bytes(len_bytes.try_into().unwrap_or_default());
        let crc = u32::from_le_bytes(crc_bytes.try_into().unwrap_or_default());
        if len == 0 || len > MAX_RECORD {
            break;
        }
        let Some(payload) = bytes.get(offset + 8..offset + 8 + len as usize) else { break };
        if crc32fast::hash(payload) != crc {
            break;
        }
        let Ok(event) = serde_json::from_slice::<LoggedEvent>(payload) else { break };
        events.push(event);
        offset += 8 + len as usize;
    }
    (events, offset)
}

fn sync_dir(dir: &Path) {
    // Makes a new or removed file name durable; a failure only weakens crash safety of the
    // name, which the next segment's sync covers, so it is logged rather than fatal.
    if let Err(error) = File::open(dir).and_then(|dir| dir.sync_all()) {
        tracing::warn!(%error, dir = %dir.display(), "cannot sync usage log folder");
    }
}

/// Reads the shipping state; a missing file is a fresh start.
fn read_state(dir: &Path) -> Result<ShipState, LogError> {
    let path = dir.join(STATE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map_err(|error| LogError::State { path: path.display().to_string(), message: error.to_string() })
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(ShipState::default()),
        Err(error) => Err(LogError::State { path: path.display().to_string(), message: error.to_string() }),
    }
}

/// Writes the shipping state through a temporary file and a rename.
pub fn write_state(data_dir: &Path, state: &ShipState) -> Result<(), LogError> {
    let dir = data_dir.join(USAGE_DIR);
    let path = dir.join(STATE_FILE);
    let write_error = |source| LogError::Write { path: path.display().to_string(), source };
    let bytes = serde_json::to_vec(state).map_err(|error| write_error(std::io::Error::other(error)))?;
    tollgate_http::fs::write_atomically(&path, &bytes).map_err(write_error)
}

/// Lists the segments of `dir` in log order.
fn list_segments(dir: &Path) -> Result<Vec<PathBuf>, LogError> {
    let folder_error = |source| LogError::Folder { path: dir.display().to_string(), source };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(folder_error)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.file_name().and_then(|name| name.to_str()).is_some_and(|name| name.ends_with(SEGMENT_SUFFIX)))
        .collect();
    paths.sort();
    Ok(paths)
}

impl UsageLog {
    /// Opens the log in `DATA_DIR/usage/`, reading back every segment and cutting off a torn
    /// tail, and starts the writer on a fresh segment. With `track_pending`, events not yet
    /// shipped (by `state.json`) are queued for the shipper.
    pub fn open(data_dir: &Path, track_pending: bool) -> Result<(UsageLog, Recovery), LogError> {
        let dir = data_dir.join(USAGE_DIR);
        std::fs::create_dir_all(&dir).map_err(|source| LogError::Folder { path: dir.display().to_string(), source })?;
        let state = read_state(&dir)?;
        let paths = list_segments(&dir)?;
        let mut recovery = Recovery { state, ..Recovery::default() };
        let mut segments = Vec::new();
        let n_paths = paths.len();
        for (path_idx, path) in paths.into_iter().enumerate() {
            let read_error = |source| LogError::Read { path: path.display().to_string(), source };
            let mut bytes = Vec::new();
            File::open(&path).and_then(|mut file| file.read_to_end(&mut bytes)).map_err(read_error)?;
            let (events, good) = read_segment(&bytes);
            let bad = (bytes.len() - good) as u64;
            if bad > 0 {
                if path_idx + 1 == n_paths {
                    // The last segment was being written when the process died: what follows the
                    // last whole record was never acknowledged.
                    tracing::warn!(path = %path.display(), bytes = bad, "cutting a torn write off the usage log");
                    OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .and_then(|file| file.set_len(good as u64).and_then(|()| file.sync_all()))
                        .map_err(|source| LogError::Write { path: path.display().to_string(), source })?;
                    recovery.truncated_bytes += bad;
                } else {
                    tracing::error!(path = %path.display(), bytes = bad, "usage log segment is corrupt past a point; its readable records are kept");
                    recovery.corrupt_records += 1;
                }
            }
            let last_seq = events.last().map_or(0, |event| event.seq);
            if events.is_empty() && bad == 0 {
                // An empty segment (started, never written): nothing to keep.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            segments.push(Segment { path, last_seq });
            recovery.events.extend(events);
        }
        let next_seq = recovery.events.iter().map(|event| event.seq).max().unwrap_or(0).max(recovery.state.shipped_through) + 1;
        let pending: VecDeque<LoggedEvent> = if track_pending {
            recovery.events.iter().filter(|event| event.seq > recovery.state.shipped_through).cloned().collect()
        } else {
            VecDeque::new()
        };
        let pending = Arc::new(Mutex::new(pending));
        let health = Arc::new(LogHealth::default());
        let mut writer = Writer::start(dir.clone(), next_seq, segments, Arc::clone(&pending), track_pending, Arc::clone(&health))?;
        let (sender, receiver) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("tollgate-usage-log".into())
            .spawn(move || writer.run(&receiver))
            .map_err(|source| LogError::Folder { path: dir.display().to_string(), source })?;
        let log = UsageLog { dir, commands: Mutex::new(Some(sender)), writer: Mutex::new(Some(thread)), pending, track_pending, health };
        Ok((log, recovery))
    }

    fn send(&self, command: Command) -> Result<(), LogError> {
        match lock(&self.commands).as_ref() {
            Some(sender) => sender.send(command).map_err(|_| LogError::Stopped),
            None => Err(LogError::Stopped),
        }
    }

    /// Queues an event for the next group write. The returned receiver answers with its
    /// sequence number once the record is synced to disk, or with the error.
    pub fn append(&self, event: LoggedEvent) -> Result<tokio::sync::oneshot::Receiver<Result<u64, String>>, LogError> {
        if self.health.broken.load(Ordering::Acquire) {
            return Err(LogError::Broken);
        }
        let (done, receiver) = tokio::sync::oneshot::channel();
        self.send(Command::Append { event, done })?;
        Ok(receiver)
    }

    /// Answers once everything queued before it is on disk.
    pub fn barrier(&self) -> Result<tokio::sync::oneshot::Receiver<Result<(), String>>, LogError> {
        let (done, receiver) = tokio::sync::oneshot::channel();
        self.send(Command::Barrier { done })?;
        Ok(receiver)
    }

    /// Up to `limit` of the oldest events not yet shipped.
    pub fn pending_front(&self, limit: usize) -> Vec<LoggedEvent> {
        lock(&self.pending).iter().take(limit).cloned().collect()
    }

    pub fn n_pending(&self) -> usize {
        lock(&self.pending).len()
    }

    /// Drops shipped events (sequence up to `through`) from the queue.
    pub fn shipped(&self, through: u64) {
        let mut pending = lock(&self.pending);
        while pending.front().is_some_and(|event| event.seq <= through) {
            pending.pop_front();
        }
    }

    /// Deletes closed segments whose every event is counted by the control plane, as
    /// recorded durably in `state.json` (never more than that, or a restart could miss events).
    pub fn compact(&self, persisted_shipped_through: u64) {
        let _ = self.send(Command::Compact { shipped_through: persisted_shipped_through });
    }

    pub fn tracks_pending(&self) -> bool {
        self.track_pending
    }

    pub fn is_broken(&self) -> bool {
        self.health.broken.load(Ordering::Acquire)
    }

    /// Why the log is not taking events now (a failed write, a broken log), if it is not.
    pub fn failure(&self) -> Option<String> {
        if self.is_broken() {
            return Some(LogError::Broken.to_string());
        }
        lock(&self.health.failing).clone()
    }

    /// Finishes queued writes and stops the writer thread.
    pub fn stop(&self) {
        if let Some(sender) = lock(&self.commands).take() {
            let _ = sender.send(Command::Stop);
        }
        if let Some(thread) = lock(&self.writer).take() {
            let _ = thread.join();
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for UsageLog {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The writer thread's state: the open segment and the closed ones.
struct Writer {
    dir: PathBuf,
    next_seq: u64,
    closed: Vec<Segment>,
    active: File,
    active_path: PathBuf,
    active_len: u64,
    active_last_seq: u64,
    pending: Arc<Mutex<VecDeque<LoggedEvent>>>,
    track_pending: bool,
    health: Arc<LogHealth>,
}

impl Writer {
    fn start(
        dir: PathBuf,
        next_seq: u64,
        closed: Vec<Segment>,
        pending: Arc<Mutex<VecDeque<LoggedEvent>>>,
        track_pending: bool,
        health: Arc<LogHealth>,
    ) -> Result<Writer, LogError> {
        let (active, active_path) = Writer::create_segment(&dir, next_seq)?;
        Ok(Writer { dir, next_seq, closed, active, active_path, active_len: 0, active_last_seq: 0, pending, track_pending, health })
    }

    fn create_segment(dir: &Path, first_seq: u64) -> Result<(File, PathBuf), LogError> {
        let path = dir.join(segment_name(first_seq));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| LogError::Write { path: path.display().to_string(), source })?;
        sync_dir(dir);
        Ok((file, path))
    }

    fn run(&mut self, receiver: &mpsc::Receiver<Command>) {
        while let Ok(first) = receiver.recv() {
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match receiver.try_recv() {
                    Ok(command) => group.push(command),
                    Err(_) => break,
                }
            }
            if !self.write_group(group) {
                return;
            }
        }
    }

    /// Writes one group with one sync and answers everyone in it; false once told to stop.
    fn write_group(&mut self, group: Vec<Command>) -> bool {
        let mut bytes = Vec::new();
        let mut appended = Vec::new();
        let mut barriers = Vec::new();
        let mut compact_through = None;
        let mut stop = false;
        for command in group {
            match command {
                Command::Append { mut event, done } => {
                    event.seq = self.next_seq;
                    self.next_seq += 1;
                    encode(&event, &mut bytes);
                    appended.push((event, done));
                }
                Command::Barrier { done } => barriers.push(done),
                Command::Compact { shipped_through } => compact_through = Some(shipped_through),
                Command::Stop => stop = true,
            }
        }
        let result = if appended.is_empty() { Ok(()) } else { self.write_synced(&bytes) };
        if result.is_ok()
            && let Some((event, _)) = appended.last()
        {
            self.active_last_seq = event.seq;
        }
        if self.active_len >= SEGMENT_BYTES {
            self.rotate();
        }
        // Before the answers, so that a barrier behind a compaction sees it done.
        if let Some(through) = compact_through {
            self.compact(through);
        }
        if !appended.is_empty() {
            *lock(&self.health.failing) = result.as_ref().err().cloned();
        }
        match result {
            Ok(()) => {
                if self.track_pending && !appended.is_empty() {
                    lock(&self.pending).extend(appended.iter().map(|(event, _)| event.clone()));
                }
                for (event, done) in appended {
                    let _ = done.send(Ok(event.seq));
                }
                for done in barriers {
                    let _ = done.send(Ok(()));
                }
            }
            Err(message) => {
                tracing::error!(error = %message, n_events = appended.len(), "usage log write failed; events not acknowledged");
                for (_, done) in appended {
                    let _ = done.send(Err(message.clone()));
                }
                for done in barriers {
                    let _ = done.send(Err(message.clone()));
                }
            }
        }
        !stop
    }

    fn write_synced(&mut self, bytes: &[u8]) -> Result<(), String> {
        let written = self.active.write_all(bytes).and_then(|()| self.active.sync_data());
        match written {
            Ok(()) => {
                self.active_len += bytes.len() as u64;
                Ok(())
            }
            Err(error) => {
                // Cut back to the last good record so the file never holds a half group that a
                // later group would follow; if even that fails the log is unusable.
                let restored = self.active.set_len(self.active_len).and_then(|()| self.active.sync_data());
                if restored.is_err() {
                    self.health.broken.store(true, Ordering::Release);
                }
                Err(format!("cannot write `{}`: {error}", self.active_path.display()))
            }
        }
    }

    fn rotate(&mut self) {
        match Writer::create_segment(&self.dir, self.next_seq) {
            Ok((file, path)) => {
                let old = std::mem::replace(&mut self.active_path, path);
                self.active = file;
                self.closed.push(Segment { path: old, last_seq: self.active_last_seq });
                self.active_len = 0;
            }
            Err(error) => tracing::warn!(%error, "cannot start a new usage log segment; continuing in the current one"),
        }
    }

    fn compact(&mut self, shipped_through: u64) {
        // The active segment, once all shipped and of some size, is closed so it can go too.
        if self.active_len > 0 && self.active_last_seq <= shipped_through && self.active_len >= SEGMENT_BYTES / 16 {
            self.rotate();
        }
        let before = self.closed.len();
        self.closed.retain(|segment| {
            if segment.last_seq > shipped_through {
                return true;
            }
            match std::fs::remove_file(&segment.path) {
                Ok(()) => false,
                Err(error) => {
                    tracing::warn!(%error, path = %segment.path.display(), "cannot delete shipped usage log segment");
                    true
                }
            }
        });
        if self.closed.len() != before {
            sync_dir(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str) -> LoggedEvent {
        LoggedEvent {
            seq: 0,
            account: "acme".into(),
            meter: "api_calls".into(),
            id: id.into(),
            amount: 2,
            at: 1_000,
            period_start: 0,
            recorded_at: 1_000,
        }
    }

    fn append_all(log: &UsageLog, ids: &[&str]) -> Vec<u64> {
        let receivers: Vec<_> = ids.iter().map(|id| log.append(event(id)).unwrap()).collect();
        receivers.into_iter().map(|receiver| receiver.blocking_recv().unwrap().unwrap()).collect()
    }

    /// A write that fails (here: to `/dev/full`, as on a full disk) is reported until a later
    /// write succeeds, and its events are not acknowledged.
    #[test]
    fn a_failing_write_is_reported_until_a_write_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let health = Arc::new(LogHealth::default());
        let pending = Arc::new(Mutex::new(VecDeque::new()));
        let mut writer = Writer::start(dir.path().to_path_buf(), 1, Vec::new(), pending, false, Arc::clone(&health)).unwrap();
        let good = std::mem::replace(&mut writer.active, OpenOptions::new().write(true).open("/dev/full").unwrap());
        let (done, answer) = tokio::sync::oneshot::channel();
        writer.write_group(vec![Command::Append { event: event("a"), done }]);
        let error = answer.blocking_recv().unwrap().unwrap_err();
        assert!(error.contains("cannot write"), "{error}");
        let failing = lock(&health.failing).clone().unwrap();
        assert!(failing.contains("No space left on device"), "{failing}");
        writer.active = good;
        let (done, answer) = tokio::sync::oneshot::channel();
        writer.write_group(vec![Command::Append { event: event("b"), done }]);
        assert!(answer.blocking_recv().unwrap().is_ok());
        assert_eq!(*lock(&health.failing), None);
    }

    #[test]
    fn events_come_back_after_a_restart_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (log, recovery) = UsageLog::open(dir.path(), true).unwrap();
        assert!(recovery.events.is_empty());
        assert_eq!(append_all(&log, &["a", "b", "c"]), [1, 2, 3]);
        assert_eq!(log.n_pending(), 3);
        log.stop();
        drop(log);
        let (log, recovery) = UsageLog::open(dir.path(), true).unwrap();
        let ids: Vec<&str> = recovery.events.iter().map(|event| event.id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(append_all(&log, &["d"]), [4], "sequence numbers continue");
    }

    #[test]
    fn a_torn_last_write_is_cut_off_and_earlier_records_survive() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = UsageLog::open(dir.path(), false).unwrap();
        append_all(&log, &["a", "b"]);
        log.stop();
        drop(log);
        let segment = list_segments(&dir.path().join(USAGE_DIR)).unwrap().pop().unwrap();
        let whole = std::fs::read(&segment).unwrap();
        // Half of a third record, as a crash in mid-write leaves it.
        let mut torn = Vec::new();
        encode(&event("c"), &mut torn);
        let mut file = OpenOptions::new().append(true).open(&segment).unwrap();
        file.write_all(&torn[..torn.len() / 2]).unwrap();
        drop(file);
        let (_log, recovery) = UsageLog::open(dir.path(), false).unwrap();
        assert_eq!(recovery.events.len(), 2);
        assert_eq!(recovery.truncated_bytes, (torn.len() / 2) as u64);
        assert_eq!(std::fs::read(&segment).unwrap(), whole, "the segment is back to its last whole record");
    }

    #[test]
    fn a_record_with_a_bad_checksum_ends_what_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = UsageLog::open(dir.path(), false).unwrap();
        append_all(&log, &["a", "b", "c"]);
        log.stop();
        drop(log);
        let segment = list_segments(&dir.path().join(USAGE_DIR)).unwrap().pop().unwrap();
        let mut bytes = std::fs::read(&segment).unwrap();
        let (events, _) = read_segment(&bytes);
        assert_eq!(events.len(), 3);
        // Flip one payload byte of the second record.
        let mut second = Vec::new();
        encode(&events[0], &mut second);
        let idx = second.len() + 12;
        bytes[idx] ^= 0x20;
        std::fs::write(&segment, &bytes).unwrap();
        let (_log, recovery) = UsageLog::open(dir.path(), false).unwrap();
        assert_eq!(recovery.events.iter().map(|event| event.id.as_str()).collect::<Vec<_>>(), ["a"]);
    }

    #[test]
    fn shipped_segments_are_deleted_and_unshipped_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = UsageLog::open(dir.path(), true).unwrap();
        // Enough events to close a few segments.
        let ids: Vec<String> = (0..3_000).map(|n| format!("event-{n:06}")).collect();
        let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        // In groups of a hundred, so segments close at predictable points.
        let seqs: Vec<u64> = id_refs.chunks(100).flat_map(|chunk| append_all(&log, chunk)).collect();
        let usage_dir = dir.path().join(USAGE_DIR);
        let n_before = list_segments(&usage_dir).unwrap().len();
        assert!(n_before >= 3, "expected several segments, found {n_before}");
        let through = seqs[2_000];
        write_state(dir.path(), &ShipState { shipped_through: through, cursor: 9, totals: Vec::new() }).unwrap();
        log.shipped(through);
        log.compact(through);
        log.barrier().unwrap().blocking_recv().unwrap().unwrap();
        assert!(list_segments(&usage_dir).unwrap().len() < n_before);
        assert_eq!(log.n_pending(), 3_000 - 2_001);
        log.stop();
        drop(log);
        let (_log, recovery) = UsageLog::open(dir.path(), true).unwrap();
        assert_eq!(recovery.state.cursor, 9);
        assert!(recovery.events.windows(2).all(|pair| pair[0].seq < pair[1].seq), "log order kept");
        let unshipped = recovery.events.iter().filter(|event| event.seq > through).count();
        assert_eq!(unshipped, 3_000 - 2_001, "no unshipped event is lost to compaction");
    }

    #[test]
    fn concurrent_appends_are_all_acknowledged_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = UsageLog::open(dir.path(), false).unwrap();
        let receivers: Vec<_> = (0..500).map(|n| log.append(event(&format!("e{n}"))).unwrap()).collect();
        let seqs: Vec<u64> = receivers.into_iter().map(|receiver| receiver.blocking_recv().unwrap().unwrap()).collect();
        assert_eq!(seqs, (1..=500).collect::<Vec<u64>>());
    }
}

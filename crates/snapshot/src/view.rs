//! The serving view: a verified base snapshot plus an overlay of the accounts that verified
//! deltas changed since. Decisions look in the overlay, then in the base; neither lookup
//! allocates, locks or blocks. Applying a delta makes a new view that shares everything it
//! does not change with the old one (the overlay is a persistent hash map), so it costs work
//! proportional to the delta, never to the base or the overlay.

use std::hash::BuildHasher;
use std::sync::Arc;

use tollgate_core::engine::{Found, Sets, View};
use tollgate_core::model::ArchivedSnapshotData;

use super::{Delta, Snapshot};

/// Where a changed account lives: the delta that carried it, and its position there.
#[derive(Clone)]
struct Changed {
    delta: Arc<Delta>,
    index: u32,
}

/// The overlay's hasher: fast, seeded at random per view.
type Hasher = foldhash::fast::RandomState;

/// Bits in the overlay's filter: 128 Ki bits (16 KiB), so with 10,000 accounts in the overlay
/// about 7% of the lookups of other accounts still consult it.
const FILTER_BITS: usize = 1 << 17;
/// The filter is split into chunks of this many words; applying a delta copies only the
/// chunks its accounts fall in.
const CHUNK_WORDS: usize = 64;
const CHUNK_BITS: usize = CHUNK_WORDS * 64;

/// One bit per hashed account id that the overlay holds (a one-hash Bloom filter): most
/// decisions are for accounts the overlay does not hold, and this lets them skip it with one
/// hash and one word read.
#[derive(Clone)]
struct Filter {
    chunks: Vec<Arc<[u64; CHUNK_WORDS]>>,
}

impl Filter {
    fn new() -> Filter {
        let empty = Arc::new([0u64; CHUNK_WORDS]);
        Filter { chunks: vec![empty; FILTER_BITS / CHUNK_BITS] }
    }

    fn position(hash: u64) -> (usize, usize, u64) {
        let bit = (hash as usize) & (FILTER_BITS - 1);
        (bit / CHUNK_BITS, (bit % CHUNK_BITS) / 64, 1u64 << (bit % 64))
    }

    fn may_hold(&self, hash: u64) -> bool {
        let (chunk, word, mask) = Filter::position(hash);
        self.chunks.get(chunk).and_then(|chunk| chunk.get(word)).is_some_and(|bits| bits & mask != 0)
    }

    fn insert(&mut self, hash: u64) {
        let (chunk, word, mask) = Filter::position(hash);
        if let Some(chunk) = self.chunks.get_mut(chunk)
            && let Some(bits) = Arc::make_mut(chunk).get_mut(word)
        {
            *bits |= mask;
        }
    }
}

/// A base and the deltas applied on it, as one view for decisions.
#[derive(Clone)]
pub struct ServingView {
    base: Arc<Snapshot>,
    /// Account id → its newest version, or `None` when a delta removed it.
    overlay: imbl::GenericHashMap<Arc<str>, Option<Changed>, Hasher, imbl::shared_ptr::DefaultSharedPtr>,
    /// Which ids the overlay may hold.
    filter: Filter,
    revision: u64,
    created_at_ms: i64,
    deltas: u64,
    /// Accounts this view answers for.
    accounts: u64,
}

impl std::fmt::Debug for ServingView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingView")
            .field("base_revision", &self.base.revision())
            .field("revision", &self.revision)
            .field("overlay", &self.overlay.len())
            .finish()
    }
}

/// Why a delta does not apply to a view. The view is untouched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("delta applies to base revision {delta_base}, but base revision {base} is serving")]
    BaseMismatch { delta_base: u64, base: u64 },
    #[error("delta revision {offered} is not newer than the serving revision {serving}")]
    NotNewer { offered: u64, serving: u64 },
    #[error("delta follows revision {follows}, but revision {serving} is serving: the deltas in between are missing")]
    Gap { follows: u64, serving: u64 },
}

impl ServingView {
    /// A base with nothing on top.
    pub fn new(base: Snapshot) -> ServingView {
        ServingView::on(Arc::new(base))
    }

    fn on(base: Arc<Snapshot>) -> ServingView {
        let (revision, created_at_ms) = (base.revision(), base.header().created_at_ms);
        let accounts = base.data().accounts.len() as u64;
        ServingView {
            base,
            overlay: imbl::GenericHashMap::with_hasher(Hasher::default()),
            filter: Filter::new(),
            revision,
            created_at_ms,
            deltas: 0,
            accounts,
        }
    }

    /// The view with `delta` applied: only on the same base, and only on exactly the revision
    /// the delta follows (a replayed, reordered or skipped delta is refused by name).
    pub fn apply(&self, delta: Delta) -> Result<ServingView, ApplyError> {
        let header = delta.header();
        let base = self.base.revision();
        if header.base_revision != base {
            return Err(ApplyError::BaseMismatch { delta_base: header.base_revision, base });
        }
        if header.revision <= self.revision {
            return Err(ApplyError::NotNewer { offered: header.revision, serving: self.revision });
        }
        if header.follows != self.revision {
            return Err(ApplyError::Gap { follows: header.follows, serving: self.revision });
        }
        let (revision, created_at_ms) = (header.revision, header.created_at_ms);
        let delta = Arc::new(delta);
        let mut next = ServingView {
            base: Arc::clone(&self.base),
            overlay: self.overlay.clone(),
            filter: self.filter.clone(),
            revision,
            created_at_ms,
            deltas: self.deltas + 1,
            accounts: self.accounts,
        };
        let data = delta.data();
        for (index, changed) in data.accounts.iter().enumerate() {
            if next.account(changed.id.as_str()).is_none() {
                next.accounts += 1;
            }
            let entry = Changed { delta: Arc::clone(&delta), index: index as u32 };
            next.hold(changed.id.as_str(), Some(entry));
        }
        for removed in data.removed.iter() {
            if next.account(removed.as_str()).is_some() {
                next.accounts = next.accounts.saturating_sub(1);
            }
            next.hold(removed.as_str(), None);
        }
        Ok(next)
    }

    /// Puts `id` in the overlay (and its filter).
    fn hold(&mut self, id: &str, entry: Option<Changed>) {
        self.filter.insert(self.overlay.hasher().hash_one(id));
        self.overlay.insert(Arc::from(id), entry);
    }

    pub fn base(&self) -> &Snapshot {
        &self.base
    }

    /// Whether `other` stands on the very same base (not a copy of it).
    pub fn same_base(&self, other: &ServingView) -> bool {
        Arc::ptr_eq(&self.base, &other.base)
    }

    /// Gives back the base, for its buffer to be reused, when nothing else holds it.
    pub fn into_base(self) -> Option<Snapshot> {
        Arc::try_unwrap(self.base).ok()
    }

    /// The revision serving: the base's, or the last delta's.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn base_revision(&self) -> u64 {
        self.base.revision()
    }

    /// Unix ms when the newest part of this view (base or delta) was made.
    pub fn created_at_ms(&self) -> i64 {
        self.created_at_ms
    }

    /// Accounts the overlay holds (changed or removed since the base).
    pub fn overlay_len(&self) -> usize {
        self.overlay.len()
    }

    /// Deltas applied on the base.
    pub fn deltas(&self) -> u64 {
        self.deltas
    }

    /// Accounts this view answers for: the base's, plus those the overlay added, minus those
    /// it removed.
    pub fn account_count(&self) -> u64 {
        self.accounts
    }
}

impl View for ServingView {
    fn catalog(&self) -> &ArchivedSnapshotData {
        self.base.data()
    }

    fn account(&self, id: &str) -> Option<Found<'_>> {
        if !self.overlay.is_empty()
            && self.filter.may_hold(self.overlay.hasher().hash_one(id))
            && let Some(entry) = self.overlay.get(id)
        {
            let Changed { delta, index } = entry.as_ref()?;
            let data = delta.data();
            let changed = data.accounts.get(*index as usize)?;
            return Some(Found {
                id: changed.id.as_str(),
                account: &changed.account,
                sets: Sets { features: &data.feature_sets, limits: &data.limit_sets },
            });
        }
        self.base.data().account(id)
    }
}

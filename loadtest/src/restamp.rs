//! Re-signs a compiled snapshot under new revision numbers, so a hot-swap run can install a
//! fresh revision every second without recompiling a million accounts each time. The
//! framing and signing are Tollgate's own (`tollgate_snapshot::resign`).

use std::path::Path;

use anyhow::{Context, Result};

/// Writes `count` copies of `snapshot` with revisions `first`, `first + 1`, … into `out_dir`
/// as `rev-NNNNNNNNNNNN.snap`, so name order is revision order.
pub fn restamp(snapshot: &Path, key: &Path, out_dir: &Path, first: u64, count: u64) -> Result<()> {
    let key = tollgate_snapshot::read_signing_key(key)?;
    let bytes = std::fs::read(snapshot).with_context(|| format!("cannot read `{}`", snapshot.display()))?;
    std::fs::create_dir_all(out_dir)?;
    let created_at_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as i64);
    for revision in first..first + count {
        let out = tollgate_snapshot::resign(&bytes, revision, created_at_ms, &key)
            .with_context(|| format!("cannot re-sign `{}`", snapshot.display()))?;
        let path = out_dir.join(format!("rev-{revision:012}.snap"));
        std::fs::write(&path, &out).with_context(|| format!("cannot write `{}`", path.display()))?;
        eprintln!("wrote {} (revision {revision})", path.display());
    }
    Ok(())
}

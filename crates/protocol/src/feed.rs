//! The snapshot feed between a sidecar and the control plane:
//! `GET /v1/snapshot?after=REV&base=BASE&wait=S` answers what brings a sidecar serving revision
//! `after` on base `base` to the newest revision (200, the revision in [`REVISION_HEADER`]):
//! the signed deltas after `after` when the sidecar holds the control plane's current base,
//! otherwise the current base followed by the deltas on it. The body is one or more signed
//! files back to back (each says its own length). 304 once `wait` seconds pass with nothing
//! newer; 409 when the sidecar is ahead.

/// The feed's path.
pub const SNAPSHOT_PATH: &str = "/v1/snapshot";
/// The query parameter naming the revision the sidecar serves.
pub const AFTER_PARAM: &str = "after";
/// The query parameter naming the base revision the sidecar's view stands on.
pub const BASE_PARAM: &str = "base";
/// The query parameter naming how long to wait for a newer revision, in seconds.
pub const WAIT_PARAM: &str = "wait";
/// The answer header carrying the revision of the snapshot sent (or the newest one on 304).
pub const REVISION_HEADER: &str = "x-tollgate-revision";
/// The answer header carrying the base revision the answer's deltas apply to.
pub const BASE_REVISION_HEADER: &str = "x-tollgate-base-revision";
/// The content type of a feed answer: signed files back to back.
pub const FEED_CONTENT_TYPE: &str = "application/vnd.tollgate.snapshot-feed";
/// The path of usage batches (`crate::usage`).
pub const USAGE_PATH: &str = "/v1/usage";

/// The path and query of one long-poll, from a sidecar serving `after` on `base` (none at all
/// before its first snapshot).
pub fn snapshot_query(after: u64, base: Option<u64>, wait_secs: u64) -> String {
    match base {
        Some(base) => format!("{SNAPSHOT_PATH}?{AFTER_PARAM}={after}&{BASE_PARAM}={base}&{WAIT_PARAM}={wait_secs}"),
        None => format!("{SNAPSHOT_PATH}?{AFTER_PARAM}={after}&{WAIT_PARAM}={wait_secs}"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_query_names_every_parameter() {
        assert_eq!(super::snapshot_query(7, None, 25), "/v1/snapshot?after=7&wait=25");
        assert_eq!(super::snapshot_query(7, Some(3), 25), "/v1/snapshot?after=7&base=3&wait=25");
    }
}

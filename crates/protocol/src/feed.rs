//! The snapshot feed between a sidecar and the control plane: `GET /v1/snapshot?after=REV&wait=S`
//! answers a signed snapshot newer than `after` (200, the revision in [`REVISION_HEADER`]),
//! or 304 once `wait` seconds pass with nothing newer, or 409 when the sidecar is ahead.

/// The feed's path.
pub const SNAPSHOT_PATH: &str = "/v1/snapshot";
/// The query parameter naming the revision the sidecar serves.
pub const AFTER_PARAM: &str = "after";
/// The query parameter naming how long to wait for a newer revision, in seconds.
pub const WAIT_PARAM: &str = "wait";
/// The answer header carrying the revision of the snapshot sent (or the newest one on 304).
pub const REVISION_HEADER: &str = "x-tollgate-revision";
/// The path of usage batches (`crate::usage`).
pub const USAGE_PATH: &str = "/v1/usage";

/// The path and query of one long-poll.
pub fn snapshot_query(after: u64, wait_secs: u64) -> String {
    format!("{SNAPSHOT_PATH}?{AFTER_PARAM}={after}&{WAIT_PARAM}={wait_secs}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_query_names_both_parameters() {
        assert_eq!(super::snapshot_query(7, 25), "/v1/snapshot?after=7&wait=25");
    }
}

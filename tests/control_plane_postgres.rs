//! The PostgreSQL repository on its own: `migrate --from-sqlite` through the real binary (every
//! table copied, counts printed and equal, ids and sequences kept, a non-empty target refused),
//! a clear error for a database that cannot be reached, and two repositories on one database
//! (two replicas) sharing one revision sequence, with order ids deduplicated by constraint.
//! Runs only with `TOLLGATE_TEST_DATABASE_URL` set; the rest of the control-plane suite runs
//! against PostgreSQL under the same variable.
#![allow(clippy::disallowed_methods, reason = "waits on real processes use wall-clock deadlines")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;
mod control_plane_support;

use std::collections::BTreeMap;
use std::sync::Arc;

use tollgate_control_plane::integration_store::{EventQuery, EventStatus, Link, ObjectState, StoredEvent};
use tollgate_control_plane::portal::store::{NewLink, NewSession, SessionKind, WebSession};
use tollgate_control_plane::postgres::PgRepository;
use tollgate_control_plane::store::{
    self, AccessKind, AccessRequest, AccessStatus, AccountDoc, AuditQuery, KeyRecord, LicenseDoc, NewAudit, OrderRecord, Repository, Scope,
    SqliteRepository, StoreError,
};
use tollgate_control_plane::usage_store::{NewEvent, TotalsQuery};
use tollgate_control_plane::webhook_store::{Endpoint, EventType, NewMessage};

use control_plane_support::{postgres_url, run_admin, with_database};

const NOW: i64 = 1_780_000_000;

/// The server URL, or `None` (and a note) when the suite is not pointed at PostgreSQL.
fn server() -> Option<String> {
    let url = postgres_url();
    if url.is_none() {
        println!("skipped: TOLLGATE_TEST_DATABASE_URL not set");
    }
    url
}

/// A new, empty database on the server; dropped when the guard goes.
struct Scratch {
    admin: String,
    name: String,
    url: String,
}

impl Scratch {
    fn new(admin: &str, label: &str) -> Scratch {
        let name = format!("tollgate_t_{}_pg_{label}", std::process::id());
        run_admin(admin, vec![format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"), format!("CREATE DATABASE \"{name}\"")]).unwrap();
        Scratch { admin: admin.to_string(), url: with_database(admin, &name), name }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = run_admin(&self.admin, vec![format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name)]);
    }
}

fn account(plan: &str, expires_at: Option<i64>) -> AccountDoc {
    AccountDoc {
        next_license: 2,
        licenses: vec![LicenseDoc { id: "l-1".into(), plan: plan.into(), seats: 3, expires_at, ..LicenseDoc::default() }],
        ..AccountDoc::default()
    }
}

/// Writes something into every table of `repository`.
fn fill(repository: &dyn Repository) {
    repository.create_key(&KeyRecord { id: "k1".into(), secret_sha256: "h1".into(), scope: Scope::Admin, account: None }, NOW).unwrap();
    repository
        .create_key(
            &KeyRecord { id: "k2".into(), secret_sha256: "h2".into(), scope: Scope::Account, account: Some("acct-b".into()) },
            NOW + 1,
        )
        .unwrap();
    assert!(repository.revoke_key("k1", "cli", NOW + 2).unwrap());
    repository.set_meta("catalog_sha256", "abc", true).unwrap();
    store::write(repository, |transaction| -> Result<(), StoreError> {
        transaction.put_webhook_endpoint(&Endpoint {
            id: "ep_1".into(),
            url: "http://127.0.0.1:9/hook".into(),
            event_types: vec![EventType::OrderApplied, EventType::LicenseExpiring],
            enabled: true,
            description: Some("test".into()),
            secret: "whsec_c2VjcmV0".into(),
            created_at: NOW,
            updated_at: NOW,
        })?;
        for (idx, id) in ["acct-a", "acct-b", "Acct-c", "acct-a-2"].iter().enumerate() {
            transaction.put_account(id, &account("team", Some(NOW + 1000 * idx as i64)))?;
            transaction.put_order(&format!("o-{idx}"), &OrderRecord { body_sha256: format!("b{idx}"), response: "{}".into() }, NOW)?;
            transaction.audit(&NewAudit {
                at: NOW,
                key_id: "k1",
                action: "order.new",
                account: Some(id),
                target: Some("o"),
                before: None,
                after: Some(serde_json::json!({"plan": "team"})),
            })?;
        }
        transaction.enqueue_message(&NewMessage {
            id: "msg_1",
            event_type: EventType::OrderApplied,
            dedup_key: Some("order/o-1"),
            body: "{\"type\":\"order.applied\"}",
            created_at: NOW,
        })?;
        transaction.put_access_request(&AccessRequest {
            id: 0,
            account: "acct-a".into(),
            user: "u".into(),
            requested_by: "u".into(),
            kind: AccessKind::Seats,
            feature: None,
            addon: None,
            seats: Some(2),
            reason: "more".into(),
            status: AccessStatus::Pending,
            decided_by: None,
            comment: None,
            until: None,
            created_at: "2026-05-28T00:00:00Z".into(),
            decided_at: None,
        })?;
        transaction.record_event(&NewEvent {
            account: "acct-a",
            meter: "api_calls",
            event_id: "e-1",
            amount: 5,
            at: NOW,
            period_start: NOW - 100,
            received_at: NOW,
            sidecar: "sc-1",
        })?;
        transaction.add_usage("acct-a", "api_calls", NOW - 100, 5, NOW)?;
        transaction.add_usage("acct-b", "api_calls", NOW - 100, 7, NOW)?;
        transaction.sidecar_batch("sc-1", NOW, 1)?;
        transaction.add_decisions(NOW / 86_400, "sso", "acct-a", "allowed", 3)?;
        transaction.add_decision_user(NOW / 86_400, "sso", "acct-a", "alice")?;
        transaction.put_integration_event(&StoredEvent {
            seq: 0,
            source: "stripe".into(),
            event_id: "evt_1".into(),
            event_type: "customer.subscription.created".into(),
            object_id: Some("sub_1".into()),
            occurred_at_ms: NOW * 1000,
            received_at: NOW,
            status: EventStatus::Applied,
            reason: None,
            account: Some("acct-a".into()),
            revision: Some(1),
            payload: "{}".into(),
        })?;
        transaction.put_integration_link(&Link {
            source: "stripe".into(),
            external_id: "cus_1".into(),
            account: "acct-a".into(),
            created_at: NOW,
        })?;
        transaction.put_integration_object(
            "stripe",
            "sub_1",
            &ObjectState { account: "acct-a".into(), last_event_id: "evt_1".into(), last_occurred_at_ms: NOW * 1000, state: "{}".into() },
        )?;
        Ok(())
    })
    .unwrap();
    repository
        .create_link(&NewLink {
            token_sha256: "t1",
            account: "acct-a",
            user: "alice",
            return_url: None,
            created_at: NOW,
            expires_at: NOW + 600,
        })
        .unwrap();
    let session = WebSession {
        kind: SessionKind::Portal,
        account: Some("acct-a".into()),
        person: "alice".into(),
        key_id: "k2".into(),
        csrf: "c".into(),
        return_url: None,
        expires_at: NOW + 3600,
    };
    repository.create_session(&NewSession { id_sha256: "s1", session: &session, created_at: NOW }).unwrap();
}

/// What a repository answers to every read, for comparing two of them.
fn reads(repository: &dyn Repository) -> BTreeMap<&'static str, String> {
    let mut reads = BTreeMap::new();
    reads.insert("keys", format!("{:?}", repository.keys().unwrap()));
    reads.insert("accounts", format!("{:?}", repository.all_accounts().unwrap()));
    reads.insert("changed", format!("{:?}", repository.accounts_changed_since(1).unwrap()));
    reads.insert("audit", format!("{:?}", repository.audit_log(&AuditQuery { account: None, after_seq: 0, limit: 100 }).unwrap()));
    reads.insert("access", format!("{:?}", repository.access_requests(None, None).unwrap()));
    reads.insert("meta", format!("{:?}", repository.meta("catalog_sha256").unwrap()));
    let totals = TotalsQuery { from: 0, to: i64::MAX, ..TotalsQuery::default() };
    reads.insert("totals", format!("{:?}", repository.usage_totals(&totals).unwrap()));
    reads.insert("events", format!("{:?}", repository.usage_events(None, 0, i64::MAX).unwrap()));
    reads.insert("decisions", format!("{:?}", repository.decision_totals(0, i64::MAX).unwrap()));
    reads.insert("users", format!("{:?}", repository.decision_users(0, i64::MAX).unwrap()));
    reads.insert("sidecars", format!("{:?}", repository.usage_sidecars().unwrap()));
    let events = EventQuery { limit: 100, ..EventQuery::default() };
    reads.insert("integration_events", format!("{:?}", repository.integration_events(&events).unwrap()));
    reads.insert("links", format!("{:?}", repository.integration_links(None, None).unwrap()));
    reads.insert("event_counts", format!("{:?}", repository.integration_event_counts().unwrap()));
    reads.insert("endpoints", format!("{:?}", repository.webhook_endpoints().unwrap()));
    reads.insert("deliveries", format!("{:?}", repository.deliveries(None, 0, 100).unwrap()));
    reads.insert("expiring", format!("{:?}", repository.expiring_licenses(0, i64::MAX, 100).unwrap()));
    reads.insert("prefix", format!("{:?}", repository.accounts_with_prefix("acct-a", 10).unwrap()));
    reads.insert("recent_audit", format!("{:?}", repository.recent_audit("acct-a", 10).unwrap()));
    reads.insert("session", format!("{:?}", repository.live_session("s1", NOW).unwrap()));
    reads
}

#[test]
fn migrate_from_sqlite_copies_every_table_and_keeps_ids() {
    let Some(admin) = server() else { return };
    let data = tempfile::tempdir().unwrap();
    let sqlite = SqliteRepository::open(data.path()).unwrap();
    fill(&sqlite);
    let expected = reads(&sqlite);
    let n_rows = |table: &str| -> u64 {
        let connection = rusqlite::Connection::open(data.path().join(store::DATABASE_FILE)).unwrap();
        connection.query_row(&format!("SELECT COUNT(*) FROM \"{table}\""), [], |row| row.get::<_, i64>(0)).unwrap() as u64
    };
    drop(sqlite);
    let target = Scratch::new(&admin, "migrate");

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["control-plane", "migrate", "--from-sqlite"])
        .arg(data.path())
        .args(["--database", &target.url])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let connection = rusqlite::Connection::open(data.path().join(store::DATABASE_FILE)).unwrap();
    let mut statement =
        connection.prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name").unwrap();
    let tables: Vec<String> = statement.query_map([], |row| row.get(0)).unwrap().collect::<Result<_, _>>().unwrap();
    assert_eq!(tables.len(), 23, "{tables:?}");
    for table in &tables {
        let count = n_rows(table);
        assert!(count > 0, "the fill leaves table `{table}` empty: the round trip would not test it");
        let line = stdout
            .lines()
            .find(|line| line.split_whitespace().next() == Some(table.as_str()))
            .unwrap_or_else(|| panic!("{table}: {stdout}"));
        assert_eq!(line.split_whitespace().nth(1), Some(count.to_string().as_str()), "{line}");
    }
    assert!(stdout.contains("every table has as many rows on both sides"), "{stdout}");

    // The PostgreSQL repository answers every read as SQLite did, ids and order included.
    let postgres = PgRepository::open(&target.url).unwrap();
    assert_eq!(reads(&postgres), expected);
    // Identity sequences continue past the copied ids.
    let request = AccessRequest { id: 0, ..postgres.access_requests(None, None).unwrap()[0].clone() };
    let new_id = store::write(&postgres, |transaction| transaction.put_access_request(&request)).unwrap();
    assert_eq!(new_id, 2);
    assert_eq!(postgres.revision().unwrap(), 2, "the revision counter was copied, not restarted");

    // A second copy into the now non-empty database is refused, naming why.
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["control-plane", "migrate", "--from-sqlite"])
        .arg(data.path())
        .args(["--database", &target.url])
        .output()
        .unwrap();
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("is not empty"), "{stderr}");
}

#[test]
fn an_unreachable_database_is_named_in_the_error() {
    let Some(_) = server() else { return };
    let error = PgRepository::open("postgres://tollgate:hunter2@127.0.0.1:1/nowhere").unwrap_err().to_string();
    assert!(error.contains("cannot reach PostgreSQL at 127.0.0.1:1/nowhere"), "{error}");
    assert!(!error.contains("hunter2"), "the password leaks: {error}");

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["control-plane", "keys", "list", "--database", "postgres://tollgate:hunter2@127.0.0.1:1/nowhere"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot reach PostgreSQL at 127.0.0.1:1/nowhere"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "the password leaks: {stderr}");
}

/// Takes order `order_id` for `account` as the control plane does: a replay answers the stored
/// response, a new order bumps the revision. Returns the revision the order carries.
fn take_order(repository: &dyn Repository, order_id: &str, account_id: &str) -> u64 {
    store::write(repository, |transaction| -> Result<u64, StoreError> {
        if let Some(order) = transaction.order(order_id)? {
            return Ok(order.response.parse().unwrap());
        }
        let revision = transaction.next_revision()?;
        transaction.put_account(account_id, &account("team", None))?;
        transaction.put_order(order_id, &OrderRecord { body_sha256: "b".into(), response: revision.to_string() }, NOW)?;
        Ok(revision)
    })
    .unwrap()
}

#[test]
fn two_replicas_share_one_revision_sequence_and_deduplicate_orders() {
    let Some(admin) = server() else { return };
    let database = Scratch::new(&admin, "replicas");
    let first: Arc<dyn Repository> = Arc::new(PgRepository::open(&database.url).unwrap());
    let second: Arc<dyn Repository> = Arc::new(PgRepository::open(&database.url).unwrap());

    // Interleaved: one sequence, no gaps, whichever replica commits.
    let revisions: Vec<u64> =
        (0..10).map(|n| take_order(if n % 2 == 0 { first.as_ref() } else { second.as_ref() }, &format!("o-{n}"), "acct-1")).collect();
    assert_eq!(revisions, (1..=10).collect::<Vec<u64>>());
    // A replay on the other replica answers the first result and moves nothing.
    assert_eq!(take_order(second.as_ref(), "o-0", "acct-1"), 1);
    assert_eq!(first.revision().unwrap(), 10);

    // At once, from threads of both replicas: every order gets its own revision.
    let threads: Vec<_> = (0..4)
        .map(|thread| {
            let repository = Arc::clone(if thread % 2 == 0 { &first } else { &second });
            std::thread::spawn(move || {
                (0..10).map(|n| take_order(repository.as_ref(), &format!("t{thread}-{n}"), &format!("acct-{thread}"))).collect::<Vec<_>>()
            })
        })
        .collect();
    let mut concurrent: Vec<u64> = threads.into_iter().flat_map(|thread| thread.join().unwrap()).collect();
    concurrent.sort_unstable();
    assert_eq!(concurrent, (11..=50).collect::<Vec<u64>>());
    assert_eq!(second.revision().unwrap(), 50);

    // The order id is unique by constraint: a write that skips the replay check is refused
    // by the database, and nothing of it is committed.
    let duplicate = store::write(second.as_ref(), |transaction| -> Result<(), StoreError> {
        transaction.next_revision()?;
        transaction.put_order("o-3", &OrderRecord { body_sha256: "x".into(), response: "x".into() }, NOW)
    })
    .unwrap_err();
    match &duplicate {
        StoreError::Postgres(error) => assert_eq!(error.code(), Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION), "{duplicate}"),
        other => panic!("expected a PostgreSQL error, got {other}"),
    }
    assert!(duplicate.to_string().contains("orders"), "the message names the statement: {duplicate}");
    assert_eq!(first.revision().unwrap(), 50, "the failed write reserved no revision");
}

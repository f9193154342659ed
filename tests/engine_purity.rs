//! The engine's purity is a property of the dependency graph: `tollgate-core` may depend only
//! on the crates listed here, none of which does I/O, runs an async runtime, logs or parses
//! JSON. A new dependency of the core crate fails this test until it is added here on purpose.
#![allow(clippy::unwrap_used, clippy::panic)]

/// What the core crate may depend on, and why each is harmless.
const ALLOWED: &[(&str, &str)] = &[
    ("rkyv", "the zero-copy archive the engine reads"),
    ("serde", "Serialize for RFC 3339 timestamps; no format crate"),
    ("time", "calendar arithmetic for monthly periods"),
];

const FORBIDDEN: &[&str] = &["tokio", "hyper", "serde_json", "tracing", "rusqlite", "dashmap", "arc-swap", "libc", "metrics"];

#[test]
fn core_depends_on_no_io_crate() {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/core/Cargo.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let manifest: toml::Table = toml::from_str(&text).unwrap();
    for section in ["dependencies", "build-dependencies"] {
        let Some(dependencies) = manifest.get(section).and_then(toml::Value::as_table) else { continue };
        for name in dependencies.keys() {
            assert!(!FORBIDDEN.contains(&name.as_str()), "tollgate-core depends on `{name}`, which does I/O, logs or parses JSON");
            assert!(
                ALLOWED.iter().any(|(allowed, _)| allowed == name),
                "tollgate-core gained dependency `{name}`: the engine must stay pure; add it to ALLOWED only with a reason"
            );
        }
    }
}

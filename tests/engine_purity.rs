//! The engine stays pure: its source names none of the crates and modules that do I/O,
//! lock, log or parse JSON. Checked on the text so that a new import fails here at once.
#![allow(clippy::unwrap_used, clippy::panic)]

#[test]
fn engine_imports_no_io_or_logging() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for file in ["engine.rs", "model.rs", "period.rs"] {
        let source = std::fs::read_to_string(root.join(file)).unwrap();
        for forbidden in [
            "tokio",
            "hyper",
            "std::net",
            "std::fs",
            "serde_json",
            "tracing",
            "std::sync::Mutex",
            "RwLock",
            "dashmap",
            "println!",
            "SystemTime",
            "Instant",
        ] {
            assert!(!source.contains(forbidden), "src/{file} mentions `{forbidden}`");
        }
    }
}

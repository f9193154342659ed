//! Copies a SQLite repository into an empty PostgreSQL one (`tollgate control-plane migrate
//! --from-sqlite DIR --database URL`): every table, column for column, in one PostgreSQL
//! transaction, keeping ids and moving identity sequences past them, then checking that every
//! table holds as many rows on both sides. Reads SQLite in one read transaction, so the copy
//! is of one commit. Must not write to the SQLite database beyond bringing its schema up to
//! date (as opening it for the control plane would).

use std::path::Path;

use rusqlite::types::Value;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;

use super::schema::TABLES;
use super::{Param, PgRepository, PgTransaction, get, statement_error};
use crate::store::{DATABASE_FILE, SqliteRepository, StoreError};

/// Rows sent to PostgreSQL per `COPY`, so a large table is never held in memory whole.
const CHUNK_ROWS: usize = 5_000;

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("no SQLite repository at `{0}` (expected the control plane's data directory, holding tollgate.db)")]
    NoSource(String),
    #[error("PostgreSQL database {target} is not empty: table `{table}` {what}; copy into a new, empty database")]
    NotEmpty { target: String, table: String, what: String },
    #[error("SQLite table `{0}` has no counterpart in the PostgreSQL schema; this binary cannot copy it")]
    UnknownTable(String),
    #[error("SQLite repository lacks table `{0}`")]
    MissingTable(String),
    #[error("SQLite `{table}.{column}` holds {found}, which PostgreSQL column type `{expected}` cannot take")]
    Value { table: String, column: String, found: String, expected: String },
    #[error("table `{table}` has {sqlite} rows in SQLite but {postgres} in PostgreSQL after the copy; nothing was committed")]
    CountMismatch { table: String, sqlite: u64, postgres: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<rusqlite::Error> for CopyError {
    fn from(error: rusqlite::Error) -> CopyError {
        CopyError::Store(StoreError::Sqlite(error))
    }
}

/// What was copied: every table with its row count (equal on both sides).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyReport {
    pub tables: Vec<(String, u64)>,
}

/// A PostgreSQL column: its name and its type.
struct Column {
    name: String,
    pg_type: Type,
}

/// Copies the repository in `source_dir` into `target`, which must be empty.
pub fn copy_from_sqlite(source_dir: &Path, target: &PgRepository) -> Result<CopyReport, CopyError> {
    let path = source_dir.join(DATABASE_FILE);
    if !path.is_file() {
        return Err(CopyError::NoSource(source_dir.display().to_string()));
    }
    // Brings the source's schema up to date, so its tables are the ones the target has.
    drop(SqliteRepository::open(source_dir)?);
    let mut sqlite = rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let source = sqlite.transaction_with_behavior(rusqlite::TransactionBehavior::Deferred)?;
    check_tables(&source)?;

    let mut transaction = PgTransaction::begin(&target.shared)?;
    check_empty(&mut transaction, target.target())?;
    // The seed rows of the single-row tables are replaced by the source's.
    transaction.execute("DELETE FROM revision", Vec::new())?;
    transaction.execute("DELETE FROM usage_sequence", Vec::new())?;
    let mut report = CopyReport { tables: Vec::with_capacity(TABLES.len()) };
    for table in TABLES {
        let columns = pg_columns(&mut transaction, table)?;
        copy_table(&source, &mut transaction, table, &columns)?;
    }
    move_sequences(&source, &mut transaction)?;
    for table in TABLES {
        let sqlite_rows: i64 = source.query_row(&format!("SELECT COUNT(*) FROM \"{table}\""), [], |row| row.get(0))?;
        let row = transaction.query_one(&format!("SELECT COUNT(*) FROM \"{table}\""), Vec::new())?;
        let postgres_rows: i64 = get(&row, 0)?;
        let (sqlite_rows, postgres_rows) = (super::to_u64(sqlite_rows), super::to_u64(postgres_rows));
        if sqlite_rows != postgres_rows {
            return Err(CopyError::CountMismatch { table: table.to_string(), sqlite: sqlite_rows, postgres: postgres_rows });
        }
        report.tables.push((table.to_string(), postgres_rows));
    }
    transaction.commit()?;
    source.commit()?;
    Ok(report)
}

/// Every SQLite table is one the PostgreSQL schema has, and the other way round.
fn check_tables(source: &rusqlite::Transaction<'_>) -> Result<(), CopyError> {
    let mut statement = source.prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")?;
    let names: Vec<String> = statement.query_map([], |row| row.get(0))?.collect::<Result<_, _>>()?;
    if let Some(unknown) = names.iter().find(|name| !TABLES.contains(&name.as_str())) {
        return Err(CopyError::UnknownTable(unknown.clone()));
    }
    if let Some(missing) = TABLES.iter().find(|table| !names.iter().any(|name| name == *table)) {
        return Err(CopyError::MissingTable((*missing).to_string()));
    }
    Ok(())
}

/// The target holds nothing but the seed rows of its migrations.
fn check_empty(transaction: &mut PgTransaction, target: &str) -> Result<(), CopyError> {
    let not_empty = |table: &str, what: String| CopyError::NotEmpty { target: target.to_string(), table: table.to_string(), what };
    for (table, column) in [("revision", "revision"), ("usage_sequence", "seq")] {
        let row = transaction.query_one(&format!("SELECT COUNT(*), COALESCE(MAX({column}), 0) FROM {table}"), Vec::new())?;
        let (count, value): (i64, i64) = (get(&row, 0)?, get(&row, 1)?);
        if count != 1 || value != 0 {
            return Err(not_empty(table, format!("is at {value}, not 0")));
        }
    }
    for table in TABLES.iter().filter(|table| !matches!(**table, "revision" | "usage_sequence")) {
        let row = transaction.query_one(&format!("SELECT COUNT(*) FROM \"{table}\""), Vec::new())?;
        let count: i64 = get(&row, 0)?;
        if count > 0 {
            return Err(not_empty(table, format!("holds {count} rows")));
        }
    }
    Ok(())
}

fn pg_columns(transaction: &mut PgTransaction, table: &str) -> Result<Vec<Column>, CopyError> {
    let rows = transaction.query(
        "SELECT a.attname::text, a.atttypid FROM pg_attribute a
         WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        pg_params![format!("\"{table}\"")],
    )?;
    rows.iter()
        .map(|row| {
            let oid: u32 = get(row, 1)?;
            let pg_type = Type::from_oid(oid).unwrap_or(Type::TEXT);
            Ok(Column { name: get(row, 0)?, pg_type })
        })
        .collect()
}

/// One SQLite value as the PostgreSQL column wants it.
fn convert(table: &str, column: &Column, value: Value) -> Result<Param, CopyError> {
    let mismatch = |found: &str| CopyError::Value {
        table: table.to_string(),
        column: column.name.clone(),
        found: found.to_string(),
        expected: column.pg_type.name().to_string(),
    };
    let param: Param = match (column.pg_type.clone(), value) {
        (Type::INT8, Value::Integer(number)) => Box::new(Some(number)),
        (Type::INT8, Value::Null) => Box::new(None::<i64>),
        (Type::BOOL, Value::Integer(number)) => Box::new(Some(number != 0)),
        (Type::BOOL, Value::Null) => Box::new(None::<bool>),
        (Type::TEXT, Value::Text(text)) => Box::new(Some(text)),
        (Type::TEXT, Value::Null) => Box::new(None::<String>),
        (_, Value::Integer(number)) => return Err(mismatch(&format!("integer {number}"))),
        (_, Value::Real(number)) => return Err(mismatch(&format!("real {number}"))),
        (_, Value::Text(_)) => return Err(mismatch("text")),
        (_, Value::Blob(_)) => return Err(mismatch("a blob")),
        (_, Value::Null) => return Err(mismatch("NULL")),
    };
    Ok(param)
}

fn copy_table(
    source: &rusqlite::Transaction<'_>,
    transaction: &mut PgTransaction,
    table: &str,
    columns: &[Column],
) -> Result<(), CopyError> {
    let names: Vec<String> = columns.iter().map(|column| format!("\"{}\"", column.name)).collect();
    let names = names.join(", ");
    let mut statement = source.prepare(&format!("SELECT {names} FROM \"{table}\""))?;
    let copy_sql = format!("COPY \"{table}\" ({names}) FROM STDIN (FORMAT binary)");
    let types: Vec<Type> = columns.iter().map(|column| column.pg_type.clone()).collect();
    let mut rows = statement.query([])?;
    let mut chunk: Vec<Vec<Param>> = Vec::with_capacity(CHUNK_ROWS);
    while let Some(row) = rows.next()? {
        let mut values = Vec::with_capacity(columns.len());
        for (idx, column) in columns.iter().enumerate() {
            values.push(convert(table, column, row.get::<_, Value>(idx)?)?);
        }
        chunk.push(values);
        if chunk.len() == CHUNK_ROWS {
            send_chunk(transaction, &copy_sql, &types, std::mem::take(&mut chunk))?;
        }
    }
    if !chunk.is_empty() {
        send_chunk(transaction, &copy_sql, &types, chunk)?;
    }
    Ok(())
}

fn send_chunk(transaction: &mut PgTransaction, copy_sql: &str, types: &[Type], rows: Vec<Vec<Param>>) -> Result<(), CopyError> {
    let client = transaction.client()?;
    let (copy_sql, types) = (copy_sql.to_string(), types.to_vec());
    transaction.shared.run(async move {
        let sink = client.copy_in(copy_sql.as_str()).await.map_err(|source| statement_error(&copy_sql, source))?;
        let writer = BinaryCopyInWriter::new(sink, &types);
        let mut writer = std::pin::pin!(writer);
        for row in &rows {
            let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                row.iter().map(|param| param.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
            writer.as_mut().write(&refs).await.map_err(|source| statement_error(&copy_sql, source))?;
        }
        writer.finish().await.map_err(|source| statement_error(&copy_sql, source))?;
        Ok(())
    })?;
    Ok(())
}

/// Moves every identity sequence past the highest id copied, and past the highest id SQLite
/// ever handed out (its `sqlite_sequence`), so no id is reused.
fn move_sequences(source: &rusqlite::Transaction<'_>, transaction: &mut PgTransaction) -> Result<(), CopyError> {
    let rows = transaction.query(
        "SELECT table_name::text, column_name::text FROM information_schema.columns
         WHERE table_schema = current_schema() AND is_identity = 'YES' ORDER BY table_name",
        Vec::new(),
    )?;
    let has_sequence_table: bool =
        source.query_row("SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence')", [], |row| row.get(0))?;
    for row in &rows {
        let (table, column): (String, String) = (get(row, 0)?, get(row, 1)?);
        let highest_row: i64 =
            source.query_row(&format!("SELECT COALESCE(MAX(\"{column}\"), 0) FROM \"{table}\""), [], |row| row.get(0))?;
        let handed_out: i64 = if has_sequence_table {
            source.query_row("SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = ?1", [&table], |row| row.get(0))?
        } else {
            0
        };
        let highest = highest_row.max(handed_out);
        if highest > 0 {
            transaction
                .query("SELECT setval(pg_get_serial_sequence($1, $2), $3)", pg_params![format!("\"{table}\""), column.clone(), highest])?;
        }
    }
    Ok(())
}

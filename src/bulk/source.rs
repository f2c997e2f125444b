//! Reading a job's targets, a chunk at a time, from where the last committed chunk ended.
//!
//! - **Uploads** (a file stored at submission): one user id per line, or CSV with a header
//!   naming the user column; gzip is recognized by its magic bytes. Read on a thread of its own
//!   (file and gzip reads block) a chunk ahead of the runner, through a channel of two chunks, so
//!   memory stays bounded whatever the file's size. The cursor is the file line number of the
//!   last target consumed.
//! - **Tables** (`{"table": …, "column": …}`): pages in column order (`WHERE column > last`), so
//!   the cursor is the last value read and a page costs one index range scan when the column is
//!   indexed (a primary or unique key is what a segment table normally has).

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, bail};
use sea_orm::{ConnectionTrait, DatabaseBackend, DatabaseConnection, Statement};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{InvalidLine, MAX_INVALID_KEPT};
use crate::domain::UserId;

/// How an upload lists its users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UploadFormat {
    /// CSV with a header row; the user ids are in one named column.
    Csv,
    /// One user id per line, no header.
    Lines,
}

impl UploadFormat {
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "csv" => Some(Self::Csv),
            "lines" => Some(Self::Lines),
            _ => None,
        }
    }
}

/// Which database a table source is read from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceDatabase {
    /// The server's own database.
    #[default]
    Server,
    /// The configured read-only `--bulk-source-url`.
    Source,
}

/// How the column's values are compared when paging: as numbers or as text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyKind {
    Integer,
    #[default]
    Text,
}

/// A table column holding user ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableSource {
    /// `table` or `schema.table`.
    pub table: String,
    pub column: String,
    #[serde(default)]
    pub database: SourceDatabase,
    /// Found at submission; not part of the request.
    #[serde(default, skip_deserializing)]
    pub key: KeyKind,
}

/// The next targets, in source order.
#[derive(Debug, Default)]
pub struct Piece {
    /// Valid user ids (possibly repeated; the runner skips duplicates).
    pub users: Vec<UserId>,
    /// Malformed lines in this piece: how many, and the first few.
    pub invalid: u64,
    pub invalid_kept: Vec<InvalidLine>,
    /// Where the source stands after this piece.
    pub cursor: String,
    /// Upload bytes (compressed, if gzip) or table rows consumed so far.
    pub progress: u64,
}

impl Piece {
    /// Targets read in this piece: valid and malformed.
    pub fn read(&self) -> u64 {
        self.users.len() as u64 + self.invalid
    }

    fn invalid_line(&mut self, line: u64, reason: String) {
        self.invalid += 1;
        if self.invalid_kept.len() < MAX_INVALID_KEPT {
            self.invalid_kept.push(InvalidLine { line, reason });
        }
    }
}

/// A job's targets, piece by piece.
pub enum Reader {
    Upload(mpsc::Receiver<anyhow::Result<Piece>>),
    Table(TableReader),
}

impl Reader {
    /// The next piece; `None` at the end.
    pub async fn next(&mut self) -> Option<anyhow::Result<Piece>> {
        match self {
            Reader::Upload(pieces) => pieces.recv().await,
            Reader::Table(table) => table.next().await.transpose(),
        }
    }
}

/// Starts reading an upload on its own thread, after line `skip_lines`.
pub fn read_upload(
    path: PathBuf,
    format: UploadFormat,
    column: Option<String>,
    skip_lines: u64,
    chunk: usize,
) -> Reader {
    let (pieces, receiver) = mpsc::channel(2);
    let spawned = std::thread::Builder::new()
        .name("bulk-reader".into())
        .spawn(move || {
            let mut send = |piece: Piece| pieces.blocking_send(Ok(piece)).is_ok();
            let outcome = match format {
                UploadFormat::Lines => read_lines(&path, skip_lines, chunk, &mut send),
                UploadFormat::Csv => read_csv(
                    &path,
                    column.as_deref().unwrap_or("user_id"),
                    skip_lines,
                    chunk,
                    &mut send,
                ),
            };
            if let Err(error) = outcome {
                let _ = pieces.blocking_send(Err(error));
            }
        });
    if let Err(error) = spawned {
        let (failed, receiver) = mpsc::channel(1);
        let _ = failed.try_send(Err(
            anyhow::Error::new(error).context("starting the upload reader")
        ));
        return Reader::Upload(receiver);
    }
    Reader::Upload(receiver)
}

/// Counts the bytes read from the file underneath any decompression.
struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Opens an upload, decompressing it if it starts with gzip's magic bytes.
fn open(path: &Path) -> anyhow::Result<(Box<dyn BufRead + Send>, Arc<AtomicU64>)> {
    let mut file = File::open(path).with_context(|| format!("opening the upload {}", path.display()))?;
    let mut magic = [0u8; 2];
    let gzip = matches!(file.read(&mut magic), Ok(2)) && magic == [0x1f, 0x8b];
    let file = File::open(path).with_context(|| format!("opening the upload {}", path.display()))?;
    let count = Arc::new(AtomicU64::new(0));
    let counting = Counting {
        inner: file,
        count: count.clone(),
    };
    let reader: Box<dyn BufRead + Send> = if gzip {
        Box::new(BufReader::with_capacity(
            1 << 16,
            flate2::read::MultiGzDecoder::new(BufReader::with_capacity(1 << 16, counting)),
        ))
    } else {
        Box::new(BufReader::with_capacity(1 << 16, counting))
    };
    Ok((reader, count))
}

/// A consumer of pieces; false once it stopped listening.
type Sink<'a> = &'a mut dyn FnMut(Piece) -> bool;

/// Reads a whole upload from its start, handing every piece to `sink` (the prepare phase).
pub fn scan_upload(
    path: &Path,
    format: UploadFormat,
    column: Option<&str>,
    sink: Sink<'_>,
) -> anyhow::Result<()> {
    const PIECE: usize = 1 << 16;
    match format {
        UploadFormat::Lines => read_lines(path, 0, PIECE, sink),
        UploadFormat::Csv => read_csv(path, column.unwrap_or("user_id"), 0, PIECE, sink),
    }
}

/// Sends `piece` (ending at file line `line`) and starts a new one; false once the job stopped
/// listening.
fn flush(piece: &mut Piece, line: u64, bytes: &AtomicU64, send: Sink<'_>) -> bool {
    piece.cursor = line.to_string();
    piece.progress = bytes.load(Ordering::Relaxed);
    send(std::mem::take(piece))
}

/// Trims a line or field and checks it is a user id.
fn target(raw: &[u8]) -> Result<Option<UserId>, String> {
    let trimmed = raw.trim_ascii();
    if trimmed.is_empty() {
        return Ok(None);
    }
    let text = std::str::from_utf8(trimmed).map_err(|_| "not valid UTF-8".to_owned())?;
    UserId::parse(text)
        .map(Some)
        .map_err(|invalid| invalid.to_string())
}

fn read_lines(path: &Path, skip_lines: u64, chunk: usize, send: Sink<'_>) -> anyhow::Result<()> {
    let (mut reader, bytes) = open(path)?;
    let mut line = Vec::with_capacity(256);
    let mut number = 0u64;
    let mut piece = Piece::default();
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .context("reading the upload")?;
        if n == 0 {
            break;
        }
        number += 1;
        if number <= skip_lines {
            continue;
        }
        match target(&line) {
            Ok(Some(user)) => piece.users.push(user),
            Ok(None) => {}
            Err(reason) => piece.invalid_line(number, reason),
        }
        if piece.read() as usize >= chunk && !flush(&mut piece, number, &bytes, &mut *send) {
            return Ok(());
        }
    }
    if piece.read() > 0 {
        flush(&mut piece, number, &bytes, send);
    }
    Ok(())
}

fn read_csv(path: &Path, column: &str, skip_lines: u64, chunk: usize, send: Sink<'_>) -> anyhow::Result<()> {
    let (reader, bytes) = open(path)?;
    let mut csv = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(reader);
    let headers = csv.byte_headers().context("reading the CSV header")?.clone();
    let Some(index) = headers
        .iter()
        .position(|name| name.trim_ascii() == column.as_bytes())
    else {
        let names: Vec<String> = headers
            .iter()
            .map(|name| String::from_utf8_lossy(name).into_owned())
            .collect();
        bail!(
            "the CSV header has no column {column:?} (it has {}); name the column with ?column=",
            names.join(", ")
        );
    };
    let mut record = csv::ByteRecord::new();
    let mut piece = Piece::default();
    let mut last_line = skip_lines;
    loop {
        let more = csv
            .read_byte_record(&mut record)
            .context("reading the CSV upload")?;
        if !more {
            break;
        }
        let line = record.position().map_or(last_line + 1, |p| p.line());
        if line <= skip_lines {
            continue;
        }
        last_line = line;
        match record.get(index).map(target) {
            Some(Ok(Some(user))) => piece.users.push(user),
            Some(Ok(None)) if record.iter().all(|f| f.trim_ascii().is_empty()) => {}
            Some(Ok(None)) => piece.invalid_line(line, format!("the {column} field is empty")),
            Some(Err(reason)) => piece.invalid_line(line, reason),
            None => piece.invalid_line(line, format!("the row has no {column} field")),
        }
        if piece.read() as usize >= chunk && !flush(&mut piece, line, &bytes, &mut *send) {
            return Ok(());
        }
    }
    if piece.read() > 0 {
        flush(&mut piece, last_line, &bytes, send);
    }
    Ok(())
}

/// `schema.table` or `table`, quoted for `backend`; refuses anything but plain identifiers.
fn quoted_name(backend: DatabaseBackend, name: &str) -> Result<String, String> {
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() > 2 {
        return Err(format!("{name:?} is not `table` or `schema.table`"));
    }
    let mut quoted = Vec::with_capacity(parts.len());
    for part in parts {
        let mut chars = part.chars();
        let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
            && part.len() <= 63;
        if !valid {
            return Err(format!(
                "{part:?} is not a plain identifier (letters, digits and _, not starting with a digit)"
            ));
        }
        quoted.push(match backend {
            DatabaseBackend::MySql => format!("`{part}`"),
            _ => format!("\"{part}\""),
        });
    }
    Ok(quoted.join("."))
}

/// Why a table source was refused at submission.
#[derive(Debug)]
pub enum TableRefusal {
    /// The client named something we cannot read: 422.
    Invalid(String),
    /// The database did not answer: 503.
    Unavailable(anyhow::Error),
}

/// Checks that the table and column exist and can be read as user ids, and finds how to page
/// them; the answer to an unknown name is a clear refusal, not a failed job.
pub async fn check_table(db: &DatabaseConnection, source: &mut TableSource) -> Result<(), TableRefusal> {
    let backend = db.get_database_backend();
    let table = quoted_name(backend, &source.table).map_err(TableRefusal::Invalid)?;
    let column = quoted_name(backend, &source.column).map_err(TableRefusal::Invalid)?;
    if source.column.contains('.') {
        return Err(TableRefusal::Invalid(
            "the column must be a plain column name".into(),
        ));
    }
    db.ping().await.map_err(|e| TableRefusal::Unavailable(e.into()))?;
    let sql = format!("SELECT {column} AS v FROM {table} WHERE {column} IS NOT NULL LIMIT 1");
    let row = db
        .query_one_raw(Statement::from_string(backend, sql))
        .await
        .map_err(|error| {
            TableRefusal::Invalid(format!(
                "cannot read column {:?} of table {:?}: {error}",
                source.column, source.table
            ))
        })?;
    source.key = match row {
        None => KeyKind::Text,
        Some(row) if row.try_get::<i64>("", "v").is_ok() => KeyKind::Integer,
        Some(row) if row.try_get::<String>("", "v").is_ok() => KeyKind::Text,
        Some(_) => {
            return Err(TableRefusal::Invalid(format!(
                "column {:?} holds neither text nor integers",
                source.column
            )));
        }
    };
    Ok(())
}

/// Reads a table column in pages, in column order.
pub struct TableReader {
    db: DatabaseConnection,
    table: String,
    column: String,
    key: KeyKind,
    /// The last value read; the next page starts after it.
    cursor: Option<String>,
    page: usize,
    rows: u64,
    done: bool,
}

impl TableReader {
    pub fn new(
        db: DatabaseConnection,
        source: &TableSource,
        cursor: Option<String>,
        rows_read: u64,
        page: usize,
    ) -> anyhow::Result<Self> {
        let backend = db.get_database_backend();
        let quote = |name: &str| quoted_name(backend, name).map_err(anyhow::Error::msg);
        Ok(Self {
            table: quote(&source.table)?,
            column: quote(&source.column)?,
            db,
            key: source.key,
            cursor,
            page: page.max(1),
            rows: rows_read,
            done: false,
        })
    }

    /// Rows in the table, for the ETA.
    pub async fn count(&self) -> anyhow::Result<u64> {
        let backend = self.db.get_database_backend();
        let sql = format!("SELECT COUNT(*) AS n FROM {}", self.table);
        let row = self
            .db
            .query_one_raw(Statement::from_string(backend, sql))
            .await
            .context("counting the source table")?;
        let n: i64 = row.map(|r| r.try_get("", "n")).transpose()?.unwrap_or(0);
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn next(&mut self) -> anyhow::Result<Option<Piece>> {
        if self.done {
            return Ok(None);
        }
        let backend = self.db.get_database_backend();
        let placeholder = if backend == DatabaseBackend::Postgres {
            "$1"
        } else {
            "?"
        };
        let (column, table, page) = (&self.column, &self.table, self.page);
        let mut values: Vec<sea_orm::Value> = Vec::new();
        let after = match &self.cursor {
            None => String::new(),
            Some(last) => {
                values.push(match self.key {
                    KeyKind::Integer => last.parse::<i64>().context("a job's integer cursor")?.into(),
                    KeyKind::Text => last.clone().into(),
                });
                format!("AND {column} > {placeholder}")
            }
        };
        let sql = format!(
            "SELECT {column} AS v FROM {table} WHERE {column} IS NOT NULL {after} ORDER BY {column} LIMIT {page}"
        );
        let rows = self
            .db
            .query_all_raw(Statement::from_sql_and_values(backend, sql, values))
            .await
            .context("reading the source table")?;
        if rows.len() < page {
            self.done = true;
        }
        if rows.is_empty() {
            return Ok(None);
        }
        let mut piece = Piece::default();
        for row in rows {
            self.rows += 1;
            let value = match self.key {
                KeyKind::Integer => row.try_get::<i64>("", "v").map(|v| v.to_string()),
                KeyKind::Text => row.try_get::<String>("", "v"),
            }
            .context("reading a source value")?;
            match target(value.as_bytes()) {
                Ok(Some(user)) => piece.users.push(user),
                Ok(None) => piece.invalid_line(self.rows, "the value is empty".into()),
                Err(reason) => piece.invalid_line(self.rows, reason),
            }
            self.cursor = Some(value);
        }
        piece.cursor = self.cursor.clone().unwrap_or_default();
        piece.progress = self.rows;
        Ok(Some(piece))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    async fn all(mut reader: Reader) -> anyhow::Result<Vec<Piece>> {
        let mut pieces = Vec::new();
        while let Some(piece) = reader.next().await {
            pieces.push(piece?);
        }
        Ok(pieces)
    }

    fn users(pieces: &[Piece]) -> Vec<String> {
        pieces
            .iter()
            .flat_map(|p| p.users.iter().map(|u| u.as_str().to_owned()))
            .collect()
    }

    #[tokio::test]
    async fn lines_are_read_in_chunks_with_malformed_lines_numbered() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("targets.txt");
        std::fs::write(&path, "alice\n\nbob\r\nhas space\ncarol\n")?;

        let pieces = all(read_upload(path, UploadFormat::Lines, None, 0, 2)).await?;

        assert_eq!(users(&pieces), ["alice", "bob", "carol"]);
        let invalid: Vec<u64> = pieces
            .iter()
            .flat_map(|p| p.invalid_kept.iter().map(|i| i.line))
            .collect();
        assert_eq!(invalid, [4], "line 4 holds a space");
        assert_eq!(pieces[0].cursor, "3", "the first piece ends at bob's line");
        Ok(())
    }

    #[tokio::test]
    async fn a_gzip_csv_resumes_after_its_cursor() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("targets.csv.gz");
        let mut gz = flate2::write::GzEncoder::new(File::create(&path)?, flate2::Compression::fast());
        gz.write_all(b"email,user_id\na@x,u1\nb@x,u2\nc@x\nd@x,u4\n")?;
        gz.finish()?;

        let pieces = all(read_upload(
            path,
            UploadFormat::Csv,
            Some("user_id".into()),
            3,
            10,
        ))
        .await?;

        assert_eq!(users(&pieces), ["u4"], "lines 1-3 were committed before");
        assert_eq!(pieces[0].invalid, 1, "c@x has no user_id");
        assert_eq!(pieces[0].cursor, "5");
        Ok(())
    }

    #[tokio::test]
    async fn a_csv_without_the_column_fails_with_the_columns_it_has() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("targets.csv");
        std::fs::write(&path, "email,name\na@x,A\n")?;

        let outcome = all(read_upload(
            path,
            UploadFormat::Csv,
            Some("user_id".into()),
            0,
            10,
        ))
        .await;

        let error = outcome.err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(
            error.contains("no column \"user_id\"") && error.contains("email"),
            "{error}"
        );
        Ok(())
    }

    #[test]
    fn only_plain_identifiers_are_quoted() {
        assert_eq!(
            quoted_name(DatabaseBackend::Postgres, "crm.segment").as_deref(),
            Ok("\"crm\".\"segment\"")
        );
        assert_eq!(quoted_name(DatabaseBackend::MySql, "t_1").as_deref(), Ok("`t_1`"));
        assert!(quoted_name(DatabaseBackend::Sqlite, "t; DROP TABLE events").is_err());
        assert!(quoted_name(DatabaseBackend::Sqlite, "a.b.c").is_err());
        assert!(quoted_name(DatabaseBackend::Sqlite, "1t").is_err());
    }
}

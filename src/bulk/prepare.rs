//! Preparing an upload before any grant is written: validate every line, then sort the valid
//! user ids and drop duplicates, in bounded memory (an external merge sort), into a file of one
//! id per line that the job then streams.
//!
//! why sort: every backend stores grants in a B-tree keyed `(event_id, user_id)`. Inserted in
//! list order, a large list of unrelated ids lands all over that tree, so each chunk dirties
//! nearly as many pages as it has rows, and once the tree outgrows the cache every commit writes
//! most of it again. In key order, each chunk appends to one end of the tree. Sorting ten
//! million ids costs seconds; the random order costs minutes.
//!
//! The consequence for a list larger than the stock: the units go to the first users in
//! user-id order, not in file order.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::source::{Piece, UploadFormat, scan_upload};
use super::{InvalidLine, MAX_INVALID_KEPT};

/// Text of user ids held in memory per sorted run. With its index and the vectors' growth, a
/// run costs up to about 3× this in RSS: at 48 MiB the server peaked at 228 MiB during a
/// 10M-user job, against a 256 MiB budget; 24 MiB leaves room (more runs to merge, which costs
/// little: the merge streams).
const RUN_BYTES: usize = 24 << 20;

/// What preparing an upload found.
#[derive(Debug)]
pub struct Prepared {
    /// One distinct, valid user id per line, in byte order.
    pub sorted: PathBuf,
    pub sorted_bytes: u64,
    /// Distinct valid targets in `sorted`.
    pub targets: u64,
    /// Targets read: valid (with duplicates) and malformed.
    pub read: u64,
    pub invalid: u64,
    pub invalid_kept: Vec<InvalidLine>,
    /// Repeats of a user id already in the list.
    pub duplicates: u64,
}

/// One sorted run being gathered: ids back to back in one buffer, plus where each starts.
#[derive(Default)]
struct Run {
    text: Vec<u8>,
    spans: Vec<(u32, u16)>,
}

impl Run {
    /// Sized for a full run up front, so the buffers never double past it.
    fn with_capacity() -> Self {
        Self {
            text: Vec::with_capacity(RUN_BYTES + 256),
            spans: Vec::with_capacity(RUN_BYTES / 12),
        }
    }

    fn push(&mut self, id: &str) {
        // Ids are at most 128 bytes; the buffer stays under u32::MAX (RUN_BYTES).
        self.spans.push((self.text.len() as u32, id.len() as u16));
        self.text.extend_from_slice(id.as_bytes());
    }

    fn id(&self, (start, len): (u32, u16)) -> &[u8] {
        &self.text[start as usize..start as usize + len as usize]
    }

    /// Sorts, drops duplicates and writes the run; returns the duplicates dropped.
    fn write(&mut self, path: &Path) -> anyhow::Result<u64> {
        let mut spans = std::mem::take(&mut self.spans);
        spans.sort_unstable_by(|a, b| self.id(*a).cmp(self.id(*b)));
        let mut out = BufWriter::with_capacity(1 << 16, File::create(path).context("creating a sort run")?);
        let mut duplicates = 0;
        let mut last: Option<&[u8]> = None;
        for &span in &spans {
            let id = self.id(span);
            if last == Some(id) {
                duplicates += 1;
                continue;
            }
            out.write_all(id)?;
            out.write_all(b"\n")?;
            last = Some(id);
        }
        out.flush().context("writing a sort run")?;
        self.text.clear();
        // Kept for the next run, with its capacity.
        spans.clear();
        self.spans = spans;
        Ok(duplicates)
    }
}

/// Reads the upload at `path`, writes its distinct valid ids sorted to `<work>.sorted`.
/// Blocking: run it on a blocking thread.
pub fn prepare(
    path: &Path,
    format: UploadFormat,
    column: Option<&str>,
    work: &Path,
) -> anyhow::Result<Prepared> {
    let run_path = |n: usize| PathBuf::from(format!("{}.run{n}", work.display()));
    let mut run = Run::with_capacity();
    let mut runs: Vec<PathBuf> = Vec::new();
    let mut read = 0u64;
    let mut invalid = 0u64;
    let mut invalid_kept = Vec::new();
    let mut duplicates = 0u64;
    let mut failed: Option<anyhow::Error> = None;
    {
        let mut take = |piece: Piece| -> bool {
            read += piece.read();
            invalid += piece.invalid;
            let room = MAX_INVALID_KEPT.saturating_sub(invalid_kept.len());
            invalid_kept.extend(piece.invalid_kept.into_iter().take(room));
            for user in &piece.users {
                run.push(user.as_str());
            }
            if run.text.len() >= RUN_BYTES {
                let next = run_path(runs.len());
                match run.write(&next) {
                    Ok(dropped) => duplicates += dropped,
                    Err(error) => {
                        failed = Some(error);
                        return false;
                    }
                }
                runs.push(next);
            }
            true
        };
        scan_upload(path, format, column, &mut take)?;
    }
    if let Some(error) = failed {
        return Err(error);
    }
    if !run.spans.is_empty() || runs.is_empty() {
        let next = run_path(runs.len());
        duplicates += run.write(&next)?;
        runs.push(next);
    }
    drop(run);
    let sorted = PathBuf::from(format!("{}.sorted", work.display()));
    let partial = PathBuf::from(format!("{}.sorted.partial", work.display()));
    let (targets, merged_duplicates) = merge(&runs, &partial)?;
    for run in &runs {
        let _ = std::fs::remove_file(run);
    }
    std::fs::rename(&partial, &sorted).context("keeping the sorted list")?;
    let sorted_bytes = std::fs::metadata(&sorted).map(|m| m.len()).unwrap_or(0);
    Ok(Prepared {
        sorted,
        sorted_bytes,
        targets,
        read,
        invalid,
        invalid_kept,
        duplicates: duplicates + merged_duplicates,
    })
}

/// Merges sorted runs into one file, dropping ids repeated across runs; returns the ids written
/// and the repeats dropped. The file is synced: the job row will point at it.
fn merge(runs: &[PathBuf], out: &Path) -> anyhow::Result<(u64, u64)> {
    let mut readers = runs
        .iter()
        .map(|p| File::open(p).map(|f| BufReader::with_capacity(1 << 16, f)))
        .collect::<Result<Vec<_>, _>>()
        .context("opening the sort runs")?;
    let mut heap = BinaryHeap::new();
    let mut line = Vec::new();
    let next = |reader: &mut BufReader<File>, line: &mut Vec<u8>| -> std::io::Result<Option<Vec<u8>>> {
        line.clear();
        if reader.read_until(b'\n', line)? == 0 {
            return Ok(None);
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        Ok(Some(line.clone()))
    };
    for (i, reader) in readers.iter_mut().enumerate() {
        if let Some(id) = next(reader, &mut line)? {
            heap.push(Reverse((id, i)));
        }
    }
    let file = File::create(out).context("creating the sorted list")?;
    let mut writer = BufWriter::with_capacity(1 << 16, file);
    let (mut written, mut duplicates) = (0u64, 0u64);
    let mut last: Option<Vec<u8>> = None;
    while let Some(Reverse((id, i))) = heap.pop() {
        if let Some(more) = next(&mut readers[i], &mut line)? {
            heap.push(Reverse((more, i)));
        }
        if last.as_ref() == Some(&id) {
            duplicates += 1;
            continue;
        }
        writer.write_all(&id)?;
        writer.write_all(b"\n")?;
        written += 1;
        last = Some(id);
    }
    let file = writer
        .into_inner()
        .map_err(|e| e.into_error())
        .context("writing the sorted list")?;
    file.sync_all().context("syncing the sorted list")?;
    Ok((written, duplicates))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_within_and_across_runs_are_dropped_and_the_rest_sorted() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let runs = [dir.path().join("r0"), dir.path().join("r1")];
        for (path, ids) in runs.iter().zip([["b", "d", "d"], ["a", "b", "c"]]) {
            let mut run = Run::default();
            for id in ids {
                run.push(id);
            }
            assert_eq!(run.write(path)?, u64::from(ids == ["b", "d", "d"]));
        }
        let out = dir.path().join("sorted");

        let (written, duplicates) = merge(&runs, &out)?;

        assert_eq!(std::fs::read_to_string(&out)?, "a\nb\nc\nd\n");
        assert_eq!((written, duplicates), (4, 1), "b was in both runs");
        Ok(())
    }

    #[test]
    fn an_upload_is_validated_counted_and_sorted() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let upload = dir.path().join("upload");
        std::fs::write(&upload, "zed\namy\n\nbad id\namy\nbob\n")?;

        let prepared = prepare(&upload, UploadFormat::Lines, None, &dir.path().join("work"))?;

        assert_eq!(std::fs::read_to_string(&prepared.sorted)?, "amy\nbob\nzed\n");
        assert_eq!(
            (
                prepared.read,
                prepared.targets,
                prepared.invalid,
                prepared.duplicates
            ),
            (5, 3, 1, 1)
        );
        assert_eq!(prepared.invalid_kept[0].line, 4);
        Ok(())
    }
}

//! `mui-bench-reader`: the CPU time of ingest's passes over one file, without any service:
//! the first pass (`reader::sniff`: hash, encoding, limits), the check pass (the rows read
//! keeping only the key and `active`, as the check before publishing reads them) and the
//! chunk pass (the rows read and each chunk encoded as the message a worker gets). Each pass
//! is timed on its own, the best of `--repeat` runs, on a file generated as `mui-bench`
//! generates it. Then the worker's CPU part of importing those chunks, also without any
//! service: decoding each chunk message, and decoding and checking its rows (the row checks,
//! the digests, the repeats within the chunk), as `mui-bench`'s tenant is set up.
//!
//!     cargo run --release -p mui-tests --bin mui-bench-reader -- --rows 1000000

use std::io::{Seek, SeekFrom};
use std::time::{Duration, Instant};

use clap::Parser;

/// The services' allocator, so that the passes allocate as they do in ingest and the workers.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use mui_ingest::reader::{self, Chunking, Limits};
use mui_shared::domain::{Column, HeaderMap, ImportFileId, TenantId};
use mui_shared::messages::{self, Chunk, WorkMessage};
use mui_worker::import::check_rows;
use mui_worker::validate::TenantRules;

#[derive(Debug, Parser)]
#[command(about = "Times ingest's passes over one generated file (no services needed)")]
struct Args {
    /// Data rows of the generated file.
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    /// Runs of each pass; the best is printed.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
}

fn best(repeat: u32, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Duration> {
    let mut best = Duration::MAX;
    for _ in 0..repeat.max(1) {
        let start = Instant::now();
        f()?;
        best = best.min(start.elapsed());
    }
    Ok(best)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("users.csv");
    mui_tests::bench::generate(&path, args.rows, 1000)?;
    let mut file = std::fs::File::open(&path)?;
    let size = file.metadata()?.len();
    let sniff = reader::sniff(&mut file, None)?;
    let chunking = Chunking::rows(5000);
    let limits = Limits::default();

    let first = best(args.repeat, || {
        reader::sniff(&mut file, None)?;
        Ok(())
    })?;
    let check = best(args.repeat, || {
        file.seek(SeekFrom::Start(0))?;
        let mut n = 0u64;
        reader::read_chunks_keeping(
            &mut file,
            &sniff,
            limits,
            chunking,
            &[],
            Some(&[Column::UniqueId, Column::Active]),
            |_, _, _| {},
            |_, _, _, rows| {
                n += rows.len() as u64;
                Ok(())
            },
        )?
        .map_err(|p| anyhow::anyhow!("{p}"))?;
        anyhow::ensure!(n == args.rows, "read {n} rows, not {}", args.rows);
        Ok(())
    })?;
    let mut payloads: Vec<Vec<u8>> = Vec::new();
    let chunks = best(args.repeat, || {
        file.seek(SeekFrom::Start(0))?;
        payloads.clear();
        let mut bytes = 0usize;
        reader::read_chunks(
            &mut file,
            &sniff,
            limits,
            chunking,
            |_, _, _| {},
            |chunk_no, header, _, rows| {
                let msg = WorkMessage::ChunkV1(Chunk {
                    file_id: ImportFileId(1),
                    tenant_id: TenantId(1),
                    chunk_no,
                    header: header.to_vec(),
                    repeated: Some(Vec::new()),
                    rows,
                });
                let payload = messages::encode(&msg).map_err(std::io::Error::other)?;
                bytes += payload.len();
                payloads.push(payload);
                Ok(())
            },
        )?
        .map_err(|p| anyhow::anyhow!("{p}"))?;
        anyhow::ensure!(bytes > 0, "no chunk encoded");
        Ok(())
    })?;
    let rules = TenantRules::new(vec!["sso".into()], vec!["1".into(), "2".into()]);
    let decode = best(args.repeat, || {
        for p in &payloads {
            std::hint::black_box(messages::decode_work(p)?);
        }
        Ok(())
    })?;
    let mut good = 0usize;
    let checked = best(args.repeat, || {
        good = 0;
        for p in &payloads {
            let WorkMessage::ChunkV1(chunk) = messages::decode_work(p)? else {
                anyhow::bail!("not a chunk");
            };
            let map = HeaderMap::parse(&chunk.header)?;
            good += check_rows(&chunk, &map, &rules).good.len();
        }
        Ok(())
    })?;
    anyhow::ensure!(good > 0, "no row passed the checks");
    let mib = size as f64 / f64::from(1 << 20);
    println!("file: {} rows, {mib:.1} MiB", args.rows);
    for (name, took) in [
        ("first pass (sniff)", first),
        ("check pass (rows read)", check),
        ("chunk pass (rows read, chunks encoded)", chunks),
        ("worker: chunks decoded", decode),
        ("worker: chunks decoded, rows checked", checked),
    ] {
        let s = took.as_secs_f64();
        println!("{name:<40} {s:>7.3} s  {:>7.1} MiB/s", mib / s);
    }
    Ok(())
}

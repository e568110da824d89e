//! Where a job's PNGs should live when several servers share a PostgreSQL: in the shared jobs
//! folder (what the server does: `disk::write_durably`, the row naming the file) or in the
//! database (a `bytea` row written in the transaction that would complete the item). Writes
//! `--count` PNGs (default 10 000; the 12 test fixtures at their own sizes with seeded noise, so
//! none compresses away) each way, with 1 and 4 writers, against a throwaway cluster run as a
//! production server runs (fsync, full-page writes and synchronous commits on); then reads
//! 1 000 at random each way and deletes them all.
//!
//!     cargo bench --bench result_store -- [--count 10000]
//!
//! Prints a Markdown table: PNGs per second, p50/p99 per write, bytes held (the folder's files;
//! the table with its TOAST and indexes, and the WAL written).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

mod common;
#[path = "../tests/common/mod.rs"]
mod harness;

use common::{arg, median};
use harness::pg::PgCluster;
use rand::{Rng, SeedableRng};

fn pngs() -> Vec<Vec<u8>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(34);
    harness::sample_images()
        .iter()
        .map(|p| {
            let mut img = image::open(p).unwrap().to_rgb8();
            for px in img.pixels_mut() {
                for c in px.0.iter_mut() {
                    *c = c.saturating_add(rng.random_range(0..3));
                }
            }
            let mut out = std::io::Cursor::new(Vec::new());
            img.write_to(&mut out, image::ImageFormat::Png).unwrap();
            out.into_inner()
        })
        .collect()
}

fn du(dir: &Path) -> u64 {
    labelfool::jobs::disk::usage(dir)
}

struct Row {
    how: String,
    writers: usize,
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    bytes: u64,
    extra: String,
}

fn p99(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

fn main() {
    let count: usize = arg("--count").and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let pngs = Arc::new(pngs());
    let mean = pngs.iter().map(Vec::len).sum::<usize>() / pngs.len();
    let mut rows = Vec::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    for writers in [1, 4] {
        // (a) files in the jobs folder, each synced and renamed, its folder synced.
        let dir = tempfile::tempdir_in(std::env::var("TMPDIR").unwrap_or_else(|_| "/var/tmp".into())).unwrap();
        let started = Instant::now();
        let times: Vec<f64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..writers)
                .map(|w| {
                    let (pngs, root) = (pngs.clone(), dir.path().to_path_buf());
                    s.spawn(move || {
                        (0..count)
                            .filter(|i| i % writers == w)
                            .map(|i| {
                                let path = root.join(format!("job/images/m/labelfool/{:03}/{i}.png", i % 100));
                                let t = Instant::now();
                                labelfool::jobs::disk::write_durably(&path, &pngs[i % pngs.len()]).unwrap();
                                t.elapsed().as_secs_f64() * 1e3
                            })
                            .collect::<Vec<f64>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let secs = started.elapsed().as_secs_f64();
        let bytes = du(dir.path());
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let t = Instant::now();
        for _ in 0..1000 {
            let i = rng.random_range(0..count);
            std::fs::read(dir.path().join(format!("job/images/m/labelfool/{:03}/{i}.png", i % 100))).unwrap();
        }
        let read_ms = t.elapsed().as_secs_f64();
        let t = Instant::now();
        std::fs::remove_dir_all(dir.path().join("job")).unwrap();
        let delete = t.elapsed().as_secs_f64();
        rows.push(Row {
            how: "folder".into(),
            writers,
            per_second: count as f64 / secs,
            p50_ms: median(times.clone()),
            p99_ms: p99(times),
            bytes,
            extra: format!("1 000 random reads {read_ms:.2} s, delete all {delete:.2} s"),
        });

        // (b) bytea rows, one transaction each.
        let cluster = PgCluster::start_with(true);
        let dsn = cluster.database("files");
        rows.push(rt.block_on(bytea(&dsn, pngs.clone(), count, writers)));
    }
    println!("{count} PNGs of {} KiB on average (the 12 fixtures with noise), this machine:\n", mean / 1024);
    println!("| where | writers | PNGs/s | p50 write (ms) | p99 write (ms) | bytes held | |");
    println!("|---|---:|---:|---:|---:|---:|---|");
    for r in rows {
        println!(
            "| {} | {} | {:.0} | {:.1} | {:.1} | {:.2} GB | {} |",
            r.how,
            r.writers,
            r.per_second,
            r.p50_ms,
            r.p99_ms,
            r.bytes as f64 / 1e9,
            r.extra
        );
    }
}

async fn connect(dsn: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    c
}

async fn wal_lsn(c: &tokio_postgres::Client) -> String {
    c.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.unwrap().get(0)
}

async fn bytea(dsn: &str, pngs: Arc<Vec<Vec<u8>>>, count: usize, writers: usize) -> Row {
    let c = connect(dsn).await;
    c.batch_execute(
        "CREATE TABLE files (path TEXT PRIMARY KEY, bytes BYTEA NOT NULL, size BIGINT NOT NULL, created_ms BIGINT NOT NULL);
         ALTER TABLE files ALTER bytes SET STORAGE EXTERNAL;",
    )
    .await
    .unwrap();
    let before = wal_lsn(&c).await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (dsn, pngs) = (dsn.to_string(), pngs.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = connect(&dsn).await;
            let mut times = Vec::new();
            for i in (0..count).filter(|i| i % writers == w) {
                let png = &pngs[i % pngs.len()];
                let t = Instant::now();
                let tx = c.transaction().await.unwrap();
                tx.execute(
                    "INSERT INTO files (path, bytes, size, created_ms) VALUES ($1, $2, $3, 0)",
                    &[&format!("job/images/m/labelfool/{i}.png"), &png.as_slice(), &(png.len() as i64)],
                )
                .await
                .unwrap();
                tx.commit().await.unwrap();
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            times
        }));
    }
    let mut times = Vec::new();
    for t in tasks {
        times.extend(t.await.unwrap());
    }
    let secs = started.elapsed().as_secs_f64();
    let after = wal_lsn(&c).await;
    let wal: i64 = c
        .query_one("SELECT pg_wal_lsn_diff($1::text::pg_lsn, $2::text::pg_lsn)::bigint", &[&after, &before])
        .await
        .unwrap()
        .get(0);
    let size: i64 = c.query_one("SELECT pg_total_relation_size('files')", &[]).await.unwrap().get(0);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let t = Instant::now();
    for _ in 0..1000 {
        let i = rng.random_range(0..count);
        c.query_one("SELECT bytes FROM files WHERE path = $1", &[&format!("job/images/m/labelfool/{i}.png")])
            .await
            .unwrap();
    }
    let read = t.elapsed().as_secs_f64();
    let t = Instant::now();
    c.execute("DELETE FROM files WHERE path LIKE 'job/%'", &[]).await.unwrap();
    let delete = t.elapsed().as_secs_f64();
    Row {
        how: "bytea".into(),
        writers,
        per_second: count as f64 / secs,
        p50_ms: median(times.clone()),
        p99_ms: p99(times),
        bytes: size as u64,
        extra: format!(
            "WAL written {:.2} GB; 1 000 random reads {read:.2} s, delete all {delete:.2} s",
            wal as f64 / 1e9
        ),
    }
}

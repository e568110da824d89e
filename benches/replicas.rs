//! Several replicas on one job: items per second with 1, 2 and 3 servers sharing one PostgreSQL
//! (a throwaway cluster, as `tests/replicas.rs` makes) and one jobs folder, all on this machine.
//!
//!     cargo bench --bench replicas -- [--copies 2] [--method labelfool] [--replicas 1,2,3]
//!
//! The job is the 12 test fixtures under `--copies` names each, attacked with `--method` on
//! EfficientNet-Lite0 (the default model); each of n replicas runs libtorch on cores / n threads.
//! Run it with `OMP_WAIT_POLICY=PASSIVE` on a small machine, as the test suite does, or the
//! replicas' idle OpenMP threads spin on the cores the others need. Prints a Markdown table:
//! wall time from the POST to `done`, items per second, the items each replica finished, and
//! the machine's CPU use over the run (from /proc/stat): whether the cores or the store bound.

use std::path::Path;
use std::time::{Duration, Instant};

mod common;
#[path = "../tests/common/mod.rs"]
mod harness;

use common::arg;
use harness::{Server, client, default_model_config, json, pg::PgCluster, sample_images};

/// (busy, total) jiffies of all cores.
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> =
        stat.lines().next().unwrap_or_default().split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    let total: u64 = v.iter().sum();
    (total - idle, total)
}

fn main() {
    let copies: usize = arg("--copies").and_then(|v| v.parse().ok()).unwrap_or(2);
    let method = arg("--method").unwrap_or_else(|| "labelfool".into());
    let counts: Vec<usize> =
        arg("--replicas").unwrap_or_else(|| "1,2,3".into()).split(',').filter_map(|n| n.parse().ok()).collect();
    let root = tempfile::tempdir().unwrap();
    let images = root.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    for path in sample_images() {
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        for i in 0..copies {
            std::fs::copy(&path, images.join(format!("{stem}_{i}.JPEG"))).unwrap();
        }
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("| replicas | items | wall (s) | items/s | per replica | CPU busy ({cores} cores) |");
    println!("|---:|---:|---:|---:|---|---:|");
    for n in counts {
        let cluster = PgCluster::start();
        let dsn = cluster.database("jobs");
        let shared = root.path().join(format!("jobs-{n}"));
        // Each replica gets its share of the cores, as pods with CPU requests would: libtorch's
        // default (a thread per core in every process) oversubscribes them n times.
        let threads = (cores / n).max(1);
        let config = default_model_config(&format!(
            "[engine]\ndevice = \"cpu\"\nthreads = {threads}\n[jobs]\nallowed_dirs = [\"{}\"]\npoll_ms = 100\n",
            root.path().display()
        ));
        let replicas: Vec<Server> = (0..n)
            .map(|_| {
                Server::start_with_env(
                    &config,
                    &[("LABELFOOL_JOBS__DATABASE", dsn.as_str()), ("LABELFOOL_JOBS__DIR", shared.to_str().unwrap())],
                )
            })
            .collect();
        let (items, wall, per, busy) = rt.block_on(run(&replicas, &images, &method, &dsn));
        println!("| {n} | {items} | {wall:.1} | {:.2} | {per:?} | {:.0}% |", items as f64 / wall, busy * 100.0);
    }
}

async fn run(replicas: &[Server], images: &Path, method: &str, dsn: &str) -> (usize, f64, Vec<i64>, f64) {
    let body = serde_json::json!({"images": images, "methods": [method]});
    let (c0, started) = (cpu_jiffies(), Instant::now());
    let (status, job) = json(client().post(replicas[0].url("/jobs")).json(&body).send().await.unwrap()).await;
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let total = job["total"].as_u64().unwrap() as usize;
    loop {
        let (_, j) = json(client().get(replicas[0].url(&format!("/jobs/{id}"))).send().await.unwrap()).await;
        if j["state"] == "done" {
            break;
        }
        assert!(j["state"] == "queued" || j["state"] == "running", "{j}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let wall = started.elapsed().as_secs_f64();
    let c1 = cpu_jiffies();
    let busy = (c1.0 - c0.0) as f64 / (c1.1 - c0.1).max(1) as f64;
    let (db, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let rows = db
        .query(
            "SELECT COUNT(*) FROM work_items WHERE job_id = $1 AND kind = 'attack' GROUP BY done_by ORDER BY 1 DESC",
            &[&id],
        )
        .await
        .unwrap();
    (total, wall, rows.iter().map(|r| r.get(0)).collect(), busy)
}

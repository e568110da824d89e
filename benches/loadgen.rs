//! Load generator: throughput and p50/p95/p99 latency of `/classify` and `/attack` at several
//! concurrencies, `/attack` at 16 clients with uploads of one size and of five sizes, plus an
//! overload run, against a real server over HTTP.
//!
//!     cargo bench --bench loadgen -- [--url http://host:port] [--device cpu|cuda:0]
//!         [--seconds 10] [--attack-seconds 15] [--overload-seconds 30] [--quick]
//!
//! Without `--url` it starts `labelfool serve` itself (default model, an ephemeral port) and, for
//! the overload run, a second server with a small queue. Writes
//! benches/results/loadgen-<device>.json and prints Markdown tables.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

mod common;
use common::arg;

fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

struct Server {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(extra_toml: &str) -> anyhow::Result<Self> {
        use std::io::BufRead;
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let dir = tempfile::tempdir()?;
        let base = std::fs::read_to_string(root.join("config/default.toml"))?;
        let config = dir.path().join("config.toml");
        std::fs::write(&config, merge_toml(&base, extra_toml)?)?;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_labelfool"));
        cmd.args(["serve", "--bind", "127.0.0.1:0", "--config"])
            .arg(&config)
            .env("LABELFOOL_JOBS__DATABASE", dir.path().join("jobs.sqlite3"))
            .env("LABELFOOL_JOBS__DIR", dir.path().join("jobs"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(d) = arg("--device") {
            cmd.args(["--device", &d]);
        }
        let mut child = cmd.spawn()?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line)?;
        let url = line
            .trim()
            .strip_prefix("labelfool listening on ")
            .ok_or_else(|| anyhow::anyhow!("unexpected {line:?}"))?
            .to_string();
        Ok(Self { child, url, _dir: dir })
    }

    /// Peak resident set size (VmHWM) of the server process, in MiB.
    fn peak_rss_mib(&self) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb / 1024.0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `base` with the tables of `extra` merged in (extra wins).
fn merge_toml(base: &str, extra: &str) -> anyhow::Result<String> {
    let mut b: toml::Table = base.parse()?;
    let e: toml::Table = extra.parse()?;
    for (k, v) in e {
        match (b.get_mut(&k), v) {
            (Some(toml::Value::Table(bt)), toml::Value::Table(et)) => bt.extend(et),
            (_, v) => {
                b.insert(k, v);
            }
        }
    }
    Ok(toml::to_string(&b)?)
}

async fn wait_ready(url: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        if let Ok(r) = reqwest::get(format!("{url}/ready")).await
            && r.status() == 200
        {
            return Ok(());
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(120), "{url} not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[derive(Debug, serde::Serialize)]
struct Level {
    route: String,
    /// Which uploads: the sample images as they are, or resized to one or five sizes.
    uploads: &'static str,
    concurrency: usize,
    completed: u64,
    ok: u64,
    rejected_503: u64,
    other_errors: u64,
    seconds: f64,
    throughput: f64,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

/// Closed loop: `concurrency` clients send requests back to back until `duration` has passed;
/// requests already started are allowed to finish (and counted).
async fn run_level(
    client: &reqwest::Client,
    url: &str,
    route: &str,
    images: &Arc<Vec<Vec<u8>>>,
    concurrency: usize,
    duration: Duration,
) -> Level {
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, url, route, images, next) =
                (client.clone(), url.to_string(), route.to_string(), images.clone(), next.clone());
            tokio::spawn(async move {
                let mut h = Histogram::<u64>::new(3).unwrap();
                let (mut ok, mut rejected, mut other) = (0u64, 0u64, 0u64);
                while started.elapsed() < duration {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let body = images[i % images.len()].clone();
                    let t = Instant::now();
                    let res = client
                        .post(format!("{url}{route}"))
                        .header("content-type", "image/jpeg")
                        .body(body)
                        .send()
                        .await;
                    let status = match res {
                        Ok(r) => {
                            let s = r.status().as_u16();
                            let _ = r.bytes().await;
                            s
                        }
                        Err(_) => 0,
                    };
                    let _ = h.record(t.elapsed().as_micros() as u64);
                    match status {
                        200 => ok += 1,
                        503 => rejected += 1,
                        _ => other += 1,
                    }
                }
                (h, ok, rejected, other)
            })
        })
        .collect();
    let mut h = Histogram::<u64>::new(3).unwrap();
    let (mut ok, mut rejected, mut other) = (0, 0, 0);
    for t in tasks {
        let (th, o, r, e) = t.await.unwrap();
        h.add(th).unwrap();
        ok += o;
        rejected += r;
        other += e;
    }
    let seconds = started.elapsed().as_secs_f64();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
    Level {
        route: route.into(),
        uploads: "samples",
        concurrency,
        completed: ok + rejected + other,
        ok,
        rejected_503: rejected,
        other_errors: other,
        seconds,
        throughput: ok as f64 / seconds,
        p50_ms: ms(0.5),
        p95_ms: ms(0.95),
        p99_ms: ms(0.99),
        max_ms: h.max() as f64 / 1e3,
    }
}

fn print_levels(levels: &[Level]) {
    println!("| route | uploads | concurrency | ok | 503 | errors | throughput (ok/s) | p50 ms | p95 ms | p99 ms |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for l in levels {
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.2} | {:.0} | {:.0} | {:.0} |",
            l.route,
            l.uploads,
            l.concurrency,
            l.ok,
            l.rejected_503,
            l.other_errors,
            l.throughput,
            l.p50_ms,
            l.p95_ms,
            l.p99_ms
        );
    }
}

/// The mixed-size level's uploads: ImageNet's commonest shapes, landscape and portrait.
const FIVE_SIZES: [(u32, u32); 5] = [(500, 375), (375, 500), (500, 333), (640, 480), (400, 300)];
const ONE_SIZE: [(u32, u32); 1] = [(500, 375)];

/// Every sample resized to the sizes in turn (width × height), as JPEGs.
fn resized(images: &[Vec<u8>], dims: &[(u32, u32)]) -> anyhow::Result<Vec<Vec<u8>>> {
    images
        .iter()
        .enumerate()
        .map(|(i, bytes)| {
            let (w, h) = dims[i % dims.len()];
            let img = image::load_from_memory(bytes)?.resize_exact(w, h, image::imageops::FilterType::Triangle);
            let mut out = Vec::new();
            img.to_rgb8().write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 92))?;
            Ok(out)
        })
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let quick = flag("--quick");
    let secs = |name: &str, default: u64| {
        Duration::from_secs(arg(name).and_then(|v| v.parse().ok()).unwrap_or(if quick { 3 } else { default }))
    };
    let (classify_time, attack_time, overload_time) =
        (secs("--seconds", 10), secs("--attack-seconds", 15), secs("--overload-seconds", 30));
    let shared = root.join("../shared/data/imagenet-samples");
    let dir = if shared.is_dir() { shared } else { root.join("tests/fixtures/images") };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?.map(|e| e.unwrap().path()).collect();
    files.sort();
    let images = Arc::new(files.iter().map(std::fs::read).collect::<Result<Vec<_>, _>>()?);
    let client = reqwest::Client::builder().timeout(Duration::from_secs(120)).pool_max_idle_per_host(256).build()?;

    let own = match arg("--url") {
        Some(_) => None,
        None => Some(Server::start("")?),
    };
    let url = arg("--url").or_else(|| own.as_ref().map(|s| s.url.clone())).unwrap();
    wait_ready(&url).await?;
    let models: serde_json::Value = client.get(format!("{url}/models")).send().await?.json().await?;
    let device = models["device"].as_str().unwrap_or("unknown").to_string();
    // Warm-up: TorchScript optimises its graphs on the first runs.
    run_level(&client, &url, "/classify", &images, 4, Duration::from_secs(2)).await;
    run_level(&client, &url, "/attack", &images, 2, Duration::from_secs(2)).await;

    let mut levels = Vec::new();
    for c in [1, 4, 16, 64] {
        levels.push(run_level(&client, &url, "/classify", &images, c, classify_time).await);
        eprintln!("classify c={c}: {:.1} ok/s", levels.last().unwrap().throughput);
    }
    for c in [1, 4, 8, 16, 64] {
        levels.push(run_level(&client, &url, "/attack", &images, c, attack_time).await);
        eprintln!("attack c={c}: {:.2} ok/s", levels.last().unwrap().throughput);
    }
    // Uploads of one size against uploads of five sizes, at 16 clients: what mixing sizes costs
    // the attack ticks (each row keeps its upload's size through the model's resize).
    for (uploads, dims) in [("one size", &ONE_SIZE[..]), ("five sizes", &FIVE_SIZES[..])] {
        let set = Arc::new(resized(&images, dims)?);
        run_level(&client, &url, "/attack", &set, 2, Duration::from_secs(2)).await;
        let mut l = run_level(&client, &url, "/attack", &set, 16, attack_time).await;
        l.uploads = uploads;
        eprintln!("attack c=16, {uploads}: {:.2} ok/s", l.throughput);
        levels.push(l);
    }
    let tp = |route: &str, c: usize| {
        levels
            .iter()
            .find(|l| l.route == route && l.concurrency == c && l.uploads == "samples")
            .map(|l| l.throughput)
            .unwrap_or(f64::NAN)
    };
    let by_uploads = |u: &str| levels.iter().find(|l| l.uploads == u).map(|l| l.throughput).unwrap_or(f64::NAN);
    let mixed_ratio = by_uploads("five sizes") / by_uploads("one size");
    let classify_ratio = tp("/classify", 16) / tp("/classify", 1);
    let classify_ratio_64 = tp("/classify", 64) / tp("/classify", 1);
    let attack_ratio = tp("/attack", 8) / tp("/attack", 1);
    let main_rss = own.as_ref().and_then(Server::peak_rss_mib);
    drop(own);

    // Overload: 4× more concurrent clients than the queue holds.
    let (queue, clients) = (16usize, 64usize);
    let overload_server = if arg("--url").is_none() {
        Some(Server::start(&format!("[engine]\nqueue_capacity = {queue}\n[limits]\nclassify_deadline_ms = 60000\n"))?)
    } else {
        None
    };
    let mut overload = None;
    if let Some(s) = &overload_server {
        wait_ready(&s.url).await?;
        let l = run_level(&client, &s.url, "/classify", &images, clients, overload_time).await;
        let healthy = client.get(format!("{}/ready", s.url)).send().await.map(|r| r.status() == 200).unwrap_or(false)
            && client
                .post(format!("{}/classify", s.url))
                .header("content-type", "image/jpeg")
                .body(images[0].clone())
                .send()
                .await
                .map(|r| r.status() == 200)
                .unwrap_or(false);
        let rss = s.peak_rss_mib();
        eprintln!(
            "overload: {} ok, {} rejected, {} errors; healthy after: {healthy}; peak RSS {rss:?} MiB",
            l.ok, l.rejected_503, l.other_errors
        );
        overload = Some(
            serde_json::json!({"queue_capacity": queue, "clients": clients, "result": l, "healthy_after": healthy, "peak_rss_mib": rss}),
        );
    }

    println!("\n### Throughput and latency ({device})\n");
    print_levels(&levels);
    println!("\nclassify throughput, concurrency 16 / 1: **{classify_ratio:.2}×** (64 / 1: {classify_ratio_64:.2}×)");
    println!("attack throughput, 8 concurrent / one at a time: **{attack_ratio:.2}×**");
    println!("attack throughput at 16 clients, five upload sizes / one size: **{mixed_ratio:.2}×**");
    if let Some(m) = main_rss {
        println!("server peak RSS over the run: {m:.0} MiB");
    }
    if let Some(o) = &overload {
        let l = &o["result"];
        println!(
            "\noverload ({} clients, queue {}, {} s): {} ok, {} answered 503, {} other errors/hung; healthy afterwards: {}; peak RSS {:.0} MiB",
            clients,
            queue,
            overload_time.as_secs(),
            l["ok"],
            l["rejected_503"],
            l["other_errors"],
            o["healthy_after"],
            o["peak_rss_mib"].as_f64().unwrap_or(f64::NAN)
        );
    }
    let out = root.join("benches/results");
    std::fs::create_dir_all(&out)?;
    let result = serde_json::json!({
        "device": device, "command": "cargo bench --bench loadgen", "levels": levels,
        "classify_ratio_16_vs_1": classify_ratio, "classify_ratio_64_vs_1": classify_ratio_64,
        "attack_ratio_8_vs_1": attack_ratio, "attack_five_sizes_vs_one_at_16": mixed_ratio,
        "peak_rss_mib": main_rss, "overload": overload,
    });
    std::fs::write(
        out.join(format!("loadgen-{}.json", device.replace(':', ""))),
        serde_json::to_string_pretty(&result)? + "\n",
    )?;
    Ok(())
}

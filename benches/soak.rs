//! Extended load under attack conditions: 64 clients mixing `/classify`, `/target-label` and
//! `/attack` against the default model, while 50 clients hold stalled uploads (a header and part
//! of a body, then nothing; each reconnects when the server closes it), for a fixed time.
//! Reports every request's fate (nothing may hang: each has a 120 s client timeout, and the run
//! waits for all of them), classify p50/p99/max, the stalled uploads' 408s, and the server's
//! peak resident memory.
//!
//!     cargo bench --bench soak -- [--seconds 60] [--clients 64] [--stalled 50] [--device cpu|cuda:0]
//!
//! Starts `labelfool serve` itself with config/default.toml. Writes benches/results/soak-<device>.json.

use std::io::{BufRead, Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    rejected_4xx: AtomicU64,
    unavailable_503: AtomicU64,
    timeout_504: AtomicU64,
    server_errors: AtomicU64,
    transport_errors: AtomicU64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds: u64 = arg("--seconds", 60);
    let clients: usize = arg("--clients", 64);
    let stalled: usize = arg("--stalled", 50);
    let device: String = arg("--device", "cpu".to_string());
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));

    let jobs = tempfile::tempdir()?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_labelfool"))
        .args(["serve", "--bind", "127.0.0.1:0", "--device", &device, "--config"])
        .arg(root.join("config/default.toml"))
        .env("LABELFOOL_JOBS__DATABASE", jobs.path().join("jobs.sqlite3"))
        .env("LABELFOOL_JOBS__DIR", jobs.path().join("jobs"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line)?;
    let url = line.trim().strip_prefix("labelfool listening on ").unwrap_or_default().to_string();
    let addr: std::net::SocketAddr = url.trim_start_matches("http://").parse()?;
    let started = Instant::now();
    while reqwest::get(format!("{url}/ready")).await.map(|r| r.status() != 200).unwrap_or(true) {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(120), "server not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut images = Vec::new();
    for e in std::fs::read_dir(root.join("tests/fixtures/images"))? {
        images.push(std::fs::read(e?.path())?);
    }
    let images = Arc::new(images);
    let stop = Arc::new(AtomicBool::new(false));

    // Stalled uploads, on plain threads: connect, send a header and 10 bytes of a 100 kB body,
    // then wait for the server's answer (408 after its body timeout) and start over.
    let answered_408 = Arc::new(AtomicU64::new(0));
    let stall_threads: Vec<_> = (0..stalled)
        .map(|_| {
            let (stop, answered) = (stop.clone(), answered_408.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut c) = std::net::TcpStream::connect(addr) else { continue };
                    let _ = c.write_all(
                        b"POST /classify HTTP/1.1\r\nhost: x\r\ncontent-type: image/png\r\ncontent-length: 100000\r\n\r\n0123456789",
                    );
                    let _ = c.set_read_timeout(Some(Duration::from_secs(90)));
                    let mut out = Vec::new();
                    let _ = c.read_to_end(&mut out);
                    if out.starts_with(b"HTTP/1.1 408") {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();

    let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build()?;
    let tally = Arc::new(Tally::default());
    let classify_ms = Arc::new(std::sync::Mutex::new(Histogram::<u64>::new(3)?));
    let run_started = Instant::now();
    let deadline = run_started + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..clients)
        .map(|i| {
            let (http, url, images, tally, hist) =
                (http.clone(), url.clone(), images.clone(), tally.clone(), classify_ms.clone());
            tokio::spawn(async move {
                let mut n = i;
                while Instant::now() < deadline {
                    // Mostly classify; every 4th client target-label; every 8th attacks.
                    let route = match i % 8 {
                        0 => "/attack?max_iter=20",
                        3 | 7 => "/target-label",
                        _ => "/classify",
                    };
                    let img = images[n % images.len()].clone();
                    n += 1;
                    let sent = Instant::now();
                    let res =
                        http.post(format!("{url}{route}")).header("content-type", "image/jpeg").body(img).send().await;
                    let counter = match res {
                        Err(_) => &tally.transport_errors,
                        Ok(r) => {
                            let st = r.status().as_u16();
                            let _ = r.bytes().await;
                            if st == 200 && route == "/classify" {
                                let _ = hist.lock().unwrap().record(sent.elapsed().as_millis() as u64);
                            }
                            match st {
                                200 => &tally.ok,
                                503 => &tally.unavailable_503,
                                504 => &tally.timeout_504,
                                s if s >= 500 => &tally.server_errors,
                                _ => &tally.rejected_4xx,
                            }
                        }
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for w in workers {
        w.await?;
    }
    let elapsed = run_started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let health = reqwest::get(format!("{url}/health")).await.map(|r| r.status().as_u16()).unwrap_or(0);
    let peak_mib = std::fs::read_to_string(format!("/proc/{}/status", child.id()))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|kb| kb / 1024.0);
    let _ = child.kill();
    let _ = child.wait();
    for t in stall_threads {
        let _ = t.join();
    }

    let h = classify_ms.lock().unwrap();
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let total = get(&tally.ok)
        + get(&tally.rejected_4xx)
        + get(&tally.unavailable_503)
        + get(&tally.timeout_504)
        + get(&tally.server_errors)
        + get(&tally.transport_errors);
    let report = serde_json::json!({
        "command": format!("cargo bench --bench soak -- --seconds {seconds} --clients {clients} --stalled {stalled} --device {device}"),
        "device": device, "seconds": elapsed, "clients": clients, "stalled_uploads": stalled,
        "requests": total, "ok": get(&tally.ok), "rejected_4xx": get(&tally.rejected_4xx),
        "unavailable_503": get(&tally.unavailable_503), "timeout_504": get(&tally.timeout_504),
        "server_errors_5xx": get(&tally.server_errors), "transport_errors": get(&tally.transport_errors),
        "classify_ok": h.len(), "classify_p50_ms": h.value_at_quantile(0.5), "classify_p99_ms": h.value_at_quantile(0.99),
        "classify_max_ms": h.max(), "stalled_answered_408": get(&answered_408),
        "health_after": health, "server_peak_rss_mib": peak_mib,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    let out = root.join(format!("benches/results/soak-{}.json", device.replace(':', "")));
    std::fs::write(&out, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("written to {}", out.display());
    Ok(())
}

//! Test harness: starts the real `labelfool serve` binary on an ephemeral port with a config
//! written for the test, and speaks real HTTP to it.
#![allow(dead_code)]

pub mod pg;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_labelfool");

/// Where `scripts/setup` put the models (tests need the setup to have run: `scripts/test` does).
pub fn models_dir() -> PathBuf {
    let cache = std::env::var_os("LABELFOOL_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/labelfool"));
    let dir = cache.join("models");
    assert!(dir.join("tiny/model.pt").is_file(), "no models under {}: run scripts/setup first", dir.display());
    dir
}

pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

pub fn read_fixture(rel: &str) -> Vec<u8> {
    std::fs::read(fixture(rel)).unwrap_or_else(|e| panic!("fixture {rel}: {e}"))
}

/// Sample images (ImageNet, one per class) shipped in tests/fixtures/images, sorted.
pub fn sample_images() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixture("images")).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

/// The WordNet id in a `<wnid>_<name>.JPEG` file name.
pub fn wnid_of(path: &std::path::Path) -> String {
    path.file_name().unwrap().to_str().unwrap().split('_').next().unwrap().to_string()
}

/// A config with the tiny test models (tiny, tiny-faulty) on the CPU; `extra` is appended TOML
/// (sections must not repeat, so it gets its own).
pub fn tiny_config(extra: &str) -> String {
    let m = models_dir();
    format!(
        "{extra}\n[[models]]\nname = \"tiny\"\ndir = \"{}\"\n\n[[models]]\nname = \"tiny-faulty\"\ndir = \"{}\"\n",
        m.join("tiny").display(),
        m.join("tiny-faulty").display()
    )
}

pub fn default_model_config(extra: &str) -> String {
    format!(
        "{extra}\n[[models]]\nname = \"efficientnet-lite0\"\ndir = \"{}\"\n",
        models_dir().join("efficientnet-lite0").display()
    )
}

/// Runs `labelfool serve` with `config` to its end (for configurations that must stop it),
/// its jobs kept in `dir`.
pub fn serve_until_exit(config: &std::path::Path, dir: &std::path::Path) -> std::process::Output {
    Command::new(BIN)
        .args(["serve", "--bind", "127.0.0.1:0", "--config"])
        .arg(config)
        .env("LABELFOOL_JOBS__DATABASE", dir.join("jobs.sqlite3"))
        .env("LABELFOOL_JOBS__DIR", dir.join("jobs"))
        .output()
        .unwrap()
}

pub struct Server {
    child: Child,
    pub base: String,
    pub addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
    pub stderr: PathBuf,
}

impl Server {
    /// Starts the server with `config` (TOML) and waits until `/ready` answers 200.
    pub fn start(config: &str) -> Self {
        Self::start_with_env(config, &[])
    }

    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Self {
        Self::spawn(config, env, true)
    }

    /// Starts the server with its jobs where the configuration says (by default under
    /// `LABELFOOL_CACHE`, which `env` should point at a temporary folder), not in a folder of
    /// its own.
    pub fn start_default(config: &str, env: &[(&str, &str)]) -> Self {
        Self::spawn(config, env, false)
    }

    fn spawn(config: &str, env: &[(&str, &str)], own_jobs: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let cfg = if config.contains("[engine]") {
            config.to_string()
        } else {
            format!("[engine]\ndevice = \"cpu\"\n{config}")
        };
        std::fs::write(&path, cfg).unwrap();
        let stderr = dir.path().join("stderr.log");
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--config"])
            .arg(&path)
            .args(["--bind", "127.0.0.1:0"])
            .env_remove("LABELFOOL_BIND")
            .env_remove("LABELFOOL_API_KEY")
            .env_remove("LABELFOOL_JOBS__DATABASE")
            .env_remove("LABELFOOL_JOBS__DIR")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap());
        if own_jobs {
            // Each test server keeps its jobs to itself.
            cmd.env("LABELFOOL_JOBS__DATABASE", dir.path().join("jobs.sqlite3"))
                .env("LABELFOOL_JOBS__DIR", dir.path().join("jobs"));
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn labelfool serve");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let addr: std::net::SocketAddr = line
            .trim()
            .strip_prefix("labelfool listening on http://")
            .unwrap_or_else(|| {
                panic!(
                    "unexpected first line {line:?}; stderr: {}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                )
            })
            .parse()
            .unwrap();
        let server = Self { child, base: format!("http://{addr}"), addr, _dir: dir, stderr };
        server.wait_ready(Duration::from_secs(120));
        server
    }

    fn wait_ready(&self, limit: Duration) {
        let started = Instant::now();
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(self.addr) {
                use std::io::{Read, Write};
                let _ = s.write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                let mut buf = String::new();
                let _ = s.read_to_string(&mut buf);
                if buf.starts_with("HTTP/1.1 200") {
                    return;
                }
            }
            assert!(started.elapsed() < limit, "server not ready after {limit:?}: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash or the OOM killer would: no shutdown code runs.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self, limit: Duration) -> std::process::ExitStatus {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(started.elapsed() < limit, "server did not exit within {limit:?} of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(300)).build().unwrap()
}

/// A response's status and JSON body. A 204's empty body reads as `Null`; any other body that
/// is not JSON fails the test, showing the body.
pub async fn json(res: reqwest::Response) -> (u16, serde_json::Value) {
    let status = res.status().as_u16();
    let body = res.text().await.unwrap();
    if status == 204 && body.is_empty() {
        return (status, serde_json::Value::Null);
    }
    (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}")))
}

pub fn multipart_image(bytes: Vec<u8>, name: &str) -> reqwest::multipart::Form {
    reqwest::multipart::Form::new().part("image", reqwest::multipart::Part::bytes(bytes).file_name(name.to_string()))
}

/// A non-square RGBA PNG made from a sample photo: a crop with an alpha gradient.
pub fn rgba_png_from(path: &std::path::Path, w: u32, h: u32) -> Vec<u8> {
    let img = image::open(path).unwrap().to_rgb8();
    let mut out = image::RgbaImage::new(w, h);
    for (x, y, p) in out.enumerate_pixels_mut() {
        let src = img.get_pixel(x.min(img.width() - 1), y.min(img.height() - 1));
        *p = image::Rgba([src[0], src[1], src[2], (128 + (x * 127 / w.max(1))) as u8]);
    }
    let mut buf = Vec::new();
    out.write_to(&mut std::io::Cursor::new(&mut buf), image::ImageFormat::Png).unwrap();
    buf
}

/// Re-encodes an image file as PNG (RGB).
pub fn png_from(path: &std::path::Path) -> Vec<u8> {
    let img = image::open(path).unwrap().to_rgb8();
    let mut buf = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut buf), image::ImageFormat::Png).unwrap();
    buf
}

pub fn decode_dims(png: &[u8]) -> (u32, u32, bool) {
    let img = image::load_from_memory(png).unwrap();
    (img.width(), img.height(), img.color().has_alpha())
}

/// Polls `cond` until it holds; fails with `what` (and how long it waited) past `limit`. The
/// tests' synchronisation: wait for the condition itself, never for a fixed time.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !cond().await {
        assert!(started.elapsed() < limit, "{what}: still not so after {limit:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// `path` posted as the multipart `image` to `route` of `s`: the answer's status and JSON.
pub async fn post_file(s: &Server, route: &str, path: &std::path::Path) -> (u16, serde_json::Value) {
    let form = multipart_image(std::fs::read(path).unwrap(), "x.jpg");
    json(client().post(s.url(route)).multipart(form).send().await.unwrap()).await
}

/// [`post_file`], answered 200: its JSON.
pub async fn post_image(s: &Server, route: &str, path: &std::path::Path) -> serde_json::Value {
    let (status, v) = post_file(s, route, path).await;
    assert_eq!(status, 200, "{route}: {v}");
    v
}

/// An image re-classified through the server's own `POST /classify` (`model`, or the server's
/// default): its top-1 class index and label.
pub async fn classify_top1(s: &Server, model: Option<&str>, image: &[u8]) -> (u64, String) {
    let url = match model {
        Some(m) => s.url(&format!("/classify?top_k=1&model={m}")),
        None => s.url("/classify?top_k=1"),
    };
    let res = client().post(url).header("content-type", "image/png").body(image.to_vec()).send().await.unwrap();
    let (status, v) = json(res).await;
    assert_eq!(status, 200, "re-classifying a delivered image: {v}");
    (v["top"][0]["index"].as_u64().unwrap(), v["top"][0]["label"].as_str().unwrap_or_default().to_string())
}

/// The one rule every asserted `success` is held to, with `top1` what the model says of the
/// delivered image, asked independently of the attack: it is the reported final class, and
/// `success` is reported exactly when it is the target (targeted) or not the original class
/// (untargeted). `report` is an `/attack` answer or a job's or eval's record (`success`,
/// `original`, `target`, `final`, each class with its `index`). Returns whether the image is
/// adversarial, so a test that asserts success asserts it of the image itself.
pub fn assert_verdict(top1: u64, report: &serde_json::Value, what: &str) -> bool {
    let success = report["success"].as_bool().unwrap_or_else(|| panic!("{what}: no success in {report}"));
    let original = report["original"]["index"].as_u64().unwrap_or_else(|| panic!("{what}: no original in {report}"));
    assert_eq!(
        report["final"]["index"].as_u64(),
        Some(top1),
        "{what}: the delivered image is not the reported final class: {report}"
    );
    let adversarial = match report["target"]["index"].as_u64() {
        Some(target) => top1 == target,
        None => top1 != original,
    };
    assert_eq!(
        success, adversarial,
        "{what}: success reported as {success}, but the delivered image is class {top1}: {report}"
    );
    adversarial
}

/// Re-classifies a delivered image (PNG bytes) through the server's own `POST /classify` and holds
/// the attack's `report` to it ([`assert_verdict`]). Returns whether the image is adversarial.
pub async fn assert_delivered(
    s: &Server,
    model: Option<&str>,
    image: &[u8],
    report: &serde_json::Value,
    what: &str,
) -> bool {
    let (top1, _) = classify_top1(s, model, image).await;
    assert_verdict(top1, report, what)
}

/// The PNG of an `/attack` JSON answer.
pub fn png_of(v: &serde_json::Value) -> Vec<u8> {
    use base64::Engine as _;
    let b64 = v["png_base64"].as_str().unwrap_or_else(|| panic!("no PNG in {v}"));
    base64::engine::general_purpose::STANDARD.decode(b64).unwrap()
}

/// An in-process attack's outcome as the report [`assert_verdict`] reads (the classes by index).
pub fn outcome_report(o: &labelfool::attack::AttackOutcome) -> serde_json::Value {
    serde_json::json!({
        "success": o.success,
        "original": {"index": o.original.index},
        "target": {"index": o.target},
        "final": {"index": o.final_.index},
    })
}

/// Copies `images` into `dir`, each named `<wnid>_<its name>` after the class the server's
/// default model (the tiny one, in the tests that use this) gives it through `POST /classify`,
/// so the class its file name claims is the one the model predicts: every source counts as
/// correctly classified, as a study's adversarial puzzles require. `key`: the server's API key
/// ("" for none).
/// Returns the new file names with their wnids, in `images`' order.
pub async fn copy_named_as_classified(
    s: &Server,
    key: &str,
    dir: &std::path::Path,
    images: &[PathBuf],
) -> Vec<(String, String)> {
    let classes = std::fs::read_to_string(models_dir().join("tiny/classes.txt")).unwrap();
    let wnids: Vec<&str> = classes.lines().filter_map(|l| l.split_whitespace().next()).collect();
    let mut out = Vec::new();
    for p in images {
        let bytes = std::fs::read(p).unwrap();
        let mut req = client().post(s.url("/classify?top_k=1")).header("content-type", "image/jpeg").body(bytes);
        if !key.is_empty() {
            req = req.bearer_auth(key);
        }
        let res = req.send().await.unwrap();
        let (status, v) = json(res).await;
        assert_eq!(status, 200, "{v}");
        let wnid = wnids[v["top"][0]["index"].as_u64().unwrap() as usize].to_string();
        let rest = p.file_name().unwrap().to_str().unwrap().split_once('_').map_or("image.JPEG", |(_, r)| r);
        let name = format!("{wnid}_{rest}");
        std::fs::copy(p, dir.join(&name)).unwrap();
        out.push((name, wnid));
    }
    out
}

/// The tiny model's classes (wnids), in its order.
pub fn tiny_wnids() -> Vec<String> {
    let classes = std::fs::read_to_string(models_dir().join("tiny/classes.txt")).unwrap();
    classes.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect()
}

pub fn class_index(wnid: &str) -> usize {
    tiny_wnids().iter().position(|w| w == wnid).unwrap()
}

/// A reference set in `dir` for the tiny model's classes but `skip`: `per_class` pictures each,
/// as `<wnid>/ref-<k>.png` or (`flat`) `<wnid>_ref-<k>.png`, each a flat colour that says its
/// class and k ([`reference_of`]).
pub fn reference_set(dir: &std::path::Path, per_class: usize, flat: bool, skip: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    for (c, wnid) in tiny_wnids().iter().enumerate().filter(|(_, w)| !skip.contains(&w.as_str())) {
        for k in 0..per_class {
            let img = image::RgbImage::from_pixel(24, 16, image::Rgb([c as u8 * 20, k as u8 * 60 + 30, 200]));
            let path = if flat {
                dir.join(format!("{wnid}_ref-{k}.png"))
            } else {
                std::fs::create_dir_all(dir.join(wnid)).unwrap();
                dir.join(wnid).join(format!("ref-{k}.png"))
            };
            img.save(path).unwrap();
        }
    }
}

/// The (class, k) a picture of [`reference_set`] stands for; None for any other picture.
pub fn reference_of(img: &image::RgbImage) -> Option<(usize, usize)> {
    let p = img.get_pixel(0, 0);
    let flat = img.pixels().all(|q| q == p)
        && p[2] == 200
        && p[0].is_multiple_of(20)
        && p[1] >= 30
        && (p[1] - 30).is_multiple_of(60);
    flat.then(|| ((p[0] / 20) as usize, ((p[1] - 30) / 60) as usize))
}

/// The `data:` payloads of an SSE stream, until it ends.
pub async fn sse_events(s: &Server, id: &str) -> Vec<serde_json::Value> {
    let mut res = client().get(s.url(&format!("/jobs/{id}/events"))).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut text = String::new();
    while let Some(chunk) =
        tokio::time::timeout(std::time::Duration::from_secs(120), res.chunk()).await.unwrap().unwrap()
    {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    text.lines().filter_map(|l| l.strip_prefix("data: ")).map(|d| serde_json::from_str(d).unwrap()).collect()
}

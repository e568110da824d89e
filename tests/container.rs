//! The image as users get it: built from the Dockerfile by `scripts/container build` (its runtime
//! stage as shipped, over this checkout's binary, libtorch and default model) and run with podman
//! as a user's cluster would: as its own user, with the settings the image carries. It must
//! refuse to serve 0.0.0.0 without a key; with one it must start (it used to exit at once with
//! `Permission denied` on the jobs store), answer `/ready` on its probe port, attack a bundled
//! sample into a PNG the server classifies as the target, keep a job across a restart with its
//! volume, and on SIGTERM drain and exit 0 within the grace.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use serde_json::Value;

const IMAGE: &str = "labelfool:cpu";
/// podman's stop timeout (SIGKILL after it); the image's shutdown grace is 30 s.
const STOP_TIMEOUT_S: u64 = 45;

fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .arg("--runtime")
        .arg("runc")
        .args(args)
        .output()
        .expect("podman is installed by scripts/setup")
}

/// `podman run` with the limits this machine's runtime accepts and the host's network.
fn run_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["run", "--network", "host", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"];
    v.extend_from_slice(extra);
    v
}

/// The literal LABELFOOL_* settings of the CPU Deployment's container.
fn deployment_env() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docker/k8s/deployment.yaml")).unwrap();
    let doc = &yaml_rust2::YamlLoader::load_from_str(&text).unwrap()[0];
    doc["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?.to_string(), e["value"].as_str()?.to_string())))
        .collect()
}

/// A duration the manifest sets, in whole seconds (`unit_ms` milliseconds per unit).
fn manifest_secs(env: &[(String, String)], suffix: &str, unit_ms: u64) -> u64 {
    env.iter().find(|(k, _)| k.ends_with(suffix)).map(|(_, v)| v.parse::<u64>().unwrap() * unit_ms / 1000).unwrap_or(0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Removes the test's container and volume, whatever happened.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", "-t", "0", &self.0]);
        let _ = podman(&["volume", "rm", "-f", &self.0]);
    }
}

async fn wait_ready(probe: &str, name: &str, limit: Duration) {
    let started = Instant::now();
    loop {
        if let Ok(r) = client().get(format!("{probe}/ready")).timeout(Duration::from_secs(2)).send().await
            && r.status() == 200
        {
            return;
        }
        let state = podman(&["inspect", name, "--format", "{{.State.Running}}"]);
        let logs = podman(&["logs", name]);
        let logs = String::from_utf8_lossy(&logs.stderr).to_string() + &String::from_utf8_lossy(&logs.stdout);
        assert!(
            String::from_utf8_lossy(&state.stdout).trim() == "true",
            "the container exited before it was ready:\n{logs}"
        );
        assert!(started.elapsed() < limit, "not ready after {limit:?}:\n{logs}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[ignore = "partner tier (podman): scripts/test runs it"]
#[tokio::test]
async fn the_image_starts_as_its_user_serves_keeps_jobs_and_drains() {
    let started = Instant::now();
    let build = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/container")).arg("build").output().unwrap();
    assert!(build.status.success(), "scripts/container build failed:\n{}", String::from_utf8_lossy(&build.stderr));
    eprintln!("image built in {:.0?}", started.elapsed());

    // As shipped, without a key: it binds 0.0.0.0, so it refuses, saying why.
    let open = podman(&run_args(&["--rm", IMAGE]));
    let said = String::from_utf8_lossy(&open.stderr).to_string() + &String::from_utf8_lossy(&open.stdout);
    assert!(!open.status.success() && said.contains("without an API key"), "{said}");

    // With the Kubernetes Deployment's settings and a key, on free ports, its jobs in a volume.
    let name = format!("labelfool-test-{}", std::process::id());
    let _cleanup = Cleanup(name.clone());
    let (port, probe_port) = (free_port(), free_port());
    let mut env = vec![
        format!("LABELFOOL_BIND=0.0.0.0:{port}"),
        format!("LABELFOOL_SERVER__PROBE_BIND=0.0.0.0:{probe_port}"),
        "LABELFOOL_API_KEY=k".to_string(),
    ];
    let manifest = deployment_env();
    env.extend(manifest.iter().filter(|(k, _)| !k.ends_with("BIND")).map(|(k, v)| format!("{k}={v}")));
    let drain =
        manifest_secs(&manifest, "SHUTDOWN_DELAY_MS", 1000) + manifest_secs(&manifest, "SHUTDOWN_GRACE_SECS", 1);
    let volume = format!("{name}:/var/lib/labelfool");
    let mut args = vec!["-d", "--name", name.as_str(), "-v", volume.as_str()];
    for e in &env {
        args.extend(["-e", e.as_str()]);
    }
    args.push(IMAGE);
    let out = podman(&run_args(&args));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (base, probe) = (format!("http://127.0.0.1:{port}"), format!("http://127.0.0.1:{probe_port}"));
    wait_ready(&probe, &name, Duration::from_secs(120)).await;
    let user = podman(&["exec", &name, "id", "-u"]);
    assert_eq!(String::from_utf8_lossy(&user.stdout).trim(), "10001", "the server runs as the image's user");

    // An attack on a bundled sample, and the delivered PNG classified as the target.
    let c = client();
    let zebra = c.get(format!("{base}/studio/samples/zebra.jpg")).send().await.unwrap().bytes().await.unwrap();
    assert!(zebra.len() > 1000);
    let (st, attack) = json(
        c.post(format!("{base}/attack"))
            .bearer_auth("k")
            .header("content-type", "image/jpeg")
            .body(zebra.clone())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, 200, "{attack}");
    assert_eq!(attack["success"], true, "{attack}");
    let png = base64::engine::general_purpose::STANDARD.decode(attack["png_base64"].as_str().unwrap()).unwrap();
    let (st, classified) = json(
        c.post(format!("{base}/classify"))
            .bearer_auth("k")
            .header("content-type", "image/png")
            .body(png)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(classified["top"][0]["index"], attack["target"]["index"], "{classified} vs {attack}");

    // A job on an uploaded zip, to completion.
    let archive = {
        use std::io::Write;
        let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        z.start_file("n02391049_zebra.jpg", zip::write::SimpleFileOptions::default()).unwrap();
        z.write_all(&zebra).unwrap();
        z.finish().unwrap().into_inner()
    };
    let form = reqwest::multipart::Form::new()
        .part("archive", reqwest::multipart::Part::bytes(archive).file_name("images.zip"))
        .text("spec", r#"{"methods": ["fgsm"]}"#);
    let (st, job) = json(c.post(format!("{base}/jobs")).bearer_auth("k").multipart(form).send().await.unwrap()).await;
    assert_eq!(st, 201, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let job_state = |c: reqwest::Client, base: String, id: String| async move {
        let (_, v) = json(c.get(format!("{base}/jobs/{id}")).bearer_auth("k").send().await.unwrap()).await;
        v
    };
    let waited = Instant::now();
    while job_state(c.clone(), base.clone(), id.clone()).await["state"] != "done" {
        assert!(waited.elapsed() < Duration::from_secs(180), "the job did not finish");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // SIGTERM with an attack in flight: it is answered, and the server exits 0 within the
    // Deployment's delay + grace.
    let in_flight = {
        let req =
            c.post(format!("{base}/attack")).bearer_auth("k").header("content-type", "image/jpeg").body(zebra.clone());
        tokio::spawn(async move { req.send().await.map(|r| r.status().as_u16()) })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = Instant::now();
    let stop = podman(&["stop", "-t", &STOP_TIMEOUT_S.to_string(), &name]);
    assert!(stop.status.success(), "{}", String::from_utf8_lossy(&stop.stderr));
    let took = stopping.elapsed();
    assert_eq!(in_flight.await.unwrap().unwrap(), 200, "the attack in flight at SIGTERM is answered");
    let code = podman(&["inspect", &name, "--format", "{{.State.ExitCode}}"]);
    assert_eq!(String::from_utf8_lossy(&code.stdout).trim(), "0", "exit code after SIGTERM");
    assert!(took < Duration::from_secs(drain + 2), "SIGTERM took {took:?} (delay + grace {drain} s)");

    // The same container, its volume kept: the job and its results are still there.
    let start = podman(&["start", &name]);
    assert!(start.status.success(), "{}", String::from_utf8_lossy(&start.stderr));
    wait_ready(&probe, &name, Duration::from_secs(120)).await;
    let after: Value = job_state(c.clone(), base.clone(), id.clone()).await;
    assert_eq!(after["state"], "done", "{after}");
    let results =
        c.get(format!("{base}/jobs/{id}/results")).bearer_auth("k").send().await.unwrap().text().await.unwrap();
    let line: Value = serde_json::from_str(results.lines().next().unwrap_or("")).unwrap();
    let png = c.get(format!("{base}{}", line["png"].as_str().unwrap())).bearer_auth("k").send().await.unwrap();
    assert_eq!(png.status(), 200);
    image::load_from_memory_with_format(&png.bytes().await.unwrap(), image::ImageFormat::Png).unwrap();
    eprintln!("container test took {:.0?}", started.elapsed());
}

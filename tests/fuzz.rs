//! A few thousand mutated images and malformed requests against a real server (bounded, seeded,
//! so a failure reproduces): no 5xx, no hang, and the server is healthy afterwards.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::*;
use futures::StreamExt;

/// xorshift64*: a fixed seed gives the same requests on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn small(name: &str, format: image::ImageFormat) -> Vec<u8> {
    let img = image::open(fixture(&format!("images/{name}"))).unwrap().thumbnail(64, 64);
    let mut buf = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut buf), format).unwrap();
    buf
}

/// One damaged copy of `seed`: flipped bytes, a cut, an insertion, a forged size, or garbage.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    match rng.below(6) {
        0 => {
            for _ in 0..1 + rng.below(20) {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
        }
        1 => b.truncate(rng.below(b.len())),
        2 => {
            let at = rng.below(b.len());
            let n = 1 + rng.below(64);
            let junk = rng.bytes(n);
            b.splice(at..at, junk);
        }
        3 if b.starts_with(b"\x89PNG") && b.len() > 24 => {
            // Forge the IHDR size (the CRC is then wrong too, as an attacker's would be).
            let w = [0u32, 1, 7, 12000, 65535, u32::MAX][rng.below(6)];
            b[16..20].copy_from_slice(&w.to_be_bytes());
        }
        4 => {
            let start = rng.below(b.len());
            for x in &mut b[start..(start + 256).min(seed.len())] {
                *x = rng.next() as u8;
            }
        }
        _ => {
            let n = rng.below(4096);
            b = rng.bytes(n);
        }
    }
    b
}

#[tokio::test]
async fn mutated_images_and_malformed_requests_never_get_5xx_or_hang() {
    let s = Server::start(&tiny_config("[limits]\nclassify_deadline_ms = 20000\nattack_deadline_ms = 60000\n"));
    let seeds = [
        small("n02391049_zebra.JPEG", image::ImageFormat::Jpeg),
        small("n02219486_ant.JPEG", image::ImageFormat::Png),
        small("n01440764_tench.JPEG", image::ImageFormat::WebP),
        small("n02007558_flamingo.JPEG", image::ImageFormat::Gif),
        small("n02444819_otter.JPEG", image::ImageFormat::Bmp),
    ];
    let types = [
        "image/png",
        "image/jpeg",
        "application/octet-stream",
        "text/plain",
        "",
        "image/x-nope",
        "multipart/form-data",
    ];
    let mut rng = Rng(0x5EED_1AB3_1F00_u64);
    let c = reqwest::Client::builder().timeout(Duration::from_secs(90)).build().unwrap();
    let mut requests = Vec::new();
    for i in 0..3000 {
        let seed = &seeds[rng.below(seeds.len())];
        let img = mutate(&mut rng, seed);
        let req = match rng.below(10) {
            0..=4 => {
                let ct = types[rng.below(types.len())];
                let r = c.post(s.url("/classify")).body(img);
                if ct.is_empty() { r } else { r.header("content-type", ct) }
            }
            5 => c.post(s.url("/classify")).multipart(multipart_image(img, "x")),
            6 => {
                let b64 = base64::engine::general_purpose::STANDARD.encode(&img);
                let key = ["image", "imag", "top_k"][rng.below(3)];
                let body = format!("{{\"{key}\": \"{b64}\", \"top_k\": {}}}", [0i64, 1, 5, -3, 99999][rng.below(5)]);
                c.post(s.url("/classify")).header("content-type", "application/json").body(body)
            }
            7 => c
                .post(s.url(["/attack?max_iter=2", "/attack?max_iter=2&method=fgsm", "/target-label"][rng.below(3)]))
                .header("content-type", "image/png")
                .body(img),
            8 => {
                // Malformed Open Inference Protocol bodies.
                let cut = rng.below(200);
                let bodies = [
                    format!("{{\"inputs\": [{{\"name\": \"input\", \"shape\": [1, 3, 32, 32], \"datatype\": \"FP32\", \"data\": [{}]}}]}}", rng.below(5000)),
                    "{\"inputs\": [{\"name\": \"image\", \"shape\": [-1], \"datatype\": \"BYTES\", \"data\": [[[[]]]]}]}".into(),
                    format!("{{\"inputs\": [{{\"name\": \"x\", \"shape\": [{}], \"datatype\": \"BYTES\", \"data\": [true, null, {{}}]}}]}}", rng.next()),
                    "[".repeat(cut),
                    String::from_utf8_lossy(&rng.bytes(cut)).into_owned(),
                ];
                c.post(s.url("/v2/models/tiny/infer"))
                    .header("content-type", "application/json")
                    .body(bodies[rng.below(bodies.len())].clone())
            }
            _ => {
                // Odd queries on every route.
                let n = 1 + rng.below(40);
                let q: String = rng.bytes(n).iter().map(|b| (b'!' + b % 90) as char).collect();
                let path = ["/classify", "/target-label", "/attack", "/models", "/v2/models/tiny"][rng.below(5)];
                c.post(format!("{}?{}", s.url(path), q.replace('#', "%23")))
                    .header("content-type", "image/png")
                    .body(img)
            }
        };
        requests.push((i, req));
    }
    let results: Vec<(usize, Result<u16, String>)> = futures::stream::iter(requests)
        .map(|(i, req)| async move { (i, req.send().await.map(|r| r.status().as_u16()).map_err(|e| e.to_string())) })
        .buffer_unordered(8)
        .collect()
        .await;
    let mut failures = Vec::new();
    for (i, r) in &results {
        match r {
            Ok(st) if *st < 500 => {}
            other => failures.push(format!("request {i}: {other:?}")),
        }
    }
    // Mutations must leave enough decodable images that the model path is fuzzed too.
    let served = results.iter().filter(|(_, r)| matches!(r, Ok(200))).count();
    assert!(served >= 300, "only {served} of {} requests were served", results.len());
    assert!(
        failures.is_empty(),
        "{} of {} failed:\n{}\n{}",
        failures.len(),
        results.len(),
        failures.join("\n"),
        s.log()
    );
    assert_eq!(reqwest::get(s.url("/health")).await.unwrap().status(), 200);
    let ok = c
        .post(s.url("/classify"))
        .header("content-type", "image/jpeg")
        .body(read_fixture("images/n02391049_zebra.JPEG"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
}

//! The engine in-process: pass counting, batching equivalence, cancellation.

mod common;

use std::time::Duration;

use common::*;
use labelfool::config::{Config, ModelConfig};
use labelfool::engine::{AttackRequest, AttackResult, Engine};
use labelfool::model::Catalog;

const DEADLINE: Duration = Duration::from_secs(600);

fn config(model: &str, tweak: impl FnOnce(&mut Config)) -> Config {
    let mut c = Config::default();
    c.engine.device = labelfool::config::DeviceSpec::Cpu;
    c.models.push(ModelConfig::bundle(model, &models_dir().join(model).to_string_lossy()));
    tweak(&mut c);
    c.validate().unwrap();
    c
}

/// The delivered PNG re-classified by the model itself (the engine's classify, as `/classify`
/// does it), and the attack's reported success held to it. Returns whether it is adversarial.
async fn assert_delivers(e: &Engine, r: &AttackResult, what: &str) -> bool {
    let c = e.classify(None, r.png.clone().into(), DEADLINE).await.unwrap();
    let top1 = labelfool::engine::top_k(&c.probabilities, 1)[0].0 as u64;
    assert_verdict(top1, &outcome_report(&r.outcome), what)
}

async fn engine(c: &Config) -> Engine {
    let (engine, startup) = Engine::start(c, Catalog::from_config(c).unwrap()).unwrap();
    tokio::task::spawn_blocking(move || startup.wait()).await.unwrap().unwrap();
    engine
}

#[tokio::test]
async fn an_attack_of_k_iterations_runs_k_backward_passes() {
    let e = engine(&config("efficientnet-lite0", |_| {})).await;
    for name in ["n01440764_tench.JPEG", "n02391049_zebra.JPEG"] {
        let before = e.stats().snapshot();
        let r = e
            .attack(None, read_fixture(&format!("images/{name}")).into(), AttackRequest::default(), DEADLINE)
            .await
            .unwrap();
        let after = e.stats().snapshot();
        let o = &r.outcome;
        assert!(o.success, "{name}");
        assert!(o.iterations >= 2, "{name}: a one-step attack would not tell k from 2k");
        assert_eq!(
            after.backward_passes - before.backward_passes,
            u64::from(o.iterations),
            "{name}: one backward pass per iteration"
        );
        // Forward passes: one per iteration (the first doubles as the original's classification),
        // per 8-bit check the tick that found the margin reached plus the check itself, and one
        // per refinement check after success.
        let forwards = after.forward_passes - before.forward_passes;
        assert_eq!(forwards, u64::from(o.iterations + 2 * o.checks + o.refinements), "{name}: forward passes");
        assert!(assert_delivers(&e, &r, name).await, "{name}: the delivered PNG is not adversarial");
    }
    e.shutdown();
}

#[tokio::test]
async fn batched_classification_equals_unbatched() {
    let images: Vec<Vec<u8>> = sample_images().iter().map(|p| std::fs::read(p).unwrap()).collect();
    let inputs: Vec<Vec<u8>> = (0..32).map(|i| images[i % images.len()].clone()).collect();
    // Alone: batches of one, submitted one after the other.
    let alone_cfg = config("efficientnet-lite0", |c| c.engine.max_batch_size = 1);
    let alone = engine(&alone_cfg).await;
    let mut single = Vec::new();
    for bytes in &inputs {
        let c = alone.classify(None, bytes.clone().into(), DEADLINE).await.unwrap();
        assert_eq!(c.timings.batch_size, 1);
        single.push(c.probabilities);
    }
    alone.shutdown();
    // Together: all 32 submitted at once, batched (the worker waits up to 50 ms to fill a batch).
    let batched_cfg = config("efficientnet-lite0", |c| {
        c.engine.max_batch_size = 32;
        c.engine.max_batch_wait_ms = 50;
    });
    let e = engine(&batched_cfg).await;
    let results = futures::future::join_all(inputs.iter().map(|b| e.classify(None, b.clone().into(), DEADLINE))).await;
    let mut max_batch = 0;
    for (i, r) in results.into_iter().enumerate() {
        let c = r.unwrap();
        max_batch = max_batch.max(c.timings.batch_size);
        let top = |p: &[f32]| labelfool::engine::top_k(p, 5).into_iter().map(|(i, _)| i).collect::<Vec<_>>();
        assert_eq!(top(&c.probabilities), top(&single[i]), "image {i}: top-5 differs between batched and alone");
        let diff = c.probabilities.iter().zip(&single[i]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff <= 1e-5, "image {i}: probabilities differ by {diff}");
    }
    assert!(max_batch >= 8, "the requests were not batched (largest batch {max_batch})");
    e.shutdown();
}

#[tokio::test]
async fn continuously_batched_attacks_equal_attacks_alone() {
    let files: Vec<_> = sample_images().into_iter().take(8).collect();
    let e = engine(&config("efficientnet-lite0", |c| c.engine.max_attack_batch = 8)).await;
    // Each attack alone, and the worker ticks it took (measured: iterations, the checks, and the
    // refinement and pruning checks after success).
    let (mut alone, mut ticks_alone) = (Vec::new(), Vec::new());
    for p in &files {
        let before = e.stats().snapshot().attack_ticks;
        alone.push(e.attack(None, std::fs::read(p).unwrap().into(), AttackRequest::default(), DEADLINE).await.unwrap());
        ticks_alone.push(e.stats().snapshot().attack_ticks - before);
    }
    let ticks_before = e.stats().snapshot().attack_ticks;
    let together = futures::future::join_all(
        files.iter().map(|p| e.attack(None, std::fs::read(p).unwrap().into(), AttackRequest::default(), DEADLINE)),
    )
    .await;
    let ticks = e.stats().snapshot().attack_ticks - ticks_before;
    let mut max_batch = 0;
    let mut together_results = Vec::new();
    for ((p, a), t) in files.iter().zip(&alone).zip(together) {
        let t = t.unwrap();
        let name = p.file_name().unwrap().to_string_lossy();
        max_batch = max_batch.max(t.timings.batch_size);
        assert_eq!(t.outcome.target, a.outcome.target, "{name}: target");
        assert_eq!(t.outcome.final_.index, a.outcome.final_.index, "{name}: final label");
        assert_eq!(t.outcome.iterations, a.outcome.iterations, "{name}: iterations");
        let (pa, pt) = (a.perturbation.perceptibility, t.perturbation.perceptibility);
        assert!((pa - pt).abs() <= 0.01 * pa, "{name}: perceptibility {pt} vs {pa} alone");
        together_results.push((name.to_string(), t));
    }
    assert_eq!(max_batch, 8, "all eight attacks must share the first tick");
    // Rows share ticks instead of queueing: the batch needs about as many ticks as its longest
    // attack (plus one per row that joined late — decoding is bounded to one image per core).
    let (longest, sum) = (*ticks_alone.iter().max().unwrap(), ticks_alone.iter().sum::<u64>());
    assert!(ticks <= longest + files.len() as u64, "{ticks} ticks; the longest attack alone takes {longest}");
    assert!(2 * ticks < sum, "{ticks} ticks for attacks that take {sum} one after the other");
    // What each batched attack reports is what its delivered PNG is.
    for (name, t) in &together_results {
        assert_delivers(&e, t, name).await;
    }
    e.shutdown();
}

/// `engine.batch_padding = "pow2"` (the CUDA default) through the worker: the model is warmed up
/// at load, and three attacks sharing ticks (batches of 3, padded to 4) end as they do unpadded.
#[tokio::test]
async fn padded_batches_end_attacks_as_unpadded_ones() {
    use labelfool::config::BatchPadding;
    let files: Vec<_> = sample_images().into_iter().take(3).collect();
    let run = |padding: BatchPadding| {
        let files = files.clone();
        async move {
            let e = engine(&config("efficientnet-lite0", |c| {
                c.engine.max_attack_batch = 4;
                c.engine.batch_padding = padding;
            }))
            .await;
            let passes = e.stats().snapshot().forward_passes;
            let r = futures::future::join_all(
                files
                    .iter()
                    .map(|p| e.attack(None, std::fs::read(p).unwrap().into(), AttackRequest::default(), DEADLINE)),
            )
            .await;
            e.shutdown();
            (r.into_iter().map(Result::unwrap).collect::<Vec<_>>(), passes)
        }
    };
    let (plain, plain_passes) = run(BatchPadding::Off).await;
    let (padded, padded_passes) = run(BatchPadding::Pow2).await;
    // Passes before any request: the warm-up runs sizes 1, 2 and 4, each a no-grad forward and a
    // forward for the backward.
    assert_eq!(padded_passes, plain_passes + 6, "forward passes at start, padded vs plain");
    let shared = padded.iter().map(|b| b.timings.batch_size).max().unwrap_or(0);
    assert!(shared >= 2, "the attacks did not share a tick");
    for ((p, a), b) in files.iter().zip(&plain).zip(&padded) {
        let name = p.file_name().unwrap().to_string_lossy();
        assert_eq!(b.outcome.target, a.outcome.target, "{name}: target");
        assert_eq!(b.outcome.final_.index, a.outcome.final_.index, "{name}: final label");
        assert_eq!(b.outcome.iterations, a.outcome.iterations, "{name}: iterations");
        let (pa, pb) = (a.perturbation.perceptibility, b.perturbation.perceptibility);
        assert!((pa - pb).abs() <= 0.01 * pa, "{name}: perceptibility {pb} padded vs {pa}");
    }
}

//! The engine in-process: pass counting, batching equivalence, cancellation.

mod common;

use std::time::Duration;

use common::*;
use labelfool::config::{Config, ModelConfig};
use labelfool::engine::{AttackRequest, Engine};
use labelfool::model::Catalog;

const DEADLINE: Duration = Duration::from_secs(600);

fn config(model: &str, tweak: impl FnOnce(&mut Config)) -> Config {
    let mut c = Config::default();
    c.engine.device = "cpu".into();
    c.models.push(ModelConfig {
        name: model.into(),
        dir: models_dir().join(model).to_string_lossy().into_owned(),
        matrix: None,
        max_batch_size: None,
        max_batch_wait_ms: None,
    });
    tweak(&mut c);
    c.validate().unwrap();
    c
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
        // and per 8-bit check the tick that found the margin reached plus the check itself.
        let forwards = after.forward_passes - before.forward_passes;
        assert_eq!(forwards, u64::from(o.iterations + 2 * o.checks), "{name}: forward passes");
    }
    e.shutdown();
}

//! `labelfool attack` and `labelfool target-label`: the server's routes, offline.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use super::Cli;
use crate::engine::AttackRequest;
use crate::engine::OFFLINE_DEADLINE;

#[derive(Debug, clap::Args)]
pub struct AttackArgs {
    pub image: PathBuf,
    /// Where to write the adversarial PNG.
    #[arg(short, long)]
    pub output: PathBuf,
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long)]
    pub method: Option<String>,
    /// Target class (index, WordNet id or name) instead of LabelFool's choice.
    #[arg(long)]
    pub target: Option<String>,
    #[arg(long)]
    pub max_iter: Option<u32>,
    #[arg(long)]
    pub overshoot: Option<f64>,
    #[arg(long)]
    pub delta1: Option<f64>,
    #[arg(long)]
    pub delta2: Option<f64>,
    /// FGSM step size(s) on the [0,1] pixel scale (comma-separated: the smallest that fools).
    #[arg(long, value_delimiter = ',')]
    pub epsilon: Option<Vec<f64>>,
    /// DeepFool / SparseFool: classes considered (default 10).
    #[arg(long)]
    pub candidates: Option<usize>,
    /// SparseFool's λ (default 3).
    #[arg(long)]
    pub lambda: Option<f64>,
    /// SparseFool's cap on outer iterations (default 50).
    #[arg(long)]
    pub max_outer: Option<u32>,
    /// PGD's step size on the [0,1] pixel scale (default 2.5·epsilon/max_iter).
    #[arg(long)]
    pub step: Option<f64>,
    /// Also run the float attack (no 8-bit rounding) and report its perceptibility.
    #[arg(long)]
    pub float_reference: bool,
    /// Print the result as JSON (the same fields as POST /attack, without the PNG).
    #[arg(long)]
    pub json: bool,
}

pub async fn run_attack(cli: &Cli, a: &AttackArgs) -> anyhow::Result<ExitCode> {
    let config = super::load_config(cli)?;
    let bytes = std::fs::read(&a.image).with_context(|| format!("cannot read {}", a.image.display()))?;
    let (engine, _) = super::start_engine(&config).await?;
    let req = AttackRequest {
        method: a.method.clone(),
        target: a.target.clone(),
        max_iter: a.max_iter,
        overshoot: a.overshoot,
        delta1: a.delta1,
        delta2: a.delta2,
        epsilons: a.epsilon.clone(),
        candidates: a.candidates,
        lambda: a.lambda,
        max_outer: a.max_outer,
        step: a.step,
        float_reference: a.float_reference,
        margin: None,
    };
    let remotes = crate::remote::Remotes::from_configs(&config.remotes).map_err(anyhow::Error::msg)?;
    let service = crate::service::AttackService::new(engine.clone(), std::sync::Arc::new(remotes), OFFLINE_DEADLINE);
    let order = crate::service::AttackOrder { model: a.model.clone(), request: req, ..Default::default() };
    let report = service.attack(order, bytes.into()).await;
    super::stop_engine(engine).await;
    let r = match report? {
        crate::service::AttackReport::Local(v) => v.result,
        crate::service::AttackReport::Remote(_) => {
            anyhow::bail!(
                "`labelfool attack` runs on a model of this configuration; attack a remote through the server"
            )
        }
    };
    std::fs::write(&a.output, &r.png).with_context(|| format!("cannot write {}", a.output.display()))?;
    let o = &r.outcome;
    let classes = r.model.classes();
    if a.json {
        let mut v = serde_json::to_value(crate::http::attack::summary(&r))?;
        if let Some(obj) = v.as_object_mut() {
            obj.remove("png_base64");
            obj.insert("output".into(), serde_json::json!(a.output));
        }
        println!("{v}");
    } else {
        println!(
            "{}: {} ({:.1}%) → {} ({:.1}%) via {}{}",
            if o.success { "success" } else { "FAILED" },
            classes.label(o.original.index),
            o.original.probability * 100.0,
            classes.label(o.final_.index),
            o.final_.probability * 100.0,
            o.method.name(),
            o.target.map(|t| format!(", target {} ({t})", classes.label(t))).unwrap_or_default(),
        );
        println!(
            "  iterations {}  checks {}  margin {}  perceptibility {:.3e}  L2 {:.3}  Linf {:.4}  {:.0} ms",
            o.iterations,
            o.checks,
            o.margin.map(|m| m.to_string()).unwrap_or_else(|| "-".into()),
            r.perturbation.perceptibility,
            r.perturbation.l2,
            r.perturbation.linf,
            r.timings.total_ms
        );
        println!("  wrote {}", a.output.display());
    }
    Ok(if o.success { ExitCode::SUCCESS } else { ExitCode::from(2) })
}

#[derive(Debug, clap::Args)]
pub struct TargetArgs {
    /// Image to decide a target for (POST /target-label).
    #[arg(required_unless_present = "class", conflicts_with = "class")]
    pub image: Option<PathBuf>,
    /// Preview for a class instead (GET /target-label): index, WordNet id or name.
    #[arg(long)]
    pub class: Option<String>,
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    #[arg(long)]
    pub delta1: Option<f64>,
    #[arg(long)]
    pub delta2: Option<f64>,
}

pub async fn run_target(cli: &Cli, a: &TargetArgs) -> anyhow::Result<ExitCode> {
    let config = super::load_config(cli)?;
    if let Some(class) = &a.class {
        // The preview needs only the matrix: no worker, no libtorch.
        let catalog = crate::model::Catalog::from_config(&config)?;
        let (_, info) = catalog.get(a.model.as_deref()).context("unknown model")?;
        let m = info.matrix().with_context(|| format!("model {} has no distance matrix", info.name))?;
        let c = info.classes().resolve(class).with_context(|| format!("{class:?} is not a class of {}", info.name))?;
        println!("{} ({c}) → nearest under {} ({}):", info.classes().label(c), info.name, m.meta.method);
        for (i, d) in m.nearest(c, a.top) {
            println!("  {:>4}  {:<30} {:.4}", i, info.classes().label(i), d);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let path = a.image.as_ref().context("an image or --class is required")?;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (engine, _) = super::start_engine(&config).await?;
    let t = engine
        .target_label(a.model.as_deref(), bytes.into(), a.delta1, a.delta2, a.top.saturating_sub(1), OFFLINE_DEADLINE)
        .await;
    super::stop_engine(engine).await;
    let t = t?;
    let info = &t.classification.model;
    let d = &t.decision;
    println!(
        "prediction {} (p̂1 = {:.3}); branch {:?}; target {} ({})",
        info.classes().label(d.predicted),
        d.p1,
        d.branch,
        info.classes().label(d.target),
        d.target
    );
    println!(
        "  candidate set S: {}",
        d.candidates
            .iter()
            .map(|(i, p)| format!("{} {:.3}", info.classes().label(*i), p))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (i, s) in &d.ranking {
        println!("  {:>4}  {:<30} {:.4}", i, info.classes().label(*i), s);
    }
    Ok(ExitCode::SUCCESS)
}

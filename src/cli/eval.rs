//! `labelfool eval`: the paper's comparison on your model and images.

use std::path::PathBuf;
use std::process::ExitCode;

use super::Cli;
use crate::attack::Method;
use crate::engine::AttackRequest;
use crate::eval::{self, EvalOptions, report};

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// A flat folder of `<wnid>_*.JPEG` files or an ImageFolder tree (`DIR/<class>/*`).
    #[arg(long)]
    pub images: PathBuf,
    /// Comma-separated attack methods: labelfool, deepfool, fgsm, sparsefool (and pgd).
    #[arg(long, value_delimiter = ',', default_value = "labelfool,deepfool,fgsm,sparsefool")]
    pub methods: Vec<String>,
    #[arg(long)]
    pub model: Option<String>,
    /// Output directory: results.jsonl, summary.json, report.md.
    #[arg(long)]
    pub out: PathBuf,
    /// Only the first N images (sorted by path).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Attacks in flight at once (default: engine.max_inflight_attacks).
    #[arg(long)]
    pub concurrency: Option<usize>,
    #[arg(long)]
    pub max_iter: Option<u32>,
    #[arg(long)]
    pub overshoot: Option<f64>,
    /// SparseFool: λ, how far past the boundary point the linear problem is set (default 3).
    #[arg(long)]
    pub lambda: Option<f64>,
    /// SparseFool: the outer-iteration cap (default 20).
    #[arg(long)]
    pub max_outer: Option<u32>,
    /// Images (the first, by path) that get a gallery panel per method.
    #[arg(long, default_value_t = 4)]
    pub gallery: usize,
    /// FGSM step size(s), comma-separated (default: the search over 0.5/255 … 32/255).
    #[arg(long, value_delimiter = ',')]
    pub epsilon: Option<Vec<f64>>,
    /// Also run each attack the paper's way (float image, no 8-bit rounding) on the same image and
    /// target, and report delivered ÷ float perceptibility per method (attacks cost twice).
    #[arg(long)]
    pub float_reference: bool,
    /// Other configured models that classify every delivered image, or remote targets as
    /// `remote:<name>`: the report gets a transfer matrix (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub verify: Vec<String>,
}

pub async fn run(cli: &Cli, a: &EvalArgs) -> anyhow::Result<ExitCode> {
    let config = super::load_config(cli)?;
    let methods = a
        .methods
        .iter()
        .map(|m| Method::parse(m).ok_or_else(|| anyhow::anyhow!("unknown method {m:?}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let remotes = crate::remote::Remotes::from_configs(&config.remotes).map_err(anyhow::Error::msg)?;
    let (engine, _) = super::start_engine(&config).await?;
    let opts = EvalOptions {
        images: a.images.clone(),
        methods,
        model: a.model.clone(),
        out: a.out.clone(),
        limit: a.limit,
        concurrency: a.concurrency.unwrap_or(config.engine.max_inflight_attacks),
        gallery: a.gallery,
        verify: a.verify.clone(),
        remotes: std::sync::Arc::new(remotes),
        request: AttackRequest {
            max_iter: a.max_iter,
            overshoot: a.overshoot,
            lambda: a.lambda,
            max_outer: a.max_outer,
            epsilons: a.epsilon.clone(),
            float_reference: a.float_reference,
            ..Default::default()
        },
    };
    let out = eval::run(&engine, &opts).await;
    let (_, info) = engine.model(a.model.as_deref())?;
    super::stop_engine(engine).await;
    let out = out?;
    let summary = report::summarise(&info.name, &a.images, &out);
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let md = report::markdown(&a.out, &summary, &out, &command);
    report::write(&a.out, &summary, &md)?;
    for m in &summary.methods {
        eprintln!(
            "{:<11} attack rate {:.1}% ({}/{}), mean iterations {:.1}, mean perceptibility {:.2e}, Wu-Palmer {}, {:.2} s/image{}",
            m.method,
            m.attack_rate * 100.0,
            m.successes,
            m.attacked,
            m.mean_iterations,
            m.mean_perceptibility,
            m.mean_wup.map(|w| format!("{w:.3}")).unwrap_or_else(|| "–".into()),
            m.seconds_per_image,
            if m.errors > 0 { format!(", {} file(s) skipped", m.errors) } else { String::new() }
        );
    }
    eprintln!("report: {}", a.out.join("report.md").display());
    Ok(if out.interrupted { ExitCode::from(130) } else { ExitCode::SUCCESS })
}

//! `labelfool classify IMAGE…`: the server's classify path, offline.

use std::path::PathBuf;
use std::process::ExitCode;

use super::Cli;
use crate::engine::OFFLINE_DEADLINE;

#[derive(Debug, clap::Args)]
pub struct ClassifyArgs {
    /// Image files.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    /// One JSON object per image (JSON Lines) instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(cli: &Cli, args: &ClassifyArgs) -> anyhow::Result<ExitCode> {
    let config = super::load_config(cli)?;
    anyhow::ensure!(args.top_k >= 1, "--top-k must be at least 1");
    let (engine, _) = super::start_engine(&config).await?;
    // Submit every image at once: the engine batches them as it would concurrent requests.
    let jobs = args.images.iter().map(|path| {
        let engine = engine.clone();
        let model = args.model.clone();
        let path = path.clone();
        async move {
            let bytes = tokio::fs::read(&path).await.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let c = engine
                .classify(model.as_deref(), bytes.into(), OFFLINE_DEADLINE)
                .await
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            anyhow::Ok((path, c))
        }
    });
    let results = futures::future::join_all(jobs).await;
    let mut failures = 0;
    for r in results {
        match r {
            Err(e) => {
                failures += 1;
                eprintln!("error: {e}");
            }
            Ok((path, c)) => {
                let top = c.top(args.top_k);
                if args.json {
                    let top: Vec<_> = top
                        .iter()
                        .map(|&(i, p)| {
                            let info = c.model.classes().get(i);
                            serde_json::json!({"index": i, "label": c.model.classes().label(i), "wnid": info.and_then(|c| c.wnid.clone()), "probability": p})
                        })
                        .collect();
                    println!(
                        "{}",
                        serde_json::json!({"file": path, "model": c.model.name, "image": c.image, "top": top})
                    );
                } else {
                    println!("{}  ({}×{} {})", path.display(), c.image.width, c.image.height, c.image.format);
                    for (rank, (i, p)) in top.iter().enumerate() {
                        println!("  {:>2}. {:>6.2}%  {:>4}  {}", rank + 1, p * 100.0, i, c.model.classes().label(*i));
                    }
                }
            }
        }
    }
    super::stop_engine(engine).await;
    Ok(if failures == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

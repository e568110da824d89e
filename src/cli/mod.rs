//! The `labelfool` command line. Every offline command starts the same [`Engine`] the server uses,
//! so `labelfool classify` and `POST /classify` share one code path.

mod attack;
mod classify;
mod doctor;
mod eval;
mod matrix;
mod model;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, default_config_path};
use crate::engine::{Engine, WorkerInfo};
use crate::model::Catalog;
use crate::telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "labelfool",
    version,
    about = "LabelFool server: classification and hard-to-notice adversarial labels"
)]
pub struct Cli {
    /// Configuration file (default: config/default.toml found from the working directory).
    #[arg(long, global = true, env = "LABELFOOL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Device override: auto, cpu, cuda or cuda:N.
    #[arg(long, global = true)]
    pub device: Option<String>,
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "LABELFOOL_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server.
    Serve(serve::ServeArgs),
    /// Classify images offline (same pipeline as POST /classify).
    Classify(classify::ClassifyArgs),
    /// Attack one image offline and write the adversarial PNG (same pipeline as POST /attack).
    Attack(attack::AttackArgs),
    /// LabelFool's target for an image, or the nearest classes to a class.
    TargetLabel(attack::TargetArgs),
    /// Print the OpenAPI document.
    Openapi {
        /// Write to this file instead of stdout.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Print the effective configuration (file, then environment, then flags), validated.
    Config,
    /// Report libtorch, CUDA, the chosen device and the configured models.
    Doctor(doctor::DoctorArgs),
    /// Run attacks over a folder of images and write the paper's comparison report.
    Eval(eval::EvalArgs),
    /// Build distance matrices.
    #[command(subcommand)]
    Matrix(matrix::MatrixCommand),
    /// Bring your own model: check a TorchScript or ONNX classifier and write it as a bundle.
    #[command(subcommand)]
    Model(model::ModelCommand),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::telemetry::init_logging(cli.log_format);
    // No tokio thread may grow its own OpenMP team (see `single_threaded_torch_here`).
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(crate::model::single_threaded_torch_here)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match &cli.command {
            Command::Serve(args) => serve::run(&cli, args).await,
            Command::Classify(args) => classify::run(&cli, args).await,
            Command::Attack(args) => attack::run_attack(&cli, args).await,
            Command::TargetLabel(args) => attack::run_target(&cli, args).await,
            Command::Openapi { output } => write_openapi(output.as_deref()),
            Command::Config => print_config(&cli),
            Command::Doctor(args) => doctor::run(&cli, args).await,
            Command::Eval(args) => eval::run(&cli, args).await,
            Command::Matrix(cmd) => matrix::run(&cli, cmd).await,
            Command::Model(cmd) => model::run(&cli, cmd).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_config(cli: &Cli) -> anyhow::Result<ExitCode> {
    let mut config = load_config(cli)?;
    if config.server.api_key.is_some() {
        config.server.api_key = Some("<redacted>".into());
    }
    config.jobs.database = crate::jobs::store::redact_dsn(&config.jobs.database);
    // Remote targets' headers and URLs carry their credentials.
    for r in &mut config.remotes {
        *r = r.redacted();
    }
    print!("{}", toml::to_string_pretty(&config)?);
    Ok(ExitCode::SUCCESS)
}

fn write_openapi(output: Option<&std::path::Path>) -> anyhow::Result<ExitCode> {
    let doc = crate::http::openapi::document_json();
    match output {
        Some(path) => std::fs::write(path, doc)?,
        None => print!("{doc}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// The config the command runs with: file (or the default one), env, then `--device`.
pub(crate) fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let path = cli.config.clone().or_else(default_config_path);
    let mut config = Config::load(path.as_deref())?;
    if let Some(d) = &cli.device {
        config.engine.device = crate::config::DeviceSpec::parse(d).map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    }
    config.validate()?;
    if path.is_none() {
        tracing::warn!("no config file found (config/default.toml); using built-in defaults");
    }
    Ok(config)
}

/// Opens the catalog and starts an engine, waiting until its models are loaded.
pub(crate) async fn start_engine(config: &Config) -> anyhow::Result<(Engine, WorkerInfo)> {
    let catalog = Catalog::from_config(config)?;
    let (engine, startup) = Engine::start(config, catalog)?;
    let info = tokio::task::spawn_blocking(move || startup.wait()).await??;
    Ok((engine, info))
}

/// Closes the engine's queues and waits for the worker to exit.
pub(crate) async fn stop_engine(engine: Engine) {
    let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
}

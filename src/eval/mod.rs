//! `labelfool eval`: runs attacks over a folder of images through the same engine as the server
//! and writes per-image JSON Lines, a summary and a Markdown report with the paper's tables.

pub mod report;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::attack::Method;
use crate::dataset::{self, Sample};
use crate::engine::{AttackRequest, AttackResult, Engine};
use crate::imaging::metrics::Perturbation;
use crate::model::ModelInfo;
use crate::wordnet;

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub images: PathBuf,
    pub methods: Vec<Method>,
    pub model: Option<String>,
    pub out: PathBuf,
    pub limit: Option<usize>,
    /// Attacks in flight at once (rows of the worker's continuous batch).
    pub concurrency: usize,
    /// Parameters applied to every attack (method is set per run).
    pub request: AttackRequest,
    /// How many images (the first, by path) get a gallery panel per method.
    pub gallery: usize,
    /// Other models of the engine that classify every delivered image (transfer matrix).
    /// Other models of this server, or remote targets as `remote:<name>`, that classify every
    /// upload and delivered image (the report's transfer columns).
    pub verify: Vec<String>,
    /// The configured remote targets (`remote:<name>` in `verify` names one).
    pub remotes: Arc<crate::remote::Remotes>,
}

/// A class as reports show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassBrief {
    pub index: usize,
    pub label: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wnid: Option<String>,
}

impl ClassBrief {
    fn new(info: &ModelInfo, index: usize) -> Self {
        let c = info.classes().get(index);
        Self { index, label: info.classes().label(index).to_string(), wnid: c.and_then(|c| c.wnid.clone()) }
    }
}

/// One image under one method: a line of `results.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub file: String,
    pub method: String,
    pub true_class: Option<ClassBrief>,
    /// Set when the image could not be attacked (unreadable, not an image, …).
    pub error: Option<String>,
    #[serde(flatten)]
    pub result: Option<ResultFields>,
    /// The delivered pixels, kept for gallery images only.
    #[serde(skip)]
    pub adversarial: Option<Vec<u8>>,
    #[serde(skip)]
    pub path: PathBuf,
}

impl Record {
    /// A sample's record under `method`: its result, or the `error` that says why it has none.
    pub fn of(
        info: &ModelInfo,
        sample: &Sample,
        method: Method,
        error: Option<String>,
        result: Option<ResultFields>,
    ) -> Self {
        Self {
            file: sample.path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
            method: method.name().into(),
            true_class: sample.label.map(|l| ClassBrief::new(info, l)),
            error,
            result,
            adversarial: None,
            path: sample.path.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResultFields {
    pub width: u32,
    pub height: u32,
    pub original: ClassBrief,
    pub original_probability: f64,
    pub original_correct: Option<bool>,
    pub target: Option<ClassBrief>,
    #[serde(rename = "final")]
    pub final_: ClassBrief,
    pub final_probability: f64,
    pub success: bool,
    pub iterations: u32,
    pub checks: u32,
    pub margin: Option<f64>,
    /// Image-space metrics of the delivered image (flattened: `perceptibility`, `l2`, …).
    #[serde(flatten)]
    pub perturbation: Perturbation,
    pub epsilon: Option<f64>,
    /// The class the label-space metrics compare with: the true class when the file names one,
    /// else the original prediction.
    pub reference: ClassBrief,
    /// Wu-Palmer similarity of the reference and the final (adversarial) class, ImageNet-style
    /// models only.
    pub wup: Option<f64>,
    /// The same, against the original prediction.
    pub wup_original: Option<f64>,
    /// Mistake severity: the height of the lowest common ancestor of the reference and the final
    /// class in WordNet (0 = same class; lower = milder mistake).
    pub mistake_severity: Option<u32>,
    /// With `--float-reference`: whether the paper's float attack (same image and target, no
    /// 8-bit rounding) reached the goal, and its perceptibility.
    pub float_success: Option<bool>,
    pub float_perceptibility: Option<f64>,
    pub group_reference: Option<String>,
    pub group_final: Option<String>,
    pub same_group: Option<bool>,
    pub compute_ms: f64,
    pub wall_ms: f64,
    /// With `--verify`: the delivered image classified by other models.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub transfer: Vec<TransferBrief>,
}

/// One other model's verdict on a delivered image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransferBrief {
    pub model: String,
    /// Its top-1 for the upload and for the delivered image.
    pub original: ClassBrief,
    pub adversarial: ClassBrief,
    /// Targeted: its top-1 is the target; untargeted: its label changed; None: no counterpart.
    pub transferred: Option<bool>,
}

impl TransferBrief {
    fn new(t: &crate::service::Transfer) -> Self {
        let (c, v) = (&t.classes, &t.verdict);
        let brief = |i: usize| ClassBrief {
            index: i,
            label: c.label(i).to_string(),
            wnid: c.get(i).and_then(|c| c.wnid.clone()),
        };
        Self {
            model: t.model.clone(),
            original: brief(v.original.0),
            adversarial: brief(v.adversarial.0),
            transferred: v.transferred,
        }
    }
}

impl ResultFields {
    fn new(info: &ModelInfo, sample: &Sample, r: &AttackResult, wall_ms: f64) -> Self {
        let o = &r.outcome;
        let wn = wordnet::WordNet::embedded();
        let wnid = |i: usize| info.classes().get(i).and_then(|c| c.wnid.clone());
        let reference = sample.label.unwrap_or(o.original.index);
        let (rw, fw, ow) = (wnid(reference), wnid(o.final_.index), wnid(o.original.index));
        let wup = |a: &Option<String>, b: &Option<String>| match (a, b) {
            (Some(a), Some(b)) => wn.wup(a, b),
            _ => None,
        };
        let group = |w: &Option<String>| w.as_deref().and_then(|w| wn.group(w)).map(str::to_string);
        let (group_reference, group_final) = (group(&rw), group(&fw));
        Self {
            width: r.image.width,
            height: r.image.height,
            original: ClassBrief::new(info, o.original.index),
            original_probability: o.original.probability,
            original_correct: sample.label.map(|l| l == o.original.index),
            target: o.target.map(|t| ClassBrief::new(info, t)),
            final_: ClassBrief::new(info, o.final_.index),
            final_probability: o.final_.probability,
            success: o.success,
            iterations: o.iterations,
            checks: o.checks,
            margin: o.margin,
            perturbation: r.perturbation,
            epsilon: o.epsilon,
            reference: ClassBrief::new(info, reference),
            wup: wup(&rw, &fw),
            wup_original: wup(&ow, &fw),
            float_success: r.float_reference.map(|f| f.success),
            float_perceptibility: r.float_reference.and_then(|f| f.perceptibility),
            mistake_severity: match (&rw, &fw) {
                (Some(a), Some(b)) => wn.mistake_severity(a, b),
                _ => None,
            },
            same_group: group_reference.as_ref().zip(group_final.as_ref()).map(|(a, b)| a == b),
            group_reference,
            group_final,
            compute_ms: r.timings.compute_ms,
            wall_ms,
            transfer: Vec::new(),
        }
    }
}

/// Per-method wall time, for seconds per image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MethodRun {
    pub method: String,
    pub wall_seconds: f64,
    pub completed: usize,
    pub interrupted: bool,
}

pub struct EvalOutput {
    pub records: Vec<Record>,
    pub runs: Vec<MethodRun>,
    pub interrupted: bool,
}

/// Runs every method over every sample. Ctrl-C stops scheduling, abandons what is in flight and
/// still writes a valid (partial) report.
pub async fn run(engine: &Engine, opts: &EvalOptions) -> anyhow::Result<EvalOutput> {
    let (_, info) = engine.model(opts.model.as_deref())?;
    for v in &opts.verify {
        match crate::remote::remote_name(v) {
            Some(name) => drop(opts.remotes.get(name)?),
            None => drop(engine.model(Some(v))?),
        }
    }
    let service =
        crate::service::AttackService::new(engine.clone(), opts.remotes.clone(), crate::engine::OFFLINE_DEADLINE);
    let mut samples = dataset::discover(&opts.images, info.classes())?;
    if let Some(n) = opts.limit {
        samples.truncate(n);
    }
    anyhow::ensure!(!samples.is_empty(), "no files in {}", opts.images.display());
    std::fs::create_dir_all(&opts.out)?;
    let mut jsonl = std::io::BufWriter::new(std::fs::File::create(opts.out.join("results.jsonl"))?);
    let stop = tokio_util::sync::CancellationToken::new();
    let watcher = {
        let stop = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\ninterrupted: writing a partial report");
                stop.cancel();
            }
        })
    };
    let total = (samples.len() * opts.methods.len()) as u64;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg:<12} [{bar:30}] {pos}/{len} images · {elapsed} elapsed · ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut records = Vec::new();
    let mut runs = Vec::new();
    for &method in &opts.methods {
        if stop.is_cancelled() {
            break;
        }
        bar.set_message(method.name());
        let started = Instant::now();
        let mut req = opts.request.clone();
        req.method = Some(method.name().to_string());
        let info = info.clone();
        let gallery = opts.gallery;
        let jobs = futures::stream::iter(samples.iter().cloned().enumerate()).map(|(i, sample)| {
            let (service, req, info, model) = (service.clone(), req.clone(), info.clone(), opts.model.clone());
            let verify = opts.verify.clone();
            async move {
                attack_one(&service, &info, model.as_deref(), &sample, req, method, i < gallery, &verify).await.record
            }
        });
        let mut stream = std::pin::pin!(jobs.buffer_unordered(opts.concurrency.max(1)).take_until(stop.cancelled()));
        let mut completed = 0;
        while let Some(record) = stream.next().await {
            serde_json::to_writer(&mut jsonl, &record)?;
            jsonl.write_all(b"\n")?;
            jsonl.flush()?;
            records.push(record);
            completed += 1;
            bar.inc(1);
        }
        runs.push(MethodRun {
            method: method.name().into(),
            wall_seconds: started.elapsed().as_secs_f64(),
            completed,
            interrupted: stop.is_cancelled(),
        });
    }
    bar.finish_and_clear();
    watcher.abort();
    records.sort_by(|a, b| (a.method.as_str(), a.file.as_str()).cmp(&(b.method.as_str(), b.file.as_str())));
    Ok(EvalOutput { records, runs, interrupted: stop.is_cancelled() })
}

/// One image under one method: its record, and the delivered PNG when the attack ran.
pub struct Attacked {
    pub record: Record,
    pub png: Option<Vec<u8>>,
    /// The engine could not take the work (shutting down, queue full): nothing was decided
    /// about this image, so a job leaves it for later instead of storing the error.
    pub transient: bool,
}

/// Attacks one sample and measures what happened (with transfer checks when asked).
#[allow(clippy::too_many_arguments)]
pub async fn attack_one(
    service: &crate::service::AttackService,
    info: &Arc<ModelInfo>,
    model: Option<&str>,
    sample: &Sample,
    req: AttackRequest,
    method: Method,
    keep_pixels: bool,
    verify: &[String],
) -> Attacked {
    let record = |error: Option<String>, result: Option<ResultFields>| Record::of(info, sample, method, error, result);
    let done = |record: Record| Attacked { record, png: None, transient: false };
    let bytes = match tokio::fs::read(&sample.path).await {
        Ok(b) => b,
        Err(e) => return done(record(Some(format!("cannot read: {e}")), None)),
    };
    let started = Instant::now();
    let order = crate::service::AttackOrder {
        model: model.map(str::to_string),
        request: req,
        verify: verify.to_vec(),
        ..Default::default()
    };
    match service.attack(order, bytes::Bytes::from(bytes)).await {
        Ok(crate::service::AttackReport::Local(v)) => {
            let crate::service::Verified { result: r, transfer } = *v;
            let mut fields = ResultFields::new(info, sample, &r, started.elapsed().as_secs_f64() * 1e3);
            fields.transfer = transfer.iter().map(TransferBrief::new).collect();
            let mut rec = record(None, Some(fields));
            if keep_pixels {
                rec.adversarial = Some(r.outcome.rgb);
            }
            Attacked { record: rec, png: Some(r.png), transient: false }
        }
        Ok(crate::service::AttackReport::Remote(_)) => {
            done(record(Some("eval attacks a model of this server, not a remote".into()), None))
        }
        Err(e) => {
            use crate::engine::EngineError;
            let transient = matches!(
                e,
                crate::service::ServiceError::Engine(EngineError::ShuttingDown | EngineError::QueueFull { .. })
            );
            Attacked { record: record(Some(e.to_string()), None), png: None, transient }
        }
    }
}

//! Summaries and the Markdown report of an evaluation run.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::{EvalOutput, Record, ResultFields};

/// One method's row of the paper's tables.
#[derive(Debug, Clone, Serialize)]
pub struct MethodSummary {
    pub method: String,
    pub images: usize,
    /// Images that could not be attacked (unreadable, not an image, …).
    pub errors: usize,
    pub attacked: usize,
    pub successes: usize,
    /// successes / attacked, success judged on the delivered 8-bit PNG.
    pub attack_rate: f64,
    pub mean_iterations: f64,
    /// Means over successful attacks (what the paper reports).
    pub mean_perceptibility: f64,
    pub median_perceptibility: f64,
    pub mean_l2: f64,
    pub mean_linf: f64,
    pub mean_margin: Option<f64>,
    /// Wall-clock seconds of the method's run divided by the images it completed.
    pub seconds_per_image: f64,
    pub originally_correct: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub model: String,
    pub images_dir: String,
    pub interrupted: bool,
    pub methods: Vec<MethodSummary>,
    pub runs: Vec<super::MethodRun>,
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 { f64::NAN } else { s / n as f64 }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 { v[m] } else { (v[m - 1] + v[m]) / 2.0 }
}

pub fn summarise(model: &str, images_dir: &Path, out: &EvalOutput) -> Summary {
    let mut methods = Vec::new();
    for run in &out.runs {
        let recs: Vec<&Record> = out.records.iter().filter(|r| r.method == run.method).collect();
        let done: Vec<&ResultFields> = recs.iter().filter_map(|r| r.result.as_ref()).collect();
        let ok: Vec<&ResultFields> = done.iter().copied().filter(|r| r.success).collect();
        let margins: Vec<f64> = ok.iter().filter_map(|r| r.margin).collect();
        methods.push(MethodSummary {
            method: run.method.clone(),
            images: recs.len(),
            errors: recs.len() - done.len(),
            attacked: done.len(),
            successes: ok.len(),
            attack_rate: if done.is_empty() { f64::NAN } else { ok.len() as f64 / done.len() as f64 },
            mean_iterations: mean(done.iter().map(|r| f64::from(r.iterations))),
            mean_perceptibility: mean(ok.iter().map(|r| r.perceptibility)),
            median_perceptibility: median(ok.iter().map(|r| r.perceptibility).collect()),
            mean_l2: mean(ok.iter().map(|r| r.l2)),
            mean_linf: mean(ok.iter().map(|r| r.linf)),
            mean_margin: (!margins.is_empty()).then(|| mean(margins.iter().copied())),
            seconds_per_image: if run.completed == 0 { f64::NAN } else { run.wall_seconds / run.completed as f64 },
            originally_correct: done.iter().filter(|r| r.original_correct == Some(true)).count(),
        });
    }
    Summary {
        model: model.into(),
        images_dir: images_dir.display().to_string(),
        interrupted: out.interrupted,
        methods,
        runs: out.runs.clone(),
    }
}

fn f(x: f64, digits: usize) -> String {
    if x.is_nan() { "–".into() } else { format!("{x:.digits$}") }
}

/// The Markdown report; `extra` sections (charts, semantic tables, gallery) are appended.
pub fn markdown(s: &Summary, out: &EvalOutput, command: &str, extra: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# LabelFool evaluation: {}\n", s.model);
    let _ = writeln!(md, "Images: `{}`. Command:\n\n```\n{command}\n```\n", s.images_dir);
    if s.interrupted {
        let _ = writeln!(md, "> **Interrupted**: this report covers only the images finished before Ctrl-C.\n");
    }
    let _ = writeln!(md, "## Attack rate and perceptibility\n");
    let _ = writeln!(
        md,
        "Success is judged on the delivered 8-bit PNG (targeted methods: classified as the target; untargeted: \
         not as the original class). Perceptibility is the LabelFool paper's √(mean over pixels of ‖ΔRGB‖²), \
         RGB in [0,1]; it, L2 and L∞ are means over successful attacks.\n"
    );
    let _ = writeln!(
        md,
        "| method | images | attacked | attack rate | perceptibility | median | L2 | L∞ | iterations | margin | s / image |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for m in &s.methods {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} ({}/{}) | {} | {} | {} | {} | {} | {} | {} |",
            m.method,
            m.images,
            m.attacked,
            if m.attack_rate.is_nan() { "–".into() } else { format!("{:.1}%", m.attack_rate * 100.0) },
            m.successes,
            m.attacked,
            f(m.mean_perceptibility * 1e3, 2) + "e-3",
            f(m.median_perceptibility * 1e3, 2) + "e-3",
            f(m.mean_l2, 3),
            f(m.mean_linf, 4),
            f(m.mean_iterations, 1),
            m.mean_margin.map(|x| f(x, 2)).unwrap_or_else(|| "–".into()),
            f(m.seconds_per_image, 2),
        );
    }
    md.push('\n');
    md.push_str(extra);
    let errors: Vec<&Record> = out.records.iter().filter(|r| r.error.is_some()).collect();
    if !errors.is_empty() {
        let _ = writeln!(md, "## Files that could not be attacked\n");
        for r in errors {
            let _ = writeln!(md, "- `{}` ({}): {}", r.file, r.method, r.error.as_deref().unwrap_or(""));
        }
        md.push('\n');
    }
    md
}

/// Writes `summary.json` and `report.md` into `dir`.
pub fn write(dir: &Path, s: &Summary, md: &str) -> std::io::Result<()> {
    std::fs::write(dir.join("summary.json"), serde_json::to_string_pretty(s).unwrap_or_default() + "\n")?;
    std::fs::write(dir.join("report.md"), md)
}

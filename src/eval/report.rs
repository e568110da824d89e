//! Summaries, charts, gallery and the Markdown report of an evaluation run.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::{EvalOutput, Record, ResultFields};
use crate::charts;

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
    /// Mean share of pixels changed.
    pub mean_l0_fraction: f64,
    pub mean_psnr: f64,
    pub mean_ssim: f64,
    pub mean_margin: Option<f64>,
    pub mean_epsilon: Option<f64>,
    /// Label space, over successful attacks: Wu-Palmer similarity between the reference class
    /// (true class, else the original prediction) and the adversarial class …
    pub mean_wup: Option<f64>,
    /// … and between the original prediction and the adversarial class.
    pub mean_wup_original: Option<f64>,
    /// With `--float-reference`: the float attack's success rate, and delivered ÷ float
    /// perceptibility (means over the images where both succeeded) — the price of the 8-bit
    /// guarantee.
    pub float_attack_rate: Option<f64>,
    pub delivered_over_float: Option<f64>,
    /// Mean mistake severity (height of the lowest common ancestor of the reference and the
    /// adversarial class; Bertinetto et al. 2020's "mean mistake distance").
    pub mean_mistake_severity: Option<f64>,
    /// Share of successful attacks whose adversarial class is in the reference's top-level group.
    pub same_group_rate: Option<f64>,
    /// With `--verify`: per other model, how many of the successful attacks transferred to it.
    pub transfer: Vec<TransferSummary>,
    /// Wall-clock seconds of the method's run divided by the images it completed.
    pub seconds_per_image: f64,
    pub originally_correct: usize,
}

/// One cell of the transfer matrix.
#[derive(Debug, Clone, Serialize)]
pub struct TransferSummary {
    pub model: String,
    /// Successful attacks (on the attacked model) that also fool this model the same way.
    pub transferred: usize,
    pub of: usize,
    pub rate: f64,
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

fn mean_opt(v: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let vals: Vec<f64> = v.flatten().collect();
    (!vals.is_empty()).then(|| mean(vals.into_iter()))
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 { v[m] } else { (v[m - 1] + v[m]) / 2.0 }
}

fn successes<'a>(out: &'a EvalOutput, method: &str) -> Vec<&'a ResultFields> {
    out.records.iter().filter(|r| r.method == method).filter_map(|r| r.result.as_ref()).filter(|r| r.success).collect()
}

pub fn summarise(model: &str, images_dir: &Path, out: &EvalOutput) -> Summary {
    let mut methods = Vec::new();
    for run in &out.runs {
        let recs: Vec<&Record> = out.records.iter().filter(|r| r.method == run.method).collect();
        let done: Vec<&ResultFields> = recs.iter().filter_map(|r| r.result.as_ref()).collect();
        let ok = successes(out, &run.method);
        let groups: Vec<bool> = ok.iter().filter_map(|r| r.same_group).collect();
        methods.push(MethodSummary {
            method: run.method.clone(),
            images: recs.len(),
            errors: recs.len() - done.len(),
            attacked: done.len(),
            successes: ok.len(),
            attack_rate: if done.is_empty() { f64::NAN } else { ok.len() as f64 / done.len() as f64 },
            mean_iterations: mean(done.iter().map(|r| f64::from(r.iterations))),
            mean_perceptibility: mean(ok.iter().map(|r| r.perturbation.perceptibility)),
            median_perceptibility: median(ok.iter().map(|r| r.perturbation.perceptibility).collect()),
            mean_l2: mean(ok.iter().map(|r| r.perturbation.l2)),
            mean_linf: mean(ok.iter().map(|r| r.perturbation.linf)),
            mean_l0_fraction: mean(
                ok.iter().map(|r| r.perturbation.l0 as f64 / (f64::from(r.width) * f64::from(r.height))),
            ),
            mean_psnr: mean(ok.iter().filter_map(|r| r.perturbation.psnr)),
            mean_ssim: mean(ok.iter().map(|r| r.perturbation.ssim)),
            mean_margin: mean_opt(ok.iter().map(|r| r.margin)),
            mean_epsilon: mean_opt(ok.iter().map(|r| r.epsilon)),
            mean_wup: mean_opt(ok.iter().map(|r| r.wup)),
            mean_wup_original: mean_opt(ok.iter().map(|r| r.wup_original)),
            float_attack_rate: {
                let f: Vec<bool> = done.iter().filter_map(|r| r.float_success).collect();
                (!f.is_empty()).then(|| f.iter().filter(|&&s| s).count() as f64 / f.len() as f64)
            },
            delivered_over_float: {
                let both: Vec<(f64, f64)> = ok
                    .iter()
                    .filter(|r| r.float_success == Some(true))
                    .filter_map(|r| r.float_perceptibility.map(|f| (r.perturbation.perceptibility, f)))
                    .collect();
                let float: f64 = both.iter().map(|b| b.1).sum();
                (!both.is_empty() && float > 0.0).then(|| both.iter().map(|b| b.0).sum::<f64>() / float)
            },
            mean_mistake_severity: mean_opt(ok.iter().map(|r| r.mistake_severity.map(f64::from))),
            same_group_rate: (!groups.is_empty())
                .then(|| groups.iter().filter(|&&g| g).count() as f64 / groups.len() as f64),
            transfer: {
                let mut models: Vec<&str> = Vec::new();
                for t in ok.iter().flat_map(|r| &r.transfer) {
                    if !models.contains(&t.model.as_str()) {
                        models.push(&t.model);
                    }
                }
                models
                    .into_iter()
                    .map(|m| {
                        let verdicts: Vec<bool> = ok
                            .iter()
                            .flat_map(|r| &r.transfer)
                            .filter(|t| t.model == m)
                            .filter_map(|t| t.transferred)
                            .collect();
                        let transferred = verdicts.iter().filter(|&&v| v).count();
                        TransferSummary {
                            model: m.to_string(),
                            transferred,
                            of: verdicts.len(),
                            rate: if verdicts.is_empty() {
                                f64::NAN
                            } else {
                                transferred as f64 / verdicts.len() as f64
                            },
                        }
                    })
                    .collect()
            },
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

fn fo(x: Option<f64>, digits: usize) -> String {
    x.map(|v| f(v, digits)).unwrap_or_else(|| "–".into())
}

/// Draws the charts into `dir/charts`; returns the Markdown that shows them.
fn charts_section(dir: &Path, s: &Summary, out: &EvalOutput) -> String {
    let cdir = dir.join("charts");
    if let Err(e) = std::fs::create_dir_all(&cdir) {
        return format!("(charts not written: {e})\n\n");
    }
    let rates: Vec<(String, f64)> = s
        .methods
        .iter()
        .map(|m| (m.method.clone(), if m.attack_rate.is_nan() { 0.0 } else { m.attack_rate }))
        .collect();
    let percept: Vec<(String, Vec<f64>)> = s
        .methods
        .iter()
        .map(|m| (m.method.clone(), successes(out, &m.method).iter().map(|r| r.perturbation.perceptibility).collect()))
        .collect();
    let wups: Vec<(String, Vec<f64>)> = s
        .methods
        .iter()
        .map(|m| (m.method.clone(), successes(out, &m.method).iter().filter_map(|r| r.wup).collect()))
        .collect();
    let severities: Vec<(String, Vec<f64>)> = s
        .methods
        .iter()
        .map(|m| {
            (
                m.method.clone(),
                successes(out, &m.method).iter().filter_map(|r| r.mistake_severity.map(f64::from)).collect(),
            )
        })
        .collect();
    let pairs: Vec<(String, Vec<(f64, f64)>)> = s
        .methods
        .iter()
        .map(|m| {
            (
                m.method.clone(),
                successes(out, &m.method)
                    .iter()
                    .filter_map(|r| r.wup.map(|w| (r.perturbation.perceptibility, w)))
                    .collect(),
            )
        })
        .collect();
    // The perceptibility axis covers 95% of all successful attacks, so outliers do not flatten it.
    let mut all: Vec<f64> = percept.iter().flat_map(|p| p.1.iter().copied()).collect();
    all.sort_by(f64::total_cmp);
    let p_max =
        all.get((all.len() * 95 / 100).min(all.len().saturating_sub(1))).copied().unwrap_or(0.01).max(1e-4) * 1.05;
    let mut md = String::from("## Figures\n\n");
    let mut draw = |file: &str, caption: &str, result: charts::ChartResult| match result {
        Ok(()) => {
            let _ = writeln!(md, "![{caption}](charts/{file})\n");
        }
        Err(e) => {
            let _ = writeln!(md, "({caption}: not drawn: {e})\n");
        }
    };
    draw(
        "attack_rate.png",
        "Attack rate per method",
        charts::bars(&cdir.join("attack_rate.png"), "Attack rate (8-bit PNG)", "attack rate (%)", &rates),
    );
    draw(
        "perceptibility.png",
        "Perceptibility of successful attacks",
        charts::distributions(
            &cdir.join("perceptibility.png"),
            "Image space: perceptibility",
            "perceptibility",
            &percept,
            (0.0, p_max),
            24,
        ),
    );
    if wups.iter().any(|w| !w.1.is_empty()) {
        draw(
            "wu_palmer.png",
            "Wu-Palmer similarity of true and adversarial class",
            charts::distributions(
                &cdir.join("wu_palmer.png"),
                "Label space: Wu-Palmer similarity",
                "Wu-Palmer similarity (1 = same class)",
                &wups,
                (0.0, 1.0),
                20,
            ),
        );
        let top = severities.iter().flat_map(|s| s.1.iter().copied()).fold(1.0f64, f64::max);
        draw(
            "mistake_severity.png",
            "Mistake severity: height of the lowest common ancestor of true and adversarial class",
            charts::distributions(
                &cdir.join("mistake_severity.png"),
                "Label space: mistake severity",
                "height of the lowest common ancestor (0 = same class)",
                &severities,
                (-0.5, top + 0.5),
                (top + 1.0) as usize,
            ),
        );
        draw(
            "perceptibility_vs_wu_palmer.png",
            "Perceptibility against label-space closeness",
            charts::scatter(&cdir.join("perceptibility_vs_wu_palmer.png"), "Image space vs label space", &pairs, p_max),
        );
    }
    md
}

/// Gallery panels for the records that kept their pixels.
fn gallery_section(dir: &Path, out: &EvalOutput) -> String {
    let gdir = dir.join("gallery");
    let kept: Vec<&Record> = out.records.iter().filter(|r| r.adversarial.is_some() && r.result.is_some()).collect();
    if kept.is_empty() || std::fs::create_dir_all(&gdir).is_err() {
        return String::new();
    }
    let mut md = String::from(
        "## Gallery\n\nOriginal | adversarial (the delivered PNG) | |Δ| amplified (factor in the caption).\n\n",
    );
    for r in kept {
        let (Some(res), Some(adv)) = (&r.result, &r.adversarial) else { continue };
        let Ok(original) = image::open(&r.path).map(|i| i.to_rgb8()) else { continue };
        if original.dimensions() != (res.width, res.height) {
            continue;
        }
        let name = format!("{}-{}.png", r.file.rsplit_once('.').map(|(a, _)| a).unwrap_or(&r.file), r.method);
        let k = charts::amplification(original.as_raw(), adv);
        let captions = [
            format!("original: {} ({:.0}%)", res.original.label, res.original_probability * 100.0),
            format!(
                "{}: {} ({:.0}%){}",
                r.method,
                res.final_.label,
                res.final_probability * 100.0,
                if res.success { "" } else { " FAILED" }
            ),
            format!("|Δ| ×{k:.0}, perceptibility {:.1e}", res.perturbation.perceptibility),
        ];
        let caps = [captions[0].as_str(), captions[1].as_str(), captions[2].as_str()];
        match charts::panel(&gdir.join(&name), res.width, res.height, original.as_raw(), adv, caps, k) {
            Ok(()) => {
                let _ = writeln!(md, "![{} — {}](gallery/{name})\n", r.file, r.method);
            }
            Err(e) => {
                let _ = writeln!(md, "({} — {}: panel not drawn: {e})\n", r.file, r.method);
            }
        }
    }
    md
}

/// The Markdown report (charts and gallery are drawn into `dir` as it is written).
pub fn markdown(dir: &Path, s: &Summary, out: &EvalOutput, command: &str) -> String {
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
         RGB in [0,1]; it and the other image-space metrics are means over successful attacks.\n"
    );
    let _ = writeln!(
        md,
        "| method | images | attack rate | perceptibility | median | L2 | L∞ | pixels changed | PSNR dB | SSIM | iterations | s / image |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for m in &s.methods {
        let _ = writeln!(
            md,
            "| {} | {} | {} ({}/{}) | {}e-3 | {}e-3 | {} | {} | {}% | {} | {} | {} | {} |",
            m.method,
            m.images,
            if m.attack_rate.is_nan() { "–".into() } else { format!("{:.1}%", m.attack_rate * 100.0) },
            m.successes,
            m.attacked,
            f(m.mean_perceptibility * 1e3, 2),
            f(m.median_perceptibility * 1e3, 2),
            f(m.mean_l2, 3),
            f(m.mean_linf, 4),
            f(m.mean_l0_fraction * 100.0, 2),
            f(m.mean_psnr, 1),
            f(m.mean_ssim, 4),
            f(m.mean_iterations, 1),
            f(m.seconds_per_image, 2),
        );
    }
    let _ = writeln!(md, "\n## Label space\n");
    let _ = writeln!(
        md,
        "How close the wrong label is to the right one (over successful attacks): Wu-Palmer similarity in \
         WordNet 3.0 between the true class (from the file name; the original prediction when it has none) and \
         the adversarial class, the same against the original prediction, the mistake severity (height of their \
         lowest common ancestor in WordNet, Bertinetto et al. 2020; lower is milder), and the share of \
         adversarial classes in the true class's top-level group (animal, artifact, food, plant, …).\n"
    );
    let _ = writeln!(
        md,
        "| method | Wu-Palmer (true → adversarial) | Wu-Palmer (prediction → adversarial) | mistake severity | same top-level group |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|");
    for m in &s.methods {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            m.method,
            fo(m.mean_wup, 3),
            fo(m.mean_wup_original, 3),
            fo(m.mean_mistake_severity, 2),
            m.same_group_rate.map(|r| format!("{:.1}%", r * 100.0)).unwrap_or_else(|| "–".into())
        );
    }
    md.push('\n');
    let extras: Vec<String> = s
        .methods
        .iter()
        .filter_map(|m| match (m.mean_margin, m.mean_epsilon) {
            (Some(k), _) => Some(format!("{}: mean 8-bit margin {:.2} logits", m.method, k)),
            (_, Some(e)) => Some(format!("{}: mean smallest fooling ε {:.4} ({:.1}/255)", m.method, e, e * 255.0)),
            _ => None,
        })
        .collect();
    if !extras.is_empty() {
        let _ = writeln!(md, "{}.\n", extras.join("; "));
    }
    if s.methods.iter().any(|m| m.float_attack_rate.is_some()) {
        let _ = writeln!(md, "## The price of the 8-bit guarantee\n");
        let _ = writeln!(
            md,
            "Each image was also attacked the paper's way — float image, no rounding, no margin — towards the same \
             target. Delivered ÷ float perceptibility is the mean over the images where both succeeded.\n"
        );
        let _ =
            writeln!(md, "| method | delivered attack rate | float attack rate | delivered ÷ float perceptibility |");
        let _ = writeln!(md, "|---|---:|---:|---:|");
        for m in &s.methods {
            let pct = |r: Option<f64>| r.map(|r| format!("{:.1}%", r * 100.0)).unwrap_or_else(|| "–".into());
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                m.method,
                pct(Some(m.attack_rate)),
                pct(m.float_attack_rate),
                fo(m.delivered_over_float, 3)
            );
        }
        md.push('\n');
    }
    if s.methods.iter().any(|m| !m.transfer.is_empty()) {
        let _ = writeln!(
            md,
            "## Transfer to other models
"
        );
        let _ = writeln!(
            md,
            "Each delivered image was also classified by the models below. A targeted attack (LabelFool) transfers \
             when that model's top-1 is the target; an untargeted one when that model's label changed. Rates are over \
             the attacks that succeeded on {}.\n",
            s.model
        );
        let mut models: Vec<&str> = Vec::new();
        for t in s.methods.iter().flat_map(|m| &m.transfer) {
            if !models.contains(&t.model.as_str()) {
                models.push(&t.model);
            }
        }
        let _ = writeln!(md, "| method | {} |", models.join(" | "));
        let _ = writeln!(md, "|---|{}", "---:|".repeat(models.len()));
        for m in &s.methods {
            let cells: Vec<String> = models
                .iter()
                .map(|name| match m.transfer.iter().find(|t| t.model == *name) {
                    Some(t) => format!("{:.1}% ({}/{})", t.rate * 100.0, t.transferred, t.of),
                    None => "–".into(),
                })
                .collect();
            let _ = writeln!(md, "| {} | {} |", m.method, cells.join(" | "));
        }
        md.push('\n');
    }
    md.push_str(&charts_section(dir, s, out));
    md.push_str(&gallery_section(dir, out));
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

//! The report's figures, drawn with plotters into PNG files: attack rate per method,
//! perceptibility and Wu-Palmer distributions (the paper's image-space / label-space comparison),
//! their scatter, and gallery panels (original | adversarial | amplified perturbation). The font
//! (DejaVu Sans) is embedded, so charts render on machines without fonts.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

pub type ChartResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn fonts() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
        let _ = register_font("sans-serif", FontStyle::Bold, dejavu::sans::bold());
    });
}

const COLORS: [RGBColor; 6] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

pub fn color(i: usize) -> RGBColor {
    COLORS[i % COLORS.len()]
}

/// A bar per method (values in [0, 1], drawn as %).
pub fn bars(path: &Path, title: &str, y_label: &str, values: &[(String, f64)]) -> ChartResult {
    fonts();
    let root = BitMapBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let n = values.len().max(1) as i32;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d((0..n - 1).into_segmented(), 0.0..100.0)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(y_label)
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => values.get(*i as usize).map(|v| v.0.clone()).unwrap_or_default(),
            _ => String::new(),
        })
        .label_style(("sans-serif", 15))
        .draw()?;
    for (i, (_, v)) in values.iter().enumerate() {
        let i = i as i32;
        let style = color(i as usize).filled();
        chart.draw_series(std::iter::once(Rectangle::new(
            [(SegmentValue::Exact(i), 0.0), (SegmentValue::Exact(i + 1), v * 100.0)],
            style,
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            format!("{:.1}%", v * 100.0),
            (SegmentValue::CenterOf(i), (v * 100.0 + 4.0).min(97.0)),
            ("sans-serif", 15).into_font().color(&BLACK),
        )))?;
    }
    root.present()?;
    Ok(())
}

/// Overlaid histograms (as step lines, share of each method's values per bin).
pub fn distributions(
    path: &Path,
    title: &str,
    x_label: &str,
    series: &[(String, Vec<f64>)],
    range: (f64, f64),
    bins: usize,
) -> ChartResult {
    fonts();
    let root = BitMapBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let width = (range.1 - range.0) / bins as f64;
    let shares: Vec<Vec<f64>> = series
        .iter()
        .map(|(_, v)| {
            let mut h = vec![0.0; bins];
            for &x in v.iter().filter(|x| x.is_finite()) {
                let b = (((x - range.0) / width).floor().max(0.0) as usize).min(bins - 1);
                h[b] += 1.0;
            }
            let n = v.len().max(1) as f64;
            h.iter().map(|c| c / n).collect()
        })
        .collect();
    let top = shares.iter().flatten().cloned().fold(0.0, f64::max).max(0.05) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(range.0..range.1, 0.0..top)?;
    chart.configure_mesh().x_desc(x_label).y_desc("share of images").label_style(("sans-serif", 14)).draw()?;
    for (i, ((name, _), h)) in series.iter().zip(&shares).enumerate() {
        let mut points = Vec::with_capacity(2 * bins + 2);
        for (b, &y) in h.iter().enumerate() {
            let x0 = range.0 + b as f64 * width;
            points.push((x0, y));
            points.push((x0 + width, y));
        }
        let c = color(i);
        chart
            .draw_series(LineSeries::new(points, c.stroke_width(3)))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()?;
    Ok(())
}

/// One point per successful attack: perceptibility against Wu-Palmer similarity.
pub fn scatter(path: &Path, title: &str, series: &[(String, Vec<(f64, f64)>)], x_max: f64) -> ChartResult {
    fonts();
    let root = BitMapBackend::new(path, (720, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..x_max, 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc("perceptibility")
        .y_desc("Wu-Palmer similarity")
        .label_style(("sans-serif", 14))
        .draw()?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = color(i);
        chart
            .draw_series(pts.iter().filter(|p| p.0 <= x_max).map(|&p| Circle::new(p, 4, c.mix(0.7).filled())))?
            .label(name.clone())
            .legend(move |(x, y)| Circle::new((x + 8, y), 4, c.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()?;
    Ok(())
}

/// How much to amplify |Δ| so that its 99th percentile becomes full brightness (at most ×100).
pub fn amplification(original: &[u8], adversarial: &[u8]) -> f32 {
    let mut hist = [0usize; 256];
    for (&a, &b) in original.iter().zip(adversarial) {
        hist[usize::from(a.abs_diff(b))] += 1;
    }
    let target = original.len() * 99 / 100;
    let mut seen = 0;
    let p99 = hist.iter().position(|&c| {
        seen += c;
        seen > target
    });
    (255.0 / f32::from(p99.unwrap_or(255).max(1) as u8)).clamp(1.0, 100.0)
}

/// Gallery panel: original | adversarial | |Δ|·`amplify`, each scaled to 224 px high, captioned.
pub fn panel(
    path: &Path,
    width: u32,
    height: u32,
    original: &[u8],
    adversarial: &[u8],
    captions: [&str; 3],
    amplify: f32,
) -> ChartResult {
    fonts();
    let h = 224u32;
    let w = ((width as f32) * h as f32 / height as f32).round().max(1.0) as u32;
    let delta: Vec<u8> = original
        .iter()
        .zip(adversarial)
        .map(|(&a, &b)| ((f32::from(b) - f32::from(a)).abs() * amplify).min(255.0) as u8)
        .collect();
    let scale = |rgb: &[u8]| -> Result<image::RgbImage, Box<dyn std::error::Error + Send + Sync>> {
        let img = image::RgbImage::from_raw(width, height, rgb.to_vec()).ok_or("image size mismatch")?;
        Ok(image::imageops::resize(&img, w, h, image::imageops::FilterType::Triangle))
    };
    let tiles = [scale(original)?, scale(adversarial)?, scale(&delta)?];
    let (gap, caption_h) = (8u32, 44u32);
    let (cw, ch) = (3 * w + 4 * gap, h + caption_h + gap);
    let mut canvas = image::RgbImage::from_pixel(cw, ch, image::Rgb([255, 255, 255]));
    for (i, t) in tiles.iter().enumerate() {
        image::imageops::replace(&mut canvas, t, i64::from(gap + i as u32 * (w + gap)), i64::from(gap));
    }
    let mut buf = canvas.into_raw();
    {
        let root = BitMapBackend::with_buffer(&mut buf, (cw, ch)).into_drawing_area();
        for (i, c) in captions.iter().enumerate() {
            let x = (gap + i as u32 * (w + gap)) as i32;
            root.draw(&Text::new(
                c.to_string(),
                (x, (h + gap + 8) as i32),
                ("sans-serif", 14).into_font().color(&BLACK),
            ))?;
        }
        root.present()?;
    }
    image::RgbImage::from_raw(cw, ch, buf).ok_or("canvas")?.save(path)?;
    Ok(())
}

/// Grouped bars with whiskers (a value ± its spread per category and series), in the values'
/// own units: the axis spans every bar and whisker and zero (drawn as a line), nothing is cut
/// off (a gain of 3 or of −0.5 shows whole), and each bar is labelled with its value.
pub fn grouped_bars_png(
    title: &str,
    y_label: &str,
    categories: &[String],
    series: &[(&str, &[(f64, f64)])],
) -> Result<Vec<u8>, Box<dyn std::error::Error + Send + Sync>> {
    fonts();
    let (w, h) = (760u32, 440u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    let (y0, y1) = span(series.iter().flat_map(|(_, v)| v.iter().copied()));
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE)?;
        let n = categories.len().max(1) as f64;
        let k = series.len().max(1) as f64;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(16)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..n, y0..y1)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(categories.len().max(1) * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - i as f64 - 0.5).abs() < 1e-6 {
                    categories.get(i).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc(y_label)
            .label_style(("sans-serif", 15))
            .draw()?;
        chart.draw_series(std::iter::once(PathElement::new(vec![(0.0, 0.0), (n, 0.0)], BLACK.stroke_width(1))))?;
        let slot = 0.8 / k;
        let pad = (y1 - y0) * 0.04;
        for (s, (name, values)) in series.iter().enumerate() {
            let c = color(s);
            let bars = values.iter().enumerate().map(|(i, (v, _))| {
                let x0 = i as f64 + 0.1 + s as f64 * slot;
                Rectangle::new([(x0, 0.0), (x0 + slot * 0.9, *v)], c.filled())
            });
            chart
                .draw_series(bars)?
                .label(*name)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], c.filled()));
            for (i, (v, spread)) in values.iter().enumerate() {
                let x = i as f64 + 0.1 + s as f64 * slot + slot * 0.45;
                let (lo, hi) = (v - spread, v + spread);
                if *spread > 0.0 {
                    chart.draw_series(std::iter::once(PathElement::new(
                        vec![(x, lo), (x, hi)],
                        BLACK.stroke_width(2),
                    )))?;
                }
                chart.draw_series(std::iter::once(Text::new(
                    format!("{v:.2}"),
                    (x - slot * 0.3, hi.max(*v).max(0.0) + pad),
                    ("sans-serif", 13).into_font().color(&BLACK),
                )))?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()?;
        root.present()?;
    }
    let img = image::RgbImage::from_raw(w, h, buf).ok_or("chart buffer")?;
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    Ok(png)
}

/// The y axis for bars `(value, spread)`: zero and every whisker's ends, with a margin for the
/// labels (0 to 1 when there is nothing to show).
fn span(values: impl Iterator<Item = (f64, f64)>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|(v, s)| v.is_finite() && s.is_finite())
        .fold((0.0f64, 0.0f64), |(lo, hi), (v, s)| (lo.min(v - s.abs()), hi.max(v + s.abs())));
    let margin = ((hi - lo) * 0.15).max(if hi > lo { 0.0 } else { 1.0 });
    (if lo < 0.0 { lo - margin } else { 0.0 }, hi + margin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gain_axis_holds_every_whisker_and_zero() {
        // A mean PG of 2 ± 1.5 and one of −0.4 ± 0.3: nothing is cut at 1 (100%) or at 0.
        let (lo, hi) = span([(2.0, 1.5), (-0.4, 0.3)].into_iter());
        assert!(lo < -0.7 && hi > 3.5, "{lo}..{hi}");
        let (lo, hi) = span([(0.5, 0.1)].into_iter());
        assert!(lo == 0.0 && hi > 0.6, "{lo}..{hi}");
        assert_eq!(span(std::iter::empty()), (0.0, 1.0));
        let png =
            grouped_bars_png("t", "PG", &["a".into(), "b".into()], &[("all", &[(2.0, 1.5), (-0.4, 0.3)])]).unwrap();
        image::load_from_memory_with_format(&png, image::ImageFormat::Png).unwrap();
    }
}

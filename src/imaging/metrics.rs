//! How visible a perturbation is, measured between the original and the delivered 8-bit images
//! (interleaved RGB, values read as [0,1]). Pure pixel maths: no model, no tensor.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
#[cfg_attr(feature = "http", derive(utoipa::ToSchema))]
pub struct Perturbation {
    /// The LabelFool paper's perceptibility: √(mean over pixels of ‖ΔRGB‖²).
    pub perceptibility: f64,
    /// ‖Δ‖₂ over all values.
    pub l2: f64,
    /// max |Δ| over all values.
    pub linf: f64,
    /// Pixels with any channel changed.
    pub l0: u64,
    /// Peak signal-to-noise ratio in dB (absent when nothing changed).
    pub psnr: Option<f64>,
    /// Structural similarity (Wang et al. 2004: 11×11 Gaussian window, σ = 1.5, K1 = 0.01,
    /// K2 = 0.03), the mean over R, G, B; 1 = identical. As scikit-image's `structural_similarity`.
    pub ssim: f64,
}

/// All metrics between two `width × height` interleaved RGB images.
pub fn perturbation(width: u32, height: u32, original: &[u8], adversarial: &[u8]) -> Perturbation {
    let mut p = pixel_metrics(original, adversarial);
    p.ssim = ssim(width, height, original, adversarial);
    p
}

/// SSIM's constants (Wang et al. 2004) on the [0,1] data range.
const K1: f64 = 0.01;
const K2: f64 = 0.03;
/// The Gaussian window: σ = 1.5, truncated at 3.5 σ (radius 5, so 11×11), as scikit-image does.
const SIGMA: f64 = 1.5;
const RADIUS: usize = 5;

fn gaussian_window() -> [f64; 2 * RADIUS + 1] {
    let mut w = [0.0; 2 * RADIUS + 1];
    for (i, v) in w.iter_mut().enumerate() {
        let x = i as f64 - RADIUS as f64;
        *v = (-0.5 * x * x / (SIGMA * SIGMA)).exp();
    }
    let sum: f64 = w.iter().sum();
    w.iter_mut().for_each(|v| *v /= sum);
    w
}

/// Standard SSIM of two `width × height` interleaved RGB images: per channel, the mean of the
/// SSIM map over every position where the 11×11 window fits, then the mean over R, G, B — what
/// scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5,
/// use_sample_covariance=False, data_range=1, channel_axis=2)` returns (`tests/fixtures/ssim`).
/// Images under 11 pixels on a side have no such position; they get one window over the whole
/// image with uniform weights. NaN when the buffers do not match the size.
pub fn ssim(width: u32, height: u32, a: &[u8], b: &[u8]) -> f64 {
    let (w, h) = (width as usize, height as usize);
    if a.len() != w * h * 3 || b.len() != a.len() || a.is_empty() {
        return f64::NAN;
    }
    // The three channels are independent: one thread each (this runs after every attack, and is
    // the largest part of its post-processing). Each holds 11 filtered rows, not whole planes,
    // so memory stays about half a kilobyte per column and channel whatever the height.
    let channels: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3).map(|c| s.spawn(move || channel_ssim(w, h, c, a, b))).collect();
        handles.into_iter().map(|t| t.join().unwrap_or(f64::NAN)).collect()
    });
    channels.iter().sum::<f64>() / 3.0
}

/// The five local statistics SSIM filters: x, y, x², y², xy.
const STATS: usize = 5;
/// The window's height: the rows a vertical pass reads.
const TAPS: usize = 2 * RADIUS + 1;

/// Mean SSIM of channel `c` of two interleaved RGB images.
///
/// The separable Gaussian filter, streamed: each input row is filtered horizontally into a ring
/// of the last 11, and each output row sums those 11 tap by tap, so the filtered planes are never
/// held whole. The sums are those of filtering whole planes, in the same order.
fn channel_ssim(w: usize, h: usize, c: usize, a: &[u8], b: &[u8]) -> f64 {
    let (c1, c2) = (K1 * K1, K2 * K2);
    let k = gaussian_window();
    let grey: [f64; 256] = std::array::from_fn(|v| v as f64 / 255.0);
    let value = |img: &[u8], i: usize| grey[usize::from(img[i * 3 + c])];
    if w <= 2 * RADIUS || h <= 2 * RADIUS {
        let n = (w * h) as f64;
        let mean = |f: &dyn Fn(usize) -> f64| (0..w * h).map(f).sum::<f64>() / n;
        let (ux, uy) = (mean(&|i| value(a, i)), mean(&|i| value(b, i)));
        let vx = mean(&|i| value(a, i) * value(a, i)) - ux * ux;
        let vy = mean(&|i| value(b, i) * value(b, i)) - uy * uy;
        let vxy = mean(&|i| value(a, i) * value(b, i)) - ux * uy;
        return ((2.0 * ux * uy + c1) * (2.0 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2));
    }
    let ow = w - 2 * RADIUS;
    // One input row's five statistics, and the ring of horizontally filtered rows.
    let mut src = vec![0.0; STATS * w];
    let mut ring = vec![0.0; TAPS * STATS * ow];
    let mut acc = vec![0.0; STATS * ow];
    let mut sum = 0.0;
    for y in 0..h {
        let (xs, rest) = src.split_at_mut(w);
        let (ys, rest) = rest.split_at_mut(w);
        let (xx, rest) = rest.split_at_mut(w);
        let (yy, xy) = rest.split_at_mut(w);
        for j in 0..w {
            let (p, q) = (value(a, y * w + j), value(b, y * w + j));
            (xs[j], ys[j], xx[j], yy[j], xy[j]) = (p, q, p * p, q * q, p * q);
        }
        let slot = &mut ring[(y % TAPS) * STATS * ow..(y % TAPS + 1) * STATS * ow];
        for (plane, dst) in src.chunks_exact(w).zip(slot.chunks_exact_mut(ow)) {
            dst.fill(0.0);
            for (i, &kv) in k.iter().enumerate() {
                dst.iter_mut().zip(&plane[i..i + ow]).for_each(|(d, &s)| *d += kv * s);
            }
        }
        if y + 1 < TAPS {
            continue;
        }
        // Output row y − 10: its window's rows y − 10 ..= y, in that order.
        acc.fill(0.0);
        for (i, &kv) in k.iter().enumerate() {
            let r = (y + 1 + i) % TAPS;
            let row = &ring[r * STATS * ow..(r + 1) * STATS * ow];
            acc.iter_mut().zip(row).for_each(|(d, &s)| *d += kv * s);
        }
        let (mx, rest) = acc.split_at(ow);
        let (my, rest) = rest.split_at(ow);
        let (mxx, rest) = rest.split_at(ow);
        let (myy, mxy) = rest.split_at(ow);
        for j in 0..ow {
            let (ux, uy) = (mx[j], my[j]);
            let (vx, vy, vxy) = (mxx[j] - ux * ux, myy[j] - uy * uy, mxy[j] - ux * uy);
            sum += ((2.0 * ux * uy + c1) * (2.0 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2));
        }
    }
    sum / (ow * (h - 2 * RADIUS)) as f64
}

fn pixel_metrics(original: &[u8], adversarial: &[u8]) -> Perturbation {
    assert_eq!(original.len(), adversarial.len(), "images differ in size");
    assert_eq!(original.len() % 3, 0, "not interleaved RGB");
    let pixels = (original.len() / 3).max(1) as f64;
    let (mut sum_sq, mut linf, mut l0) = (0.0f64, 0.0f64, 0u64);
    for (a, b) in original.chunks_exact(3).zip(adversarial.chunks_exact(3)) {
        let mut changed = false;
        for c in 0..3 {
            let d = (f64::from(b[c]) - f64::from(a[c])) / 255.0;
            sum_sq += d * d;
            linf = linf.max(d.abs());
            changed |= a[c] != b[c];
        }
        l0 += u64::from(changed);
    }
    let mse = sum_sq / (pixels * 3.0);
    Perturbation {
        perceptibility: (sum_sq / pixels).sqrt(),
        l2: sum_sq.sqrt(),
        linf,
        l0,
        psnr: (mse > 0.0).then(|| 10.0 * (1.0 / mse).log10()),
        ssim: 1.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_values() {
        // Two pixels; the second moves by (+51, 0, −51)/255 = (0.2, 0, −0.2).
        let a = [10, 20, 30, 100, 100, 100];
        let b = [10, 20, 30, 151, 100, 49];
        let p = perturbation(2, 1, &a, &b);
        // ‖Δ‖² per pixel: 0 and 0.08 → mean 0.04 → perceptibility 0.2.
        assert!((p.perceptibility - 0.2).abs() < 1e-12);
        assert!((p.l2 - 0.08f64.sqrt()).abs() < 1e-12);
        assert!((p.linf - 0.2).abs() < 1e-12);
        assert_eq!(p.l0, 1);
        // MSE over 6 values = 0.08/6.
        assert!((p.psnr.unwrap() - 10.0 * (6.0f64 / 0.08).log10()).abs() < 1e-9);
        let same = perturbation(2, 1, &a, &a);
        assert_eq!((same.perceptibility, same.l0), (0.0, 0));
        assert!(same.psnr.is_none());
    }
}

#[cfg(test)]
mod ssim_tests {
    use super::*;

    /// Values scikit-image gives for committed pairs (`scripts/ssim_reference.py`).
    #[test]
    fn ssim_matches_scikit_image_on_the_reference_pairs() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ssim");
        let reference: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
        let values = reference["ssim"].as_object().unwrap();
        assert!(values.len() >= 5);
        for (name, expected) in values {
            let load = |s: &str| image::open(dir.join(format!("{name}_{s}.png"))).unwrap().to_rgb8();
            let (a, b) = (load("a"), load("b"));
            let got = ssim(a.width(), a.height(), a.as_raw(), b.as_raw());
            let expected = expected.as_f64().unwrap();
            assert!((got - expected).abs() < 1e-9, "{name}: {got} vs scikit-image {expected}");
        }
    }

    #[test]
    fn ssim_is_one_for_identical_images_and_drops_with_noise() {
        let (w, h) = (32u32, 32u32);
        let a: Vec<u8> = (0..w * h * 3).map(|i| ((i * 37) % 200) as u8).collect();
        assert!((ssim(w, h, &a, &a) - 1.0).abs() < 1e-9);
        let b: Vec<u8> = a.iter().enumerate().map(|(i, &v)| v.saturating_add(((i * 7919) % 61) as u8)).collect();
        let s = ssim(w, h, &a, &b);
        assert!(s < 0.99 && s > 0.0, "{s}");
        assert_eq!(perturbation(w, h, &a, &b).ssim, s);
    }
}

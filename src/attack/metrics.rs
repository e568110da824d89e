//! How visible a perturbation is, measured between the original and the delivered 8-bit images
//! (interleaved RGB, values read as [0,1]).

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, utoipa::ToSchema)]
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
    /// Structural similarity: mean SSIM over 8×8 windows, averaged over R, G, B (1 = identical).
    pub ssim: f64,
}

/// All metrics between two `width × height` interleaved RGB images.
pub fn perturbation(width: u32, height: u32, original: &[u8], adversarial: &[u8]) -> Perturbation {
    let mut p = pixel_metrics(original, adversarial);
    p.ssim = ssim(width, height, original, adversarial);
    p
}

/// SSIM as `image-compare` computes it (8×8 windows, RGB channels averaged); 1 when either image is
/// too small for a window.
pub fn ssim(width: u32, height: u32, a: &[u8], b: &[u8]) -> f64 {
    let (Some(a), Some(b)) =
        (image::RgbImage::from_raw(width, height, a.to_vec()), image::RgbImage::from_raw(width, height, b.to_vec()))
    else {
        return f64::NAN;
    };
    image_compare::rgb_similarity_structure(&image_compare::Algorithm::MSSIMSimple, &a, &b)
        .map(|s| s.score)
        .unwrap_or(f64::NAN)
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

//! The model's preprocessing as differentiable tensor ops: resize the short side (antialiased
//! bilinear), centre-crop. Classification and every attack call this one function, so an image an
//! attack returns at its original size is judged by exactly the pipeline `/classify` uses.

use tch::{Kind, Tensor};

use super::bundle::InputSpec;

/// Size after scaling the short side to `short` (torchvision's rule: the long side is floored).
pub fn resized_dims(h: i64, w: i64, short: i64) -> (i64, i64) {
    if h <= w {
        (short, ((short as f64) * (w as f64) / (h as f64)).floor().max(1.0) as i64)
    } else {
        (((short as f64) * (h as f64) / (w as f64)).floor().max(1.0) as i64, short)
    }
}

/// `[B,3,H,W]` RGB in [0,1] → `[B,3,S,S]`, differentiable w.r.t. the input.
pub fn resize_crop(x: &Tensor, spec: &InputSpec) -> Result<Tensor, tch::TchError> {
    resize_crop_to(x, spec.resize_short_side, spec.size)
}

/// [`resize_crop`] with the short side resized to `short` and a `size` crop.
pub fn resize_crop_to(x: &Tensor, short: i64, size: i64) -> Result<Tensor, tch::TchError> {
    let dims = x.size();
    let (h, w) = (dims[2], dims[3]);
    let (nh, nw) = resized_dims(h, w, short);
    let resized = if (nh, nw) == (h, w) {
        x.shallow_clone()
    } else {
        x.f_internal_upsample_bilinear2d_aa([nh, nw], false, None, None)?
    };
    resized.f_narrow(2, crop_offset(nh, size), size)?.f_narrow(3, crop_offset(nw, size), size)
}

/// Where a centre crop of `size` starts in `resized`: torchvision's `int(round((resized − size) / 2))`,
/// and Python rounds halves to even (341 → 224 starts at 58, not 59).
pub fn crop_offset(resized: i64, size: i64) -> i64 {
    ((resized - size) as f64 / 2.0).round_ties_even() as i64
}

/// Interleaved 8-bit RGB (`H×W×3`) → `[1,3,H,W]` float in [0,1] on the CPU.
pub fn rgb8_to_tensor(rgb: &[u8], width: u32, height: u32) -> Result<Tensor, tch::TchError> {
    Tensor::f_from_slice(rgb)?
        .f_view([1, height as i64, width as i64, 3])?
        .f_permute([0, 3, 1, 2])?
        .f_to_kind(Kind::Float)?
        .f_div_scalar(255.0)
}

/// The classify pipeline on the CPU: 8-bit RGB → `[1,3,S,S]` model input. `/classify` and the
/// attacks' 8-bit re-checks both go through here, so they cannot disagree.
pub fn prepare_rgb8(rgb: &[u8], width: u32, height: u32, spec: &InputSpec) -> Result<Tensor, tch::TchError> {
    let x = rgb8_to_tensor(rgb, width, height)?;
    resize_crop(&x, spec)?.f_contiguous()
}

/// The classify pipeline as a flat `3×S×S` CHW vector: what a classify job carries to the worker.
pub fn model_input(rgb: &[u8], width: u32, height: u32, spec: &InputSpec) -> Result<Vec<f32>, tch::TchError> {
    let x = prepare_rgb8(rgb, width, height, spec)?;
    let n = x.numel();
    let mut v = vec![0f32; n];
    x.f_copy_data(&mut v, n)?;
    Ok(v)
}

/// The size after the model's resize when its longer side is within `limit`; else that size as
/// the error (a 12000×1 image resizes to 256×3,072,000).
pub fn resize_within(width: u32, height: u32, spec: &InputSpec, limit: u32) -> Result<(i64, i64), (i64, i64)> {
    let (rh, rw) = resized_dims(i64::from(height), i64::from(width), spec.resize_short_side);
    if rh.max(rw) > i64::from(limit) { Err((rh, rw)) } else { Ok((rh, rw)) }
}

/// `[1,3,H,W]` in [0,1] → interleaved 8-bit RGB, rounding to nearest (the delivered pixels).
pub fn tensor_to_rgb8(x: &Tensor) -> Result<Vec<u8>, tch::TchError> {
    let q = x
        .f_clamp(0.0, 1.0)?
        .f_mul_scalar(255.0)?
        .f_round()?
        .f_to_kind(Kind::Uint8)?
        .f_squeeze_dim(0)?
        .f_permute([1, 2, 0])?
        .f_contiguous()?
        .f_to_device(tch::Device::Cpu)?;
    let n = q.numel();
    let mut out = vec![0u8; n];
    q.f_copy_data(&mut out, n)?;
    Ok(out)
}

/// Rounds to the 8-bit grid without leaving the device: what a PNG of `x` would decode to.
pub fn quantize(x: &Tensor) -> Result<Tensor, tch::TchError> {
    x.f_clamp(0.0, 1.0)?.f_mul_scalar(255.0)?.f_round()?.f_div_scalar(255.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> InputSpec {
        InputSpec {
            size: 224,
            resize_short_side: 256,
            crop: "center".into(),
            interpolation: "bilinear-antialias".into(),
            channels: "RGB".into(),
            range: [0.0, 1.0],
            mean: None,
            std: None,
        }
    }

    #[test]
    fn short_side_rule_matches_torchvision() {
        assert_eq!(resized_dims(375, 500, 256), (256, 341));
        assert_eq!(resized_dims(500, 375, 256), (341, 256));
        assert_eq!(resized_dims(100, 100, 256), (256, 256));
    }

    #[test]
    fn centre_crop_offset_rounds_halves_to_even_as_torchvision() {
        // A 375×500 image resizes to 256×341: (341 − 224)/2 = 58.5 → 58 (Python's round).
        assert_eq!(crop_offset(341, 224), 58);
        assert_eq!(crop_offset(256, 224), 16);
        assert_eq!(crop_offset(227, 224), 2, "1.5 → 2");
        assert_eq!(crop_offset(225, 224), 0, "0.5 → 0");
        // And the crop really starts there: column 58 of the resized image is column 0 of the crop.
        let (h, w) = (256i64, 341i64);
        let x = Tensor::arange(w, (Kind::Float, tch::Device::Cpu)).view([1, 1, 1, w]).expand([1, 3, h, w], false);
        let y = resize_crop(&x.contiguous(), &spec()).unwrap();
        assert_eq!(y.double_value(&[0, 0, 0, 0]), 58.0);
    }

    #[test]
    fn output_is_the_centre_crop_and_differentiable() {
        let x = Tensor::rand([2, 3, 300, 451], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let y = resize_crop(&x, &spec()).unwrap();
        assert_eq!(y.size(), vec![2, 3, 224, 224]);
        y.sum(Kind::Float).backward();
        let g = x.grad();
        assert_eq!(g.size(), x.size());
        // Border columns fall outside the crop and must get no gradient; the centre must.
        assert_eq!(g.narrow(3, 0, 2).abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert!(g.narrow(3, 200, 20).abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }

    #[test]
    fn constant_image_stays_constant() {
        let x = Tensor::full([1, 3, 97, 53], 0.25, (Kind::Float, tch::Device::Cpu));
        let y = resize_crop(&x, &spec()).unwrap();
        let err = (y - 0.25).abs().max().double_value(&[]);
        assert!(err < 1e-6, "{err}");
    }

    #[test]
    fn rgb8_round_trips() {
        let rgb: Vec<u8> = (0..(5 * 4 * 3)).map(|i| (i * 7 % 256) as u8).collect();
        let t = rgb8_to_tensor(&rgb, 5, 4).unwrap();
        assert_eq!(t.size(), vec![1, 3, 4, 5]);
        assert_eq!(tensor_to_rgb8(&t).unwrap(), rgb);
        let q = quantize(&(t + 0.4 / 255.0)).unwrap();
        assert_eq!(tensor_to_rgb8(&q).unwrap(), rgb);
    }
}

//! Untrusted image bytes in, 8-bit RGB out (and back to PNG). The header is read first and the
//! size checked before a single pixel is decoded, so a decompression bomb costs nothing.

pub mod metrics;

use std::io::Cursor;

use image::{DynamicImage, ImageFormat, ImageReader};

#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    pub max_bytes: usize,
    pub max_pixels: u64,
    pub max_side: u32,
}

impl DecodeLimits {
    pub fn from_config(l: &crate::config::Limits) -> Self {
        Self { max_bytes: l.max_body_bytes, max_pixels: l.max_image_pixels, max_side: l.max_image_side }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("the image is empty")]
    Empty,
    #[error("the image is {size} bytes; the limit is {limit}")]
    TooManyBytes { size: usize, limit: usize },
    #[error("the image is {width}×{height} pixels; the limit is {limit} pixels and {side} per side")]
    TooManyPixels { width: u32, height: u32, limit: u64, side: u32 },
    #[error("not a recognised image format (PNG, JPEG, WebP, GIF, BMP, TIFF are)")]
    UnknownFormat,
    #[error("the {format} image cannot be decoded: {reason}")]
    Undecodable { format: &'static str, reason: String },
    #[error("cannot encode PNG: {0}")]
    Encode(String),
}

/// A decoded image: what every model sees is `rgb` (alpha is kept aside, untouched, so the
/// image returned by an attack has the alpha channel the user sent).
#[derive(Debug, Clone)]
pub struct Rgb8 {
    pub width: u32,
    pub height: u32,
    /// `height × width × 3`, row-major.
    pub rgb: Vec<u8>,
    /// `height × width` when the source had an alpha channel.
    pub alpha: Option<Vec<u8>>,
    pub format: &'static str,
}

fn format_name(f: ImageFormat) -> &'static str {
    match f {
        ImageFormat::Png => "png",
        ImageFormat::Jpeg => "jpeg",
        ImageFormat::WebP => "webp",
        ImageFormat::Gif => "gif",
        ImageFormat::Bmp => "bmp",
        ImageFormat::Tiff => "tiff",
        _ => "other",
    }
}

/// The format and size from the header alone, checked against the limits: no pixel is decoded.
fn probe(bytes: &[u8], limits: &DecodeLimits) -> Result<(ImageFormat, u32, u32), ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    if bytes.len() > limits.max_bytes {
        return Err(ImageError::TooManyBytes { size: bytes.len(), limit: limits.max_bytes });
    }
    let format = image::guess_format(bytes).map_err(|_| ImageError::UnknownFormat)?;
    let name = format_name(format);
    if format == ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        return Err(ImageError::Undecodable {
            format: name,
            reason: "truncated: no end-of-image marker after the last scan".into(),
        });
    }
    let undecodable = |e: image::ImageError| ImageError::Undecodable { format: name, reason: e.to_string() };
    let (width, height) =
        ImageReader::with_format(Cursor::new(bytes), format).into_dimensions().map_err(undecodable)?;
    let too_big = ImageError::TooManyPixels { width, height, limit: limits.max_pixels, side: limits.max_side };
    if width == 0 || height == 0 {
        return Err(ImageError::Undecodable { format: name, reason: format!("{width}×{height} has no pixels") });
    }
    if u64::from(width) * u64::from(height) > limits.max_pixels || width > limits.max_side || height > limits.max_side {
        return Err(too_big);
    }
    Ok((format, width, height))
}

/// Width and height from the header, checked against the limits (cheap: no pixel is decoded).
pub fn dimensions(bytes: &[u8], limits: &DecodeLimits) -> Result<(u32, u32), ImageError> {
    probe(bytes, limits).map(|(_, w, h)| (w, h))
}

pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<Rgb8, ImageError> {
    let (format, _, _) = probe(bytes, limits)?;
    let name = format_name(format);
    let undecodable = |e: image::ImageError| ImageError::Undecodable { format: name, reason: e.to_string() };
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut l = image::Limits::default();
    l.max_image_width = Some(limits.max_side);
    l.max_image_height = Some(limits.max_side);
    // RGBA16 is the widest buffer a decoder allocates; leave room for the decoder's own scratch.
    l.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(l);
    let img = reader.decode().map_err(undecodable)?;
    Ok(from_dynamic(img, name))
}

/// The JPEG decoder fills a truncated file's missing part with grey instead of failing, so check
/// that an end-of-image marker (FF D9) follows the last start-of-scan (FF DA). Entropy-coded data
/// stuffs every 0xFF with 0x00, so FF D9 inside a scan is always the real marker.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last_scan = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    match last_scan {
        Some(i) => bytes[i..].windows(2).any(|w| w == [0xFF, 0xD9]),
        None => false,
    }
}

fn from_dynamic(img: DynamicImage, format: &'static str) -> Rgb8 {
    let (width, height) = (img.width(), img.height());
    if img.color().has_alpha() {
        let rgba = img.into_rgba8();
        let mut rgb = Vec::with_capacity((width * height * 3) as usize);
        let mut alpha = Vec::with_capacity((width * height) as usize);
        for p in rgba.pixels() {
            rgb.extend_from_slice(&p.0[..3]);
            alpha.push(p.0[3]);
        }
        Rgb8 { width, height, rgb, alpha: Some(alpha), format }
    } else {
        Rgb8 { width, height, rgb: img.into_rgb8().into_raw(), alpha: None, format }
    }
}

/// PNG (8-bit RGB, or RGBA when `alpha` is given) of `rgb`.
///
/// Fast deflate with adaptive row filters — the `image` crate's defaults, named here because every
/// delivered image and every query a remote attack sends is encoded here, so encoding time is
/// attack time: its `Default` level takes about ten times longer on photos for files 1–8% smaller.
pub fn encode_png(width: u32, height: u32, rgb: &[u8], alpha: Option<&[u8]>) -> Result<Vec<u8>, ImageError> {
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    let mut out = Vec::new();
    let enc = PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Adaptive);
    let res = match alpha {
        Some(a) => {
            let mut rgba = Vec::with_capacity(a.len() * 4);
            for (p, &al) in rgb.chunks_exact(3).zip(a) {
                rgba.extend_from_slice(p);
                rgba.push(al);
            }
            image::ImageEncoder::write_image(enc, &rgba, width, height, image::ExtendedColorType::Rgba8)
        }
        None => image::ImageEncoder::write_image(enc, rgb, width, height, image::ExtendedColorType::Rgb8),
    };
    res.map_err(|e| ImageError::Encode(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: DecodeLimits = DecodeLimits { max_bytes: 1 << 20, max_pixels: 1_000_000, max_side: 4000 };

    fn png(w: u32, h: u32, alpha: bool) -> Vec<u8> {
        let rgb: Vec<u8> = (0..w * h * 3).map(|i| (i % 251) as u8).collect();
        let a: Vec<u8> = (0..w * h).map(|i| (i % 7 * 30) as u8).collect();
        encode_png(w, h, &rgb, alpha.then_some(a.as_slice())).unwrap()
    }

    /// A real 1×1 PNG whose IHDR (CRC fixed up) claims `w×h`: what a decompression bomb looks like
    /// to a decoder's header parser.
    pub(crate) fn png_header(w: u32, h: u32) -> Vec<u8> {
        let mut out = png(1, 1, false);
        out[16..20].copy_from_slice(&w.to_be_bytes());
        out[20..24].copy_from_slice(&h.to_be_bytes());
        let crc = crc32fast::hash(&out[12..29]);
        out[29..33].copy_from_slice(&crc.to_be_bytes());
        out
    }

    #[test]
    fn png_round_trip_keeps_pixels_and_alpha() {
        let bytes = png(7, 5, true);
        let img = decode(&bytes, &LIMITS).unwrap();
        assert_eq!((img.width, img.height, img.format), (7, 5, "png"));
        let again = encode_png(img.width, img.height, &img.rgb, img.alpha.as_deref()).unwrap();
        let img2 = decode(&again, &LIMITS).unwrap();
        assert_eq!(img.rgb, img2.rgb);
        assert_eq!(img.alpha, img2.alpha);
        assert!(decode(&png(3, 3, false), &LIMITS).unwrap().alpha.is_none());
    }

    #[test]
    fn rejects_garbage_truncation_and_bombs_without_decoding() {
        assert!(matches!(decode(b"", &LIMITS), Err(ImageError::Empty)));
        assert!(matches!(decode(b"hello, I am text", &LIMITS), Err(ImageError::UnknownFormat)));
        let full = png(64, 64, false);
        let mut jpeg = Vec::new();
        image::RgbImage::from_pixel(32, 32, image::Rgb([10, 200, 30]))
            .write_to(&mut std::io::Cursor::new(&mut jpeg), ImageFormat::Jpeg)
            .unwrap();
        assert!(decode(&jpeg, &LIMITS).is_ok());
        assert!(
            matches!(decode(&jpeg[..jpeg.len() - 10], &LIMITS), Err(ImageError::Undecodable { .. })),
            "truncated JPEG"
        );
        assert!(matches!(decode(&full[..full.len() / 2], &LIMITS), Err(ImageError::Undecodable { .. })));
        // A PNG header claiming 20000×20000: rejected from the header alone.
        let bomb = png_header(20000, 20000);
        assert!(matches!(decode(&bomb, &LIMITS), Err(ImageError::TooManyPixels { width: 20000, .. })));
        let small = DecodeLimits { max_bytes: 10, ..LIMITS };
        assert!(matches!(decode(&full, &small), Err(ImageError::TooManyBytes { .. })));
    }
}

//! One tick for a set of attack rows on one model: one no-grad forward for the rows that want an
//! 8-bit check, and one forward plus one backward per requested objective (one, for LabelFool)
//! for the rows that step. Rows may have different image sizes: the model's preprocessing for
//! all of them is [`LoadedModel::attack_inputs`] (row by row, or batched matrix products; see
//! [`crate::model::resize`]), and only the model's fixed-size input is stacked.

use tch::{Kind, Tensor};

use super::{AttackError, AttackRow, Need};
use crate::model::preprocess::{prepare_rgb8, resize_crop, tensor_to_rgb8};
use crate::model::{LoadedModel, tensor_rows};

/// Work done by one tick, for metrics and benchmarks.
#[derive(Debug, Default, Clone, Copy)]
pub struct TickStats {
    pub stepped_rows: usize,
    pub checked_rows: usize,
    pub backward_passes: usize,
}

/// Advances every row that is not done by one tick. Returns one error slot per row. A failure of
/// a batched pass is retried row by row, so one poisoned image cannot fail its neighbours.
pub fn tick(model: &LoadedModel, rows: &mut [Box<dyn AttackRow>]) -> (Vec<Option<AttackError>>, TickStats) {
    tick_with(model, rows, &mut || true)
}

/// [`tick`], calling `between` after the checks and after every backward pass, so the caller can
/// serve other work there: what waits on the worker waits for one pass, not a whole tick (a
/// DeepFool row with many candidates runs one backward pass per candidate). When `between`
/// answers false (the server is aborting) the tick stops there; its rows are then unusable.
pub fn tick_with(
    model: &LoadedModel,
    rows: &mut [Box<dyn AttackRow>],
    between: &mut dyn FnMut() -> bool,
) -> (Vec<Option<AttackError>>, TickStats) {
    let mut errors: Vec<Option<AttackError>> = (0..rows.len()).map(|_| None).collect();
    let mut stats = TickStats::default();
    let live = |need: Need| -> Vec<usize> {
        rows.iter().enumerate().filter(|(_, r)| !r.is_done() && r.need() == need).map(|(i, _)| i).collect()
    };
    let checks = live(Need::Check);
    let steps = live(Need::Forward);

    for group in split_on_failure(&checks, |idx| check_rows(model, rows, idx, &mut errors)) {
        for i in group.0 {
            errors[i] = Some(AttackError::Torch(group.1.to_string()));
        }
    }
    stats.checked_rows = checks.len();
    if !checks.is_empty() && !between() {
        return (errors, stats);
    }

    let mut backward = 0;
    for group in split_on_failure(&steps, |idx| step_rows(model, rows, idx, &mut errors, &mut backward, between)) {
        for i in group.0 {
            errors[i] = Some(AttackError::Torch(group.1.to_string()));
        }
    }
    stats.stepped_rows = steps.len();
    stats.backward_passes = backward;
    (errors, stats)
}

/// Runs `f` on all of `idx`; if it fails, on each index alone. Returns the indices that still
/// failed alone, with their error.
fn split_on_failure(
    idx: &[usize],
    mut f: impl FnMut(&[usize]) -> Result<(), tch::TchError>,
) -> Vec<(Vec<usize>, tch::TchError)> {
    if idx.is_empty() {
        return Vec::new();
    }
    match f(idx) {
        Ok(()) => Vec::new(),
        Err(e) if idx.len() == 1 => vec![(idx.to_vec(), e)],
        Err(_) => idx.iter().filter_map(|&i| f(&[i]).err().map(|e| (vec![i], e))).collect(),
    }
}

fn check_rows(
    model: &LoadedModel,
    rows: &mut [Box<dyn AttackRow>],
    idx: &[usize],
    errors: &mut [Option<AttackError>],
) -> Result<(), tch::TchError> {
    let spec = model.info.input();
    // Every image each row checks (one, or a row's batched candidates), flattened in row order.
    let mut counts = Vec::with_capacity(idx.len());
    let mut images = Vec::with_capacity(idx.len());
    for &i in idx {
        let mine = rows[i].check_images();
        counts.push(mine.len());
        images.extend(mine.into_iter().map(|x| (x.shallow_clone(), rows[i].checks_float())));
    }
    let (inputs, rgbs): (Vec<Tensor>, Vec<Vec<u8>>) = prepare_checks(images, spec)?.into_iter().unzip();
    let batch = Tensor::f_cat(&inputs, 0)?.f_to_device(model.device())?;
    let logits = tch::no_grad(|| model.forward(&batch))?;
    let mut checks = tensor_rows(&logits)?.into_iter().zip(rgbs);
    for (&i, n) in idx.iter().zip(counts) {
        let mine: Vec<(Vec<f32>, Vec<u8>)> = checks.by_ref().take(n).collect();
        for (l, _) in &mine {
            rows[i].record_mut().saw(l);
        }
        if let Err(e) = rows[i].on_checks(mine) {
            errors[i] = Some(e);
        }
    }
    Ok(())
}

/// From this many images a tick's checks are prepared on several threads: a batched
/// refinement and pruning check 38 candidates of one row at once.
const PARALLEL_CHECKS: usize = 8;

/// Each check image's 8-bit pixels and model input through the classify pipeline (a float
/// reference's: the float image through the same ops), in order; many images on up to one
/// thread per core, each running libtorch single-threaded.
fn prepare_checks(
    images: Vec<(Tensor, bool)>,
    spec: &crate::model::InputSpec,
) -> Result<Vec<(Tensor, Vec<u8>)>, tch::TchError> {
    let one = |(x, float): (Tensor, bool)| -> Result<(Tensor, Vec<u8>), tch::TchError> {
        let (h, w) = (x.size()[2] as u32, x.size()[3] as u32);
        let rgb = tensor_to_rgb8(&x)?;
        let input = if float {
            tch::no_grad(|| resize_crop(&x.f_to_device(tch::Device::Cpu)?, spec))?
        } else {
            prepare_rgb8(&rgb, w, h, spec)?
        };
        Ok((input, rgb))
    };
    let threads = std::thread::available_parallelism().map_or(1, usize::from).min(images.len());
    if images.len() < PARALLEL_CHECKS || threads < 2 {
        return images.into_iter().map(one).collect();
    }
    let per = images.len().div_ceil(threads);
    let mut chunks: Vec<Vec<(Tensor, bool)>> = Vec::with_capacity(threads);
    let mut rest = images.into_iter();
    loop {
        let chunk: Vec<_> = rest.by_ref().take(per).collect();
        if chunk.is_empty() {
            break;
        }
        chunks.push(chunk);
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                scope.spawn(move || {
                    crate::model::single_threaded_torch_here();
                    chunk.into_iter().map(one).collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        let mut out = Vec::new();
        for h in handles {
            let part = h.join().map_err(|_| tch::TchError::Torch("a check-preparing thread panicked".into()))??;
            out.extend(part);
        }
        Ok(out)
    })
}

fn step_rows(
    model: &LoadedModel,
    rows: &mut [Box<dyn AttackRow>],
    idx: &[usize],
    errors: &mut [Option<AttackError>],
    backward_passes: &mut usize,
    between: &mut dyn FnMut() -> bool,
) -> Result<(), tch::TchError> {
    let spec = model.info.input();
    let xs: Vec<Tensor> =
        idx.iter().map(|&i| rows[i].image().f_detach().map(|x| x.set_requires_grad(true))).collect::<Result<_, _>>()?;
    let sides: Vec<i64> = idx.iter().map(|&i| rows[i].step_resize().unwrap_or(spec.resize_short_side)).collect();
    let logits = model.forward(&model.attack_inputs(&xs, &sides)?)?;
    let values = tensor_rows(&logits)?;

    let mut objectives: Vec<Vec<Vec<f32>>> = Vec::with_capacity(idx.len());
    for (&i, l) in idx.iter().zip(&values) {
        rows[i].record_mut().saw(l);
        match rows[i].on_logits(l) {
            Ok(o) => objectives.push(o),
            Err(e) => {
                errors[i] = Some(e);
                objectives.push(Vec::new());
            }
        }
    }
    let passes = objectives.iter().map(Vec::len).max().unwrap_or(0);
    let classes = values.first().map(Vec::len).unwrap_or(0);
    let mut grads: Vec<Vec<Tensor>> = (0..idx.len()).map(|_| Vec::new()).collect();
    for j in 0..passes {
        // Σ over rows of (coefficients · logits): row r's input gradient is its own objective's.
        let wanting: Vec<usize> = (0..idx.len()).filter(|&r| objectives[r].len() > j).collect();
        let mut coef = vec![0f32; idx.len() * classes];
        for &r in &wanting {
            coef[r * classes..(r + 1) * classes].copy_from_slice(&objectives[r][j]);
        }
        let coef =
            Tensor::f_from_slice(&coef)?.f_view([idx.len() as i64, classes as i64])?.f_to_device(model.device())?;
        let loss = logits.f_mul(&coef)?.f_sum(Kind::Float)?;
        let inputs: Vec<Tensor> = wanting.iter().map(|&r| xs[r].shallow_clone()).collect();
        let g = model.backward(&loss, &inputs, j + 1 < passes)?;
        *backward_passes += 1;
        for (&r, g) in wanting.iter().zip(g) {
            grads[r].push(g);
        }
        if !between() {
            return Ok(());
        }
    }
    for ((&i, g), o) in idx.iter().zip(grads).zip(&objectives) {
        if !o.is_empty()
            && errors[i].is_none()
            && let Err(e) = rows[i].on_gradients(g)
        {
            errors[i] = Some(e);
        }
    }
    Ok(())
}

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
    // Every image each row checks (one, or a row's batched candidates), in row order, as 8-bit
    // pixels: a candidate is built on the device and brought down one at a time.
    let mut counts: Vec<(usize, usize)> = Vec::with_capacity(idx.len());
    let mut jobs: Vec<CheckJob> = Vec::with_capacity(idx.len());
    for &i in idx {
        let float = rows[i].checks_float();
        let mine = (0..rows[i].check_count())
            .map(|k| -> Result<CheckJob, AttackError> {
                let x = rows[i].check_image(k)?;
                let (h, w) = (x.size()[2] as u32, x.size()[3] as u32);
                let rgb = tensor_to_rgb8(&x)?;
                Ok(if float {
                    // The float reference: the float image itself, through the same differentiable ops.
                    CheckJob::Ready(tch::no_grad(|| resize_crop(&x.f_to_device(tch::Device::Cpu)?, spec))?, rgb)
                } else {
                    CheckJob::Pixels(rgb, w, h)
                })
            })
            .collect::<Result<Vec<_>, _>>();
        match mine {
            Ok(mine) => {
                counts.push((i, mine.len()));
                jobs.extend(mine);
            }
            Err(e) => errors[i] = Some(e),
        }
    }
    let (inputs, rgbs): (Vec<Tensor>, Vec<Vec<u8>>) = prepare_checks(jobs, spec)?.into_iter().unzip();
    // A tick's checks go through the model in passes of at most as many images as the tick has
    // rows: the batch sizes the worker already runs (and warms), however many candidates.
    let mut logits = Vec::with_capacity(inputs.len());
    for chunk in inputs.chunks(idx.len().max(1)) {
        let batch = Tensor::f_cat(chunk, 0)?.f_to_device(model.device())?;
        logits.extend(tensor_rows(&tch::no_grad(|| model.forward(&batch))?)?);
    }
    let mut checks = logits.into_iter().zip(rgbs);
    for (i, n) in counts {
        let mine: Vec<(Vec<f32>, Vec<u8>)> = checks.by_ref().take(n).collect();
        if let [(logits, _)] = mine.as_slice() {
            rows[i].record_mut().saw(logits);
        }
        for (logits, rgb) in mine {
            if let Err(e) = rows[i].on_check(&logits, rgb) {
                errors[i] = Some(e);
                break;
            }
        }
    }
    Ok(())
}

/// One check image on its way to the model: its model input and pixels, or only its pixels.
enum CheckJob {
    Ready(Tensor, Vec<u8>),
    Pixels(Vec<u8>, u32, u32),
}

/// From this many images a tick's checks are prepared on several threads: a batched
/// refinement and pruning check up to 38 candidates of one row at once.
const PARALLEL_CHECKS: usize = 8;

/// Each check's model input through the classify pipeline, with its pixels, in order; many on
/// up to one thread per core, each running libtorch single-threaded.
fn prepare_checks(
    jobs: Vec<CheckJob>,
    spec: &crate::model::InputSpec,
) -> Result<Vec<(Tensor, Vec<u8>)>, tch::TchError> {
    let one = |job: CheckJob| -> Result<(Tensor, Vec<u8>), tch::TchError> {
        match job {
            CheckJob::Ready(input, rgb) => Ok((input, rgb)),
            CheckJob::Pixels(rgb, w, h) => Ok((prepare_rgb8(&rgb, w, h, spec)?, rgb)),
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, usize::from).min(jobs.len());
    if jobs.len() < PARALLEL_CHECKS || threads < 2 {
        return jobs.into_iter().map(one).collect();
    }
    let per = jobs.len().div_ceil(threads);
    let mut chunks: Vec<Vec<CheckJob>> = Vec::with_capacity(threads);
    let mut rest = jobs.into_iter();
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

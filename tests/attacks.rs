//! Each attack's defining property, on the tiny test model, driving the rows through the same
//! runner tick the worker uses.

mod common;

use std::sync::Arc;

use common::*;
use labelfool::attack::{self, AttackParams, AttackRow, Method, TargetParams, runner};
use labelfool::model::preprocess::{resize_crop, rgb8_to_tensor};
use labelfool::model::{BatchPolicy, LoadedModel, ModelInfo};
use tch::{Device, Kind, Tensor};

fn tiny() -> (Arc<ModelInfo>, LoadedModel) {
    let dir = models_dir().join("tiny");
    let info = Arc::new(
        ModelInfo::open(
            "tiny",
            &dir,
            Some(&dir.join("distance.npy")),
            BatchPolicy { max_size: 4, max_wait: Default::default() },
        )
        .unwrap(),
    );
    let model = LoadedModel::load(info.clone(), Device::Cpu).unwrap();
    (info, model)
}

fn params(method: Method) -> AttackParams {
    AttackParams {
        method,
        max_iter: 50,
        overshoot: 0.0,
        target_params: TargetParams { delta1: 0.8, delta2: 0.01 },
        margins: vec![0.0],
        target: None,
        epsilons: vec![0.03],
        candidates: 10,
        lambda: 3.0,
        max_outer: 20,
        step: None,
        float_reference: false,
        refine_rounds: 0,
        prune_rounds: 0,
        batched_checks: false,
    }
}

/// A 48×40 image with values in [64, 192]: nothing saturates, so no step is clipped.
fn mid_range_image() -> Tensor {
    let rgb: Vec<u8> = (0..48 * 40 * 3).map(|i| (64 + (i * 7919 % 129)) as u8).collect();
    rgb8_to_tensor(&rgb, 48, 40).unwrap()
}

fn photo(name: &str) -> Tensor {
    let img = image::open(fixture(&format!("images/{name}"))).unwrap().to_rgb8();
    rgb8_to_tensor(img.as_raw(), img.width(), img.height()).unwrap()
}

/// Logits and ∇(f_k − f_l) for every k at `x`, computed independently of the attack code.
fn logits_and_gradients(model: &LoadedModel, x: &Tensor, l: usize) -> (Vec<f32>, Vec<Tensor>) {
    let x = x.detach().set_requires_grad(true);
    let logits = model.forward(&resize_crop(&x, model.info.input()).unwrap()).unwrap();
    let values: Vec<f32> = Vec::try_from(&logits.get(0)).unwrap();
    let grads = (0..values.len())
        .map(|k| {
            let g = logits.get(0).get(k as i64) - logits.get(0).get(l as i64);
            Tensor::run_backward(&[g], &[&x], true, false).remove(0)
        })
        .collect();
    (values, grads)
}

fn run_to_end(model: &LoadedModel, row: Box<dyn AttackRow>) -> attack::AttackOutcome {
    run_counting_ticks(model, row).1
}

/// [`run_to_end`], with the ticks it took.
fn run_counting_ticks(model: &LoadedModel, row: Box<dyn AttackRow>) -> (usize, attack::AttackOutcome) {
    let mut rows = vec![row];
    let mut ticks = 0;
    while !rows[0].is_done() {
        let (errors, _) = runner::tick(model, &mut rows);
        assert!(errors[0].is_none(), "{:?}", errors[0]);
        ticks += 1;
        assert!(ticks < 5000, "the attack never finished");
    }
    (ticks, rows.pop().unwrap().outcome().unwrap())
}

/// The outcome's delivered 8-bit pixels (`w`×`h`) re-classified by the model itself through the
/// classify pipeline, and the reported success held to them. Returns whether they are adversarial.
fn assert_delivers(model: &LoadedModel, o: &attack::AttackOutcome, w: u32, h: u32, what: &str) -> bool {
    let x = labelfool::model::preprocess::prepare_rgb8(&o.rgb, w, h, model.info.input()).unwrap();
    let logits: Vec<f32> = tch::no_grad(|| Vec::try_from(&model.forward(&x).unwrap().get(0)).unwrap());
    let top1 = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    assert_verdict(top1 as u64, &outcome_report(o), what)
}

#[test]
fn deepfool_steps_onto_the_nearest_linearised_boundary() {
    let (info, model) = tiny();
    let x0 = mid_range_image();
    let mut rows = vec![attack::new_row(info, x0.shallow_clone(), params(Method::Deepfool)).unwrap()];
    // The first tick classifies x0 and takes one DeepFool step.
    let (errors, stats) = runner::tick(&model, &mut rows);
    assert!(errors[0].is_none());
    assert_eq!(stats.backward_passes, 9, "one backward pass per candidate class");
    let x1 = rows[0].image().shallow_clone();
    let clean: Vec<f32> = tch::no_grad(|| {
        Vec::try_from(&model.forward(&resize_crop(&x0, model.info.input()).unwrap()).unwrap().get(0)).unwrap()
    });
    let l = clean.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    let (logits, grads) = logits_and_gradients(&model, &x0, l);
    let dx = &x1 - &x0;
    // Each boundary's distance |f_k − f_l|/‖w_k‖, and its linearised gap after the step.
    let mut best = (f64::INFINITY, 0usize, 0.0f64);
    let mut after = vec![0.0; logits.len()];
    for k in (0..logits.len()).filter(|&k| k != l) {
        let f = f64::from(logits[k] - logits[l]);
        let norm = grads[k].square().sum(Kind::Double).double_value(&[]).sqrt();
        if f.abs() / norm < best.0 {
            best = (f.abs() / norm, k, norm);
        }
        after[k] = f + (&grads[k] * &dx).sum(Kind::Double).double_value(&[]);
    }
    let chosen = best.1;
    assert!(
        (after[chosen] - 1e-4).abs() < 1e-4,
        "the nearest boundary k={chosen} is reached: linearised gap {}",
        after[chosen]
    );
    // The step is the boundary's distance plus DeepFool's 1e-4 (in logits) along w.
    let step = dx.square().sum(Kind::Double).double_value(&[]).sqrt();
    let expected = best.0 + 1e-4 / best.2;
    assert!((step - expected).abs() < 1e-3 * expected, "the step has the boundary's distance: {step} vs {expected}");
}

#[test]
fn fgsm_moves_every_pixel_by_epsilon_before_quantisation() {
    let (info, model) = tiny();
    let x0 = mid_range_image();
    let mut rows = vec![attack::new_row(info, x0.shallow_clone(), params(Method::Fgsm)).unwrap()];
    let (errors, stats) = runner::tick(&model, &mut rows);
    assert!(errors[0].is_none());
    assert_eq!(stats.backward_passes, 1);
    let d = (rows[0].image() - &x0).abs();
    let linf = d.max().double_value(&[]);
    assert!((linf - 0.03).abs() < 1e-6, "L∞ before quantisation = ε: {linf}");
    // Not just the largest: every pixel with a non-zero gradient moved by exactly ε.
    let moved = d.gt(0.0).sum(Kind::Int64).int64_value(&[]);
    let at_eps = (d - 0.03).abs().lt(1e-6).sum(Kind::Int64).int64_value(&[]);
    assert!(moved > 0 && at_eps == moved, "{at_eps} of {moved} moved pixels are at ε");
    let o = run_to_end(&model, rows.pop().unwrap());
    assert_eq!(o.epsilon, Some(0.03));
    assert_eq!(o.iterations, 1);
}

/// `f_t − max_{j≠t} f_j` of the 8-bit image `rgb` through the classify pipeline.
fn margin_of(model: &LoadedModel, rgb: &[u8], w: u32, h: u32, t: usize) -> f32 {
    let x = labelfool::model::preprocess::prepare_rgb8(rgb, w, h, model.info.input()).unwrap();
    let l: Vec<f32> = tch::no_grad(|| Vec::try_from(&model.forward(&x).unwrap().get(0)).unwrap());
    let other = l.iter().enumerate().filter(|&(j, _)| j != t).map(|(_, &v)| v).fold(f32::NEG_INFINITY, f32::max);
    l[t] - other
}

#[test]
fn pgd_stays_in_its_ball_and_widens_the_targets_margin_through_random_resizes() {
    let (info, model) = tiny();
    let x0 = photo("n02391049_zebra.JPEG");
    let (h, w) = (x0.size()[2] as u32, x0.size()[3] as u32);
    let rgb0 = labelfool::model::preprocess::tensor_to_rgb8(&x0).unwrap();
    let clean: Vec<f32> = tch::no_grad(|| {
        Vec::try_from(&model.forward(&resize_crop(&x0, model.info.input()).unwrap()).unwrap().get(0)).unwrap()
    });
    let argmax = |v: &[f32]| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    let argmin = |v: &[f32]| v.iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    // Towards the least likely class, and towards the predicted one (pushed further, not refused).
    for t in [argmin(&clean), argmax(&clean)] {
        let p = AttackParams { max_iter: 10, epsilons: vec![0.06], target: Some(t), ..params(Method::Pgd) };
        let mut row = attack::new_row(info.clone(), x0.shallow_clone(), p).unwrap();
        // The first step sees the model's own resize (its logits classify the original) …
        assert_eq!(row.step_resize(), None);
        let mut rows = vec![row];
        let (errors, stats) = runner::tick(&model, &mut rows);
        assert!(errors[0].is_none(), "{:?}", errors[0]);
        assert_eq!(stats.backward_passes, 1);
        // … every later one a short side drawn from [size, 1.17 × resize] = [32, 42].
        let sides: Vec<i64> = (0..40).map(|_| rows[0].step_resize().unwrap()).collect();
        assert!(sides.iter().all(|s| (32..=42).contains(s)), "{sides:?}");
        assert!(sides.iter().collect::<std::collections::BTreeSet<_>>().len() >= 5, "{sides:?}");
        let o = run_to_end(&model, rows.pop().unwrap());
        assert_eq!((o.iterations, o.checks), (10, 1));
        assert_eq!(o.epsilon, Some(0.06));
        assert_eq!(o.original.index, argmax(&clean));
        let linf = o.rgb.iter().zip(&rgb0).map(|(&a, &b)| (i16::from(a) - i16::from(b)).abs()).max().unwrap();
        assert!(linf <= 16, "L∞ {linf} grey levels > ε = 0.06 (15.3, rounded)");
        let (before, after) = (margin_of(&model, &rgb0, w, h, t), margin_of(&model, &o.rgb, w, h, t));
        // The tiny model moves little within ε (measured: −1.36 → −1.08 and 0.21 → 0.34).
        let gain = if t == argmax(&clean) { 0.05 } else { 0.2 };
        assert!(after > before + gain, "target {t}: margin {before} → {after}");
    }
}

#[test]
fn pgd_takes_one_radius_defaulting_to_the_searchs() {
    use labelfool::attack::params::{AttackLimits, AttackRequest};
    let (info, _) = tiny();
    let d = labelfool::config::AttackDefaults::default();
    let s = AttackLimits { max_iter: 1000, max_candidates: 20, max_backward_passes: 10_000 };
    let req = |eps: Option<Vec<f64>>| AttackRequest { method: Some("pgd".into()), epsilons: eps, ..Default::default() };
    let p = req(None).validate(&info, &d, &s).unwrap();
    assert_eq!((p.method, p.max_iter, p.epsilons.clone()), (Method::Pgd, 20, vec![13.0 / 255.0]));
    assert_eq!(p.max_backward_passes(), 20);
    assert_eq!(req(Some(vec![0.1])).validate(&info, &d, &s).unwrap().epsilons, vec![0.1]);
    let e = req(Some(vec![0.01, 0.02])).validate(&info, &d, &s).unwrap_err().to_string();
    assert!(e.contains("`epsilon`") && e.contains("one radius"), "{e}");
    // A step size is PGD's alone, on the pixel scale.
    assert_eq!(p.step, None);
    let stepped = |method: &str, step: f64| {
        AttackRequest { method: Some(method.into()), step: Some(step), ..Default::default() }.validate(&info, &d, &s)
    };
    assert_eq!(stepped("pgd", 2.0 / 255.0).unwrap().step, Some(2.0 / 255.0));
    for (method, step, says) in [("pgd", 0.0, "(0, 1]"), ("pgd", 1.5, "(0, 1]"), ("fgsm", 0.01, "no step size")] {
        let e = stepped(method, step).unwrap_err().to_string();
        assert!(e.contains("`step`") && e.contains(says), "{method} {step}: {e}");
    }
}

#[test]
fn pgd_moves_by_the_callers_step_else_by_two_and_a_half_radii_over_its_steps() {
    let (info, model) = tiny();
    let x0 = photo("n02391049_zebra.JPEG");
    let rgb0 = labelfool::model::preprocess::tensor_to_rgb8(&x0).unwrap();
    // After one step every value the gradient's sign moved (away from 0 and 255) is off by the
    // step exactly; those the model's crop throws away have no gradient and stay.
    for (step, levels) in [(Some(3.0 / 255.0), 3), (None, 5)] {
        // Default: 2.5 × 20/255 / 10 steps = 5 grey levels; the 10 steps are cut to 1 below.
        let p =
            AttackParams { max_iter: 10, epsilons: vec![20.0 / 255.0], target: Some(1), step, ..params(Method::Pgd) };
        let mut rows = vec![attack::new_row(info.clone(), x0.shallow_clone(), p).unwrap()];
        let (errors, _) = runner::tick(&model, &mut rows);
        assert!(errors[0].is_none(), "{:?}", errors[0]);
        let rgb = labelfool::model::preprocess::tensor_to_rgb8(rows[0].image()).unwrap();
        let moved: Vec<i16> = rgb
            .iter()
            .zip(&rgb0)
            .filter(|&(_, &o)| (levels..=255 - levels).contains(&o))
            .map(|(&a, &o)| (i16::from(a) - i16::from(o)).abs())
            .filter(|&d| d != 0)
            .collect();
        assert!(moved.len() > 1000);
        let exact = moved.iter().filter(|&&d| d == i16::from(levels)).count();
        assert!(exact * 100 >= moved.len() * 99, "{exact} of {} values moved by {levels}", moved.len());
    }
}

#[test]
fn sparsefool_changes_few_pixels_where_deepfool_changes_most() {
    let (info, model) = tiny();
    let x0 = photo("n02219486_ant.JPEG");
    let pixels = (x0.size()[2] * x0.size()[3]) as u64;
    let mut p = params(Method::Sparsefool);
    p.overshoot = 0.02;
    let sparse = run_to_end(&model, attack::new_row(info.clone(), x0.shallow_clone(), p.clone()).unwrap());
    p.method = Method::Deepfool;
    p.margins = vec![0.25, 0.5, 1.0, 2.0];
    let dense = run_to_end(&model, attack::new_row(info, x0.shallow_clone(), p).unwrap());
    let orig = labelfool::model::preprocess::tensor_to_rgb8(&x0).unwrap();
    let (w, h) = (x0.size()[3] as u32, x0.size()[2] as u32);
    let l0_sparse = labelfool::imaging::metrics::perturbation(w, h, &orig, &sparse.rgb).l0;
    let l0_dense = labelfool::imaging::metrics::perturbation(w, h, &orig, &dense.rgb).l0;
    assert!(sparse.success && dense.success, "both attacks fool the tiny model");
    assert!(assert_delivers(&model, &sparse, w, h, "SparseFool") && assert_delivers(&model, &dense, w, h, "DeepFool"));
    assert!(l0_sparse * 100 <= pixels, "SparseFool changed {l0_sparse} of {pixels} pixels (more than 1%)");
    assert!(l0_dense > pixels / 2, "DeepFool changed only {l0_dense} of {pixels} pixels");
}

mod guard_bounds {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

        /// Whatever the margins, an attack ends within `max_iter` backward passes and
        /// `max_iter + 2` checks: a miss at the last margin is followed by a step, never by the
        /// same check again (which used to loop until the request's deadline).
        #[test]
        fn max_iter_bounds_every_attack_whatever_the_margins(
            image in 0usize..4,
            max_iter in 1u32..12,
            margins in proptest::collection::vec(0.0f64..12.0, 1..4),
            deepfool in any::<bool>(),
        ) {
            let mut margins = margins;
            margins.sort_by(f64::total_cmp);
            margins.dedup();
            let (info, model) = tiny();
            let x0 = match image {
                0 => mid_range_image(),
                1 => photo("n02391049_zebra.JPEG"),
                2 => photo("n02219486_ant.JPEG"),
                _ => photo("n01440764_tench.JPEG"),
            };
            let method = if deepfool { Method::Deepfool } else { Method::Labelfool };
            let p = AttackParams { method, max_iter, margins, ..params(method) };
            let cap = p.max_backward_passes();
            let mut rows = vec![attack::new_row(info, x0, p).unwrap()];
            let (mut ticks, mut backward) = (0u32, 0u64);
            while !rows[0].is_done() {
                let (errors, stats) = runner::tick(&model, &mut rows);
                prop_assert!(errors[0].is_none(), "{:?}", errors[0]);
                backward += stats.backward_passes as u64;
                ticks += 1;
                // Each tick is a check or a step; there can be no more than this many of them.
                prop_assert!(ticks <= 2 * max_iter + 3, "still running after {ticks} ticks (max_iter {max_iter})");
            }
            let o = rows.pop().unwrap().outcome().unwrap();
            prop_assert!(backward <= cap, "{backward} backward passes > bound {cap}");
            prop_assert!(o.iterations <= max_iter);
            prop_assert!(o.checks <= max_iter + 2, "{} checks for max_iter {max_iter}", o.checks);
        }
    }
}

#[test]
fn the_runner_hands_back_control_after_every_backward_pass() {
    // DeepFool with 10 candidates: 9 backward passes in one tick, and the worker gets control
    // after each, to serve classify work that arrived meanwhile.
    let (info, model) = tiny();
    let mut rows = vec![attack::new_row(info, mid_range_image(), params(Method::Deepfool)).unwrap()];
    let mut calls = 0;
    let (errors, stats) = runner::tick_with(&model, &mut rows, &mut || {
        calls += 1;
        true
    });
    assert!(errors[0].is_none());
    assert_eq!(stats.backward_passes, 9);
    assert_eq!(calls, 9, "one hand-back per backward pass");
}

#[test]
fn the_float_reference_judges_the_float_image_and_measures_it() {
    // The paper's attack, unrounded: success means the float image itself is the target, and
    // the reported perceptibility is that image's √(mean over pixels of ‖ΔRGB‖²).
    let (info, model) = tiny();
    let x0 = photo("n02391049_zebra.JPEG");
    let forward = |x: &Tensor| -> Vec<f32> {
        tch::no_grad(|| {
            Vec::try_from(&model.forward(&resize_crop(x, model.info.input()).unwrap()).unwrap().get(0)).unwrap()
        })
    };
    let argmax = |v: &[f32]| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    let target = (argmax(&forward(&x0)) + 1) % 10;
    let p = AttackParams { target: Some(target), ..params(Method::Labelfool) }.float_reference(None);
    let mut rows = vec![attack::new_row(info, x0.shallow_clone(), p).unwrap()];
    let mut ticks = 0;
    while !rows[0].is_done() {
        let (errors, _) = runner::tick(&model, &mut rows);
        assert!(errors[0].is_none(), "{:?}", errors[0]);
        ticks += 1;
        assert!(ticks < 200);
    }
    let x = rows[0].image().shallow_clone();
    let o = rows.pop().unwrap().outcome().unwrap();
    assert!(o.success, "the tiny model is easy to move to another class");
    assert_eq!(argmax(&forward(&x)), target, "the float image itself reaches the target");
    let (h, w) = (x.size()[2], x.size()[3]);
    let expected = ((&x - &x0).square().sum(Kind::Double).double_value(&[]) / (h * w) as f64).sqrt();
    let got = o.float_perceptibility.expect("a float reference reports its perceptibility");
    assert!((got - expected).abs() < 1e-9 * expected.max(1e-12), "{got} vs {expected}");
}

#[test]
fn refinement_keeps_the_goal_and_only_lowers_perceptibility() {
    // After the first 8-bit success, up to `refine_rounds` checks shrink the perturbation; the
    // delivered image is the last that still succeeds.
    let (info, model) = tiny();
    for name in ["n02391049_zebra.JPEG", "n02219486_ant.JPEG", "n01440764_tench.JPEG"] {
        let x0 = photo(name);
        let orig = labelfool::model::preprocess::tensor_to_rgb8(&x0).unwrap();
        let (h, w) = (x0.size()[2] as u32, x0.size()[3] as u32);
        let run = |rounds: u32| {
            let p = AttackParams { refine_rounds: rounds, margins: vec![0.0, 0.5, 1.0], ..params(Method::Deepfool) };
            run_to_end(&model, attack::new_row(info.clone(), x0.shallow_clone(), p).unwrap())
        };
        let (plain, refined) = (run(0), run(3));
        assert!(plain.success && refined.success, "{name}");
        assert!(assert_delivers(&model, &plain, w, h, name) && assert_delivers(&model, &refined, w, h, name));
        assert_eq!(plain.refinements, 0);
        assert!(refined.refinements <= 3, "{name}: {} refinements", refined.refinements);
        assert_eq!((plain.iterations, plain.checks), (refined.iterations, refined.checks), "{name}: same attack");
        let p = |rgb: &[u8]| labelfool::imaging::metrics::perturbation(w, h, &orig, rgb).perceptibility;
        assert!(p(&refined.rgb) <= p(&plain.rgb) + 1e-12, "{name}: {} > {}", p(&refined.rgb), p(&plain.rgb));
    }
}

/// Photos and the guarded method run on each by the tests of the checks after success.
const GUARDED_CASES: [(&str, Method); 3] = [
    ("n02391049_zebra.JPEG", Method::Deepfool),
    ("n02219486_ant.JPEG", Method::Labelfool),
    ("n01440764_tench.JPEG", Method::Deepfool),
];

#[test]
fn pruning_keeps_the_goal_and_only_lowers_perceptibility() {
    // After refinement, up to `prune_rounds` checks take back grey levels (no more gradients);
    // the delivered image is the last that still succeeds.
    let (info, model) = tiny();
    for (name, method) in GUARDED_CASES {
        let x0 = photo(name);
        let orig = labelfool::model::preprocess::tensor_to_rgb8(&x0).unwrap();
        let (h, w) = (x0.size()[2] as u32, x0.size()[3] as u32);
        let run = |rounds: u32| {
            let p =
                AttackParams { refine_rounds: 2, prune_rounds: rounds, margins: vec![0.0, 0.5, 1.0], ..params(method) };
            run_to_end(&model, attack::new_row(info.clone(), x0.shallow_clone(), p).unwrap())
        };
        let (plain, pruned) = (run(0), run(4));
        assert!(plain.success && pruned.success, "{name}");
        assert!(assert_delivers(&model, &plain, w, h, name) && assert_delivers(&model, &pruned, w, h, name));
        assert!(pruned.refinements <= plain.refinements + 4, "{name}: {} refinements", pruned.refinements);
        assert_eq!((plain.iterations, plain.checks), (pruned.iterations, pruned.checks), "{name}: same attack");
        let input = labelfool::model::preprocess::prepare_rgb8(&pruned.rgb, w, h, model.info.input()).unwrap();
        let logits: Vec<f32> = tch::no_grad(|| Vec::try_from(&model.forward(&input).unwrap().get(0)).unwrap());
        assert_eq!(
            labelfool::attack::target::argmax(&logits),
            pruned.final_.index,
            "{name}: the delivered pixels give the reported class"
        );
        let p = |rgb: &[u8]| labelfool::imaging::metrics::perturbation(w, h, &orig, rgb).perceptibility;
        assert!(p(&pruned.rgb) <= p(&plain.rgb) + 1e-12, "{name}: {} > {}", p(&pruned.rgb), p(&plain.rgb));
    }
}

/// `engine.batch_padding = "pow2"`: zero rows up to a power of two change neither the real rows'
/// logits nor their input gradients, and the warm-up runs exactly the padded sizes.
#[test]
fn padded_batches_give_the_rows_and_gradients_of_unpadded_ones() {
    let (info, plain) = tiny();
    let (_, mut padded) = tiny();
    padded.set_batch_padding(true);
    let s = info.input().size;
    tch::manual_seed(7);
    let x = Tensor::rand([3, 3, s, s], (Kind::Float, Device::Cpu));
    let run = |m: &LoadedModel| {
        let x = x.copy().set_requires_grad(true);
        let logits = m.forward(&x).unwrap();
        let loss = (logits.get(0).get(1) - logits.get(2).get(3)).sum(Kind::Float);
        let g = m.backward(&loss, &[x], false).unwrap().remove(0);
        (logits.detach(), g)
    };
    let ((la, ga), (lb, gb)) = (run(&plain), run(&padded));
    assert_eq!(lb.size(), la.size(), "padded rows are cut off the output");
    assert!(f64::try_from((la - lb).abs().max()).unwrap() < 1e-5);
    assert!(f64::try_from((ga - gb).abs().max()).unwrap() < 1e-6);
    assert_eq!(padded.warm_up(4).unwrap(), vec![1, 2, 4]);
    assert_eq!(padded.warm_up(5).unwrap(), vec![1, 2, 4, 8]);
}

/// The attack tick's batched preprocessing (`engine.batch_resize = "matrix"`): `Rh · X · Rwᵀ`
/// over zero-padded rows gives what the resize op gives each row — downscaled, upscaled, not
/// resized at all, portrait and landscape, padded into one group or alone — and so does its
/// backward pass (max abs difference ≤ 1e-5).
#[test]
fn matrix_resize_gives_the_ops_inputs_and_gradients_for_mixed_sizes() {
    use labelfool::model::resize::{ResizePath, RowResizer, per_row};
    let (short, size) = (256, 224);
    // (h, w): down both ways, portrait, short side already 256 (no resize), a short side one
    // pixel over (both axes change by a little), upscaled, and a far larger one alone.
    let dims = [(375, 500), (500, 375), (256, 300), (257, 340), (200, 230), (380, 470), (1200, 900)];
    tch::manual_seed(3);
    let images: Vec<Tensor> =
        dims.iter().map(|&(h, w)| Tensor::rand([1, 3, h, w], (Kind::Float, Device::Cpu))).collect();
    let sides = vec![short; dims.len()];
    let cotangent = Tensor::randn([dims.len() as i64, 3, size, size], (Kind::Float, Device::Cpu));
    let run = |f: &dyn Fn(&[Tensor]) -> Tensor| {
        let xs: Vec<Tensor> = images.iter().map(|x| x.copy().set_requires_grad(true)).collect();
        let y = f(&xs);
        let grads = Tensor::run_backward(&[(&y * &cotangent).sum(Kind::Float)], &xs, false, false);
        (y.detach(), grads)
    };
    let matrices = RowResizer::new(ResizePath::Matrix);
    let (want, want_g) = run(&|xs| per_row(xs, &sides, size).unwrap());
    let (got, got_g) = run(&|xs| matrices.inputs(xs, &sides, short, size).unwrap());
    assert_eq!(got.size(), vec![dims.len() as i64, 3, size, size]);
    let diff = f64::try_from((&got - &want).abs().max()).unwrap();
    assert!(diff <= 1e-5, "inputs differ by {diff}");
    for ((a, b), d) in got_g.iter().zip(&want_g).zip(dims) {
        assert_eq!(a.size(), b.size());
        let diff = f64::try_from((a - b).abs().max()).unwrap();
        assert!(diff <= 1e-5, "{d:?}: gradients differ by {diff}");
    }
    // The matrices are cached per size: a second call gives the same inputs.
    let (again, _) = run(&|xs| matrices.inputs(xs, &sides, short, size).unwrap());
    assert!(f64::try_from((&again - &got).abs().max()).unwrap() == 0.0);
}

/// One tick of 16 LabelFool rows of 16 sizes on each path: every row's class, probability and
/// step agree between the resize op row by row and the batched matrix products (≤ 1e-5).
#[test]
fn a_tick_of_mixed_sizes_steps_alike_on_both_resize_paths() {
    use labelfool::model::resize::ResizePath;
    let (info, per_row) = tiny();
    let (_, mut matrix) = tiny();
    matrix.set_batch_resize(ResizePath::Matrix);
    assert_eq!(per_row.batch_resize(), ResizePath::PerRow, "the op row by row unless set");
    let images: Vec<Tensor> = (0..16)
        .map(|i| {
            let (w, h) = (30 + 3 * i, 52 - 2 * i);
            let rgb: Vec<u8> = (0..w * h * 3).map(|k| (40 + (k * 7919 + i * 31) % 170) as u8).collect();
            rgb8_to_tensor(&rgb, w as u32, h as u32).unwrap()
        })
        .collect();
    let run = |model: &LoadedModel| {
        let mut rows: Vec<Box<dyn AttackRow>> = images
            .iter()
            .map(|x| attack::new_row(info.clone(), x.copy(), params(Method::Labelfool)).unwrap())
            .collect();
        let (errors, stats) = runner::tick(model, &mut rows);
        assert!(errors.iter().all(Option::is_none), "{errors:?}");
        assert_eq!((stats.stepped_rows, stats.backward_passes), (16, 1));
        rows
    };
    let (a, b) = (run(&per_row), run(&matrix));
    for (i, (a, b)) in a.iter().zip(&b).enumerate() {
        let (pa, pb) = (a.progress(), b.progress());
        assert_eq!(pa.label, pb.label, "row {i}");
        let p = (pa.probability.unwrap() - pb.probability.unwrap()).abs();
        assert!(p <= 1e-5, "row {i}: probabilities differ by {p}");
        assert!(a.image().size() == b.image().size() && a.iterations() == 1 && b.iterations() == 1);
        let step = f64::try_from((a.image() - b.image()).abs().max()).unwrap();
        assert!(step <= 1e-5, "row {i}: stepped images differ by {step}");
        assert!(f64::try_from((a.image() - &images[i]).abs().max()).unwrap() > 0.0, "row {i} stepped");
    }
}

/// `batch_resize`: `auto` keeps the op on the CPU without timing anything, the two named paths
/// are taken as named, and the probe `auto` runs on CUDA (run here on the CPU) times both paths,
/// keeps the one its timings favour and leaves no passes counted against the model.
#[test]
fn batch_resize_settings_and_the_probe() {
    use labelfool::config::BatchResize;
    use labelfool::model::resize::ResizePath;
    let (_, mut model) = tiny();
    for (setting, path) in [
        (BatchResize::Matrix, ResizePath::Matrix),
        (BatchResize::Auto, ResizePath::PerRow),
        (BatchResize::PerRow, ResizePath::PerRow),
    ] {
        assert_eq!(model.apply_batch_resize(setting).unwrap(), None, "{setting:?}: no probe on the CPU");
        assert_eq!(model.batch_resize(), path, "{setting:?}");
    }
    let (per_row, matrix) = model.choose_batch_resize().unwrap();
    assert!(per_row > 0.0 && matrix > 0.0);
    let want = if matrix < per_row { ResizePath::Matrix } else { ResizePath::PerRow };
    assert_eq!(model.batch_resize(), want, "{per_row} s row by row, {matrix} s matrix");
    let passes = &model.passes;
    assert_eq!(passes.forward.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(passes.backward.load(std::sync::atomic::Ordering::Relaxed), 0);
}

/// `attack.batched_checks = true`: refinement and pruning each take one tick that checks every
/// candidate their bisection could reach, and the delivered image keeps the goal, is what the
/// model says of its pixels, and is less perceptible than the unrefined one — in two ticks after
/// success, where the bisection takes one tick per check.
#[test]
fn batched_checks_refine_and_prune_in_two_ticks() {
    let (info, model) = tiny();
    for (name, method) in GUARDED_CASES {
        let x0 = photo(name);
        let orig = labelfool::model::preprocess::tensor_to_rgb8(&x0).unwrap();
        let (h, w) = (x0.size()[2] as u32, x0.size()[3] as u32);
        let p = |refine_rounds, prune_rounds, batched_checks| AttackParams {
            refine_rounds,
            prune_rounds,
            batched_checks,
            margins: vec![0.0, 0.5, 1.0],
            ..params(method)
        };
        let run =
            |p: AttackParams| run_counting_ticks(&model, attack::new_row(info.clone(), x0.shallow_clone(), p).unwrap());
        let (plain_ticks, plain) = run(p(0, 0, false));
        let (bisected_ticks, bisected) = run(p(3, 5, false));
        let (batched_ticks, batched) = run(p(3, 5, true));
        assert!(plain.success && bisected.success && batched.success, "{name}");
        assert!(assert_delivers(&model, &batched, w, h, name));
        assert_eq!((plain.iterations, plain.checks), (batched.iterations, batched.checks), "{name}: same attack");
        assert_eq!(bisected_ticks - plain_ticks, bisected.refinements as usize, "{name}: a tick per bisection check");
        assert!(batched_ticks <= plain_ticks + 2, "{name}: {batched_ticks} ticks against {plain_ticks} unrefined");
        // 7 scales, then up to 31 pruning fractions, in (at most) those two ticks.
        assert!(batched.refinements >= 7 && batched.refinements <= 7 + 31, "{name}: {}", batched.refinements);
        let input = labelfool::model::preprocess::prepare_rgb8(&batched.rgb, w, h, model.info.input()).unwrap();
        let logits: Vec<f32> = tch::no_grad(|| Vec::try_from(&model.forward(&input).unwrap().get(0)).unwrap());
        assert_eq!(labelfool::attack::target::argmax(&logits), batched.final_.index, "{name}");
        let pc = |rgb: &[u8]| labelfool::imaging::metrics::perturbation(w, h, &orig, rgb).perceptibility;
        assert!(pc(&batched.rgb) <= pc(&plain.rgb) + 1e-12, "{name}: {} > {}", pc(&batched.rgb), pc(&plain.rgb));
        assert!(pc(&batched.rgb) < pc(&plain.rgb), "{name}: the candidates took nothing back");
    }
}

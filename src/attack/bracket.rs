//! The bisection that the 8-bit refinement, pruning and the remote refinement share.

/// A bisection driven by 8-bit checks between a value known to succeed and one known (or
/// assumed) to fail; the refinement's scale and pruning's fraction both search this way.
#[derive(Debug, Clone, Copy)]
pub struct Bracket {
    good: f64,
    bad: f64,
    resolution: f64,
}

impl Bracket {
    pub fn new(good: f64, bad: f64, resolution: f64) -> Self {
        Self { good, bad, resolution }
    }

    /// The value to check next, or None once the bracket is narrower than its resolution.
    pub fn next(&self) -> Option<f64> {
        ((self.good - self.bad).abs() >= self.resolution).then(|| (self.good + self.bad) / 2.0)
    }

    /// The end known to succeed.
    pub fn good(&self) -> f64 {
        self.good
    }

    /// The check of [`Bracket::next`]'s value: it becomes the new good or bad end.
    pub fn checked(&mut self, success: bool) {
        let mid = (self.good + self.bad) / 2.0;
        if success {
            self.good = mid;
        } else {
            self.bad = mid;
        }
    }
}

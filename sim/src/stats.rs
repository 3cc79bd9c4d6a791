//! Latency percentiles over every matched frame of a run.

use serde::Serialize;

/// Percentiles of a set of round-trip times, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// How many samples.
    pub count: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    /// Percentiles of `micros` (sorted in place). Nearest-rank: p99 is the smallest sample
    /// that at least 99% of the samples do not exceed.
    pub fn of(micros: &mut [u32]) -> Percentiles {
        if micros.is_empty() {
            return Percentiles::default();
        }
        micros.sort_unstable();
        let rank = |p: f64| {
            let n = micros.len();
            let i = ((p * n as f64).ceil() as usize).clamp(1, n) - 1;
            f64::from(micros[i]) / 1000.0
        };
        Percentiles {
            count: micros.len(),
            p50_ms: rank(0.50),
            p90_ms: rank(0.90),
            p99_ms: rank(0.99),
            max_ms: f64::from(micros[micros.len() - 1]) / 1000.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nearest-rank percentiles of 1..=100 ms are the ranks themselves.
    #[test]
    fn nearest_rank() {
        let mut v: Vec<u32> = (1..=100).rev().map(|ms| ms * 1000).collect();
        let p = Percentiles::of(&mut v);
        assert_eq!(p.count, 100);
        assert_eq!(
            (p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms),
            (50.0, 90.0, 99.0, 100.0)
        );
        assert_eq!(Percentiles::of(&mut []), Percentiles::default());
    }
}

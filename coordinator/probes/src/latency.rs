//! Throughput and end-to-end latency of the events stored in a window.

use serde::Serialize;

/// What the pipeline delivered in `[from_ms, to_ms)` (by write time).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct WindowStats {
    pub from_ms: i64,
    pub to_ms: i64,
    pub events: u64,
    /// Events written per second over the window.
    pub throughput_per_s: f64,
    /// Produced → stored, in ms.
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
}

/// Nearest-rank percentile of sorted values (`q` in 0..=1).
pub fn percentile(sorted: &[i64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1] as f64
}

/// Stats of the events `(produced_ms, written_ms)` written in `[from_ms, to_ms)`.
pub fn window(events: &[(i64, i64)], from_ms: i64, to_ms: i64) -> WindowStats {
    let mut lat: Vec<i64> = events.iter().filter(|(_, w)| *w >= from_ms && *w < to_ms).map(|(p, w)| (w - p).max(0)).collect();
    lat.sort_unstable();
    let secs = ((to_ms - from_ms).max(1) as f64) / 1000.0;
    WindowStats {
        from_ms,
        to_ms,
        events: lat.len() as u64,
        throughput_per_s: lat.len() as f64 / secs,
        p50_ms: percentile(&lat, 0.50),
        p95_ms: percentile(&lat, 0.95),
        p99_ms: percentile(&lat, 0.99),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.95), 95.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[7], 0.99), 7.0);
        assert_eq!(percentile(&[], 0.99), 0.0);
    }

    #[test]
    fn window_takes_events_written_inside_it() {
        // 10 events written at 1000..1900 ms, each 5 ms after production; one outside.
        let mut ev: Vec<(i64, i64)> = (0..10).map(|i| (995 + i * 100, 1000 + i * 100)).collect();
        ev.push((2000, 2500));
        let w = window(&ev, 1000, 2000);
        assert_eq!(w.events, 10);
        assert_eq!(w.throughput_per_s, 10.0);
        assert_eq!((w.p50_ms, w.p99_ms), (5.0, 5.0));
    }
}

//! Conversions between `std::time` values and the protobuf well-known types.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A `std::time::Duration` as a `google.protobuf.Duration`.
pub fn duration_to_pb(d: Duration) -> prost_types::Duration {
    prost_types::Duration { seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX), nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0) }
}

/// A `google.protobuf.Duration` as a `std::time::Duration`; `None` when negative.
pub fn duration_from_pb(d: &prost_types::Duration) -> Option<Duration> {
    if d.seconds < 0 || d.nanos < 0 {
        return None;
    }
    Some(Duration::new(d.seconds as u64, d.nanos as u32))
}

/// A wall-clock time as a `google.protobuf.Timestamp`.
pub fn timestamp_to_pb(t: SystemTime) -> prost_types::Timestamp {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
    }
}

/// A `google.protobuf.Timestamp` as a wall-clock time (clamped to the epoch).
pub fn timestamp_from_pb(t: &prost_types::Timestamp) -> SystemTime {
    if t.seconds < 0 {
        return UNIX_EPOCH;
    }
    UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanos.max(0) as u32)
}

/// A duration as people write it (`10s`, `1m 30s`); the error (humantime
/// quotes what it could not read) is cut short enough to show in a refusal.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| crate::edge::one_line(&e.to_string(), 120))
}

/// Human form of a duration: `1.5s`, `250ms`, `2m 30s`.
pub fn human_duration(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else if d < Duration::from_secs(60) {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        let s = d.as_secs();
        if s < 3600 { format!("{}m {}s", s / 60, s % 60) } else { format!("{}h {}m", s / 3600, (s % 3600) / 60) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_round_trip() {
        let d = Duration::from_millis(1500);
        assert_eq!(duration_from_pb(&duration_to_pb(d)), Some(d));
        assert_eq!(duration_from_pb(&prost_types::Duration { seconds: -1, nanos: 0 }), None);
    }

    #[test]
    fn timestamp_round_trip() {
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(timestamp_from_pb(&timestamp_to_pb(t)), t);
    }

    #[test]
    fn human() {
        assert_eq!(human_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(human_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(human_duration(Duration::from_secs(150)), "2m 30s");
    }
}

//! Durations as Istio's YAML writes them: Go `time.ParseDuration` syntax
//! (`10s`, `1.5s`, `100ms`, `1m30s`), which is what `kubectl apply`
//! accepts for Istio's duration fields.

use std::time::Duration;

/// Parses `"10s"`, `"250ms"`, `"1h2m3.5s"`, `"0"`. Negative durations and a
/// missing unit (other than a bare `0`) are rejected.
pub fn parse(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    if s.is_empty() {
        return None;
    }
    let mut rest = s;
    let mut total_ns: f64 = 0.0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let value: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit_ns = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total_ns += value * unit_ns;
    }
    if !total_ns.is_finite() || total_ns > u64::MAX as f64 {
        return None;
    }
    Some(Duration::from_nanos(total_ns.round() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_duration_syntax() {
        assert_eq!(parse("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse("100ms"), Some(Duration::from_millis(100)));
        assert_eq!(parse("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("0"), Some(Duration::ZERO));
        assert_eq!(parse("0s"), Some(Duration::ZERO));
        assert_eq!(parse("10"), None);
        assert_eq!(parse("-1s"), None);
        assert_eq!(parse("ten seconds"), None);
        assert_eq!(parse(""), None);
    }
}

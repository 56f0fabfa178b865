//! Alert rules and stop conditions: `METRIC[{LABEL=VALUE,...}] OP NUMBER [for DURATION]`,
//! parsed once (the coordinator at config load and at CreateScenario, the
//! CLI before sending) with errors that quote the rule and say what is wrong.
//!
//! A rule matches every series whose name equals METRIC and whose labels
//! include each LABEL=VALUE; the pseudo-label `source` matches the batch's
//! source (an agent id or "probe:NAME"). It fires on a series once the
//! comparison has held on every sample of that series for DURATION (at once
//! without `for`).

use crate::edge::quote;
use std::{collections::HashMap, fmt, time::Duration};

/// Comparison of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Gt,
    Ge,
    Lt,
    Le,
    Eq,
    Ne,
}

impl Op {
    const ALL: [(&'static str, Op); 6] = [(">=", Op::Ge), ("<=", Op::Le), ("==", Op::Eq), ("!=", Op::Ne), (">", Op::Gt), ("<", Op::Lt)];

    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Op::Gt => value > threshold,
            Op::Ge => value >= threshold,
            Op::Lt => value < threshold,
            Op::Le => value <= threshold,
            Op::Eq => value == threshold,
            Op::Ne => value != threshold,
        }
    }

    pub fn as_str(self) -> &'static str {
        Op::ALL.iter().find(|(_, o)| *o == self).map(|(s, _)| *s).unwrap_or("?")
    }
}

/// A parsed rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// The rule as written (trimmed).
    pub expr: String,
    pub metric: String,
    /// Required labels, sorted by name.
    pub labels: Vec<(String, String)>,
    pub op: Op,
    pub threshold: f64,
    /// How long the condition must hold before the rule fires.
    pub hold: Duration,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.expr)
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-' | '/'))
}

impl Rule {
    /// Parse `METRIC[{k=v,...}] OP NUMBER [for DURATION]`.
    pub fn parse(text: &str) -> Result<Rule, String> {
        let expr = text.trim().to_string();
        let bad = |why: &str| {
            format!(
                "rule {}: {why} (grammar: METRIC[{{LABEL=VALUE,...}}] OP NUMBER [for DURATION], OP one of > >= < <= == !=)",
                quote(&expr)
            )
        };
        let (cond, hold) = match expr.rsplit_once(" for ") {
            Some((c, d)) => {
                let d = d.trim();
                let hold =
                    crate::convert::parse_duration(d).map_err(|e| bad(&format!("invalid duration {} after `for`: {e}", quote(d))))?;
                (c.trim(), hold)
            }
            None => (expr.as_str(), Duration::ZERO),
        };
        let (at, op) = Op::ALL
            .iter()
            .filter_map(|(s, o)| cond.find(s).map(|i| (i, (*s, *o))))
            .min_by_key(|(i, (s, _))| (*i, std::cmp::Reverse(s.len())))
            .ok_or_else(|| bad("no comparison"))?;
        let (lhs, rhs) = (cond[..at].trim(), cond[at + op.0.len()..].trim());
        let threshold: f64 = rhs.parse().map_err(|_| bad(&format!("threshold {} is not a number", quote(rhs))))?;
        if !threshold.is_finite() {
            return Err(bad(&format!("threshold {} is not finite", quote(rhs))));
        }
        let (metric, labels) = match lhs.split_once('{') {
            None => (lhs, Vec::new()),
            Some((m, rest)) => {
                let inner = rest.strip_suffix('}').ok_or_else(|| bad("labels must end with `}`"))?;
                let mut labels = Vec::new();
                for pair in inner.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').ok_or_else(|| bad(&format!("label {} is not LABEL=VALUE", quote(pair))))?;
                    let (k, v) = (k.trim(), v.trim().trim_matches('"'));
                    if !valid_name(k) || v.is_empty() {
                        return Err(bad(&format!("label {} is not LABEL=VALUE", quote(pair))));
                    }
                    labels.push((k.to_string(), v.to_string()));
                }
                labels.sort();
                (m.trim(), labels)
            }
        };
        if !valid_name(metric) {
            return Err(bad(&format!("metric name {} is empty or has characters other than letters, digits, _ . : - /", quote(metric))));
        }
        Ok(Rule { expr: expr.clone(), metric: metric.to_string(), labels, op: op.1, threshold, hold })
    }

    /// Whether a series (`source`, metric `name`, `labels`) is one this rule watches.
    pub fn selects(&self, source: &str, name: &str, labels: &HashMap<String, String>) -> bool {
        name == self.metric
            && self.labels.iter().all(|(k, v)| if k == "source" { source == v } else { labels.get(k).is_some_and(|x| x == v) })
    }

    /// Whether `value` breaches the rule.
    pub fn breached_by(&self, value: f64) -> bool {
        self.op.holds(value, self.threshold)
    }
}

/// Parse a list of rules, naming the field and index of the first bad one.
pub fn parse_all(field: &str, rules: &[String]) -> Result<Vec<Rule>, String> {
    rules.iter().enumerate().map(|(i, r)| Rule::parse(r).map_err(|e| format!("{field}[{i}]: {e}"))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn parses_the_issue_examples() {
        let r = Rule::parse("kafka.lag.total > 100000 for 30s").expect("parse");
        assert_eq!((r.metric.as_str(), r.op, r.threshold, r.hold), ("kafka.lag.total", Op::Gt, 100000.0, Duration::from_secs(30)));
        let r = Rule::parse("host.memory.used_pct>95").expect("parse");
        assert_eq!((r.op, r.threshold, r.hold), (Op::Gt, 95.0, Duration::ZERO));
        let r = Rule::parse(" probe.up{probe=cassandra, source=probe:cassandra} <= 0 for 2s ").expect("parse");
        assert_eq!(r.op, Op::Le);
        assert_eq!(r.labels, vec![("probe".into(), "cassandra".into()), ("source".into(), "probe:cassandra".into())]);
        assert_eq!(r.expr, "probe.up{probe=cassandra, source=probe:cassandra} <= 0 for 2s");
        assert_eq!(Rule::parse("x != -1").expect("parse").threshold, -1.0);
    }

    #[test]
    fn selects_by_name_labels_and_source() {
        let r = Rule::parse("probe.up{probe=kafka,source=probe:kafka} < 1").expect("parse");
        assert!(r.selects("probe:kafka", "probe.up", &labels(&[("probe", "kafka")])));
        assert!(!r.selects("probe:other", "probe.up", &labels(&[("probe", "kafka")])));
        assert!(!r.selects("probe:kafka", "probe.up", &labels(&[("probe", "cassandra")])));
        assert!(!r.selects("probe:kafka", "probe.upx", &labels(&[("probe", "kafka")])));
        assert!(r.breached_by(0.0) && !r.breached_by(1.0));
    }

    #[test]
    fn errors_quote_the_rule_and_say_why() {
        for (text, why) in [
            ("kafka.lag.total 5", "no comparison"),
            ("kafka.lag.total > lots", "\"lots\" is not a number"),
            ("kafka.lag.total > 5 for ever", "invalid duration \"ever\""),
            ("> 5", "metric name \"\" is empty"),
            ("a{b} > 1", "label \"b\" is not LABEL=VALUE"),
            ("a{b=1 > 1", "labels must end with `}`"),
            ("a b > 1", "metric name \"a b\""),
        ] {
            let e = Rule::parse(text).expect_err(text);
            assert!(e.contains(&format!("{text:?}")) && e.contains(why), "{text}: {e}");
        }
        let e = parse_all("spec.stop_conditions", &["a > 1".into(), "b >".into()]).expect_err("second");
        assert!(e.starts_with("spec.stop_conditions[1]: rule \"b >\""), "{e}");
    }
}

//! Admission: which agents a scenario selects and the blast radius it would
//! reach together with the running scenarios. Pure (the fleet, the busy set
//! and the random source are passed in), so the arithmetic is unit-tested.

use std::collections::{BTreeMap, BTreeSet};

use chaos_proto::pb::{self, AgentHealth, SelectionMode};
use rand::{Rng, seq::IndexedRandom};

use crate::policy::Policy;

/// What admission needs to know about one agent.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentView {
    pub agent_id: String,
    pub address: String,
    pub labels: BTreeMap<String, String>,
    pub health: AgentHealth,
    /// Families the agent reported as supported; None when it reported none.
    pub families: Option<BTreeSet<String>>,
}

/// The outcome: the selection, the blast radius, and every refusal.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decision {
    pub selected: Vec<AgentView>,
    pub blast: pb::BlastRadius,
    pub refusals: Vec<String>,
    pub notes: Vec<String>,
}

fn pct(f: f64) -> String {
    format!("{:.0} %", f * 100.0)
}

fn selector_text(sel: &pb::AgentSelector) -> String {
    let mut parts: Vec<String> = sel.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    parts.sort();
    if !sel.agent_ids.is_empty() {
        parts.push(format!("id in [{}]", sel.agent_ids.join(",")));
    }
    if parts.is_empty() { "all agents".into() } else { format!("agents matching {}", parts.join(", ")) }
}

pub(crate) fn matches(a: &AgentView, sel: &pb::AgentSelector) -> bool {
    sel.labels.iter().all(|(k, v)| a.labels.get(k) == Some(v)) && (sel.agent_ids.is_empty() || sel.agent_ids.contains(&a.agent_id))
}

/// Select agents for `spec` (a `family` fault) and measure the blast radius
/// against `busy`, the agents running scenarios already affect.
pub fn decide(
    policy: &Policy,
    fleet: &[AgentView],
    busy: &BTreeSet<String>,
    spec: &pb::ScenarioSpec,
    family: &str,
    rng: &mut impl Rng,
) -> Decision {
    let mut d = Decision::default();
    let sel = spec.selector.clone().unwrap_or_default();
    let live: Vec<&AgentView> = fleet.iter().filter(|a| a.health != AgentHealth::Lost).collect();
    for id in &sel.agent_ids {
        match fleet.iter().find(|a| &a.agent_id == id) {
            None => d.refusals.push(format!("selector.agent_ids: agent {id:?} is not registered")),
            Some(a) if a.health == AgentHealth::Lost => d.refusals.push(format!("selector.agent_ids: agent {id:?} is lost (no heartbeat)")),
            Some(a) if is_protected(policy, a) => {
                d.refusals.push(format!("selector.agent_ids: agent {id:?} is protected ({}=true)", policy.protected_label))
            }
            Some(_) => {}
        }
    }
    let group: Vec<&AgentView> = live.iter().copied().filter(|a| matches(a, &sel)).collect();
    let mut eligible = Vec::new();
    let (mut protected, mut late, mut unsupported) = (vec![], vec![], vec![]);
    for a in &group {
        if is_protected(policy, a) {
            protected.push(a.agent_id.as_str());
        } else if a.health != AgentHealth::Healthy {
            late.push(a.agent_id.as_str());
        } else if a.families.as_ref().is_some_and(|f| !f.contains(family)) {
            unsupported.push(a.agent_id.as_str());
        } else {
            eligible.push(*a);
        }
    }
    let lost = fleet.iter().filter(|a| a.health == AgentHealth::Lost && matches(a, &sel)).count();
    for (list, why) in [
        (&protected, format!("protected ({}=true)", policy.protected_label)),
        (&late, "late heartbeat".into()),
        (&unsupported, format!("no {family} support")),
    ] {
        if !list.is_empty() {
            d.notes.push(format!("skipped {} agent(s), {why}: {}", list.len(), list.join(", ")));
        }
    }
    if lost > 0 {
        d.notes.push(format!("skipped {lost} lost agent(s)"));
    }
    let want = match SelectionMode::try_from(spec.mode).unwrap_or(SelectionMode::Unspecified) {
        SelectionMode::Unspecified | SelectionMode::All => eligible.len(),
        SelectionMode::One => 1,
        SelectionMode::Count => {
            if spec.count == 0 {
                d.refusals.push("count: must be at least 1 with SELECTION_MODE_COUNT".into());
            }
            spec.count as usize
        }
        SelectionMode::Percent => {
            if !(spec.percent > 0.0 && spec.percent <= 100.0) {
                d.refusals.push(format!("percent: must be in (0, 100] with SELECTION_MODE_PERCENT, got {}", spec.percent));
            }
            ((eligible.len() as f64 * spec.percent / 100.0).floor() as usize).max(1)
        }
    };
    if eligible.is_empty() {
        d.refusals.push(format!(
            "no eligible agent: {} gives {} live agent(s), none healthy, unprotected and supporting {family}",
            selector_text(&sel),
            group.len()
        ));
    } else if want > eligible.len() {
        d.refusals.push(format!("selection asks for {want} agent(s) but only {} are eligible ({})", eligible.len(), selector_text(&sel)));
    } else if want > 0 {
        let mut chosen: Vec<AgentView> = if want == eligible.len() {
            eligible.iter().map(|a| (*a).clone()).collect()
        } else {
            eligible.choose_multiple(rng, want).map(|a| (*a).clone()).collect()
        };
        chosen.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        d.selected = chosen;
    }

    // Blast radius: the union of what running scenarios affect and this selection.
    let live_ids: BTreeSet<&str> = live.iter().map(|a| a.agent_id.as_str()).collect();
    let already: BTreeSet<&str> = busy.iter().map(String::as_str).filter(|id| live_ids.contains(id)).collect();
    let mut affected = already.clone();
    affected.extend(d.selected.iter().map(|a| a.agent_id.as_str()));
    // The group is what the selector's labels pick (agent ids are an explicit choice, not a group).
    let label_sel = pb::AgentSelector { labels: sel.labels.clone(), agent_ids: vec![] };
    let group_ids: BTreeSet<&str> = live.iter().filter(|a| matches(a, &label_sel)).map(|a| a.agent_id.as_str()).collect();
    let group_affected = affected.intersection(&group_ids).count();
    let limit = policy.rule(family).blast_radius_limit;
    let frac = |n: usize, of: usize| if of == 0 { 0.0 } else { n as f64 / of as f64 };
    d.blast = pb::BlastRadius {
        affected_agents: affected.len() as u32,
        fleet_agents: live.len() as u32,
        fraction: frac(affected.len(), live.len()),
        limit,
        group_affected_agents: group_affected as u32,
        group_agents: group_ids.len() as u32,
        group_fraction: frac(group_affected, group_ids.len()),
        group_limit: policy.group_blast_radius_limit,
    };
    if !d.selected.is_empty() {
        let b = &d.blast;
        let running =
            if already.is_empty() { String::new() } else { format!(" ({} already affected by running scenarios)", already.len()) };
        if b.fraction > b.limit + 1e-9 {
            d.refusals.push(format!(
                "blast radius: would affect {} of {} agents ({}) > limit {}{running}",
                b.affected_agents,
                b.fleet_agents,
                pct(b.fraction),
                pct(b.limit)
            ));
        }
        if !sel.labels.is_empty() && group_ids.len() < live.len() && b.group_fraction > b.group_limit + 1e-9 {
            d.refusals.push(format!(
                "blast radius: would affect {} of {} {} ({}) > group limit {}{running}",
                b.group_affected_agents,
                b.group_agents,
                selector_text(&label_sel),
                pct(b.group_fraction),
                pct(b.group_limit)
            ));
        }
    }
    d
}

pub(crate) fn is_protected(policy: &Policy, a: &AgentView) -> bool {
    a.labels.get(&policy.protected_label).is_some_and(|v| v == "true")
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};

    use super::*;

    fn agent(id: &str, labels: &[(&str, &str)]) -> AgentView {
        AgentView {
            agent_id: id.into(),
            address: format!("http://{id}:1"),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            health: AgentHealth::Healthy,
            families: None,
        }
    }

    fn fleet(n: usize) -> Vec<AgentView> {
        (0..n).map(|i| agent(&format!("a{i:02}"), &[("role", if i < 3 { "kafka" } else { "web" })])).collect()
    }

    fn spec(mode: SelectionMode, count: u32, labels: &[(&str, &str)]) -> pb::ScenarioSpec {
        pb::ScenarioSpec {
            mode: mode as i32,
            count,
            selector: Some(pb::AgentSelector {
                labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                agent_ids: vec![],
            }),
            ..Default::default()
        }
    }

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    #[test]
    fn blast_radius_counts_running_scenarios_and_names_the_numbers() {
        let p = Policy { group_blast_radius_limit: 1.0, ..Policy::default() };
        let f = fleet(10);
        let d = decide(&p, &f, &BTreeSet::new(), &spec(SelectionMode::Count, 3, &[]), "network_loss", &mut rng());
        assert!(d.refusals.is_empty(), "{:?}", d.refusals);
        assert_eq!((d.selected.len(), d.blast.affected_agents, d.blast.fleet_agents), (3, 3, 10));
        let d = decide(&p, &f, &BTreeSet::new(), &spec(SelectionMode::Count, 4, &[]), "network_loss", &mut rng());
        assert_eq!(d.refusals, vec!["blast radius: would affect 4 of 10 agents (40 %) > limit 30 %".to_string()]);
        // Two agents are busy with a running scenario: two more make 4.
        let busy: BTreeSet<String> = ["a05".to_string(), "a06".to_string()].into();
        let mut two = spec(SelectionMode::All, 0, &[]);
        two.selector = Some(pb::AgentSelector { agent_ids: vec!["a03".into(), "a04".into()], ..Default::default() });
        let d = decide(&p, &f, &busy, &two, "network_loss", &mut rng());
        assert!(
            d.refusals.iter().any(|r| r.contains("would affect") && r.contains("(2 already affected by running scenarios)")),
            "{:?}",
            d.refusals
        );
        // The busy agents themselves again: the union does not grow.
        let mut s = spec(SelectionMode::All, 0, &[]);
        s.selector = Some(pb::AgentSelector { agent_ids: vec!["a05".into(), "a06".into()], ..Default::default() });
        let d = decide(&p, &f, &busy, &s, "network_loss", &mut rng());
        assert!(d.refusals.is_empty(), "{:?}", d.refusals);
        assert_eq!(d.blast.affected_agents, 2);
    }

    #[test]
    fn group_limit_and_per_type_limit() {
        let p = Policy::default();
        let d = decide(&p, &fleet(10), &BTreeSet::new(), &spec(SelectionMode::One, 0, &[("role", "kafka")]), "network_loss", &mut rng());
        assert_eq!(d.refusals, vec!["blast radius: would affect 1 of 3 agents matching role=kafka (33 %) > group limit 30 %".to_string()]);
        let mut p = Policy { group_blast_radius_limit: 0.5, ..Policy::default() };
        p.types.insert("network_loss".into(), crate::policy::TypeRule { blast_radius_limit: Some(0.05), ..Default::default() });
        let d = decide(&p, &fleet(10), &BTreeSet::new(), &spec(SelectionMode::One, 0, &[]), "network_loss", &mut rng());
        assert_eq!(d.refusals, vec!["blast radius: would affect 1 of 10 agents (10 %) > limit 5 %".to_string()]);
        assert!(
            decide(&p, &fleet(10), &BTreeSet::new(), &spec(SelectionMode::One, 0, &[]), "network_latency", &mut rng()).refusals.is_empty()
        );
    }

    #[test]
    fn protected_lost_late_and_unsupported_agents_are_never_selected() {
        let p = Policy { blast_radius_limit: 1.0, group_blast_radius_limit: 1.0, ..Policy::default() };
        let mut f = fleet(5);
        f[0].labels.insert("chaos.protected".into(), "true".into());
        f[1].health = AgentHealth::Lost;
        f[2].health = AgentHealth::Late;
        f[3].families = Some(["process_pause".to_string()].into());
        let d = decide(&p, &f, &BTreeSet::new(), &spec(SelectionMode::All, 0, &[]), "network_loss", &mut rng());
        assert_eq!(d.selected.iter().map(|a| a.agent_id.as_str()).collect::<Vec<_>>(), vec!["a04"]);
        assert_eq!(d.blast.fleet_agents, 4, "lost agents are not part of the fleet");
        assert!(d.notes.iter().any(|n| n.contains("protected") && n.contains("a00")), "{:?}", d.notes);
        assert!(d.notes.iter().any(|n| n.contains("no network_loss support") && n.contains("a03")), "{:?}", d.notes);
        let mut s = spec(SelectionMode::All, 0, &[]);
        s.selector = Some(pb::AgentSelector { agent_ids: vec!["a00".into(), "zz".into()], ..Default::default() });
        let d = decide(&p, &f, &BTreeSet::new(), &s, "network_loss", &mut rng());
        assert!(
            d.refusals.contains(&"selector.agent_ids: agent \"a00\" is protected (chaos.protected=true)".to_string()),
            "{:?}",
            d.refusals
        );
        assert!(d.refusals.contains(&"selector.agent_ids: agent \"zz\" is not registered".to_string()), "{:?}", d.refusals);
    }

    #[test]
    fn selection_modes() {
        let p = Policy { blast_radius_limit: 1.0, group_blast_radius_limit: 1.0, ..Policy::default() };
        let f = fleet(10);
        let n = |s: pb::ScenarioSpec| decide(&p, &f, &BTreeSet::new(), &s, "network_loss", &mut rng());
        assert_eq!(n(spec(SelectionMode::Unspecified, 0, &[])).selected.len(), 10);
        assert_eq!(n(spec(SelectionMode::One, 0, &[])).selected.len(), 1);
        let mut s = spec(SelectionMode::Percent, 0, &[]);
        s.percent = 25.0;
        assert_eq!(n(s.clone()).selected.len(), 2, "25 % of 10 rounds down to 2");
        s.percent = 1.0;
        assert_eq!(n(s.clone()).selected.len(), 1, "at least one");
        s.percent = 150.0;
        assert!(n(s).refusals[0].starts_with("percent: must be in (0, 100]"));
        let r = n(spec(SelectionMode::Count, 11, &[])).refusals;
        assert_eq!(r, vec!["selection asks for 11 agent(s) but only 10 are eligible (all agents)".to_string()]);
        let r = n(spec(SelectionMode::All, 0, &[("role", "db")])).refusals;
        assert!(r[0].starts_with("no eligible agent: agents matching role=db gives 0 live agent(s)"), "{r:?}");
        // Random choice spreads over the eligible agents.
        let mut seen = BTreeSet::new();
        let mut r = rng();
        for _ in 0..200 {
            seen.insert(
                decide(&p, &f, &BTreeSet::new(), &spec(SelectionMode::One, 0, &[]), "network_loss", &mut r).selected[0].agent_id.clone(),
            );
        }
        assert_eq!(seen.len(), 10);
    }
}

//! Preemption: when no node fits a pod, the scheduler looks for a node
//! where removing pods of lower priority would make room, and picks the
//! cheapest such node, as upstream's DefaultPreemption does:
//! * on each node, every lower-priority pod is a candidate; the pod must
//!   fit with all of them gone, then candidates are reprieved from the
//!   highest priority down while the pod still fits, so the victims are
//!   few and of low priority;
//! * between nodes: the lowest highest-victim priority, then the lowest
//!   sum of victim priorities, then the fewest victims.
//!
//! Only resources (cpu, memory, pod count) are made free this way; a node
//! rejected for readiness, taints, node affinity, host ports, pod
//! affinity, spread or volumes is not a candidate.

use crate::scheduler::Resources;

/// A pod on a node, as preemption weighs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub key: String,
    pub priority: i64,
    pub req: Resources,
}

/// The victims on one node for a pod of `priority` needing `req`, or
/// `None` when removing every lower-priority pod is not enough.
pub fn victims_on(
    alloc: Resources,
    used: Resources,
    pods: &[Placed],
    priority: i64,
    req: Resources,
    fits: impl Fn(Resources, Resources, Resources) -> bool,
) -> Option<Vec<Placed>> {
    let mut lower: Vec<&Placed> = pods.iter().filter(|p| p.priority < priority).collect();
    if lower.is_empty() {
        return None;
    }
    let mut remaining = used;
    for p in &lower {
        remaining = remaining.minus(p.req);
    }
    if !fits(req, alloc, remaining) {
        return None;
    }
    // Reprieve the most important pods first (ties: the key, for a
    // stable choice).
    lower.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.key.cmp(&b.key)));
    let mut victims = Vec::new();
    for p in lower {
        let with = remaining.plus(p.req);
        if fits(req, alloc, with) {
            remaining = with;
        } else {
            victims.push(p.clone());
        }
    }
    Some(victims)
}

/// The cheapest of the candidate nodes (name, victims).
pub fn pick(candidates: Vec<(String, Vec<Placed>)>) -> Option<(String, Vec<Placed>)> {
    candidates.into_iter().min_by_key(|(name, victims)| {
        (
            victims.iter().map(|v| v.priority).max().unwrap_or(i64::MIN),
            victims.iter().map(|v| v.priority as i128).sum::<i128>(),
            victims.len(),
            name.clone(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(milli_cpu: i64) -> Resources {
        Resources {
            milli_cpu,
            memory: 0,
            pods: 1,
        }
    }

    fn fits(req: Resources, alloc: Resources, used: Resources) -> bool {
        used.milli_cpu + req.milli_cpu <= alloc.milli_cpu && used.pods < alloc.pods
    }

    fn placed(key: &str, priority: i64, cpu: i64) -> Placed {
        Placed {
            key: key.into(),
            priority,
            req: r(cpu),
        }
    }

    #[test]
    fn fewest_lowest_victims_are_chosen() {
        let alloc = Resources {
            milli_cpu: 1000,
            memory: 0,
            pods: 10,
        };
        let pods = vec![
            placed("a", 0, 400),
            placed("b", 10, 400),
            placed("c", 100, 200),
        ];
        let used = Resources {
            milli_cpu: 1000,
            memory: 0,
            pods: 3,
        };
        // 400m needed: removing "a" (lowest) is enough; "b" is reprieved.
        let v = victims_on(alloc, used, &pods, 50, r(400), fits).unwrap();
        assert_eq!(v, vec![placed("a", 0, 400)]);
        // 800m: both lower pods must go; "c" has higher priority and stays.
        let v = victims_on(alloc, used, &pods, 50, r(800), fits).unwrap();
        assert_eq!(v.len(), 2);
        // 900m: not even removing every lower pod makes room.
        assert!(victims_on(alloc, used, &pods, 50, r(900), fits).is_none());
        // Nothing has lower priority than 0.
        assert!(victims_on(alloc, used, &pods, 0, r(100), fits).is_none());
    }

    #[test]
    fn cheapest_node_wins() {
        let got = pick(vec![
            ("n1".into(), vec![placed("x", 10, 1)]),
            ("n2".into(), vec![placed("y", 5, 1), placed("z", 5, 1)]),
            ("n3".into(), vec![placed("w", 5, 1)]),
        ])
        .unwrap();
        assert_eq!(got.0, "n3");
    }
}

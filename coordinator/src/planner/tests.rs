use super::*;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;

fn node(id: &str, weight: u32) -> NodeSpec {
    NodeSpec { id: id.into(), weight, queues: Vec::new(), cordoned: false, refused: Vec::new() }
}

fn queue(name: &str, slices: u32) -> QueueSpec {
    QueueSpec { name: name.into(), slices, paused: false }
}

fn key(queue: &str, slice: u32) -> SliceKey {
    (queue.to_owned(), slice)
}

fn unlimited() -> PlanOptions {
    PlanOptions { churn_budget: usize::MAX, ..PlanOptions::default() }
}

fn cluster(queues: Vec<QueueSpec>, nodes: Vec<NodeSpec>) -> PlanInput {
    PlanInput { queues, nodes, options: unlimited(), ..PlanInput::default() }
}

/// Slices of `queue` per owner in an assignment.
fn held(assignment: &BTreeMap<SliceKey, String>, queue: &str) -> BTreeMap<String, u128> {
    let mut out = BTreeMap::new();
    for ((q, _), owner) in assignment {
        if q == queue {
            *out.entry(owner.clone()).or_insert(0) += 1;
        }
    }
    out
}

fn live(input: &PlanInput, id: &str) -> bool {
    input.nodes.iter().any(|n| n.id == id)
}

fn eligible(input: &PlanInput, id: &str, queue: &str) -> bool {
    input.nodes.iter().find(|n| n.id == id).is_some_and(|n| n.eligible_for(queue))
}

fn active(input: &PlanInput) -> impl Iterator<Item = &QueueSpec> {
    input.queues.iter().filter(|q| !q.paused)
}

fn planned(input: &PlanInput, key: &SliceKey) -> bool {
    active(input).any(|q| q.name == key.0 && key.1 < q.slices)
}

/// A share as (numerator, denominator).
type Fraction = (u128, u128);

/// `floor` and `ceil` of a sum of fractions, computed exactly (test sizes keep the
/// common denominator small).
fn floor_ceil(fractions: &[Fraction]) -> (u128, u128) {
    let den = fractions.iter().fold(1u128, |l, &(_, d)| l / gcd(l, d) * d);
    let num: u128 = fractions.iter().map(|&(n, d)| n * (den / d)).sum();
    (num / den, num.div_ceil(den))
}

/// A node's share of a queue without pins: `S * w / W` over the eligible nodes.
fn share(input: &PlanInput, q: &QueueSpec, id: &str) -> Fraction {
    let total: u128 = input.nodes.iter().filter(|n| n.eligible_for(&q.name)).map(|n| u128::from(n.weight)).sum();
    let weight = input.nodes.iter().find(|n| n.id == id).map_or(0, |n| u128::from(n.weight));
    (u128::from(q.slices) * weight, total)
}

/// The bounds the contract promises when nothing is deferred and nothing is pinned:
/// `floor(x)..=ceil(x)` per queue, `floor(T)..=ceil(T)` in total, and nothing left
/// on a node that is not eligible (for queues that have an eligible node).
fn check_balanced(input: &PlanInput, plan: &Plan) -> Result<(), TestCaseError> {
    // Per node: slices held, and its share of each queue as (numerator, denominator).
    let mut totals: BTreeMap<&str, (u128, Vec<Fraction>)> = BTreeMap::new();
    for q in active(input) {
        if !input.nodes.iter().any(|n| n.eligible_for(&q.name)) {
            continue;
        }
        let counts = held(&plan.assignment, &q.name);
        for (owner, count) in &counts {
            prop_assert!(eligible(input, owner, &q.name), "{} holds {} slices of {} but is not eligible", owner, count, q.name);
        }
        for n in input.nodes.iter().filter(|n| n.eligible_for(&q.name)) {
            let x = share(input, q, &n.id);
            let (lo, hi) = floor_ceil(&[x]);
            let count = counts.get(&n.id).copied().unwrap_or(0);
            prop_assert!(lo <= count && count <= hi, "{} holds {} of {}, share {}/{}", n.id, count, q.name, x.0, x.1);
            let t = totals.entry(&n.id).or_default();
            t.0 += count;
            t.1.push(x);
        }
    }
    for (id, (total, shares)) in totals {
        let (lo, hi) = floor_ceil(&shares);
        prop_assert!(lo <= total && total <= hi, "{} holds {} in total, share in {}..={}", id, total, lo, hi);
    }
    Ok(())
}

/// Up to 4 queues of up to 64 slices, up to 12 nodes with weights 0..=4, cordons and
/// queue lists, a current assignment mixing live, dead and missing owners (and stale
/// entries), and a few pins.
fn arb_input() -> impl Strategy<Value = PlanInput> {
    (1usize..=4, 1usize..=12).prop_flat_map(|(nq, nn)| {
        (
            proptest::collection::vec((1u32..=64, prop::bool::weighted(0.2)), nq),
            proptest::collection::vec(
                (prop_oneof![1 => Just(0u32), 7 => 1u32..=4], prop::bool::weighted(0.15), prop::option::weighted(0.3, proptest::collection::vec(0..nq + 1, 1..=2))),
                nn,
            ),
            proptest::collection::vec(any::<u8>(), nq * 64),
            proptest::collection::vec((0..nq, any::<u32>(), 0..nn + 2), 0..=6),
        )
            .prop_map(move |(queues, nodes, owners, pins)| {
                let queues: Vec<QueueSpec> = queues.into_iter().enumerate().map(|(i, (slices, paused))| QueueSpec { name: format!("q{i}"), slices, paused }).collect();
                let nodes: Vec<NodeSpec> = nodes
                    .into_iter()
                    .enumerate()
                    .map(|(i, (weight, cordoned, serves))| NodeSpec {
                        id: format!("n{i:02}"),
                        weight,
                        queues: serves.unwrap_or_default().into_iter().map(|q| format!("q{q}")).collect(),
                        cordoned,
                        refused: Vec::new(),
                    })
                    .collect();
                let name = |i: usize| if i < nn { format!("n{i:02}") } else { format!("gone{}", i - nn) };
                let mut current = BTreeMap::new();
                for (qi, q) in queues.iter().enumerate() {
                    for s in 0..q.slices {
                        let code = usize::from(owners[qi * 64 + s as usize]);
                        match code % 8 {
                            0 => {}
                            1 => _ = current.insert(key(&q.name, s), name(nn + code % 2)),
                            _ => _ = current.insert(key(&q.name, s), name(code / 8 % nn)),
                        }
                    }
                    if owners[qi * 64 + 63] % 4 == 0 {
                        current.insert(key(&q.name, q.slices + 1), name(0));
                        current.insert(key("retired", q.slices), name(0));
                    }
                }
                let pins = pins.into_iter().map(|(qi, s, ni)| (key(&queues[qi].name, s % queues[qi].slices), name(ni))).collect();
                PlanInput { queues, nodes, current, pins, options: unlimited(), ..PlanInput::default() }
            })
    })
}

/// Options that constrain the plan: maintenance, small budgets, a tripped valve.
fn arb_constrained(input: PlanInput) -> impl Strategy<Value = PlanInput> {
    (any::<bool>(), prop_oneof![0usize..=6, Just(usize::MAX)], any::<bool>()).prop_map(move |(maintenance, churn_budget, vanish)| {
        let mut input = input.clone();
        input.options.maintenance = maintenance;
        input.options.churn_budget = churn_budget;
        if vanish {
            input.previous_nodes = mass_vanished_history(&input);
        }
        input
    })
}

/// A previous node set of which more than half is gone now.
fn mass_vanished_history(input: &PlanInput) -> BTreeSet<String> {
    let mut previous: BTreeSet<String> = input.nodes.iter().map(|n| n.id.clone()).collect();
    previous.extend((0..=input.nodes.len()).map(|i| format!("old{i}")));
    previous
}

fn arb_any_options() -> impl Strategy<Value = PlanInput> {
    arb_input().prop_flat_map(arb_constrained)
}

fn fresh(mut input: PlanInput) -> PlanInput {
    input.current.clear();
    input.pins.clear();
    input.options = unlimited();
    input
}

/// Plans and applies until nothing is deferred (a death takes two plans); returns the
/// input of the last plan and that plan.
fn settle(mut input: PlanInput) -> (PlanInput, Plan) {
    for _ in 0..3 {
        let plan = plan(&input);
        if plan.deferred_moves == 0 {
            return (input, plan);
        }
        input.current = plan.assignment;
        input.previous_nodes = input.nodes.iter().map(|n| n.id.clone()).collect();
    }
    panic!("still deferring moves after three plans with an unlimited budget");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_slice_of_every_active_queue_with_an_eligible_node_is_covered(input in arb_any_options()) {
        let plan = plan(&input);
        for q in active(&input) {
            let coverable = input.nodes.iter().any(|n| n.eligible_for(&q.name));
            for s in 0..q.slices {
                let k = key(&q.name, s);
                let owner_now = input.current.get(&k).filter(|o| live(&input, o));
                match plan.assignment.get(&k) {
                    Some(owner) => prop_assert!(live(&input, owner)),
                    None => {
                        prop_assert!(!coverable, "{:?} has no owner", k);
                        prop_assert!(owner_now.is_none(), "{:?} lost its live owner", k);
                        prop_assert!(plan.uncovered.contains(&k));
                    }
                }
                if !coverable && owner_now.is_some() {
                    prop_assert_eq!(plan.assignment.get(&k), owner_now);
                }
            }
        }
        for k in plan.assignment.keys() {
            prop_assert!(planned(&input, k), "{:?} is not a slice of an active queue", k);
        }
    }

    #[test]
    fn each_queue_and_each_nodes_total_stay_within_one_slice_of_the_weighted_share(input in arb_input()) {
        let mut input = input;
        input.pins.clear();
        let (input, plan) = settle(input);
        check_balanced(&input, &plan)?;
    }

    #[test]
    fn a_balanced_plan_is_a_fixpoint(input in arb_input()) {
        let mut input = input;
        input.pins.clear();
        let (mut input, plan) = settle(input);
        input.current = plan.assignment;
        let again = super::plan(&input);
        prop_assert!(again.moves.is_empty(), "{:?}", again.moves);
    }

    #[test]
    fn a_death_moves_only_the_dead_nodes_slices(input in arb_input(), victim in any::<Index>()) {
        let mut input = fresh(input);
        let before = plan(&input);
        input.current = before.assignment.clone();
        input.previous_nodes = input.nodes.iter().map(|n| n.id.clone()).collect();
        let dead = victim.get(&input.nodes).id.clone();
        input.nodes.retain(|n| n.id != dead);
        input.options.max_vanished_fraction = 1.0;
        let after = plan(&input);
        for (k, owner) in &before.assignment {
            if *owner != dead {
                prop_assert_eq!(after.assignment.get(k), Some(owner), "{:?} moved off a live node", k);
            }
        }
        for m in &after.moves {
            prop_assert_eq!(m.from.as_deref(), Some(dead.as_str()));
            prop_assert_eq!(m.reason, MoveReason::Orphaned);
        }
        // The next plan makes only the balance moves placing the orphans could not.
        input.current = after.assignment;
        input.previous_nodes = input.nodes.iter().map(|n| n.id.clone()).collect();
        let next = plan(&input);
        prop_assert_eq!(next.deferred_moves, 0);
        prop_assert!(next.moves.iter().all(|m| m.reason == MoveReason::Balance), "{:?}", next.moves);
        check_balanced(&input, &next)?;
    }

    #[test]
    fn a_join_moves_within_budget_toward_balance_and_converges(
        input in arb_input(),
        weight in 1u32..=4,
        serves in prop::option::of(0usize..4),
        budget in 1usize..=6,
    ) {
        let mut input = fresh(input);
        input.current = plan(&input).assignment;
        input.nodes.push(NodeSpec {
            id: "n99".into(),
            weight,
            queues: serves.map(|q| format!("q{q}")).into_iter().collect(),
            cordoned: false,
            refused: Vec::new(),
        });
        input.options.churn_budget = budget;
        let slices: usize = input.queues.iter().map(|q| q.slices as usize).sum();
        let mut rounds = 0;
        loop {
            let round = plan(&input);
            if round.moves.is_empty() {
                check_balanced(&input, &round)?;
                break;
            }
            rounds += 1;
            prop_assert!(rounds <= 2 * slices, "no convergence after {} rounds", rounds);
            prop_assert!(round.moves.iter().filter(|m| m.reason.is_planned()).count() <= budget);
            for m in &round.moves {
                if m.from.is_none() {
                    // The newcomer may make a queue coverable that had no eligible node.
                    prop_assert_eq!(m.reason, MoveReason::NewQueueSlice);
                    prop_assert!(!input.current.contains_key(&key(&m.queue, m.slice)));
                    continue;
                }
                prop_assert_eq!(m.reason, MoveReason::Balance);
                let q = input.queues.iter().find(|q| q.name == m.queue).expect("planned queue");
                let from = m.from.as_deref().expect("balance moves have an owner");
                let (from_lo, _) = floor_ceil(&[share(&input, q, from)]);
                let (_, to_hi) = floor_ceil(&[share(&input, q, &m.to)]);
                let (before, after) = (held(&input.current, &q.name), held(&round.assignment, &q.name));
                prop_assert!(before[from] > from_lo && after.get(from).copied().unwrap_or(0) >= from_lo,
                    "{} gave below its share", from);
                prop_assert!(before.get(&m.to).copied().unwrap_or(0) < to_hi && after[&m.to] <= to_hi,
                    "{} took above its share", m.to);
            }
            input.current = round.assignment;
        }
    }

    #[test]
    fn planned_moves_never_exceed_the_churn_budget(input in arb_input(), budget in 0usize..=6) {
        let mut input = input;
        input.options.churn_budget = budget;
        let plan = plan(&input);
        prop_assert!(plan.moves.iter().filter(|m| m.reason.is_planned()).count() <= budget);
        for m in plan.moves.iter().filter(|m| m.reason.is_planned()) {
            prop_assert!(m.from.as_deref().is_some_and(|f| live(&input, f)));
        }
    }

    #[test]
    fn pinned_slices_never_leave_a_live_pin_node(input in arb_any_options()) {
        let plan = plan(&input);
        for (k, pin) in &input.pins {
            if planned(&input, k) && live(&input, pin) && input.current.get(k) == Some(pin) {
                prop_assert_eq!(plan.assignment.get(k), Some(pin), "{:?} left its pin node", k);
            }
        }
        let mut free = input.clone();
        free.options = unlimited();
        free.previous_nodes.clear();
        let (free, plan) = settle(free);
        for (k, pin) in &free.pins {
            if planned(&free, k) && eligible(&free, pin, &k.0) {
                prop_assert_eq!(plan.assignment.get(k), Some(pin), "{:?} is not on its pin node", k);
            }
        }
    }

    #[test]
    fn maintenance_moves_only_orphans_and_unowned_slices(input in arb_input(), budget in 0usize..=6) {
        let mut input = input;
        input.options.maintenance = true;
        input.options.churn_budget = budget;
        let plan = plan(&input);
        prop_assert!(plan.balance_paused);
        for m in &plan.moves {
            prop_assert!(!m.reason.is_planned());
            prop_assert!(m.from.as_deref().is_none_or(|f| !live(&input, f)));
        }
        for (k, owner) in &input.current {
            if planned(&input, k) && live(&input, owner) {
                prop_assert_eq!(plan.assignment.get(k), Some(owner));
            }
        }
    }

    #[test]
    fn mass_vanish_pauses_planned_moves_but_orphans_are_taken_over(input in arb_input()) {
        let mut input = input;
        input.previous_nodes = mass_vanished_history(&input);
        let plan = plan(&input);
        prop_assert!(plan.balance_paused);
        let vanished = input.nodes.len() + 1;
        let alert = Alert::MassVanish { vanished, previous: 2 * vanished - 1 };
        prop_assert!(plan.alerts.contains(&alert), "no {:?} in {:?}", alert, plan.alerts);
        for m in &plan.moves {
            prop_assert!(!m.reason.is_planned());
        }
        for (k, owner) in &input.current {
            if !planned(&input, k) {
                continue;
            }
            if live(&input, owner) {
                prop_assert_eq!(plan.assignment.get(k), Some(owner));
            } else if input.nodes.iter().any(|n| n.eligible_for(&k.0)) {
                let new = plan.assignment.get(k).expect("orphan taken over");
                prop_assert!(eligible(&input, new, &k.0));
            }
        }
        // Without the vanished nodes the valve stays shut.
        input.previous_nodes = input.nodes.iter().map(|n| n.id.clone()).collect();
        let plan = super::plan(&input);
        prop_assert!(!plan.balance_paused);
        let tripped = plan.alerts.iter().any(|a| matches!(a, Alert::MassVanish { .. }));
        prop_assert!(!tripped, "{:?}", plan.alerts);
    }

    #[test]
    fn paused_queues_get_no_owner(input in arb_any_options()) {
        let plan = plan(&input);
        for q in input.queues.iter().filter(|q| q.paused) {
            prop_assert!(!plan.assignment.keys().any(|(name, _)| *name == q.name));
            prop_assert!(!plan.moves.iter().any(|m| m.queue == q.name));
            for k in input.current.keys().filter(|(name, _)| *name == q.name) {
                prop_assert!(plan.released.contains(k));
            }
        }
    }

    #[test]
    fn ineligible_nodes_get_no_new_slices(input in arb_any_options()) {
        let plan = plan(&input);
        for m in &plan.moves {
            prop_assert!(eligible(&input, &m.to, &m.queue), "{:?}", m);
        }
        for (k, owner) in &plan.assignment {
            if !eligible(&input, owner, &k.0) {
                prop_assert_eq!(input.current.get(k), Some(owner));
            }
        }
    }

    #[test]
    fn the_same_input_gives_the_same_plan(input in arb_any_options()) {
        let first = plan(&input);
        let mut shuffled = input.clone();
        shuffled.nodes.reverse();
        shuffled.queues.reverse();
        prop_assert_eq!(&first, &plan(&shuffled));
        prop_assert_eq!(&first, &plan(&input));
    }
}

#[test]
fn new_queue_slices_are_spread_in_proportion_to_weight() {
    let input = cluster(vec![queue("in", 12)], vec![node("a", 1), node("b", 2), node("c", 3)]);
    let plan = plan(&input);
    let counts = held(&plan.assignment, "in");
    assert_eq!(counts, BTreeMap::from([("a".into(), 2), ("b".into(), 4), ("c".into(), 6)]));
    assert_eq!(plan.moves.len(), 12);
    assert!(plan.moves.iter().all(|m| m.from.is_none() && m.reason == MoveReason::NewQueueSlice));
}

#[test]
fn totals_stay_within_one_slice_of_the_weighted_share_across_queues() {
    // Every node's share of each one-slice queue is 1/3, so each queue alone would allow
    // any node; in total each must hold 1 or 2 of the 4.
    let queues = (0..4).map(|i| queue(&format!("q{i}"), 1)).collect();
    let input = cluster(queues, vec![node("a", 1), node("b", 1), node("c", 1)]);
    let plan = plan(&input);
    let mut totals = BTreeMap::<&str, u32>::new();
    for owner in plan.assignment.values() {
        *totals.entry(owner.as_str()).or_default() += 1;
    }
    assert_eq!(totals.values().copied().collect::<Vec<_>>(), vec![2, 1, 1]);
}

#[test]
fn dead_nodes_slices_move_and_nothing_else_does() {
    let mut input = cluster(vec![queue("in", 12)], vec![node("a", 1), node("b", 1), node("c", 1)]);
    let first = plan(&input);
    input.current = first.assignment.clone();
    input.nodes.retain(|n| n.id != "b");
    let second = plan(&input);
    assert_eq!(second.moves.len(), 4);
    for m in &second.moves {
        assert_eq!((m.from.as_deref(), m.reason), (Some("b"), MoveReason::Orphaned));
    }
    for (k, owner) in first.assignment.iter().filter(|(_, o)| *o != "b") {
        assert_eq!(&second.assignment[k], owner);
    }
    assert_eq!(held(&second.assignment, "in"), BTreeMap::from([("a".into(), 6), ("c".into(), 6)]));
}

#[test]
fn cordoned_node_is_drained_by_node_ineligible_moves() {
    let mut input = cluster(vec![queue("in", 8)], vec![node("a", 1), node("b", 1)]);
    input.current = plan(&input).assignment;
    input.nodes[1].cordoned = true;
    let plan = plan(&input);
    assert_eq!(plan.moves.len(), 4);
    for m in &plan.moves {
        assert_eq!((m.from.as_deref(), m.to.as_str(), m.reason), (Some("b"), "a", MoveReason::NodeIneligible));
    }
    assert!(plan.assignment.values().all(|o| o == "a"));
}

#[test]
fn a_node_that_stops_serving_a_queue_is_drained_of_it() {
    let mut input = cluster(vec![queue("in", 4), queue("out", 4)], vec![node("a", 1), node("b", 1)]);
    input.current = plan(&input).assignment;
    input.nodes[1].queues = vec!["out".into()];
    let plan = plan(&input);
    assert!(plan.moves.iter().all(|m| m.queue == "in" && m.reason == MoveReason::NodeIneligible));
    assert_eq!(held(&plan.assignment, "in"), BTreeMap::from([("a".into(), 4)]));
}

#[test]
fn churn_budget_limits_planned_moves_per_round() {
    let mut input = cluster(vec![queue("in", 12)], vec![node("a", 1), node("b", 1), node("c", 1)]);
    input.current = (0..12).map(|s| (key("in", s), "a".to_owned())).collect();
    input.options.churn_budget = 3;
    let mut rounds = 0;
    loop {
        let plan = plan(&input);
        if plan.moves.is_empty() {
            break;
        }
        rounds += 1;
        assert!(plan.moves.len() <= 3);
        assert!(plan.moves.iter().all(|m| m.reason == MoveReason::Balance));
        if rounds == 1 {
            assert_eq!(plan.deferred_moves, 5);
        }
        input.current = plan.assignment;
    }
    assert_eq!(rounds, 3, "8 moves at 3 per round");
    let counts = held(&input.current, "in");
    assert!(counts.values().all(|&c| c == 4));
}

#[test]
fn maintenance_freezes_everything_but_orphan_takeover() {
    let mut input = cluster(vec![queue("in", 6)], vec![node("a", 1), node("b", 1)]);
    input.current = (0..6).map(|s| (key("in", s), if s < 2 { "dead" } else { "a" }.to_owned())).collect();
    input.options.maintenance = true;
    let plan = plan(&input);
    assert!(plan.balance_paused);
    assert_eq!(plan.moves.len(), 2);
    assert!(plan.moves.iter().all(|m| m.reason == MoveReason::Orphaned && m.to == "b"));
    assert_eq!(plan.deferred_moves, 1, "a holds 4 where 3 is its share");
}

#[test]
fn mass_vanish_trips_the_safety_valve() {
    let mut input = cluster(vec![queue("in", 8)], vec![node("a", 1), node("b", 1)]);
    input.previous_nodes = ["a", "b", "c", "d", "e"].into_iter().map(String::from).collect();
    input.current = (0..8).map(|s| (key("in", s), ["a", "c", "d", "e"][s as usize % 4].to_owned())).collect();
    input.current.insert(key("in", 0), "a".into());
    input.current.insert(key("in", 4), "a".into());
    input.current.insert(key("in", 1), "a".into());
    let plan = plan(&input);
    assert!(plan.balance_paused);
    assert_eq!(plan.alerts, vec![Alert::MassVanish { vanished: 3, previous: 5 }]);
    assert!(plan.moves.iter().all(|m| m.reason == MoveReason::Orphaned));
    assert_eq!(plan.assignment.len(), 8);
    assert_eq!(held(&plan.assignment, "in"), BTreeMap::from([("a".into(), 4), ("b".into(), 4)]));
}

#[test]
fn pinned_slice_moves_to_its_node_and_stays_there() {
    let mut input = cluster(vec![queue("in", 4)], vec![node("a", 1), node("b", 1)]);
    input.current = (0..4).map(|s| (key("in", s), "a".to_owned())).collect();
    input.pins.insert(key("in", 0), "b".into());
    input.pins.insert(key("in", 1), "a".into());
    let first = plan(&input);
    assert!(first.moves.iter().any(|m| m.slice == 0 && m.to == "b" && m.reason == MoveReason::Pinned));
    assert_eq!(first.assignment[&key("in", 1)], "a");
    assert_eq!(held(&first.assignment, "in"), BTreeMap::from([("a".into(), 2), ("b".into(), 2)]));
    // Cordoning the pin node does not move a slice it holds.
    input.current = first.assignment;
    input.nodes[1].cordoned = true;
    let second = plan(&input);
    assert_eq!(second.assignment[&key("in", 0)], "b");
    assert!(second.moves.iter().all(|m| m.slice != 0));
}

#[test]
fn pin_to_a_dead_node_is_ignored_until_the_node_returns() {
    let mut input = cluster(vec![queue("in", 2)], vec![node("a", 1)]);
    input.current.insert(key("in", 0), "b".into());
    input.pins.insert(key("in", 0), "b".into());
    let first = plan(&input);
    assert_eq!(first.assignment[&key("in", 0)], "a");
    input.current = first.assignment;
    input.nodes.push(node("b", 1));
    let second = plan(&input);
    assert_eq!(second.assignment[&key("in", 0)], "b");
    assert_eq!(second.moves.len(), 1);
    assert_eq!(second.moves[0].reason, MoveReason::Pinned);
}

#[test]
fn a_queue_without_an_eligible_node_is_reported_uncovered() {
    let mut input = cluster(vec![queue("in", 3)], vec![node("a", 1)]);
    input.nodes[0].queues = vec!["out".into()];
    input.current.insert(key("in", 0), "a".into());
    let plan = plan(&input);
    assert_eq!(plan.assignment, BTreeMap::from([(key("in", 0), "a".to_owned())]));
    assert_eq!(plan.uncovered, vec![key("in", 1), key("in", 2)]);
    assert_eq!(plan.alerts, vec![Alert::Uncovered { queue: "in".into(), slices: 2 }]);
}

#[test]
fn an_invalid_slice_count_is_reported_and_the_queue_is_not_planned() {
    let mut input = cluster(vec![queue("in", 0)], vec![node("a", 1)]);
    input.current.insert(key("in", 0), "a".into());
    let plan = plan(&input);
    assert!(plan.assignment.is_empty());
    assert_eq!(plan.released, vec![key("in", 0)]);
    assert!(matches!(&plan.alerts[..], [Alert::InvalidQueue { queue, .. }] if queue == "in"));
}

#[test]
fn a_node_that_refused_a_queue_is_drained_of_it_and_keeps_the_others() {
    let mut input = cluster(vec![queue("in", 4), queue("out", 4)], vec![node("a", 1), node("b", 1)]);
    input.current = plan(&input).assignment;
    input.nodes[0].refused = vec!["in".into()];
    let next = plan(&input);
    assert!(next.assignment.iter().filter(|((q, _), _)| q == "in").all(|(_, n)| n == "b"), "{:?}", next.assignment);
    assert_eq!(next.assignment.iter().filter(|((q, _), n)| q == "out" && *n == "a").count(), 2);
    assert!(next.moves.iter().all(|m| m.reason == MoveReason::NodeIneligible), "{:?}", next.moves);
}

#[test]
fn a_stalled_slice_goes_to_another_node_and_an_avoided_node_gets_nothing_new() {
    let mut input = cluster(vec![queue("in", 6)], vec![node("a", 1), node("b", 1), node("c", 1)]);
    input.current = plan(&input).assignment;
    let of_b: Vec<SliceKey> = input.current.iter().filter(|(_, o)| *o == "b").map(|(k, _)| k.clone()).collect();
    assert_eq!(of_b.len(), 2);
    // b was given two slices and claimed neither in time; c's lease missed a keepalive.
    input.stalled = of_b.iter().cloned().collect();
    input.avoid = BTreeSet::from(["b".to_owned(), "c".to_owned()]);
    let next = plan(&input);
    for k in &of_b {
        assert_eq!(next.assignment[k], "a", "a stalled slice goes to the one node not avoided");
    }
    assert!(next.moves.iter().all(|m| m.reason == MoveReason::Unclaimed && m.from.as_deref() == Some("b")), "{:?}", next.moves);
    assert_eq!(next.moves.len(), 2, "nothing else moves: {:?}", next.moves);
    // The round after: avoided nodes get no balance moves while avoided.
    input.current = next.assignment.clone();
    input.stalled.clear();
    let after = plan(&input);
    assert!(after.moves.is_empty(), "no balance towards avoided nodes: {:?}", after.moves);
    // Once no longer avoided, balance resumes.
    input.avoid.clear();
    let healed = plan(&input);
    assert_eq!(held(&healed.assignment, "in"), BTreeMap::from([("a".into(), 2), ("b".into(), 2), ("c".into(), 2)]));
}

#[test]
fn a_stalled_slice_stays_with_its_owner_when_every_other_node_is_avoided_too() {
    let mut input = cluster(vec![queue("in", 6)], vec![node("a", 1), node("b", 1), node("c", 1)]);
    input.current = plan(&input).assignment;
    // a is drained; b and c each stalled on a slice it was given: both are avoided.
    input.nodes.iter_mut().filter(|n| n.id == "a").for_each(|n| n.cordoned = true);
    let stalled_b = input.current.iter().find(|(_, o)| *o == "b").map(|(k, _)| k.clone()).expect("a slice of b");
    let stalled_c = input.current.iter().find(|(_, o)| *o == "c").map(|(k, _)| k.clone()).expect("a slice of c");
    input.stalled = BTreeSet::from([stalled_b.clone(), stalled_c.clone()]);
    input.avoid = BTreeSet::from(["b".to_owned(), "c".to_owned()]);
    let next = plan(&input);
    assert_eq!(next.assignment[&stalled_b], "b", "b keeps its stalled slice: c is no better");
    assert_eq!(next.assignment[&stalled_c], "c", "c keeps its stalled slice");
    assert!(next.moves.iter().all(|m| m.reason != MoveReason::Unclaimed), "no slice passed between slow nodes: {:?}", next.moves);
    // Once b and c have claimed, a is drained (to them, avoided or not: nobody else can).
    input.current = next.assignment.clone();
    input.stalled.clear();
    let after = plan(&input);
    assert!(after.assignment.values().all(|o| o != "a"), "a is drained: {:?}", after.assignment);
}

#[test]
fn an_avoided_node_still_takes_orphans_nobody_else_can() {
    let mut input = cluster(vec![queue("in", 4)], vec![node("a", 1), node("b", 1)]);
    input.current = plan(&input).assignment;
    input.nodes.retain(|n| n.id != "a");
    input.avoid = BTreeSet::from(["b".to_owned()]);
    let next = plan(&input);
    assert!(next.assignment.values().all(|o| o == "b") && next.assignment.len() == 4, "{:?}", next.assignment);
    // A dead node's orphans prefer the fresh node.
    let mut input = cluster(vec![queue("in", 6)], vec![node("a", 1), node("b", 1), node("c", 1)]);
    input.current = plan(&input).assignment;
    input.nodes.retain(|n| n.id != "a");
    input.avoid = BTreeSet::from(["b".to_owned()]);
    let next = plan(&input);
    assert_eq!(held(&next.assignment, "in"), BTreeMap::from([("b".into(), 2), ("c".into(), 4)]));
}

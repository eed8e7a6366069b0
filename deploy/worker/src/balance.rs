//! Which node of a region serves a request, and in which order the others are tried.
//!
//! A region may list several nodes (`origins`). [`Balancer::plan`] turns the regions in the
//! caller's order ([`crate::config::NodesConfig::regions_for`]) into the nodes to try, in order;
//! [`crate::failover::forward`] then walks that list with its unchanged rule (move on only when
//! the request certainly did not start).
//!
//! **Sessions stay on one node.** A request carrying `x-session-affinity` (Workers AI's header:
//! one value per conversation) goes to the healthy node of the region with the highest
//! rendezvous weight `hash(session, origin)` (highest-random-weight hashing). Every turn of a
//! conversation lands where its prefix is cached; adding a node takes over only the sessions
//! for which it now weighs most (about `1/n` of them), and losing one moves only its own
//! sessions, each to its second-highest node. The hash is fixed (FNV-1a, then splitmix64's
//! finaliser), so every isolate, everywhere, picks the same node for a session.
//!
//! **Other requests go to the least loaded node.** Nodes report their load on every answer
//! ([`edgerun_protocol::LOAD_HEADER`]: running and queued sequences, free KV share). Each isolate
//! keeps the newest report of each node (by the report's number: answers that overtake each
//! other on the way do not put an older figure back), valid for [`LOAD_FRESH_MS`], plus the
//! requests it has sent there since; a request goes to the node with the least `active +
//! queued + sent since`, free KV breaking ties in whole tenths of the pool (two idle nodes
//! whose caches differ by a few blocks are equal), then a rotation that advances with every
//! request, so that equal nodes take turns. A node whose report is stale or missing counts as
//! idle: it gets traffic, and reports again.
//!
//! Why the answers' header and not a `/health` poll: the figures come free with every answer
//! (no extra requests through Tunnel and Access, nothing to schedule in an isolate that may be
//! evicted between requests), they are freshest exactly where traffic is, and the view of an
//! idle node goes stale into "idle", which is what it is. The cost: a node that no isolate has
//! asked for a while is seen as idle, and isolates do not share what they saw.
//!
//! **Nodes that fail are set aside.** A node that could not be reached, or that answered "not
//! started" (loading, draining, stale keys) or with a failure, is put last for [`DOWN_MS`],
//! doubling with each failure in a row up to [`MAX_DOWN_MS`] (a busy node: [`BUSY_MS`], its
//! `Retry-After`). A set-aside node is still tried after the others: a region whose nodes all
//! failed a moment ago is not given up without asking. This is what moves a session whose node
//! died: the request that found it dead is not sent again elsewhere (it may have started), but
//! the session's next request goes to the next node.
//!
//! **A failed node is probed before it gets a request again.** Once its time aside is over, a
//! node that failed ranks as before (its sessions go back to it), but [`Balancer::needs_probe`]
//! says to ask its `/health` first: a node whose process died behind a live Tunnel answers a
//! request with a 502 that may not be retried, so no caller's request is risked on it until it
//! says it is ready. A failed probe sets it aside again, and the request goes to the next node
//! as one that certainly did not start.
//!
//! State is per isolate, in memory, and plain Rust: tests drive it with explicit times.

use crate::config::Region;
use edgerun_protocol::NodeLoad;
use std::collections::HashMap;

/// How long a node's reported load is trusted.
pub const LOAD_FRESH_MS: f64 = 10_000.0;
/// How long a node that failed once is tried only after the others.
pub const DOWN_MS: f64 = 5_000.0;
/// The longest a node that keeps failing is set aside at a time.
pub const MAX_DOWN_MS: f64 = 120_000.0;
/// How long a busy node (429 / 3040) is tried only after the others (its `Retry-After`).
pub const BUSY_MS: f64 = 1_000.0;
/// Nodes remembered per isolate; past this the memory starts afresh (`NODES` changed a lot).
const MAX_REMEMBERED: usize = 4096;

/// One node: the `index`th origin of `region`.
#[derive(Debug, Clone, Copy)]
pub struct Node<'a> {
    pub region: &'a Region,
    pub index: usize,
}

impl<'a> Node<'a> {
    /// Its `https://host[:port]`.
    pub fn origin(&self) -> &'a str {
        &self.region.origins[self.index]
    }

    /// How logs, errors and `x-edgerun-node` name it: the region's name, followed by `/index`
    /// when the region has several nodes.
    pub fn label(&self) -> String {
        if self.region.origins.len() == 1 {
            self.region.name.clone()
        } else {
            format!("{}/{}", self.region.name, self.index)
        }
    }
}

/// What an isolate knows of one node.
#[derive(Debug, Clone, Default)]
struct Seen {
    /// Its last load report and when it came.
    load: Option<(NodeLoad, f64)>,
    /// Requests sent to it since that report.
    sent_since: u32,
    /// Tried after the others until then.
    aside_until: f64,
    /// Failures since it last answered; more than 0: probe its health before using it.
    strikes: u32,
}

/// What an isolate knows of every node it has sent to (see the module docs).
#[derive(Debug, Default)]
pub struct Balancer {
    nodes: HashMap<String, Seen>,
}

impl Balancer {
    /// The nodes to try, in order: each region's in the order [`Balancer::rank`] gives, regions
    /// in the order given.
    pub fn plan<'a>(
        &self,
        regions: &[&'a Region],
        session: Option<&str>,
        now: f64,
        spread: u64,
    ) -> Vec<Node<'a>> {
        regions
            .iter()
            .flat_map(|r| self.rank(r, session, now, spread))
            .collect()
    }

    /// `region`'s nodes in the order to try them at `now`: those not set aside first — by
    /// rendezvous weight for a `session`, least loaded first otherwise (`spread` rotates
    /// equals) — then those set aside, the soonest back first.
    pub fn rank<'a>(
        &self,
        region: &'a Region,
        session: Option<&str>,
        now: f64,
        spread: u64,
    ) -> Vec<Node<'a>> {
        let mut nodes: Vec<Node<'a>> = (0..region.origins.len())
            .map(|index| Node { region, index })
            .collect();
        let seen = |node: &Node| self.nodes.get(node.origin());
        let aside = |node: &Node| seen(node).map_or(0.0, |s| s.aside_until).max(now);
        nodes.sort_by(|a, b| {
            let (aa, ab) = (aside(a), aside(b));
            if aa != ab {
                return aa.total_cmp(&ab); // `now` for nodes in service: they come first
            }
            if aa > now {
                return a.index.cmp(&b.index);
            }
            match session {
                Some(session) => {
                    let w = |node: &Node| rendezvous_weight(session, node.origin());
                    w(b).cmp(&w(a)).then(a.index.cmp(&b.index))
                }
                None => {
                    let cost = |node: &Node| self.cost(node.origin(), now);
                    cost(a).cmp(&cost(b)).then(a.index.cmp(&b.index))
                }
            }
        });
        // Sessionless: the nodes in service tied for least loaded take turns (`spread`
        // rotates them), so equal nodes share the traffic evenly whatever the others' load.
        if session.is_none() && aside(&nodes[0]) == now {
            let best = self.cost(nodes[0].origin(), now);
            let tied = nodes
                .iter()
                .take_while(|node| aside(node) == now && self.cost(node.origin(), now) == best)
                .count();
            nodes[..tied].rotate_left((spread % tied as u64) as usize);
        }
        nodes
    }

    /// What a request sent to `origin` now would queue behind, for ordering: the backlog it
    /// reported (none when stale or unknown) plus what was sent since, then how much of its KV
    /// is in use, in whole tenths.
    fn cost(&self, origin: &str, now: f64) -> (u64, u16) {
        let Some(seen) = self.nodes.get(origin) else {
            return (0, 0);
        };
        let fresh = seen
            .load
            .filter(|(_, at)| now - at <= LOAD_FRESH_MS && now >= *at);
        let backlog = fresh.map_or(0, |(load, _)| load.backlog());
        let used = fresh
            .and_then(|(load, _)| load.kv_free_permille)
            .map_or(0, |free| (1000 - free.min(1000)) / 100);
        (backlog + u64::from(seen.sent_since), used)
    }

    fn seen(&mut self, origin: &str) -> &mut Seen {
        if self.nodes.len() >= MAX_REMEMBERED && !self.nodes.contains_key(origin) {
            self.nodes.clear();
        }
        self.nodes.entry(origin.to_string()).or_default()
    }

    /// A request is on its way to `origin`.
    pub fn sent(&mut self, origin: &str) {
        let seen = self.seen(origin);
        seen.sent_since = seen.sent_since.saturating_add(1);
    }

    /// `origin` answered, with its load report if it sent one: the report replaces what was
    /// known unless it is older than a fresh one already held (that newer one already counts
    /// the request that brought it, and `sent_since` only what was sent after it), and the
    /// node is back in service.
    pub fn answered(&mut self, origin: &str, load: Option<NodeLoad>, now: f64) {
        let seen = self.seen(origin);
        if let Some(load) = load {
            let held_newer = seen.load.is_some_and(|(held, at)| {
                now - at <= LOAD_FRESH_MS && now >= at && load.is_older_than(&held)
            });
            if !held_newer {
                seen.load = Some((load, now));
                seen.sent_since = 0;
            }
        }
        seen.aside_until = 0.0;
        seen.strikes = 0;
    }

    /// `origin` could not be reached, was not ready, or failed a request or a probe: tried after
    /// the others for [`DOWN_MS`], doubled for each failure in a row (at most [`MAX_DOWN_MS`]),
    /// and probed before its next request.
    pub fn failed(&mut self, origin: &str, now: f64) {
        let seen = self.seen(origin);
        let for_ms = (DOWN_MS * 2f64.powi(seen.strikes.min(16) as i32)).min(MAX_DOWN_MS);
        seen.strikes = seen.strikes.saturating_add(1);
        seen.aside_until = seen.aside_until.max(now + for_ms);
    }

    /// `origin`'s queue is full: tried after the others for [`BUSY_MS`].
    pub fn busy(&mut self, origin: &str, now: f64) {
        let seen = self.seen(origin);
        seen.aside_until = seen.aside_until.max(now + BUSY_MS);
    }

    /// Whether `origin` failed since it last answered and its time aside is over: ask its
    /// `/health` before sending it a request.
    pub fn needs_probe(&self, origin: &str, now: f64) -> bool {
        self.nodes
            .get(origin)
            .is_some_and(|s| s.strikes > 0 && s.aside_until <= now)
    }
}

/// The rendezvous weight of `origin` for `session`: FNV-1a over the origin (without a trailing
/// `/`), a separator and the session, then splitmix64's finaliser. Fixed forever: changing it
/// moves every session.
pub fn rendezvous_weight(session: &str, origin: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let origin = origin.trim_end_matches('/');
    for b in origin.bytes().chain([0xff]).chain(session.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(name: &str, n: usize) -> Region {
        Region {
            name: name.into(),
            origin: None,
            origins: (0..n)
                .map(|i| format!("https://{name}{i}.example.com"))
                .collect(),
            continents: vec![],
            countries: vec![],
            colos: vec![],
            token_secret: None,
            models: None,
        }
    }

    fn labels(nodes: &[Node]) -> Vec<String> {
        nodes.iter().map(Node::label).collect()
    }

    fn first(b: &Balancer, r: &Region, session: Option<&str>, now: f64, spread: u64) -> usize {
        b.rank(r, session, now, spread)[0].index
    }

    #[test]
    fn one_node_regions_are_named_as_before() {
        let (eu, us) = (region("eu", 1), region("us", 3));
        let b = Balancer::default();
        assert_eq!(
            labels(&b.plan(&[&eu, &us], None, 0.0, 0)),
            ["eu", "us/0", "us/1", "us/2"]
        );
        assert_eq!(
            Node {
                region: &us,
                index: 2
            }
            .origin(),
            "https://us2.example.com"
        );
    }

    #[test]
    fn a_session_stays_on_one_node_and_moves_only_when_it_is_set_aside() {
        let r = region("eu", 4);
        let mut b = Balancer::default();
        for s in 0..200 {
            let session = format!("conversation-{s}");
            let home = first(&b, &r, Some(&session), 0.0, 0);
            // Load, time and the per-request rotation do not move it.
            for (now, spread) in [(1.0, 1), (5_000.0, 7), (60_000.0, 3)] {
                assert_eq!(first(&b, &r, Some(&session), now, spread), home);
            }
            b.answered(
                r.origins[home].as_str(),
                Some(NodeLoad {
                    active: 50,
                    queued: 9,
                    kv_free_permille: Some(0),
                    seq: None,
                }),
                0.0,
            );
            assert_eq!(first(&b, &r, Some(&session), 10.0, 0), home);
        }
        // A node set aside loses exactly its own sessions, each to its next-highest node, and
        // gets them back once it answers again.
        let sessions: Vec<String> = (0..400).map(|s| format!("s{s}")).collect();
        let homes: Vec<Vec<usize>> = sessions
            .iter()
            .map(|s| r_indices(&b, &r, s, 100.0))
            .collect();
        b.failed(&r.origins[1], 100.0);
        for (s, home) in sessions.iter().zip(&homes) {
            let now = r_indices(&b, &r, s, 200.0);
            if home[0] == 1 {
                assert_eq!(now[0], home[1], "{s} moves to its second node");
                assert_eq!(
                    *now.last().unwrap(),
                    1,
                    "{s}: the node set aside is tried last"
                );
            } else {
                assert_eq!(now[0], home[0], "{s} stays where it was");
            }
        }
        // Back after DOWN_MS (to be probed first), or as soon as it answers.
        assert!(!b.needs_probe(&r.origins[1], 100.0 + DOWN_MS - 1.0));
        assert!(b.needs_probe(&r.origins[1], 100.0 + DOWN_MS + 1.0));
        for (s, home) in sessions.iter().zip(&homes) {
            assert_eq!(r_indices(&b, &r, s, 100.0 + DOWN_MS + 1.0)[0], home[0]);
        }
        b.failed(&r.origins[1], 100.0);
        b.answered(&r.origins[1], None, 150.0);
        assert!(!b.needs_probe(&r.origins[1], 1e9));
        for (s, home) in sessions.iter().zip(&homes) {
            assert_eq!(r_indices(&b, &r, s, 160.0)[0], home[0]);
        }
    }

    fn r_indices(b: &Balancer, r: &Region, session: &str, now: f64) -> Vec<usize> {
        b.rank(r, Some(session), now, 0)
            .iter()
            .map(|n| n.index)
            .collect()
    }

    /// Rendezvous hashing: sessions spread evenly, and adding a node moves only the sessions it
    /// now weighs most for (about 1/n of them), every one of them to the new node.
    #[test]
    fn adding_a_node_moves_only_its_share() {
        let b = Balancer::default();
        let three = region("eu", 3);
        let four = region("eu", 4);
        let n = 4000;
        let mut counts = [0usize; 4];
        let mut moved = 0;
        for s in 0..n {
            let session = format!("user-{s}:chat");
            let before = first(&b, &three, Some(&session), 0.0, 0);
            let after = first(&b, &four, Some(&session), 0.0, 0);
            counts[after] += 1;
            if after != before {
                moved += 1;
                assert_eq!(after, 3, "a session moved between two old nodes");
            }
        }
        for c in counts {
            assert!((800..1200).contains(&c), "uneven spread {counts:?}");
        }
        assert!((800..1200).contains(&moved), "{moved} of {n} moved");
    }

    #[test]
    fn sessionless_requests_go_to_the_least_loaded_node() {
        let r = region("eu", 3);
        let mut b = Balancer::default();
        let load = |active, queued, free| {
            Some(NodeLoad {
                active,
                queued,
                kv_free_permille: free,
                seq: None,
            })
        };
        b.answered(&r.origins[0], load(4, 0, Some(900)), 0.0);
        b.answered(&r.origins[1], load(1, 1, Some(100)), 0.0);
        b.answered(&r.origins[2], load(2, 0, Some(800)), 0.0);
        // Backlog first, then free KV.
        let order: Vec<usize> = b.rank(&r, None, 10.0, 0).iter().map(|n| n.index).collect();
        assert_eq!(order, [2, 1, 0]);
        // What this isolate sent since counts until the next report.
        b.sent(&r.origins[2]);
        b.sent(&r.origins[2]);
        b.sent(&r.origins[2]);
        assert_eq!(first(&b, &r, None, 10.0, 0), 1);
        b.answered(&r.origins[2], load(0, 0, Some(1000)), 20.0);
        assert_eq!(first(&b, &r, None, 30.0, 0), 2);
        // Stale reports count as idle: everyone equal, the rotation decides.
        let later = 20.0 + LOAD_FRESH_MS + 1.0;
        let picks: Vec<usize> = (0..3).map(|s| first(&b, &r, None, later, s)).collect();
        let mut sorted = picks.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            [0, 1, 2],
            "equal nodes share the traffic: {picks:?}"
        );
    }

    /// Free KV breaks ties only by whole tenths: idle nodes whose caches differ by a few
    /// blocks take turns; a node with a tenth more of its pool in use comes second.
    #[test]
    fn a_few_blocks_of_kv_do_not_break_a_tie() {
        let r = region("eu", 2);
        let mut b = Balancer::default();
        let idle = |free| {
            Some(NodeLoad {
                kv_free_permille: Some(free),
                ..NodeLoad::default()
            })
        };
        b.answered(&r.origins[0], idle(970), 0.0);
        b.answered(&r.origins[1], idle(967), 0.0);
        let picks: Vec<usize> = (0..4).map(|s| first(&b, &r, None, 1.0, s)).collect();
        assert_eq!(picks, [0, 1, 0, 1]);
        b.answered(&r.origins[1], idle(880), 2.0);
        let picks: Vec<usize> = (0..4).map(|s| first(&b, &r, None, 3.0, s)).collect();
        assert_eq!(picks, [0, 0, 0, 0]);
    }

    /// A report that reaches the Worker after a newer one from the same node (two answers
    /// overtaking each other) does not put the older figure back while the newer is fresh; it
    /// only takes back the request it answered. Unnumbered reports, and a restarted node's
    /// (numbered from 1 again) once the held one is stale, replace as before.
    #[test]
    fn an_overtaken_report_does_not_replace_a_newer_one() {
        let r = region("eu", 2);
        let mut b = Balancer::default();
        let report = |active, seq| {
            Some(NodeLoad {
                active,
                seq,
                ..NodeLoad::default()
            })
        };
        // Two requests each to eu/0 and eu/1; eu/1's answers arrive newest first, and a third
        // request goes to eu/1 between them: it stays counted.
        for o in [&r.origins[0], &r.origins[0], &r.origins[1], &r.origins[1]] {
            b.sent(o);
        }
        b.answered(&r.origins[0], report(1, Some(10)), 100.0);
        b.answered(&r.origins[0], report(0, Some(11)), 101.0);
        b.answered(&r.origins[1], report(0, Some(21)), 100.0);
        b.sent(&r.origins[1]);
        b.answered(&r.origins[1], report(1, Some(20)), 101.0);
        assert_eq!(b.cost(&r.origins[0], 102.0), (0, 0));
        assert_eq!(
            b.cost(&r.origins[1], 102.0),
            (1, 0),
            "the third request still counts"
        );
        b.answered(&r.origins[1], report(0, Some(22)), 101.5);
        let picks: Vec<usize> = (0..4).map(|s| first(&b, &r, None, 102.0, s)).collect();
        assert_eq!(picks, [0, 1, 0, 1], "equal again");
        // Unnumbered: the last to arrive is kept.
        b.answered(&r.origins[1], report(3, None), 103.0);
        assert_eq!(b.cost(&r.origins[1], 104.0), (3, 0));
        // Restarted (seq from 1): ignored while the held report is fresh, taken once it is not.
        b.answered(&r.origins[0], report(2, Some(1)), 105.0);
        assert_eq!(b.cost(&r.origins[0], 106.0), (0, 0));
        let later = 101.0 + LOAD_FRESH_MS + 1.0;
        b.answered(&r.origins[0], report(2, Some(2)), later);
        assert_eq!(b.cost(&r.origins[0], later), (2, 0));
    }

    /// Two tied nodes share the traffic evenly though a third is busier.
    #[test]
    fn tied_nodes_take_turns_whatever_the_others_load() {
        let r = region("eu", 3);
        let mut b = Balancer::default();
        b.answered(
            &r.origins[2],
            Some(NodeLoad {
                active: 5,
                ..NodeLoad::default()
            }),
            0.0,
        );
        let picks: Vec<usize> = (0..6).map(|s| first(&b, &r, None, 1.0, s)).collect();
        assert_eq!(picks, [0, 1, 0, 1, 0, 1]);
        assert_eq!(b.rank(&r, None, 1.0, 1).last().unwrap().index, 2);
    }

    #[test]
    fn spread_over_equal_nodes_is_even() {
        let r = region("eu", 2);
        let mut b = Balancer::default();
        let mut counts = [0; 2];
        for i in 0..100u64 {
            let node = b.rank(&r, None, 0.0, i)[0];
            counts[node.index] += 1;
            b.sent(node.origin());
        }
        assert_eq!(counts, [50, 50]);
    }

    #[test]
    fn set_aside_nodes_are_tried_last_soonest_back_first() {
        let r = region("eu", 3);
        let mut b = Balancer::default();
        b.failed(&r.origins[0], 0.0);
        b.busy(&r.origins[1], 0.0);
        assert!(
            !b.needs_probe(&r.origins[1], BUSY_MS + 1.0),
            "busy is not broken"
        );
        let order = |b: &Balancer, now| -> Vec<usize> {
            b.rank(&r, None, now, 0).iter().map(|n| n.index).collect()
        };
        assert_eq!(order(&b, 10.0), [2, 1, 0]);
        assert_eq!(order(&b, BUSY_MS + 1.0), [1, 2, 0]);
        assert_eq!(order(&b, DOWN_MS + 1.0), [0, 1, 2]);
        // Every node set aside: still all tried.
        b.failed(&r.origins[2], 0.0);
        b.failed(&r.origins[2], 0.0);
        assert_eq!(order(&b, 100.0), [1, 0, 2]);
    }

    #[test]
    fn failures_in_a_row_set_a_node_aside_longer() {
        let r = region("eu", 1);
        let o = r.origins[0].as_str();
        let mut b = Balancer::default();
        let mut now = 0.0;
        let mut asides = vec![];
        for _ in 0..8 {
            b.failed(o, now);
            let back = (0..)
                .map(|ms| now + f64::from(ms) * 100.0)
                .find(|&t| b.needs_probe(o, t))
                .unwrap();
            asides.push(back - now);
            now = back; // the probe fails again
        }
        assert_eq!(
            asides,
            [5_000.0, 10_000.0, 20_000.0, 40_000.0, 80_000.0, 120_000.0, 120_000.0, 120_000.0]
        );
        b.answered(o, None, now);
        b.failed(o, now);
        assert!(b.needs_probe(o, now + DOWN_MS));
    }

    #[test]
    fn the_weight_is_fixed() {
        // Changing the hash would move every session of every deployment: pin it.
        assert_eq!(
            rendezvous_weight("s", "https://a.example.com"),
            rendezvous_weight("s", "https://a.example.com/")
        );
        assert_ne!(
            rendezvous_weight("s", "https://a.example.com"),
            rendezvous_weight("t", "https://a.example.com")
        );
        assert_eq!(
            rendezvous_weight("session-1", "https://eu0.example.com"),
            PINNED
        );
    }

    /// Computed independently (Python) from the definition above.
    const PINNED: u64 = 843_382_467_327_900_731;
}

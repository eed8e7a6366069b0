//! What a node tells the Worker in front of it about its load, and which session a request
//! belongs to: the two headers the Worker picks a node within a region by.
//!
//! * [`LOAD_HEADER`] (`x-edgerun-load: active=3, queued=1, kv-free=0.820, seq=17`): the node
//!   sets it on every answer once its model has loaded, from the engine's counters at the
//!   moment the answer's head is written, numbered in the order it read them (`seq`, from 1
//!   when the process starts). The Worker keeps the newest report of each node — answers
//!   that overtake each other on the way must not leave an older figure in place — and sends
//!   requests without a session to the least loaded node (see the Worker's `balance` module).
//!   Figures ride on answers the node gives anyway, so a busy region needs no polling.
//! * [`SESSION_AFFINITY_HEADER`] (`x-session-affinity`): Workers AI's header (its prompt-caching
//!   guide asks clients to send one value per conversation so that its turns reach the
//!   instance holding their cached prefix). The Worker hashes it to one node of the region;
//!   the node accepts it on every route and answers nothing from it.
//!
//! The format is a small dictionary in the spirit of RFC 8941: `key=value` items separated by
//! commas; unknown keys are ignored (a newer node may say more), a known key with a bad value
//! makes the whole header unreadable (`None`: the Worker then treats the node's load as
//! unknown, never as zero by mistake).

/// The header a node reports its load in.
pub const LOAD_HEADER: &str = "x-edgerun-load";

/// Workers AI's session header: turns of one conversation carry the same value.
pub const SESSION_AFFINITY_HEADER: &str = "x-session-affinity";

/// Longest session value the Worker hashes; a longer one is treated as absent (no affinity)
/// rather than refused, as Workers AI does not bound it either.
pub const MAX_SESSION_BYTES: usize = 256;

/// A node's load at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NodeLoad {
    /// Sequences admitted and not finished (decoding, reading their prompt, or preempted).
    pub active: u32,
    /// Requests waiting for a batch slot.
    pub queued: u32,
    /// Share of the KV cache free, in thousandths; `None` when the node has no fixed pool to
    /// measure it against.
    pub kv_free_permille: Option<u16>,
    /// The report's number: the node numbers its reports in the order it reads its counters,
    /// from 1 when its process starts. `None` from a node that does not number them.
    pub seq: Option<u64>,
}

impl NodeLoad {
    /// The header's value: `active=3, queued=1, kv-free=0.820, seq=17` (`kv-free` and `seq`
    /// only when known).
    pub fn to_header(&self) -> String {
        let mut s = format!("active={}, queued={}", self.active, self.queued);
        if let Some(p) = self.kv_free_permille {
            s.push_str(&format!(", kv-free={}.{:03}", p / 1000, p % 1000));
        }
        if let Some(seq) = self.seq {
            s.push_str(&format!(", seq={seq}"));
        }
        s
    }

    /// Whether this report was read before `other` (by the same node process): both numbered
    /// and this one's number lower. A node that restarted numbers from 1 again, so a caller
    /// should prefer a held report over a lower-numbered one only while the held one is fresh.
    pub fn is_older_than(&self, other: &NodeLoad) -> bool {
        matches!((self.seq, other.seq), (Some(a), Some(b)) if a < b)
    }

    /// Reads a header value written by [`NodeLoad::to_header`] (or a newer node's, with keys
    /// this version does not know). `None` when `active` or `queued` is missing or any known
    /// key's value is malformed.
    pub fn parse(value: &str) -> Option<Self> {
        let mut active = None;
        let mut queued = None;
        let mut kv_free_permille = None;
        let mut seq = None;
        for item in value.split(',') {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            let (key, v) = item.split_once('=')?;
            match key.trim() {
                "active" => active = Some(count(v)?),
                "queued" => queued = Some(count(v)?),
                "kv-free" => kv_free_permille = Some(fraction_permille(v.trim())?),
                "seq" => seq = Some(number(v)?),
                _ => {}
            }
        }
        Some(Self {
            active: active?,
            queued: queued?,
            kv_free_permille,
            seq,
        })
    }

    /// The work a new request would wait behind: what runs plus what waits.
    pub fn backlog(&self) -> u64 {
        u64::from(self.active) + u64::from(self.queued)
    }

    /// The load of `active`, `queued` and `free` of `total` KV units (blocks or bytes),
    /// unnumbered.
    pub fn from_counts(active: usize, queued: usize, free: usize, total: usize) -> Self {
        let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Self {
            active: clamp(active),
            queued: clamp(queued),
            kv_free_permille: (total > 0)
                .then(|| ((free.min(total) as u128 * 1000) / total as u128) as u16),
            seq: None,
        }
    }
}

/// A plain decimal count (1 to 10 digits, within `u32`).
fn count(v: &str) -> Option<u32> {
    let v = v.trim();
    if v.is_empty() || v.len() > 10 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

/// A plain decimal number (1 to 20 digits, within `u64`).
fn number(v: &str) -> Option<u64> {
    let v = v.trim();
    if v.is_empty() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

/// `0`, `1`, or `0.d`..`0.ddd` / `1.0`..`1.000`, as thousandths.
fn fraction_permille(v: &str) -> Option<u16> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: u16 = match int {
        "0" => 0,
        "1" => 1000,
        _ => return None,
    };
    let mut digits = frac.to_string();
    while digits.len() < 3 {
        digits.push('0');
    }
    let part: u16 = digits.parse().ok()?;
    let p = whole + part;
    (p <= 1000).then_some(p)
}

/// The session a request belongs to: [`SESSION_AFFINITY_HEADER`]'s value trimmed, when it is
/// 1 to [`MAX_SESSION_BYTES`] visible ASCII characters; anything else counts as no session.
pub fn session_of(value: Option<&str>) -> Option<&str> {
    value
        .map(str::trim)
        .filter(|v| (1..=MAX_SESSION_BYTES).contains(&v.len()))
        .filter(|v| v.bytes().all(|b| b.is_ascii_graphic()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_go_through_the_header_unchanged() {
        for load in [
            NodeLoad::default(),
            NodeLoad {
                active: 3,
                queued: 1,
                kv_free_permille: Some(820),
                seq: None,
            },
            NodeLoad {
                active: u32::MAX,
                queued: 0,
                kv_free_permille: Some(1000),
                seq: Some(u64::MAX),
            },
            NodeLoad {
                active: 0,
                queued: 7,
                kv_free_permille: Some(5),
                seq: Some(1),
            },
        ] {
            assert_eq!(NodeLoad::parse(&load.to_header()), Some(load), "{load:?}");
        }
        assert_eq!(
            NodeLoad::parse("active=3, queued=1, kv-free=0.820").unwrap(),
            NodeLoad {
                active: 3,
                queued: 1,
                kv_free_permille: Some(820),
                seq: None,
            }
        );
        assert_eq!(
            NodeLoad::parse("active=3, queued=1, kv-free=0.820, seq=17")
                .unwrap()
                .seq,
            Some(17)
        );
    }

    #[test]
    fn unknown_keys_are_ignored_and_bad_values_make_it_unreadable() {
        assert_eq!(
            NodeLoad::parse("queued=2,active=1,gpu=h200, kv-free=0.5"),
            Some(NodeLoad {
                active: 1,
                queued: 2,
                kv_free_permille: Some(500),
                seq: None,
            })
        );
        for bad in [
            "",
            "active=1",
            "queued=1",
            "active=-1, queued=0",
            "active=1.5, queued=0",
            "active=99999999999, queued=0",
            "active=1, queued=0, kv-free=1.5",
            "active=1, queued=0, kv-free=0.8201",
            "active=1, queued=0, kv-free=2",
            "active=1, queued=0, kv-free=.5",
            "active, queued=0",
            "active=1, queued=0, seq=",
            "active=1, queued=0, seq=-3",
            "active=1, queued=0, seq=99999999999999999999",
            "active=1, queued=0, seq=184467440737095516160",
        ] {
            assert_eq!(NodeLoad::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn counts_become_a_load() {
        assert_eq!(
            NodeLoad::from_counts(2, 1, 41, 50),
            NodeLoad {
                active: 2,
                queued: 1,
                kv_free_permille: Some(820),
                seq: None,
            }
        );
        assert_eq!(NodeLoad::from_counts(0, 0, 0, 0).kv_free_permille, None);
        assert_eq!(
            NodeLoad::from_counts(0, 0, 60, 50).kv_free_permille,
            Some(1000)
        );
        assert_eq!(NodeLoad::from_counts(4, 5, 0, 1).backlog(), 9);
    }

    #[test]
    fn only_numbered_reports_are_ordered() {
        let at = |seq| NodeLoad {
            seq,
            ..NodeLoad::default()
        };
        assert!(at(Some(3)).is_older_than(&at(Some(4))));
        assert!(!at(Some(4)).is_older_than(&at(Some(4))));
        assert!(!at(Some(5)).is_older_than(&at(Some(4))));
        assert!(!at(None).is_older_than(&at(Some(4))));
        assert!(!at(Some(3)).is_older_than(&at(None)));
    }

    #[test]
    fn sessions_are_visible_ascii_of_bounded_length() {
        assert_eq!(session_of(Some(" chat-42 ")), Some("chat-42"));
        assert_eq!(session_of(None), None);
        assert_eq!(session_of(Some("")), None);
        assert_eq!(session_of(Some("a b")), None);
        assert_eq!(session_of(Some("é")), None);
        let long = "x".repeat(MAX_SESSION_BYTES + 1);
        assert_eq!(session_of(Some(&long)), None);
        let most = "x".repeat(MAX_SESSION_BYTES);
        assert_eq!(session_of(Some(&most)), Some(most.as_str()));
    }
}

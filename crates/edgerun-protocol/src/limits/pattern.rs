//! How far a regular expression grows once its counted repetitions are written out
//! ([`pattern_expansion`]), the measure [`MAX_PATTERN_EXPANSION`](super::MAX_PATTERN_EXPANSION)
//! bounds: `^((a{100}){100}){100}$` is a million atoms, which the grammar engine would build
//! before any fuel limit applies.

/// How many atoms `pattern` (a regular expression) holds with its counted repetitions written
/// out: each `{n}` / `{n,}` / `{n,m}` multiplies what it repeats by its largest count;
/// alternatives add up; `*`, `+`, `?` count once. An upper bound on what a regex compiler
/// expands, saturating; one pass, no recursion.
pub fn pattern_expansion(pattern: &str) -> u64 {
    // Per open group: (atoms so far, size of the last atom).
    let mut frames: Vec<(u64, u64)> = vec![(0, 0)];
    let chars: Vec<char> = pattern.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        let atom = match c {
            '\\' => {
                // An escape; `\p{..}` names a class.
                if matches!(chars.get(i), Some('p' | 'P')) && chars.get(i + 1) == Some(&'{') {
                    while i < chars.len() && chars[i] != '}' {
                        i += 1;
                    }
                }
                i += 1;
                1
            }
            '[' => {
                // A class: to its closing bracket (a leading `]` or `^]` is a member).
                if chars.get(i) == Some(&'^') {
                    i += 1;
                }
                if chars.get(i) == Some(&']') {
                    i += 1;
                }
                while i < chars.len() && chars[i] != ']' {
                    if chars[i] == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
                1
            }
            '(' => {
                frames.push((0, 0));
                continue;
            }
            ')' => match frames.len() {
                1 => 1,
                _ => frames.pop().map_or(1, |(total, _)| total.max(1)),
            },
            '{' => {
                // A counted repetition, or a literal brace.
                let close = chars[i..].iter().position(|&c| c == '}');
                let counts = close.and_then(|end| {
                    let inner: String = chars[i..i + end].iter().collect();
                    let mut parts = inner.splitn(2, ',');
                    let low: u64 = parts.next()?.trim().parse().ok()?;
                    let high = match parts.next() {
                        None => low,
                        Some(h) if h.trim().is_empty() => low,
                        Some(h) => h.trim().parse().ok()?,
                    };
                    Some((end, low.max(high)))
                });
                if let Some((end, count)) = counts {
                    i += end + 1;
                    let frame = frames.last_mut().expect("the outer frame stays");
                    let grown = frame.1.saturating_mul(count);
                    frame.0 = frame.0.saturating_sub(frame.1).saturating_add(grown);
                    frame.1 = grown;
                    continue;
                }
                1
            }
            '*' | '+' | '?' | '|' | '^' | '$' => continue,
            _ => 1,
        };
        let frame = frames.last_mut().expect("the outer frame stays");
        frame.0 = frame.0.saturating_add(atom);
        frame.1 = atom;
    }
    // Unclosed groups count as closed.
    let mut total = 0u64;
    while let Some((size, _)) = frames.pop() {
        total = total.saturating_add(size);
    }
    total
}

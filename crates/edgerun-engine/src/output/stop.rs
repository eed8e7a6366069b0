//! Stop strings, the one stop rule on text: released text that could be the start of one of
//! the caller's stop strings is held back until the next text shows whether it is one; at a
//! full match the text is cut just before it (see the parent module's docs for how the match
//! ends the sequence).

use crate::request::StopReason;

/// Stop rule: the caller's stop strings, and the text held back for them.
pub(super) struct StopStrings {
    stops: Vec<String>,
    /// Released text that could be the start of a stop string.
    held: String,
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            held: String::new(),
        }
    }

    /// Passes `text` on to `out`. Text that could be the start of a stop string is held back;
    /// at a full match (the earliest, if several) the text before it goes out, the rest is
    /// dropped, and the generation ends.
    pub fn release(&mut self, text: &str, out: &mut String) -> Option<StopReason> {
        if self.stops.is_empty() {
            out.push_str(text);
            return None;
        }
        self.held.push_str(text);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            out.push_str(&self.held[..at]);
            self.held.clear();
            return Some(StopReason::StopString);
        }
        let cut = self.held.len() - partial_stop_len(&self.held, &self.stops);
        out.push_str(&self.held[..cut]);
        self.held.drain(..cut);
        None
    }

    /// The generation ended without a match: what was held goes out.
    pub fn flush(&mut self, out: &mut String) {
        out.push_str(&std::mem::take(&mut self.held));
    }
}

/// The length of the longest end of `text` that is the start (but not the whole) of one of
/// `stops`, cut at a character boundary: the text that must be held back.
fn partial_stop_len(text: &str, stops: &[String]) -> usize {
    let longest = stops.iter().map(String::len).max().unwrap_or(0);
    let from = text.len().saturating_sub(longest.saturating_sub(1));
    text.char_indices()
        .map(|(i, _)| i)
        .filter(|&i| i >= from)
        .find(|&i| {
            let tail = &text[i..];
            stops
                .iter()
                .any(|s| s.len() > tail.len() && s.starts_with(tail))
        })
        .map_or(0, |i| text.len() - i)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces` of text through the stop rule, one per step; what went out after each
    /// step, and the stop reason if one ended it.
    fn steps(stop: &[&str], pieces: &[&str]) -> (Vec<String>, Option<StopReason>) {
        let mut s = StopStrings::new(stop.iter().map(|s| s.to_string()).collect());
        let mut sent = Vec::new();
        for piece in pieces {
            let mut out = String::new();
            let reason = s.release(piece, &mut out);
            sent.push(out);
            if reason.is_some() {
                return (sent, reason);
            }
        }
        // The end of the generation releases what was held.
        let mut out = String::new();
        s.flush(&mut out);
        sent.push(out);
        (sent, None)
    }

    #[test]
    fn without_stop_strings_text_goes_out_as_it_comes() {
        let (sent, reason) = steps(&[], &["Hel", "lo", " wor", "ld"]);
        assert_eq!(sent, ["Hel", "lo", " wor", "ld", ""]);
        assert_eq!(reason, None);
    }

    #[test]
    fn a_partial_match_is_held_until_it_is_decided() {
        // "EN" could start "END": held; "D" completes it: cut before it, stop.
        let (sent, reason) = steps(&["END"], &["one E", "N", "D two"]);
        assert_eq!(sent, ["one ", "", ""]);
        assert_eq!(reason, Some(StopReason::StopString));
        // "EN" then "X": not a stop string after all, released whole.
        let (sent, reason) = steps(&["END"], &["one E", "N", "X two"]);
        assert_eq!(sent, ["one ", "", "ENX two", ""]);
        assert_eq!(reason, None);
        // A match inside one piece; the text after it is dropped.
        let (sent, reason) = steps(&["\n\n"], &["a\n\nb"]);
        assert_eq!(sent, ["a"]);
        assert_eq!(reason, Some(StopReason::StopString));
        // Held text that never completes goes out at the end.
        let (sent, reason) = steps(&["END"], &["x E"]);
        assert_eq!(sent, ["x ", "E"]);
        assert_eq!(reason, None);
    }

    #[test]
    fn the_earliest_of_several_stop_strings_wins() {
        let (sent, reason) = steps(&["cd", "bcX", "b"], &["a", "bc", "d"]);
        // "b" alone is a full match at once.
        assert_eq!(sent, ["a", ""]);
        assert_eq!(reason, Some(StopReason::StopString));
        let (sent, _) = steps(&["xyz", "yq"], &["ax", "yq"]);
        // "xy" was held for "xyz"; "yq" matches first at position 1 of "xyq".
        assert_eq!(sent, ["a", "x"]);
        // The longest possible start is held: "abab" with stop "abac".
        let (sent, _) = steps(&["abac"], &["abab", "ac"]);
        assert_eq!(sent, ["ab", ""]);
    }

    #[test]
    fn held_text_is_never_cut_inside_a_character() {
        // The stop string starts with the first byte of "é" and of "è" (C3 A9 / C3 A8): a
        // held end is whole characters, so "é" is not held for "è!".
        let (sent, reason) = steps(&["è!"], &["café", "è", "!"]);
        assert_eq!(sent, ["café", "", ""]);
        assert_eq!(reason, Some(StopReason::StopString));
        let (sent, _) = steps(&["🦀🦀"], &["a🦀", "b🦀", "🦀c"]);
        assert_eq!(sent, ["a", "🦀b", ""]);
        for pieces in [&["日本", "語x"][..], &["日", "本語", "x"]] {
            let (sent, reason) = steps(&["本語"], pieces);
            assert_eq!(sent.concat(), "日");
            assert_eq!(reason, Some(StopReason::StopString));
            assert!(sent
                .iter()
                .all(|s| std::str::from_utf8(s.as_bytes()).is_ok()));
        }
    }

    #[test]
    fn partial_stop_len_is_the_longest_start_held() {
        let stops = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(partial_stop_len("hello wo", &stops(&["world"])), 2);
        assert_eq!(partial_stop_len("hello", &stops(&["world"])), 0);
        // A full match is not "partial" (release finds it first).
        assert_eq!(partial_stop_len("world", &stops(&["world"])), 0);
        assert_eq!(partial_stop_len("aa", &stops(&["aaa", "b"])), 2);
        assert_eq!(partial_stop_len("", &stops(&["x"])), 0);
        assert_eq!(partial_stop_len("é", &stops(&["éa"])), 2);
    }
}

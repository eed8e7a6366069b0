//! SentencePiece's BPE vocabularies as GGUF carries them (`tokenizer.ggml.model = llama`:
//! Llama-2, Mistral, TinyLlama, Phi-3, Baichuan), read from the metadata alone: pieces, scores
//! and token types, no merges and no side file.
//!
//! Encoding is llama.cpp's (`llm_tokenizer_spm_session`, the reference for GGUF), step for
//! step, so that ids agree token for token with what the model was run with there:
//!
//! 1. Special tokens are cut out of the text first, one token at a time, longest text first
//!    (control tokens only when the caller parses specials — a prompt rendered from a chat
//!    template does; user-defined tokens always). For Phi-3 (`general.name` holding `phi3` or
//!    `phi-3`), llama.cpp's rule: whitespace after a special token (but `<unk>`, `<s>` and
//!    `<|endoftext|>`) is dropped.
//! 2. Each remaining fragment gets a leading space when it starts the text or follows a
//!    special token (`add_space_prefix`, on unless the metadata turns it off), and every
//!    space becomes `▁` (U+2581).
//! 3. The fragment is split into UTF-8 characters; then, repeatedly, the adjacent pair whose
//!    concatenation is a vocabulary piece with the highest score is merged (ties: leftmost).
//! 4. A final symbol that is a piece is emitted; one that is not is split back into the two
//!    symbols it was merged from, recursively; a character that is no piece at all becomes
//!    its UTF-8 bytes as `<0xXX>` byte tokens (byte fallback).
//!
//! Decoding concatenates pieces (`▁` → space, byte tokens → their byte) and keeps a leading
//! space: the incremental decoder works on windows of ids, and a reply's first word follows
//! the prompt, so stripping it (as a whole-text decode of a prompt would) would lose spaces.

use std::collections::{BinaryHeap, HashMap};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
pub(crate) mod token_type {
    pub const NORMAL: u32 = 1;
    pub const UNKNOWN: u32 = 2;
    pub const CONTROL: u32 = 3;
    pub const USER_DEFINED: u32 = 4;
    pub const UNUSED: u32 = 5;
    pub const BYTE: u32 = 6;
}

/// A SentencePiece vocabulary.
#[derive(Debug, Clone)]
pub struct SpmVocab {
    pieces: Vec<String>,
    scores: Vec<f32>,
    types: Vec<u32>,
    /// Piece text → id (the last id when a text repeats, as llama.cpp's map does).
    ids: HashMap<String, u32>,
    /// Special tokens split out of raw text, longest text first (then lowest id), and whether
    /// whitespace after each is dropped.
    specials: Vec<(u32, bool)>,
    add_space_prefix: bool,
    /// The id of each byte's `<0xXX>` token (or of the one-character piece), where one exists.
    byte_ids: [Option<u32>; 256],
    unknown: Option<u32>,
}

/// A piece of text still to tokenize, or a special token already cut out.
enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

impl SpmVocab {
    /// `pieces`, their `scores` and `types` (one per id; missing types count as normal);
    /// `rstrip_specials`: the Phi-3 rule (module docs).
    pub fn new(
        pieces: Vec<String>,
        scores: Vec<f32>,
        types: Vec<u32>,
        add_space_prefix: bool,
        unknown: Option<u32>,
        rstrip_specials: bool,
    ) -> Result<Self, String> {
        if scores.len() != pieces.len() {
            return Err(format!(
                "{} scores for {} tokens",
                scores.len(),
                pieces.len()
            ));
        }
        if !types.is_empty() && types.len() != pieces.len() {
            return Err(format!(
                "{} token types for {} tokens",
                types.len(),
                pieces.len()
            ));
        }
        if let Some(u) = unknown.filter(|&u| u as usize >= pieces.len()) {
            return Err(format!(
                "the unknown token id {u} is outside the vocabulary of {}",
                pieces.len()
            ));
        }
        let types = if types.is_empty() {
            vec![token_type::NORMAL; pieces.len()]
        } else {
            types
        };
        let ids: HashMap<String, u32> = pieces
            .iter()
            .enumerate()
            .map(|(i, p)| (p.clone(), i as u32))
            .collect();
        let mut specials: Vec<u32> = (0..pieces.len() as u32)
            .filter(|&i| {
                matches!(
                    types[i as usize],
                    token_type::CONTROL | token_type::USER_DEFINED | token_type::UNKNOWN
                ) && !pieces[i as usize].is_empty()
            })
            .collect();
        specials.sort_by(|&a, &b| {
            pieces[b as usize]
                .len()
                .cmp(&pieces[a as usize].len())
                .then(a.cmp(&b))
        });
        let specials = specials
            .into_iter()
            .map(|id| {
                let keeps =
                    ["<unk>", "<s>", "<|endoftext|>"].contains(&pieces[id as usize].as_str());
                (id, rstrip_specials && !keeps)
            })
            .collect();
        let mut byte_ids = [None; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = ids.get(&format!("<0x{b:02X}>")).copied().or_else(|| {
                std::str::from_utf8(&[b as u8])
                    .ok()
                    .and_then(|s| ids.get(s).copied())
            });
        }
        Ok(Self {
            pieces,
            scores,
            types,
            ids,
            specials,
            add_space_prefix,
            byte_ids,
            unknown,
        })
    }

    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    #[cfg(test)]
    pub fn piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(String::as_str)
    }

    pub fn token_type(&self, id: u32) -> Option<u32> {
        self.types.get(id as usize).copied()
    }

    pub fn id(&self, piece: &str) -> Option<u32> {
        self.ids.get(piece).copied()
    }

    /// Control tokens: what a decode for people leaves out.
    pub fn control_ids(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.pieces.len() as u32).filter(|&i| self.types[i as usize] == token_type::CONTROL)
    }

    /// `text`'s ids; `parse_special`: control tokens written in the text are tokens (a
    /// rendered prompt) rather than text (a user's words). `at_start`: the text starts a
    /// sequence (it gets the leading space, when the vocabulary adds one); a piece of text
    /// in the middle of one does not.
    pub fn encode(
        &self,
        text: &str,
        parse_special: bool,
        at_start: bool,
    ) -> Result<Vec<u32>, String> {
        let mut out = Vec::new();
        let mut prev_special = at_start;
        for fragment in self.partition(text, parse_special) {
            match fragment {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(t) => {
                    let mut s = String::with_capacity(t.len() + 3);
                    if self.add_space_prefix && prev_special {
                        s.push(' ');
                    }
                    s.push_str(t);
                    let s = s.replace(' ', "\u{2581}");
                    self.encode_fragment(&s, &mut out)?;
                    prev_special = false;
                }
            }
        }
        Ok(out)
    }

    /// Cuts special tokens out of `text` as llama.cpp's `tokenizer_st_partition` does: one
    /// special at a time, longest first, through every text fragment left.
    fn partition<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
        let mut fragments = if text.is_empty() {
            vec![]
        } else {
            vec![Fragment::Text(text)]
        };
        for &(id, rstrip) in &self.specials {
            if !parse_special
                && matches!(
                    self.types[id as usize],
                    token_type::CONTROL | token_type::UNKNOWN
                )
            {
                continue;
            }
            let special = self.pieces[id as usize].as_str();
            if !fragments
                .iter()
                .any(|f| matches!(f, Fragment::Text(t) if t.contains(special)))
            {
                continue;
            }
            let mut next = Vec::with_capacity(fragments.len() + 2);
            for f in fragments {
                match f {
                    Fragment::Text(mut t) => {
                        while let Some(at) = t.find(special) {
                            if at > 0 {
                                next.push(Fragment::Text(&t[..at]));
                            }
                            next.push(Fragment::Token(id));
                            t = &t[at + special.len()..];
                            if rstrip {
                                // C's isspace: space, \t, \n, \v, \f, \r.
                                t = t.trim_start_matches([' ', '\t', '\n', '\u{b}', '\u{c}', '\r']);
                            }
                        }
                        if !t.is_empty() {
                            next.push(Fragment::Text(t));
                        }
                    }
                    token => next.push(token),
                }
            }
            fragments = next;
        }
        fragments
    }

    /// The merge loop over one escaped fragment (module docs, steps 3 and 4).
    fn encode_fragment(&self, text: &str, out: &mut Vec<u32>) -> Result<(), String> {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (i, (start, c)) in text.char_indices().enumerate() {
            let len = c.len_utf8();
            symbols.push(Symbol {
                start,
                len,
                prev: i.checked_sub(1),
                next: (start + len < text.len()).then_some(i + 1),
            });
        }
        let mut queue = BinaryHeap::new();
        // The text of every merge queued, to undo it if its result is no piece (llama.cpp's
        // `rev_merge`: the last pair recorded for a text wins).
        let mut rev_merge: HashMap<&str, (usize, usize)> = HashMap::new();
        let mut try_add = |queue: &mut BinaryHeap<Bigram>, symbols: &[Symbol], left, right| {
            if let (Some(left), Some(right)) = (left, right) {
                let (l, r): (Symbol, Symbol) = (symbols[left], symbols[right]);
                let joined = &text[l.start..l.start + l.len + r.len];
                if let Some(&id) = self.ids.get(joined) {
                    queue.push(Bigram {
                        score: self.scores[id as usize],
                        left,
                        right,
                        len: joined.len(),
                    });
                    rev_merge.insert(joined, (left, right));
                }
            }
        };
        for i in 1..symbols.len() {
            try_add(&mut queue, &symbols, Some(i - 1), Some(i));
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (symbols[b.left], symbols[b.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != b.len {
                continue;
            }
            symbols[b.left].len += r.len;
            symbols[b.right].len = 0;
            symbols[b.left].next = r.next;
            if let Some(n) = r.next {
                symbols[n].prev = Some(b.left);
            }
            let (prev, next) = (symbols[b.left].prev, symbols[b.left].next);
            try_add(&mut queue, &symbols, prev, Some(b.left));
            try_add(&mut queue, &symbols, Some(b.left), next);
        }
        let mut at = (!symbols.is_empty()).then_some(0);
        while let Some(i) = at {
            self.resegment(text, &symbols, i, &rev_merge, out)?;
            at = symbols[i].next;
        }
        Ok(())
    }

    fn resegment(
        &self,
        text: &str,
        symbols: &[Symbol],
        i: usize,
        rev_merge: &HashMap<&str, (usize, usize)>,
        out: &mut Vec<u32>,
    ) -> Result<(), String> {
        let Symbol { start, len, .. } = symbols[i];
        let s = &text[start..start + len];
        if let Some(&id) = self.ids.get(s) {
            out.push(id);
            return Ok(());
        }
        match rev_merge.get(s) {
            Some(&(l, r)) => {
                self.resegment(text, symbols, l, rev_merge, out)?;
                self.resegment(text, symbols, r, rev_merge, out)
            }
            None => {
                for &b in s.as_bytes() {
                    match self.byte_ids[b as usize].or(self.unknown) {
                        Some(id) => out.push(id),
                        None => {
                            return Err(format!(
                                "byte 0x{b:02X} has no token and the vocabulary no unknown token"
                            ))
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// What token `id` stands for, as llama.cpp's `token_to_piece` writes it: a byte token its
    /// byte, a normal piece its text with `▁` as a space, a user-defined token its text,
    /// control and unknown tokens their text only when `specials`, unused tokens nothing.
    pub fn token_bytes(&self, id: u32, specials: bool) -> Vec<u8> {
        let Some(piece) = self.pieces.get(id as usize) else {
            return Vec::new();
        };
        match self.types[id as usize] {
            token_type::BYTE => byte_of(piece).map_or_else(Vec::new, |b| vec![b]),
            token_type::CONTROL | token_type::UNKNOWN if !specials => Vec::new(),
            token_type::CONTROL | token_type::UNKNOWN | token_type::USER_DEFINED => {
                piece.as_bytes().to_vec()
            }
            token_type::UNUSED => Vec::new(),
            _ => piece.replace('\u{2581}', " ").into_bytes(),
        }
    }

    /// The text of `ids`; control tokens left out when `skip_special`. Bytes that do not form
    /// UTF-8 (a character cut between ids) come out as U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            bytes.extend(self.token_bytes(id, !skip_special));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// A run of the fragment in the merge loop: merged away when `len` is 0.
#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A merge the loop may make: the pair at `left`, `right` forms a piece of `score`.
#[derive(Debug, PartialEq)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl Eq for Bigram {}

impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // The highest score first; equal scores: the leftmost first.
        self.score
            .total_cmp(&other.score)
            .then(other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// `<0xAB>` → 0xAB.
fn byte_of(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok())?
}

#[cfg(test)]
mod tests {
    use super::token_type::*;
    use super::*;

    /// A small vocabulary: specials, the 256 byte tokens, and a few pieces with scores.
    fn vocab(add_space_prefix: bool) -> SpmVocab {
        let mut pieces: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![UNKNOWN, CONTROL, CONTROL];
        for b in 0..=255u8 {
            pieces.push(format!("<0x{b:02X}>"));
            types.push(BYTE);
        }
        let words = [
            ("\u{2581}", -1.0),
            ("a", -2.0),
            ("b", -2.0),
            ("c", -2.0),
            ("ab", -3.0),
            ("bc", -1.5),
            ("\u{2581}a", -4.0),
            ("\u{2581}ab", -5.0),
            ("<tool>", 0.0),
        ];
        let mut scores = vec![0.0; pieces.len()];
        for (w, s) in words {
            pieces.push(w.into());
            scores.push(s);
            types.push(if w == "<tool>" { USER_DEFINED } else { NORMAL });
        }
        SpmVocab::new(pieces, scores, types, add_space_prefix, Some(0), false).unwrap()
    }

    fn pieces(v: &SpmVocab, ids: &[u32]) -> Vec<String> {
        ids.iter()
            .map(|&i| v.piece(i).unwrap().to_string())
            .collect()
    }

    #[test]
    fn the_best_scored_pair_merges_first() {
        let v = vocab(false);
        // "bc" (-1.5) beats "ab" (-3): once "bc" took the b, "ab" cannot form.
        let ids = v.encode("abc", false, true).unwrap();
        assert_eq!(pieces(&v, &ids), ["a", "bc"]);
        let ids = v.encode("ab", false, true).unwrap();
        assert_eq!(pieces(&v, &ids), ["ab"]);
    }

    #[test]
    fn a_leading_space_is_added_at_the_start_and_after_specials_only() {
        let v = vocab(true);
        assert_eq!(
            pieces(&v, &v.encode("ab", false, true).unwrap()),
            ["\u{2581}ab"]
        );
        assert_eq!(pieces(&v, &v.encode("ab", false, false).unwrap()), ["ab"]);
        assert_eq!(
            pieces(&v, &v.encode("<s>ab", true, true).unwrap()),
            ["<s>", "\u{2581}ab"]
        );
        // Without parsing specials, `<s>` is text: bytes of its characters.
        let ids = v.encode("<s>", false, false).unwrap();
        assert_eq!(pieces(&v, &ids), ["<0x3C>", "<0x73>", "<0x3E>"]);
        // User-defined tokens are always cut out.
        assert_eq!(
            pieces(&v, &v.encode("a<tool>b", false, true).unwrap()),
            ["\u{2581}a", "<tool>", "\u{2581}", "b"]
        );
        assert!(v.encode("", true, true).unwrap().is_empty());
    }

    /// A caller's 10^5-character text (spaces, merges, unknown characters, a special's text)
    /// tokenizes in one pass and decodes back to itself.
    #[test]
    fn a_huge_text_tokenizes_and_round_trips() {
        let v = vocab(false);
        let unit = "ab bc é<s> \u{1F600}c";
        let text = unit.repeat(100_000 / unit.chars().count());
        let ids = v.encode(&text, false, false).unwrap();
        assert_eq!(v.decode(&ids, true), text);
    }

    #[test]
    fn unknown_characters_fall_back_to_bytes_and_decode_back() {
        let v = vocab(false);
        let ids = v.encode("aé", false, true).unwrap();
        assert_eq!(pieces(&v, &ids), ["a", "<0xC3>", "<0xA9>"]);
        assert_eq!(v.decode(&ids, true), "aé");
        // Half a character decodes to U+FFFD (the incremental decoder waits on it).
        assert_eq!(v.decode(&ids[..2], true), "a\u{FFFD}");
        let with_space = v.encode("a b", false, false).unwrap();
        assert_eq!(v.decode(&with_space, true), "a b");
        // Control tokens are left out of text, and kept when asked for.
        assert_eq!(v.decode(&[1, ids[0]], true), "a");
        assert_eq!(v.token_bytes(1, true), b"<s>");
    }
}

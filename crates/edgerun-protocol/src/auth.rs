//! Bearer tokens: parsing `Authorization: Bearer <token>` and checking a token against a set, in
//! constant time. The node checks its own tokens with it and the Worker its callers', so both
//! accept and refuse exactly the same headers.
//!
//! ## Why digests
//!
//! `subtle`'s `ct_eq` on two slices returns early when their lengths differ, so comparing the
//! presented token with each configured one byte for byte tells a caller, by timing, how long
//! every configured token is. A [`TokenSet`] therefore keeps only the SHA-256 digest of each token
//! (never the token itself) and compares the digest of the presented token with each of them:
//! always 32 bytes against 32 bytes, in constant time, every configured digest compared whether
//! or not an earlier one matched. What timing can still reveal is the presented token's own
//! length (the caller knows it) and how many tokens are configured.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The token of an `Authorization` header value `Bearer <token>` (scheme case-insensitive,
/// surrounding spaces ignored), or `None` for any other form or an empty token.
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// SHA-256 of a token: what a [`TokenSet`] stores and compares.
type TokenDigest = [u8; 32];

fn digest(token: &[u8]) -> TokenDigest {
    Sha256::digest(token).into()
}

/// The tokens a caller may present, as SHA-256 digests (see the module docs). Its `Debug` prints
/// only how many there are.
#[derive(Clone, Default)]
pub struct TokenSet {
    digests: Vec<TokenDigest>,
}

/// The tokens of a token file: one per line, trimmed, without blank lines and `#` comments.
pub fn token_file_entries(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

impl std::fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenSet({} tokens)", self.digests.len())
    }
}

impl TokenSet {
    /// One token per item, trimmed; empty items are ignored.
    pub fn new<I: IntoIterator<Item = String>>(tokens: I) -> Self {
        Self {
            digests: tokens
                .into_iter()
                .filter_map(|t| {
                    let t = t.trim();
                    (!t.is_empty()).then(|| digest(t.as_bytes()))
                })
                .collect(),
        }
    }

    /// Tokens in one string, separated by commas, spaces or newlines (so one secret can hold
    /// several, for rotation).
    pub fn parse_list(list: &str) -> Self {
        Self::new(
            list.split(|c: char| c == ',' || c.is_whitespace())
                .map(str::to_string),
        )
    }

    /// No token configured.
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Whether `presented` is one of the tokens. Its digest is compared with every configured
    /// digest, each comparison 32 bytes in constant time, so timing reveals neither which token
    /// matched, nor how much of one, nor any configured token's length.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        let presented = digest(presented);
        let mut ok = subtle::Choice::from(0u8);
        for d in &self.digests {
            ok |= d[..].ct_eq(&presented[..]);
        }
        ok.into()
    }

    /// A token file: one token per line; blank lines and lines starting with `#` are
    /// ignored (a comment must never become a valid token).
    pub fn parse_file(text: &str) -> Self {
        Self::new(token_file_entries(text).map(str::to_string))
    }

    /// Whether an `Authorization` header value carries one of the tokens as a bearer token.
    pub fn accepts_authorization(&self, authorization: Option<&str>) -> bool {
        authorization
            .and_then(bearer_token)
            .is_some_and(|t| self.accepts(t.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_configured_tokens() {
        let set = TokenSet::new(["alpha".to_string(), " beta \n".to_string(), String::new()]);
        assert!(set.accepts(b"alpha"));
        assert!(set.accepts(b"beta"));
        assert!(!set.accepts(b"alph"));
        assert!(!set.accepts(b"alphaa"));
        assert!(!set.accepts(b""));
        assert!(TokenSet::new(Vec::<String>::new()).is_empty());
        assert_eq!(format!("{set:?}"), "TokenSet(2 tokens)");
    }

    #[test]
    fn token_files_skip_comments_and_blank_lines() {
        let set = TokenSet::parse_file("# node tokens\n\nalpha\n  # rotated 2026-11\n beta \n");
        assert!(set.accepts(b"alpha") && set.accepts(b"beta"));
        assert!(!set.accepts(b"# node tokens"));
        assert!(!set.accepts(b"# rotated 2026-11"));
        assert_eq!(format!("{set:?}"), "TokenSet(2 tokens)");
    }

    #[test]
    fn lists_split_on_commas_and_whitespace() {
        let set = TokenSet::parse_list("alpha, beta\ngamma  ");
        for t in ["alpha", "beta", "gamma"] {
            assert!(set.accepts(t.as_bytes()), "{t}");
        }
        assert!(!set.accepts(b"alpha, beta"));
        assert!(TokenSet::parse_list(" ,\n").is_empty());
    }

    #[test]
    fn only_bearer_headers_carry_a_token() {
        let set = TokenSet::parse_list("alpha");
        for good in ["Bearer alpha", "bearer alpha", "  BEARER   alpha "] {
            assert!(set.accepts_authorization(Some(good)), "{good}");
        }
        for bad in [
            None,
            Some(""),
            Some("alpha"),
            Some("Bearer"),
            Some("Bearer "),
            Some("Basic alpha"),
            Some("Bearer alph"),
            Some("Bearer alpha,beta"),
        ] {
            assert!(!set.accepts_authorization(bad), "{bad:?}");
        }
        assert!(!TokenSet::default().accepts_authorization(Some("Bearer ")));
    }

    #[test]
    fn only_digests_are_stored() {
        let set = TokenSet::parse_list(
            "abc, a-much-longer-token-of-sixty-four-characters-xxxxxxxxxxxxxxxxx",
        );
        // SHA-256("abc"), the FIPS 180-2 test vector.
        let abc: [u8; 32] = [
            0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde, 0x5d, 0xae,
            0x22, 0x23, 0xb0, 0x03, 0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c, 0xb4, 0x10, 0xff, 0x61,
            0xf2, 0x00, 0x15, 0xad,
        ];
        assert_eq!(set.digests[0], abc);
        // Every entry has the same size whatever the token's length: nothing about a
        // configured token's length is left to compare.
        assert_eq!(set.digests.len(), 2);
        assert!(set.digests.iter().all(|d| d.len() == 32));
        assert!(set.accepts(b"abc"));
        assert!(set.accepts(b"a-much-longer-token-of-sixty-four-characters-xxxxxxxxxxxxxxxxx"));
    }

    #[test]
    fn tokens_of_any_length_and_near_misses_are_refused() {
        let set = TokenSet::parse_list("s3cret-token");
        for wrong in [
            &b""[..],
            b"s",
            b"s3cret-toke",
            b"s3cret-tokeN",
            b"s3cret-token ",
            b"s3cret-token-and-more",
            b"S3CRET-TOKEN",
            &[0u8; 12],
            &[b'x'; 4096],
        ] {
            assert!(!set.accepts(wrong), "{wrong:?}");
        }
        assert!(set.accepts(b"s3cret-token"));
        // Several tokens: each is accepted, and a token made of two is not.
        let set = TokenSet::parse_list("one two three");
        for t in ["one", "two", "three"] {
            assert!(set.accepts(t.as_bytes()), "{t}");
        }
        assert!(!set.accepts(b"onetwo"));
        assert!(!TokenSet::default().accepts(b""));
    }
}

//! Bearer tokens: parsing `Authorization: Bearer <token>` and checking a token against a set, in
//! constant time. The node checks its own tokens with it and the Worker its callers', so both
//! accept and refuse exactly the same headers.

use subtle::ConstantTimeEq;

/// The token of an `Authorization` header value `Bearer <token>` (scheme case-insensitive,
/// surrounding spaces ignored), or `None` for any other form or an empty token.
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The tokens a caller may present. Its `Debug` never prints them.
#[derive(Clone, Default)]
pub struct TokenSet {
    tokens: Vec<Vec<u8>>,
}

/// The tokens of a token file: one per line, trimmed, without blank lines and `#` comments.
pub fn token_file_entries(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

impl std::fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenSet({} tokens)", self.tokens.len())
    }
}

impl TokenSet {
    /// One token per item, trimmed; empty items are ignored.
    pub fn new<I: IntoIterator<Item = String>>(tokens: I) -> Self {
        Self {
            tokens: tokens
                .into_iter()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .map(String::into_bytes)
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
        self.tokens.is_empty()
    }

    /// Whether `presented` is one of the tokens. Every token is compared, each in constant time,
    /// so timing reveals neither which one nor how much of it matched.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        let mut ok = subtle::Choice::from(0u8);
        for t in &self.tokens {
            ok |= t.as_slice().ct_eq(presented);
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
}

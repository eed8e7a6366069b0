//! Model names in URLs (reference §1.1).
//!
//! Cloudflare's documented form puts the model raw in the path
//! (`.../ai/run/@cf/meta/llama-3-8b-instruct`), while the current official
//! SDKs percent-encode the slashes (`.../ai/run/@cf%2Fmeta%2Fllama-3-8b-instruct`).
//! Both must reach the same model here.

use percent_encoding::percent_decode_str;

/// The model name from the path tail after `/run/` or `/ai/run/`.
///
/// Percent-decodes the tail (so `@cf%2Fmeta%2Fllama-3-8b-instruct` equals
/// `@cf/meta/llama-3-8b-instruct`), then strips one leading `/`. Returns
/// `None` when the result is empty or the decoded bytes are not UTF-8.
/// `+` is not a space in a path and is kept as is.
pub fn model_from_path(tail: &str) -> Option<String> {
    let decoded = percent_decode_str(tail).decode_utf8().ok()?;
    let model = decoded.strip_prefix('/').unwrap_or(&decoded);
    if model.is_empty() {
        None
    } else {
        Some(model.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL: &str = "@cf/meta/llama-3-8b-instruct";

    #[test]
    fn raw_and_encoded_forms_agree() {
        for tail in [
            "@cf/meta/llama-3-8b-instruct",
            "/@cf/meta/llama-3-8b-instruct",
            "@cf%2Fmeta%2Fllama-3-8b-instruct",
            "@cf%2fmeta%2fllama-3-8b-instruct",
            "%40cf%2Fmeta%2Fllama-3-8b-instruct",
            "@cf/meta%2Fllama-3-8b-instruct",
            "%2F@cf%2Fmeta%2Fllama-3-8b-instruct",
        ] {
            assert_eq!(model_from_path(tail).as_deref(), Some(MODEL), "{tail}");
        }
    }

    #[test]
    fn other_names_pass_through() {
        assert_eq!(
            model_from_path("@hf/meta-llama/meta-llama-3-8b-instruct").as_deref(),
            Some("@hf/meta-llama/meta-llama-3-8b-instruct")
        );
        assert_eq!(model_from_path("a+b").as_deref(), Some("a+b"));
        assert_eq!(model_from_path("a%20b").as_deref(), Some("a b"));
        assert_eq!(model_from_path("caf%C3%A9").as_deref(), Some("café"));
        // malformed escapes are kept literally, as percent-decoding does
        assert_eq!(model_from_path("100%").as_deref(), Some("100%"));
        assert_eq!(model_from_path("%zz").as_deref(), Some("%zz"));
    }

    #[test]
    fn empty_or_non_utf8_is_none() {
        assert_eq!(model_from_path(""), None);
        assert_eq!(model_from_path("/"), None);
        assert_eq!(model_from_path("%2F"), None);
        assert_eq!(model_from_path("%FF"), None);
        assert_eq!(model_from_path("%C3"), None);
        assert_eq!(model_from_path("model%80"), None);
    }
}

//! Query strings: the value of one form-encoded parameter. A leaf shared by the route table,
//! the binding (`?version=3`) and the model catalogue (`?search=`, `?page=`).

use percent_encoding::percent_decode_str;

/// The value of the first `name` parameter of a query string (`a=1&b=2`, without the `?`),
/// form-decoded (`+` is a space, `%XX` a byte); `None` when absent or not UTF-8.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = form_decode(key)?;
        (key == name).then(|| form_decode(value)).flatten()
    })
}

fn form_decode(s: &str) -> Option<String> {
    let spaced = s.replace('+', " ");
    percent_decode_str(&spaced)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_form_decoded() {
        let q = Some("model=%40cf%2Fmeta%2Fx&search=text+generation&flag&e=");
        assert_eq!(query_param(q, "model").as_deref(), Some("@cf/meta/x"));
        assert_eq!(query_param(q, "search").as_deref(), Some("text generation"));
        assert_eq!(query_param(q, "flag").as_deref(), Some(""));
        assert_eq!(query_param(q, "e").as_deref(), Some(""));
        assert_eq!(query_param(q, "missing"), None);
        assert_eq!(query_param(None, "model"), None);
        assert_eq!(query_param(Some("m=%FF"), "m"), None);
    }
}

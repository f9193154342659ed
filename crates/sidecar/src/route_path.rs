//! The original request path ext_authz matches against the catalog's `[routes]` map, normalised
//! the way Envoy normalises it with `normalize_path` and `merge_slashes` on, and refused when
//! its meaning would depend on who decodes it. Pure: no I/O, and no allocation unless the path
//! has to change.
//!
//! Matching the raw path let a respelling (`/settings//sso`, `/settings/%73so`,
//! `/settings/./sso`, `/settings/x/../sso`) miss the route that the app behind Envoy still
//! serves, so the client's own feature header picked the feature. Normalising first means a
//! path that reaches a routed resource matches its route however it is spelled.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Why a path is refused rather than normalised: each is a spelling that decoders disagree on,
/// so Tollgate will not guess which resource it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPath {
    #[error("does not start with `/`")]
    NotAbsolute,
    #[error("holds an encoded `/` or `\\` (`%2F`, `%5C`)")]
    EncodedSeparator,
    #[error("holds a `\\`")]
    Backslash,
    #[error("holds a control character, raw or encoded (`%00`)")]
    ControlCharacter,
    #[error("holds a `%` not followed by two hex digits")]
    MalformedEscape,
    #[error("climbs above the root with `..`")]
    AboveRoot,
    #[error("holds `..` right after an empty segment (`//..`), which normalisers resolve differently")]
    DotDotAfterEmptySegment,
}

/// `path` (an origin-form request target, query and fragment allowed) normalised as Envoy's
/// HTTP connection manager does with `normalize_path: true` and `merge_slashes: true`, in
/// Envoy's order:
///
/// 1. the query (`?...`) and fragment (`#...`) are dropped: they are not part of the path;
/// 2. percent-encoded unreserved characters (`ALPHA DIGIT - . _ ~`, hex in either case) are
///    decoded, once: `%73` is `s`, `%2573` stays `%2573` (an app decoding it gets `%73`, not
///    `s`); other escapes keep their byte, with uppercase hex;
/// 3. dot segments are removed (RFC 3986 5.2.4);
/// 4. runs of `/` are merged into one.
///
/// Refused instead ([`InvalidPath`]): an encoded `/` or `\` (`%2F`, `%5C`), a raw `\`, a control
/// character raw or encoded, a `%` without two hex digits after it (`%u0073` is an IIS
/// spelling of `s`), `..` climbing above the root (Envoy clamps it, an app may not), and `..`
/// removing an empty segment: Envoy makes `/a/b//../c` `/a/b/c` (dots first, then slashes),
/// a server that merges slashes first makes it `/a/c`. Behind the shipped Envoy config most
/// of these never arrive (Envoy rejects `%2F` and `%5C`, turns `\` into `/` and resolves
/// `..`); refusing them matters when the sidecar is called some other way, and for what Envoy
/// passes on (`%u0073`). An empty path stays empty. Borrows unless the path holds a `%`, a
/// `//` or a dot segment, so the common case allocates nothing.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, InvalidPath> {
    // `split` yields at least one item, so the default is never used.
    let path = path.split(['?', '#']).next().unwrap_or_default();
    if path.is_empty() {
        return Ok(Cow::Borrowed(path));
    }
    if !path.starts_with('/') {
        return Err(InvalidPath::NotAbsolute);
    }
    let mut has_escape = false;
    for byte in path.bytes() {
        match byte {
            b'\\' => return Err(InvalidPath::Backslash),
            byte if byte.is_ascii_control() => return Err(InvalidPath::ControlCharacter),
            b'%' => has_escape = true,
            _ => {}
        }
    }
    let has_dot_segment = path.split('/').any(|segment| segment == "." || segment == "..");
    if !has_escape && !has_dot_segment && !path.contains("//") {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    let without_dots = remove_dot_segments(&decoded)?;
    Ok(Cow::Owned(merge_slashes(&without_dots)))
}

/// Step 2: one pass of percent-decoding, of unreserved characters only.
fn decode_unreserved(path: &str) -> Result<String, InvalidPath> {
    let mut decoded = String::with_capacity(path.len());
    let mut rest = path;
    while let Some((before, after)) = rest.split_once('%') {
        decoded.push_str(before);
        let mut digits = after.bytes();
        let (Some(high), Some(low)) = (digits.next().and_then(hex_value), digits.next().and_then(hex_value)) else {
            return Err(InvalidPath::MalformedEscape);
        };
        let byte = (high << 4) | low;
        match byte {
            b'/' | b'\\' => return Err(InvalidPath::EncodedSeparator),
            byte if byte.is_ascii_control() => return Err(InvalidPath::ControlCharacter),
            byte if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') => decoded.push(char::from(byte)),
            // Writing to a `String` cannot fail.
            _ => {
                let _ = write!(decoded, "%{byte:02X}");
            }
        }
        // Both digits are ASCII, so two bytes on is a character boundary.
        rest = after.get(2..).ok_or(InvalidPath::MalformedEscape)?;
    }
    decoded.push_str(rest);
    Ok(decoded)
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// Step 3: RFC 3986 5.2.4 over an absolute path. A final `.` or `..` leaves a trailing `/`
/// (`/a/b/..` is `/a/`); `..` with nothing left to remove, or with an empty segment to
/// remove, is refused.
fn remove_dot_segments(path: &str) -> Result<String, InvalidPath> {
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    // The path starts with `/`, so the first item is the empty string before it.
    for segment in path.split('/').skip(1) {
        trailing_slash = matches!(segment, "." | "..");
        match segment {
            "." => {}
            ".." => match segments.pop() {
                None => return Err(InvalidPath::AboveRoot),
                Some("") => return Err(InvalidPath::DotDotAfterEmptySegment),
                Some(_) => {}
            },
            segment => segments.push(segment),
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in segments {
        out.push('/');
        out.push_str(segment);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// Step 4: `//` and longer runs become `/`.
fn merge_slashes(path: &str) -> String {
    let mut merged = String::with_capacity(path.len());
    for character in path.chars() {
        if character == '/' && merged.ends_with('/') {
            continue;
        }
        merged.push(character);
    }
    merged
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::{InvalidPath, normalize};
    use std::borrow::Cow;

    fn normalized(path: &str) -> String {
        normalize(path).unwrap().into_owned()
    }

    #[test]
    fn every_respelling_of_a_routed_path_normalises_to_it() {
        for respelling in [
            "/settings/sso",
            "/settings//sso",
            "//settings///sso",
            "/settings/%73so",
            "/%73ettings/%73%73%6f",
            "/settings/%73%73%6F",
            "/settings/./sso",
            "/./settings/sso",
            "/settings/x/../sso",
            "/settings/x/y/../../sso",
            "/settings/%2e/sso",
            "/settings/x/%2E%2e/sso",
            "/settings/x/.%2e/sso",
            "/settings/sso?feature=reports",
            "/settings/sso#top",
            "/settings//./x/../sso?x=/../y",
        ] {
            let path = normalized(respelling);
            assert_eq!(path, "/settings/sso", "{respelling}");
        }
        assert_eq!(normalized("/settings/%73%53O"), "/settings/sSO", "decoding keeps case");
    }

    #[test]
    fn dot_segments_follow_rfc_3986_and_envoy() {
        assert_eq!(normalized("/a/b/c/./../../g"), "/a/g");
        assert_eq!(normalized("/a/b/.."), "/a/");
        assert_eq!(normalized("/a/b/."), "/a/b/");
        assert_eq!(normalized("/a/.."), "/");
        assert_eq!(normalized("/."), "/");
        assert_eq!(normalized("/a/..."), "/a/...", "`...` is a name, not a dot segment");
        assert_eq!(normalized("/a/.b/..c"), "/a/.b/..c");
        assert_eq!(normalized("/a/b/..//c"), "/a/c", "`..` then `//`: the same in either order");
    }

    #[test]
    fn decoding_is_one_pass_of_unreserved_characters_only() {
        assert_eq!(normalized("/settings/%2573so"), "/settings/%2573so", "double encoding stays literal");
        assert_eq!(normalized("/a%7e%5F%2d%2E%41%7a%30"), "/a~_-.Az0");
        assert_eq!(normalized("/a%20b%3f%3Bc"), "/a%20b%3F%3Bc", "reserved escapes keep their byte, uppercased");
        assert_eq!(normalized("/caf%C3%A9"), "/caf%C3%A9");
        assert_eq!(normalized("/café"), "/café");
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        for (path, error) in [
            ("/settings%2Fsso", InvalidPath::EncodedSeparator),
            ("/settings%2fsso", InvalidPath::EncodedSeparator),
            ("/settings%5Csso", InvalidPath::EncodedSeparator),
            ("/settings%5csso", InvalidPath::EncodedSeparator),
            ("/settings\\sso", InvalidPath::Backslash),
            ("/settings/sso\0", InvalidPath::ControlCharacter),
            ("/settings/sso%00", InvalidPath::ControlCharacter),
            ("/settings/sso%0a", InvalidPath::ControlCharacter),
            ("/settings/%u0073so", InvalidPath::MalformedEscape),
            ("/settings/sso%", InvalidPath::MalformedEscape),
            ("/settings/sso%7", InvalidPath::MalformedEscape),
            ("/settings/%+7so", InvalidPath::MalformedEscape),
            ("/..", InvalidPath::AboveRoot),
            ("/../settings/sso", InvalidPath::AboveRoot),
            ("/settings/../../sso", InvalidPath::AboveRoot),
            ("/settings/%2e%2e/%2E%2E/sso", InvalidPath::AboveRoot),
            // Envoy's order gives `/settings/x/sso`, merging slashes first `/settings/sso`.
            ("/settings/x//../sso", InvalidPath::DotDotAfterEmptySegment),
            ("//../settings/sso", InvalidPath::DotDotAfterEmptySegment),
            ("settings/sso", InvalidPath::NotAbsolute),
        ] {
            assert_eq!(normalize(path), Err(error), "{path:?}");
        }
        // The query is not the path: what it holds is not refused.
        assert_eq!(normalized("/settings/sso?next=%2F..%5C"), "/settings/sso");
    }

    #[test]
    fn a_path_that_needs_no_change_is_borrowed() {
        for path in ["/settings/sso", "/", "", "/reports/2026/q3?x=%2F", "/a/.b/c."] {
            assert!(matches!(normalize(path), Ok(Cow::Borrowed(_))), "{path}");
        }
        assert!(matches!(normalize("/settings//sso"), Ok(Cow::Owned(_))));
    }
}

//! Text from outside (guests, module files, config files, replies) made safe to
//! print: control characters escaped so that no one can forge a log line or move a
//! terminal's cursor, and long text cut so that an error stays one readable line.
//! Text-format log lines get it for every field at once ([`escaping_fields`]); JSON
//! lines need nothing, since JSON escapes control characters itself.

use std::borrow::Cow;
use std::fmt::{self, Write as _};

use tracing::field::Field;
use tracing_subscriber::field::MakeExt as _;
use tracing_subscriber::field::delimited::Delimited;
use tracing_subscriber::fmt::format::{FieldFn, Writer, debug_fn};

/// How many characters of someone else's text an error message quotes.
pub const MAX_QUOTE_CHARS: usize = 80;

/// `text` with every control character (C0, DEL, C1) written as an escape:
/// `\n`, `\r`, `\t`, or `\u{1b}`. A backslash is left alone: without a raw newline
/// or escape byte it cannot start a line or a terminal sequence.
pub fn escape_control(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// The first [`MAX_QUOTE_CHARS`] characters of `text`, escaped, with `…` and the
/// full length when anything was cut: for quoting user input in an error.
pub fn quote(text: &str) -> String {
    let mut chars = text.char_indices();
    match chars.nth(MAX_QUOTE_CHARS) {
        None => escape_control(text).into_owned(),
        Some((end, _)) => format!("{}… ({} bytes)", escape_control(&text[..end]), text.len()),
    }
}

/// How one field of a text log line is written.
type WriteField = fn(&mut Writer<'_>, &Field, &dyn fmt::Debug) -> fmt::Result;

/// The field formatter for text logs: fields as the default formatter writes
/// them (`message key=value …`), with control characters escaped in every value,
/// so that a guest's log text, WASI stderr or trap message (or anything else that
/// reaches a log line) can never start a line of its own.
pub fn escaping_fields() -> Delimited<&'static str, FieldFn<WriteField>> {
    debug_fn(write_escaped as WriteField).delimited(" ")
}

fn write_escaped(w: &mut Writer<'_>, field: &Field, value: &dyn fmt::Debug) -> fmt::Result {
    let text = format!("{value:?}");
    match field.name() {
        "message" => w.write_str(&escape_control(&text)),
        name => write!(w, "{name}={}", escape_control(&text)),
    }
}

/// `text` cut to `max` characters (with `…` and the full length when cut), each
/// line escaped: for messages made by others (a parser's error) that may quote
/// an input line of any length.
pub fn cut(text: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, line) in text.lines().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&escape_control(line));
    }
    match out.char_indices().nth(max) {
        None => out,
        Some((end, _)) => format!("{}… ({} bytes in all)", &out[..end], text.len()),
    }
}

/// `url` as it may be shown (logs, errors): a password in it becomes `***`.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_string();
    };
    let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
    let query_password = path.contains("password=");
    let path = if query_password { "?***" } else { path };
    format!("{scheme}://{user}:***@{host}{path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert!(matches!(escape_control("plain ✓ text"), Cow::Borrowed(_)));
        assert_eq!(
            escape_control("a\nINFO fake line\r\t\u{1b}[2J\u{7f}\u{85}"),
            "a\\nINFO fake line\\r\\t\\u{1b}[2J\\u{7f}\\u{85}"
        );
        assert_eq!(escape_control("back\\slash"), "back\\slash");
    }

    #[test]
    fn quotes_are_cut_to_a_line() {
        assert_eq!(quote("short"), "short");
        let long = "x".repeat(1 << 20);
        let q = quote(&long);
        assert!(q.len() < 120, "{q}");
        assert!(q.ends_with(&format!("… ({} bytes)", 1 << 20)), "{q}");
        assert_eq!(
            quote(&"é".repeat(100)).chars().filter(|&c| c == 'é').count(),
            MAX_QUOTE_CHARS
        );
        assert_eq!(quote("a\nb"), "a\\nb");
    }

    #[test]
    fn messages_keep_their_lines_but_not_their_length() {
        assert_eq!(cut("one\ntwo\x1b", 100), "one\ntwo\\u{1b}");
        let long = format!("error\n{}", "y".repeat(10_000));
        let c = cut(&long, 300);
        assert!(
            c.starts_with("error\nyyy") && c.ends_with("(10006 bytes in all)"),
            "{c}"
        );
        assert!(c.len() < 340);
    }

    #[test]
    fn a_password_in_a_redis_url_is_never_shown() {
        assert_eq!(redacted("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redacted("redis://:s3cret@host:6379/0"), "redis://:***@host:6379/0");
        assert_eq!(redacted("redis://app:s3cret@host"), "redis://app:***@host");
        assert_eq!(redacted("redis://app:p@ss@host/2"), "redis://app:***@host/2");
        assert!(!redacted("http://u:s3cret@host").contains("s3cret"));
    }
}

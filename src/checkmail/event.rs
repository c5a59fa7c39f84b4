//! The System Check Email event's Data: the virtual host that receives the mail.

use serde_json::{json, Value};

use crate::error::{Error, Result};

/// `host` from the event's Data: a JSON string, an array/object, or a bare host name.
pub fn event_host(data: &Value) -> Result<String> {
    const HOW: &str = "the System Check Email event's Data must name the virtual host that \
                       receives the mail, e.g. {\"host\":\"pcr360.example.edu\"}";
    let object = match data {
        Value::Object(_) => data.clone(),
        Value::String(text) if text.trim_start().starts_with('{') => serde_json::from_str(text)
            .map_err(|e| Error::message(format!("{HOW}; the Data is not valid JSON ({e})")))?,
        Value::String(text) if host_name_of(text).is_some() => json!({ "host": text.trim() }),
        _ => return Err(Error::message(format!("{HOW}; no host was given"))),
    };
    match object.get("host").and_then(Value::as_str) {
        Some(host) => host_name_of(host)
            .ok_or_else(|| Error::message(format!("{HOW}; 'host' is not a host name"))),
        None => Err(Error::message(format!("{HOW}; 'host' is missing"))),
    }
}

/// The host name in `text`: the text itself when it is one, or the host of a URL
/// (`https://pcr360.example.edu/`, with or without port and path), which is how an
/// administrator copies it from the browser.
pub(super) fn host_name_of(text: &str) -> Option<String> {
    let text = text.trim();
    if is_host_name(text) {
        return Some(text.to_string());
    }
    if !text.contains("://") {
        return None;
    }
    let url = oauth2::url::Url::parse(text).ok()?;
    let host = url.host_str()?;
    is_host_name(host).then(|| host.to_ascii_lowercase())
}

pub(super) fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_event_host_comes_from_every_documented_form() {
        assert_eq!(
            event_host(&json!({"host": "pcr360.example.edu"})).unwrap(),
            "pcr360.example.edu"
        );
        assert_eq!(
            event_host(&json!("{\"host\":\"pcr360.example.edu\"}")).unwrap(),
            "pcr360.example.edu"
        );
        assert_eq!(
            event_host(&json!("pcr360.example.edu")).unwrap(),
            "pcr360.example.edu"
        );
        // Copied from the browser's address bar: the URL's host name.
        for url in [
            "https://pcr360.example.edu/",
            "https://pcr360.example.edu",
            " http://PCR360.example.edu:8443/pcr360/index.php?x=1 ",
        ] {
            assert_eq!(
                event_host(&json!({ "host": url })).unwrap(),
                "pcr360.example.edu"
            );
            assert_eq!(event_host(&json!(url)).unwrap(), "pcr360.example.edu");
        }
        for bad in [
            json!(null),
            json!({}),
            json!("{not json"),
            json!({"host": "a b"}),
            json!({"host": "https://"}),
            json!({"host": "file:///etc/passwd"}),
            json!(5),
        ] {
            let err = event_host(&bad).unwrap_err().to_string();
            assert!(err.contains("host"), "{bad}: {err}");
        }
    }
}

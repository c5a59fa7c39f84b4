//! The Blocked Emails list (the host's patterns) as the decision uses it.

use regex::Regex;

/// The Blocked Emails list: `*` wildcards on the sender address, or `/regex/flags` on the
/// sender address and the subject (PCRE-style, lookarounds included).
pub struct Blocklist {
    wildcards: Vec<Regex>,
    patterns: Vec<fancy_regex::Regex>,
}

impl Blocklist {
    /// Compiles the host's patterns; a pattern that does not compile is returned as an error
    /// text (and ignored) so one typo does not unblock everything else.
    pub fn new(patterns: &[String]) -> (Blocklist, Vec<String>) {
        let mut list = Blocklist {
            wildcards: Vec::new(),
            patterns: Vec::new(),
        };
        let mut errors = Vec::new();
        for pattern in patterns {
            let p = pattern.trim();
            if p.len() >= 2 && p.starts_with('/') && p.rfind('/').is_some_and(|i| i > 0) {
                let end = p.rfind('/').unwrap_or(0);
                let body = &p[1..end];
                let mut flags = String::new();
                for f in p[end + 1..].chars() {
                    match f {
                        'i' | 'm' | 's' | 'x' => flags.push(f),
                        'u' | 'D' | 'U' => {}
                        _ => {}
                    }
                }
                let source = if flags.is_empty() {
                    body.to_string()
                } else {
                    format!("(?{flags}){body}")
                };
                match fancy_regex::RegexBuilder::new(&source)
                    .backtrack_limit(100_000)
                    .build()
                {
                    Ok(re) => list.patterns.push(re),
                    Err(e) => errors.push(format!(
                        "Blocked Emails pattern {p:?} is not a valid regular expression ({e}); ignored"
                    )),
                }
            } else if !p.is_empty() {
                let source = format!(
                    "(?i)^{}$",
                    p.split('*')
                        .map(regex::escape)
                        .collect::<Vec<_>>()
                        .join(".*")
                );
                match Regex::new(&source) {
                    Ok(re) => list.wildcards.push(re),
                    Err(e) => errors.push(format!("Blocked Emails pattern {p:?}: {e}; ignored")),
                }
            }
        }
        (list, errors)
    }

    /// True when the sender or the subject is blocked.
    pub fn blocks(&self, sender: &str, subject: &str) -> bool {
        self.wildcards.iter().any(|re| re.is_match(sender))
            || self.patterns.iter().any(|re| {
                re.is_match(sender).unwrap_or(false) || re.is_match(subject).unwrap_or(false)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_emails_follow_the_product_rules() {
        let (list, errors) = Blocklist::new(&[
            "*@spam.example".into(),
            "exact@block.example".into(),
            "/^\\[SPAM\\]/i".into(),
            "/@(?!pcr\\.com)/".into(),
            "/(unclosed/".into(),
        ]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(list.blocks("x@SPAM.example", "hello"));
        assert!(list.blocks("exact@block.example", "hello"));
        assert!(list.blocks("a@pcr.com", "[spam] buy now"));
        // The whitelist form: everything not from pcr.com is blocked.
        assert!(list.blocks("someone@gmail.com", "hello"));
        let (whitelist, _) = Blocklist::new(&["/@(?!pcr\\.com)/".into()]);
        assert!(!whitelist.blocks("staff@pcr.com", "hello"));
        assert!(whitelist.blocks("someone@gmail.com", "hello"));
        let (wild, _) = Blocklist::new(&["*@spam.example".into()]);
        assert!(!wild.blocks("spam.example@good.example", "x"));
        assert!(!wild.blocks("a@good.example", "from *@spam.example"));
    }
}

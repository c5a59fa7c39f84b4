//! Plain text from an HTML body, for mail that has no text part.

use mail_parser::decoders::html::add_html_token;

/// Plain text from an HTML body, for mail that has no text part: block elements become line
/// breaks, list items get `- `, links keep their URL, entities are decoded, `<head>`,
/// `<style>` and `<script>` are dropped.
pub fn html_to_text(html: &str) -> String {
    let mut out = String::with_capacity(html.len() / 2);
    let mut skip_until: Option<&'static str> = None;
    let mut pending_href: Vec<Option<String>> = Vec::new();
    let mut link_text_start: Vec<usize> = Vec::new();
    let mut pre = 0usize;
    let mut light_p = false;
    let bytes = html.as_bytes();
    let mut i = 0;
    let mut text_start = 0;

    while i < bytes.len() {
        if bytes[i] != b'<' {
            i += 1;
            continue;
        }
        // Flush text before the tag.
        if skip_until.is_none() {
            push_text(&mut out, &html[text_start..i], pre > 0);
        }
        // Comments and declarations.
        if html[i..].starts_with("<!--") {
            i = html[i + 4..]
                .find("-->")
                .map_or(bytes.len(), |p| i + 4 + p + 3);
            text_start = i;
            continue;
        }
        let Some(end) = tag_end(bytes, i + 1) else {
            // A stray '<' that never closes: treat the rest as text.
            if skip_until.is_none() {
                push_text(&mut out, &html[i..], pre > 0);
            }
            text_start = bytes.len();
            break;
        };
        let tag = &html[i + 1..end];
        i = end + 1;
        text_start = i;
        let closing = tag.starts_with('/');
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_ascii_lowercase();
        if let Some(until) = skip_until {
            if closing && name == until {
                skip_until = None;
            }
            continue;
        }
        match name.as_str() {
            "head" | "style" | "script" | "title" | "template" if !closing => {
                skip_until = Some(match name.as_str() {
                    "head" => "head",
                    "style" => "style",
                    "script" => "script",
                    "title" => "title",
                    _ => "template",
                });
            }
            "br" => newline(&mut out, 1),
            "p" | "div" | "h1" | "h2" | "h3" | "h4" | "h5" | "h6" | "table" | "tr" | "ul"
            | "ol" | "blockquote" | "section" | "article" | "header" | "footer" | "address"
            | "dl" | "dt" | "dd" | "center" | "form" | "fieldset" => {
                // Outlook writes every line as a margin-less `<p class=MsoNormal>`.
                if name == "p" && !closing {
                    light_p = tag.to_ascii_lowercase().contains("msonormal");
                }
                let heavy = matches!(name.as_str(), "p" | "h1" | "h2" | "h3" | "h4" | "h5" | "h6")
                    && !(name == "p" && light_p);
                newline(&mut out, if heavy { 2 } else { 1 });
            }
            "pre" => {
                newline(&mut out, 1);
                if closing {
                    pre = pre.saturating_sub(1);
                } else {
                    pre += 1;
                }
            }
            "hr" => {
                newline(&mut out, 1);
                out.push_str("----");
                newline(&mut out, 1);
            }
            "li" if !closing => {
                newline(&mut out, 1);
                out.push_str("- ");
            }
            "li" => newline(&mut out, 1),
            "td" | "th" if !closing && !out.ends_with('\n') && !out.is_empty() => {
                out.push('\t');
            }
            "a" if closing => {
                let href = pending_href.pop().flatten();
                let start = link_text_start.pop().unwrap_or(out.len());
                if let Some(href) = href.filter(|_| out.len().saturating_sub(start) <= 4096) {
                    let shown = out.get(start..).unwrap_or("").trim().to_string();
                    let web = href.starts_with("http://") || href.starts_with("https://");
                    if web && shown != href && !shown.contains(href.as_str()) {
                        out.push_str(&format!(" <{href}>"));
                    }
                }
            }
            // Bounded: a page of unclosed links must not make this quadratic.
            "a" if !closing && pending_href.len() < 64 => {
                pending_href.push(attribute(tag, "href"));
                link_text_start.push(out.len());
            }
            _ => {}
        }
    }
    if skip_until.is_none() && text_start < bytes.len() {
        push_text(&mut out, &html[text_start..], pre > 0);
    }
    tidy_lines(&out)
}

/// Index of the `>` closing a tag that starts at `from` (quotes respected).
fn tag_end(bytes: &[u8], from: usize) -> Option<usize> {
    let mut quote: Option<u8> = None;
    for (j, &b) in bytes.iter().enumerate().skip(from) {
        match (quote, b) {
            (Some(q), b) if b == q => quote = None,
            (Some(_), _) => {}
            (None, b'"' | b'\'') => quote = Some(b),
            (None, b'>') => return Some(j),
            _ => {}
        }
    }
    None
}

fn attribute(tag: &str, name: &str) -> Option<String> {
    let lower = tag.to_ascii_lowercase();
    let mut search = 0;
    while let Some(pos) = lower[search..].find(name) {
        let at = search + pos;
        search = at + name.len();
        let before_ok = at == 0 || lower.as_bytes()[at - 1].is_ascii_whitespace();
        let rest = lower[search..].trim_start();
        if !before_ok || !rest.starts_with('=') {
            continue;
        }
        let value_start = tag.len() - rest.len() + 1;
        let value = tag[value_start..].trim_start();
        let v = match value.chars().next() {
            Some(q @ ('"' | '\'')) => value[1..].split(q).next().unwrap_or(""),
            _ => value
                .split(|c: char| c.is_whitespace() || c == '>')
                .next()
                .unwrap_or(""),
        };
        return Some(decode_entities(v).trim().to_string());
    }
    None
}

fn push_text(out: &mut String, raw: &str, pre: bool) {
    let text = decode_entities(raw);
    if pre {
        out.push_str(&text);
        return;
    }
    for (k, word) in text
        .split(|c: char| c.is_whitespace() && c != '\u{A0}')
        .enumerate()
    {
        if k > 0 && !out.is_empty() && !out.ends_with([' ', '\n', '\t']) {
            out.push(' ');
        }
        // Non-breaking spaces stay until `tidy_lines`, so a `&nbsp;`-only line survives
        // `newline` (which drops trailing spaces) and becomes a blank line.
        out.push_str(word);
    }
}

fn newline(out: &mut String, count: usize) {
    if out.is_empty() {
        return;
    }
    while out.ends_with(' ') || out.ends_with('\t') {
        out.pop();
    }
    // Only the last `count` characters matter: after a `<pre>` of many blank lines, every
    // `<br>` must not count them all again.
    let have = out
        .chars()
        .rev()
        .take(count)
        .take_while(|&c| c == '\n')
        .count();
    for _ in have..count {
        out.push('\n');
    }
}

fn decode_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp..];
        let end = after
            .char_indices()
            .take(34)
            .skip(1)
            .find(|&(_, c)| c == ';' || c == '&' || c.is_whitespace())
            .filter(|&(_, c)| c == ';')
            .map(|(k, _)| k);
        match end {
            Some(end) if end > 1 => {
                add_html_token(&mut out, &after.as_bytes()[..=end], false);
                rest = &after[end + 1..];
            }
            _ => {
                out.push('&');
                rest = &after[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn tidy_lines(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut blank_run = 0;
    for line in s.split('\n') {
        let line = line.trim_end().replace('\u{A0}', " ");
        if line.is_empty() {
            blank_run += 1;
            if blank_run > 1 {
                continue;
            }
        } else {
            blank_run = 0;
        }
        out.push_str(&line);
        out.push('\n');
    }
    out.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mime::tests::p;

    #[test]
    fn html_is_turned_into_readable_text() {
        let html = "<html><head><title>T</title><style>p{x:y}</style></head><body>\
                    <p>Hello&nbsp;there,</p><div>line&amp;two</div>\
                    <ul><li>one</li><li>two</li></ul>\
                    <p>See <a href=\"https://x.example/a?b=1&amp;c=2\">this</a>.</p>\
                    <script>alert(1)</script><!-- hidden --><br>end &#8212; &euro;5</body></html>";
        assert_eq!(
            html_to_text(html),
            "Hello there,\n\nline&two\n- one\n- two\n\nSee this <https://x.example/a?b=1&c=2>.\n\nend — €5"
        );
        assert_eq!(html_to_text("a < b and c"), "a < b and c");
        let outlook = "<p class=MsoNormal>Thanks,<o:p></o:p></p><p class=MsoNormal>John<o:p></o:p></p>\
                       <p class=MsoNormal><o:p>&nbsp;</o:p></p><p class=MsoNormal>PS<o:p></o:p></p>";
        assert_eq!(html_to_text(outlook), "Thanks,\nJohn\n\nPS");
        assert_eq!(html_to_text("<pre>  keep\n  this</pre>"), "keep\n  this");
        let m = p("From: a@b.c\r\nContent-Type: text/html\r\n\r\n<p>Only&nbsp;HTML</p>\r\n");
        assert_eq!(m.text, "Only HTML");
        assert_eq!(m.html.as_deref(), Some("<p>Only&nbsp;HTML</p>\n"));
    }

    #[test]
    fn html_line_breaks_after_a_long_pre_block_stay_linear() {
        // Each `<br>` used to count every line break before it.
        let n = 200_000;
        let html = format!("<pre>a{}</pre>{}b", "\n".repeat(n), "<br>".repeat(n));
        assert_eq!(html_to_text(&html), "a\n\nb");
    }
}

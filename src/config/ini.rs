//! A reader for Zend Framework 1 style INI files (`Zend_Config_Ini` on top of PHP's
//! `parse_ini_file` in `INI_SCANNER_NORMAL` mode), as PCR-360's `pcr360.ini` is written.
//!
//! What it accepts, and how it differs from PHP:
//! - `[section]` and `[child : parent]` headers. A child inherits every key of its parent chain
//!   (any depth) and overrides them. The parent may be defined anywhere in the file; an unknown
//!   parent, a cycle or `[a : b : c]` is an error when that section is resolved. A header
//!   repeated with the same parent adds to the section (PHP merges it); with another parent it
//!   is an error.
//! - `key = value` lines. Keys are case-sensitive and kept whole (`email.EMAIL` is one key, not
//!   nested arrays). `key[] = v` appends (`key.0`, `key.1`, ...) and `key[sub] = v` is stored as
//!   `key.sub`. Keys before the first section are ignored by every environment (as in ZF1).
//! - Values are a concatenation of segments, as in PHP: `"double-quoted"`, `'single-quoted'`
//!   and bare text; whitespace between segments is dropped (`APPLICATION_PATH "/x"`).
//!   - Double quotes: only `\"`, `\\` and `\$` are escapes (the backslash is dropped); any other
//!     backslash is kept as written (`"C:\dir"` stays `C:\dir`). `${NAME}` is replaced by the
//!     environment variable NAME (PHP also looks at php.ini directives, which we cannot see);
//!     `${NAME:-default}` (PHP 8.3 syntax) is accepted too.
//!   - Single quotes: raw, no escape and no `${}` processing.
//!   - Quoted values may span lines, as in PHP. A quote that is never closed is an error naming
//!     the line where it opened.
//!   - Bare text ends at `;` (a comment) or the end of the line and is trimmed; `${NAME}` is
//!     expanded. A bare value that is exactly `true`/`on`/`yes` reads as `1` and
//!     `false`/`off`/`no`/`none`/`null` as the empty string ([`IniValue::text`]), as PHP does;
//!     the literal is kept in [`IniValue::raw`] so booleans can be parsed by the consumer.
//!   - PHP constants (`APPLICATION_PATH`, `E_ALL`) and bit operators are not evaluated: the
//!     text is kept literally and [`IniValue::constant`] names a constant concatenated with a
//!     quoted string, so a consumer can refuse a path it cannot resolve.
//! - `;` starts a comment. A line whose first non-blank character is `#` is a comment too
//!   (PHP 5 treated it so; PHP 7+ ignores such a line when it has no `=`, and a key starting
//!   with `#` is never read by anyone, so treating it as a comment changes nothing).
//! - Stricter than PHP: a line that is not `key = value`, a section or a comment is an error
//!   (PHP silently ignores a bare word), and the file must be UTF-8 (a UTF-8 BOM is skipped).
//!
//! Every error is an [`Error::Config`] naming the file and the line. Errors never quote a
//! line's text: a malformed line may hold a password.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use super::files;
use crate::error::{ConfigLocation, Error, Result};

/// One value as read from the file.
#[derive(Clone, PartialEq, Eq)]
pub struct IniValue {
    /// The value after quote and escape processing, before PHP's bare-word conversions.
    pub raw: String,
    /// The 1-based line of the key.
    pub line: usize,
    /// True when any part of the value was quoted.
    pub quoted: bool,
    /// A bare PHP constant name concatenated with a quoted string (`APPLICATION_PATH "/x"`):
    /// PHP would have substituted it, this reader cannot.
    pub constant: Option<String>,
}

impl std::fmt::Debug for IniValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A value may be a password: Debug shows only where it is.
        f.debug_struct("IniValue")
            .field("line", &self.line)
            .field("quoted", &self.quoted)
            .field("len", &self.raw.len())
            .finish()
    }
}

impl IniValue {
    /// The value as PHP's `parse_ini_file` returns it: a bare `true`/`on`/`yes` is `"1"`, a bare
    /// `false`/`off`/`no`/`none`/`null` is `""`; anything else is the raw value.
    pub fn text(&self) -> &str {
        if !self.quoted {
            match self.raw.to_ascii_lowercase().as_str() {
                "true" | "on" | "yes" => return "1",
                "false" | "off" | "no" | "none" | "null" => return "",
                _ => {}
            }
        }
        &self.raw
    }
}

/// One section with its parents' keys merged in: what an environment sees.
#[derive(Debug, Clone)]
pub struct Section {
    /// The file as it is named in error messages.
    pub file: String,
    pub name: String,
    /// The line of the section's `[header]`.
    pub line: usize,
    entries: BTreeMap<String, IniValue>,
}

impl Section {
    pub fn get(&self, key: &str) -> Option<&IniValue> {
        self.entries.get(key)
    }

    /// Every `(key, value)` whose key starts with `prefix`, in key order.
    pub fn with_prefix<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a IniValue)> + 'a {
        self.entries
            .range(prefix.to_string()..)
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.as_str(), v))
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// A configuration error about `key`, at the line where it was set (or at the section's
    /// header when the key is missing).
    pub fn error(&self, key: &str, message: impl Into<String>) -> Error {
        let line = self.entries.get(key).map_or(self.line, |v| v.line);
        Error::config(
            ConfigLocation {
                file: Some(self.file.clone()),
                line: Some(line),
                key: Some(key.to_string()),
                ..Default::default()
            },
            message,
        )
    }
}

#[derive(Debug, Clone)]
struct RawSection {
    name: String,
    parent: Option<String>,
    /// Line of the first header of this section.
    line: usize,
    /// Keyed, so a repeated key replaces the earlier one in O(log n) (the file may have
    /// hundreds of thousands of keys).
    entries: BTreeMap<String, IniValue>,
    array_counters: HashMap<String, usize>,
}

/// A parsed INI file: its sections, not yet resolved.
#[derive(Debug, Clone)]
pub struct IniFile {
    file: String,
    sections: Vec<RawSection>,
    /// Section name → index in `sections`.
    index: HashMap<String, usize>,
}

impl IniFile {
    /// Reads and parses `path`. An unreadable file, one that is not a regular file (a FIFO,
    /// `/dev/zero`) or one larger than [`files::INI_FILE_LIMIT`] is a configuration error
    /// naming it.
    pub fn load(path: &Path) -> Result<IniFile> {
        let name = path.display().to_string();
        let bytes = files::read_limited(path, files::INI_FILE_LIMIT).map_err(|e| {
            Error::config(
                ConfigLocation {
                    file: Some(name.clone()),
                    ..Default::default()
                },
                format!("cannot read the configuration file: {e}"),
            )
        })?;
        let text = match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => {
                let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
                let line = 1 + valid.iter().filter(|&&b| b == b'\n').count();
                return Err(Error::at_line(&name, line, "the file is not valid UTF-8"));
            }
        };
        IniFile::parse(&text, &name)
    }

    /// Parses `text`; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<IniFile> {
        Parser::new(text, file).run()
    }

    /// The file as errors name it.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// The section names in the order they first appear.
    pub fn section_names(&self) -> Vec<&str> {
        self.sections.iter().map(|s| s.name.as_str()).collect()
    }

    /// `name` with every parent's keys merged in (parents first, the child overriding).
    pub fn section(&self, name: &str) -> Result<Section> {
        let find = |n: &str| self.index.get(n).map(|&i| &self.sections[i]);
        let Some(start) = find(name) else {
            let known = self.section_names().join(", ");
            return Err(Error::config(
                ConfigLocation {
                    file: Some(self.file.clone()),
                    ..Default::default()
                },
                format!(
                    "environment [{name}] is not defined (sections: {})",
                    if known.is_empty() { "none" } else { &known }
                ),
            ));
        };
        let mut chain = vec![start];
        let mut seen: HashSet<&str> = HashSet::from([start.name.as_str()]);
        let mut current = start;
        while let Some(parent) = &current.parent {
            let Some(next) = find(parent) else {
                return Err(Error::at_line(
                    &self.file,
                    current.line,
                    format!(
                        "section [{}] extends [{parent}], which is not defined",
                        current.name
                    ),
                ));
            };
            if !seen.insert(next.name.as_str()) {
                let cycle: Vec<&str> = chain
                    .iter()
                    .map(|s| s.name.as_str())
                    .chain([next.name.as_str()])
                    .collect();
                return Err(Error::at_line(
                    &self.file,
                    current.line,
                    format!(
                        "sections extend each other in a cycle: {}",
                        cycle.join(" : ")
                    ),
                ));
            }
            chain.push(next);
            current = next;
        }
        // The child first, then each ancestor only fills in what is still missing: every key
        // is copied once, whatever the depth of the chain.
        let mut entries = start.entries.clone();
        for section in chain.iter().skip(1) {
            for (key, value) in &section.entries {
                if !entries.contains_key(key) {
                    entries.insert(key.clone(), value.clone());
                }
            }
        }
        Ok(Section {
            file: self.file.clone(),
            name: start.name.clone(),
            line: start.line,
            entries,
        })
    }
}

struct Parser<'a> {
    file: &'a str,
    chars: Vec<char>,
    pos: usize,
    line: usize,
    sections: Vec<RawSection>,
    /// Section name → index in `sections`.
    index: HashMap<String, usize>,
    /// Index of the section keys go into (None before the first header).
    current: Option<usize>,
    /// The line where a quoted value spanning several lines opened, for a hint in later errors.
    multiline_quote: Option<usize>,
}

impl<'a> Parser<'a> {
    fn new(text: &str, file: &'a str) -> Self {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        Parser {
            file,
            chars: text.chars().collect(),
            pos: 0,
            line: 1,
            sections: Vec::new(),
            index: HashMap::new(),
            current: None,
            multiline_quote: None,
        }
    }

    fn error(&self, line: usize, message: impl Into<String>) -> Error {
        let mut message = message.into();
        if let Some(open) = self.multiline_quote {
            if open < line {
                message.push_str(&format!(
                    " (note: the quoted value opened at line {open} runs over several lines; \
                     is its closing quote missing?)"
                ));
            }
        }
        Error::at_line(self.file, line, message)
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn at_eol(&self) -> bool {
        matches!(self.peek(), None | Some('\n') | Some('\r'))
    }

    /// Consumes one line ending (`\n`, `\r\n` or `\r`) if there is one.
    fn eat_newline(&mut self) {
        match self.peek() {
            Some('\r') => {
                self.pos += 1;
                if self.peek() == Some('\n') {
                    self.pos += 1;
                }
                self.line += 1;
            }
            Some('\n') => {
                self.pos += 1;
                self.line += 1;
            }
            _ => {}
        }
    }

    fn skip_blanks(&mut self) {
        while matches!(self.peek(), Some(' ') | Some('\t')) {
            self.pos += 1;
        }
    }

    fn skip_to_eol(&mut self) {
        while !self.at_eol() {
            self.pos += 1;
        }
    }

    /// After a complete statement: only blanks and a `;` comment may follow on the line.
    fn expect_line_end(&mut self, what: &str) -> Result<()> {
        self.skip_blanks();
        match self.peek() {
            None | Some('\n') | Some('\r') => Ok(()),
            Some(';') => {
                self.skip_to_eol();
                Ok(())
            }
            Some(_) => Err(self.error(self.line, format!("unexpected text after {what}"))),
        }
    }

    fn run(mut self) -> Result<IniFile> {
        loop {
            self.skip_blanks();
            match self.peek() {
                None => break,
                Some('\n') | Some('\r') => self.eat_newline(),
                Some(';') | Some('#') => {
                    self.skip_to_eol();
                    self.eat_newline();
                }
                Some('[') => {
                    self.section_header()?;
                    self.eat_newline();
                }
                Some(_) => {
                    self.entry()?;
                    self.eat_newline();
                }
            }
        }
        Ok(IniFile {
            file: self.file.to_string(),
            sections: self.sections,
            index: self.index,
        })
    }

    fn section_header(&mut self) -> Result<()> {
        let line = self.line;
        self.pos += 1; // '['
        let start = self.pos;
        while !self.at_eol() && self.peek() != Some(']') {
            self.pos += 1;
        }
        if self.peek() != Some(']') {
            return Err(self.error(line, "section header without a closing `]`"));
        }
        let inner: String = self.chars[start..self.pos].iter().collect();
        self.pos += 1;
        self.expect_line_end("the section header")?;

        let parts: Vec<String> = inner
            .split(':')
            .map(|p| unquote_name(p.trim()).to_string())
            .collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(self.error(line, "empty section name"));
        }
        if parts.len() > 2 {
            return Err(self.error(
                line,
                format!(
                    "section [{}] may extend only one section (write `[child : parent]`)",
                    parts[0]
                ),
            ));
        }
        let name = parts[0].clone();
        let parent = parts.get(1).cloned();
        if parent.as_deref() == Some(name.as_str()) {
            return Err(self.error(line, format!("section [{name}] extends itself")));
        }
        if let Some(&index) = self.index.get(&name) {
            let existing = &self.sections[index];
            if existing.parent != parent {
                return Err(self.error(
                    line,
                    format!(
                        "section [{name}] is defined again with a different parent \
                         (first defined at line {})",
                        existing.line
                    ),
                ));
            }
            self.current = Some(index);
        } else {
            self.index.insert(name.clone(), self.sections.len());
            self.sections.push(RawSection {
                name,
                parent,
                line,
                entries: BTreeMap::new(),
                array_counters: HashMap::new(),
            });
            self.current = Some(self.sections.len() - 1);
        }
        Ok(())
    }

    fn entry(&mut self) -> Result<()> {
        let line = self.line;
        let start = self.pos;
        while !self.at_eol() && !matches!(self.peek(), Some('=') | Some(';')) {
            self.pos += 1;
        }
        if self.peek() != Some('=') {
            return Err(self.error(line, "line is not `key = value`, a [section] or a comment"));
        }
        let key_text: String = self.chars[start..self.pos].iter().collect();
        self.pos += 1; // '='
        let key = self.key_name(key_text.trim(), line)?;
        let value = self.value(line)?;
        if let Some(index) = self.current {
            let section = &mut self.sections[index];
            let key = match key {
                Key::Plain(k) => k,
                Key::Append(base) => {
                    let n = section.array_counters.entry(base.clone()).or_insert(0);
                    let key = format!("{base}.{n}");
                    *n += 1;
                    key
                }
            };
            section.entries.insert(key, value);
        }
        Ok(())
    }

    fn key_name(&self, key: &str, line: usize) -> Result<Key> {
        if key.is_empty() {
            return Err(self.error(line, "a value without a key (`= value`)"));
        }
        let (base, offset) = match key.find('[') {
            Some(open) => {
                if !key.ends_with(']') {
                    return Err(self.error(line, "a key with an unclosed `[`"));
                }
                let inner = &key[open + 1..key.len() - 1];
                (key[..open].trim_end(), Some(inner.trim()))
            }
            None => (key, None),
        };
        let bad = |s: &str| {
            s.chars()
                .find(|c| "\"'{}|&~!()^$[]".contains(*c) || c.is_control())
        };
        if base.is_empty() {
            return Err(self.error(line, "a key with an empty name"));
        }
        if let Some(c) = bad(base).or_else(|| offset.and_then(bad)) {
            return Err(self.error(line, format!("the key contains the character `{c}`")));
        }
        Ok(match offset {
            None => Key::Plain(base.to_string()),
            Some("") => Key::Append(base.to_string()),
            Some(sub) => Key::Plain(format!("{base}.{sub}")),
        })
    }

    /// The value after `=`: segments up to the end of the line or a `;` comment.
    fn value(&mut self, line: usize) -> Result<IniValue> {
        let mut raw = String::new();
        let mut quoted = false;
        let mut bare_words: Vec<String> = Vec::new();
        let mut segments = 0usize;
        loop {
            self.skip_blanks();
            match self.peek() {
                None | Some('\n') | Some('\r') => break,
                Some(';') => {
                    self.skip_to_eol();
                    break;
                }
                Some(q @ ('"' | '\'')) => {
                    raw.push_str(&self.quoted(q)?);
                    quoted = true;
                }
                Some(_) => {
                    let start = self.pos;
                    while !self.at_eol() && !matches!(self.peek(), Some(';' | '"' | '\'')) {
                        self.pos += 1;
                    }
                    let text: String = self.chars[start..self.pos].iter().collect();
                    let text = text.trim();
                    bare_words.push(text.to_string());
                    raw.push_str(&expand_vars(text));
                }
            }
            segments += 1;
        }
        let constant = if segments > 1 && quoted {
            bare_words.into_iter().find(|w| is_constant_name(w))
        } else {
            None
        };
        Ok(IniValue {
            raw,
            line,
            quoted,
            constant,
        })
    }

    /// A quoted value as PHP reads it: in `"..."` the escapes `\"`, `\\` and `\$` and
    /// `${VAR}` expansion; `'...'` is taken literally. Either may span lines.
    fn quoted(&mut self, quote: char) -> Result<String> {
        let double = quote == '"';
        let open = self.line;
        self.pos += 1;
        let mut text = String::new();
        loop {
            match self.peek() {
                None => {
                    let kind = if double { "double" } else { "single" };
                    return Err(self.error(open, format!("unterminated {kind}-quoted value")));
                }
                Some(c) if c == quote => {
                    self.pos += 1;
                    break;
                }
                Some('\\') if double => {
                    self.pos += 1;
                    match self.peek() {
                        // PHP's special case for Windows paths: `"C:\dir\"` at the end of a
                        // line keeps the backslash and closes the quote.
                        Some('"') if matches!(self.chars.get(self.pos + 1), Some('\n' | '\r')) => {
                            text.push('\\');
                        }
                        Some(c @ ('"' | '\\' | '$')) => {
                            text.push(c);
                            self.pos += 1;
                        }
                        _ => text.push('\\'),
                    }
                }
                Some('$') if double && self.chars.get(self.pos + 1) == Some(&'{') => {
                    let close = self.chars[self.pos..]
                        .iter()
                        .position(|c| matches!(c, '}' | '\n' | '\r' | '"'))
                        .map(|i| self.pos + i)
                        .filter(|&i| self.chars[i] == '}');
                    match close {
                        Some(end) => {
                            let spec: String = self.chars[self.pos..=end].iter().collect();
                            text.push_str(&expand_vars(&spec));
                            self.pos = end + 1;
                        }
                        None => {
                            text.push('$');
                            self.pos += 1;
                        }
                    }
                }
                Some('\n') | Some('\r') => {
                    let start = self.pos;
                    self.eat_newline();
                    text.extend(&self.chars[start..self.pos]);
                }
                Some(c) => {
                    text.push(c);
                    self.pos += 1;
                }
            }
        }
        if self.line != open {
            self.multiline_quote = Some(open);
        }
        Ok(text)
    }
}

enum Key {
    Plain(String),
    /// `name[] = value`
    Append(String),
}

fn unquote_name(name: &str) -> &str {
    for q in ['"', '\''] {
        if name.len() >= 2 && name.starts_with(q) && name.ends_with(q) {
            return &name[1..name.len() - 1];
        }
    }
    name
}

fn is_constant_name(word: &str) -> bool {
    let mut chars = word.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_uppercase() || c == '_')
        && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// Replaces `${NAME}` (and `${NAME:-default}`) with the environment variable, as PHP does for
/// unknown php.ini directives. An unclosed `${` is kept literally.
fn expand_vars(text: &str) -> String {
    if !text.contains("${") {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find('}') {
            Some(end) => {
                let spec = &after[..end];
                let (name, default) = match spec.split_once(":-") {
                    Some((name, default)) => (name, Some(default)),
                    None => (spec, None),
                };
                match std::env::var(name.trim()) {
                    Ok(value) if !value.is_empty() || default.is_none() => out.push_str(&value),
                    _ => out.push_str(default.unwrap_or("")),
                }
                rest = &after[end + 1..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> IniFile {
        IniFile::parse(text, "t.ini").expect("parses")
    }

    fn err(text: &str) -> String {
        IniFile::parse(text, "t.ini")
            .expect_err("must fail")
            .to_string()
    }

    fn get(section: &Section, key: &str) -> String {
        section.get(key).expect(key).text().to_string()
    }

    #[test]
    fn quoting_rules_follow_php() {
        let ini = parse(concat!(
            "[prod]\n",
            "a = \"x \\\"y\\\" \\\\ \\$ \\n C:\\dir\"\n",
            "b = 'raw \\\" ${HOME} ; not a comment'\n",
            "c = bare value ; comment\n",
            "d = \"semi;colon\" ; comment\n",
            "e = APPLICATION_PATH \"/../library\"\n",
            "f =\n",
            "g = \"\"\n",
            "h = true\n",
            "i = \"true\"\n",
            "j = None\n",
            "k = 'multi\nline'\n",
            "l = 0\n",
            "m = a=b\n",
            "n = \"C:\\path\\\"\n",
        ));
        let s = ini.section("prod").unwrap();
        assert_eq!(get(&s, "a"), "x \"y\" \\ $ \\n C:\\dir");
        assert_eq!(get(&s, "b"), "raw \\\" ${HOME} ; not a comment");
        assert_eq!(get(&s, "c"), "bare value");
        assert_eq!(get(&s, "d"), "semi;colon");
        assert_eq!(get(&s, "e"), "APPLICATION_PATH/../library");
        assert_eq!(
            s.get("e").unwrap().constant.as_deref(),
            Some("APPLICATION_PATH")
        );
        assert_eq!(get(&s, "f"), "");
        assert_eq!(get(&s, "g"), "");
        assert_eq!(get(&s, "h"), "1");
        assert_eq!(s.get("h").unwrap().raw, "true");
        assert_eq!(get(&s, "i"), "true");
        assert_eq!(get(&s, "j"), "");
        assert_eq!(get(&s, "k"), "multi\nline");
        assert_eq!(s.get("k").unwrap().line, 12);
        assert_eq!(get(&s, "l"), "0");
        assert_eq!(get(&s, "m"), "a=b");
        assert_eq!(get(&s, "n"), "C:\\path\\");
        assert_eq!(s.get("a").unwrap().constant, None);
    }

    #[test]
    fn env_vars_expand_outside_single_quotes() {
        // PATH is set in any test environment; setting a variable here would race other threads.
        let path = std::env::var("PATH").expect("PATH is set");
        let ini = parse(concat!(
            "[p]\n",
            "a = \"x${PATH}y\"\n",
            "b = ${PATH}\n",
            "c = \"${PCR_INI_TEST_UNSET_VAR}\"\n",
            "d = \"${PCR_INI_TEST_UNSET_VAR:-dflt}\"\n",
            "e = \"\\${PATH}\"\n",
            "f = 'x${PATH}'\n",
        ));
        let s = ini.section("p").unwrap();
        assert_eq!(get(&s, "a"), format!("x{path}y"));
        assert_eq!(get(&s, "b"), path);
        assert_eq!(get(&s, "c"), "");
        assert_eq!(get(&s, "d"), "dflt");
        // `\$` escapes the dollar: no expansion, as in PHP.
        assert_eq!(get(&s, "e"), "${PATH}");
        assert_eq!(get(&s, "f"), "x${PATH}");
    }

    #[test]
    fn inheritance_multiple_levels_and_order_independent() {
        let ini = parse(concat!(
            "[dev : test]\n",
            "c = dev\n",
            "[prod]\n",
            "a = prod\nb = prod\nc = prod\n",
            "[test : prod]\n",
            "b = test\n",
        ));
        let dev = ini.section("dev").unwrap();
        assert_eq!(get(&dev, "a"), "prod");
        assert_eq!(get(&dev, "b"), "test");
        assert_eq!(get(&dev, "c"), "dev");
        assert_eq!(dev.get("a").unwrap().line, 4);
        let prod = ini.section("prod").unwrap();
        assert_eq!(get(&prod, "c"), "prod");
        assert_eq!(ini.section_names(), vec!["dev", "prod", "test"]);
    }

    #[test]
    fn comments_blank_lines_crlf_and_bom() {
        let ini =
            parse("\u{feff}; c\r\n# hash comment\r\n\r\n[p] ; c\r\n  a = 1 ; c\r\nb = \"x\"\r\n");
        let s = ini.section("p").unwrap();
        assert_eq!(get(&s, "a"), "1");
        assert_eq!(get(&s, "b"), "x");
        assert_eq!(s.get("b").unwrap().line, 6);
        assert_eq!(s.line, 4);
    }

    #[test]
    fn array_keys_and_repeated_sections() {
        let ini = parse("[p]\nx[] = a\nx[] = b\ny[k] = c\n[q]\nz = 1\n[p]\nw = 2\nx[] = d\n");
        let s = ini.section("p").unwrap();
        assert_eq!(get(&s, "x.0"), "a");
        assert_eq!(get(&s, "x.1"), "b");
        assert_eq!(get(&s, "x.2"), "d");
        assert_eq!(get(&s, "y.k"), "c");
        assert_eq!(get(&s, "w"), "2");
        assert!(s.get("z").is_none());
        let keys: Vec<&str> = s.with_prefix("x.").map(|(k, _)| k).collect();
        assert_eq!(keys, vec!["x.0", "x.1", "x.2"]);
    }

    #[test]
    fn later_keys_override_earlier() {
        let ini = parse("[p]\na = 1\na = 2\n");
        let s = ini.section("p").unwrap();
        assert_eq!(get(&s, "a"), "2");
        assert_eq!(s.get("a").unwrap().line, 3);
    }

    #[test]
    fn keys_before_any_section_are_ignored() {
        let ini = parse("a = 1\n[p]\nb = 2\n");
        let s = ini.section("p").unwrap();
        assert!(s.get("a").is_none());
    }

    #[test]
    fn malformed_lines_name_file_and_line() {
        assert_eq!(
            err("[p]\na = 1\njust words\n"),
            "email configuration error (t.ini:3): line is not `key = value`, a [section] or a comment"
        );
        assert!(err("[p]\n= 1\n").contains("(t.ini:2)"));
        assert!(err("[p\na = 1\n").contains("(t.ini:1): section header without a closing `]`"));
        assert!(err("[p] x\n").contains("(t.ini:1): unexpected text after the section header"));
        assert!(err("[]\n").contains("(t.ini:1): empty section name"));
        assert!(err("[a : b : c]\n").contains("may extend only one section"));
        assert!(err("[a : a]\n").contains("extends itself"));
        assert!(err("[a : b]\n[b]\n[a : c]\n").contains("(t.ini:3)"));
        assert!(err("[p]\nk(1) = 2\n").contains("(t.ini:2): the key contains the character `(`"));
        assert!(err("[p]\nk[ = 2\n").contains("(t.ini:2)"));
        let unterminated = err("[p]\na = 1\nb = \"abc\nc = 2\n");
        assert!(unterminated.contains("(t.ini:3): unterminated double-quoted value"));
        assert!(err("[p]\nb = 'abc\n").contains("(t.ini:2): unterminated single-quoted value"));
    }

    #[test]
    fn a_runaway_quote_is_hinted_in_later_errors() {
        let e = err("[p]\na = \"abc\nb = \"x\"\nc = 1\n");
        // The first quote closes at line 3; `x` is bare; the last quote never closes.
        assert!(
            e.contains("(t.ini:3): unterminated double-quoted value"),
            "{e}"
        );
        assert!(e.contains("opened at line 2"), "{e}");
    }

    #[test]
    fn errors_never_quote_the_line() {
        let e = err("[p]\nemail.PASSWORD: Sup3rSecret!\n");
        assert!(!e.contains("Sup3rSecret"), "{e}");
        let e = err("[p]\nemail.PASSWORD = \"Sup3rSecret!\n");
        assert!(!e.contains("Sup3rSecret"), "{e}");
    }

    #[test]
    fn section_resolution_errors() {
        let ini = parse("[prod]\na = 1\n[test : staging]\n[x : y]\n[y : z]\n[z : x]\n");
        let e = ini.section("nope").unwrap_err().to_string();
        assert_eq!(
            e,
            "email configuration error (t.ini): environment [nope] is not defined \
             (sections: prod, test, x, y, z)"
        );
        let e = ini.section("test").unwrap_err().to_string();
        assert_eq!(
            e,
            "email configuration error (t.ini:3): section [test] extends [staging], \
             which is not defined"
        );
        let e = ini.section("x").unwrap_err().to_string();
        assert!(e.contains("cycle: x : y : z : x"), "{e}");
        // The broken sections do not stop a healthy one.
        assert_eq!(get(&ini.section("prod").unwrap(), "a"), "1");
    }

    #[test]
    fn section_error_points_at_key_or_header() {
        let ini = parse("[p]\n\na = x\n");
        let s = ini.section("p").unwrap();
        assert_eq!(
            s.error("a", "bad").to_string(),
            "email configuration error (t.ini:3, key a): bad"
        );
        assert_eq!(
            s.error("b", "missing").to_string(),
            "email configuration error (t.ini:1, key b): missing"
        );
    }

    #[test]
    fn debug_of_a_value_hides_it() {
        let ini = parse("[p]\npw = \"hunter2-secret\"\n");
        let s = ini.section("p").unwrap();
        let dbg = format!("{s:?} {ini:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
    }

    #[test]
    fn unreadable_and_non_utf8_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.ini");
        let e = IniFile::load(&missing).unwrap_err().to_string();
        assert!(
            e.contains("missing.ini") && e.contains("cannot read"),
            "{e}"
        );
        let latin1 = dir.path().join("latin1.ini");
        std::fs::write(&latin1, b"[p]\na = 1\nb = \"caf\xe9\"\n").unwrap();
        let e = IniFile::load(&latin1).unwrap_err().to_string();
        assert!(e.contains("latin1.ini:3") && e.contains("UTF-8"), "{e}");
    }
}

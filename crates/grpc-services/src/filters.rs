//! containerd's filter expressions (its `filters` package), as `List` receives them.
//!
//! A request carries zero or more filter strings; an item is listed when it matches
//! **any** of them (no strings, or an empty string, matches everything). One string
//! is a comma-separated list of selectors that must **all** match:
//!
//! ```text
//! selectors := selector ("," selector)*
//! selector  := fieldpath (operator value)?
//! fieldpath := field ("." field)*
//! field     := quoted | [A-Za-z0-9_-]+
//! operator  := "==" | "!=" | "~="
//! value     := quoted | [^\s,]+        (not starting with one of `/ | " , . = ! ~`)
//! quoted    := a Go-style string literal delimited by `"`, `/` or `|`
//! ```
//!
//! A selector without operator tests that the field is present. `~=` is an
//! unanchored regular expression search. Whitespace is allowed before a field, an
//! operator or a value, and nowhere else: containerd's scanner only skips it when it
//! reads a token, not when it peeks for `,` or `.` (so `name==a ` is an error there,
//! and here).
//!
//! The fields of a snapshot are containerd's (`metadata/snapshot.go` adaptor): `name`,
//! `parent`, `kind` (`view`, `active`, `committed`) and `labels.<key>` — a label key
//! containing `.` or `/` is written quoted or as further path components:
//! `labels."containerd.io/gc.root"`, `labels.foo.bar` (= key `foo.bar`).
//!
//! One deliberate difference: containerd compiles a `~=` pattern when matching and
//! treats an invalid one as "no match"; here it is compiled while parsing, so a bad
//! pattern is an InvalidArgument the caller sees instead of a silently empty list.

use std::borrow::Cow;

use regex::Regex;
use snapshotter::{Info, Kind};

/// A filter string that is not valid containerd filter syntax.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("filters: parse error: [{input}] at byte {pos}: {msg}")]
pub struct ParseError {
    /// The whole filter string.
    pub input: String,
    /// Byte offset of the offending token.
    pub pos: usize,
    /// What was wrong.
    pub msg: String,
}

/// How a selector compares the field's value.
#[derive(Debug, Clone)]
enum Operator {
    /// The field is present (no operator in the expression).
    Present,
    /// `==`: present and equal.
    Equal(String),
    /// `!=`: not equal (an absent field counts as the empty string).
    NotEqual(String),
    /// `~=`: the pattern matches somewhere in the value (absent = empty string).
    Matches(Regex),
}

/// One `<fieldpath><op><value>` term.
#[derive(Debug, Clone)]
struct Selector {
    fieldpath: Vec<String>,
    operator: Operator,
}

impl Selector {
    fn matches<'v>(&self, field: &dyn Fn(&[String]) -> Option<Cow<'v, str>>) -> bool {
        let found = field(&self.fieldpath);
        // containerd's adaptors answer ("", false) for an absent field, and `!=`/`~=`
        // compare that empty string: keep that, it decides what `labels.x!=y` lists.
        let value = found.as_deref().unwrap_or("");
        match &self.operator {
            Operator::Present => found.is_some(),
            Operator::Equal(want) => found.is_some() && value == want,
            Operator::NotEqual(want) => value != want,
            Operator::Matches(re) => re.is_match(value),
        }
    }
}

/// A parsed list of filter strings: matches when any of them matches.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// One entry per filter string, each a conjunction of selectors. `None` when
    /// there is nothing to filter on (no strings, or one of them empty).
    any: Option<Vec<Vec<Selector>>>,
}

impl Filter {
    /// Parses the filter strings of a request (OR-ed). No strings match everything.
    pub fn parse_all<S: AsRef<str>>(filters: &[S]) -> Result<Filter, ParseError> {
        let mut any = Vec::with_capacity(filters.len());
        let mut always = filters.is_empty();
        for f in filters {
            match parse(f.as_ref())? {
                Some(all) => any.push(all),
                // Still parse the rest: a malformed sibling is an error either way.
                None => always = true,
            }
        }
        Ok(Filter {
            any: (!always).then_some(any),
        })
    }

    /// Parses one filter string (its selectors AND-ed).
    pub fn parse(filter: &str) -> Result<Filter, ParseError> {
        Filter::parse_all(&[filter])
    }

    /// Whether the filter lets everything through.
    pub fn is_always(&self) -> bool {
        self.any.is_none()
    }

    /// Matches against any object, given its field lookup: `field(path)` answers the
    /// value at `path`, or `None` when the object has no such field.
    pub fn matches_fields<'v>(&self, field: &dyn Fn(&[String]) -> Option<Cow<'v, str>>) -> bool {
        match &self.any {
            None => true,
            Some(any) => any.iter().any(|all| all.iter().all(|s| s.matches(field))),
        }
    }

    /// Matches a snapshot's info, with the fields containerd defines for snapshots.
    pub fn matches(&self, info: &Info) -> bool {
        self.matches_fields(&|path| snapshot_field(info, path))
    }
}

/// containerd's snapshot adaptor: only the first component picks the field, except
/// for labels, whose key is the rest of the path joined with `.`.
fn snapshot_field<'a>(info: &'a Info, path: &[String]) -> Option<Cow<'a, str>> {
    let (first, rest) = path.split_first()?;
    match first.as_str() {
        "name" => Some(Cow::Borrowed(&info.name)),
        "parent" => Some(Cow::Borrowed(&info.parent)),
        "kind" => Some(Cow::Borrowed(match info.kind {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        })),
        "labels" => info.labels.get(&rest.join(".")).map(|v| Cow::Borrowed(v.as_str())),
        _ => None,
    }
}

/// Parses one filter string; `None` for the empty string, which matches everything.
fn parse(input: &str) -> Result<Option<Vec<Selector>>, ParseError> {
    if input.is_empty() {
        return Ok(None);
    }
    let mut p = Parser {
        s: Scanner {
            input,
            pos: 0,
            value: false,
        },
    };
    p.selectors().map(Some)
}

/// Tokens, as containerd's scanner produces them.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token<'a> {
    Eof,
    /// A NUL, or a quoted string that is not terminated.
    Illegal,
    /// The raw text including its delimiters.
    Quoted(&'a str),
    /// A bare value (only right after an operator).
    Value(&'a str),
    /// A bare field name.
    Field(&'a str),
    /// `,` or `.`.
    Separator(char),
    /// A run of `=`, `!`, `~`.
    Operator(&'a str),
    /// Anything else.
    Other(char),
}

struct Scanner<'a> {
    input: &'a str,
    /// Byte offset of the next character.
    pos: usize,
    /// The next bare word is a value (we just read an operator).
    value: bool,
}

fn is_field_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

fn is_operator_char(c: char) -> bool {
    matches!(c, '=' | '!' | '~')
}

fn is_quote_char(c: char) -> bool {
    matches!(c, '/' | '|' | '"')
}

fn is_value_char(c: char) -> bool {
    // Go: not ',' nor space, and a letter, digit, graphic or punctuation rune.
    c != ',' && !c.is_whitespace() && !c.is_control()
}

impl<'a> Scanner<'a> {
    /// The next character without consuming it (no whitespace skipping).
    fn peek(&self) -> Option<char> {
        self.input[self.pos..].chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn eat_while(&mut self, f: impl Fn(char) -> bool) {
        while self.peek().is_some_and(&f) {
            self.bump();
        }
    }

    /// The next token and its start offset, skipping whitespace before it.
    fn scan(&mut self) -> (usize, Token<'a>) {
        loop {
            let start = self.pos;
            let Some(c) = self.bump() else {
                return (start, Token::Eof);
            };
            let text = |s: &Self| &s.input[start..s.pos];
            if c == '\0' {
                return (start, Token::Illegal);
            }
            if is_quote_char(c) {
                return if self.scan_quoted(c) {
                    (start, Token::Quoted(text(self)))
                } else {
                    (start, Token::Illegal)
                };
            }
            if c == ',' || c == '.' {
                self.value = false;
                return (start, Token::Separator(c));
            }
            if is_operator_char(c) {
                self.eat_while(is_operator_char);
                self.value = true;
                return (start, Token::Operator(text(self)));
            }
            if c.is_whitespace() {
                continue;
            }
            if self.value {
                self.eat_while(is_value_char);
                self.value = false;
                return (start, Token::Value(text(self)));
            }
            if is_field_char(c) {
                self.eat_while(is_field_char);
                return (start, Token::Field(text(self)));
            }
            return (start, Token::Other(c));
        }
    }

    /// Consumes a quoted string up to its closing `quote`; false when the line or
    /// input ends first. Escapes are validated later, by `unquote`.
    fn scan_quoted(&mut self, quote: char) -> bool {
        loop {
            match self.bump() {
                None | Some('\n') => return false,
                Some('\\') => match self.bump() {
                    None | Some('\n') => return false,
                    Some(_) => {}
                },
                Some(c) if c == quote => return true,
                Some(_) => {}
            }
        }
    }
}

struct Parser<'a> {
    s: Scanner<'a>,
}

impl<'a> Parser<'a> {
    fn err(&self, pos: usize, msg: impl Into<String>) -> ParseError {
        ParseError {
            input: self.s.input.to_string(),
            pos,
            msg: msg.into(),
        }
    }

    fn selectors(&mut self) -> Result<Vec<Selector>, ParseError> {
        let mut all = vec![self.selector()?];
        loop {
            match self.s.peek() {
                None => return Ok(all),
                Some(',') => {
                    self.s.scan();
                    all.push(self.selector()?);
                }
                Some(c) => return Err(self.err(self.s.pos, format!("unexpected input: {c:?}"))),
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, ParseError> {
        let fieldpath = self.fieldpath()?;
        if matches!(self.s.peek(), None | Some(',')) {
            return Ok(Selector {
                fieldpath,
                operator: Operator::Present,
            });
        }
        let (op_pos, op) = self.operator()?;
        let value = self.value()?;
        let operator = match op {
            "==" => Operator::Equal(value),
            "!=" => Operator::NotEqual(value),
            _ => Operator::Matches(
                Regex::new(&value).map_err(|e| self.err(op_pos, format!("invalid regular expression: {e}")))?,
            ),
        };
        Ok(Selector { fieldpath, operator })
    }

    fn fieldpath(&mut self) -> Result<Vec<String>, ParseError> {
        let mut path = vec![self.field()?];
        while self.s.peek() == Some('.') {
            self.s.scan();
            path.push(self.field()?);
        }
        Ok(path)
    }

    fn field(&mut self) -> Result<String, ParseError> {
        match self.s.scan() {
            (_, Token::Field(f)) => Ok(f.to_string()),
            (pos, Token::Quoted(q)) => self.unquote(pos, q),
            (pos, _) => Err(self.err(pos, "expected field or quoted")),
        }
    }

    fn operator(&mut self) -> Result<(usize, &'static str), ParseError> {
        match self.s.scan() {
            (pos, Token::Operator(op)) => match op {
                "==" => Ok((pos, "==")),
                "!=" => Ok((pos, "!=")),
                "~=" => Ok((pos, "~=")),
                _ => Err(self.err(pos, format!("unsupported operator {op:?}"))),
            },
            (pos, _) => Err(self.err(pos, r#"expected an operator ("=="|"!="|"~=")"#)),
        }
    }

    fn value(&mut self) -> Result<String, ParseError> {
        match self.s.scan() {
            (_, Token::Value(v) | Token::Field(v)) => Ok(v.to_string()),
            (pos, Token::Quoted(q)) => self.unquote(pos, q),
            (pos, Token::Eof) => Err(self.err(pos, "unexpected end of input, expected value")),
            (pos, _) => Err(self.err(pos, "expected value or quoted")),
        }
    }

    fn unquote(&self, pos: usize, quoted: &str) -> Result<String, ParseError> {
        unquote(quoted).map_err(|msg| self.err(pos, format!("unquoting failed: {msg}")))
    }
}

/// Decodes a quoted token (delimiters included) the way containerd's `unquote` does:
/// Go string escapes, with `/` and `|` working like `"` so that regular expressions
/// can be written `/.../`. Note that, as in containerd, an escape Go does not know
/// (`\d`, `\.`) is an error: a regex needs `\\d` even between slashes.
fn unquote(quoted: &str) -> Result<String, &'static str> {
    let quote = quoted.chars().next().ok_or("quote syntax error")?;
    let body = quoted
        .strip_prefix(quote)
        .and_then(|s| s.strip_suffix(quote))
        .ok_or("quote syntax error")?;
    // `\x` and octal escapes produce single bytes, so decode into bytes and check
    // that the result is UTF-8 (labels and names are proto strings, always UTF-8).
    let mut out = Vec::with_capacity(body.len());
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        if c == quote || c == '\n' {
            return Err("quote syntax error");
        }
        if c != '\\' {
            let mut buf = [0; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        let e = chars.next().ok_or("quote syntax error")?;
        let simple = match e {
            'a' => Some(0x07),
            'b' => Some(0x08),
            'f' => Some(0x0c),
            'n' => Some(b'\n'),
            'r' => Some(b'\r'),
            't' => Some(b'\t'),
            'v' => Some(0x0b),
            '\\' => Some(b'\\'),
            '\'' | '"' | '|' | '/' if e == quote => Some(e as u8),
            _ => None,
        };
        if let Some(b) = simple {
            out.push(b);
            continue;
        }
        match e {
            'x' | 'u' | 'U' => {
                let n = match e {
                    'x' => 2,
                    'u' => 4,
                    _ => 8,
                };
                let mut v: u32 = 0;
                for _ in 0..n {
                    let d = chars.next().and_then(|d| d.to_digit(16)).ok_or("quote syntax error")?;
                    v = v << 4 | d;
                }
                if e == 'x' {
                    out.push(v as u8);
                } else {
                    let c = char::from_u32(v).ok_or("quote syntax error")?;
                    let mut buf = [0; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
            '0'..='7' => {
                let mut v = e as u32 - '0' as u32;
                for _ in 0..2 {
                    let d = chars.next().and_then(|d| d.to_digit(8)).ok_or("quote syntax error")?;
                    v = v << 3 | d;
                }
                out.push(u8::try_from(v).map_err(|_| "quote syntax error")?);
            }
            _ => return Err("quote syntax error"),
        }
    }
    String::from_utf8(out).map_err(|_| "not valid UTF-8")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::SystemTime;

    use super::*;

    fn info(name: &str, parent: &str, kind: Kind, labels: &[(&str, &str)]) -> Info {
        Info {
            name: name.into(),
            parent: parent.into(),
            kind,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            created: SystemTime::UNIX_EPOCH,
            updated: SystemTime::UNIX_EPOCH,
        }
    }

    fn sample() -> Vec<Info> {
        vec![
            info(
                "default/1/base",
                "",
                Kind::Committed,
                &[("containerd.io/gc.root", "2024"), ("team", "a")],
            ),
            info("default/2/work", "default/1/base", Kind::Active, &[("team", "b")]),
            info("default/3/look", "default/1/base", Kind::View, &[]),
            info("other/4/x", "", Kind::Active, &[("foo.bar", "baz"), ("empty", "")]),
        ]
    }

    /// Names of the sample snapshots the filters select.
    fn select(filters: &[&str]) -> Vec<String> {
        let f = Filter::parse_all(filters).unwrap_or_else(|e| panic!("{filters:?}: {e}"));
        sample().into_iter().filter(|i| f.matches(i)).map(|i| i.name).collect()
    }

    fn selectors(s: &str) -> Vec<(Vec<String>, String)> {
        parse(s)
            .unwrap()
            .unwrap()
            .into_iter()
            .map(|sel| {
                let op = match sel.operator {
                    Operator::Present => "?".to_string(),
                    Operator::Equal(v) => format!("=={v}"),
                    Operator::NotEqual(v) => format!("!={v}"),
                    Operator::Matches(re) => format!("~={}", re.as_str()),
                };
                (sel.fieldpath, op)
            })
            .collect()
    }

    fn sel(path: &[&str], op: &str) -> (Vec<String>, String) {
        (path.iter().map(|s| s.to_string()).collect(), op.to_string())
    }

    #[test]
    fn parses_the_grammar() {
        assert_eq!(selectors("name"), vec![sel(&["name"], "?")]);
        assert_eq!(selectors("name==foo"), vec![sel(&["name"], "==foo")]);
        assert_eq!(selectors("name!=foo"), vec![sel(&["name"], "!=foo")]);
        assert_eq!(selectors("name~=^fo+$"), vec![sel(&["name"], "~=^fo+$")]);
        assert_eq!(
            selectors("kind==committed,labels.team==a,parent"),
            vec![
                sel(&["kind"], "==committed"),
                sel(&["labels", "team"], "==a"),
                sel(&["parent"], "?")
            ]
        );
        // Quoted field components, quoted values, and whitespace before tokens.
        assert_eq!(
            selectors(r#"  labels."containerd.io/gc.root" == "a b,c""#),
            vec![sel(&["labels", "containerd.io/gc.root"], "==a b,c")]
        );
        // Bare values keep `.`, `/`, `:`, `=` after their first character.
        assert_eq!(
            selectors("name==default/1/sha256:ab.cd=x"),
            vec![sel(&["name"], "==default/1/sha256:ab.cd=x")]
        );
        // Regexes between slashes or pipes; the delimiter itself escaped.
        assert_eq!(selectors(r"name~=/^a\/b|c$/"), vec![sel(&["name"], "~=^a/b|c$")]);
        assert_eq!(selectors(r"name~=|^a/b\|c$|"), vec![sel(&["name"], "~=^a/b|c$")]);
        assert_eq!(selectors(r#"name~=/\\d+/"#), vec![sel(&["name"], r"~=\d+")]);
        // Go escapes.
        assert_eq!(
            selectors(r#"name=="a\tb\x41\u00e9\101\"""#),
            vec![sel(&["name"], "==a\tbAéA\"")]
        );
        // Field names may start with digits, '-' or '_', like containerd's scanner.
        assert_eq!(selectors("labels.1-a_b"), vec![sel(&["labels", "1-a_b"], "?")]);
        // A value may also be a bare word that looks like a field.
        assert_eq!(selectors("kind==view"), vec![sel(&["kind"], "==view")]);
        // Empty quoted value.
        assert_eq!(selectors(r#"labels.empty=="""#), vec![sel(&["labels", "empty"], "==")]);
    }

    #[test]
    fn rejects_what_containerd_rejects() {
        for bad in [
            ",",
            "name,",
            ",name",
            "name==",
            "name=",
            "name===x",
            "name=~x",
            "name==x ",
            "name ",
            "name ,kind",
            "name==x,,kind",
            "labels.",
            "labels..a",
            ".name",
            "labels.containerd.io/gc.root",
            "name==/unterminated",
            "name==\"unterminated",
            "name==\"new\nline\"",
            r#"name=="\q""#,
            r#"name~=/\d/"#,
            r#"name=="\x4""#,
            r#"name=="\400""#,
            r#"name=="\xff""#,
            "name==.x",
            "name==,x",
            "@name",
            "name@x",
            "name==a b",
            "name~=(",
            "name==\0",
            "\"name",
        ] {
            let err = parse(bad).err();
            assert!(err.is_some(), "{bad:?} should not parse");
        }
        let err = Filter::parse_all(&["name==a", "name=="]).unwrap_err();
        assert_eq!(err.input, "name==");
        assert!(err.to_string().starts_with("filters: parse error: [name==]"), "{err}");
    }

    #[test]
    fn empty_means_everything() {
        assert!(Filter::parse_all::<&str>(&[]).unwrap().is_always());
        assert!(Filter::parse("").unwrap().is_always());
        // One empty alternative makes the whole OR true...
        assert!(Filter::parse_all(&["name==nothing", ""]).unwrap().is_always());
        // ...but the other strings must still be valid.
        assert!(Filter::parse_all(&["", "name=="]).is_err());
        assert_eq!(select(&[]).len(), 4);
    }

    #[test]
    fn matches_snapshot_fields() {
        assert_eq!(select(&["name==default/2/work"]), ["default/2/work"]);
        assert_eq!(select(&["kind==committed"]), ["default/1/base"]);
        assert_eq!(select(&["kind==active"]), ["default/2/work", "other/4/x"]);
        assert_eq!(select(&["kind==view"]), ["default/3/look"]);
        assert_eq!(select(&["kind!=active"]), ["default/1/base", "default/3/look"]);
        assert_eq!(
            select(&["parent==default/1/base"]),
            ["default/2/work", "default/3/look"]
        );
        // `parent` is always present (empty for none), as in containerd.
        assert_eq!(select(&["parent"]).len(), 4);
        assert_eq!(select(&[r#"parent=="""#]), ["default/1/base", "other/4/x"]);
        // Regex search is unanchored.
        assert_eq!(select(&["name~=^default/"]).len(), 3);
        assert_eq!(select(&["name~=t"]).len(), 4);
        assert_eq!(select(&["name~=/[0-9]\\/(b|w)/"]), ["default/1/base", "default/2/work"]);
        // Unknown fields are absent.
        assert!(select(&["id"]).is_empty());
        assert!(select(&["id==x"]).is_empty());
        assert_eq!(select(&["id!=x"]).len(), 4);
    }

    #[test]
    fn matches_labels() {
        assert_eq!(select(&[r#"labels."containerd.io/gc.root""#]), ["default/1/base"]);
        assert_eq!(select(&[r#"labels."containerd.io/gc.root"==2024"#]), ["default/1/base"]);
        assert_eq!(select(&["labels.team==b"]), ["default/2/work"]);
        // A key with dots may also be spelled as further path components.
        assert_eq!(select(&["labels.foo.bar==baz"]), ["other/4/x"]);
        assert_eq!(select(&[r#"labels."foo.bar"==baz"#]), ["other/4/x"]);
        // Present means the key exists, even with an empty value.
        assert_eq!(select(&["labels.empty"]), ["other/4/x"]);
        assert_eq!(select(&[r#"labels.empty=="""#]), ["other/4/x"]);
        // `!=` and `~=` see an absent label as "".
        assert_eq!(
            select(&["labels.team!=a"]),
            ["default/2/work", "default/3/look", "other/4/x"]
        );
        assert_eq!(select(&["labels.team~=^$"]), ["default/3/look", "other/4/x"]);
        assert!(select(&["labels"]).is_empty());
    }

    #[test]
    fn and_within_or_across() {
        assert_eq!(select(&["kind==active,labels.team==b"]), ["default/2/work"]);
        assert!(select(&["kind==view,labels.team==b"]).is_empty());
        assert_eq!(
            select(&["kind==view", "labels.team==b"]),
            ["default/2/work", "default/3/look"]
        );
        assert_eq!(
            select(&["kind==committed,name~=base", "name==other/4/x,labels.foo.bar"]),
            ["default/1/base", "other/4/x"]
        );
    }

    #[test]
    fn error_positions() {
        let err = parse("name==a,kind~=(").unwrap_err();
        assert_eq!(err.pos, 12);
        let err = parse("name==a x").unwrap_err();
        assert_eq!(err.pos, 7);
        let err = parse("name @").unwrap_err();
        assert_eq!(err.pos, 5);
    }
}

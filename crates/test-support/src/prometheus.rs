//! A parser of the Prometheus text exposition format (0.0.4, and the sample lines
//! of OpenMetrics), so tests compare values by metric name and labels instead of
//! searching the text for a line they expect.

use std::collections::BTreeMap;

/// One sample line: `name{label="value",...} value [timestamp]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's name (with `_total`, `_bucket`, `_sum` ... as written).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// A parsed scrape.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    /// Every sample, in order.
    pub samples: Vec<Sample>,
    /// `# TYPE` of each metric family, by family name.
    pub types: BTreeMap<String, String>,
}

impl Exposition {
    /// Parses a whole exposition; any malformed line is an error naming it.
    pub fn parse(text: &str) -> Result<Exposition, String> {
        let mut e = Exposition::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.split_whitespace();
                if words.next() == Some("TYPE") {
                    let (Some(name), Some(kind)) = (words.next(), words.next()) else {
                        return Err(format!("line {}: malformed TYPE: {line:?}", n + 1));
                    };
                    e.types.insert(name.to_string(), kind.to_string());
                }
                continue;
            }
            let s = parse_sample(line).map_err(|why| format!("line {}: {why}: {line:?}", n + 1))?;
            e.samples.push(s);
        }
        Ok(e)
    }

    /// The value of the sample `name` whose labels are exactly `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    /// The sum of the samples `name` that carry at least `labels` (0 when none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// The samples `name` that carry at least `labels`.
    pub fn matching<'a>(&'a self, name: &'a str, labels: &'a [(&'a str, &'a str)]) -> impl Iterator<Item = &'a Sample> {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }
}

fn is_name_char(c: char, first: bool) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':' || (!first && c.is_ascii_digit())
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let end = line
        .char_indices()
        .find(|&(i, c)| !is_name_char(c, i == 0))
        .map_or(line.len(), |(i, _)| i);
    if end == 0 {
        return Err("no metric name".into());
    }
    let name = line[..end].to_string();
    let mut rest = &line[end..];
    let mut labels = BTreeMap::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = parse_labels(r, &mut labels)?;
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or("no value")?;
    let value = parse_value(value).ok_or_else(|| format!("bad value {value:?}"))?;
    if let Some(ts) = fields.next() {
        ts.parse::<f64>().map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing fields".into());
    }
    if !rest.starts_with([' ', '\t']) {
        return Err("no space before the value".into());
    }
    Ok(Sample { name, labels, value })
}

/// Parses `k="v",...}` (after the `{`); returns what follows the `}`.
fn parse_labels<'a>(mut s: &'a str, labels: &mut BTreeMap<String, String>) -> Result<&'a str, String> {
    loop {
        s = s.trim_start();
        if let Some(r) = s.strip_prefix('}') {
            return Ok(r);
        }
        let end = s
            .char_indices()
            .find(|&(i, c)| !is_name_char(c, i == 0) || c == ':')
            .map_or(s.len(), |(i, _)| i);
        if end == 0 {
            return Err("bad label name".into());
        }
        let key = s[..end].to_string();
        s = s[end..]
            .trim_start()
            .strip_prefix('=')
            .ok_or("no = after a label name")?;
        s = s.trim_start().strip_prefix('"').ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let close = loop {
            match chars.next().ok_or("unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().ok_or("unterminated escape")?.1 {
                    'n' => value.push('\n'),
                    c @ ('\\' | '"') => value.push(c),
                    c => return Err(format!("bad escape \\{c}")),
                },
                (_, c) => value.push(c),
            }
        };
        if labels.insert(key.clone(), value).is_some() {
            return Err(format!("label {key} twice"));
        }
        s = s[close + 1..].trim_start();
        if let Some(r) = s.strip_prefix(',') {
            s = r;
        } else if !s.starts_with('}') {
            return Err("expected , or } after a label".into());
        }
    }
}

fn parse_value(v: &str) -> Option<f64> {
    match v {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => v.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_labels_values_and_types() {
        let text = "# HELP a_total Things.\n# TYPE a_total counter\na_total 3\n\
                    b_seconds_bucket{le=\"0.5\",method=\"Apply\"} 2\nb_seconds_bucket{le=\"+Inf\",method=\"Apply\"} 4\n\
                    c{path=\"a\\\"b\\\\c\\nd\", x=\"\",} 1.5e3 1700000000\nd +Inf\n# EOF\n";
        let e = Exposition::parse(text).unwrap();
        assert_eq!(e.types["a_total"], "counter");
        assert_eq!(e.get("a_total", &[]), Some(3.0));
        assert_eq!(
            e.get("b_seconds_bucket", &[("le", "+Inf"), ("method", "Apply")]),
            Some(4.0)
        );
        assert_eq!(e.get("b_seconds_bucket", &[("le", "+Inf")]), None);
        assert_eq!(e.sum("b_seconds_bucket", &[("method", "Apply")]), 6.0);
        assert_eq!(e.get("c", &[("path", "a\"b\\c\nd"), ("x", "")]), Some(1500.0));
        assert_eq!(e.get("d", &[]), Some(f64::INFINITY));
        assert_eq!(e.sum("missing", &[]), 0.0);
    }

    #[test]
    fn refuses_malformed_lines() {
        for bad in [
            "a{b=\"c\" 1",
            "a{b=c} 1",
            "a 1 2 3",
            "a one",
            "{a=\"b\"} 1",
            "a{b=\"c\"}1",
            "a",
        ] {
            assert!(Exposition::parse(bad).is_err(), "{bad:?} parsed");
        }
    }
}

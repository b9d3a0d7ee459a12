//! Static labels (`--label KEY=VALUE`), added to every session metric.

/// Labels the observer sets itself; a static label must not shadow them.
pub const RESERVED: &[&str] = &["direction", "protocol", "le", "quantile"];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaticLabel {
    pub key: String,
    pub value: String,
}

/// Parses one `--label` argument. Errors say what was wrong and what is right.
pub fn parse_label(arg: &str) -> Result<StaticLabel, String> {
    let Some((key, value)) = arg.split_once('=') else {
        return Err(format!("`{arg}` is not KEY=VALUE (for example --label region=eu-west)"));
    };
    if !is_label_name(key) {
        return Err(format!(
            "label name `{key}` is not valid: use letters, digits and underscores, not starting with a digit (Prometheus label names match [a-zA-Z_][a-zA-Z0-9_]*)"
        ));
    }
    if key.starts_with("__") {
        return Err(format!("label name `{key}` starts with `__`, which Prometheus reserves"));
    }
    if RESERVED.contains(&key) {
        return Err(format!(
            "label name `{key}` is set by the observer itself; choose another name (reserved: {})",
            RESERVED.join(", ")
        ));
    }
    if value.is_empty() {
        return Err(format!("label `{key}` has an empty value; Prometheus treats an empty value as no label"));
    }
    Ok(StaticLabel { key: key.to_owned(), value: value.to_owned() })
}

/// Checks a whole set: no key twice.
pub fn validate_set(labels: &[StaticLabel]) -> Result<(), String> {
    for (i, l) in labels.iter().enumerate() {
        if labels[..i].iter().any(|o| o.key == l.key) {
            return Err(format!("--label `{}` is given more than once", l.key));
        }
    }
    Ok(())
}

/// A static label must not take the name of an enabled session label.
pub fn validate_against(labels: &[StaticLabel], session_labels: &[&str]) -> Result<(), String> {
    match labels.iter().find(|l| session_labels.contains(&l.key.as_str())) {
        Some(l) => Err(format!(
            "--label `{}` has the name of a session label turned on with --session-label; rename the static label",
            l.key
        )),
        None => Ok(()),
    }
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_pairs_and_values_with_equals() {
        assert_eq!(
            parse_label("region=eu-west").unwrap(),
            StaticLabel { key: "region".into(), value: "eu-west".into() }
        );
        // Only the first `=` separates; values may hold anything else.
        assert_eq!(parse_label("q=a=b").unwrap().value, "a=b");
        assert_eq!(parse_label("_track=stable 1").unwrap().key, "_track");
    }

    #[test]
    fn refuses_malformed_names_and_values() {
        assert!(parse_label("region").unwrap_err().contains("not KEY=VALUE"));
        assert!(parse_label("=x").unwrap_err().contains("not valid"));
        assert!(parse_label("1abc=x").unwrap_err().contains("not valid"));
        assert!(parse_label("a-b=x").unwrap_err().contains("not valid"));
        assert!(parse_label("__x=y").unwrap_err().contains("reserves"));
        assert!(parse_label("direction=up").unwrap_err().contains("set by the observer"));
        assert!(parse_label("region=").unwrap_err().contains("empty value"));
    }

    #[test]
    fn refuses_duplicate_keys() {
        let set = vec![parse_label("a=1").unwrap(), parse_label("a=2").unwrap()];
        assert!(validate_set(&set).unwrap_err().contains("more than once"));
        assert!(validate_set(&set[..1]).is_ok());
        assert!(validate_against(&set[..1], &["comm", "a"]).unwrap_err().contains("session label"));
        assert!(validate_against(&set[..1], &["comm"]).is_ok());
    }
}

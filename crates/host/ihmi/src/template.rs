//! `{{KEY}}` substitution for the checked-in Bochs config (`bochs/bochsrc.template`).
//!
//! Deliberately tiny: no escaping, no conditionals. Every placeholder must have a value, so a typo in
//! the template fails loudly instead of reaching Bochs as a literal `{{MGES}}`.

use thiserror::Error;

/// Why a template could not be rendered.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TemplateError {
    /// The template names a key the caller gave no value for.
    #[error("line {line}: unknown placeholder {{{{{key}}}}} (known: {known})")]
    Unknown {
        key: String,
        line: usize,
        known: String,
    },
    /// `{{` with no `}}` after it on the same line.
    #[error("line {line}: `{{{{` without a closing `}}}}`")]
    Unclosed { line: usize },
}

/// Replaces every `{{KEY}}` in `template` with its value from `vars`.
pub fn render(template: &str, vars: &[(&str, &str)]) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len());
    for (index, line) in template.split_inclusive('\n').enumerate() {
        let line_no = index + 1;
        let mut rest = line;
        while let Some(open) = rest.find("{{") {
            out.push_str(&rest[..open]);
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .ok_or(TemplateError::Unclosed { line: line_no })?;
            let key = after[..close].trim();
            let value = vars
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| *v)
                .ok_or_else(|| TemplateError::Unknown {
                    key: key.to_string(),
                    line: line_no,
                    known: vars.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", "),
                })?;
            out.push_str(value);
            rest = &after[close + 2..];
        }
        out.push_str(rest);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_every_placeholder() {
        let out = render(
            "megs: {{MEGS}}\ncpu: model={{CPU}}, x={{ CPU }}\n",
            &[("MEGS", "256"), ("CPU", "tigerlake")],
        )
        .unwrap();
        assert_eq!(out, "megs: 256\ncpu: model=tigerlake, x=tigerlake\n");
    }

    #[test]
    fn text_without_placeholders_is_unchanged() {
        let text = "a: b\n# {not one}\nlast line without newline";
        assert_eq!(render(text, &[]).unwrap(), text);
    }

    #[test]
    fn unknown_placeholder_is_an_error() {
        let err = render("megs: 1\nx: {{NOPE}}\n", &[("MEGS", "1")]).unwrap_err();
        assert_eq!(
            err,
            TemplateError::Unknown {
                key: "NOPE".into(),
                line: 2,
                known: "MEGS".into()
            }
        );
        assert!(err.to_string().contains("{{NOPE}}"), "{err}");
    }

    #[test]
    fn unclosed_placeholder_is_an_error() {
        assert_eq!(
            render("x: {{MEGS\n}}", &[("MEGS", "1")]),
            Err(TemplateError::Unclosed { line: 1 })
        );
    }

    #[test]
    fn values_are_not_rescanned() {
        let out = render("{{A}}", &[("A", "{{B}}")]).unwrap();
        assert_eq!(out, "{{B}}");
    }
}

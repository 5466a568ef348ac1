//! Errors and warnings of the config path. Each one names the file, the
//! object and the field, says what is wrong and, for errors, what would be
//! valid: the operator should be able to fix the YAML from the message alone.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// One reason a config is rejected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line, set when no object can be named (YAML syntax errors,
    /// documents without `kind`).
    pub line: Option<usize>,
    /// `"VirtualService prod/checkout-service-vs"`.
    pub object: Option<String>,
    /// `"spec.http[1].route[0].weight"`.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
    /// What would be valid.
    pub valid: Option<String>,
}

/// Every error of one load, in file order. A config with any error changes
/// nothing on the node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConfigErrors(pub Vec<ConfigError>);

/// Something the node will do that the operator may not expect (an object
/// ignored, a pod skipped, a fallback route). Never rejects the config.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct ConfigWarning {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub object: Option<String>,
    pub field: Option<String>,
    pub message: String,
}

// === impl ConfigError ===

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_location(f, &self.file, self.line, &self.object, &self.field)?;
        f.write_str(&self.message)?;
        if let Some(valid) = &self.valid {
            write!(f, " (valid: {valid})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

// === impl ConfigErrors ===

impl ConfigErrors {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

// === impl ConfigWarning ===

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_location(f, &self.file, self.line, &self.object, &self.field)?;
        f.write_str(&self.message)
    }
}

fn write_location(
    f: &mut fmt::Formatter<'_>,
    file: &Path,
    line: Option<usize>,
    object: &Option<String>,
    field: &Option<String>,
) -> fmt::Result {
    write!(f, "{}", file.display())?;
    if let Some(line) = line {
        write!(f, ":{line}")?;
    }
    f.write_str(": ")?;
    if let Some(object) = object {
        write!(f, "{object}: ")?;
    }
    if let Some(field) = field {
        write!(f, "{field}: ")?;
    }
    Ok(())
}

// === Collecting diagnostics ===

/// Where a diagnostic points: a file, and the object in it when known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Origin {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub object: Option<String>,
}

/// Errors and warnings gathered over a whole load, so that the operator sees
/// every problem at once instead of one per attempt.
#[derive(Debug, Default)]
pub(crate) struct Diagnostics {
    pub errors: Vec<ConfigError>,
    pub warnings: Vec<ConfigWarning>,
    /// The warnings already recorded (a config of 10,000 services can
    /// carry as many warnings: a linear search each would be quadratic).
    seen: HashSet<ConfigWarning>,
}

impl Diagnostics {
    /// Records an error. An empty `field` or `valid` means "none".
    pub fn error(
        &mut self,
        at: &Origin,
        field: &str,
        message: impl Into<String>,
        valid: impl Into<String>,
    ) {
        let valid = valid.into();
        self.errors.push(ConfigError {
            file: at.file.clone(),
            line: at.line,
            object: at.object.clone(),
            field: non_empty(field),
            message: message.into(),
            valid: (!valid.is_empty()).then_some(valid),
        });
    }

    /// Records a warning. An empty `field` means "none".
    pub fn warn(&mut self, at: &Origin, field: &str, message: impl Into<String>) {
        let warning = ConfigWarning {
            file: at.file.clone(),
            line: at.line,
            object: at.object.clone(),
            field: non_empty(field),
            message: message.into(),
        };
        // The same fact is often found once per port or per route.
        if self.seen.insert(warning.clone()) {
            self.warnings.push(warning);
        }
    }
}

/// Drops repeated warnings, keeping the first of each in order.
pub fn dedup_warnings(warnings: &mut Vec<ConfigWarning>) {
    let mut seen = HashSet::with_capacity(warnings.len());
    warnings.retain(|w| seen.insert(w.clone()));
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_warnings_are_dropped_and_the_order_kept() {
        let w = |m: &str| ConfigWarning {
            file: "a.yaml".into(),
            line: Some(1),
            object: None,
            field: None,
            message: m.into(),
        };
        let mut ws = vec![w("b"), w("a"), w("b"), w("c"), w("a")];
        dedup_warnings(&mut ws);
        let messages: Vec<&str> = ws.iter().map(|w| w.message.as_str()).collect();
        assert_eq!(messages, ["b", "a", "c"]);
        let mut d = Diagnostics::default();
        let at = Origin {
            file: "a.yaml".into(),
            line: Some(1),
            object: None,
        };
        d.warn(&at, "f", "same");
        d.warn(&at, "f", "same");
        d.warn(&at, "g", "same");
        assert_eq!(d.warnings.len(), 2);
    }

    #[test]
    fn display_names_file_object_field_and_valid() {
        let e = ConfigError {
            file: "deploy/x.yaml".into(),
            line: None,
            object: Some("VirtualService prod/checkout-service-vs".into()),
            field: Some("spec.http[1].route[1].weight".into()),
            message: "weight -5 is negative".into(),
            valid: Some("an integer >= 0; weights are normalised by their sum".into()),
        };
        assert_eq!(
            e.to_string(),
            "deploy/x.yaml: VirtualService prod/checkout-service-vs: spec.http[1].route[1].weight: \
             weight -5 is negative (valid: an integer >= 0; weights are normalised by their sum)"
        );
        let syntax = ConfigError {
            file: "a.yaml".into(),
            line: Some(4),
            object: None,
            field: None,
            message: "invalid YAML".into(),
            valid: None,
        };
        assert_eq!(syntax.to_string(), "a.yaml:4: invalid YAML");
        let all = ConfigErrors(vec![e, syntax]);
        assert_eq!(all.to_string().lines().count(), 2);
    }
}

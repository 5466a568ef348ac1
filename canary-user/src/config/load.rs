//! Files → YAML documents → typed objects. Every document is parsed on its
//! own, so one broken document does not hide the errors of the others.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_yaml::Value;

use super::error::{ConfigError, ConfigErrors, Diagnostics, Origin};
use super::host;
use super::istio::{API_VERSIONS, DestinationRuleObject, VirtualServiceObject};
use super::kube::{PodObject, ServiceObject};
use super::model::{LoadedConfig, ObjectKind};
use super::validate;

/// Loads a file, or every `*.yaml`/`*.yml` file under a directory
/// (recursively, in sorted path order), then validates the whole set.
/// Returns every error found, not just the first.
///
/// Entries whose name starts with `.` are skipped: a Kubernetes ConfigMap
/// volume holds each file twice (`x.yaml` → `..data/x.yaml`), and reading
/// both would define every object twice.
pub fn load_path(path: &Path) -> Result<LoadedConfig, ConfigErrors> {
    let mut diags = Diagnostics::default();
    let files = discover(path)?;
    let mut texts = Vec::with_capacity(files.len());
    for file in files {
        match fs::read_to_string(&file) {
            Ok(text) => texts.push((file, text)),
            Err(e) => {
                let at = file_origin(&file, None);
                diags.error(&at, "", format!("cannot read file: {e}"), "");
            }
        }
    }
    load(texts, diags)
}

/// Loads YAML texts that did not come from disk (tests, the Kubernetes
/// source); `file` names each text in messages.
pub fn load_documents(texts: &[(PathBuf, String)]) -> Result<LoadedConfig, ConfigErrors> {
    load(texts.to_vec(), Diagnostics::default())
}

/// Loads one YAML text (which may hold several documents).
pub fn load_str(file: impl AsRef<Path>, text: &str) -> Result<LoadedConfig, ConfigErrors> {
    load_documents(&[(file.as_ref().to_path_buf(), text.to_string())])
}

fn load(
    texts: Vec<(PathBuf, String)>,
    mut diags: Diagnostics,
) -> Result<LoadedConfig, ConfigErrors> {
    let mut parsed = ParsedObjects::default();
    for (file, text) in &texts {
        parse_file(file, text, &mut parsed, &mut diags);
    }
    let files = texts.into_iter().map(|(f, _)| f).collect();
    let cfg = validate::validate(parsed, files, &mut diags);
    // Grouped by file, each file's errors in the order found.
    diags.errors.sort_by(|a, b| a.file.cmp(&b.file));
    if diags.errors.is_empty() {
        let mut cfg = cfg;
        cfg.warnings = diags.warnings;
        // What the node will actually do (empty subsets, fallback routes,
        // skipped pods) is only known once the table is compiled.
        cfg.warnings
            .extend(crate::compile::compile_with_warnings(&cfg).1);
        super::dedup_warnings(&mut cfg.warnings);
        Ok(cfg)
    } else {
        Err(ConfigErrors(diags.errors))
    }
}

/// One typed object and where its document starts.
#[derive(Debug)]
pub(crate) struct Parsed<T> {
    pub file: PathBuf,
    pub line: usize,
    pub object: T,
}

/// Everything that parsed, plus the hosts of Services and DestinationRules
/// that did not (so that validation does not pile "missing service" errors
/// on top of the parse error that explains them).
#[derive(Debug, Default)]
pub(crate) struct ParsedObjects {
    pub services: Vec<Parsed<ServiceObject>>,
    pub pods: Vec<Parsed<PodObject>>,
    pub destination_rules: Vec<Parsed<DestinationRuleObject>>,
    pub virtual_services: Vec<Parsed<VirtualServiceObject>>,
    pub broken_services: BTreeSet<String>,
    pub broken_destination_rules: BTreeSet<String>,
}

fn file_origin(file: &Path, line: Option<usize>) -> Origin {
    Origin {
        file: file.to_path_buf(),
        line,
        object: None,
    }
}

fn discover(path: &Path) -> Result<Vec<PathBuf>, ConfigErrors> {
    let error = |message: String, valid: &str| {
        ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            line: None,
            object: None,
            field: None,
            message,
            valid: (!valid.is_empty()).then(|| valid.to_string()),
        }])
    };
    let meta = fs::metadata(path).map_err(|e| error(format!("cannot read: {e}"), ""))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    let mut seen_dirs = BTreeSet::new();
    walk(path, &mut files, &mut seen_dirs).map_err(|e| error(format!("cannot read: {e}"), ""))?;
    files.sort();
    if files.is_empty() {
        return Err(error(
            "directory holds no YAML files".into(),
            "a directory with *.yaml or *.yml files, or a single YAML file",
        ));
    }
    Ok(files)
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>, seen: &mut BTreeSet<PathBuf>) -> std::io::Result<()> {
    // Symlinked directories are followed once (no loops).
    if !seen.insert(fs::canonicalize(dir)?) {
        return Ok(());
    }
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        let meta = fs::metadata(&path)?;
        if meta.is_dir() {
            walk(&path, files, seen)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e == "yaml" || e == "yml")
        {
            files.push(path);
        }
    }
    Ok(())
}

/// Splits a YAML stream at `---` and `...` lines. Each document comes back
/// with the line of its first content (for messages) and the number of
/// lines before its text in the file. Documents with nothing but comments
/// are dropped.
///
/// A line starting with `---` or `...` at column 0 cannot be inside a
/// scalar (YAML forbids it), so this split agrees with the parser's.
fn split_documents(text: &str) -> Vec<Document> {
    let is_marker = |line: &str, m: &str| {
        line.strip_prefix(m)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r']))
    };
    let has_content = |line: &str| {
        let t = line.trim();
        !t.is_empty() && !t.starts_with('#') && t != "---"
    };
    let mut docs = Vec::new();
    // The current document's text, the lines before it, and its first
    // content line.
    let mut current = String::new();
    let mut offset = 0;
    let mut first: Option<usize> = None;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let start = is_marker(line, "---");
        if start || is_marker(line, "...") {
            if let Some(first) = first.take() {
                docs.push(Document {
                    first,
                    offset,
                    text: std::mem::take(&mut current),
                });
            }
            current.clear();
            if !start {
                continue;
            }
        }
        if current.is_empty() {
            offset = n - 1;
        }
        // Content may follow a `---` marker on the same line.
        if first.is_none() && has_content(line.strip_prefix("---").unwrap_or(line)) {
            first = Some(n);
        }
        current.push_str(line);
        current.push('\n');
    }
    if let Some(first) = first {
        docs.push(Document {
            first,
            offset,
            text: current,
        });
    }
    docs
}

/// One document of a YAML stream.
struct Document {
    /// The file line of its first content.
    first: usize,
    /// File lines before its text.
    offset: usize,
    text: String,
}

impl Document {
    /// Parses the document. A syntax error is reported at the file's line
    /// numbers: the document is parsed again behind `offset` blank lines,
    /// so that every position in the parser's message is the file's. Only
    /// then: padding every document would make a file of N documents cost
    /// O(N²) (10,000 Services in one file took 13 s).
    fn parse(&self) -> Result<Value, (usize, String)> {
        serde_yaml::from_str(&self.text).map_err(|_| {
            let padded = "\n".repeat(self.offset) + &self.text;
            match serde_yaml::from_str::<Value>(&padded) {
                Err(e) => (
                    e.location().map(|l| l.line()).unwrap_or(self.first),
                    e.to_string(),
                ),
                // Cannot happen (same text); report at the document.
                Ok(_) => (self.first, "invalid YAML".into()),
            }
        })
    }
}

fn parse_file(file: &Path, text: &str, out: &mut ParsedObjects, diags: &mut Diagnostics) {
    for doc in split_documents(text) {
        let line = doc.first;
        let mut value: Value = match doc.parse() {
            Ok(v) => v,
            Err((at_line, e)) => {
                diags.error(
                    &file_origin(file, Some(at_line)),
                    "",
                    format!("invalid YAML: {e}"),
                    "",
                );
                continue;
            }
        };
        if value.is_null() {
            continue; // only comments
        }
        if let Err(e) = value.apply_merge() {
            diags.error(
                &file_origin(file, Some(line)),
                "",
                format!("invalid YAML merge key: {e}"),
                "",
            );
            continue;
        }
        strip_nulls(&mut value);
        parse_object(file, line, value, out, diags);
    }
}

/// Kubernetes treats `field: null` as an absent field; so does canary.
fn strip_nulls(value: &mut Value) {
    match value {
        Value::Mapping(m) => {
            m.retain(|_, v| !v.is_null());
            for (_, v) in m.iter_mut() {
                strip_nulls(v);
            }
        }
        Value::Sequence(s) => s.iter_mut().for_each(strip_nulls),
        Value::Tagged(t) => strip_nulls(&mut t.value),
        _ => {}
    }
}

fn parse_object(
    file: &Path,
    line: usize,
    value: Value,
    out: &mut ParsedObjects,
    diags: &mut Diagnostics,
) {
    let at = file_origin(file, Some(line));
    if !value.is_mapping() {
        diags.error(
            &at,
            "",
            "document is not a Kubernetes object",
            "a mapping with apiVersion, kind and metadata",
        );
        return;
    }
    let str_field = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    let (Some(api_version), Some(kind)) =
        (str_field(&value, "apiVersion"), str_field(&value, "kind"))
    else {
        diags.error(
            &at,
            "",
            "document has no apiVersion or no kind",
            "a Kubernetes object such as `apiVersion: v1` / `kind: Service`",
        );
        return;
    };
    // `kubectl get -o yaml` of several objects gives a List.
    if kind.ends_with("List")
        && let Some(items) = value.get("items").and_then(Value::as_sequence)
    {
        for item in items {
            parse_object(file, line, item.clone(), out, diags);
        }
        return;
    }
    let metadata = value.get("metadata");
    let name = metadata.and_then(|m| str_field(m, "name"));
    let namespace = metadata
        .and_then(|m| str_field(m, "namespace"))
        .unwrap_or_else(|| "default".to_string());
    let object_kind = match (kind.as_str(), api_version.as_str()) {
        ("Service", "v1") => ObjectKind::Service,
        ("Pod", "v1") => ObjectKind::Pod,
        ("DestinationRule", _) => ObjectKind::DestinationRule,
        ("VirtualService", _) => ObjectKind::VirtualService,
        _ => {
            let named = name
                .as_deref()
                .map(|n| format!(" {namespace}/{n}"))
                .unwrap_or_default();
            diags.warn(
                &at,
                "",
                format!("{kind}{named} ({api_version}) is not read by canary; ignored"),
            );
            return;
        }
    };
    let Some(name) = name.filter(|n| !n.is_empty()) else {
        let at = Origin {
            object: Some(format!("{kind} (no name)")),
            ..at
        };
        diags.error(&at, "metadata.name", "missing", "a non-empty object name");
        return;
    };
    let at = Origin {
        file: file.to_path_buf(),
        line: None,
        object: Some(format!("{kind} {namespace}/{name}")),
    };
    if matches!(
        object_kind,
        ObjectKind::DestinationRule | ObjectKind::VirtualService
    ) && !API_VERSIONS.contains(&api_version.as_str())
    {
        diags.error(
            &at,
            "apiVersion",
            format!("{kind} apiVersion {api_version:?} is not supported"),
            API_VERSIONS.join(", "),
        );
        mark_broken(object_kind, &value, &name, &namespace, out);
        return;
    }
    let ok = match object_kind {
        ObjectKind::Service => {
            typed(file, line, value.clone(), &at, diags).map(|o| out.services.push(o))
        }
        ObjectKind::Pod => typed(file, line, value.clone(), &at, diags).map(|o| out.pods.push(o)),
        ObjectKind::DestinationRule => {
            typed(file, line, value.clone(), &at, diags).map(|o| out.destination_rules.push(o))
        }
        ObjectKind::VirtualService => {
            typed(file, line, value.clone(), &at, diags).map(|o| out.virtual_services.push(o))
        }
    };
    if ok.is_none() {
        mark_broken(object_kind, &value, &name, &namespace, out);
    }
}

fn typed<T: DeserializeOwned>(
    file: &Path,
    line: usize,
    value: Value,
    at: &Origin,
    diags: &mut Diagnostics,
) -> Option<Parsed<T>> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(object) => Some(Parsed {
            file: file.to_path_buf(),
            line,
            object,
        }),
        Err(e) => {
            let path = e.path().to_string();
            let field = if path == "." { "" } else { path.as_str() };
            diags.error(at, field, e.inner().to_string(), "");
            None
        }
    }
}

fn mark_broken(
    kind: ObjectKind,
    value: &Value,
    name: &str,
    namespace: &str,
    out: &mut ParsedObjects,
) {
    match kind {
        ObjectKind::Service => {
            out.broken_services.insert(host::fqdn(name, namespace));
        }
        ObjectKind::DestinationRule => {
            let h = value
                .get("spec")
                .and_then(|s| s.get("host"))
                .and_then(Value::as_str)
                .and_then(|h| host::resolve(h, namespace).ok());
            if let Some(h) = h {
                out.broken_destination_rules.insert(h);
            }
        }
        ObjectKind::Pod | ObjectKind::VirtualService => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_keep_their_file_line_numbers() {
        let text = "# header\n---\na: 1\n---\n\nb: 2\n...\n---\n# only a comment\n--- {c: 3}\n";
        let docs = split_documents(text);
        let starts: Vec<usize> = docs.iter().map(|d| d.first).collect();
        assert_eq!(starts, vec![3, 6, 10]);
        let values: Vec<Value> = docs.iter().map(|d| d.parse().expect("parses")).collect();
        assert_eq!(values[1].get("b").and_then(Value::as_u64), Some(2));
        assert_eq!(values[2].get("c").and_then(Value::as_u64), Some(3));
        // A syntax error reports the line in the file, not in the document,
        // in the position and in the parser's own message.
        let bad = "a: 1\n---\nb: [1,\nc: d\n";
        let (line, message) = split_documents(bad)[1].parse().expect_err("broken");
        assert!(line >= 3, "{line}: {message}");
        assert!(
            message.contains(&format!("line {line}")),
            "{line}: {message}"
        );
    }

    #[test]
    fn many_documents_in_one_file_keep_their_lines_and_parse() {
        // 10,000 Services in one file took 13 s when every document was
        // parsed behind its file offset; this takes well under a second.
        let text: String = (0..5000)
            .map(|i| {
                format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: gen}}\n\
                     spec: {{clusterIP: 10.100.{}.{}, ports: [{{port: 80}}]}}\n---\n",
                    i / 250,
                    i % 250 + 1
                )
            })
            .collect();
        let docs = split_documents(&text);
        assert_eq!(docs.len(), 5000);
        assert_eq!(docs[4999].first, 4999 * 5 + 1);
        assert!(docs.iter().all(|d| d.parse().is_ok()));
    }
}

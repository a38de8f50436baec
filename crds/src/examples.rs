//! The example manifests under `deploy/examples/`, for tests (here, and against
//! a real API server in the Kubernetes harness).
//!
//! Conventions, in the leading `#` comment lines of each file:
//! - valid examples (`deploy/examples/*.yaml`) must be accepted as they are;
//! - invalid examples (`deploy/examples/invalid/*.yaml`) carry
//!   `# expect: <substring of the API server's message>`, optionally
//!   `# refused-by: schema` (the OpenAPI schema refuses it; default: a CEL rule),
//!   and `# update-of: <path relative to the file>` when the object is only
//!   invalid as an update of that (valid) object (transition rules).

use std::path::{Path, PathBuf};

/// Which part of the CRD refuses an invalid example.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusedBy {
    /// A CEL rule (`x-kubernetes-validations`): `expect` is a substring of its message.
    Cel,
    /// The OpenAPI schema (type, enum, required…): `expect` is a substring of the
    /// API server's message.
    Schema,
}

/// An example that the API server must refuse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidExample {
    /// The manifest.
    pub path: PathBuf,
    /// A substring of the message the API server refuses it with.
    pub expect: String,
    /// Which part of the CRD refuses it.
    pub refused_by: RefusedBy,
    /// The object this one updates (create that first, then apply this one), if any.
    pub update_of: Option<PathBuf>,
}

/// Why the examples cannot be listed.
#[derive(Debug, thiserror::Error)]
pub enum ExamplesError {
    /// A directory or file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// What was read.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// An invalid example lacks its `# expect:` line, or a header line is malformed.
    #[error("{path}: {problem}")]
    Header {
        /// The example.
        path: PathBuf,
        /// What is wrong with its header.
        problem: String,
    },
}

/// `deploy/examples/` of this source tree.
pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

/// The `.yaml` files of a directory, sorted.
fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>, ExamplesError> {
    let read_error = |source| ExamplesError::Read {
        path: dir.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_error)? {
        let path = entry.map_err(read_error)?.path();
        if path.is_file() && path.extension().is_some_and(|extension| extension == "yaml") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The valid examples (`deploy/examples/*.yaml`).
pub fn valid_examples() -> Result<Vec<PathBuf>, ExamplesError> {
    yaml_files(&examples_dir())
}

/// The invalid examples (`deploy/examples/invalid/*.yaml`) with what must refuse them.
pub fn invalid_examples() -> Result<Vec<InvalidExample>, ExamplesError> {
    yaml_files(&examples_dir().join("invalid"))?
        .into_iter()
        .map(|path| parse_header(&path))
        .collect()
}

/// Reads the `# key: value` header lines of an invalid example.
fn parse_header(path: &Path) -> Result<InvalidExample, ExamplesError> {
    let text = std::fs::read_to_string(path).map_err(|source| ExamplesError::Read {
        path: path.to_owned(),
        source,
    })?;
    let header_error = |problem: String| ExamplesError::Header {
        path: path.to_owned(),
        problem,
    };
    let mut expect = None;
    let mut refused_by = RefusedBy::Cel;
    let mut update_of = None;
    for line in text.lines().take_while(|line| line.starts_with('#')) {
        let Some((key, value)) = line.trim_start_matches('#').trim().split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "expect" => expect = Some(value.to_owned()),
            "refused-by" => {
                refused_by = match value {
                    "schema" => RefusedBy::Schema,
                    "cel" => RefusedBy::Cel,
                    other => {
                        return Err(header_error(format!(
                            "`# refused-by: {other}` is neither `schema` nor `cel`"
                        )));
                    }
                };
            }
            "update-of" => {
                let base = path.parent().unwrap_or_else(|| Path::new("."));
                update_of = Some(base.join(value));
            }
            _ => {}
        }
    }
    let expect = expect.filter(|expect| !expect.is_empty()).ok_or_else(|| {
        header_error("an invalid example needs a `# expect: <message substring>` line at the top".into())
    })?;
    Ok(InvalidExample {
        path: path.to_owned(),
        expect,
        refused_by,
        update_of,
    })
}

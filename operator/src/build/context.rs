//! The build context: `.dockerignore`, `COPY`/`ADD` source globs, and the fingerprint of what a step
//! copies (its cache key).
//!
//! Matching is pure ([`glob_match`], [`Ignore::excluded`]); [`Context::select`] walks the directory.
//! Patterns follow Docker's: `*` and `?` within one path element, `[a-z]` classes, `**` for any number
//! of elements; in `.dockerignore`, `#` comments, `!` exceptions, the last matching line wins, and a
//! pattern that matches a directory excludes what is inside it.

use std::fs;
use std::io::Read as _;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest as _, Sha256};

/// Errors about the context.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// Reading the context failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A source leaves the context.
    #[error("{0:?} points outside the build context: sources are relative to the context directory")]
    Outside(String),
    /// A source matches nothing.
    #[error(
        "{0:?} is not in the build context (or is excluded by .dockerignore): check the path, relative to the context directory"
    )]
    NotFound(String),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ContextError {
    let path = path.to_path_buf();
    move |source| ContextError::Io { what, path, source }
}

pub use walt_crds::dockerignore::{Ignore, clean, glob_match};

/// Whether `text` holds glob metacharacters.
pub fn has_glob(text: &str) -> bool {
    text.contains(['*', '?', '['])
}

/// A build context directory with its `.dockerignore`.
#[derive(Debug, Clone)]
pub struct Context {
    /// The directory.
    pub dir: PathBuf,
    /// Its `.dockerignore` rules.
    pub ignore: Ignore,
}

/// A file, directory or link selected from the context, with where it goes relative to the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selected {
    /// Path in the context (clean, relative).
    pub source: String,
    /// Path below the destination (`""` for a file copied to the destination itself).
    pub relative: String,
}

impl Context {
    /// Opens `dir` and reads its `.dockerignore` (if any).
    pub fn open(dir: &Path) -> Result<Self, ContextError> {
        let meta = fs::metadata(dir).map_err(io("reading the build context", dir))?;
        if !meta.is_dir() {
            return Err(ContextError::Io {
                what: "the build context must be a directory:",
                path: dir.to_path_buf(),
                source: std::io::Error::other("not a directory"),
            });
        }
        let ignore_path = dir.join(".dockerignore");
        let ignore = match fs::read_to_string(&ignore_path) {
            Ok(text) => Ignore::parse(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ignore::default(),
            Err(e) => return Err(io("reading", &ignore_path)(e)),
        };
        Ok(Context {
            dir: dir.to_path_buf(),
            ignore,
        })
    }

    /// The entries `sources` (expanded words) select, in a stable order: for each source, the file or
    /// link itself, or a directory's contents (recursively, `.dockerignore` honoured). Each group is the
    /// entries of one matched source; a source matching nothing is an error.
    pub fn select(&self, sources: &[String]) -> Result<Vec<(String, Vec<Selected>)>, ContextError> {
        let mut groups = Vec::new();
        for source in sources {
            let cleaned = clean(source).ok_or_else(|| ContextError::Outside(source.clone()))?;
            let matches = if has_glob(&cleaned) {
                let mut all = Vec::new();
                self.walk("", &mut |path, _| {
                    if glob_match(&cleaned, path) {
                        all.push(path.to_owned());
                    }
                    true
                })?;
                all
            } else if cleaned.is_empty() {
                vec![String::new()]
            } else if fs::symlink_metadata(self.dir.join(&cleaned)).is_ok() && !self.ignore.excluded(&cleaned)
            {
                vec![cleaned.clone()]
            } else {
                Vec::new()
            };
            if matches.is_empty() {
                return Err(ContextError::NotFound(source.clone()));
            }
            for matched in matches {
                let entries = self.entries_of(&matched)?;
                groups.push((matched, entries));
            }
        }
        Ok(groups)
    }

    /// A matched path's entries: itself, or a directory's contents.
    fn entries_of(&self, matched: &str) -> Result<Vec<Selected>, ContextError> {
        let path = self.dir.join(matched);
        let meta = fs::symlink_metadata(&path).map_err(io("reading", &path))?;
        if !meta.is_dir() {
            return Ok(vec![Selected {
                source: matched.to_owned(),
                relative: String::new(),
            }]);
        }
        let mut entries = Vec::new();
        self.walk(matched, &mut |path, _| {
            let relative = if matched.is_empty() {
                path.to_owned()
            } else {
                path[matched.len() + 1..].to_owned()
            };
            entries.push(Selected {
                source: path.to_owned(),
                relative,
            });
            true
        })?;
        Ok(entries)
    }

    /// Walks `below` (context-relative) depth-first in name order, skipping excluded paths (a
    /// directory's contents are still walked, as an exception may re-include some of them).
    fn walk(
        &self,
        below: &str,
        visit: &mut dyn FnMut(&str, &fs::Metadata) -> bool,
    ) -> Result<(), ContextError> {
        let dir = self.dir.join(below);
        let mut names: Vec<String> = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io("listing", &dir))? {
            let entry = entry.map_err(io("listing", &dir))?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        for name in names {
            let path = if below.is_empty() {
                name
            } else {
                format!("{below}/{name}")
            };
            let full = self.dir.join(&path);
            let meta = fs::symlink_metadata(&full).map_err(io("reading", &full))?;
            if !self.ignore.excluded(&path) {
                visit(&path, &meta);
            }
            if meta.is_dir() {
                self.walk(&path, visit)?;
            }
        }
        Ok(())
    }

    /// A digest of the selected entries: paths, types, modes, sizes, link targets and contents (the
    /// cache key part of a `COPY`/`ADD`; times and owners do not count, as in Docker).
    pub fn fingerprint(&self, groups: &[(String, Vec<Selected>)]) -> Result<String, ContextError> {
        let mut hasher = Sha256::new();
        for (matched, entries) in groups {
            hasher.update(format!("match {matched}\n"));
            for entry in entries {
                let path = self.dir.join(&entry.source);
                let meta = fs::symlink_metadata(&path).map_err(io("reading", &path))?;
                hasher.update(format!(
                    "{}\0{}\0{:o}\0{}\0",
                    entry.source,
                    entry.relative,
                    meta.permissions().mode(),
                    meta.size()
                ));
                if meta.file_type().is_symlink() {
                    let target = fs::read_link(&path).map_err(io("reading link", &path))?;
                    hasher.update(target.as_os_str().as_encoded_bytes());
                } else if meta.is_file() {
                    let mut file = fs::File::open(&path).map_err(io("reading", &path))?;
                    let mut buffer = vec![0u8; 1 << 16];
                    loop {
                        let read = file.read(&mut buffer).map_err(io("reading", &path))?;
                        if read == 0 {
                            break;
                        }
                        hasher.update(&buffer[..read]);
                    }
                }
                hasher.update(b"\n");
            }
        }
        Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
    }
}

/// Joins `path` (absolute inside the image) to `root` following the image's symbolic links without
/// leaving `root`; components that do not exist are appended as they are.
pub fn join_in_root(root: &Path, path: &Path) -> PathBuf {
    let mut pending: Vec<std::ffi::OsString> = path
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut current = PathBuf::new();
    let mut hops = 0;
    while let Some(name) = pending.pop() {
        if name == ".." {
            current.pop();
            continue;
        }
        let candidate = current.join(&name);
        match fs::symlink_metadata(root.join(&candidate)) {
            Ok(meta) if meta.file_type().is_symlink() && hops < 40 => {
                hops += 1;
                let Ok(target) = fs::read_link(root.join(&candidate)) else {
                    current = candidate;
                    continue;
                };
                if target.is_absolute() {
                    current = PathBuf::new();
                }
                pending.extend(target.components().rev().filter_map(|c| match c {
                    Component::Normal(name) => Some(name.to_os_string()),
                    Component::ParentDir => Some("..".into()),
                    _ => None,
                }));
            }
            _ => current = candidate,
        }
    }
    root.join(current)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_like_docker() {
        assert!(glob_match("src/*.c", "src/a.c"));
        assert!(!glob_match("src/*.c", "src/sub/a.c"));
        assert!(!glob_match("*.c", "src/a.c"));
        assert!(glob_match("**/*.c", "src/sub/a.c"));
        assert!(glob_match("**/*.c", "a.c"));
        assert!(glob_match("src/**", "src/a/b"));
        assert!(glob_match("file?.txt", "file1.txt"));
        assert!(!glob_match("file?.txt", "file10.txt"));
        assert!(glob_match("[a-c]x", "bx"));
        assert!(!glob_match("[!a-c]x", "bx"));
        assert!(glob_match("[^a-c]x", "dx"));
        assert!(glob_match("a\\*", "a*"));
        assert!(!glob_match("a\\*", "ab"));
        assert!(glob_match("*", ".hidden"));
    }

    #[test]
    fn clean_paths_stay_in_the_context() {
        assert_eq!(clean("/a/./b/../c/").as_deref(), Some("a/c"));
        assert_eq!(clean(".").as_deref(), Some(""));
        assert_eq!(clean("../x"), None);
        assert_eq!(clean("a/../../x"), None);
    }

    #[test]
    fn dockerignore_last_rule_wins_and_directories_exclude_their_contents() {
        let ignore = Ignore::parse("# comment\n\n*.log\n/build\n!build/keep.txt\n**/secret*\ndocs/\n");
        assert!(ignore.excluded("a.log"));
        assert!(!ignore.excluded("sub/a.log"), "*.log is for the top level only");
        assert!(ignore.excluded("build"));
        assert!(ignore.excluded("build/out.o"));
        assert!(!ignore.excluded("build/keep.txt"));
        assert!(ignore.excluded("x/y/secret.key"));
        assert!(ignore.excluded("docs/readme"));
        assert!(!ignore.excluded("src/main.c"));
    }

    #[test]
    fn selection_fingerprint_and_links_in_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("src/sub")).unwrap();
        fs::write(root.join("src/a.c"), "a").unwrap();
        fs::write(root.join("src/b.c"), "b").unwrap();
        fs::write(root.join("src/sub/c.c"), "c").unwrap();
        fs::write(root.join("src/skip.log"), "x").unwrap();
        fs::write(root.join(".dockerignore"), "src/*.log\n").unwrap();
        let context = Context::open(root).unwrap();
        let groups = context.select(&["src/*.c".into()]).unwrap();
        let matched: Vec<&str> = groups.iter().map(|(m, _)| m.as_str()).collect();
        assert_eq!(matched, ["src/a.c", "src/b.c"]);
        let groups = context.select(&["/src/".into()]).unwrap();
        let relative: Vec<&str> = groups[0].1.iter().map(|s| s.relative.as_str()).collect();
        assert_eq!(relative, ["a.c", "b.c", "sub", "sub/c.c"], "the log is ignored");
        let before = context.fingerprint(&groups).unwrap();
        assert_eq!(before, context.fingerprint(&groups).unwrap());
        fs::write(root.join("src/sub/c.c"), "changed").unwrap();
        assert_ne!(before, context.fingerprint(&groups).unwrap());
        assert!(matches!(
            context.select(&["src/skip.log".into()]),
            Err(ContextError::NotFound(_))
        ));
        assert!(matches!(
            context.select(&["nothing*".into()]),
            Err(ContextError::NotFound(_))
        ));
        assert!(matches!(
            context.select(&["../etc".into()]),
            Err(ContextError::Outside(_))
        ));

        // Links of the image are followed inside its root, never out of it.
        let image = tempfile::tempdir().unwrap();
        let image = image.path();
        fs::create_dir_all(image.join("usr/bin")).unwrap();
        std::os::unix::fs::symlink("usr/bin", image.join("bin")).unwrap();
        std::os::unix::fs::symlink("/usr", image.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../..", image.join("up")).unwrap();
        assert_eq!(join_in_root(image, Path::new("/bin/x")), image.join("usr/bin/x"));
        assert_eq!(join_in_root(image, Path::new("/abs/bin")), image.join("usr/bin"));
        assert_eq!(join_in_root(image, Path::new("/up/etc")), image.join("etc"));
        assert_eq!(join_in_root(image, Path::new("/new/dir")), image.join("new/dir"));
    }
}

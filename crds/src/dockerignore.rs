//! `.dockerignore` and Dockerfile source globs, as Docker matches them (pure): shared by the build
//! (`walt-operator build`, which honours `.dockerignore` when it reads the context) and by
//! `kubectl walt image build` (which leaves excluded files out of the context it uploads).
//!
//! Patterns follow Docker's: `*` and `?` within one path element, `[a-z]` classes, `**` for any number
//! of elements; in `.dockerignore`, `#` comments, `!` exceptions, the last matching line wins, and a
//! pattern that matches a directory excludes what is inside it.

/// Matches `path` (relative, `/`-separated, no `.`/`..`) against `pattern` (same form).
pub fn glob_match(pattern: &str, path: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('/').filter(|p| !p.is_empty()).collect();
    let path: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    match_elements(&pattern, &path)
}

fn match_elements(pattern: &[&str], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((&"**", rest)) => (0..=path.len()).any(|skip| match_elements(rest, &path[skip..])),
        Some((first, rest)) => match path.split_first() {
            Some((element, path_rest)) => match_element(first, element) && match_elements(rest, path_rest),
            None => false,
        },
    }
}

/// One path element against one pattern element (`*`, `?`, `[…]`, `\` escapes).
fn match_element(pattern: &str, text: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let text: Vec<char> = text.chars().collect();
    match_chars(&pattern, &text)
}

fn match_chars(pattern: &[char], text: &[char]) -> bool {
    let Some((&first, rest)) = pattern.split_first() else {
        return text.is_empty();
    };
    match first {
        '*' => (0..=text.len()).any(|skip| match_chars(rest, &text[skip..])),
        '?' => !text.is_empty() && match_chars(rest, &text[1..]),
        '[' => {
            let Some(end) = rest.iter().position(|&c| c == ']') else {
                return text.first() == Some(&'[') && match_chars(rest, &text[1..]);
            };
            let Some(&c) = text.first() else { return false };
            let class = &rest[..end];
            let (negated, class) = match class.split_first() {
                Some(('^' | '!', class)) => (true, class),
                _ => (false, class),
            };
            let mut found = false;
            let mut i = 0;
            while i < class.len() {
                if i + 2 < class.len() && class[i + 1] == '-' {
                    found |= class[i] <= c && c <= class[i + 2];
                    i += 3;
                } else {
                    found |= class[i] == c;
                    i += 1;
                }
            }
            found != negated && match_chars(&rest[end + 1..], &text[1..])
        }
        '\\' => match rest.split_first() {
            Some((&escaped, rest)) => text.first() == Some(&escaped) && match_chars(rest, &text[1..]),
            None => text.first() == Some(&'\\') && text.len() == 1,
        },
        c => text.first() == Some(&c) && match_chars(rest, &text[1..]),
    }
}

/// Cleans a context-relative path: `/` and `.` dropped, `..` applied; `None` when it leaves the context.
pub fn clean(path: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            part => parts.push(part),
        }
    }
    Some(parts.join("/"))
}

/// The rules of a `.dockerignore`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ignore {
    rules: Vec<(String, bool)>,
}

impl Ignore {
    /// Parses `.dockerignore` text.
    pub fn parse(text: &str) -> Self {
        let mut rules = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (negated, pattern) = match line.strip_prefix('!') {
                Some(rest) => (true, rest.trim()),
                None => (false, line),
            };
            let Some(pattern) = clean(pattern) else { continue };
            if pattern.is_empty() {
                continue;
            }
            rules.push((pattern, negated));
        }
        Ignore { rules }
    }

    /// Whether some rule is an exception (`!pattern`): then files inside an excluded directory may
    /// still be included, and a walk must look inside it.
    pub fn has_exceptions(&self) -> bool {
        self.rules.iter().any(|(_, negated)| *negated)
    }

    /// Whether `path` (context-relative, clean) is excluded: the last rule matching it or one of its
    /// parent directories decides.
    pub fn excluded(&self, path: &str) -> bool {
        let mut excluded = false;
        for (pattern, negated) in &self.rules {
            let mut prefix = String::new();
            let mut matched = false;
            for element in path.split('/') {
                if !prefix.is_empty() {
                    prefix.push('/');
                }
                prefix.push_str(element);
                if glob_match(pattern, &prefix) {
                    matched = true;
                    break;
                }
            }
            if matched {
                excluded = !negated;
            }
        }
        excluded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_matching_rule_wins_and_directories_cover_their_contents() {
        let ignore = Ignore::parse("# comment\n\ntarget\n*.log\n!keep.log\n./docs/**/*.tmp\n");
        assert!(ignore.excluded("target"));
        assert!(ignore.excluded("target/debug/x"));
        assert!(ignore.excluded("a.log"));
        assert!(!ignore.excluded("keep.log"));
        assert!(ignore.excluded("docs/a/b/c.tmp"));
        assert!(!ignore.excluded("src/main.rs"));
        assert!(ignore.has_exceptions());
        assert!(!Ignore::parse("target\n").has_exceptions());
        assert_eq!(clean("./a/../b//c"), Some("b/c".into()));
        assert_eq!(clean("../x"), None);
        assert!(glob_match("**/*.c", "a/b/c.c"));
        assert!(!glob_match("*.c", "a/b.c"));
    }
}

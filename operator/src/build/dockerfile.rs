//! Dockerfile parser: pure (no I/O), every error names the line and what to do.
//!
//! [`parse`] turns the text into [`Stage`]s of [`Step`]s. It handles parser directives (`# escape=`),
//! line continuations (with comment and blank lines inside them skipped, as Docker does), comments, the JSON
//! (exec) and shell forms, and checks every instruction's shape and flags up front, so that a build never
//! fails half-way on something it could have refused at once.
//!
//! Words are kept raw (quotes and `$VAR` unprocessed): variables are substituted while building, with the
//! values of `ENV` and `ARG` at that point, by [`expand`] (quote removal and `$VAR`, `${VAR}`,
//! `${VAR:-default}`, `${VAR:+alternative}`, `${VAR-default}`, `${VAR+alternative}`, `${VAR:?message}`),
//! for the instructions where Docker substitutes: `FROM`, `COPY`, `ADD`, `ENV`, `ARG`, `WORKDIR`, `USER`,
//! `LABEL`, `EXPOSE`, `STOPSIGNAL`, `VOLUME`. `RUN`, `CMD` and `ENTRYPOINT` are left to the image's shell.
//!
//! Refused up front: `ONBUILD` (triggers for later builds), heredocs (`RUN <<EOF`), `ADD` of URLs or git
//! repositories (builds reach no network: fetch in the context instead), `RUN --mount/--network/--security`,
//! and unknown instructions or flags.

use std::collections::BTreeMap;
use std::fmt;

/// A Dockerfile that could not be accepted: the line (1-based, the first line of a continued instruction)
/// and what is wrong, with what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Dockerfile line {line}: {message}")]
pub struct ParseError {
    /// The line of the instruction (1-based).
    pub line: usize,
    /// What is wrong and what to do.
    pub message: String,
}

fn error<T>(line: usize, message: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError {
        line,
        message: message.into(),
    })
}

/// A parsed Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    /// `ARG`s before the first `FROM` (usable in `FROM` lines, and in a stage once re-declared).
    pub global_args: Vec<Step>,
    /// The build stages, in order; the last one is the result.
    pub stages: Vec<Stage>,
    /// The escape character (`\` unless `# escape=` says otherwise).
    pub escape: char,
}

/// One `FROM` and the steps that follow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// Line of the `FROM`.
    pub line: usize,
    /// The base image as written (raw; `scratch` for an empty root; may name an earlier stage).
    pub base: String,
    /// `AS name` (lowercased, as Docker compares stage names).
    pub name: Option<String>,
    /// `--platform=…` (raw).
    pub platform: Option<String>,
    /// The steps, in order.
    pub steps: Vec<Step>,
}

/// One instruction with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Line of the instruction (1-based).
    pub line: usize,
    /// The instruction as written, continuations joined (for logs and history).
    pub text: String,
    /// What it does.
    pub instruction: Instruction,
}

/// A command in exec (JSON) or shell form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandForm {
    /// `["prog", "arg"]`: run as is.
    Exec(Vec<String>),
    /// `prog arg`: run through the `SHELL` (default `/bin/sh -c`).
    Shell(String),
}

/// Arguments of `COPY` and `ADD`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CopySpec {
    /// Sources (raw words; globs allowed), relative to the context or to the `--from` stage's root.
    pub sources: Vec<String>,
    /// Destination (raw word).
    pub dest: String,
    /// Whether the words came from the JSON form (no quote processing then, only variables).
    pub json: bool,
    /// `--from=stage|image` (raw).
    pub from: Option<String>,
    /// `--chown=user[:group]` (raw).
    pub chown: Option<String>,
    /// `--chmod=octal` (raw).
    pub chmod: Option<String>,
}

/// `HEALTHCHECK` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Healthcheck {
    /// `HEALTHCHECK NONE`: disable the base image's check.
    None,
    /// `HEALTHCHECK [options] CMD …`.
    Check {
        /// The test command.
        command: CommandForm,
        /// Options as nanoseconds (`interval`, `timeout`, `start-period`, `start-interval`) or a count
        /// (`retries`), by config field name (`Interval`, …).
        options: BTreeMap<String, u64>,
    },
}

/// What a step does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    /// `RUN`: a command in the image (a layer of its changes).
    Run(CommandForm),
    /// `COPY`: files from the context (or a stage) into the image.
    Copy(CopySpec),
    /// `ADD`: like `COPY`, and local tar archives are extracted.
    Add(CopySpec),
    /// `ENV k=v …` (raw words).
    Env(Vec<(String, String)>),
    /// `ARG name[=default]` (default raw).
    Arg {
        /// The name.
        name: String,
        /// The default, when given.
        default: Option<String>,
    },
    /// `WORKDIR path` (raw).
    Workdir(String),
    /// `USER user[:group]` (raw).
    User(String),
    /// `LABEL k=v …` (raw words).
    Label(Vec<(String, String)>),
    /// `CMD`.
    Cmd(CommandForm),
    /// `ENTRYPOINT`.
    Entrypoint(CommandForm),
    /// `SHELL ["prog", "arg"]`.
    Shell(Vec<String>),
    /// `EXPOSE port[/proto] …` (raw words).
    Expose(Vec<String>),
    /// `VOLUME` paths (raw words): recorded in the config only.
    Volume(Vec<String>),
    /// `STOPSIGNAL` (raw).
    StopSignal(String),
    /// `HEALTHCHECK`.
    Healthcheck(Healthcheck),
    /// `MAINTAINER` (deprecated): the config's author.
    Maintainer(String),
}

impl Instruction {
    /// The keyword (`RUN`, `COPY`, …).
    pub fn keyword(&self) -> &'static str {
        match self {
            Instruction::Run(_) => "RUN",
            Instruction::Copy(_) => "COPY",
            Instruction::Add(_) => "ADD",
            Instruction::Env(_) => "ENV",
            Instruction::Arg { .. } => "ARG",
            Instruction::Workdir(_) => "WORKDIR",
            Instruction::User(_) => "USER",
            Instruction::Label(_) => "LABEL",
            Instruction::Cmd(_) => "CMD",
            Instruction::Entrypoint(_) => "ENTRYPOINT",
            Instruction::Shell(_) => "SHELL",
            Instruction::Expose(_) => "EXPOSE",
            Instruction::Volume(_) => "VOLUME",
            Instruction::StopSignal(_) => "STOPSIGNAL",
            Instruction::Healthcheck(_) => "HEALTHCHECK",
            Instruction::Maintainer(_) => "MAINTAINER",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A logical line: continuations joined.
struct Logical {
    line: usize,
    text: String,
}

/// Parses a Dockerfile.
pub fn parse(text: &str) -> Result<Dockerfile, ParseError> {
    let (escape, lines) = logical_lines(text)?;
    let mut global_args = Vec::new();
    let mut stages: Vec<Stage> = Vec::new();
    for logical in lines {
        let (keyword, rest) = split_keyword(&logical.text);
        let upper = keyword.to_ascii_uppercase();
        let line = logical.line;
        if upper == "FROM" {
            stages.push(parse_from(line, rest, escape, &stages)?);
            continue;
        }
        let instruction = parse_instruction(line, &upper, keyword, rest, escape)?;
        let step = Step {
            line,
            text: logical.text.clone(),
            instruction,
        };
        match stages.last_mut() {
            Some(stage) => stage.steps.push(step),
            None if matches!(step.instruction, Instruction::Arg { .. }) => global_args.push(step),
            None => {
                return error(
                    line,
                    format!(
                        "{upper} before the first FROM: only ARG may come before FROM; start with FROM <image>"
                    ),
                );
            }
        }
    }
    if stages.is_empty() {
        return error(
            1,
            "no FROM instruction: a Dockerfile starts with FROM <image> (or FROM scratch)",
        );
    }
    Ok(Dockerfile {
        global_args,
        stages,
        escape,
    })
}

/// Reads the parser directives, then joins continued lines and drops comments and blank lines.
fn logical_lines(text: &str) -> Result<(char, Vec<Logical>), ParseError> {
    let mut escape = '\\';
    let mut directives_open = true;
    let mut seen_directives = Vec::new();
    let mut out = Vec::new();
    let mut current: Option<Logical> = None;
    for (index, raw) in text.lines().enumerate() {
        let number = index + 1;
        let raw = raw.strip_prefix('\u{feff}').unwrap_or(raw);
        if directives_open {
            if let Some((name, value)) = directive(raw) {
                if seen_directives.contains(&name) {
                    return error(
                        number,
                        format!("the parser directive {name} is given twice: keep one"),
                    );
                }
                if name == "escape" {
                    escape = match value.as_str() {
                        "\\" => '\\',
                        "`" => '`',
                        _ => {
                            return error(
                                number,
                                format!("escape={value}: the escape character must be \\ or `"),
                            );
                        }
                    };
                }
                seen_directives.push(name);
                continue;
            }
            directives_open = false;
        }
        let trimmed = raw.trim_start();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_some()) {
            // Comment lines (also inside a continuation) and blank lines within one are skipped.
            continue;
        }
        if trimmed.is_empty() {
            continue;
        }
        let (body, continued) = strip_continuation(raw, escape);
        match current.as_mut() {
            Some(logical) => logical.text.push_str(body),
            None => {
                current = Some(Logical {
                    line: number,
                    text: body.trim_start().to_owned(),
                });
            }
        }
        if !continued && let Some(done) = current.take() {
            out.push(done);
        }
    }
    if let Some(done) = current.take() {
        // A continuation on the last line: Docker accepts it as the end of the instruction.
        out.push(done);
    }
    for logical in &mut out {
        logical.text = logical.text.trim_end().to_owned();
    }
    Ok((escape, out))
}

/// `# name=value` with a known-looking name (directives are lowercased; unknown ones are ignored, as
/// Docker does, but still count as directives).
fn directive(raw: &str) -> Option<(String, String)> {
    let rest = raw.trim().strip_prefix('#')?.trim();
    let (name, value) = rest.split_once('=')?;
    let name = name.trim().to_ascii_lowercase();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return None;
    }
    Some((name, value.trim().to_owned()))
}

/// The line without its trailing escape character, and whether it continues.
fn strip_continuation(raw: &str, escape: char) -> (&str, bool) {
    let end = raw.trim_end();
    match end.strip_suffix(escape) {
        Some(body) => (body, true),
        None => (raw, false),
    }
}

fn split_keyword(text: &str) -> (&str, &str) {
    let text = text.trim();
    match text.find(char::is_whitespace) {
        Some(at) => (&text[..at], text[at..].trim_start()),
        None => (text, ""),
    }
}

fn parse_from(line: usize, rest: &str, escape: char, stages: &[Stage]) -> Result<Stage, ParseError> {
    let (flags, words) = take_flags(line, "FROM", split_words(rest, escape), &["platform"])?;
    let (base, name) = match words.as_slice() {
        [base] => (base.clone(), None),
        [base, as_word, name] if as_word.eq_ignore_ascii_case("as") => {
            (base.clone(), Some(name.to_lowercase()))
        }
        [] => return error(line, "FROM needs an image: FROM <image> [AS <name>]"),
        _ => {
            return error(
                line,
                format!("FROM {rest}: expected FROM [--platform=<p>] <image> [AS <name>]"),
            );
        }
    };
    if let Some(name) = &name {
        let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
        if !valid {
            return error(
                line,
                format!("stage name {name:?}: use letters, digits, '_', '-' and '.', starting with a letter"),
            );
        }
        if stages.iter().any(|s| s.name.as_deref() == Some(name)) {
            return error(
                line,
                format!("stage name {name:?} is used twice: give each stage its own name"),
            );
        }
    }
    Ok(Stage {
        line,
        base,
        name,
        platform: flags.get("platform").cloned(),
        steps: Vec::new(),
    })
}

fn parse_instruction(
    line: usize,
    upper: &str,
    keyword: &str,
    rest: &str,
    escape: char,
) -> Result<Instruction, ParseError> {
    let needs_args = |what: &str| -> Result<(), ParseError> {
        if rest.trim().is_empty() {
            return error(line, format!("{upper} needs {what}"));
        }
        Ok(())
    };
    match upper {
        "RUN" => {
            needs_args("a command: RUN <command> or RUN [\"prog\", \"arg\"]")?;
            let (_, command) = take_leading_flags(line, upper, rest, &[])?;
            refuse_heredoc(line, upper, command)?;
            Ok(Instruction::Run(command_form(command)))
        }
        "CMD" => {
            needs_args("a command: CMD [\"prog\", \"arg\"] or CMD <command>")?;
            Ok(Instruction::Cmd(command_form(rest)))
        }
        "ENTRYPOINT" => {
            needs_args("a command: ENTRYPOINT [\"prog\", \"arg\"] or ENTRYPOINT <command>")?;
            Ok(Instruction::Entrypoint(command_form(rest)))
        }
        "SHELL" => match json_array(rest) {
            Some(words) if !words.is_empty() => Ok(Instruction::Shell(words)),
            _ => error(line, "SHELL takes the JSON form: SHELL [\"/bin/sh\", \"-c\"]"),
        },
        "COPY" | "ADD" => parse_copy(line, upper, rest, escape),
        "ENV" => {
            needs_args("NAME=value pairs")?;
            Ok(Instruction::Env(parse_pairs(line, upper, rest, escape, true)?))
        }
        "LABEL" => {
            needs_args("key=value pairs")?;
            Ok(Instruction::Label(parse_pairs(line, upper, rest, escape, false)?))
        }
        "ARG" => {
            let words = split_words(rest, escape);
            let [word] = words.as_slice() else {
                return error(
                    line,
                    "ARG takes one name: ARG NAME or ARG NAME=default (one ARG per line)",
                );
            };
            let (name, default) = match word.split_once('=') {
                Some((name, default)) => (name.to_owned(), Some(default.to_owned())),
                None => (word.clone(), None),
            };
            check_name(line, upper, &name)?;
            Ok(Instruction::Arg { name, default })
        }
        "WORKDIR" => {
            needs_args("a directory: WORKDIR /path")?;
            Ok(Instruction::Workdir(rest.trim().to_owned()))
        }
        "USER" => {
            needs_args("a user: USER name[:group] or USER uid[:gid]")?;
            let words = split_words(rest, escape);
            if words.len() != 1 {
                return error(line, "USER takes one word: USER name[:group]");
            }
            Ok(Instruction::User(words[0].clone()))
        }
        "EXPOSE" => {
            needs_args("ports: EXPOSE 80 443/tcp")?;
            Ok(Instruction::Expose(split_words(rest, escape)))
        }
        "VOLUME" => {
            needs_args("paths: VOLUME /data or VOLUME [\"/data\"]")?;
            Ok(Instruction::Volume(
                json_array(rest).unwrap_or_else(|| split_words(rest, escape)),
            ))
        }
        "STOPSIGNAL" => {
            needs_args("a signal: STOPSIGNAL SIGTERM")?;
            Ok(Instruction::StopSignal(rest.trim().to_owned()))
        }
        "MAINTAINER" => {
            needs_args("a name")?;
            Ok(Instruction::Maintainer(rest.trim().to_owned()))
        }
        "HEALTHCHECK" => parse_healthcheck(line, rest),
        "ONBUILD" => error(
            line,
            "ONBUILD is not supported (walt builds do not record triggers for later builds): \
             put the instructions in the Dockerfiles that build on this image",
        ),
        "FROM" => unreachable_from(line),
        _ => error(
            line,
            format!(
                "unknown instruction {keyword:?}: use FROM, RUN, COPY, ADD, ENV, ARG, WORKDIR, USER, LABEL, \
                 CMD, ENTRYPOINT, SHELL, EXPOSE, VOLUME, STOPSIGNAL, HEALTHCHECK (a line continued with the \
                 escape character joins the next line)"
            ),
        ),
    }
}

fn unreachable_from(line: usize) -> Result<Instruction, ParseError> {
    error(line, "FROM is handled before instructions")
}

fn check_name(line: usize, upper: &str, name: &str) -> Result<(), ParseError> {
    let valid = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        error(
            line,
            format!("{upper} name {name:?}: use letters, digits and '_', not starting with a digit"),
        )
    }
}

fn refuse_heredoc(line: usize, upper: &str, args: &str) -> Result<(), ParseError> {
    let heredoc = args.split_whitespace().any(|word| {
        word.strip_prefix("<<")
            .map(|rest| rest.trim_start_matches('-').trim_start_matches(['"', '\'']))
            .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_'))
    });
    if heredoc {
        return error(
            line,
            format!(
                "{upper} with a heredoc (<<WORD) is not supported: put the text in a file of the context \
                 and COPY it, or use printf/echo in the RUN"
            ),
        );
    }
    Ok(())
}

/// The exec form when `args` is a JSON array of strings, else the shell form.
fn command_form(args: &str) -> CommandForm {
    match json_array(args) {
        Some(words) => CommandForm::Exec(words),
        None => CommandForm::Shell(args.trim().to_owned()),
    }
}

/// `args` as a JSON array of strings, if it is one.
fn json_array(args: &str) -> Option<Vec<String>> {
    let trimmed = args.trim();
    if !trimmed.starts_with('[') {
        return None;
    }
    serde_json::from_str::<Vec<String>>(trimmed).ok()
}

/// `--name=value` flags at the start of an instruction's raw arguments; returns them and the rest.
fn take_leading_flags<'a>(
    line: usize,
    upper: &str,
    rest: &'a str,
    allowed: &[&str],
) -> Result<(BTreeMap<String, String>, &'a str), ParseError> {
    let mut flags = BTreeMap::new();
    let mut rest = rest.trim_start();
    while let Some(flag) = rest.strip_prefix("--") {
        let end = flag.find(char::is_whitespace).unwrap_or(flag.len());
        let word = &flag[..end];
        let (name, value) = flag_name_value(line, upper, word, allowed)?;
        flags.insert(name, value);
        rest = flag[end..].trim_start();
    }
    Ok((flags, rest))
}

fn flag_name_value(
    line: usize,
    upper: &str,
    word: &str,
    allowed: &[&str],
) -> Result<(String, String), ParseError> {
    let (name, value) = word.split_once('=').unwrap_or((word, ""));
    if !allowed.contains(&name) {
        let hint = match (upper, name) {
            ("RUN", "mount" | "network" | "security") => {
                " (build-time mounts, network modes and security modes are not supported: RUN steps run \
                 with the build pod's network and no extra mounts)"
            }
            ("ADD", "checksum" | "keep-git-dir") => " (ADD fetches nothing from the network in walt builds)",
            ("COPY" | "ADD", "link" | "parents" | "exclude") => {
                " (supported: --from, --chown, --chmod; COPY --link is not needed, every step is its own layer)"
            }
            _ => "",
        };
        let list = if allowed.is_empty() {
            "none".to_owned()
        } else {
            allowed
                .iter()
                .map(|a| format!("--{a}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return error(
            line,
            format!("{upper} --{name} is not supported{hint}; flags {upper} accepts: {list}"),
        );
    }
    if value.is_empty() {
        return error(line, format!("{upper} --{name} needs a value: --{name}=<value>"));
    }
    Ok((name.to_owned(), value.to_owned()))
}

/// Leading `--flag=value` words of `words`: checked against `allowed`, returned with the other words.
fn take_flags(
    line: usize,
    upper: &str,
    words: Vec<String>,
    allowed: &[&str],
) -> Result<(BTreeMap<String, String>, Vec<String>), ParseError> {
    let mut flags = BTreeMap::new();
    let mut rest = Vec::new();
    let mut in_flags = true;
    for word in words {
        match word.strip_prefix("--") {
            Some(flag) if in_flags => {
                let (name, value) = flag_name_value(line, upper, flag, allowed)?;
                if flags.insert(name.clone(), value).is_some() {
                    return error(line, format!("{upper} --{name} is given twice: keep one"));
                }
            }
            _ => {
                in_flags = false;
                rest.push(word);
            }
        }
    }
    Ok((flags, rest))
}

fn parse_copy(line: usize, upper: &str, rest: &str, escape: char) -> Result<Instruction, ParseError> {
    let allowed: &[&str] = if upper == "COPY" {
        &["from", "chown", "chmod"]
    } else {
        &["chown", "chmod"]
    };
    let (flags, args) = take_leading_flags(line, upper, rest, allowed)?;
    refuse_heredoc(line, upper, args)?;
    let (words, json) = match json_array(args) {
        Some(words) => (words, true),
        None => (split_words(args, escape), false),
    };
    if words.len() < 2 {
        return error(
            line,
            format!("{upper} needs at least a source and a destination: {upper} <src>... <dest>"),
        );
    }
    if let Some(chmod) = flags.get("chmod")
        && (u32::from_str_radix(chmod, 8).is_err() || chmod.len() > 4)
    {
        return error(
            line,
            format!("{upper} --chmod={chmod}: give an octal mode such as 0644 or 755"),
        );
    }
    let (dest, sources) = words.split_last().map_or_else(
        || (String::new(), Vec::new()),
        |(dest, sources)| (dest.clone(), sources.to_vec()),
    );
    if upper == "ADD" {
        for source in &sources {
            let lower = source.to_ascii_lowercase();
            if lower.starts_with("http://") || lower.starts_with("https://") || lower.starts_with("git@") {
                return error(
                    line,
                    format!(
                        "ADD {source}: remote sources are not supported (walt builds reach no network): \
                         put the file in the build context and ADD or COPY it from there"
                    ),
                );
            }
        }
    }
    let spec = CopySpec {
        sources,
        dest,
        json,
        from: flags.get("from").cloned(),
        chown: flags.get("chown").cloned(),
        chmod: flags.get("chmod").cloned(),
    };
    Ok(if upper == "COPY" {
        Instruction::Copy(spec)
    } else {
        Instruction::Add(spec)
    })
}

/// `k=v k2="v 2"` pairs (raw). For `ENV`, the legacy `ENV key value with spaces` form too.
fn parse_pairs(
    line: usize,
    upper: &str,
    rest: &str,
    escape: char,
    legacy: bool,
) -> Result<Vec<(String, String)>, ParseError> {
    let words = split_words(rest, escape);
    let first_has_equal = words.first().is_some_and(|w| w.contains('='));
    if !first_has_equal {
        if legacy {
            // `ENV KEY value…`: the rest of the line, raw, is the value.
            let (key, value) = split_keyword(rest);
            if value.is_empty() {
                return error(
                    line,
                    format!("{upper} {key}: give a value: {upper} {key}=<value>"),
                );
            }
            check_name(line, upper, key)?;
            return Ok(vec![(key.to_owned(), value.to_owned())]);
        }
        return error(
            line,
            format!("{upper} needs key=value pairs: {upper} key=value [key2=value2 …]"),
        );
    }
    let mut pairs = Vec::new();
    for word in words {
        let Some((key, value)) = word.split_once('=') else {
            return error(
                line,
                format!("{upper}: {word:?} is not key=value (quote values that hold spaces: key=\"a b\")"),
            );
        };
        if key.is_empty() {
            return error(line, format!("{upper}: {word:?} has an empty key"));
        }
        if legacy {
            check_name(line, upper, key)?;
        }
        pairs.push((key.to_owned(), value.to_owned()));
    }
    Ok(pairs)
}

fn parse_healthcheck(line: usize, rest: &str) -> Result<Instruction, ParseError> {
    if rest.trim().eq_ignore_ascii_case("none") {
        return Ok(Instruction::Healthcheck(Healthcheck::None));
    }
    let (flags, command) = take_leading_flags(
        line,
        "HEALTHCHECK",
        rest,
        &["interval", "timeout", "start-period", "start-interval", "retries"],
    )?;
    let (keyword, command) = split_keyword(command);
    if !keyword.eq_ignore_ascii_case("cmd") || command.is_empty() {
        return error(line, "HEALTHCHECK takes NONE or [options] CMD <command>");
    }
    let mut options = BTreeMap::new();
    for (name, value) in &flags {
        let (field, number) = if name == "retries" {
            let count = value.parse::<u64>().ok();
            ("Retries", count)
        } else {
            let field = match name.as_str() {
                "interval" => "Interval",
                "timeout" => "Timeout",
                "start-period" => "StartPeriod",
                _ => "StartInterval",
            };
            (field, parse_duration(value))
        };
        let Some(number) = number else {
            return error(
                line,
                format!(
                    "HEALTHCHECK --{name}={value}: give a duration such as 30s or 1m30s (retries: a count)"
                ),
            );
        };
        options.insert(field.to_owned(), number);
    }
    Ok(Instruction::Healthcheck(Healthcheck::Check {
        command: command_form(command),
        options,
    }))
}

/// A Go-style duration (`30s`, `1m30s`, `500ms`, `2h`) in nanoseconds.
fn parse_duration(text: &str) -> Option<u64> {
    let mut total: u64 = 0;
    let mut rest = text;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let value: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let factor: u64 = match &rest[..unit_len] {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return None,
        };
        total = total.checked_add(value.checked_mul(factor)?)?;
        rest = &rest[unit_len..];
    }
    Some(total)
}

/// Splits on unquoted whitespace, keeping quotes and escapes in the words (for [`expand`]).
pub fn split_words(text: &str, escape: char) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut quote: Option<char> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == escape && quote != Some('\'') {
            current.push(c);
            if let Some(next) = chars.next() {
                current.push(next);
            }
            continue;
        }
        match quote {
            Some(q) if c == q => {
                quote = None;
                current.push(c);
            }
            None if c == '"' || c == '\'' => {
                quote = Some(c);
                current.push(c);
            }
            None if c.is_whitespace() => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            _ => current.push(c),
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

/// A variable substitution that cannot be done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpandError {
    /// `${VAR:?message}` with VAR unset or empty.
    #[error("{name}: {message}")]
    Required {
        /// The variable.
        name: String,
        /// Its message.
        message: String,
    },
    /// A `${` without its `}`, or an operator walt does not know.
    #[error("bad substitution {0:?}: use $NAME, ${{NAME}}, ${{NAME:-default}} or ${{NAME:+alternative}}")]
    Bad(String),
    /// An unterminated quote.
    #[error("unterminated quote in {0:?}")]
    Quote(String),
}

/// Removes quotes and escapes from `word` and substitutes variables from `lookup`, as Docker does for
/// instructions other than `RUN`, `CMD` and `ENTRYPOINT`. With `json` set (words of the JSON form), quotes
/// are literal and only variables are substituted.
pub fn expand(
    word: &str,
    escape: char,
    json: bool,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ExpandError> {
    let chars: Vec<char> = word.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    let mut quote: Option<char> = None;
    while i < chars.len() {
        let c = chars[i];
        if c == escape && quote != Some('\'') && !json {
            if let Some(&next) = chars.get(i + 1) {
                // In double quotes, the escape only escapes the escape, a quote and $.
                if quote == Some('"') && !matches!(next, '"' | '$') && next != escape {
                    out.push(c);
                }
                out.push(next);
                i += 2;
            } else {
                out.push(c);
                i += 1;
            }
            continue;
        }
        if !json {
            match (quote, c) {
                (None, '"' | '\'') => {
                    quote = Some(c);
                    i += 1;
                    continue;
                }
                (Some(q), _) if c == q => {
                    quote = None;
                    i += 1;
                    continue;
                }
                _ => {}
            }
        }
        if c == '$' && quote != Some('\'') {
            let (value, used) = substitute(&chars[i..], word, escape, lookup)?;
            out.push_str(&value);
            i += used;
            continue;
        }
        out.push(c);
        i += 1;
    }
    if quote.is_some() {
        return Err(ExpandError::Quote(word.to_owned()));
    }
    Ok(out)
}

/// Substitutes the variable at the start of `chars` (which starts with `$`): its value and the number of
/// characters used.
fn substitute(
    chars: &[char],
    word: &str,
    escape: char,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<(String, usize), ExpandError> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    match chars.get(1) {
        Some('{') => {
            let mut depth = 0;
            let mut end = None;
            for (index, &c) in chars.iter().enumerate().skip(1) {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = Some(index);
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let end = end.ok_or_else(|| ExpandError::Bad(word.to_owned()))?;
            let inner: String = chars[2..end].iter().collect();
            let name_len = inner.find(|c: char| !is_name(c)).unwrap_or(inner.len());
            let (name, operation) = inner.split_at(name_len);
            if name.is_empty() {
                return Err(ExpandError::Bad(word.to_owned()));
            }
            let value = lookup(name);
            let expand_word = |text: &str| expand(text, escape, false, lookup);
            let result = if operation.is_empty() {
                value.unwrap_or_default()
            } else {
                // The operator is one character, or `:` and one: counted in characters (a byte
                // count split a multi-byte character after `${NAME`: found by fuzzing).
                let op_chars = if operation.starts_with(':') { 2 } else { 1 };
                let op_len = operation.chars().take(op_chars).map(char::len_utf8).sum();
                let (op, argument) = operation.split_at(op_len);
                let set = value.is_some();
                let non_empty = value.as_deref().is_some_and(|v| !v.is_empty());
                match op {
                    ":-" => {
                        if non_empty {
                            value.unwrap_or_default()
                        } else {
                            expand_word(argument)?
                        }
                    }
                    "-" => {
                        if set {
                            value.unwrap_or_default()
                        } else {
                            expand_word(argument)?
                        }
                    }
                    ":+" => {
                        if non_empty {
                            expand_word(argument)?
                        } else {
                            String::new()
                        }
                    }
                    "+" => {
                        if set {
                            expand_word(argument)?
                        } else {
                            String::new()
                        }
                    }
                    ":?" | "?" => {
                        let ok = if op == ":?" { non_empty } else { set };
                        if ok {
                            value.unwrap_or_default()
                        } else {
                            return Err(ExpandError::Required {
                                name: name.to_owned(),
                                message: if argument.is_empty() {
                                    "is not set".to_owned()
                                } else {
                                    expand_word(argument)?
                                },
                            });
                        }
                    }
                    _ => return Err(ExpandError::Bad(format!("${{{inner}}}"))),
                }
            };
            Ok((result, end + 1))
        }
        Some(&c) if is_name(c) => {
            let len = chars[1..].iter().take_while(|&&c| is_name(c)).count();
            let name: String = chars[1..=len].iter().collect();
            Ok((lookup(&name).unwrap_or_default(), len + 1))
        }
        _ => Ok(("$".to_owned(), 1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        move |name| map.get(name).cloned()
    }

    fn one_stage(text: &str) -> Vec<Instruction> {
        let parsed = parse(text).unwrap();
        assert_eq!(parsed.stages.len(), 1);
        parsed.stages[0]
            .steps
            .iter()
            .map(|s| s.instruction.clone())
            .collect()
    }

    fn refused(text: &str) -> ParseError {
        parse(text).expect_err("refused")
    }

    #[test]
    fn every_supported_instruction() {
        let text = r#"
# a comment
ARG BASE=debian:bookworm
FROM --platform=linux/arm64 ${BASE} AS build
RUN apt-get update && \
    apt-get install -y curl
RUN ["/bin/sh", "-c", "echo hi"]
COPY --chown=1000:1000 --chmod=0644 src/*.c "dir with space/" /opt/
ADD archive.tar.gz /srv/
ENV A=1 B="two words" C=$A
ENV LEGACY value with spaces
ARG VERSION=1.0
WORKDIR /opt/$VERSION
USER walt:walt
LABEL walt.node.models=rpi-b,pc-x86-64 "other"="x y"
CMD ["/bin/app", "--serve"]
ENTRYPOINT /entry.sh
SHELL ["/bin/bash", "-ec"]
EXPOSE 80 443/tcp
VOLUME ["/data"]
STOPSIGNAL SIGINT
HEALTHCHECK --interval=30s --retries=3 CMD /bin/check
MAINTAINER lab@example.org
"#;
        let parsed = parse(text).unwrap();
        assert_eq!(parsed.global_args.len(), 1);
        let stage = &parsed.stages[0];
        assert_eq!(stage.line, 4);
        assert_eq!(stage.base, "${BASE}");
        assert_eq!(stage.name.as_deref(), Some("build"));
        assert_eq!(stage.platform.as_deref(), Some("linux/arm64"));
        let kinds: Vec<&str> = stage.steps.iter().map(|s| s.instruction.keyword()).collect();
        assert_eq!(
            kinds,
            [
                "RUN",
                "RUN",
                "COPY",
                "ADD",
                "ENV",
                "ENV",
                "ARG",
                "WORKDIR",
                "USER",
                "LABEL",
                "CMD",
                "ENTRYPOINT",
                "SHELL",
                "EXPOSE",
                "VOLUME",
                "STOPSIGNAL",
                "HEALTHCHECK",
                "MAINTAINER"
            ]
        );
        assert_eq!(stage.steps[0].line, 5);
        assert_eq!(
            stage.steps[0].instruction,
            Instruction::Run(CommandForm::Shell(
                "apt-get update &&     apt-get install -y curl".into()
            ))
        );
        assert_eq!(stage.steps[1].line, 7);
        assert_eq!(
            stage.steps[1].instruction,
            Instruction::Run(CommandForm::Exec(vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo hi".into()
            ]))
        );
        let Instruction::Copy(copy) = &stage.steps[2].instruction else {
            panic!("COPY")
        };
        assert_eq!(copy.sources, ["src/*.c", "\"dir with space/\""]);
        assert_eq!(copy.dest, "/opt/");
        assert_eq!(copy.chown.as_deref(), Some("1000:1000"));
        assert_eq!(copy.chmod.as_deref(), Some("0644"));
        assert_eq!(
            stage.steps[4].instruction,
            Instruction::Env(vec![
                ("A".into(), "1".into()),
                ("B".into(), "\"two words\"".into()),
                ("C".into(), "$A".into())
            ])
        );
        assert_eq!(
            stage.steps[5].instruction,
            Instruction::Env(vec![("LEGACY".into(), "value with spaces".into())])
        );
        assert_eq!(
            stage.steps[6].instruction,
            Instruction::Arg {
                name: "VERSION".into(),
                default: Some("1.0".into())
            }
        );
        assert_eq!(
            stage.steps[12].instruction,
            Instruction::Shell(vec!["/bin/bash".into(), "-ec".into()])
        );
        let Instruction::Healthcheck(Healthcheck::Check { options, .. }) = &stage.steps[16].instruction
        else {
            panic!("HEALTHCHECK")
        };
        assert_eq!(options["Interval"], 30_000_000_000);
        assert_eq!(options["Retries"], 3);
    }

    #[test]
    fn continuations_skip_comments_and_blank_lines_and_keep_the_first_line() {
        let steps = parse("FROM scratch\nRUN echo a \\\n# inside\n\n  b \\\n  c\nCMD x\n").unwrap();
        let step = &steps.stages[0].steps[0];
        assert_eq!(step.line, 2);
        assert_eq!(
            step.instruction,
            Instruction::Run(CommandForm::Shell("echo a   b   c".into()))
        );
        assert_eq!(steps.stages[0].steps[1].line, 7);
    }

    #[test]
    fn escape_directive_changes_the_continuation_character() {
        let parsed = parse("# escape=`\nFROM scratch\nCOPY a\\b `\n  c:\\dest\n").unwrap();
        assert_eq!(parsed.escape, '`');
        let Instruction::Copy(copy) = &parsed.stages[0].steps[0].instruction else {
            panic!()
        };
        assert_eq!(copy.sources, ["a\\b"]);
        assert_eq!(copy.dest, "c:\\dest");
        // A directive after a comment is only a comment.
        let parsed = parse("# hello\n# escape=`\nFROM scratch\nRUN a \\\n b\n").unwrap();
        assert_eq!(parsed.escape, '\\');
        assert_eq!(
            parsed.stages[0].steps[0].instruction,
            Instruction::Run(CommandForm::Shell("a  b".into()))
        );
        let error = refused("# escape=x\nFROM scratch\n");
        assert_eq!(error.line, 1);
        assert!(error.message.contains("must be \\ or `"), "{error}");
    }

    #[test]
    fn json_form_falls_back_to_shell_form_when_not_json() {
        assert_eq!(
            one_stage("FROM a\nCMD [\"a\", 'b']\n")[0],
            Instruction::Cmd(CommandForm::Shell("[\"a\", 'b']".into()))
        );
        assert_eq!(
            one_stage("FROM a\nENTRYPOINT [\"/e\"]\n")[0],
            Instruction::Entrypoint(CommandForm::Exec(vec!["/e".into()]))
        );
    }

    #[test]
    fn multi_stage_and_copy_from() {
        let parsed = parse("FROM a AS Build\nRUN make\nFROM b\nCOPY --from=build /out /usr/bin/\n").unwrap();
        assert_eq!(parsed.stages.len(), 2);
        assert_eq!(parsed.stages[0].name.as_deref(), Some("build"));
        let Instruction::Copy(copy) = &parsed.stages[1].steps[0].instruction else {
            panic!()
        };
        assert_eq!(copy.from.as_deref(), Some("build"));
        let error = refused("FROM a AS x\nFROM b AS x\n");
        assert_eq!(error.line, 2);
        assert!(error.message.contains("used twice"), "{error}");
    }

    #[test]
    fn refusals_name_the_line_and_what_to_do() {
        let cases: &[(&str, usize, &str)] = &[
            ("FROM a\nRUN x\nONBUILD RUN y\n", 3, "ONBUILD is not supported"),
            ("FROM a\n\nFOO bar\n", 3, "unknown instruction \"FOO\""),
            ("RUN x\nFROM a\n", 1, "only ARG may come before FROM"),
            ("# only a comment\n", 1, "no FROM instruction"),
            (
                "FROM a\nRUN --mount=type=cache,target=/x make\n",
                2,
                "RUN --mount is not supported",
            ),
            ("FROM a\nRUN <<EOF\necho\nEOF\n", 2, "heredoc"),
            (
                "FROM a\nADD https://example.org/x.tgz /x\n",
                2,
                "remote sources are not supported",
            ),
            (
                "FROM a\nADD --checksum=sha256:00 x /x\n",
                2,
                "ADD --checksum is not supported",
            ),
            ("FROM a\nCOPY --link a /b\n", 2, "COPY --link is not supported"),
            ("FROM a\nCOPY onlyone\n", 2, "at least a source and a destination"),
            ("FROM a\nCOPY --chmod=abc a /b\n", 2, "octal mode"),
            ("FROM a\nADD --from=x a /b\n", 2, "ADD --from is not supported"),
            ("FROM a\nSHELL /bin/bash -c\n", 2, "JSON form"),
            ("FROM a\nENV\n", 2, "ENV needs"),
            ("FROM a\nENV A\n", 2, "give a value"),
            ("FROM a\nLABEL a\n", 2, "key=value"),
            ("FROM a\nARG A B\n", 2, "one name"),
            ("FROM a\nARG 1A\n", 2, "not starting with a digit"),
            ("FROM a\nUSER a b\n", 2, "one word"),
            ("FROM a\nHEALTHCHECK --interval=soon CMD x\n", 2, "duration"),
            (
                "FROM a\nHEALTHCHECK --foo=1 CMD x\n",
                2,
                "HEALTHCHECK --foo is not supported",
            ),
            ("FROM a\nHEALTHCHECK x\n", 2, "NONE or [options] CMD"),
            ("FROM\n", 1, "FROM needs an image"),
            ("FROM a b c d\n", 1, "expected FROM"),
            ("FROM a AS 1x\n", 1, "stage name"),
            ("FROM --foo=1 a\n", 1, "FROM --foo is not supported"),
            ("# escape=\\\n# escape=`\nFROM a\n", 2, "given twice"),
        ];
        for (text, line, needle) in cases {
            let error = refused(text);
            assert_eq!(error.line, *line, "{text:?}: {error}");
            assert!(error.message.contains(needle), "{text:?}: {error}");
            assert!(
                error
                    .to_string()
                    .starts_with(&format!("Dockerfile line {line}: "))
            );
        }
    }

    #[test]
    fn healthcheck_none_and_durations() {
        assert_eq!(
            one_stage("FROM a\nHEALTHCHECK NONE\n")[0],
            Instruction::Healthcheck(Healthcheck::None)
        );
        assert_eq!(parse_duration("1m30s"), Some(90_000_000_000));
        assert_eq!(parse_duration("500ms"), Some(500_000_000));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration(""), None);
        assert_eq!(parse_duration("s"), None);
    }

    #[test]
    fn words_keep_quotes_for_expansion() {
        assert_eq!(
            split_words(r#"a "b c" 'd e' f\ g"#, '\\'),
            ["a", "\"b c\"", "'d e'", "f\\ g"]
        );
        assert_eq!(split_words("  ", '\\'), Vec::<String>::new());
    }

    #[test]
    fn an_operator_that_is_not_ascii_is_refused_not_split() {
        // Found by fuzzing (`fuzz/regressions/dockerfile/multibyte-after-name`): `${NAME` followed by a
        // multi-byte character panicked on a byte split inside it.
        let lookup = vars(&[("A", "1")]);
        for word in ["${MI\u{fffd}\u{fffd}}", "${A:\u{e9}x}", "${A\u{e9}}"] {
            assert!(
                matches!(expand(word, '\\', false, &lookup), Err(ExpandError::Bad(_))),
                "{word:?}"
            );
        }
        assert_eq!(expand("${A:-\u{e9}}", '\\', false, &lookup), Ok("1".to_owned()));
    }

    #[test]
    fn expansion_like_docker() {
        let lookup = vars(&[("A", "1"), ("EMPTY", ""), ("P", "/opt")]);
        let e = |word: &str| expand(word, '\\', false, &lookup).unwrap();
        assert_eq!(e("$A"), "1");
        assert_eq!(e("${A}x"), "1x");
        assert_eq!(e("$Ax"), "");
        assert_eq!(e("${P}/bin"), "/opt/bin");
        assert_eq!(e("${UNSET:-def}"), "def");
        assert_eq!(e("${EMPTY:-def}"), "def");
        assert_eq!(e("${EMPTY-def}"), "");
        assert_eq!(e("${UNSET-def}"), "def");
        assert_eq!(e("${A:+alt}"), "alt");
        assert_eq!(e("${EMPTY:+alt}"), "");
        assert_eq!(e("${EMPTY+alt}"), "alt");
        assert_eq!(e("${UNSET:-$P/x}"), "/opt/x");
        assert_eq!(e("'$A'"), "$A");
        assert_eq!(e("\"$A b\""), "1 b");
        assert_eq!(e("\\$A"), "$A");
        assert_eq!(e("\"a\\\"b\""), "a\"b");
        assert_eq!(e("\"a\\nb\""), "a\\nb");
        assert_eq!(e("a\\ b"), "a b");
        assert_eq!(e("cost$"), "cost$");
        assert_eq!(e("${A:?must be set}"), "1");
        assert_eq!(
            expand("${UNSET:?must be set}", '\\', false, &lookup),
            Err(ExpandError::Required {
                name: "UNSET".into(),
                message: "must be set".into()
            })
        );
        assert!(matches!(
            expand("${A", '\\', false, &lookup),
            Err(ExpandError::Bad(_))
        ));
        assert!(matches!(
            expand("${A/x/y}", '\\', false, &lookup),
            Err(ExpandError::Bad(_))
        ));
        assert!(matches!(
            expand("\"open", '\\', false, &lookup),
            Err(ExpandError::Quote(_))
        ));
        // JSON words: quotes are literal, variables still substituted.
        assert_eq!(expand("\"$A\"", '\\', true, &lookup).unwrap(), "\"1\"");
        // The backtick escape.
        assert_eq!(expand("a`$A", '`', false, &lookup).unwrap(), "a$A");
    }
}

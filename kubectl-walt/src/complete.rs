//! Shell completion: one engine (the hidden `__complete` command) that walks the clap command
//! tree and asks the cluster for resource names, and small scripts for bash, zsh and fish that
//! call it. The output follows Cobra's protocol (one candidate per line, `value<TAB>description`,
//! then `:DIRECTIVE`), which is what kubectl expects from a `kubectl_complete-walt` helper, so
//! `kubectl walt <TAB>` works through kubectl's own completion too.

use clap::{Arg, Command};

use crate::cli::CompletionShell;
use crate::topics;

/// Cobra directive: no space after the completion (e.g. after `image:`).
pub const NO_SPACE: u8 = 2;
/// Cobra directive: no file completion when there are no candidates.
pub const NO_FILE_COMP: u8 = 4;

/// Where resource names come from (the cluster in real use, a table in tests).
pub trait Lookup {
    /// Node names in the namespace.
    fn nodes(&self, ctx: &LookupContext) -> Vec<String>;
    /// Image names in the namespace.
    fn images(&self, ctx: &LookupContext) -> Vec<String>;
    /// Namespace names.
    fn namespaces(&self, ctx: &LookupContext) -> Vec<String>;
    /// Kubeconfig context names.
    fn contexts(&self, ctx: &LookupContext) -> Vec<String>;
}

/// The connection flags already typed on the line, so lookups use the same cluster and namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LookupContext {
    /// `--kubeconfig`.
    pub kubeconfig: Option<String>,
    /// `--context`.
    pub context: Option<String>,
    /// `-n/--namespace`.
    pub namespace: Option<String>,
}

/// One completion candidate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// What is inserted.
    pub value: String,
    /// Shown next to it by shells that can.
    pub description: String,
}

/// The answer: candidates and a Cobra directive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// Candidates, already filtered by the typed prefix.
    pub candidates: Vec<Candidate>,
    /// Cobra directive bits.
    pub directive: u8,
}

impl Completion {
    /// The Cobra wire format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for c in &self.candidates {
            if c.description.is_empty() {
                out.push_str(&c.value);
            } else {
                out.push_str(&c.value);
                out.push('\t');
                out.push_str(&c.description);
            }
            out.push('\n');
        }
        out.push(':');
        out.push_str(&self.directive.to_string());
        out.push('\n');
        out
    }
}

/// Completes `words` (the words after the program name; the last is the one being typed).
pub fn complete(root: &Command, words: &[String], lookup: &dyn Lookup) -> Completion {
    let mut root = root.clone();
    root.build();
    let (current, done) = match words.split_last() {
        Some((last, rest)) => (last.as_str(), rest),
        None => ("", &[][..]),
    };

    let mut cmd = &root;
    let mut ctx = LookupContext::default();
    let mut positionals = 0usize;
    let mut pending_value: Option<&Arg> = None;
    let mut after_double_dash = false;
    for word in done {
        if let Some(arg) = pending_value.take() {
            remember(&mut ctx, arg, word);
            continue;
        }
        if after_double_dash {
            continue;
        }
        if word == "--" {
            after_double_dash = true;
            continue;
        }
        if let Some(flag) = word.strip_prefix('-').filter(|f| !f.is_empty()) {
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (flag, None),
            };
            if let Some(arg) = find_flag(cmd, name)
                && takes_value(arg)
            {
                match inline {
                    Some(value) => remember(&mut ctx, arg, value),
                    None => pending_value = Some(arg),
                }
            }
            continue;
        }
        if let Some(sub) = cmd.find_subcommand(word) {
            cmd = sub;
            positionals = 0;
            continue;
        }
        positionals += 1;
    }

    if after_double_dash {
        // A remote command: nothing we can know.
        return Completion {
            candidates: Vec::new(),
            directive: 0,
        };
    }
    if let Some(arg) = pending_value {
        return complete_value(arg, current, &ctx, lookup);
    }
    if current.starts_with('-') {
        if let Some((name, value)) = current.split_once('=')
            && let Some(arg) = find_flag(cmd, name.strip_prefix('-').unwrap_or(name))
        {
            let mut inner = complete_value(arg, value, &ctx, lookup);
            for c in &mut inner.candidates {
                c.value = format!("{name}={}", c.value);
            }
            return inner;
        }
        return Completion {
            candidates: filter(flags(cmd), current),
            directive: NO_FILE_COMP,
        };
    }
    if cmd.has_subcommands() {
        let subs = cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
            .map(|s| Candidate {
                value: s.get_name().to_string(),
                description: s
                    .get_about()
                    .map(std::string::ToString::to_string)
                    .unwrap_or_default(),
            })
            .collect();
        return Completion {
            candidates: filter(subs, current),
            directive: NO_FILE_COMP,
        };
    }
    let positional = cmd
        .get_positionals()
        .filter(|a| !a.is_last_set())
        .nth(positionals);
    match positional {
        Some(arg) => complete_value(arg, current, &ctx, lookup),
        None => Completion {
            candidates: Vec::new(),
            directive: NO_FILE_COMP,
        },
    }
}

fn remember(ctx: &mut LookupContext, arg: &Arg, value: &str) {
    match arg.get_id().as_str() {
        "kubeconfig" => ctx.kubeconfig = Some(value.to_string()),
        "context" => ctx.context = Some(value.to_string()),
        "namespace" => ctx.namespace = Some(value.to_string()),
        _ => {}
    }
}

fn find_flag<'a>(cmd: &'a Command, name: &str) -> Option<&'a Arg> {
    cmd.get_arguments().find(|a| {
        if let Some(long) = name.strip_prefix('-') {
            a.get_long() == Some(long) || a.get_all_aliases().is_some_and(|al| al.contains(&long))
        } else {
            let mut chars = name.chars();
            match (chars.next(), chars.next()) {
                (Some(c), None) => a.get_short() == Some(c),
                _ => false,
            }
        }
    })
}

fn takes_value(arg: &Arg) -> bool {
    arg.get_action().takes_values()
}

fn flags(cmd: &Command) -> Vec<Candidate> {
    let mut out = Vec::new();
    for arg in cmd
        .get_arguments()
        .filter(|a| !a.is_positional() && !a.is_hide_set())
    {
        let description = arg
            .get_help()
            .map(|h| first_sentence(&h.to_string()))
            .unwrap_or_default();
        if let Some(long) = arg.get_long() {
            out.push(Candidate {
                value: format!("--{long}"),
                description: description.clone(),
            });
        }
    }
    out.push(Candidate {
        value: "--help".into(),
        description: "Print help".into(),
    });
    out.sort_by(|a, b| a.value.cmp(&b.value));
    out.dedup_by(|a, b| a.value == b.value);
    out
}

fn first_sentence(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default();
    line.split(". ")
        .next()
        .unwrap_or(line)
        .trim_end_matches('.')
        .to_string()
}

fn complete_value(arg: &Arg, current: &str, ctx: &LookupContext, lookup: &dyn Lookup) -> Completion {
    let names = |list: Vec<String>, what: &str| -> Vec<Candidate> {
        list.into_iter()
            .map(|value| Candidate {
                value,
                description: what.to_string(),
            })
            .collect()
    };
    let id = arg.get_id().as_str();
    match id {
        "node" => done(filter(names(lookup.nodes(ctx), ""), current)),
        "nodes" => {
            let mut all = names(lookup.nodes(ctx), "");
            all.push(Candidate {
                value: "all-nodes".into(),
                description: "every node of the namespace".into(),
            });
            complete_set(all, current)
        }
        "image" => done(filter(names(lookup.images(ctx), ""), current)),
        "images" => complete_set(names(lookup.images(ctx), ""), current),
        "namespace" => done(filter(names(lookup.namespaces(ctx), ""), current)),
        "context" => done(filter(names(lookup.contexts(ctx), ""), current)),
        "topic" => done(filter(
            topics::TOPICS
                .iter()
                .map(|t| Candidate {
                    value: t.name.into(),
                    description: t.summary.into(),
                })
                .collect(),
            current,
        )),
        "src" | "dst" => {
            if current.contains(':') {
                // A path inside an image: the plugin cannot list it without starting a shell.
                return Completion {
                    candidates: Vec::new(),
                    directive: NO_FILE_COMP | NO_SPACE,
                };
            }
            let images: Vec<Candidate> = lookup
                .images(ctx)
                .into_iter()
                .map(|i| Candidate {
                    value: format!("{i}:"),
                    description: "image".into(),
                })
                .collect();
            let found = filter(images, current);
            if found.is_empty() {
                // A local path: let the shell complete files.
                Completion {
                    candidates: Vec::new(),
                    directive: 0,
                }
            } else {
                Completion {
                    candidates: found,
                    directive: NO_SPACE,
                }
            }
        }
        _ => {
            let possible: Vec<Candidate> = arg
                .get_possible_values()
                .iter()
                .filter(|p| !p.is_hide_set())
                .map(|p| Candidate {
                    value: p.get_name().to_string(),
                    description: p
                        .get_help()
                        .map(std::string::ToString::to_string)
                        .unwrap_or_default(),
                })
                .collect();
            if !possible.is_empty() {
                return done(filter(possible, current));
            }
            let files = matches!(
                arg.get_value_hint(),
                clap::ValueHint::FilePath | clap::ValueHint::AnyPath | clap::ValueHint::DirPath
            );
            Completion {
                candidates: Vec::new(),
                directive: if files { 0 } else { NO_FILE_COMP },
            }
        }
    }
}

fn done(candidates: Vec<Candidate>) -> Completion {
    Completion {
        candidates,
        directive: NO_FILE_COMP,
    }
}

/// Completes the last item of a comma list (`rpi1,rp<TAB>`), leaving out items already typed.
fn complete_set(all: Vec<Candidate>, current: &str) -> Completion {
    let (head, tail) = match current.rfind(',') {
        Some(pos) => (&current[..=pos], &current[pos + 1..]),
        None => ("", current),
    };
    let typed: Vec<&str> = head.split(',').filter(|s| !s.is_empty()).collect();
    let candidates = filter(all, tail)
        .into_iter()
        .filter(|c| !typed.contains(&c.value.as_str()))
        .filter(|c| head.is_empty() || c.value != "all-nodes")
        .map(|c| Candidate {
            value: format!("{head}{}", c.value),
            description: c.description,
        })
        .collect();
    Completion {
        candidates,
        directive: NO_FILE_COMP,
    }
}

fn filter(candidates: Vec<Candidate>, prefix: &str) -> Vec<Candidate> {
    candidates
        .into_iter()
        .filter(|c| c.value.starts_with(prefix))
        .collect()
}

/// The completion script for `shell`.
pub fn script(shell: CompletionShell) -> &'static str {
    match shell {
        CompletionShell::Bash => BASH,
        CompletionShell::Zsh => ZSH,
        CompletionShell::Fish => FISH,
        CompletionShell::Kubectl => KUBECTL_HELPER,
    }
}

const BASH: &str = r#"# bash completion for kubectl-walt (source it: source <(kubectl-walt completion bash))
_kubectl_walt_complete() {
    local line="${COMP_LINE:0:$COMP_POINT}" out directive cur
    local -a words
    read -r -a words <<< "$line"
    if [[ "$line" =~ [[:space:]]$ ]]; then words+=(""); fi
    cur="${words[${#words[@]}-1]}"
    out=$(kubectl-walt __complete "${words[@]:1}" 2>/dev/null) || return 0
    directive="${out##*:}"
    out="${out%:*}"
    COMPREPLY=()
    local IFS=$'\n' c
    for c in $out; do
        c="${c%%$'\t'*}"
        [[ -z "$c" ]] && continue
        # bash splits words at ':' (COMP_WORDBREAKS): complete only the part after the last one.
        if [[ "$cur" == *:* && "$COMP_WORDBREAKS" == *:* ]]; then c="${c#"${cur%:*}":}"; fi
        COMPREPLY+=("$c")
    done
    if (( directive & 2 )); then compopt -o nospace 2>/dev/null; fi
    if (( ${#COMPREPLY[@]} == 0 )) && ! (( directive & 4 )); then
        compopt -o default 2>/dev/null
    fi
    return 0
}
complete -F _kubectl_walt_complete kubectl-walt
"#;

const ZSH: &str = r#"#compdef kubectl-walt
# zsh completion for kubectl-walt (source it: source <(kubectl-walt completion zsh))
_kubectl_walt() {
    local out directive
    local -a lines comps
    out=$(kubectl-walt __complete "${(@)words[2,$CURRENT]}" 2>/dev/null) || return 1
    lines=("${(@f)out}")
    directive="${lines[-1]#:}"
    lines=("${(@)lines[1,-2]}")
    local l value desc
    for l in "${lines[@]}"; do
        [[ -z "$l" ]] && continue
        value="${l%%$'\t'*}"
        desc=""
        [[ "$l" == *$'\t'* ]] && desc="${l#*$'\t'}"
        value="${value//:/\\:}"
        if [[ -n "$desc" ]]; then comps+=("$value:$desc"); else comps+=("$value"); fi
    done
    if (( ${#comps} > 0 )); then
        if (( directive & 2 )); then
            _describe -t walt 'kubectl walt' comps -S ''
        else
            _describe -t walt 'kubectl walt' comps
        fi
    elif ! (( directive & 4 )); then
        _files
    fi
}
if [[ "$funcstack[1]" == "_kubectl_walt" ]]; then
    _kubectl_walt "$@"
else
    compdef _kubectl_walt kubectl-walt
fi
"#;

const FISH: &str = r#"# fish completion for kubectl-walt (kubectl-walt completion fish > ~/.config/fish/completions/kubectl-walt.fish)
function __kubectl_walt_complete
    set -l args (commandline -opc)[2..-1] (commandline -ct)
    set -l out (kubectl-walt __complete $args 2>/dev/null)
    set -l directive (string replace ':' '' -- $out[-1])
    set -e out[-1]
    if test (count $out) -gt 0
        printf '%s\n' $out
    else if test (math "bitand($directive, 4)") -eq 0
        __fish_complete_path (commandline -ct)
    end
end
complete -c kubectl-walt -f -a '(__kubectl_walt_complete)'
"#;

const KUBECTL_HELPER: &str = r#"#!/usr/bin/env sh
# kubectl_complete-walt: kubectl (>= 1.26) runs this to complete `kubectl walt ...`.
# Install it next to kubectl-walt on your PATH and make it executable.
exec kubectl-walt __complete "$@"
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Cli;
    use clap::CommandFactory;

    struct Fixed;
    impl Lookup for Fixed {
        fn nodes(&self, ctx: &LookupContext) -> Vec<String> {
            if ctx.namespace.as_deref() == Some("other") {
                vec!["far-node".into()]
            } else {
                vec!["rpi3-01".into(), "rpi3-02".into(), "vnode".into()]
            }
        }
        fn images(&self, _: &LookupContext) -> Vec<String> {
            vec!["rpi-debian".into(), "pc-base".into()]
        }
        fn namespaces(&self, _: &LookupContext) -> Vec<String> {
            vec!["lab".into(), "other".into()]
        }
        fn contexts(&self, _: &LookupContext) -> Vec<String> {
            vec!["kind-walt".into()]
        }
    }

    fn values(words: &[&str]) -> (Vec<String>, u8) {
        let words: Vec<String> = words.iter().map(|s| (*s).to_string()).collect();
        let c = complete(&Cli::command(), &words, &Fixed);
        (c.candidates.into_iter().map(|c| c.value).collect(), c.directive)
    }

    #[test]
    fn top_level_and_subcommands() {
        assert_eq!(values(&[""]).0, ["node", "image", "device", "help", "completion"]);
        assert_eq!(values(&["im"]).0, ["image"]);
        let (subs, directive) = values(&["node", "s"]);
        assert_eq!(subs, ["show", "shell", "save"]);
        assert_eq!(directive, NO_FILE_COMP);
    }

    #[test]
    fn resource_names_from_the_cluster() {
        assert_eq!(values(&["node", "shell", "rpi"]).0, ["rpi3-01", "rpi3-02"]);
        assert_eq!(values(&["image", "shell", ""]).0, ["rpi-debian", "pc-base"]);
        assert_eq!(values(&["node", "save", "rpi3-01", "p"]).0, ["pc-base"]);
        assert_eq!(
            values(&["node", "create-virtual", "x", "--image", "r"]).0,
            ["rpi-debian"]
        );
        assert_eq!(values(&["help", "show", "node"]).0, ["node-save", "node-bootup"]);
    }

    #[test]
    fn node_sets_complete_after_the_last_comma() {
        assert_eq!(
            values(&["node", "run", "rpi3-01,"]).0,
            ["rpi3-01,rpi3-02", "rpi3-01,vnode"]
        );
        assert!(
            values(&["node", "reboot", "a"])
                .0
                .contains(&"all-nodes".to_string())
        );
    }

    #[test]
    fn namespace_flag_is_used_for_lookups() {
        assert_eq!(values(&["-n", "other", "node", "shell", ""]).0, ["far-node"]);
        assert_eq!(
            values(&["node", "shell", "--namespace=other", ""]).0,
            ["far-node"]
        );
        assert_eq!(values(&["node", "ls", "-n", ""]).0, ["lab", "other"]);
        assert_eq!(values(&["node", "ls", "--context", ""]).0, ["kind-walt"]);
    }

    #[test]
    fn flags_and_flag_values() {
        let (flags, _) = values(&["node", "ls", "--"]);
        assert!(flags.contains(&"--output".to_string()));
        assert!(flags.contains(&"--namespace".to_string()));
        assert!(
            !flags.contains(&"--gateway-address".to_string()),
            "hidden flags stay hidden"
        );
        assert_eq!(
            values(&["image", "ls", "-o", ""]).0,
            ["table", "wide", "json", "yaml"]
        );
        assert_eq!(values(&["image", "ls", "--output=j"]).0, ["--output=json"]);
        assert_eq!(values(&["completion", ""]).0, ["bash", "zsh", "fish", "kubectl"]);
    }

    #[test]
    fn image_cp_offers_images_then_files() {
        let (c, d) = values(&["image", "cp", "rpi"]);
        assert_eq!(c, ["rpi-debian:"]);
        assert_eq!(d, NO_SPACE);
        let (c, d) = values(&["image", "cp", "./"]);
        assert!(c.is_empty());
        assert_eq!(d, 0, "local paths fall back to file completion");
    }

    #[test]
    fn nothing_after_double_dash() {
        assert!(values(&["node", "run", "rpi3-01", "--", "un"]).0.is_empty());
    }

    #[test]
    fn cobra_wire_format() {
        let c = Completion {
            candidates: vec![
                Candidate {
                    value: "a".into(),
                    description: "the a".into(),
                },
                Candidate {
                    value: "b".into(),
                    description: String::new(),
                },
            ],
            directive: 4,
        };
        assert_eq!(c.render(), "a\tthe a\nb\n:4\n");
    }
}

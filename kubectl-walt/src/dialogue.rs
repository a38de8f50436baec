//! WalT's image-shell exit dialogue, as a pure function over a reader and a writer, so that tests
//! drive it with in-memory input.
//!
//! ```text
//! Save as a new image, or press Enter to overwrite rpi-debian: ⏎
//! Overwriting rpi-debian will reboot 2 nodes that boot it (rpi3-01, rpi3-02). Continue? [y/N] y
//! ```

use std::io::{BufRead, Write};

/// What the user decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Save the changes under this name (the same image for an overwrite).
    SaveAs(String),
    /// Throw the changes away (Ctrl-C, Ctrl-D).
    Discard,
}

/// What the dialogue needs to know about a candidate image name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameFacts {
    /// An Image of that name already exists (saving there overwrites it).
    pub exists: bool,
    /// The nodes that boot it (they reboot on an overwrite).
    pub booted_by: Vec<String>,
}

/// Runs the dialogue for an image shell on `image`.
///
/// `validate` says why a typed name is not acceptable (None when fine); `facts` looks a name up.
/// End of input (Ctrl-D) discards, as in WalT.
pub fn exit_dialogue<R, W>(
    image: &str,
    input: &mut R,
    output: &mut W,
    validate: &dyn Fn(&str) -> Option<String>,
    facts: &mut dyn FnMut(&str) -> NameFacts,
) -> std::io::Result<Decision>
where
    R: BufRead,
    W: Write,
{
    loop {
        write!(
            output,
            "Save as a new image, or press Enter to overwrite {image}: "
        )?;
        output.flush()?;
        let Some(answer) = read_line(input)? else {
            writeln!(output)?;
            return Ok(Decision::Discard);
        };
        let name = if answer.is_empty() {
            image.to_string()
        } else {
            answer
        };
        if name != image
            && let Some(problem) = validate(&name)
        {
            writeln!(output, "{problem}")?;
            continue;
        }
        let found = facts(&name);
        // Enter on an image no node boots overwrites at once (Enter *is* the overwrite choice);
        // a name that is another existing image, or reboots, asks first.
        let overwrites_silently = name == image && found.booted_by.is_empty();
        if overwrites_silently || (!found.exists && name != image) {
            return Ok(Decision::SaveAs(name));
        }
        let question = overwrite_question(&name, &found.booted_by);
        write!(output, "{question} [y/N] ")?;
        output.flush()?;
        let Some(reply) = read_line(input)? else {
            writeln!(output)?;
            return Ok(Decision::Discard);
        };
        if is_yes(&reply) {
            return Ok(Decision::SaveAs(name));
        }
    }
}

/// The y/n question before an overwrite, naming the nodes that would reboot.
pub fn overwrite_question(image: &str, booted_by: &[String]) -> String {
    match booted_by.len() {
        0 => format!("Overwrite {image}? (no node boots it)"),
        n => {
            let shown: Vec<&str> = booted_by.iter().take(5).map(String::as_str).collect();
            let more = if n > 5 {
                format!(", and {} more", n - 5)
            } else {
                String::new()
            };
            format!(
                "Overwriting {image} will reboot {n} node{} that boot{} it ({}{more}). Continue?",
                if n == 1 { "" } else { "s" },
                if n == 1 { "s" } else { "" },
                shown.join(", ")
            )
        }
    }
}

/// A y/n confirmation on its own (node save, image cp): true only for y/yes.
pub fn confirm<R: BufRead, W: Write>(question: &str, input: &mut R, output: &mut W) -> std::io::Result<bool> {
    write!(output, "{question} [y/N] ")?;
    output.flush()?;
    Ok(read_line(input)?.is_some_and(|r| is_yes(&r)))
}

fn is_yes(reply: &str) -> bool {
    matches!(reply.to_ascii_lowercase().as_str(), "y" | "yes")
}

/// One trimmed line, or None at end of input.
fn read_line<R: BufRead>(input: &mut R) -> std::io::Result<Option<String>> {
    let mut line = String::new();
    if input.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    Ok(Some(line.trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &str, facts: &[(&str, NameFacts)]) -> (Decision, String) {
        let mut reader = std::io::Cursor::new(input.as_bytes().to_vec());
        let mut out = Vec::new();
        let validate = |name: &str| {
            if name == "default" {
                Some("\"default\" is reserved: choose another name.".to_string())
            } else if name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            {
                None
            } else {
                Some(format!("invalid image name {name:?}: use a-z, 0-9 and -"))
            }
        };
        let table: Vec<(String, NameFacts)> =
            facts.iter().map(|(n, f)| ((*n).to_string(), f.clone())).collect();
        let mut lookup = |name: &str| {
            table
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, f)| f.clone())
                .unwrap_or_default()
        };
        let decision =
            exit_dialogue("rpi-debian", &mut reader, &mut out, &validate, &mut lookup).expect("io");
        (decision, String::from_utf8(out).expect("utf8"))
    }

    fn booted(nodes: &[&str]) -> NameFacts {
        NameFacts {
            exists: true,
            booted_by: nodes.iter().map(|s| (*s).to_string()).collect(),
        }
    }

    #[test]
    fn a_new_name_saves_without_question() {
        let (d, out) = run("rpi-tuned\n", &[("rpi-debian", booted(&["n1"]))]);
        assert_eq!(d, Decision::SaveAs("rpi-tuned".into()));
        assert_eq!(
            out,
            "Save as a new image, or press Enter to overwrite rpi-debian: "
        );
    }

    #[test]
    fn enter_overwrites_after_the_reboot_warning() {
        let (d, out) = run("\ny\n", &[("rpi-debian", booted(&["rpi3-01", "rpi3-02"]))]);
        assert_eq!(d, Decision::SaveAs("rpi-debian".into()));
        assert!(out.contains(
            "Overwriting rpi-debian will reboot 2 nodes that boot it (rpi3-01, rpi3-02). Continue? [y/N] "
        ));
    }

    #[test]
    fn no_goes_back_to_the_name_question() {
        let (d, out) = run("\nn\nother\n", &[("rpi-debian", booted(&["rpi3-01"]))]);
        assert_eq!(d, Decision::SaveAs("other".into()));
        assert!(out.contains("will reboot 1 node that boots it (rpi3-01)"));
        assert_eq!(out.matches("Save as a new image").count(), 2);
    }

    #[test]
    fn an_existing_other_name_is_an_overwrite_too() {
        let (d, out) = run("base\ny\n", &[("base", booted(&[]))]);
        assert_eq!(d, Decision::SaveAs("base".into()));
        assert!(out.contains("Overwrite base? (no node boots it) [y/N] "));
    }

    #[test]
    fn invalid_names_are_explained_and_asked_again() {
        let (d, out) = run("Bad_Name\ndefault\nok\n", &[]);
        assert_eq!(d, Decision::SaveAs("ok".into()));
        assert!(out.contains("invalid image name \"Bad_Name\""));
        assert!(out.contains("\"default\" is reserved"));
    }

    #[test]
    fn enter_on_an_image_no_node_boots_overwrites_at_once() {
        let (d, out) = run("\n", &[("rpi-debian", booted(&[]))]);
        assert_eq!(d, Decision::SaveAs("rpi-debian".into()));
        assert!(!out.contains("[y/N]"));
    }

    #[test]
    fn end_of_input_discards() {
        assert_eq!(run("", &[]).0, Decision::Discard);
        assert_eq!(run("\n", &[("rpi-debian", booted(&["a"]))]).0, Decision::Discard);
    }

    #[test]
    fn many_nodes_are_summarized() {
        let nodes: Vec<String> = (1..=7).map(|i| format!("n{i}")).collect();
        let q = overwrite_question("img", &nodes);
        assert_eq!(
            q,
            "Overwriting img will reboot 7 nodes that boot it (n1, n2, n3, n4, n5, and 2 more). Continue?"
        );
    }

    #[test]
    fn confirm_accepts_only_yes() {
        for (input, expected) in [
            ("y\n", true),
            ("YES\n", true),
            ("n\n", false),
            ("\n", false),
            ("", false),
        ] {
            let mut out = Vec::new();
            let got = confirm("Go?", &mut std::io::Cursor::new(input), &mut out).expect("io");
            assert_eq!(got, expected, "{input:?}");
        }
    }
}

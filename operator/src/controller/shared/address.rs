//! Node addresses: what the operator accepts as a place to connect to (pure). A host name or an IP
//! address, nothing else, checked before any connection (probe, gateway, save): an address never
//! carries spaces, quotes, `;`, `$`, `/` or an option (`-oProxyCommand=…`) to whatever reads it next.

use std::net::IpAddr;

/// Longest host name DNS carries (RFC 1035, without the trailing dot).
pub const MAX_HOST_NAME: usize = 253;

/// Longest label of a host name (RFC 1035).
pub const MAX_LABEL: usize = 63;

/// Why an address is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadAddress {
    /// Nothing at all.
    #[error("the address is empty: write a host name (rpi1.lab) or an IP address (192.168.152.10, fd00::5)")]
    Empty,
    /// Longer than DNS allows.
    #[error("the address is {length} characters long: a host name has at most {MAX_HOST_NAME}")]
    TooLong {
        /// Its length.
        length: usize,
    },
    /// Neither an IP address nor a host name.
    #[error(
        "`{address}` is neither a host name nor an IP address ({why}): write e.g. rpi1.lab, 192.168.152.10 or fd00::5"
    )]
    Invalid {
        /// The address as given (with control characters escaped).
        address: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// Accepts an IP address (v4, or v6 without brackets) or an RFC 1123 host name: dot-separated
/// labels of 1 to 63 letters, digits and hyphens, not starting or ending with a hyphen, the last
/// one not all digits (so `10.0.0.256` is refused rather than looked up) (pure).
pub fn validate_address(address: &str) -> Result<(), BadAddress> {
    if address.is_empty() {
        return Err(BadAddress::Empty);
    }
    if address.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    if address.len() > MAX_HOST_NAME {
        return Err(BadAddress::TooLong {
            length: address.len(),
        });
    }
    let invalid = |why| BadAddress::Invalid {
        address: address.escape_debug().to_string(),
        why,
    };
    let labels: Vec<&str> = address.split('.').collect();
    for label in &labels {
        label_problem(label).map_or(Ok(()), |why| Err(invalid(why)))?;
    }
    if labels
        .last()
        .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(invalid(
            "not a valid IP address, and a host name's last label is not all digits",
        ));
    }
    Ok(())
}

/// What is wrong with one label of a host name, if anything (pure).
fn label_problem(label: &str) -> Option<&'static str> {
    if label.is_empty() {
        return Some("an empty label: two dots in a row, or a leading or trailing dot");
    }
    if label.len() > MAX_LABEL {
        return Some("a label longer than 63 characters");
    }
    if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Some("only letters, digits, hyphens and dots are allowed");
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Some("a label starts or ends with a hyphen");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_and_ip_addresses_are_accepted() {
        for good in [
            "rpi1",
            "rpi-4.lab.example.org",
            "192.168.152.10",
            "fd00::5",
            "::1",
            "10-0-0-5.nip.io",
            "a1.2b",
        ] {
            assert_eq!(validate_address(good), Ok(()), "{good}");
        }
    }

    /// Issue 15: what an attacker would put in an address to reach a shell or an option parser.
    #[test]
    fn commands_options_and_garbage_are_refused_saying_why() {
        for bad in [
            "x; touch /tmp/pwned",
            "$(id)",
            "`id`",
            "-oProxyCommand=sh",
            "host name",
            "a|b",
            "a\nb",
            "'rpi1'",
            "rpi1:22",
            "[fd00::5]",
            "user@rpi1",
            "http://rpi1",
            "rpi1.",
            ".rpi1",
            "a..b",
            "-rpi1",
            "rpi1-",
            "10.0.0.256",
            "1.2.3",
            "ré.lab",
        ] {
            let error = validate_address(bad).expect_err(bad);
            assert!(
                error
                    .to_string()
                    .contains("neither a host name nor an IP address"),
                "{bad}: {error}"
            );
        }
        assert_eq!(validate_address(""), Err(BadAddress::Empty));
        let long = vec!["a".repeat(63); 5].join(".");
        assert_eq!(validate_address(&long), Err(BadAddress::TooLong { length: 319 }));
        assert!(validate_address(&"a".repeat(64)).is_err());
    }
}

//! Image names as users write them: WalT's rule, `name[:tag]`.
//!
//! The same rule is enforced by the API server (CEL rules in [`crate::schema`]);
//! this pure parser lets the plugin and the operator refuse a bad name early,
//! with the same message.

use std::fmt;

use crate::schema::{IMAGE_NAME_MAX_LENGTH, IMAGE_NAME_MESSAGE, IMAGE_NAME_RESERVED_MESSAGE};

/// The tag an image name without `:tag` means.
pub const DEFAULT_TAG: &str = "latest";

/// The image name reserved for "the default image of the node model".
pub const RESERVED_IMAGE_NAME: &str = "default";

/// A valid image name: `name` or `name:tag`.
///
/// Both parts use lower-case letters, digits and `-`, and start and end with a
/// letter or digit (WalT's `^[a-z0-9-]+$`, narrowed so that every name is also a
/// Kubernetes object name). `default` is reserved.
///
/// An image name maps to the Image object that holds it: `name` and
/// `name:latest` are the Image `name`; `name:tag` is the Image `name.tag`
/// (see [`ImageName::object_name`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageName {
    name: String,
    tag: Option<String>,
}

/// Why an image name is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ImageNameError {
    /// The syntax is wrong.
    #[error("invalid image name {input:?}: {IMAGE_NAME_MESSAGE}")]
    Syntax {
        /// What the user wrote.
        input: String,
    },
    /// Longer than the API accepts.
    #[error("invalid image name {input:?}: longer than {IMAGE_NAME_MAX_LENGTH} characters")]
    TooLong {
        /// What the user wrote.
        input: String,
    },
    /// `default` is reserved.
    #[error("invalid image name {input:?}: {IMAGE_NAME_RESERVED_MESSAGE}")]
    Reserved {
        /// What the user wrote.
        input: String,
    },
}

/// Whether `part` is lower-case letters, digits and `-`, starting and ending with a letter or digit.
fn is_name_part(part: &str) -> bool {
    let alphanumeric = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let bytes = part.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(&first), Some(&last)) => {
            alphanumeric(first) && alphanumeric(last) && bytes.iter().all(|&c| alphanumeric(c) || c == b'-')
        }
        _ => false,
    }
}

impl ImageName {
    /// Parses and validates `name` or `name:tag`.
    pub fn parse(input: &str) -> Result<Self, ImageNameError> {
        let error_input = || input.to_owned();
        if input.len() > IMAGE_NAME_MAX_LENGTH {
            return Err(ImageNameError::TooLong { input: error_input() });
        }
        let (name, tag) = match input.split_once(':') {
            Some((name, tag)) => (name, Some(tag)),
            None => (input, None),
        };
        if !is_name_part(name) || tag.is_some_and(|tag| !is_name_part(tag)) {
            return Err(ImageNameError::Syntax { input: error_input() });
        }
        if name == RESERVED_IMAGE_NAME {
            return Err(ImageNameError::Reserved { input: error_input() });
        }
        Ok(Self {
            name: name.to_owned(),
            tag: tag.map(str::to_owned),
        })
    }

    /// The Image object that holds this image name: the same string as
    /// [`ImageName::from_object_name`] reads back.
    ///
    /// `rpi` and `rpi:latest` → `rpi`; `rpi:v2` → `rpi.v2` (object names cannot hold `:`).
    pub fn from_object_name(object_name: &str) -> Result<Self, ImageNameError> {
        let image_name = match object_name.split_once('.') {
            Some((name, tag)) => format!("{name}:{tag}"),
            None => object_name.to_owned(),
        };
        Self::parse(&image_name)
    }

    /// The name part (before `:`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tag, `latest` when none was written.
    pub fn tag(&self) -> &str {
        self.tag.as_deref().unwrap_or(DEFAULT_TAG)
    }

    /// The name of the Image object that holds this image (see the type docs).
    pub fn object_name(&self) -> String {
        match self.tag() {
            DEFAULT_TAG => self.name.clone(),
            tag => format!("{}.{tag}", self.name),
        }
    }

    /// The default reference of this image in the lab registry:
    /// `<registry>/<namespace>/<name>:<tag>`.
    pub fn default_reference(&self, registry: &str, namespace: &str) -> String {
        format!(
            "{}/{namespace}/{}:{}",
            registry.trim_end_matches('/'),
            self.name,
            self.tag()
        )
    }
}

impl fmt::Display for ImageName {
    /// Writes the canonical form: `name` for the `latest` tag, else `name:tag`.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.tag() {
            DEFAULT_TAG => formatter.write_str(&self.name),
            tag => write!(formatter, "{}:{tag}", self.name),
        }
    }
}

impl std::str::FromStr for ImageName {
    type Err = ImageNameError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        Self::parse(input)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_walt_names_with_optional_tag() {
        for ok in [
            "rpi",
            "rpi-debian",
            "pc-x86-64-default",
            "a",
            "0",
            "rpi:v2",
            "rpi-3:2024-01",
        ] {
            assert!(ImageName::parse(ok).is_ok(), "{ok} should be valid");
        }
        let parsed = ImageName::parse("rpi-debian:v2").expect("valid");
        assert_eq!(parsed.name(), "rpi-debian");
        assert_eq!(parsed.tag(), "v2");
        assert_eq!(ImageName::parse("rpi").expect("valid").tag(), "latest");
    }

    #[test]
    fn refuses_bad_names_with_the_api_servers_message() {
        for bad in [
            "",
            "Rpi",
            "rpi_debian",
            "rpi:",
            ":v2",
            "rpi:v2:x",
            "-rpi",
            "rpi-",
            "rpi:-v",
            "rpi debian",
            "rpi.v2",
            "rpi:V2",
            "rpi:1.2",
        ] {
            let error = ImageName::parse(bad).expect_err(bad);
            assert!(matches!(error, ImageNameError::Syntax { .. }), "{bad}: {error}");
            assert!(error.to_string().contains(IMAGE_NAME_MESSAGE));
        }
        for reserved in ["default", "default:v2", "default:latest"] {
            let error = ImageName::parse(reserved).expect_err(reserved);
            assert!(error.to_string().contains("reserved"), "{reserved}: {error}");
        }
        assert!(ImageName::parse("default-rpi").is_ok());
        let long = "a".repeat(IMAGE_NAME_MAX_LENGTH + 1);
        assert!(matches!(
            ImageName::parse(&long),
            Err(ImageNameError::TooLong { .. })
        ));
    }

    #[test]
    fn the_length_limit_counts_the_name_as_written() {
        // Found by the image_name fuzz target (fuzz/regressions/image_name/latest-over-the-limit): a name
        // that fits, written again with `:latest`, does not. Like the API server's maxLength, the limit is
        // on the text as written, so the plugin never accepts what the server refuses.
        let name = "x".repeat(IMAGE_NAME_MAX_LENGTH - 6);
        let parsed = ImageName::parse(&name).expect("a name at the limit");
        assert_eq!((parsed.tag(), parsed.to_string()), ("latest", name.clone()));
        let error = ImageName::parse(&format!("{name}:latest")).expect_err("over the limit");
        assert_eq!(
            error.to_string(),
            format!("invalid image name \"{name}:latest\": longer than 128 characters")
        );
    }

    #[test]
    fn maps_to_image_objects_and_back() {
        let cases = [
            ("rpi", "rpi", "rpi"),
            ("rpi:latest", "rpi", "rpi"),
            ("rpi:v2", "rpi.v2", "rpi:v2"),
        ];
        for (input, object, display) in cases {
            let parsed = ImageName::parse(input).expect("valid");
            assert_eq!(parsed.object_name(), object);
            assert_eq!(parsed.to_string(), display);
            assert_eq!(
                ImageName::from_object_name(object).expect("valid").to_string(),
                display
            );
        }
        assert!(ImageName::from_object_name("default").is_err());
    }

    #[test]
    fn default_reference_is_in_the_namespace_repository() {
        let parsed = ImageName::parse("rpi:v2").expect("valid");
        assert_eq!(
            parsed.default_reference("registry.lab:5000/", "team-a"),
            "registry.lab:5000/team-a/rpi:v2"
        );
        let latest = ImageName::parse("rpi").expect("valid");
        assert_eq!(
            latest.default_reference("127.0.0.1:5000", "default"),
            "127.0.0.1:5000/default/rpi:latest"
        );
    }
}

//! Overlay upper dir ↔ OCI layer: whiteouts, opaque directories, exclusions.

//! The reasons a ShellSession's conditions and Events give (one place; logic compares these constants,
//! never message text).

// Image shells.
/// The session's `ttl` is not a duration.
pub const INVALID_TTL: &str = "InvalidTTL";
/// Another shell, copy or save works on the image.
pub const WAITING_FOR_IMAGE: &str = "WaitingForImage";
/// The image shell runs.
pub const SHELL_RUNNING: &str = "ShellRunning";
/// The shell pod was created and starts.
pub const POD_STARTING: &str = "PodStarting";
/// Event: the shell pod was created.
pub const POD_CREATED: &str = "PodCreated";
/// The shell ended with changes; the user picks a name.
pub const AWAITING_DECISION: &str = "AwaitingDecision";
/// The shell ended without changes.
pub const NO_CHANGES: &str = "NoChanges";
/// The shell pod failed.
pub const SHELL_FAILED: &str = "ShellFailed";
/// The user discarded the changes.
pub const DISCARDED: &str = "Discarded";
/// The session expired (ttl, or no decision in time).
pub const EXPIRED: &str = "Expired";
/// The changes were saved as an image.
pub const SAVED: &str = "Saved";
/// The Image does not exist.
pub const IMAGE_NOT_FOUND: &str = "ImageNotFound";
/// The Image is not resolved yet.
pub const IMAGE_NOT_READY: &str = "ImageNotReady";
/// The image has too many layers for a shell (squash first).
pub const TOO_MANY_LAYERS: &str = "TooManyLayers";
/// The shell runtime reported no digest.
pub const NO_DIGEST: &str = "NoDigest";
/// The name to save as is not an image name.
pub const INVALID_IMAGE_NAME: &str = "InvalidImageName";

// Node shells.
/// The session reached its `ttl`.
pub const TTL_EXPIRED: &str = "TTLExpired";
/// No traffic through the gateway for `idleTimeout`.
pub const IDLE_TIMEOUT: &str = "IdleTimeout";
/// `idleTimeout` is not a duration.
pub const INVALID_IDLE_TIMEOUT: &str = "InvalidIdleTimeout";
/// No `publicKey`.
pub const NO_PUBLIC_KEY: &str = "NoPublicKey";
/// `publicKey` is not an OpenSSH public key.
pub const INVALID_PUBLIC_KEY: &str = "InvalidPublicKey";
/// The Node does not exist in the session's namespace.
pub const NODE_NOT_FOUND: &str = "NodeNotFound";
/// The node has no SSH address yet.
pub const NODE_NOT_REACHABLE: &str = "NodeNotReachable";
/// The Node's host key is not usable.
pub const INVALID_HOST_KEY: &str = "InvalidHostKey";
/// The gateway admits the key.
pub const AUTHORIZED: &str = "Authorized";
/// `Failed`: the tenant's runtime namespace cannot be used (the session's namespace is named like one,
/// or a namespace of that name exists that walt did not make for it).
pub const RUNTIME_NAMESPACE_REFUSED: &str = "RuntimeNamespaceRefused";
/// The shell pod was lost under a running shell (evicted, deleted, killed); a new one continues on
/// the changes kept on its cluster node.
pub const SHELL_POD_LOST: &str = "ShellPodLost";

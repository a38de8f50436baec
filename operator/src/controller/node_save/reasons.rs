//! The reasons a NodeSave's `Complete` condition and Events give (one place; logic compares the
//! [`super::failure::Failure`] variants, never message text).

/// `Complete=False`: a save slot is not free (`--max-concurrent-saves`).
pub const WAITING_FOR_SLOT: &str = "WaitingForSlot";
/// `Complete=False`: the save runs (reading the node, pushing by digest).
pub const RUNNING: &str = "Running";
/// `Complete=False`: pushed by digest; the tag is moving.
pub const TAGGING: &str = "Tagging";
/// `Complete=True`: saved, tag moved. Also the final Event.
pub const SAVED: &str = "Saved";
/// Event: the save task started.
pub const STARTED: &str = "Started";
/// Event: a save found running after an operator restart started again from the start.
pub const RESTARTED: &str = "Restarted";
/// Event: the whole image is in the registry by digest.
pub const PUSHED: &str = "Pushed";
/// Event: a progress milestone.
pub const PROGRESS: &str = "Progress";
/// Event: a failure that may pass; the save runs again after a delay.
pub const RETRYING: &str = "Retrying";

// Refusals and failures (see `Failure::reason`).
/// `spec.image` is not an image name.
pub const INVALID_IMAGE_NAME: &str = "InvalidImageName";
/// A `spec.exclude` pattern is not a regular expression.
pub const INVALID_EXCLUDE: &str = "InvalidExclude";
/// The Node does not exist.
pub const NODE_NOT_FOUND: &str = "NodeNotFound";
/// The target image exists and `overwrite` is false.
pub const IMAGE_EXISTS: &str = "ImageExists";
/// The Node has not booted a known image (waits).
pub const NODE_NOT_BOOTED: &str = "NodeNotBooted";
/// The Node is not Ready (waits).
pub const NODE_NOT_READY: &str = "NodeNotReady";
/// Another shell or save holds the target image (waits).
pub const IMAGE_BUSY: &str = "ImageBusy";
/// The image the node booted is no longer held by an Image.
pub const BASE_IMAGE_NOT_FOUND: &str = "BaseImageNotFound";
/// The image the node booted has no usable reference.
pub const BASE_IMAGE_INVALID: &str = "BaseImageInvalid";
/// The image the node booted cannot be read from the registry.
pub const BASE_IMAGE_UNAVAILABLE: &str = "BaseImageUnavailable";
/// The target image is pinned by digest: no tag to move.
pub const IMAGE_REFERENCE_PINNED: &str = "ImageReferencePinned";
/// The node failed during the save (its command, the connection).
pub const NODE_FAILED: &str = "NodeFailed";
/// The node's files cannot be saved as they are (no overlay, no ready marker…).
pub const NODE_NOT_SAVEABLE: &str = "NodeNotSaveable";
/// The operator has no usable registry client (its configuration).
pub const REGISTRY_UNAVAILABLE: &str = "RegistryUnavailable";
/// The registry refused or failed the push.
pub const PUSH_FAILED: &str = "PushFailed";
/// Pushed by digest, but the tag did not move.
pub const TAG_FAILED: &str = "TagFailed";
/// The tag moved, but the Image object could not be updated.
pub const IMAGE_UPDATE_FAILED: &str = "ImageUpdateFailed";
/// A worker of the save pipeline died.
pub const INTERNAL_ERROR: &str = "InternalError";
/// The NodeSave was deleted while it ran (no failure is recorded: the object is gone).
pub const CANCELLED: &str = "Cancelled";

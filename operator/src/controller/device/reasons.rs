//! The reasons of a Device's Events (one place; logic compares these constants, never message text).

/// Event: the Node bound to the device is gone (deleted, released, its namespace deleted,
/// recreated under another uid): `status.boundTo` is cleared, the loan stays.
pub const RELEASED: &str = "Released";
/// Event: the device was taken back from the namespace of the Node bound to it (`spec.lentTo`
/// changed or removed): `status.boundTo` is cleared.
pub const TAKEN_BACK: &str = "TakenBack";
/// Event: the operator made a network-booted Device's SSH host key (its Secret).
pub const HOST_KEY_CREATED: &str = "HostKeyCreated";
/// Event (Warning): a Secret not owned by the Device holds its host key Secret's name.
pub const HOST_KEY_SECRET_NOT_OURS: &str = "HostKeySecretNotOurs";

//! The reasons a Node's conditions and Events give (one place; logic compares these constants,
//! never message text).

/// `Reachable=True`: SSH reached the node.
pub const SSH_OK: &str = "SshOk";
/// `Booted=False` since the operator sent a reboot (its time is when the reboot was sent); also the
/// Event of a reboot.
pub const REBOOTING: &str = "Rebooting";
/// The node still ran the boot from before a reboot past the deadline.
pub const REBOOT_NOT_HAPPENED: &str = "RebootNotHappened";
/// `Booted=False`: the ready marker does not exist yet.
pub const NOT_BOOTED: &str = "NotBooted";
/// `Booted=True`: the ready marker exists.
pub const READY_MARKER: &str = "ReadyMarker";
/// Event: the host key seen on first contact was recorded.
pub const HOST_KEY_RECORDED: &str = "HostKeyRecorded";
/// `Booted=False`: the Image of `spec.image` does not exist or is invalid.
pub const IMAGE_NOT_FOUND: &str = "ImageNotFound";
/// `Booted=False`: the Image of a virtual node is not resolved yet.
pub const IMAGE_NOT_READY: &str = "ImageNotReady";
/// A virtual node's pod runs and is ready.
pub const POD_RUNNING: &str = "PodRunning";
/// A virtual node's pod is starting.
pub const POD_STARTING: &str = "PodStarting";
/// `Booted=False`, `Reachable=False` and a Warning Event: a pod with the virtual node's pod name
/// exists that the Node does not own; the operator neither uses nor replaces it.
pub const POD_NOT_OURS: &str = "PodNotOurs";
/// Event: a virtual node pod was started.
pub const BOOTING: &str = "Booting";
/// `Booted=False` and a Warning Event: the lab runs no VM nodes there (no `--vm-image`, or no
/// `--vm-network` for the Device's boot network).
pub const VM_NOT_CONFIGURED: &str = "VmNotConfigured";
/// `Booted=False` and a Warning Event: the Device of a VM node is not a VM slot (no locally
/// administered MAC, not firmware ipxe) or the node is not amd64.
pub const VM_DEVICE_REFUSED: &str = "VmDeviceRefused";
/// Event: the Node's Device was bound to it (`Device.status.boundTo`).
pub const DEVICE_BOUND: &str = "DeviceBound";
/// `Booted=False` and a Warning Event: the tenant's runtime namespace cannot be used (the Node's
/// namespace is named like one, or a namespace of that name exists that walt did not make for it).
pub const RUNTIME_NAMESPACE_REFUSED: &str = "RuntimeNamespaceRefused";

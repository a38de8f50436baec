//! Making an image change the image of a name, the one way every kind does it (image shell `saveAs`,
//! builds): the pushed manifest is copied to the image's reference (same registry: blobs mounted, same
//! digest), the Image is created or marked updated (the Image controller resolves it again at once,
//! and the Node controller reboots the nodes that boot it: their image's digest moved).

use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use walt_crds::{Image, ImageName, Node};

use super::context::{Context, FIELD_MANAGER};
use super::error::{Error, KubeResultExt, Result};
use super::registry::{RESOLVE_ANNOTATION, lab_reference, registry_client};

/// Where image `target` of `namespace` lives (its Image's reference, else the default), and that
/// Image when it exists.
pub async fn target_reference(
    context: &Context,
    namespace: &str,
    target: &ImageName,
) -> Result<(String, Option<Image>)> {
    let object = target.object_name();
    let existing = Api::<Image>::namespaced(context.client.clone(), namespace)
        .get_opt(&object)
        .await
        .context(|| format!("reading Image {namespace}/{object}"))?;
    let reference = match &existing {
        Some(image) => lab_reference(image, &context.config.args.lab_registry)?,
        None => target.default_reference(&context.config.args.lab_registry, namespace),
    };
    Ok((reference, existing))
}

/// Copies the manifest `pushed` (`repository@digest`) to `target_reference` (moves its tag).
pub async fn copy_pushed(context: &Context, pushed: &str, target_reference: &str) -> Result<()> {
    let registry = registry_client(context)?;
    let resolved = registry
        .resolve(pushed, None)
        .await
        .map_err(|error| Error::Registry(format!("reading the pushed image {pushed}: {error}")))?;
    registry
        .copy_image(&resolved, target_reference, |_| {})
        .await
        .map(|_| ())
        .map_err(|error| Error::Registry(format!("tagging {pushed} as {target_reference}: {error}")))
}

/// Creates the Image `object` of `namespace`, or marks it updated to `digest`; `made_by` is the
/// annotation naming what made it (and that object's uid).
pub async fn mark_image_updated(
    context: &Context,
    namespace: &str,
    object: &str,
    digest: &str,
    made_by: (&str, &str),
) -> Result<()> {
    let (annotation, uid) = made_by;
    let body = serde_json::json!({
        "apiVersion": "walt.dev/v1alpha1",
        "kind": "Image",
        "metadata": {"name": object, "annotations": {
            RESOLVE_ANNOTATION: digest,
            annotation: uid,
        }},
        "spec": {},
    });
    Api::<Image>::namespaced(context.client.clone(), namespace)
        .patch(
            object,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .context(|| format!("updating Image {namespace}/{object}"))?;
    Ok(())
}

/// The Nodes of `namespace` that boot image `name`.
pub async fn nodes_booting(context: &Context, namespace: &str, name: &ImageName) -> Result<Vec<String>> {
    let nodes = Api::<Node>::namespaced(context.client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .context(|| format!("listing Nodes of {namespace}"))?;
    Ok(nodes
        .into_iter()
        .filter(|node| {
            node.spec
                .image
                .as_deref()
                .and_then(|i| ImageName::parse(i).ok())
                .as_ref()
                == Some(name)
        })
        .map(|node| node.name_any())
        .collect())
}

/// How a saved image is told (pure): its name and digest, and the nodes that reboot on it.
pub fn saved_message(what: &str, target: &ImageName, digest: &str, rebooting: &[String]) -> String {
    if rebooting.is_empty() {
        format!("{what} saved as image {target} ({digest})")
    } else {
        format!(
            "{what} saved as image {target} ({digest}); the {} node(s) that boot it reboot: {}",
            rebooting.len(),
            rebooting.join(", ")
        )
    }
}

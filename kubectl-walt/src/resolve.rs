//! Names as users type them → objects: node sets (`a,b`, `all-nodes`), image names
//! (`name[:tag]` → Image object names), the nodes that boot an image.

use kube::api::ListParams;
use walt_crds::{Image, ImageName, Node};

use crate::cluster::Ctx;
use crate::error::{Error, Op, Result};
use crate::format::split_set;

/// WalT's keyword for every node of the namespace.
pub const ALL_NODES: &str = "all-nodes";

/// Parses an image name typed by the user, with the API's own message when it is wrong.
pub fn image_name(input: &str) -> Result<ImageName> {
    ImageName::parse(input).map_err(|e| Error::Invalid(e.to_string()))
}

/// The image name an Image object holds (`rpi.v2` → `rpi:v2`), or the object name itself for
/// objects made outside the plugin with a name the image rule does not accept.
pub fn display_image(object_name: &str) -> String {
    ImageName::from_object_name(object_name).map_or_else(|_| object_name.to_string(), |n| n.to_string())
}

/// Lists all nodes of the namespace.
pub async fn list_nodes(ctx: &Ctx) -> Result<Vec<Node>> {
    let mut nodes = ctx
        .nodes()
        .list(&ListParams::default())
        .await
        .map_err(|e| {
            Error::api(
                Op::collection("list", "node", "nodes.walt.dev", &ctx.namespace),
                e,
            )
        })?
        .items;
    nodes.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    Ok(nodes)
}

/// Lists all images of the namespace.
pub async fn list_images(ctx: &Ctx) -> Result<Vec<Image>> {
    let mut images = ctx
        .images()
        .list(&ListParams::default())
        .await
        .map_err(|e| {
            Error::api(
                Op::collection("list", "image", "images.walt.dev", &ctx.namespace),
                e,
            )
        })?
        .items;
    images.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    Ok(images)
}

/// Resolves a node set to nodes, failing on the first unknown name (all of them are named).
pub async fn node_set(ctx: &Ctx, set: &str) -> Result<Vec<Node>> {
    let names = split_set(set);
    if names.is_empty() {
        return Err(Error::Invalid(format!(
            "no node given in {set:?}: write NODE, NODE1,NODE2 or {ALL_NODES}"
        )));
    }
    let all = list_nodes(ctx).await?;
    if names.iter().any(|n| n == ALL_NODES) {
        if all.is_empty() {
            return Err(Error::Invalid(format!(
                "there is no node in namespace {:?}",
                ctx.namespace
            )));
        }
        return Ok(all);
    }
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for name in &names {
        match all.iter().find(|n| n.metadata.name.as_deref() == Some(name)) {
            Some(node) => found.push(node.clone()),
            None => missing.push(name.clone()),
        }
    }
    match missing.len() {
        0 => Ok(found),
        1 => Err(Error::NotFound {
            kind: "node",
            name: missing.remove(0),
            namespace: ctx.namespace.clone(),
            hint: "list the nodes with `kubectl walt node ls` (and check -n/--namespace)".into(),
        }),
        _ => Err(Error::Invalid(format!(
            "nodes {} not found in namespace {:?}: list the nodes with `kubectl walt node ls`",
            missing.join(", "),
            ctx.namespace
        ))),
    }
}

/// The name of an object (empty when unset, which the API never returns).
pub fn name_of<K: kube::Resource>(object: &K) -> String {
    object.meta().name.clone().unwrap_or_default()
}

/// Whether `node` boots `image` (its spec names it, in any spelling of the same image name).
pub fn boots(node: &Node, image: &ImageName) -> bool {
    node.spec
        .image
        .as_deref()
        .and_then(|i| ImageName::parse(i).ok())
        .is_some_and(|i| i.object_name() == image.object_name())
}

/// The nodes (names) that boot `image`.
pub fn nodes_booting(nodes: &[Node], image: &ImageName) -> Vec<String> {
    nodes.iter().filter(|n| boots(n, image)).map(name_of).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use walt_crds::NodeSpec;

    fn node(name: &str, image: Option<&str>) -> Node {
        let mut n = Node::new(
            name,
            NodeSpec {
                model: "rpi-3-b".into(),
                image: image.map(str::to_string),
                ..NodeSpec::default()
            },
        );
        n.metadata.namespace = Some("lab".into());
        n
    }

    #[test]
    fn nodes_booting_matches_every_spelling() {
        let nodes = vec![
            node("a", Some("rpi")),
            node("b", Some("rpi:latest")),
            node("c", Some("rpi:v2")),
            node("d", None),
        ];
        let rpi = image_name("rpi").expect("valid");
        assert_eq!(nodes_booting(&nodes, &rpi), ["a", "b"]);
        let v2 = image_name("rpi:v2").expect("valid");
        assert_eq!(nodes_booting(&nodes, &v2), ["c"]);
    }

    #[test]
    fn image_names_map_to_objects() {
        assert_eq!(image_name("rpi:v2").expect("valid").object_name(), "rpi.v2");
        assert_eq!(display_image("rpi.v2"), "rpi:v2");
        assert_eq!(display_image("Weird_Name"), "Weird_Name");
        let e = image_name("Bad").expect_err("invalid");
        assert!(e.to_string().contains("invalid image name \"Bad\""));
    }
}

//! Finding the objects another one names, within the tenant's namespace
//! (and the read-only shared image catalog).

use kube::Api;

use super::context::Context;
use super::error::{Error, Result};

/// [`find_image`], read from the watch cache first ([`super::caches`]): what the cache has is the
/// answer; what it does not have (an Image not created yet, or in a namespace this operator does not
/// watch) is asked from the API server. For the Node controller, which reads an Image on every probe.
pub async fn find_image_cached(
    context: &Context,
    namespace: &str,
    image_name: &str,
) -> Result<Option<(walt_crds::Image, bool)>> {
    if let Some(caches) = context.caches.get() {
        let object = walt_crds::ImageName::parse(image_name)
            .map_err(|error| Error::Invalid(error.to_string()))?
            .object_name();
        if let Some(image) = caches.image(namespace, &object) {
            return Ok(Some((image, false)));
        }
        let catalog_namespace = &context.config.args.catalog_namespace;
        if catalog_namespace != namespace
            && let Some(image) = caches.image(catalog_namespace, &object)
        {
            return Ok(Some((image, true)));
        }
    }
    find_image(context, namespace, image_name).await
}

/// Finds the Image an image name (`name[:tag]`) means for objects of
/// `namespace`: that namespace's Image first, else the shared catalog's
/// (read-only: the operator never writes catalog Images on a tenant's
/// behalf). Returns the Image and whether it came from the catalog.
pub async fn find_image(
    context: &Context,
    namespace: &str,
    image_name: &str,
) -> Result<Option<(walt_crds::Image, bool)>> {
    let object = walt_crds::ImageName::parse(image_name)
        .map_err(|error| Error::Invalid(error.to_string()))?
        .object_name();
    let local: Api<walt_crds::Image> = Api::namespaced(context.client.clone(), namespace);
    if let Some(image) = local
        .get_opt(&object)
        .await
        .map_err(|source| Error::kube(format!("reading Image {namespace}/{object}"), source))?
    {
        return Ok(Some((image, false)));
    }
    let catalog_namespace = &context.config.args.catalog_namespace;
    if catalog_namespace == namespace {
        return Ok(None);
    }
    let catalog: Api<walt_crds::Image> = Api::namespaced(context.client.clone(), catalog_namespace);
    match catalog.get_opt(&object).await {
        Ok(found) => Ok(found.map(|image| (image, true))),
        // No catalog namespace, or no right to read it: simply not found.
        Err(kube::Error::Api(status)) if status.code == 403 || status.code == 404 => Ok(None),
        Err(source) => Err(Error::kube(
            format!("reading Image {catalog_namespace}/{object}"),
            source,
        )),
    }
}

/// The Images objects of `namespace` may name: that namespace's and the shared catalog's (as
/// [`find_image`] looks them up, one by one).
pub async fn images_for(context: &Context, namespace: &str) -> Result<Vec<walt_crds::Image>> {
    let params = kube::api::ListParams::default();
    let local: Api<walt_crds::Image> = Api::namespaced(context.client.clone(), namespace);
    let mut images = local
        .list(&params)
        .await
        .map_err(|source| Error::kube(format!("listing the Images of {namespace}"), source))?
        .items;
    let catalog_namespace = &context.config.args.catalog_namespace;
    if catalog_namespace != namespace {
        let catalog: Api<walt_crds::Image> = Api::namespaced(context.client.clone(), catalog_namespace);
        match catalog.list(&params).await {
            Ok(found) => images.extend(found.items),
            // No catalog namespace, or no right to read it: no catalog Images.
            Err(kube::Error::Api(status)) if status.code == 403 || status.code == 404 => {}
            Err(source) => {
                return Err(Error::kube(
                    format!("listing the Images of {catalog_namespace}"),
                    source,
                ));
            }
        }
    }
    Ok(images)
}

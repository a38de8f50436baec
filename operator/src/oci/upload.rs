//! A blob upload of unknown size in one streamed request: `POST` opens the upload, one `PATCH` carries the
//! whole stream (chunked transfer encoding, as `docker push` sends layers), `PUT ?digest=` closes it.
//!
//! oci-client's streamed upload sends one `PATCH` per 4 MiB at most; the registry (distribution) reopens the
//! upload file and stores its hash state after each, which made the upload the slowest step of a commit
//! (a 64 MiB blob on loopback: 3.9 s in 2 MiB PATCHes vs 0.6 s streamed, measured with curl).

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Reference, RegistryOperation};
use reqwest::{StatusCode, Url};
use sha2::{Digest as _, Sha256};

use super::registry::RegistryClient;

/// A blob uploaded by [`RegistryClient::push_blob_streamed`].
pub(super) struct StreamedBlob {
    /// `sha256:<hex>` of what was sent.
    pub(super) digest: String,
    /// Bytes sent.
    pub(super) size: u64,
}

/// What went through the upload so far (the body stream is moved into the request).
#[derive(Default)]
struct Tally {
    hasher: Sha256,
    size: u64,
}

impl RegistryClient {
    /// Uploads `chunks` (an `Err` aborts the upload: the registry never gets a truncated blob) as one blob of
    /// `target`'s repository and returns its digest and size.
    pub(super) async fn push_blob_streamed<S>(
        &self,
        target: &Reference,
        chunks: S,
    ) -> Result<StreamedBlob, OciDistributionError>
    where
        S: Stream<Item = Result<Bytes, OciDistributionError>> + Send + 'static,
    {
        let registry = target.resolve_registry();
        let scheme = if self.insecure_registries.iter().any(|host| host == registry) {
            "http"
        } else {
            "https"
        };
        let start = parse_url(&format!(
            "{scheme}://{registry}/v2/{}/blobs/uploads/",
            target.repository()
        ))?;
        let http = self.http()?;
        let authorization = self.authorization(target).await?;
        let authorized = |request: reqwest::RequestBuilder| match &authorization {
            Authorization::Bearer(token) => request.bearer_auth(token),
            Authorization::Basic(user, password) => request.basic_auth(user, Some(password)),
            Authorization::Anonymous => request,
        };

        let opened = authorized(http.post(start))
            .header(reqwest::header::CONTENT_LENGTH, 0)
            .send()
            .await?;
        let location = upload_location(opened, StatusCode::ACCEPTED).await?;

        let tally = Arc::new(Mutex::new(Tally::default()));
        let counted = Arc::clone(&tally);
        let body = chunks.map(move |chunk| {
            if let Ok(bytes) = &chunk
                && let Ok(mut tally) = counted.lock()
            {
                tally.hasher.update(bytes);
                tally.size += bytes.len() as u64;
            }
            chunk
        });
        let sent = authorized(http.patch(location))
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await?;
        let mut location = upload_location(sent, StatusCode::ACCEPTED).await?;

        let Tally { hasher, size } = std::mem::take(
            &mut *tally
                .lock()
                .map_err(|_| OciDistributionError::GenericError(Some("upload tally poisoned".into())))?,
        );
        if size == 0 {
            return Err(OciDistributionError::PushNoDataError);
        }
        let digest = format!("sha256:{}", hex::encode(hasher.finalize()));
        location.query_pairs_mut().append_pair("digest", &digest);
        let closed = authorized(http.put(location))
            .header(reqwest::header::CONTENT_LENGTH, 0)
            .send()
            .await?;
        upload_location(closed, StatusCode::CREATED).await?;
        Ok(StreamedBlob { digest, size })
    }

    /// How our own requests authenticate: the bearer token oci-client got for a push to `target` (it asks the
    /// registry), else the basic credentials for that host, else none.
    async fn authorization(&self, target: &Reference) -> Result<Authorization, OciDistributionError> {
        let credentials = self.auth_for(target);
        if let Some(token) = self
            .inner
            .auth(target, &credentials, RegistryOperation::Push)
            .await?
        {
            return Ok(Authorization::Bearer(token));
        }
        Ok(match credentials {
            RegistryAuth::Basic(user, password) => Authorization::Basic(user, password),
            RegistryAuth::Bearer(token) => Authorization::Bearer(token),
            RegistryAuth::Anonymous => Authorization::Anonymous,
        })
    }
}

enum Authorization {
    Bearer(String),
    Basic(String, String),
    Anonymous,
}

fn parse_url(text: &str) -> Result<Url, OciDistributionError> {
    Url::parse(text).map_err(|e| OciDistributionError::UrlParseError(format!("{text}: {e}")))
}

/// The upload's next URL (its `Location`, relative to the request's URL) when the registry answered
/// `expected`; otherwise an error with the registry's status and body.
async fn upload_location(
    response: reqwest::Response,
    expected: StatusCode,
) -> Result<Url, OciDistributionError> {
    let url = response.url().clone();
    if response.status() != expected {
        let code = response.status().as_u16();
        let message = response.text().await.unwrap_or_default();
        return Err(OciDistributionError::ServerError {
            code,
            url: url.to_string(),
            message,
        });
    }
    let location = response
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|value| value.to_str().ok())
        .ok_or_else(|| OciDistributionError::RegistryNoLocationError)?;
    url.join(location)
        .map_err(|e| OciDistributionError::UrlParseError(format!("Location {location}: {e}")))
}

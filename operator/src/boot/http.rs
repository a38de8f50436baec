//! HTTP boot (iPXE): `GET /boot/<file>` serves `<file>` of the client's image `/boot/<model>/`, the
//! client told by its address.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::state::{self, BootState};
use super::tftp::boot_path;

/// Largest boot file served over HTTP (kernels and initramfs images are far smaller).
pub const MAX_FILE: u64 = 1 << 30;

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body + "\n")));
    *response.status_mut() = status;
    response
}

/// Answers one request from `client`.
pub fn respond(state: &BootState, client: IpAddr, method: &Method, path: &str) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "read-only: GET or HEAD".into());
    }
    let Some(file) = path.strip_prefix("/boot/") else {
        return text(
            StatusCode::NOT_FOUND,
            format!("{path}: boot files are under /boot/"),
        );
    };
    let binding = state.by_ip(client);
    let mut served = state::served("http", binding.as_ref(), client, path);
    let Some(binding) = binding else {
        served.refused = Some("unknown device".into());
        state.record(served);
        return text(StatusCode::FORBIDDEN, format!("no image is served to {client}"));
    };
    let image_path = boot_path(&binding.model, file);
    let found = binding
        .view
        .resolve(image_path.as_bytes())
        .map_err(|e| e.to_string())
        .and_then(
            |id| match binding.view.inode(id).map(|i| (&i.kind, i.attr.size)) {
                Some((kind, size)) if kind.is_file() && size <= MAX_FILE => Ok((id, size)),
                Some((kind, _)) if kind.is_file() => Err("larger than 1 GiB".into()),
                _ => Err("not a regular file".into()),
            },
        );
    let (id, size) = match found {
        Ok(found) => found,
        Err(reason) => {
            served.digest = None;
            served.refused = Some(reason.clone());
            state.record(served);
            return text(StatusCode::NOT_FOUND, format!("{image_path}: {reason}"));
        }
    };
    let data = if method == Method::HEAD {
        Ok(Vec::new())
    } else {
        binding
            .view
            .read(id, 0, size.min(u64::from(u32::MAX)) as u32)
            .map(|(d, _)| d)
    };
    match data {
        Ok(data) => {
            state.record(served);
            let mut response = Response::new(Full::new(Bytes::from(data)));
            if let Ok(length) = size.to_string().parse() {
                response
                    .headers_mut()
                    .insert(http::header::CONTENT_LENGTH, length);
            }
            response
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{image_path}: {e}")),
    }
}

/// Serves HTTP on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<BootState>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let state = state.clone();
                async move {
                    let method = request.method().clone();
                    let path = request.uri().path().to_string();
                    let response =
                        tokio::task::spawn_blocking(move || respond(&state, peer.ip(), &method, &path))
                            .await
                            .unwrap_or_else(|e| text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()));
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%error, "HTTP connection ended with an error");
            }
        });
    }
}

/// One device in `GET /boots`: its boot record and the verdict on it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BootStatus {
    /// What the boot service saw.
    #[serde(flatten)]
    pub record: super::state::BootRecord,
    /// Whether the node booted what it was served.
    pub verdict: super::verify::Verdict,
}

/// The body of `GET /boots` (pure).
pub fn boots_json(state: &BootState) -> String {
    let boots: Vec<BootStatus> = state
        .records()
        .into_iter()
        .map(|record| BootStatus {
            verdict: super::verify::verify(&record),
            record,
        })
        .collect();
    serde_json::to_string_pretty(&boots).unwrap_or_else(|_| "[]".into())
}

/// Serves the boot records (`GET /boots`, JSON) on `listener` until the task is dropped.
pub async fn serve_status(listener: TcpListener, state: Arc<BootState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let state = state.clone();
                async move {
                    let response = if request.method() == Method::GET && request.uri().path() == "/boots" {
                        let mut response = Response::new(Full::new(Bytes::from(boots_json(&state))));
                        response.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("application/json"),
                        );
                        response
                    } else {
                        text(StatusCode::NOT_FOUND, "GET /boots".into())
                    };
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%error, "status connection ended with an error");
            }
        });
    }
}

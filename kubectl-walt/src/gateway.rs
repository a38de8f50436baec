//! Reaching the operator's SSH gateway: a port-forward to one of the pods behind its Service
//! (what `kubectl port-forward svc/…` does), or a direct TCP connection when
//! `--gateway-address`/`WALT_GATEWAY_ADDRESS` says where it is (an operator run outside the
//! cluster, in development and tests).

use std::pin::Pin;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Api;
use kube::api::ListParams;
use tokio::io::{AsyncRead, AsyncWrite};
use walt_crds::Gateway;

use crate::cluster::Ctx;
use crate::error::{Error, Op, Result};

/// The namespace of the gateway Service when `status.gateway.service` does not carry one.
pub const DEFAULT_OPERATOR_NAMESPACE: &str = "walt-system";

/// A byte stream to the gateway.
pub trait GatewayIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> GatewayIo for T {}

/// An open connection to the gateway; keeps the port-forward alive while it lives.
pub struct Connection {
    /// The stream.
    pub stream: Pin<Box<dyn GatewayIo>>,
    /// What it goes through, for messages.
    pub via: String,
    forwarder: Option<kube::api::Portforwarder>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("via", &self.via)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Splits off the stream, keeping the port-forward alive in the returned guard.
    pub fn into_parts(self) -> (Pin<Box<dyn GatewayIo>>, ForwardGuard) {
        (self.stream, ForwardGuard(self.forwarder))
    }
}

/// Keeps a port-forward running until dropped.
pub struct ForwardGuard(Option<kube::api::Portforwarder>);

impl std::fmt::Debug for ForwardGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ForwardGuard")
    }
}

impl Drop for ForwardGuard {
    fn drop(&mut self) {
        if let Some(forwarder) = self.0.take() {
            forwarder.abort();
        }
    }
}

/// Splits `status.gateway.service` (`name`, `name.namespace`, or `name.namespace.svc…`).
pub fn service_location(service: &str) -> (String, String) {
    let mut parts = service.split('.');
    let name = parts.next().unwrap_or_default().to_string();
    let namespace = parts
        .next()
        .filter(|n| !n.is_empty())
        .map_or_else(operator_namespace, str::to_string);
    (name, namespace)
}

fn operator_namespace() -> String {
    std::env::var("WALT_OPERATOR_NAMESPACE").unwrap_or_else(|_| DEFAULT_OPERATOR_NAMESPACE.into())
}

/// Opens a connection to the gateway a session points at.
pub async fn connect(ctx: &Ctx, gateway: &Gateway) -> Result<Connection> {
    if let Some(address) = &ctx.global.gateway_address {
        let stream = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|e| Error::Io {
                context: format!("cannot reach the walt gateway at {address} (--gateway-address)"),
                source: e,
            })?;
        let _ = stream.set_nodelay(true);
        return Ok(Connection {
            stream: Box::pin(stream),
            via: address.clone(),
            forwarder: None,
        });
    }
    let (service_name, namespace) = service_location(&gateway.service);
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &namespace);
    let service = services.get(&service_name).await.map_err(|e| {
        Error::api(
            Op::named("get", "gateway service", "services", &service_name, &namespace),
            e,
        )
    })?;
    let spec = service.spec.clone().unwrap_or_default();
    let port = spec
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|p| p.port == gateway.port)
        .cloned()
        .ok_or_else(|| {
            Error::Failed(format!(
                "the walt gateway service {namespace}/{service_name} has no port {}: the operator's configuration and its Service disagree; tell your lab admin",
                gateway.port
            ))
        })?;
    let selector = spec.selector.unwrap_or_default();
    if selector.is_empty() {
        return Err(Error::Failed(format!(
            "the walt gateway service {namespace}/{service_name} selects no pod: it cannot be port-forwarded; use --gateway-address HOST:PORT"
        )));
    }
    let labels: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let list = pods
        .list(&ListParams::default().labels(&labels.join(",")))
        .await
        .map_err(|e| Error::api(Op::collection("list", "gateway pod", "pods", &namespace), e))?;
    let pod = list
        .items
        .into_iter()
        .find(pod_ready)
        .ok_or_else(|| Error::Failed(format!(
            "no ready pod behind the walt gateway service {namespace}/{service_name}: is the operator running? (`kubectl -n {namespace} get pods`)"
        )))?;
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    let target = match &port.target_port {
        Some(IntOrString::Int(p)) => *p,
        Some(IntOrString::String(name)) => named_port(&pod, name).ok_or_else(|| {
            Error::Failed(format!(
                "the gateway pod {namespace}/{pod_name} has no port named {name:?}"
            ))
        })?,
        None => port.port,
    };
    let target = u16::try_from(target)
        .map_err(|_| Error::Failed(format!("the gateway port {target} is not a TCP port")))?;
    let mut forwarder = pods.portforward(&pod_name, &[target]).await.map_err(|e| {
        Error::api(
            Op::named(
                "create",
                "port-forward to the gateway pod",
                "pods/portforward",
                &pod_name,
                &namespace,
            ),
            e,
        )
    })?;
    let stream = forwarder
        .take_stream(target)
        .ok_or_else(|| Error::Failed("the port-forward gave no stream".into()))?;
    Ok(Connection {
        stream: Box::pin(stream),
        via: format!("port-forward to {namespace}/{pod_name}:{target}"),
        forwarder: Some(forwarder),
    })
}

fn pod_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod.status.as_ref().is_some_and(|s| {
            s.phase.as_deref() == Some("Running")
                && s.conditions
                    .as_deref()
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

fn named_port(pod: &Pod, name: &str) -> Option<i32> {
    pod.spec.as_ref()?.containers.iter().find_map(|c| {
        c.ports
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_with_and_without_namespace() {
        assert_eq!(
            service_location("walt-gateway.walt"),
            ("walt-gateway".to_string(), "walt".to_string())
        );
        assert_eq!(
            service_location("walt-gateway.lab.svc.cluster.local"),
            ("walt-gateway".to_string(), "lab".to_string())
        );
        let (name, _) = service_location("walt-gateway");
        assert_eq!(name, "walt-gateway");
    }
}

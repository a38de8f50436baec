//! The operator's registry token issuer against a real Distribution registry (Debian's
//! `docker-registry`, token authentication configured with the issuer's certificate), checked with
//! skopeo (an independent client) and with walt's own registry client.
//!
//! Issue 15: a namespace's credential gets tokens for its own path and for pulling the catalog,
//! and nothing of another namespace's path: the registry itself refuses (401) what the token does
//! not grant, so a tenant holding its credential cannot read or overwrite bob's images, nor write
//! the catalog, whatever client it uses.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use walt_operator::oci::token_issuer::{IssuerConfig, TENANT_USER_PREFIX, TokenIssuer, serve};
use walt_operator::oci::{ClientOptions, Credentials, RegistryClient};
use walt_tests::images::{Arch, OciLayout};
use walt_tests::registry::{Registry, TokenAuth, token_signing_key};

const LAB_USER: &str = "walt";
const LAB_PASSWORD: &str = "lab-password-for-tests";

/// `skopeo copy` of the layout's `base` to `reference` as `user:password`; Err has skopeo's words.
fn skopeo_push(layout: &OciLayout, reference: &str, creds: &str) -> Result<(), String> {
    let out = Command::new("skopeo")
        .args(["copy", "--dest-tls-verify=false", "--dest-creds", creds])
        .arg(format!("oci:{}:base", layout.path().display()))
        .arg(format!("docker://{reference}"))
        .output()
        .map_err(|e| format!("running skopeo: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `skopeo inspect` digest of `reference` as `user:password`; Err has skopeo's words.
fn skopeo_digest(reference: &str, creds: &str) -> Result<String, String> {
    let out = Command::new("skopeo")
        .args([
            "inspect",
            "--tls-verify=false",
            "--creds",
            creds,
            "--format",
            "{{.Digest}}",
        ])
        .arg(format!("docker://{reference}"))
        .output()
        .map_err(|e| format!("running skopeo: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn client(host: &str, user: &str, password: &str) -> RegistryClient {
    RegistryClient::new(ClientOptions {
        credentials: Credentials::default().with_basic(host, user, password),
        insecure_registries: vec![host.to_owned()],
        timeout: None,
    })
    .expect("a registry client")
}

/// The lab's token issuer as the operator runs it (lab credential, `walt/` prefix, a catalog namespace).
fn lab_issuer(key_pem: String) -> Arc<TokenIssuer> {
    Arc::new(
        TokenIssuer::new(IssuerConfig {
            key_pem,
            tenant_secret: b"a tenant secret for the test only".to_vec(),
            issuer: "walt-test".into(),
            service: "walt-registry".into(),
            lab_credential: Some((LAB_USER.into(), LAB_PASSWORD.into())),
            prefix: "walt".into(),
            catalog_namespace: "walt-catalog".into(),
            lifetime: Duration::from_mins(5),
        })
        .expect("the issuer accepts a PKCS#8 P-256 key"),
    )
}

/// A Distribution registry whose tokens come from `endpoint` (`GET /token`), signed by `cert_pem`'s key.
async fn registry_with_tokens_from(endpoint: std::net::SocketAddr, cert_pem: String) -> Registry {
    tokio::task::spawn_blocking(move || {
        Registry::start_with_token_auth(&TokenAuth {
            realm: format!("http://{endpoint}/token"),
            service: "walt-registry".into(),
            issuer: "walt-test".into(),
            root_cert_pem: cert_pem,
        })
    })
    .await
    .expect("join")
    .expect("start docker-registry with token auth")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_token_reaches_its_own_path_and_pulls_the_catalog_and_nothing_of_bob() {
    let (key_pem, cert_pem) = token_signing_key().expect("a token signing key");
    let issuer = lab_issuer(key_pem);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let endpoint = serve(
        "127.0.0.1:0".parse().expect("address"),
        issuer.clone(),
        shutdown.clone(),
    )
    .await
    .expect("serve the token endpoint on loopback");
    let registry = registry_with_tokens_from(endpoint, cert_pem).await;
    let host = registry.host();
    let lab = format!("{LAB_USER}:{LAB_PASSWORD}");
    let alice = format!("{TENANT_USER_PREFIX}alice:{}", issuer.tenant_password("alice"));
    let host_for_blocking = host.clone();
    let (layout, bob_digest, catalog_digest) = tokio::task::spawn_blocking(move || {
        let layout = OciLayout::busybox(Arch::Amd64).expect("busybox image");
        // The lab seeds bob's image and the catalog with its own credential (every action).
        skopeo_push(&layout, &format!("{host_for_blocking}/walt/bob/secret:1"), &lab)
            .expect("lab pushes bob's image");
        skopeo_push(
            &layout,
            &format!("{host_for_blocking}/walt/walt-catalog/base:1"),
            &lab,
        )
        .expect("lab pushes the catalog");
        let bob =
            skopeo_digest(&format!("{host_for_blocking}/walt/bob/secret:1"), &lab).expect("bob's digest");
        let catalog = skopeo_digest(&format!("{host_for_blocking}/walt/walt-catalog/base:1"), &lab)
            .expect("catalog digest");
        (layout, bob, catalog)
    })
    .await
    .expect("join");
    let mark = registry.log_mark();

    // skopeo with alice's credential: her path works both ways, the catalog reads, bob is refused.
    let host_for_blocking = host.clone();
    let alice_for_blocking = alice.clone();
    let (own, catalog_read, bob_read, bob_write, catalog_write) = tokio::task::spawn_blocking(move || {
        let own = skopeo_push(
            &layout,
            &format!("{host_for_blocking}/walt/alice/mine:1"),
            &alice_for_blocking,
        )
        .and_then(|()| {
            skopeo_digest(
                &format!("{host_for_blocking}/walt/alice/mine:1"),
                &alice_for_blocking,
            )
        });
        let catalog_read = skopeo_digest(
            &format!("{host_for_blocking}/walt/walt-catalog/base:1"),
            &alice_for_blocking,
        );
        let bob_read = skopeo_digest(
            &format!("{host_for_blocking}/walt/bob/secret:1"),
            &alice_for_blocking,
        );
        let bob_write = skopeo_push(
            &layout,
            &format!("{host_for_blocking}/walt/bob/secret:1"),
            &alice_for_blocking,
        );
        let catalog_write = skopeo_push(
            &layout,
            &format!("{host_for_blocking}/walt/walt-catalog/base:1"),
            &alice_for_blocking,
        );
        (own, catalog_read, bob_read, bob_write, catalog_write)
    })
    .await
    .expect("join");
    assert!(
        own.as_deref().is_ok_and(|d| d.starts_with("sha256:")),
        "alice's own path: {own:?}"
    );
    assert_eq!(
        catalog_read.as_deref(),
        Ok(catalog_digest.as_str()),
        "alice reads the catalog"
    );
    let refused = |result: &Result<String, String>| {
        result
            .as_ref()
            .is_err_and(|e| e.contains("unauthorized") || e.contains("401") || e.contains("denied"))
    };
    assert!(refused(&bob_read), "alice read bob's image: {bob_read:?}");
    assert!(
        refused(&bob_write.clone().map(|()| String::new())),
        "alice pushed to bob's path: {bob_write:?}"
    );
    assert!(
        refused(&catalog_write.clone().map(|()| String::new())),
        "alice pushed to the catalog: {catalog_write:?}"
    );

    // walt's own client with alice's credential: the same.
    let alice_client = client(
        &host,
        &format!("{TENANT_USER_PREFIX}alice"),
        &issuer.tenant_password("alice"),
    );
    alice_client
        .resolve(&format!("{host}/walt/alice/mine:1"), None)
        .await
        .expect("alice resolves her image");
    let catalog = alice_client
        .resolve(&format!("{host}/walt/walt-catalog/base:1"), None)
        .await
        .expect("alice resolves the catalog");
    assert_eq!(catalog.digest, catalog_digest);
    let error = alice_client
        .resolve(&format!("{host}/walt/bob/secret:1"), None)
        .await
        .expect_err("alice resolved bob's image");
    assert!(
        !error.is_not_found(),
        "bob's image must be refused, not hidden: {error}"
    );
    // A copy of the catalog image into her path mounts its blobs (a token for both repositories),
    // nothing is uploaded again.
    let before_copy = registry.log_mark();
    let copied = alice_client
        .copy_image(&catalog, &format!("{host}/walt/alice/from-catalog:1"), |_| {})
        .await
        .expect("alice copies the catalog image into her path");
    assert_eq!(copied, catalog_digest);
    let requests = registry.requests_to("walt/alice/from-catalog/blobs/uploads", before_copy);
    let mounted = requests
        .iter()
        .filter(|line| line.contains("mount=") && line.contains("\" 201 "))
        .count();
    let uploaded: Vec<&String> = requests
        .iter()
        .filter(|line| line.contains("\"PATCH ") || line.contains("\"PUT "))
        .collect();
    assert!(
        mounted >= 1 && uploaded.is_empty(),
        "every blob mounted, none uploaded: {requests:#?}"
    );
    let copy = alice_client
        .copy_image(&catalog, &format!("{host}/walt/bob/secret:1"), |_| {})
        .await;
    assert!(copy.is_err(), "alice's client copied over bob's image");
    // Bob's credential is not alice's: a forged user or a wrong password gets no token at all.
    let forged = client(
        &host,
        &format!("{TENANT_USER_PREFIX}bob"),
        &issuer.tenant_password("alice"),
    );
    assert!(
        forged
            .resolve(&format!("{host}/walt/bob/secret:1"), None)
            .await
            .is_err()
    );

    // The registry itself refused alice on bob's path (401), served her nothing there, and nothing moved.
    let (refused_there, served): (Vec<String>, Vec<String>) = registry
        .requests_to("walt/bob/", mark)
        .into_iter()
        .partition(|line| line.contains("\" 401 "));
    assert!(
        !refused_there.is_empty(),
        "no request of alice reached bob's path: was it refused before the registry?"
    );
    assert!(
        served.is_empty(),
        "the registry answered alice on bob's path: {served:#?}"
    );
    let lab = format!("{LAB_USER}:{LAB_PASSWORD}");
    let host_for_blocking = host.clone();
    let (bob_after, catalog_after) = tokio::task::spawn_blocking(move || {
        (
            skopeo_digest(&format!("{host_for_blocking}/walt/bob/secret:1"), &lab),
            skopeo_digest(&format!("{host_for_blocking}/walt/walt-catalog/base:1"), &lab),
        )
    })
    .await
    .expect("join");
    assert_eq!(bob_after, Ok(bob_digest), "bob's tag moved");
    assert_eq!(catalog_after, Ok(catalog_digest), "the catalog's tag moved");
    shutdown.cancel();
    drop(registry);
}

/// Issue 17 (found by the load benchmark: after an operator restart every Image went `ResolveFailed`
/// "unauthorized … check the credentials" for good): when the token service cannot be reached, the
/// registry client says so, as a transient error (the controllers retry it), instead of sending the
/// request without a token and reporting the registry's 401 as wrong credentials; once the token
/// service is back, the same client resolves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_service_away_is_named_and_retried_not_taken_for_wrong_credentials() {
    let (key_pem, cert_pem) = token_signing_key().expect("a token signing key");
    let issuer = lab_issuer(key_pem);
    let first_run = tokio_util::sync::CancellationToken::new();
    let endpoint = serve(
        "127.0.0.1:0".parse().expect("address"),
        issuer.clone(),
        first_run.clone(),
    )
    .await
    .expect("serve the token endpoint on loopback");
    let registry = registry_with_tokens_from(endpoint, cert_pem).await;
    let host = registry.host();
    let lab = format!("{LAB_USER}:{LAB_PASSWORD}");
    let reference = format!("{host}/walt/alice/base:1");
    let pushed_to = reference.clone();
    let digest = tokio::task::spawn_blocking(move || {
        let layout = OciLayout::busybox(Arch::Amd64).expect("busybox image");
        skopeo_push(&layout, &pushed_to, &lab).expect("the lab pushes an image");
        skopeo_digest(&pushed_to, &lab).expect("its digest")
    })
    .await
    .expect("join");

    // The token service goes away (as while the operator restarts); a client that has no token yet.
    first_run.cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let alice = client(
        &host,
        &format!("{TENANT_USER_PREFIX}alice"),
        &issuer.tenant_password("alice"),
    );
    let error = alice
        .resolve(&reference, None)
        .await
        .expect_err("resolved with no token service");
    let said = error.to_string();
    eprintln!("with the token service away: {said}");
    assert!(
        said.contains("authenticating") && said.contains(&format!("{endpoint}")),
        "the error must name the token service that could not be reached: {said}"
    );
    assert!(
        !said.contains("check the credentials"),
        "a token service away is not a credential problem: {said}"
    );
    assert!(
        error.is_transient(),
        "must be retried, not failed for good: {said}"
    );

    // Back on the same address: the same client resolves.
    let second_run = tokio_util::sync::CancellationToken::new();
    serve(endpoint, issuer.clone(), second_run.clone())
        .await
        .expect("serve the token endpoint again on the same address");
    let resolved = alice
        .resolve(&reference, None)
        .await
        .expect("resolves once the token service is back");
    assert_eq!(resolved.digest, digest);
    second_run.cancel();
    drop(registry);
}

//! `image ls|show|clone|rm|rename|duplicate|squash`.

use std::time::Instant;

use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use walt_crds::image::reasons;
use walt_crds::{Image, ImageName, ImageSpec, Platform, SecretReference};

use crate::cli::OutputFormat;
use crate::cluster::{Ctx, tick};
use crate::describe::{image_page, image_table};
use crate::dialogue::{confirm, overwrite_question};
use crate::error::{Error, Op, Result};
use crate::format::{bytes, clock, serialize_objects, short_digest, split_set};
use crate::progress::{Progress, Sample};
use crate::resolve::{image_name, list_images, list_nodes, name_of, nodes_booting};
use crate::watch::{LiveLine, interruptible};

/// `image ls`
pub async fn ls(ctx: &Ctx, format: OutputFormat) -> Result<()> {
    let images = list_images(ctx).await?;
    match format {
        OutputFormat::Table | OutputFormat::Wide => {
            if images.is_empty() {
                eprintln!(
                    "No images in namespace {}. Clone one with `kubectl walt image clone REF` (see `kubectl walt help show images`).",
                    ctx.namespace
                );
                return Ok(());
            }
            let nodes = list_nodes(ctx).await.unwrap_or_default();
            let usage = |image: &Image| {
                ImageName::from_object_name(&name_of(image)).map_or(0, |n| nodes_booting(&nodes, &n).len())
            };
            print!("{}", image_table(&images, &usage, format));
        }
        _ => print!("{}", serialize_objects(&images, format, false)?),
    }
    Ok(())
}

/// `image show IMAGE`
pub async fn show(ctx: &Ctx, image: &str, format: OutputFormat) -> Result<()> {
    let name = image_name(image)?;
    let object = ctx.get_image(&name.object_name(), &name.to_string()).await?;
    match format {
        OutputFormat::Table | OutputFormat::Wide => {
            let nodes = list_nodes(ctx).await.unwrap_or_default();
            let events = ctx
                .events_for(object.metadata.uid.as_deref().unwrap_or_default())
                .await;
            print!("{}", image_page(&object, &nodes_booting(&nodes, &name), &events));
        }
        _ => print!("{}", serialize_objects(&[object], format, true)?),
    }
    Ok(())
}

/// The image name `image clone` gives when none is given: the last path component of the
/// repository, cleaned to the image name rule, with its tag unless `latest`.
pub fn name_from_reference(reference: &str) -> Result<ImageName> {
    let without_digest = reference.split('@').next().unwrap_or(reference);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    let (repo, tag) = match last.split_once(':') {
        Some((r, t)) => (r, Some(t)),
        None => (last, None),
    };
    let clean = |s: &str| {
        let mut out: String = s
            .to_ascii_lowercase()
            .chars()
            .map(|c| {
                if c.is_ascii_lowercase() || c.is_ascii_digit() {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        while out.contains("--") {
            out = out.replace("--", "-");
        }
        out.trim_matches('-').to_string()
    };
    let mut name = clean(repo);
    if name == "default" {
        name = "default-image".into();
    }
    let candidate = match tag.map(clean).filter(|t| !t.is_empty() && t != "latest") {
        Some(t) => format!("{name}:{t}"),
        None => name,
    };
    ImageName::parse(&candidate).map_err(|e| {
        Error::Invalid(format!("cannot derive an image name from {reference:?} ({e}): give one, e.g. `kubectl walt image clone {reference} my-image`"))
    })
}

/// Parses `--platform os/arch[/variant]` or `arch`.
pub fn parse_platform(text: &str) -> Result<Platform> {
    let parts: Vec<&str> = text.split('/').collect();
    let bad = || {
        Error::Invalid(format!(
            "invalid platform {text:?}: write OS/ARCH[/VARIANT], e.g. linux/arm64"
        ))
    };
    match parts.as_slice() {
        [arch] if !arch.is_empty() => Ok(Platform {
            architecture: (*arch).to_string(),
            ..Platform::default()
        }),
        [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
            os: (*os).to_string(),
            architecture: (*arch).to_string(),
            variant: None,
        }),
        [os, arch, variant] if !os.is_empty() && !arch.is_empty() && !variant.is_empty() => Ok(Platform {
            os: (*os).to_string(),
            architecture: (*arch).to_string(),
            variant: Some((*variant).to_string()),
        }),
        _ => Err(bad()),
    }
}

/// The options of `image clone`.
#[derive(Debug)]
pub struct CloneOptions<'a> {
    /// Upstream reference.
    pub reference: &'a str,
    /// Image name, else derived.
    pub name: Option<&'a str>,
    /// Platform.
    pub platform: Option<&'a str>,
    /// Pull secret.
    pub pull_secret: Option<&'a str>,
    /// Return at once.
    pub no_wait: bool,
}

/// `image clone REF [NAME]`
pub async fn clone(ctx: &Ctx, opts: &CloneOptions<'_>) -> Result<()> {
    let name = match opts.name {
        Some(n) => image_name(n)?,
        None => name_from_reference(opts.reference)?,
    };
    let platform = opts.platform.map(parse_platform).transpose()?;
    let spec = ImageSpec {
        source: Some(opts.reference.to_string()),
        platform,
        pull_secret_ref: opts.pull_secret.map(|s| SecretReference { name: s.to_string() }),
        ..ImageSpec::default()
    };
    create_image(ctx, &name, spec).await?;
    println!(
        "image.walt.dev/{} created from {}",
        name.object_name(),
        opts.reference
    );
    if opts.no_wait {
        return Ok(());
    }
    let waited = interruptible(wait_ready(ctx, &name, &format!("cloning {name}"))).await;
    if matches!(waited, Err(Error::Interrupted)) {
        let _ = ctx
            .images()
            .delete(&name.object_name(), &DeleteParams::default())
            .await;
        eprintln!("Interrupted: the clone was stopped and image {name} removed.");
    }
    let image = waited?;
    print_ready(&image, &name);
    Ok(())
}

async fn create_image(ctx: &Ctx, name: &ImageName, spec: ImageSpec) -> Result<Image> {
    let image = Image::new(&name.object_name(), spec);
    ctx.images()
        .create(&PostParams::default(), &image)
        .await
        .map_err(|e| {
            Error::api(
                Op::named(
                    "create",
                    "image",
                    "images.walt.dev",
                    &name.to_string(),
                    &ctx.namespace,
                ),
                e,
            )
        })
}

fn print_ready(image: &Image, name: &ImageName) {
    let status = image.status.clone().unwrap_or_default();
    println!(
        "Image {name} is ready: {} ({}, {} layers, {})",
        status
            .digest
            .as_deref()
            .map_or_else(|| "?".into(), str::to_string),
        status
            .platform
            .as_ref()
            .map_or_else(|| "?".into(), |p| p.architecture.clone()),
        status.layers.map_or_else(|| "?".into(), |l| l.to_string()),
        status.size.map_or_else(|| "?".into(), bytes),
    );
}

/// Waits for an image's Ready condition; `False` is an error with the operator's message.
///
/// While the operator copies `spec.source`, the line is a progress bar (bytes, rate, ETA) drawn
/// from `status.clone`; otherwise it shows the elapsed time and the operator's latest word.
async fn wait_ready(ctx: &Ctx, name: &ImageName, label: &str) -> Result<Image> {
    let start = Instant::now();
    let mut line = LiveLine::stderr();
    let mut bar = Progress::new(label, None);
    loop {
        let image = ctx.get_image(&name.object_name(), &name.to_string()).await?;
        let status = image.status.clone().unwrap_or_default();
        match walt_crds::find_condition(&status.conditions, walt_crds::condition_types::READY) {
            Some(c) if c.status == "True" => {
                line.finish();
                return Ok(image);
            }
            Some(c) if c.status == "False" && is_final_reason(&c.reason) => {
                line.finish();
                return Err(Error::Failed(format!(
                    "image {name} is not usable: {} ({}). `kubectl walt image show {name}` has the details; remove it with `kubectl walt image rm {name}`.",
                    c.message, c.reason
                )));
            }
            Some(c) if c.reason == reasons::CLONING && status.clone.is_some() => {
                let clone = status.clone.unwrap_or_default();
                bar.set_total(Some(clone.total_bytes));
                bar.observe(Sample {
                    at: start.elapsed(),
                    bytes: clone.copied_bytes,
                    files: 0,
                });
                line.show(&bar.render());
            }
            Some(c) => line.show(&format!(
                "{label}: {} {}  elapsed {}",
                c.reason,
                c.message,
                clock(start.elapsed())
            )),
            None => line.show(&format!(
                "{label}: waiting for the operator…  elapsed {}",
                clock(start.elapsed())
            )),
        }
        tick().await;
    }
}

/// Ready=False reasons that are still in progress rather than failures.
fn is_final_reason(reason: &str) -> bool {
    !matches!(
        reason,
        reasons::CLONING | "Copying" | "Pending" | "Resolving" | "Progressing" | "InProgress"
    )
}

/// `image rm IMAGES`
pub async fn rm(ctx: &Ctx, set: &str) -> Result<()> {
    let names: Vec<ImageName> = split_set(set)
        .iter()
        .map(|n| image_name(n))
        .collect::<Result<_>>()?;
    if names.is_empty() {
        return Err(Error::Invalid(
            "no image given: write IMAGE or IMAGE1,IMAGE2".into(),
        ));
    }
    let nodes = list_nodes(ctx).await?;
    for name in &names {
        ctx.get_image(&name.object_name(), &name.to_string()).await?;
        refuse_in_use(&nodes, name, "remove")?;
    }
    for name in &names {
        ctx.images()
            .delete(&name.object_name(), &DeleteParams::default())
            .await
            .map_err(|e| {
                Error::api(
                    Op::named(
                        "delete",
                        "image",
                        "images.walt.dev",
                        &name.to_string(),
                        &ctx.namespace,
                    ),
                    e,
                )
            })?;
        println!("{name}: removed.");
    }
    Ok(())
}

fn refuse_in_use(nodes: &[walt_crds::Node], name: &ImageName, verb: &str) -> Result<()> {
    let booted_by = nodes_booting(nodes, name);
    if booted_by.is_empty() {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "cannot {verb} image {name}: {} node{} boot{} it ({}). Make {} boot another image first: `kubectl walt node boot {} OTHER_IMAGE`.",
        booted_by.len(),
        if booted_by.len() == 1 { "" } else { "s" },
        if booted_by.len() == 1 { "s" } else { "" },
        booted_by.join(", "),
        if booted_by.len() == 1 { "it" } else { "them" },
        booted_by.join(","),
    )))
}

/// Makes `new` a copy of `image` (same content), waits until it is Ready.
async fn copy_image(ctx: &Ctx, image: &ImageName, new: &ImageName) -> Result<Image> {
    let source = ctx.get_image(&image.object_name(), &image.to_string()).await?;
    let status = source.status.clone().unwrap_or_default();
    let (Some(reference), Some(digest)) = (status.reference.clone(), status.digest.clone()) else {
        return Err(Error::Failed(format!(
            "cannot copy image {image}: it has no digest yet; wait until `kubectl walt image show {image}` says Ready"
        )));
    };
    if ctx
        .images()
        .get_opt(&new.object_name())
        .await
        .ok()
        .flatten()
        .is_some()
    {
        return Err(Error::AlreadyExists {
            kind: "image",
            name: new.to_string(),
            namespace: ctx.namespace.clone(),
            hint: "choose another name, or remove it first with `kubectl walt image rm`".into(),
        });
    }
    let repository = reference.split('@').next().unwrap_or(&reference);
    let repository = strip_tag(repository);
    let spec = ImageSpec {
        source: Some(format!("{repository}@{digest}")),
        platform: source.spec.platform.clone(),
        pull_secret_ref: source.spec.pull_secret_ref.clone(),
        ..ImageSpec::default()
    };
    create_image(ctx, new, spec).await?;
    let waited = interruptible(wait_ready(ctx, new, &format!("copying {image} to {new}"))).await;
    if waited.is_err() {
        let _ = ctx
            .images()
            .delete(&new.object_name(), &DeleteParams::default())
            .await;
    }
    waited
}

/// `registry:5000/ns/name:tag` → `registry:5000/ns/name` (a port colon is not a tag).
fn strip_tag(reference: &str) -> &str {
    match reference.rfind(':') {
        Some(pos) if !reference[pos..].contains('/') => &reference[..pos],
        _ => reference,
    }
}

/// `image duplicate IMAGE NEW`
pub async fn duplicate(ctx: &Ctx, image: &str, new: &str) -> Result<()> {
    let (image, new) = (image_name(image)?, image_name(new)?);
    let copy = copy_image(ctx, &image, &new).await?;
    println!(
        "Duplicated {image} as {new} ({}).",
        copy.status
            .and_then(|s| s.digest)
            .as_deref()
            .map_or_else(|| "?".into(), short_digest)
    );
    Ok(())
}

/// `image rename IMAGE NEW`
pub async fn rename(ctx: &Ctx, image: &str, new: &str) -> Result<()> {
    let (image, new) = (image_name(image)?, image_name(new)?);
    let nodes = list_nodes(ctx).await?;
    ctx.get_image(&image.object_name(), &image.to_string()).await?;
    refuse_in_use(&nodes, &image, "rename")?;
    copy_image(ctx, &image, &new).await?;
    ctx.images()
        .delete(&image.object_name(), &DeleteParams::default())
        .await
        .map_err(|e| {
            Error::api(
                Op::named(
                    "delete",
                    "image",
                    "images.walt.dev",
                    &image.to_string(),
                    &ctx.namespace,
                ),
                e,
            )
        })?;
    println!("Renamed {image} to {new}.");
    Ok(())
}

/// How long `image squash` waits for the operator (a big image takes minutes; a stopped operator, forever).
const SQUASH_WAIT_LIMIT: std::time::Duration = std::time::Duration::from_mins(30);

/// Asks before rewriting an image that nodes boot (they reboot on it); `--yes` skips the question, and
/// without a terminal to ask on, the answer is no. Returns the nodes that boot it.
pub async fn confirm_overwrite(
    ctx: &Ctx,
    image: &ImageName,
    yes: bool,
    refused: &str,
) -> Result<Vec<String>> {
    let booted_by = nodes_booting(&list_nodes(ctx).await?, image);
    if booted_by.is_empty() || yes {
        return Ok(booted_by);
    }
    let question = overwrite_question(&image.to_string(), &booted_by);
    let ok = crate::terminal::interactive()
        && tokio::task::spawn_blocking(move || {
            confirm(&question, &mut std::io::stdin().lock(), &mut std::io::stderr())
        })
        .await
        .map_err(|e| Error::Failed(format!("the prompt failed: {e}")))?
        .map_err(Error::io("cannot read the answer"))?;
    if ok {
        return Ok(booted_by);
    }
    Err(Error::Failed(format!(
        "{refused}: image {image} is booted by {} (add --yes to overwrite it anyway)",
        booted_by.join(", ")
    )))
}

/// `image squash IMAGE`: asks the operator (annotation [`walt_crds::request::SQUASH`]) to rewrite the image as one
/// layer under the same name, waits until it has, and prints what it did.
pub async fn squash(ctx: &Ctx, image: &str, yes: bool) -> Result<()> {
    let name = image_name(image)?;
    let object = ctx.get_image(&name.object_name(), &name.to_string()).await?;
    let layers = object.status.as_ref().and_then(|s| s.layers);
    if layers.is_some_and(|l| l <= 1) {
        println!("Image {name} already has one layer: nothing to squash.");
        return Ok(());
    }
    confirm_overwrite(ctx, &name, yes, "not squashed").await?;
    let requested = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let patch = walt_crds::request::SQUASH.request_patch(&requested);
    ctx.images()
        .patch(
            &name.object_name(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map_err(|e| {
            Error::api(
                Op::named(
                    "patch",
                    "image",
                    "images.walt.dev",
                    &name.to_string(),
                    &ctx.namespace,
                ),
                e,
            )
        })?;
    let start = Instant::now();
    let mut line = LiveLine::stderr();
    let handled = loop {
        let object = ctx.get_image(&name.object_name(), &name.to_string()).await?;
        if walt_crds::request::SQUASH.is_handled(&object.metadata, &requested) {
            break object;
        }
        if start.elapsed() > SQUASH_WAIT_LIMIT {
            line.finish();
            return Err(Error::Failed(format!(
                "the operator has not squashed image {name} after {}: is it running (`kubectl get pods -A -l app.kubernetes.io/name=walt`)? \
                 The request stays on the Image and runs when it starts; `kubectl walt image show {name}` shows its events.",
                clock(SQUASH_WAIT_LIMIT)
            )));
        }
        line.show(&format!(
            "squashing {name} ({} layers)…  elapsed {}",
            layers.map_or_else(|| "?".into(), |l| l.to_string()),
            clock(start.elapsed())
        ));
        tick().await;
    };
    line.finish();
    // The operator writes the Squashed condition before it marks the request handled.
    let squashed = handled.status.as_ref().and_then(|status| {
        walt_crds::find_condition(&status.conditions, walt_crds::condition_types::SQUASHED)
    });
    if let Some(condition) = squashed.filter(|c| c.status == "False") {
        return Err(Error::Failed(format!(
            "image {name} was not squashed: {} ({})",
            condition.message, condition.reason
        )));
    }
    let uid = handled.metadata.uid.clone().unwrap_or_default();
    let outcome = ctx.events_for(&uid).await.into_iter().rev().find(|e| {
        matches!(
            e.reason.as_deref(),
            Some(reasons::SQUASHED | reasons::SQUASH_FAILED)
        )
    });
    match outcome {
        Some(event) if event.reason.as_deref() == Some(reasons::SQUASH_FAILED) => {
            Err(Error::Failed(format!(
                "image {name} was not squashed: {}",
                event.message.unwrap_or_default()
            )))
        }
        Some(event) => {
            println!("{}", event.message.unwrap_or_default());
            Ok(())
        }
        None => {
            println!("Image {name} squashed (see `kubectl walt image show {name}`).");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_references() {
        let cases = [
            ("docker.io/waltplatform/rpi-debian:latest", "rpi-debian"),
            ("docker.io/waltplatform/rpi-debian", "rpi-debian"),
            ("registry.example.org:5000/lab/PC_x86_64:v3", "pc-x86-64:v3"),
            ("127.0.0.1:5000/x/busybox@sha256:0123", "busybox"),
            ("debian:bookworm", "debian:bookworm"),
            ("library/default", "default-image"),
        ];
        for (reference, expected) in cases {
            assert_eq!(
                name_from_reference(reference).expect(reference).to_string(),
                expected
            );
        }
        assert!(name_from_reference("registry/___").is_err());
    }

    #[test]
    fn platforms_parse() {
        let p = parse_platform("linux/arm64/v8").expect("valid");
        assert_eq!(
            (p.os.as_str(), p.architecture.as_str(), p.variant.as_deref()),
            ("linux", "arm64", Some("v8"))
        );
        assert_eq!(parse_platform("arm64").expect("valid").os, "linux");
        assert!(parse_platform("linux//").is_err());
    }

    #[test]
    fn tags_are_stripped_but_not_ports() {
        assert_eq!(strip_tag("127.0.0.1:5000/ns/rpi:latest"), "127.0.0.1:5000/ns/rpi");
        assert_eq!(strip_tag("127.0.0.1:5000/ns/rpi"), "127.0.0.1:5000/ns/rpi");
    }
}

//! Dispatches a parsed command line and turns the outcome into an exit status.

use clap::CommandFactory;

use crate::cli::{Cli, Command, DeviceCommand, HelpCommand, ImageCommand, NodeCommand};
use crate::cluster::Ctx;
use crate::complete::{self, Lookup, LookupContext};
use crate::error::{Error, Result};
use crate::{device_cmd, image_build, image_cmd, image_cp, image_shell, node_cmd, node_shell, topics};

/// Runs the command; returns the process exit status (errors are printed here).
pub async fn run(cli: Cli) -> i32 {
    match dispatch(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

async fn dispatch(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Help(HelpCommand::List) => {
            print!("{}", topics::list());
            Ok(0)
        }
        Command::Help(HelpCommand::Show { topic }) => match topics::find(&topic) {
            Some(t) => {
                print!("{}", t.text);
                Ok(0)
            }
            None => Err(Error::Invalid(format!(
                "no help topic {topic:?}; the topics are: {}",
                topics::TOPICS
                    .iter()
                    .map(|t| t.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        },
        Command::Completion(args) => {
            print!("{}", complete::script(args.shell));
            Ok(0)
        }
        Command::Complete(args) => {
            let lookup = ClusterLookup::new(tokio::runtime::Handle::current());
            // clap takes global flags typed before the words (`__complete -n lab node …`) for
            // itself: give them back to the engine, which reads them for its lookups.
            let mut words = Vec::new();
            for (flag, value) in [
                (
                    "--kubeconfig",
                    cli.global.kubeconfig.as_ref().map(|p| p.display().to_string()),
                ),
                ("--context", cli.global.context.clone()),
                ("--namespace", cli.global.namespace.clone()),
            ] {
                if let Some(value) = value {
                    words.push(flag.to_string());
                    words.push(value);
                }
            }
            words.extend(args.words);
            let answer =
                tokio::task::spawn_blocking(move || complete::complete(&Cli::command(), &words, &lookup))
                    .await
                    .map_err(|e| Error::Failed(format!("completion failed: {e}")))?;
            print!("{}", answer.render());
            Ok(0)
        }
        Command::Node(cmd) => {
            let ctx = Ctx::connect(&cli.global).await?;
            node(&ctx, cmd).await
        }
        Command::Device(DeviceCommand::Ls {
            all,
            unregistered,
            output,
        }) => {
            let ctx = Ctx::connect(&cli.global).await?;
            device_cmd::ls(&ctx, all, unregistered, output.format)
                .await
                .map(|()| 0)
        }
        Command::Device(DeviceCommand::Show { device, output }) => {
            let ctx = Ctx::connect(&cli.global).await?;
            device_cmd::show(&ctx, &device, output.format).await.map(|()| 0)
        }
        Command::Device(DeviceCommand::Register {
            device,
            address,
            as_name,
            model,
            lend,
        }) => {
            let ctx = Ctx::connect(&cli.global).await?;
            let registration = device_cmd::Registration {
                name: as_name,
                address,
                model,
                lend,
            };
            device_cmd::register(&ctx, &device, &registration)
                .await
                .map(|()| 0)
        }
        Command::Image(cmd) => {
            if let ImageCommand::Cp { src, dst, .. } = &cmd {
                // Refuse bad input before talking to the cluster.
                image_cp::parse_location(src)?;
                image_cp::parse_location(dst)?;
            }
            if let ImageCommand::Build {
                from_dir,
                file,
                sub_dir,
                git_ref,
                build_args,
                platform,
                image,
                ..
            } = &cmd
            {
                image_build::preflight(&image_build::Given {
                    from_dir: from_dir.as_deref(),
                    file: file.as_deref(),
                    sub_dir: sub_dir.as_deref(),
                    git_ref: git_ref.as_deref(),
                    build_args,
                    platform: platform.as_deref(),
                    image,
                })?;
            }
            let ctx = Ctx::connect(&cli.global).await?;
            image(&ctx, cmd).await
        }
    }
}

async fn node(ctx: &Ctx, cmd: NodeCommand) -> Result<i32> {
    match cmd {
        NodeCommand::Ls { output } => node_cmd::ls(ctx, output.format).await.map(|()| 0),
        NodeCommand::Show { node, output } => node_cmd::show(ctx, &node, output.format).await.map(|()| 0),
        NodeCommand::Shell { node, command } => node_shell::shell(ctx, &node, &command).await,
        NodeCommand::Run { nodes, command } => node_shell::run(ctx, &nodes, &command).await,
        NodeCommand::Save {
            node,
            image,
            overwrite,
            no_reboot,
            exclude,
            compression,
            no_wait,
        } => node_cmd::save(
            ctx,
            &node_cmd::SaveOptions {
                node: &node,
                image: &image,
                overwrite,
                no_reboot,
                exclude: &exclude,
                compression,
                no_wait,
            },
        )
        .await
        .map(|()| 0),
        NodeCommand::Boot { nodes, image } => node_cmd::boot(ctx, &nodes, &image).await.map(|()| 0),
        NodeCommand::Reboot { nodes } => node_cmd::reboot(ctx, &nodes).await.map(|()| 0),
        NodeCommand::CreateVirtual {
            name,
            image,
            arch,
            model,
            persistent,
            memory,
            cpu,
        } => node_cmd::create_virtual(
            ctx,
            &node_cmd::VirtualOptions {
                name: &name,
                image: &image,
                arch,
                model: model.as_deref(),
                persistent,
                memory: memory.as_deref(),
                cpu: cpu.as_deref(),
            },
        )
        .await
        .map(|()| 0),
        NodeCommand::Remove { nodes } => node_cmd::remove(ctx, &nodes).await.map(|()| 0),
        NodeCommand::Acquire {
            device,
            as_name,
            image,
            vm,
            memory,
            cpu,
        } => {
            let vm = vm.then(|| node_cmd::vm_of(memory.as_deref(), cpu.as_deref()));
            device_cmd::acquire(ctx, &device, as_name.as_deref(), image.as_deref(), vm)
                .await
                .map(|()| 0)
        }
        NodeCommand::Console {
            node,
            no_follow,
            tail,
        } => node_cmd::console(ctx, &node, !no_follow, tail).await.map(|()| 0),
        NodeCommand::Release { node } => device_cmd::release(ctx, &node).await.map(|()| 0),
        NodeCommand::Proxy {
            node,
            public_key,
            login,
        } => node_shell::proxy(ctx, &node, public_key.as_deref(), login.as_deref()).await,
        NodeCommand::Wait { nodes, timeout } => node_cmd::wait(ctx, &nodes, timeout).await.map(|()| 0),
    }
}

async fn image(ctx: &Ctx, cmd: ImageCommand) -> Result<i32> {
    match cmd {
        ImageCommand::Ls { output } => image_cmd::ls(ctx, output.format).await.map(|()| 0),
        ImageCommand::Show { image, output } => image_cmd::show(ctx, &image, output.format).await.map(|()| 0),
        ImageCommand::Clone {
            reference,
            name,
            platform,
            pull_secret,
            no_wait,
        } => image_cmd::clone(
            ctx,
            &image_cmd::CloneOptions {
                reference: &reference,
                name: name.as_deref(),
                platform: platform.as_deref(),
                pull_secret: pull_secret.as_deref(),
                no_wait,
            },
        )
        .await
        .map(|()| 0),
        ImageCommand::Shell { image, mode } => image_shell::run(ctx, &image, mode).await,
        ImageCommand::Rm { images } => image_cmd::rm(ctx, &images).await.map(|()| 0),
        ImageCommand::Rename { image, new_name } => {
            image_cmd::rename(ctx, &image, &new_name).await.map(|()| 0)
        }
        ImageCommand::Duplicate { image, new_name } => {
            image_cmd::duplicate(ctx, &image, &new_name).await.map(|()| 0)
        }
        ImageCommand::Squash { image, yes } => image_cmd::squash(ctx, &image, yes).await.map(|()| 0),
        ImageCommand::Cp { src, dst, yes } => image_cp::run(ctx, &src, &dst, yes).await,
        ImageCommand::Build {
            from_dir,
            from_url,
            git_ref,
            sub_dir,
            file,
            build_args,
            target,
            platform,
            overwrite,
            yes,
            no_cache,
            image,
        } => {
            let from = match (from_dir, from_url) {
                (Some(dir), _) => image_build::ContextFrom::Dir(dir),
                (None, Some(url)) => image_build::ContextFrom::Url {
                    url,
                    reference: git_ref,
                    sub_dir,
                },
                (None, None) => {
                    return Err(Error::Invalid(
                        "give the build context: --from-dir DIR or --from-url URL".into(),
                    ));
                }
            };
            image_build::run(
                ctx,
                &image_build::BuildOptions {
                    from,
                    file: file.as_deref(),
                    build_args: &build_args,
                    target: target.as_deref(),
                    platform: platform.as_deref(),
                    overwrite,
                    yes,
                    no_cache,
                    image: &image,
                },
            )
            .await
        }
    }
}

/// Completion lookups against the cluster, with a short deadline so that TAB never hangs;
/// any failure just means no candidates.
struct ClusterLookup {
    runtime: tokio::runtime::Handle,
}

const LOOKUP_DEADLINE: std::time::Duration = std::time::Duration::from_secs(3);

impl ClusterLookup {
    fn new(runtime: tokio::runtime::Handle) -> Self {
        ClusterLookup { runtime }
    }

    fn names<F, Fut>(&self, ctx: &LookupContext, f: F) -> Vec<String>
    where
        F: FnOnce(Ctx) -> Fut,
        Fut: std::future::Future<Output = Vec<String>>,
    {
        let global = crate::cli::GlobalArgs {
            kubeconfig: ctx.kubeconfig.clone().map(Into::into),
            context: ctx.context.clone(),
            namespace: ctx.namespace.clone(),
            request_timeout: LOOKUP_DEADLINE,
            gateway_address: None,
        };
        self.runtime.block_on(async {
            let work = async {
                match Ctx::connect(&global).await {
                    Ok(c) => f(c).await,
                    Err(_) => Vec::new(),
                }
            };
            tokio::time::timeout(LOOKUP_DEADLINE, work)
                .await
                .unwrap_or_default()
        })
    }
}

impl Lookup for ClusterLookup {
    fn nodes(&self, ctx: &LookupContext) -> Vec<String> {
        self.names(ctx, |c| async move {
            crate::resolve::list_nodes(&c)
                .await
                .map(|n| n.iter().map(crate::resolve::name_of).collect())
                .unwrap_or_default()
        })
    }

    fn images(&self, ctx: &LookupContext) -> Vec<String> {
        self.names(ctx, |c| async move {
            crate::resolve::list_images(&c)
                .await
                .map(|n| {
                    n.iter()
                        .map(|i| crate::resolve::display_image(&crate::resolve::name_of(i)))
                        .collect()
                })
                .unwrap_or_default()
        })
    }

    fn namespaces(&self, ctx: &LookupContext) -> Vec<String> {
        self.names(ctx, |c| async move {
            let api: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(c.client.clone());
            api.list(&kube::api::ListParams::default())
                .await
                .map(|l| l.items.iter().map(crate::resolve::name_of).collect())
                .unwrap_or_default()
        })
    }

    fn contexts(&self, ctx: &LookupContext) -> Vec<String> {
        let config = match &ctx.kubeconfig {
            Some(path) => kube::config::Kubeconfig::read_from(path),
            None => kube::config::Kubeconfig::read(),
        };
        config
            .map(|k| k.contexts.into_iter().map(|c| c.name).collect())
            .unwrap_or_default()
    }
}

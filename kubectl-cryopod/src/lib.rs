//! `kubectl cryopod`: the SRE's command line for cryopod. Each subcommand creates
//! or reads cryopod's resources, and follows an operation to its end with `--wait`.
//! The decisions (arguments to objects, status to progress lines, outcome to exit
//! code and message) are pure functions in the modules below; [`run`] is the thin
//! shell that talks to the API server and, for `thaw`, to a node agent.

#![forbid(unsafe_code)]

pub mod cli;
pub mod error;
pub mod inspect;
pub mod progress;
pub mod request;
pub mod status;
pub mod thaw;

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use cryopod_crds::v1alpha1::{NodeEvacuation, PodCheckpoint, PodMigration, PodRestore};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::cli::{Cli, Command, OutputFormat};
use crate::error::Error;
use crate::progress::{Kind, Outcome, changed_pods, evacuation_pods, observe, outcome, progress_key, progress_line};

/// How often `--wait` reads the object again.
const POLL: Duration = Duration::from_secs(1);

/// Runs the command line's subcommand to its end.
pub async fn run(cli: Cli) -> Result<(), Error> {
    let (client, default_namespace) = connect(&cli).await?;
    let ns = cli.namespace.clone().unwrap_or(default_namespace);
    let request = |kind: &'static str| move |source| Error::Request { kind, source };
    match &cli.command {
        Command::Checkpoint { pod, storage, name } => {
            let object =
                request::checkpoint(&ns, pod, storage.as_deref(), name.as_deref()).map_err(request("PodCheckpoint"))?;
            operate(
                Api::<PodCheckpoint>::namespaced(client, &ns),
                object,
                Kind::Checkpoint,
                &cli,
            )
            .await
        }
        Command::Restore {
            checkpoint,
            to,
            pod_name,
            name,
        } => {
            let object = request::restore(&ns, checkpoint, to.as_deref(), pod_name.as_deref(), name.as_deref())
                .map_err(request("PodRestore"))?;
            operate(Api::<PodRestore>::namespaced(client, &ns), object, Kind::Restore, &cli).await
        }
        Command::Migrate {
            pod,
            to,
            storage,
            transfer,
            name,
        } => {
            let object = request::migration(&ns, pod, to, (storage.as_deref(), *transfer), name.as_deref())
                .map_err(request("PodMigration"))?;
            operate(
                Api::<PodMigration>::namespaced(client, &ns),
                object,
                Kind::Migration,
                &cli,
            )
            .await
        }
        Command::Evacuate {
            node,
            max_concurrent,
            unmigratable,
            transfer,
            name,
        } => {
            let object = request::evacuation(node, (*max_concurrent, *unmigratable, *transfer), name.as_deref())
                .map_err(request("NodeEvacuation"))?;
            operate(Api::<NodeEvacuation>::all(client), object, Kind::Evacuation, &cli).await
        }
        Command::Status => show_status(client, &ns, &cli).await,
        Command::Inspect { checkpoint } => {
            let api = Api::<PodCheckpoint>::namespaced(client, &ns);
            let object = api.get(checkpoint).await.map_err(|source| Error::Get {
                resource: format!("{}/{checkpoint}", Kind::Checkpoint.resource()),
                source,
            })?;
            match cli.output {
                Some(format) => print_object(&object, format),
                None => {
                    print!("{}", inspect::describe(&object));
                    Ok(())
                }
            }
        }
        Command::Thaw {
            pod,
            yes,
            reason,
            release,
            release_namespace,
            agent_endpoint,
            agent_tls_name,
            agent_port,
        } => {
            let target = ThawTarget {
                release,
                release_namespace,
                agent_endpoint: agent_endpoint.as_deref(),
                agent_tls_name: agent_tls_name.as_deref(),
                agent_port: *agent_port,
            };
            thaw_pod(client, &ns, pod, *yes, reason.as_deref(), &target).await
        }
    }
}

/// A client for the kubeconfig and context asked for, and the namespace that
/// context names (as kubectl picks them).
async fn connect(cli: &Cli) -> Result<(Client, String), Error> {
    let config_err = |e: Box<dyn std::error::Error + Send + Sync>| Error::Config { source: e };
    let options = KubeConfigOptions {
        context: cli.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match &cli.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path).map_err(|e| config_err(Box::new(e)))?;
            Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| config_err(Box::new(e)))?
        }
        None if cli.context.is_some() => Config::from_kubeconfig(&options)
            .await
            .map_err(|e| config_err(Box::new(e)))?,
        None => Config::infer().await.map_err(|e| config_err(Box::new(e)))?,
    };
    let namespace = config.default_namespace.clone();
    let client = Client::try_from(config).map_err(|e| config_err(Box::new(e)))?;
    Ok((client, namespace))
}

fn print_object<T: Serialize>(object: &T, format: OutputFormat) -> Result<(), Error> {
    let text = match format {
        OutputFormat::Json => serde_json::to_string_pretty(object)
            .map(|t| t + "\n")
            .map_err(|e| Error::Print { source: Box::new(e) })?,
        OutputFormat::Yaml => serde_yaml::to_string(object).map_err(|e| Error::Print { source: Box::new(e) })?,
    };
    print!("{text}");
    Ok(())
}

fn to_json<T: Serialize>(object: &T) -> Value {
    serde_json::to_value(object).unwrap_or(Value::Null)
}

/// Creates `object`, then with `--wait` follows it to its end.
async fn operate<K>(api: Api<K>, object: K, kind: Kind, cli: &Cli) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let created = api
        .create(&PostParams::default(), &object)
        .await
        .map_err(|source| Error::Create {
            resource: kind.resource(),
            source,
        })?;
    let name = created.name_any();
    if cli.output.is_none() {
        println!("{}/{name} created", kind.resource());
    }
    if !cli.wait {
        return cli.output.map_or(Ok(()), |format| print_object(&created, format));
    }
    let ended = follow(&api, &name, kind, cli.timeout, cli.output.is_some()).await?;
    if let Some(format) = cli.output {
        print_object(&ended, format)?;
    }
    let value = to_json(&ended);
    match outcome(kind, &observe(&value)) {
        Outcome::Succeeded => {
            if cli.output.is_none() {
                let extra = status::downtime(&value).map(|d| format!(" ({d})")).unwrap_or_default();
                println!("{}/{name} succeeded{extra}", kind.resource());
            }
            Ok(())
        }
        Outcome::Failed { reason, message } => Err(Error::Failed {
            message: progress::failure_message(kind, &name, &reason, &message),
        }),
        // `follow` returns only what has ended.
        Outcome::Running => Err(Error::TimedOut {
            resource: format!("{}/{name}", kind.resource()),
            after: cli.timeout,
        }),
    }
}

/// Where progress goes: a live line on a terminal, else a line per change.
enum View {
    Bar(indicatif::ProgressBar),
    Plain {
        prefix: String,
        to_stderr: bool,
        last: Option<String>,
    },
}

impl View {
    fn new(prefix: String, quiet_stdout: bool) -> Self {
        if !quiet_stdout && std::io::stdout().is_terminal() {
            let bar = indicatif::ProgressBar::new_spinner().with_prefix(prefix);
            if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {prefix}: {msg} [{elapsed}]") {
                bar.set_style(style);
            }
            bar.enable_steady_tick(Duration::from_millis(120));
            View::Bar(bar)
        } else {
            View::Plain {
                prefix,
                to_stderr: quiet_stdout,
                last: None,
            }
        }
    }

    fn line(to_stderr: bool, text: &str) {
        if to_stderr {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    }

    fn println(&self, text: &str) {
        match self {
            View::Bar(bar) => bar.println(text),
            View::Plain { to_stderr, .. } => Self::line(*to_stderr, text),
        }
    }

    fn update(&mut self, key: String, line: String) {
        match self {
            View::Bar(bar) => bar.set_message(line),
            View::Plain {
                prefix,
                to_stderr,
                last,
            } => {
                if last.as_ref() != Some(&key) {
                    Self::line(*to_stderr, &format!("{prefix}: {line}"));
                    *last = Some(key);
                }
            }
        }
    }

    fn finish(&self) {
        if let View::Bar(bar) = self {
            bar.finish();
        }
    }
}

/// Reads the object every [`POLL`] until it ends or `timeout` passes, showing its
/// progress; returns it as it ended.
async fn follow<K>(api: &Api<K>, name: &str, kind: Kind, timeout: Duration, quiet_stdout: bool) -> Result<K, Error>
where
    K: Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let started = Instant::now();
    let resource = format!("{}/{name}", kind.resource());
    let mut view = View::new(format!("{}/{name}", kind.short()), quiet_stdout);
    let mut pods = vec![];
    loop {
        let object = api.get(name).await.map_err(|source| Error::Get {
            resource: resource.clone(),
            source,
        })?;
        let value = to_json(&object);
        let observed = observe(&value);
        if kind == Kind::Evacuation {
            let now = evacuation_pods(&value);
            for line in changed_pods(&pods, &now) {
                view.println(&format!("  {line}"));
            }
            pods = now;
        }
        view.update(progress_key(&observed), progress_line(&observed, Timestamp::now()));
        if outcome(kind, &observed) != Outcome::Running {
            view.finish();
            return Ok(object);
        }
        if started.elapsed() >= timeout {
            view.finish();
            return Err(Error::TimedOut {
                resource,
                after: timeout,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn list_json<K>(api: Api<K>, kind: Kind, out: &mut Vec<(Kind, Value)>) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let list = api.list(&ListParams::default()).await.map_err(|source| Error::List {
        resource: kind.resource(),
        source,
    })?;
    out.extend(list.items.iter().map(|o| (kind, to_json(o))));
    Ok(())
}

async fn show_status(client: Client, ns: &str, cli: &Cli) -> Result<(), Error> {
    let mut objects = Vec::new();
    if cli.all_namespaces {
        list_json(Api::<PodMigration>::all(client.clone()), Kind::Migration, &mut objects).await?;
        list_json(
            Api::<PodCheckpoint>::all(client.clone()),
            Kind::Checkpoint,
            &mut objects,
        )
        .await?;
        list_json(Api::<PodRestore>::all(client.clone()), Kind::Restore, &mut objects).await?;
    } else {
        list_json(
            Api::<PodMigration>::namespaced(client.clone(), ns),
            Kind::Migration,
            &mut objects,
        )
        .await?;
        list_json(
            Api::<PodCheckpoint>::namespaced(client.clone(), ns),
            Kind::Checkpoint,
            &mut objects,
        )
        .await?;
        list_json(
            Api::<PodRestore>::namespaced(client.clone(), ns),
            Kind::Restore,
            &mut objects,
        )
        .await?;
    }
    // Evacuations are cluster-scoped: shown to whoever may list them.
    match list_json(Api::<NodeEvacuation>::all(client), Kind::Evacuation, &mut objects).await {
        Err(Error::List {
            source: kube::Error::Api(status),
            ..
        }) if status.code == 403 || status.code == 404 => {}
        other => other?,
    }
    match cli.output {
        Some(format) => {
            let items: Vec<&Value> = objects.iter().map(|(_, v)| v).collect();
            print_object(
                &serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}),
                format,
            )
        }
        None => {
            print!(
                "{}",
                status::render(&status::rows(&objects, Timestamp::now()), cli.all_namespaces)
            );
            Ok(())
        }
    }
}

/// Where the agents are and how they are named.
struct ThawTarget<'a> {
    release: &'a str,
    release_namespace: &'a str,
    agent_endpoint: Option<&'a str>,
    agent_tls_name: Option<&'a str>,
    agent_port: u16,
}

async fn thaw_pod(
    client: Client,
    ns: &str,
    pod_name: &str,
    yes: bool,
    given_reason: Option<&str>,
    target: &ThawTarget<'_>,
) -> Result<(), Error> {
    use cryopod_agent_api::pb;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

    let pod = Api::<Pod>::namespaced(client.clone(), ns)
        .get(pod_name)
        .await
        .map_err(|source| Error::Get {
            resource: format!("pod/{pod_name}"),
            source,
        })?;
    let uid = pod.uid().unwrap_or_default();
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .ok_or_else(|| Error::NotScheduled {
            pod: format!("{ns}/{pod_name}"),
        })?;
    let interactive = std::io::stdin().is_terminal() && std::io::stderr().is_terminal();
    match thaw::confirmation(yes, interactive) {
        thaw::Confirmation::Skip => {}
        thaw::Confirmation::Refuse => return Err(Error::ThawUnconfirmable),
        thaw::Confirmation::Ask => {
            eprint!("{}", thaw::question(ns, pod_name, &uid, &node));
            let _ = std::io::stderr().flush();
            let mut answer = String::new();
            std::io::stdin()
                .read_line(&mut answer)
                .map_err(|source| Error::Terminal { source })?;
            if !thaw::confirmed(&answer, pod_name) {
                return Err(Error::ThawNotConfirmed);
            }
        }
    }

    // The operator's client pair: the only certificate an agent obeys.
    let secrets = Api::<Secret>::namespaced(client.clone(), target.release_namespace);
    let mut material = Err(String::new());
    let mut secret_name = String::new();
    for name in [
        format!("{}-tls", target.release),
        format!("{}-operator-tls", target.release),
    ] {
        secret_name = format!("{}/{name}", target.release_namespace);
        material = match secrets.get_opt(&name).await {
            Ok(Some(secret)) => {
                let data = secret
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect();
                thaw::client_material(&data)
            }
            Ok(None) => Err("it does not exist".to_owned()),
            Err(e) => Err(e.to_string()),
        };
        if material.is_ok() {
            break;
        }
    }
    let material = material.map_err(|problem| Error::ClientSecret {
        secret: secret_name,
        problem,
    })?;

    let url = match target.agent_endpoint {
        Some(url) => url.to_owned(),
        None => {
            let selector = format!(
                "app.kubernetes.io/instance={},app.kubernetes.io/component=node-agent",
                target.release
            );
            let agents = Api::<Pod>::namespaced(client, target.release_namespace)
                .list(
                    &ListParams::default()
                        .labels(&selector)
                        .fields(&format!("spec.nodeName={node}")),
                )
                .await
                .map_err(|source| Error::List {
                    resource: "node agent pods",
                    source,
                })?;
            let ip = agents
                .items
                .iter()
                .find_map(|p| p.status.as_ref()?.pod_ip.clone())
                .ok_or_else(|| Error::NoAgent {
                    node: node.clone(),
                    namespace: target.release_namespace.to_owned(),
                })?;
            thaw::agent_url(&ip, target.agent_port)
        }
    };
    let connect = |source| Error::Connect {
        url: url.clone(),
        source,
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&material.ca))
        .identity(Identity::from_pem(&material.cert, &material.key))
        .domain_name(target.agent_tls_name.unwrap_or(&node));
    let channel = Channel::from_shared(url.clone())
        .map_err(|e| Error::NoAgent {
            node: format!("{node} (bad URL {url}: {e})"),
            namespace: target.release_namespace.to_owned(),
        })?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .tls_config(tls)
        .map_err(connect)?
        .connect()
        .await
        .map_err(connect)?;
    let user = std::env::var("USER").ok();
    let response = pb::node_agent_client::NodeAgentClient::new(channel)
        .thaw(pb::ThawRequest {
            pod_uid: uid,
            reason: thaw::reason(user.as_deref(), given_reason),
        })
        .await
        .map_err(|source| Error::Thaw {
            node: node.clone(),
            source,
        })?
        .into_inner();
    print!("{}", thaw::summary(ns, pod_name, &node, &response));
    Ok(())
}

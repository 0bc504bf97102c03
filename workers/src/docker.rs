//! The Docker spawner, over bollard.

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use bollard::{
    Docker,
    errors::Error as DockerError,
    models::{
        ContainerCreateBody, ContainerCreateResponse, ContainerSummaryStateEnum, DeviceRequest,
        HostConfig, Mount, MountType, NetworkCreateRequest, VolumeCreateRequest,
    },
    query_parameters::{
        CreateContainerOptions, CreateImageOptions, ListContainersOptions, ListNetworksOptions,
        LogsOptions, RemoveContainerOptions, RemoveVolumeOptions, StopContainerOptions,
    },
};
use futures::StreamExt;
use schema::{EngineNames, ServerName, UserName};
use tokio::sync::OnceCell;

use crate::{
    config::{DockerConfig, PullPolicy},
    spawner::{
        ManagedContainer, Progress, SpawnError, SpawnSpec, Spawned, Spawner, StillWanted,
        wait_ready,
    },
};

pub const LABEL_MANAGED: &str = "berth.managed";
pub const LABEL_INSTANCE: &str = "berth.instance";
pub const LABEL_USER: &str = "berth.user";
pub const LABEL_SERVER: &str = "berth.server";
pub const LABEL_SERVER_ID: &str = "berth.server-id";

/// The bridge driver's option that lets containers on one network talk directly.
const ICC_OPTION: &str = "com.docker.network.bridge.enable_icc";

/// How often a spawn probes readiness, how often it asks whether it is still
/// wanted (a cheap database read), and how often it asks the engine whether the
/// container still runs (engine calls compete with other spawns' creates).
const INSPECT_EVERY: Duration = Duration::from_millis(2000);

pub struct DockerSpawner {
    docker: Docker,
    config: Arc<DockerConfig>,
    network: tokio::sync::Mutex<Option<String>>,
    /// What containers are told the API's address is.
    api_url: OnceCell<String>,
}

impl From<DockerError> for SpawnError {
    fn from(e: DockerError) -> Self {
        SpawnError::Engine(e.to_string())
    }
}

/// The engine no longer knows the network by that id, or finds its name
/// ambiguous: the network must be settled again (the error is transient).
fn is_network_error(e: &DockerError) -> bool {
    matches!(e, DockerError::DockerResponseServerError { message, .. }
        if message.contains("network") && (message.contains("not found") || message.contains("ambiguous")))
}

/// The engine has no driver for the devices a profile asks for (GPUs on a host
/// without them): trying again will not help.
fn is_missing_device(e: &DockerError) -> bool {
    matches!(e, DockerError::DockerResponseServerError { message, .. }
        if message.contains("could not select device driver"))
}

fn is_status(e: &DockerError, code: u16) -> bool {
    matches!(e, DockerError::DockerResponseServerError { status_code, .. } if *status_code == code)
}

impl DockerSpawner {
    /// Connects as the Docker CLI does (`DOCKER_HOST`, else the local socket).
    pub fn connect(config: Arc<DockerConfig>) -> Result<Self, SpawnError> {
        let docker = Docker::connect_with_defaults()?;
        Ok(Self {
            docker,
            config,
            network: Default::default(),
            api_url: OnceCell::new(),
        })
    }

    /// Fails when the engine does not answer, so a worker refuses to start blind.
    pub async fn ping(&self) -> Result<(), SpawnError> {
        self.docker.ping().await?;
        Ok(())
    }

    /// The id of the servers' network, created when missing. Docker lets several
    /// networks share a name, and workers starting together may each create one:
    /// every worker settles on the oldest (then lowest id) and removes the rest,
    /// until one is left. A listing can miss a network still being created, so a
    /// worker may settle on one another worker then removes: the engine's "not
    /// found" or "ambiguous" makes it settle again (`forget_network`).
    async fn ensure_network(&self) -> Result<String, SpawnError> {
        let mut known = self.network.lock().await;
        if let Some(id) = known.as_ref() {
            return Ok(id.clone());
        }
        let name = &self.config.network;
        if self.networks_named(name).await?.is_empty() {
            let request = NetworkCreateRequest {
                name: name.clone(),
                driver: Some("bridge".into()),
                labels: Some(HashMap::from([(LABEL_MANAGED.into(), "true".into())])),
                // Servers cannot reach one another; the host (workers' readiness
                // probes, the proxy, the API's port on the gateway) reaches them all.
                options: Some(HashMap::from([(ICC_OPTION.into(), "false".into())])),
                ..Default::default()
            };
            match self.docker.create_network(request).await {
                Ok(_) => {}
                Err(e) if is_status(&e, 409) => {}
                Err(e) => return Err(SpawnError::from(e)),
            }
        }
        for _ in 0..20 {
            let mut found = self.networks_named(name).await?;
            found.sort();
            let Some((_, oldest, isolated)) = found.first().cloned() else {
                return Err(SpawnError::Engine(format!(
                    "network {name} vanished as it was created"
                )));
            };
            if found.len() == 1 {
                if !isolated {
                    tracing::warn!(
                        network = %name,
                        "servers on this network can reach one another (it was not created by \
                         this Berth, or by an older one): remove it when no server runs \
                         (docker network rm {name}), or create it with \
                         -o {ICC_OPTION}=false"
                    );
                }
                *known = Some(oldest.clone());
                return Ok(oldest);
            }
            for (_, extra, _) in found.iter().skip(1) {
                if let Err(e) = self.docker.remove_network(extra).await {
                    tracing::debug!(network = %extra, error = %e, "duplicate network left in place");
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(SpawnError::Engine(format!(
            "network {name} stays duplicated; remove the extra ones with docker network rm"
        )))
    }

    fn names(&self) -> EngineNames<'_> {
        EngineNames::new(&self.config.instance)
    }

    /// Whether `labels` say this deployment made the thing for `user` (and, for a
    /// container, `server`).
    fn ours(
        &self,
        labels: Option<&HashMap<String, String>>,
        user: &UserName,
        server: Option<&ServerName>,
    ) -> bool {
        let Some(labels) = labels else { return false };
        let is = |key: &str, value: &str| labels.get(key).is_some_and(|v| v == value);
        is(LABEL_MANAGED, "true")
            && is(LABEL_INSTANCE, &self.config.instance)
            && is(LABEL_USER, user.as_str())
            && server.is_none_or(|s| is(LABEL_SERVER, s.as_str()))
    }

    /// Removes the container of `user`'s `server` when this deployment made it;
    /// one of that name that it did not make is left alone (`Taken`).
    async fn remove_own(
        &self,
        name: &str,
        user: &UserName,
        server: &ServerName,
    ) -> Result<(), SpawnError> {
        let labels = match self.docker.inspect_container(name, None).await {
            Ok(found) => found.config.and_then(|c| c.labels),
            Err(e) if is_status(&e, 404) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if !self.ours(labels.as_ref(), user, Some(server)) {
            return Err(self.taken("container", name));
        }
        self.remove_container(name).await
    }

    fn taken(&self, what: &str, name: &str) -> SpawnError {
        SpawnError::Taken(format!(
            "the engine has a {what} named {name} that this Berth (instance {}) did not \
             create; it was left alone. Remove or rename it, or give this deployment its \
             own BERTH_INSTANCE",
            self.config.instance
        ))
    }

    /// Forgets the network a spawn found gone or ambiguous: the next one settles again.
    async fn forget_network(&self, id: &str) {
        let mut known = self.network.lock().await;
        if known.as_deref() == Some(id) {
            *known = None;
        }
    }

    /// `BERTH_PUBLIC_API_URL`, else the API's port on the network's gateway: the
    /// host, as containers on the network see it.
    async fn api_url(&self, network_id: &str) -> String {
        self.api_url
            .get_or_init(|| async {
                if self.config.public_api_url.is_some() {
                    return self.config.api_url_on("");
                }
                let gateway = self
                    .docker
                    .inspect_network(network_id, None)
                    .await
                    .ok()
                    .and_then(|n| n.ipam?.config?.into_iter().find_map(|c| c.gateway))
                    .unwrap_or_else(|| "172.17.0.1".into());
                if self.config.api_listen.ip().is_loopback() {
                    tracing::warn!(
                        api = %self.config.api_listen,
                        "the API listens on loopback, which containers cannot reach: servers cannot \
                         report to it; set BERTH_PUBLIC_API_URL, or BERTH_LISTEN=0.0.0.0:PORT"
                    );
                }
                self.config.api_url_on(&gateway)
            })
            .await
            .clone()
    }

    /// Networks with exactly this name, as (created, id).
    async fn networks_named(
        &self,
        name: &str,
    ) -> Result<Vec<(chrono::DateTime<chrono::FixedOffset>, String, bool)>, SpawnError> {
        let options = ListNetworksOptions {
            filters: Some(HashMap::from([("name".to_owned(), vec![name.to_owned()])])),
        };
        Ok(self
            .docker
            .list_networks(Some(options))
            .await?
            .into_iter()
            .filter(|n| n.name.as_deref() == Some(name))
            .filter_map(|n| {
                let created = chrono::DateTime::parse_from_rfc3339(&n.created?.to_string()).ok()?;
                let isolated = n
                    .options
                    .as_ref()
                    .and_then(|o| o.get(ICC_OPTION))
                    .is_some_and(|v| v == "false");
                Some((created, n.id?, isolated))
            })
            .collect())
    }

    async fn ensure_image(&self, image: &str) -> Result<(), SpawnError> {
        let policy = self.config.pull_policy;
        if policy != PullPolicy::Always {
            match self.docker.inspect_image(image).await {
                Ok(_) => return Ok(()),
                Err(e) if is_status(&e, 404) => {}
                Err(e) => return Err(e.into()),
            }
            if policy == PullPolicy::Never {
                return Err(SpawnError::Image {
                    image: image.into(),
                    reason: format!(
                        "not present on the engine, and the pull policy is never: put it \
                         there (`docker load -i image.tar`, or `docker build -t {image} .`), \
                         or set BERTH_IMAGE to one it has (`docker images`)"
                    ),
                });
            }
        }
        let options = CreateImageOptions {
            from_image: Some(image.into()),
            ..Default::default()
        };
        let mut pull = self.docker.create_image(Some(options), None, None);
        while let Some(step) = pull.next().await {
            if let Err(e) = step {
                return Err(SpawnError::Image {
                    image: image.into(),
                    reason: format!(
                        "could not be pulled: {e}. Without a registry, put the image on the \
                         engine yourself (`docker load -i image.tar`, or `docker build -t \
                         {image} .`), or set BERTH_IMAGE to one it has (`docker images`); \
                         BERTH_PULL_POLICY=never stops Berth from trying"
                    ),
                });
            }
        }
        Ok(())
    }

    async fn remove_container(&self, name: &str) -> Result<(), SpawnError> {
        let options = RemoveContainerOptions {
            force: true,
            ..Default::default()
        };
        match self.docker.remove_container(name, Some(options)).await {
            Ok(()) => Ok(()),
            // Gone already, or another remove is under way.
            Err(e) if is_status(&e, 404) || is_status(&e, 409) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn container_body(
        &self,
        spec: &SpawnSpec,
        image: &str,
        network_id: &str,
        api_url: &str,
    ) -> ContainerCreateBody {
        let c = &self.config;
        let labels = HashMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_INSTANCE.to_owned(), c.instance.clone()),
            (LABEL_USER.to_owned(), spec.user.to_string()),
            (LABEL_SERVER.to_owned(), spec.server.to_string()),
            (LABEL_SERVER_ID.to_owned(), spec.server_id.to_string()),
        ]);
        let env: Vec<String> = spec
            .environment(c.server_port, api_url, &c.server_env)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let (mem, cpus) = self.limits(spec);
        let profile = spec.profile.as_ref();
        let mut mounts = vec![Mount {
            target: Some(c.volume_path.clone()),
            source: Some(self.names().volume(&spec.user)),
            typ: Some(MountType::VOLUME),
            ..Default::default()
        }];
        mounts.extend(profile.into_iter().flat_map(|p| &p.mounts).map(|m| Mount {
            target: Some(m.target.clone()),
            source: Some(m.source.clone()),
            typ: Some(if m.kind == "volume" {
                MountType::VOLUME
            } else {
                MountType::BIND
            }),
            read_only: Some(m.read_only),
            ..Default::default()
        }));
        let device_requests = profile.and_then(|p| p.gpus.as_ref()).map(|gpus| {
            vec![DeviceRequest {
                driver: Some(gpus.driver.clone().unwrap_or_else(|| "nvidia".into())),
                count: gpus.count,
                device_ids: (!gpus.device_ids.is_empty()).then(|| gpus.device_ids.clone()),
                capabilities: Some(vec![vec!["gpu".into()]]),
                ..Default::default()
            }]
        });
        let host_config = HostConfig {
            memory: Some(mem),
            memory_swap: Some(mem),
            nano_cpus: Some((cpus * 1e9).round() as i64),
            pids_limit: Some(profile.and_then(|p| p.pids_limit).unwrap_or(c.pids_limit)),
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            cap_drop: Some(vec!["ALL".into()]),
            network_mode: Some(network_id.to_owned()),
            mounts: Some(mounts),
            device_requests,
            ..Default::default()
        };
        // The image's own command unless the profile or the configuration names
        // one, word by word.
        let cmd = spec
            .command_template(c.container_command.as_deref())
            .map(|template| {
                spec.command(template, c.server_port)
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect()
            });
        ContainerCreateBody {
            image: Some(image.into()),
            cmd,
            env: Some(env),
            labels: Some(labels),
            user: c.container_user.clone(),
            exposed_ports: Some(vec![format!("{}/tcp", c.server_port)]),
            host_config: Some(host_config),
            ..Default::default()
        }
    }

    /// Bytes of memory and CPUs the server gets: its profile's, else the configuration's.
    fn limits(&self, spec: &SpawnSpec) -> (i64, f64) {
        let profile = spec.profile.as_ref();
        (
            profile
                .and_then(|p| p.mem_bytes())
                .unwrap_or(self.config.mem_limit),
            profile
                .and_then(|p| p.cpu_limit)
                .unwrap_or(self.config.cpu_limit),
        )
    }

    /// The image: the request's, else its profile's, else `BERTH_IMAGE`.
    fn image<'a>(&'a self, spec: &'a SpawnSpec) -> &'a str {
        spec.image
            .as_deref()
            .or_else(|| spec.profile.as_ref().and_then(|p| p.image.as_deref()))
            .unwrap_or(&self.config.image)
    }

    /// Waits until the server answers HTTP, the container exits, the spawn is no
    /// longer wanted, or the start timeout passes.
    async fn wait_ready(
        &self,
        name: &str,
        ip: &str,
        timeout_secs: u64,
        still_wanted: &StillWanted<'_>,
    ) -> Result<(), SpawnError> {
        let exited = || async move {
            let state = self.docker.inspect_container(name, None).await?.state;
            let Some(state) = state.filter(|s| s.running != Some(true)) else {
                return Ok(None);
            };
            let code = state.exit_code.unwrap_or_default();
            let logs = self.tail_logs(name).await;
            Ok(Some(format!("exit code {code}; last output: {logs}")))
        };
        wait_ready(
            ip,
            self.config.server_port,
            timeout_secs,
            still_wanted,
            INSPECT_EVERY,
            exited,
        )
        .await
    }

    async fn tail_logs(&self, name: &str) -> String {
        let options = LogsOptions {
            stdout: true,
            stderr: true,
            tail: "10".into(),
            ..Default::default()
        };
        let mut lines = self.docker.logs(name, Some(options));
        let mut out = String::new();
        while let Some(Ok(chunk)) = lines.next().await {
            out.push_str(&chunk.to_string());
        }
        let out = out.trim();
        if out.is_empty() {
            "none".into()
        } else {
            out.chars().take(2000).collect()
        }
    }

    /// Creates the container. The common case costs one call: a missing image is
    /// pulled (as the policy allows) only when creation says so, and whatever an
    /// earlier attempt left under the same name is replaced only when it is there.
    async fn create(
        &self,
        spec: &SpawnSpec,
        name: &str,
        image: &str,
        network_id: &str,
        progress: Progress<'_>,
    ) -> Result<ContainerCreateResponse, SpawnError> {
        let mut pulled = false;
        let mut replaced = false;
        let api_url = self.api_url(network_id).await;
        loop {
            let options = CreateContainerOptions {
                name: Some(name.into()),
                ..Default::default()
            };
            match self
                .docker
                .create_container(
                    Some(options),
                    self.container_body(spec, image, network_id, &api_url),
                )
                .await
            {
                Ok(created) => return Ok(created),
                Err(e) if is_network_error(&e) => {
                    self.forget_network(network_id).await;
                    return Err(e.into());
                }
                Err(e) if is_status(&e, 404) && !pulled => {
                    progress(30, format!("pulling image {image}"));
                    self.ensure_image(image).await?;
                    pulled = true;
                }
                Err(e) if is_status(&e, 409) && !replaced => {
                    // Left by an interrupted attempt of this job: replaced, never
                    // doubled; a container of that name from elsewhere is kept.
                    self.remove_own(name, &spec.user, &spec.server).await?;
                    replaced = true;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn start(
        &self,
        spec: &SpawnSpec,
        name: &str,
        still_wanted: &StillWanted<'_>,
        progress: Progress<'_>,
    ) -> Result<Spawned, SpawnError> {
        let image = self.image(spec);
        if self.config.pull_policy == PullPolicy::Always {
            progress(30, format!("pulling image {image}"));
            self.ensure_image(image).await?;
        }
        let network_id = self.ensure_network().await?;
        let volume_name = self.names().volume(&spec.user);
        let volume = VolumeCreateRequest {
            name: Some(volume_name.clone()),
            labels: Some(HashMap::from([
                (LABEL_MANAGED.to_owned(), "true".to_owned()),
                (LABEL_INSTANCE.to_owned(), self.config.instance.clone()),
                (LABEL_USER.to_owned(), spec.user.to_string()),
            ])),
            ..Default::default()
        };
        // Creating a volume that exists returns it unchanged: one this deployment
        // did not make for this user is not mounted.
        let volume = self.docker.create_volume(volume).await?;
        if !self.ours(Some(&volume.labels), &spec.user, None) {
            return Err(self.taken("volume", &volume_name));
        }
        progress(40, format!("creating container {name} from {image}"));
        let created = self
            .create(spec, name, image, &network_id, progress)
            .await?;
        progress(60, format!("starting container {name}"));
        if let Err(e) = self.docker.start_container(&created.id, None).await {
            if is_network_error(&e) {
                self.forget_network(&network_id).await;
            }
            // A container that never started is not left behind.
            let _ = self.remove_container(&created.id).await;
            return Err(if is_missing_device(&e) {
                SpawnError::Devices(e.to_string())
            } else {
                e.into()
            });
        }
        let inspect = self.docker.inspect_container(&created.id, None).await?;
        let ip = inspect
            .network_settings
            .and_then(|n| n.networks)
            .and_then(|mut n| n.remove(&self.config.network))
            .and_then(|n| n.ip_address)
            .filter(|ip| !ip.is_empty())
            .ok_or_else(|| {
                SpawnError::Exited("the container has no address on the network".into())
            })?;
        progress(
            70,
            format!(
                "waiting for the server to answer on port {}",
                self.config.server_port
            ),
        );
        let timeout = spec.start_timeout(self.config.start_timeout);
        self.wait_ready(&created.id, &ip, timeout, still_wanted)
            .await?;
        let (mem, cpus) = self.limits(spec);
        Ok(Spawned {
            container_id: created.id,
            url: format!("http://{ip}:{}/", self.config.server_port),
            mem_limit: Some(mem),
            cpu_limit: Some(cpus),
        })
    }
}

#[async_trait]
impl Spawner for DockerSpawner {
    fn kind(&self) -> &'static str {
        "docker"
    }

    async fn spawn(
        &self,
        spec: &SpawnSpec,
        still_wanted: StillWanted<'_>,
        progress: Progress<'_>,
    ) -> Result<Spawned, SpawnError> {
        let name = self.names().container(&spec.user, &spec.server);
        let started = self.start(spec, &name, &still_wanted, progress).await;
        if started.is_err() {
            // No half-started container outlives a failed spawn (and none of
            // another deployment's is touched).
            if let Err(e) = self.remove_own(&name, &spec.user, &spec.server).await {
                tracing::warn!(container = %name, error = %e, "could not remove the container of a failed spawn");
            }
        }
        started
    }

    async fn stop(&self, user: &UserName, server: &ServerName) -> Result<(), SpawnError> {
        let name = self.names().container(user, server);
        let labels = match self.docker.inspect_container(&name, None).await {
            Ok(found) => found.config.and_then(|c| c.labels),
            Err(e) if is_status(&e, 404) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if !self.ours(labels.as_ref(), user, Some(server)) {
            // Not this server's container: there is nothing of ours to stop.
            tracing::warn!(container = %name, "a container of this server's name was not made by this Berth; left alone");
            return Ok(());
        }
        let options = StopContainerOptions {
            t: Some(self.config.stop_timeout as i32),
            ..Default::default()
        };
        match self.docker.stop_container(&name, Some(options)).await {
            Ok(()) => {}
            // 304: not running; 404: no such container.
            Err(e) if is_status(&e, 304) || is_status(&e, 404) => {}
            Err(e) => return Err(e.into()),
        }
        self.remove_container(&name).await
    }

    async fn list_managed(&self) -> Result<Vec<ManagedContainer>, SpawnError> {
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![format!("{LABEL_INSTANCE}={}", self.config.instance)],
        )]);
        let options = ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        };
        let mut found = vec![];
        for c in self.docker.list_containers(Some(options)).await? {
            let Some(id) = c.id else { continue };
            let labels = c.labels.unwrap_or_default();
            let running = matches!(c.state, Some(ContainerSummaryStateEnum::RUNNING));
            let exit_code = if running {
                None
            } else {
                self.docker
                    .inspect_container(&id, None)
                    .await
                    .ok()
                    .and_then(|i| i.state)
                    .and_then(|s| s.exit_code)
            };
            found.push(ManagedContainer {
                name: c
                    .names
                    .and_then(|n| n.into_iter().next())
                    .map(|n| n.trim_start_matches('/').to_owned())
                    .unwrap_or_default(),
                server_id: labels.get(LABEL_SERVER_ID).and_then(|v| v.parse().ok()),
                running,
                exit_code,
                id,
            });
        }
        Ok(found)
    }

    async fn container_state(
        &self,
        container_id: &str,
    ) -> Result<Option<(bool, Option<i64>)>, SpawnError> {
        match self.docker.inspect_container(container_id, None).await {
            Ok(inspect) => {
                let state = inspect.state.unwrap_or_default();
                let running = state.running == Some(true);
                Ok(Some((
                    running,
                    if running { None } else { state.exit_code },
                )))
            }
            Err(e) if is_status(&e, 404) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn remove(&self, container_id: &str) -> Result<(), SpawnError> {
        self.remove_container(container_id).await
    }

    async fn remove_user(&self, user: &UserName) -> Result<(), SpawnError> {
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![
                format!("{LABEL_USER}={user}"),
                format!("{LABEL_INSTANCE}={}", self.config.instance),
            ],
        )]);
        let options = ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        };
        for container in self.docker.list_containers(Some(options)).await? {
            if let Some(id) = container.id {
                self.remove_container(&id).await?;
            }
        }
        let volume = self.names().volume(user);
        match self.docker.inspect_volume(&volume).await {
            Ok(found) if self.ours(Some(&found.labels), user, None) => {}
            Ok(_) => {
                tracing::warn!(volume = %volume, "a volume of this user's name was not made by this Berth; left alone");
                return Ok(());
            }
            Err(e) if is_status(&e, 404) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        match self
            .docker
            .remove_volume(&volume, None::<RemoveVolumeOptions>)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use schema::profiles::{Gpus, Profile, ProfileMount};

    use super::*;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        docker: DockerConfig,
    }

    fn spawner() -> DockerSpawner {
        let flags = Flags::try_parse_from(["worker", "--mem-limit", "256M", "--cpu-limit", "0.5"])
            .expect("flags parse");
        DockerSpawner::connect(Arc::new(flags.docker)).expect("a client (no connection yet)")
    }

    fn spec(profile: Option<Profile>) -> SpawnSpec {
        SpawnSpec {
            server_id: 7,
            job_id: uuid::Uuid::nil(),
            user: UserName::parse("ann").unwrap(),
            server: ServerName::default_server(),
            image: None,
            token: "bs_x".into(),
            proxy_token: "bp_x".into(),
            profile,
        }
    }

    /// The device request is what `docker run --gpus` sends: the e2e tests cannot
    /// show one start (the machine has no GPU driver), so its shape is shown here.
    #[test]
    fn a_profile_s_settings_win_over_the_worker_s_and_its_gpus_become_a_device_request() {
        let spawner = spawner();
        let profile = Profile {
            name: "gpu".into(),
            image: Some("lab/gpu:1".into()),
            command: Some("serve --port {port} --user {user}".into()),
            mem_limit: Some("1G".into()),
            cpu_limit: Some(2.0),
            pids_limit: Some(99),
            env: [("KEY".to_owned(), "value".to_owned())].into(),
            mounts: vec![ProfileMount {
                kind: "bind".into(),
                source: "/srv/data".into(),
                target: "/data/shared".into(),
                read_only: true,
            }],
            gpus: Some(Gpus {
                count: Some(2),
                device_ids: vec![],
                driver: None,
            }),
            ..Profile::default()
        };
        let spec = spec(Some(profile));
        assert_eq!(spawner.image(&spec), "lab/gpu:1");
        let body = spawner.container_body(&spec, "lab/gpu:1", "net", "http://api");
        let host = body.host_config.expect("host config");
        assert_eq!(host.memory, Some(1 << 30));
        assert_eq!(host.nano_cpus, Some(2_000_000_000));
        assert_eq!(host.pids_limit, Some(99));
        let requests = host.device_requests.expect("a device request");
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].driver.as_deref(), Some("nvidia"));
        assert_eq!(requests[0].count, Some(2));
        assert_eq!(requests[0].capabilities, Some(vec![vec!["gpu".to_owned()]]));
        let mounts = host.mounts.expect("mounts");
        assert_eq!(mounts.len(), 2, "the home volume and the profile's bind");
        assert_eq!(mounts[1].typ, Some(MountType::BIND));
        assert_eq!(mounts[1].read_only, Some(true));
        assert!(body.env.unwrap().contains(&"KEY=value".to_owned()));
        assert_eq!(
            body.cmd,
            Some(vec![
                "serve".into(),
                "--port".into(),
                "8888".into(),
                "--user".into(),
                "ann".into()
            ])
        );

        // Without a profile: the worker's own settings, and no devices.
        let plain = spawner.container_body(&super::tests::spec(None), "img", "net", "http://api");
        let host = plain.host_config.unwrap();
        assert_eq!(host.memory, Some(256 << 20));
        assert_eq!(host.nano_cpus, Some(500_000_000));
        assert!(host.device_requests.is_none());
    }
}

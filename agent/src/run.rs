//! Wiring: journal, drivers, lifecycle (with replay), the gRPC server with
//! reflection and health, the lease link; then the bounded drain at
//! shutdown (revert every fault before exiting).

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context;
use chaos_proto::{
    pb::agent_server::AgentServer,
    serve::Listen,
    telemetry::serve_metrics,
    trust::{ClientTls, Role, args::load_for, tls::reload_on_sighup},
};
use tokio::net::TcpListener;
use tracing::{error, info, warn};

use crate::{
    config::{AgentConfig, Firewall, hostname},
    faults::{
        Drivers,
        network::{Exemptions, NetworkDriver},
        process::ProcessDriver,
        resource::ResourceDriver,
    },
    journal::DirJournal,
    lease::{self, LeaseLink},
    lifecycle::{LeaseConfig, Lifecycle, LifecycleConfig},
    metrics::{self, FaultCounters, SampleCollector},
    protect::Protection,
    service::{AgentIdentity, AgentService, proc_line},
    sys::{netexec::SetnsExec, procfs::ProcFs, signals::PidfdSignals},
};

/// The coordinator's socket address from its URL (resolved once, at start).
pub fn coordinator_socket(url: &str) -> Option<(std::net::IpAddr, u16)> {
    use std::net::ToSocketAddrs;
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split('/').next()?;
    let with_port = if authority.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) && !authority.ends_with(']') {
        authority.to_string()
    } else {
        format!("{authority}:{}", if url.starts_with("https") { 443 } else { 80 })
    };
    with_port.to_socket_addrs().ok()?.next().map(|a| (a.ip(), a.port()))
}

/// What the start-up probes found, for the drivers and the capabilities.
pub struct Probed {
    pub nftables: Result<String, String>,
    pub iptables: Result<String, String>,
    pub tc: Result<String, String>,
    pub backends: Vec<crate::sys::probe::KernelBackend>,
    pub cgroups: Result<crate::sys::cgroup::CgroupFs, String>,
}

/// Probe the host and build every driver (also what `revert-journal` uses).
pub fn build_drivers(cfg: &AgentConfig, protection: Arc<Protection>, exemptions: Exemptions) -> anyhow::Result<(Arc<Drivers>, Probed)> {
    let procfs = ProcFs::default();
    let nftables = crate::faults::network::tool_version("nft", "--version", "nftables");
    let iptables = crate::faults::network::tool_version("iptables", "-V", "iptables");
    let tc = crate::faults::network::tool_version("tc", "-V", "iproute2");
    let backends = crate::sys::probe::probe_all(&iptables);
    for b in &backends {
        info!(backend = b.name, available = b.available, detail = %b.detail, "network backend probed");
    }
    let netem = crate::sys::probe::has(&backends, "sch_netem");
    let firewall = match cfg.firewall {
        Firewall::Auto if crate::sys::probe::has(&backends, "nftables") => Firewall::Nftables,
        Firewall::Auto => {
            warn!("nftables is unusable here: partitions and loss use iptables chains (egress drops return EPERM to local senders)");
            Firewall::Iptables
        }
        chosen => chosen,
    };
    info!(?firewall, "partitions and loss use this packet filter");
    let cgroups = crate::sys::cgroup::CgroupFs::detect("/sys/fs/cgroup").map_err(|e| e.to_string());
    match &cgroups {
        Ok(cg) => info!(version = cg.version().as_str(), "cgroup hierarchy detected"),
        Err(e) => warn!(error = %e, "no usable cgroup filesystem: resource faults will be refused"),
    }
    let exe = std::env::current_exe().context("locating this agent's binary (it runs the stress workers)")?;
    let drivers = Arc::new(Drivers {
        process: ProcessDriver::new(Arc::new(procfs.clone()), Arc::new(PidfdSignals::new(procfs.clone())), protection.clone())
            .with_cgroups(cgroups.clone().ok()),
        container: crate::faults::container::ContainerDriver::new(cfg.docker_socket.clone(), protection.clone()),
        resource: ResourceDriver::new(cgroups.clone(), Arc::new(procfs.clone()), protection, exe, cfg.guards),
        network: NetworkDriver::new(Arc::new(SetnsExec), Arc::new(procfs), exemptions)
            .with_iptables_version(iptables.as_deref().ok())
            .with_netem(netem)
            .with_firewall(firewall),
    });
    Ok((drivers, Probed { nftables, iptables, tc, backends, cgroups }))
}

/// The agent id: the configured one, else the certificate's name (under
/// TLS), else the hostname. Under TLS it must be the certificate's name,
/// since the coordinator accepts no other.
pub fn agent_id(cfg: &AgentConfig, tls: Option<&chaos_proto::trust::Tls>) -> anyhow::Result<String> {
    match (cfg.agent_id.as_deref(), tls.map(|t| t.identity().name)) {
        (Some(id), Some(cert)) if id != cert => anyhow::bail!(
            "agent_id: {id:?}, but the certificate {} is for agent {cert:?}: the coordinator only accepts an agent under its \
             certificate's name (drop --agent-id, or issue a certificate with --name {id})",
            cfg.tls.as_ref().map(|f| f.cert.display().to_string()).unwrap_or_default()
        ),
        (Some(id), _) => Ok(id.to_string()),
        (None, Some(cert)) => Ok(cert),
        (None, None) => Ok(hostname()),
    }
}

/// Serve the agent on `listener` until `shutdown` resolves, then revert
/// every fault (bounded by `shutdown_timeout`) and return.
pub async fn run(cfg: AgentConfig, listener: TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let local = listener.local_addr().context("listener address")?;
    let tls = match &cfg.tls {
        Some(files) => Some(load_for(files, Role::Agent, "chaos-agent").map_err(anyhow::Error::msg)?),
        None => None,
    };
    let agent_id = agent_id(&cfg, tls.as_deref())?;
    let journal = Arc::new(DirJournal::open(&cfg.journal_dir).with_context(|| format!("opening journal {}", cfg.journal_dir.display()))?);
    let local_socket = match &cfg.local_socket {
        Some(p) => Some(crate::breakglass::bind(p)?),
        None => None,
    };
    let protection = Arc::new(Protection::new(std::process::id(), cfg.protected_pids.clone(), cfg.protected_names.clone()));
    let exemptions = Exemptions {
        agent_port: local.port(),
        coordinator: cfg.coordinator.as_deref().and_then(coordinator_socket),
        cidrs: cfg.protected_cidrs.clone(),
    };
    if cfg.coordinator.is_some() && exemptions.coordinator.is_none() {
        warn!(
            "cannot resolve the coordinator's address: network faults on this host will NOT exempt the control channel by address (the agent port stays exempt)"
        );
    }
    let (drivers, probed) = build_drivers(&cfg, protection.clone(), exemptions)?;
    let mut registry = prometheus_client::registry::Registry::default();
    let rpc_metrics = chaos_proto::telemetry::RpcMetrics::register(&mut registry);
    let lc_cfg = LifecycleConfig {
        max_fault_duration: cfg.max_fault_duration,
        lease: cfg.coordinator.as_ref().map(|url| LeaseConfig { duration: cfg.lease, coordinator_url: url.clone() }),
        counters: FaultCounters::register(&mut registry),
        ..Default::default()
    };
    let (lifecycle, _task, report) = Lifecycle::start(lc_cfg, drivers, journal).await.context("starting the fault lifecycle")?;
    if report.reverted + report.failed + report.corrupt > 0 {
        warn!(
            reverted = report.reverted,
            failed = report.failed,
            corrupt = report.corrupt,
            "journal replay: a previous run left faults applied"
        );
    }
    let identity = Arc::new(AgentIdentity {
        agent_id: agent_id.clone(),
        hostname: hostname(),
        coordinator_url: cfg.coordinator.clone(),
        lease: cfg.lease,
        max_fault_duration: cfg.max_fault_duration,
        kernel_release: proc_line("/proc/sys/kernel/osrelease"),
        boot_id: proc_line("/proc/sys/kernel/random/boot_id"),
        journal_dir: cfg.journal_dir.display().to_string(),
        labels: cfg.labels.clone(),
        nftables: probed.nftables,
        iptables: probed.iptables,
        tc: probed.tc,
        backends: probed.backends,
        cgroups: probed.cgroups,
        docker_socket: cfg.docker_socket.clone(),
        instance_id: uuid::Uuid::new_v4().to_string(),
        tls: tls.clone(),
    });

    let metrics = {
        let (lc, rt) = (lifecycle.clone(), tokio::runtime::Handle::current());
        let active = move || {
            rt.block_on(async { tokio::time::timeout(Duration::from_millis(200), lc.status()).await })
                .ok()
                .and_then(Result::ok)
                .map_or(0, |s| u32::try_from(s.active_faults).unwrap_or(u32::MAX))
        };
        metrics::start(agent_id.clone(), cfg.metrics.clone(), Arc::new(active)).context("starting the metrics sampler")?
    };
    let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(addr) = cfg.metrics_listen {
        registry.register_collector(Box::new(SampleCollector(metrics.subscribe())));
        serve_metrics(addr, Arc::new(registry), async {
            let _ = metrics_stopped.await;
        })
        .await
        .with_context(|| format!("metrics.listen: cannot serve Prometheus metrics on {addr}"))?;
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AgentServer<AgentService>>().await;
    let mut routes = tonic::service::RoutesBuilder::default();
    routes.add_service(health_service).add_service(AgentServer::new(AgentService::new(lifecycle.clone(), identity.clone(), metrics)));
    chaos_proto::serve::add_reflection(&mut routes, &["chaos.v1.Agent"]).context("building reflection service")?;
    let routes = routes.routes();

    let (client_tls, listen) = match &tls {
        Some(t) => (ClientTls::Tls(Arc::clone(t)), Listen::Tls(Arc::clone(t))),
        None => (ClientTls::Insecure, Listen::Insecure),
    };
    let lease_task = cfg.coordinator.as_ref().map(|url| {
        tokio::spawn(lease::run(
            LeaseLink {
                coordinator_url: url.clone(),
                advertise: cfg.advertise.clone(),
                heartbeat_interval: cfg.heartbeat_interval,
                tls: client_tls,
            },
            identity.clone(),
            lifecycle.clone(),
            protection.clone(),
        ))
    });
    let reload_task = tls.as_ref().map(|t| tokio::spawn(reload_on_sighup(Arc::clone(t), "chaos-agent")));
    let tls_text =
        tls.as_ref().map_or_else(|| "INSECURE (plaintext, no authentication)".to_string(), |t| format!("mTLS as {}", t.identity()));
    match &cfg.coordinator {
        Some(url) => info!(listen = %local, agent_id = %agent_id, coordinator = %url, lease = %humantime::format_duration(cfg.lease),
            journal = %cfg.journal_dir.display(), tls = %tls_text, "chaos-agent serving; faults accepted once the coordinator answers"),
        None => info!(listen = %local, agent_id = %agent_id, journal = %cfg.journal_dir.display(), tls = %tls_text,
            "chaos-agent serving standalone (no coordinator, no dead-man lease)"),
    }

    // One shutdown for both listeners.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let unix_server = local_socket.map(|(listener, guard)| {
        let (routes, rpc, stop) = (routes.clone(), rpc_metrics.layer(), stopped(stop_rx.clone()));
        info!(socket = %guard.path().display(), "break-glass Agent service on a root-only Unix socket");
        tokio::spawn(async move {
            let path = guard.path().display().to_string();
            let served = chaos_proto::serve::serve_unix(routes, listener, path, rpc, stop).await;
            drop(guard);
            served
        })
    });
    let served = chaos_proto::serve::serve_tcp(routes, listener, &listen, rpc_metrics.layer(), stopped(stop_rx)).await;
    for t in [lease_task, reload_task].into_iter().flatten() {
        t.abort();
    }
    health.set_not_serving::<AgentServer<AgentService>>().await;
    info!(timeout = %humantime::format_duration(cfg.shutdown_timeout), "stopping: reverting every fault");
    match tokio::time::timeout(cfg.shutdown_timeout, lifecycle.shutdown()).await {
        Ok(Ok(out)) => {
            if out.failed.is_empty() {
                info!(reverted = out.reverted.len(), "all faults reverted; exiting");
            } else {
                error!(
                    reverted = out.reverted.len(),
                    failed = out.failed.len(),
                    "some faults could not be reverted; their journal records remain and the next start retries them"
                );
            }
        }
        Ok(Err(e)) => error!(error = %e, "lifecycle gone before shutdown"),
        Err(_) => error!("revert at shutdown timed out; the journal keeps what is left and the next start reverts it"),
    }
    let _ = metrics_stop.send(());
    if let Some(u) = unix_server
        && let Ok(Err(e)) = u.await
    {
        warn!(error = %e, "break-glass socket server");
    }
    served.context("gRPC server")?;
    Ok(())
}

/// `chaos-agent revert-journal`: revert whatever the journal holds, with
/// no server, no coordinator and no network (for a binary that no longer
/// starts, or a host cut off). Refused while an agent holds the journal.
pub async fn revert_journal(cfg: AgentConfig) -> anyhow::Result<crate::lifecycle::ReplayReport> {
    let journal = DirJournal::open(&cfg.journal_dir).map_err(|e| {
        anyhow::anyhow!("{e}\n  an agent that is running holds this journal: revert through it instead (chaos agent revert-all --local)")
    })?;
    let protection = Arc::new(Protection::new(std::process::id(), cfg.protected_pids.clone(), cfg.protected_names.clone()));
    let exemptions = Exemptions { agent_port: 0, coordinator: None, cidrs: cfg.protected_cidrs.clone() };
    let (drivers, _) = build_drivers(&cfg, protection, exemptions)?;
    let (lifecycle, task, report) =
        Lifecycle::start(LifecycleConfig::default(), drivers, Arc::new(journal)).await.context("replaying the journal")?;
    drop(lifecycle);
    let _ = task.await;
    Ok(report)
}

#[cfg(test)]
mod tests {
    #[test]
    fn coordinator_socket_from_url() {
        assert_eq!(super::coordinator_socket("http://198.18.0.1:50051"), Some(("198.18.0.1".parse().expect("ip"), 50051)));
        assert_eq!(super::coordinator_socket("http://[::1]:7"), Some(("::1".parse().expect("ip"), 7)));
        assert_eq!(super::coordinator_socket("http://127.0.0.1"), Some(("127.0.0.1".parse().expect("ip"), 80)));
    }
}

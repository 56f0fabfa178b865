//! Wiring: registry, service, reflection and health, graceful shutdown.

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context;
use chaos_proto::{
    pb::coordinator_server::CoordinatorServer,
    serve::Listen,
    trust::{ClientTls, Role, args::load_for, tls::reload_on_sighup},
};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::{
    armstore::ArmStore,
    config::CoordinatorConfig,
    monitor::{self, watch::SharedStreamMetrics},
    registry::Registry,
    scenarios::{Scenarios, Timing},
    service::{CoordinatorService, ServiceConfig},
    store::Store,
    telemetry::Telemetry,
};

/// Serve the coordinator on `listener` until `shutdown` resolves.
pub async fn run(cfg: CoordinatorConfig, listener: TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let local = listener.local_addr().context("listener address")?;
    let tls = match &cfg.tls {
        Some(files) => Some(load_for(files, Role::Coordinator, "chaos-coordinator").map_err(anyhow::Error::msg)?),
        None => None,
    };
    let (client_tls, listen) = match &tls {
        Some(t) => (ClientTls::Tls(Arc::clone(t)), Listen::Tls(Arc::clone(t))),
        None => (ClientTls::Insecure, Listen::Insecure),
    };
    let store = ArmStore::open(&cfg.state_dir).with_context(|| format!("opening state dir {}", cfg.state_dir.display()))?;
    let arm = store.load().context("loading the fleet's armed state")?;
    if !arm.armed {
        warn!(reason = %arm.disarmed_reason, "starting DISARMED (an emergency stop was not followed by Arm); run `chaos arm` to accept faults");
    }
    let registry = Arc::new(Registry::new(Duration::from_millis(500), arm, Some(store), client_tls));
    let db = cfg.state_dir.join("coordinator.db");
    let db_store = Arc::new(Store::open(&db).with_context(|| format!("opening the scenario store {}", db.display()))?);
    let scenarios = Scenarios::new(cfg.policy.clone(), Arc::clone(&registry), db_store, Timing::default());
    let recovered = scenarios.recover().context("recovering unfinished scenarios")?;
    // Agents re-register within about one heartbeat interval of a restart.
    tokio::spawn(Arc::clone(&scenarios).watchdog(cfg.heartbeat_interval * 3, Duration::from_secs(1)));
    if recovered > 0 {
        info!(recovered, "picked up unfinished scenarios from the previous run");
    }
    let telemetry = Telemetry::default();
    let monitor = Arc::new(monitor::start(&cfg.monitoring, Arc::clone(&registry), Arc::clone(&scenarios), telemetry.alerts.clone()));
    let (prom, rpc_metrics) = telemetry.registry(Arc::clone(&registry), Arc::clone(&scenarios), Arc::clone(&monitor.hub));
    let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(addr) = cfg.monitoring.listen {
        chaos_proto::telemetry::serve_metrics(addr, Arc::new(prom), async {
            let _ = metrics_stopped.await;
        })
        .await
        .with_context(|| format!("monitoring.listen: cannot serve Prometheus metrics on {addr}"))?;
    }
    let svc = CoordinatorService::new(
        registry,
        scenarios,
        Arc::clone(&monitor),
        ServiceConfig {
            emergency_stop_deadline: cfg.emergency_stop_deadline,
            heartbeat_interval: cfg.heartbeat_interval,
            listen_address: local.to_string(),
            recovery: cfg.recovery,
            emergency_stops: telemetry.emergency_stops.clone(),
            tls: tls.clone(),
        },
    );
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CoordinatorServer<CoordinatorService>>().await;
    let mut routes = tonic::service::RoutesBuilder::default();
    // StreamMetrics from the hub's shared bytes; every other method as generated.
    routes.add_service(health_service).add_service(SharedStreamMetrics::new(CoordinatorServer::new(svc), monitor));
    chaos_proto::serve::add_reflection(&mut routes, &["chaos.v1.Coordinator"]).context("building reflection service")?;
    let reload = tls.as_ref().map(|t| tokio::spawn(reload_on_sighup(Arc::clone(t), "chaos-coordinator")));
    let tls_text =
        tls.as_ref().map_or_else(|| "INSECURE (plaintext, no authentication)".to_string(), |t| format!("mTLS as {}", t.identity()));
    info!(listen = %local, tls = %tls_text, "chaos-coordinator serving");
    let served = chaos_proto::serve::serve_tcp(routes.routes(), listener, &listen, rpc_metrics.layer(), shutdown).await;
    if let Some(r) = reload {
        r.abort();
    }
    let _ = metrics_stop.send(());
    served.context("gRPC server")?;
    info!("chaos-coordinator stopped");
    Ok(())
}

//! The chaos coordinator: registry of agents and their leases, the fleet's
//! armed state, emergency stop (RevertAll fanned out to every agent at once
//! with a short deadline, leaving the fleet disarmed until Arm), and
//! scenarios: a fault on the agents a selector picks, admitted only within
//! the safety rules, queued beyond the concurrency limit, persisted with an
//! audit log in SQLite.
//!
//! Reading order: [`registry`], [`fleet`] (fan-out), [`policy`] (the rules
//! from the config file), [`admission`] (selection and blast radius),
//! [`scenarios`] (queue, runners, recovery), [`store`], [`monitor`] (metric
//! hub, probes, alert rules and stop conditions), [`telemetry`]
//! (Prometheus), [`service`], [`run`].

pub mod admission;
pub mod armstore;
pub mod config;
pub mod error;
pub mod fleet;
pub mod gameday;
pub mod monitor;
pub mod policy;
pub mod registry;
pub mod run;
pub mod scenarios;
pub mod service;
pub mod standin;
pub mod store;
pub mod telemetry;
pub mod validate;

//! The chaos agent: applies real faults on its host, journals them to disk
//! before touching anything, and reverts them for sure — at their TTL, on
//! request, on emergency stop, when the coordinator goes silent (dead-man
//! lease), on SIGTERM, and after a crash (journal replay at start).
//!
//! Reading order: [`lifecycle`] (the state machine), [`faults`] (one driver
//! per family), [`journal`], [`sys`] (OS calls behind traits), [`metrics`]
//! (the host sampler), [`service`] (the gRPC surface), [`lease`] (the
//! coordinator link), [`run`] (wiring).

pub mod breakglass;
pub mod config;
pub mod error;
pub mod faults;
pub mod journal;
pub mod lease;
pub mod lifecycle;
pub mod metrics;
pub mod protect;
#[cfg(test)]
mod replay_fixtures;
pub mod run;
pub mod service;
pub mod stressor;
pub mod sys;

//! The chaos coordinator: registry of agents and their leases, the fleet's
//! armed state, and emergency stop (RevertAll fanned out to every agent at
//! once with a short deadline, leaving the fleet disarmed until Arm).
//!
//! Reading order: [`registry`], [`fleet`] (fan-out), [`service`], [`run`].

pub mod admission;
pub mod armstore;
pub mod config;
pub mod error;
pub mod fleet;
pub mod policy;
pub mod registry;
pub mod run;
pub mod scenarios;
pub mod service;
pub mod standin;
pub mod store;

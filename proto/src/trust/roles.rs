//! Which role may call which RPC: one table for both servers, checked in
//! one place (the auth layer). A method that is not in the table is
//! refused (fail closed); a unit test checks that every method of the
//! contract has a row, and another that README's table says the same.

use tonic::Status;

use super::identity::{Caller, Role, Via};

use Role::{Admin, Agent, Coordinator, Operator, Viewer};

const READ: &[Role] = &[Viewer, Operator, Admin];
const OPERATE: &[Role] = &[Operator, Admin];
const READ_OR_COORDINATOR: &[Role] = &[Viewer, Operator, Admin, Coordinator];

/// Every RPC and the roles allowed to call it.
pub const RULES: &[(&str, &[Role])] = &[
    // chaos.v1.Agent: the coordinator drives faults; people read, an
    // operator may revert everything, only an admin injects directly.
    ("/chaos.v1.Agent/ApplyFault", &[Admin, Coordinator]),
    ("/chaos.v1.Agent/RevertFault", &[Admin, Coordinator]),
    ("/chaos.v1.Agent/SetArmed", &[Admin, Coordinator]),
    ("/chaos.v1.Agent/RevertAll", &[Operator, Admin, Coordinator]),
    ("/chaos.v1.Agent/ListFaults", READ_OR_COORDINATOR),
    ("/chaos.v1.Agent/GetCapabilities", READ_OR_COORDINATOR),
    ("/chaos.v1.Agent/StreamMetrics", READ_OR_COORDINATOR),
    // chaos.v1.Coordinator: only agents register and keep leases.
    ("/chaos.v1.Coordinator/RegisterAgent", &[Agent]),
    ("/chaos.v1.Coordinator/Heartbeat", &[Agent]),
    ("/chaos.v1.Coordinator/HeartbeatStream", &[Agent]),
    ("/chaos.v1.Coordinator/Arm", &[Admin]),
    ("/chaos.v1.Coordinator/EmergencyStop", OPERATE),
    ("/chaos.v1.Coordinator/CreateScenario", OPERATE),
    ("/chaos.v1.Coordinator/StopScenario", OPERATE),
    ("/chaos.v1.Coordinator/ValidateRecovery", OPERATE),
    ("/chaos.v1.Coordinator/StartGameDay", OPERATE),
    ("/chaos.v1.Coordinator/StopGameDay", OPERATE),
    ("/chaos.v1.Coordinator/RecordExperimentRun", OPERATE),
    ("/chaos.v1.Coordinator/ListAgents", READ),
    ("/chaos.v1.Coordinator/GetStatus", READ),
    ("/chaos.v1.Coordinator/ListScenarios", READ),
    ("/chaos.v1.Coordinator/GetScenario", READ),
    ("/chaos.v1.Coordinator/WatchScenario", READ),
    ("/chaos.v1.Coordinator/ListAudit", READ),
    ("/chaos.v1.Coordinator/StreamMetrics", READ),
    ("/chaos.v1.Coordinator/GetMetrics", READ),
    ("/chaos.v1.Coordinator/GetGameDay", READ),
    ("/chaos.v1.Coordinator/ListExperimentRuns", READ),
];

/// Services every authenticated identity may call (they change nothing).
pub const OPEN_SERVICES: &[&str] =
    &["/grpc.health.v1.Health/", "/grpc.reflection.v1.ServerReflection/", "/grpc.reflection.v1alpha.ServerReflection/"];

/// The roles allowed to call `path` (`/package.Service/Method`).
pub fn allowed(path: &str) -> Option<&'static [Role]> {
    if OPEN_SERVICES.iter().any(|s| path.starts_with(s)) {
        return Some(&Role::ALL);
    }
    RULES.iter().find(|(m, _)| *m == path).map(|(_, r)| *r)
}

fn names(roles: &[Role]) -> String {
    let v: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
    match v.as_slice() {
        [] => "no role".into(),
        [one] => (*one).to_string(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}

/// May `caller` call `path`? PERMISSION_DENIED names the method, the roles
/// it needs and the caller's identity, role and address.
pub fn authorize(path: &str, caller: &Caller) -> Result<(), Status> {
    if caller.via == Via::Insecure {
        return Ok(());
    }
    let method = path.trim_start_matches('/');
    let Some(roles) = allowed(path) else {
        return Err(Status::permission_denied(format!("{method}: no role may call this method on this server")));
    };
    match caller.role() {
        Some(r) if roles.contains(&r) => Ok(()),
        Some(_) => Err(Status::permission_denied(format!("{method} needs role {}; the caller is {caller}", names(roles)))),
        None => Err(Status::unauthenticated(format!("{method}: no identity"))),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use prost::Message;

    use super::*;
    use crate::trust::identity::Identity;

    fn caller(role: Role) -> Caller {
        Caller { identity: Some(Identity::new(role, "someone").expect("name")), via: Via::Certificate, address: "127.0.0.1:9".into() }
    }

    /// Every method of chaos.v1's services, read from the descriptor set.
    fn contract_methods() -> BTreeSet<String> {
        let set = prost_types::FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET).expect("descriptor set");
        let mut out = BTreeSet::new();
        for file in set.file.iter().filter(|f| f.package() == "chaos.v1") {
            for s in &file.service {
                for m in &s.method {
                    out.insert(format!("/chaos.v1.{}/{}", s.name(), m.name()));
                }
            }
        }
        out
    }

    #[test]
    fn every_method_of_the_contract_has_exactly_one_rule() {
        let methods = contract_methods();
        assert!(methods.len() > 20, "{methods:?}");
        let ruled: Vec<&str> = RULES.iter().map(|(m, _)| *m).collect();
        let unique: BTreeSet<&str> = ruled.iter().copied().collect();
        assert_eq!(unique.len(), ruled.len(), "a method has two rules");
        let ruled: BTreeSet<String> = unique.into_iter().map(str::to_string).collect();
        assert_eq!(methods, ruled, "the table and the contract differ");
    }

    #[test]
    fn refusals_name_the_role_needed_and_the_caller() {
        let e = authorize("/chaos.v1.Coordinator/CreateScenario", &caller(Viewer)).expect_err("viewer");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("operator or admin") && e.message().contains("someone (viewer) from 127.0.0.1:9"), "{}", e.message());
        assert!(authorize("/chaos.v1.Coordinator/Arm", &caller(Operator)).is_err());
        assert!(authorize("/chaos.v1.Coordinator/Arm", &caller(Admin)).is_ok());
        assert!(authorize("/chaos.v1.Coordinator/EmergencyStop", &caller(Agent)).is_err());
        assert!(authorize("/chaos.v1.Coordinator/Heartbeat", &caller(Agent)).is_ok());
        assert!(authorize("/chaos.v1.Coordinator/Heartbeat", &caller(Admin)).is_err());
        assert!(authorize("/chaos.v1.Agent/ApplyFault", &caller(Operator)).is_err());
        assert!(authorize("/chaos.v1.Agent/ApplyFault", &caller(Coordinator)).is_ok());
        assert!(authorize("/chaos.v1.Agent/RevertAll", &caller(Operator)).is_ok());
        assert!(authorize("/chaos.v1.Agent/RevertAll", &caller(Viewer)).is_err());
        assert!(authorize("/grpc.health.v1.Health/Check", &caller(Viewer)).is_ok());
        let e = authorize("/chaos.v1.Agent/Unknown", &caller(Admin)).expect_err("fail closed");
        assert!(e.message().contains("no role"), "{}", e.message());
        let insecure = Caller { identity: None, via: Via::Insecure, address: "x".into() };
        assert!(authorize("/chaos.v1.Coordinator/Arm", &insecure).is_ok());
    }

    /// README's roles table (between its two markers) lists the same rules.
    #[test]
    fn readme_table_matches_the_rules() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).expect("README");
        let table = readme
            .split("<!-- roles-table:begin -->")
            .nth(1)
            .and_then(|s| s.split("<!-- roles-table:end -->").next())
            .expect("README has the roles table markers");
        let mut seen = BTreeSet::new();
        for line in table.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let (service, method, roles) = (cells[1].trim_matches('`'), cells[2].trim_matches('`'), cells[3]);
            let path = format!("/chaos.v1.{service}/{method}");
            let want = allowed(&path).unwrap_or_else(|| panic!("README lists {path}, which has no rule"));
            let listed: BTreeSet<&str> = roles.split(',').map(str::trim).collect();
            let want: BTreeSet<&str> = want.iter().map(|r| r.as_str()).collect();
            assert_eq!(listed, want, "README row for {path}");
            seen.insert(path);
        }
        let all: BTreeSet<String> = RULES.iter().map(|(m, _)| m.to_string()).collect();
        assert_eq!(seen, all, "README's table lacks some rules");
    }
}

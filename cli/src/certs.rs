//! `chaos certs init|issue|show`: a small CA for a fleet, built on
//! `chaos_proto::trust::certs` (rcgen to make, x509-parser to read).

use std::{path::PathBuf, time::Duration};

use chaos_proto::trust::{
    Identity, Role,
    certs::{self, CertInfo, Request},
    tls,
};
use clap::Subcommand;
use serde_json::json;

use crate::{
    conn,
    output::{CliError, Format, emit, emit_json, exit, table},
};

pub const HELP: &str = "\
Three commands give a new fleet working certificates:
  chaos certs init ./ca                         # the CA: ca.pem (share it) and ca.key (0600; keep it offline)
  chaos certs issue --ca ./ca --role coordinator --name coord-1 --san coord.example.net --out /etc/chaos/tls
  chaos certs issue --ca ./ca --role agent --name kafka-1 --san 10.0.0.7 --out /etc/chaos/tls   # on each host
  chaos certs issue --ca ./ca --role operator --name alice --out ~/.config/chaos/tls            # for each person

Then: chaos-coordinator --tls-dir /etc/chaos/tls, chaos-agent --tls-dir /etc/chaos/tls, and
`chaos` finds ~/.config/chaos/tls by itself (or --tls-dir, env CHAOS_TLS_DIR).
Renew in place with `issue ... --force`, then `kill -HUP` the daemon: new connections use the
new certificate, faults and open streams stay.

Roles: viewer (read), operator (+ scenarios, experiments, GameDays, validation, emergency stop),
admin (+ arm, direct `chaos agent` verbs); agent and coordinator are for the daemons.";

const ISSUE_HELP: &str = "\
The identity (role and name) goes in a URI SAN, spiffe://chaos/ROLE/NAME, which both servers
read to decide what the holder may do. An agent's name is its agent id (the coordinator refuses
an agent registering under any other name). Agent and coordinator certificates are also server
certificates: give the host names and addresses clients dial with --san (localhost, 127.0.0.1
and ::1 are always added).

Examples:
  chaos certs issue --ca ./ca --role agent --name kafka-1 --san 10.0.0.7 --san kafka-1.lan --out ./kafka-1
  chaos certs issue --ca ./ca --role viewer --name grafana --expires-in 90d --out ./grafana
  chaos certs issue --ca ./ca --role admin --name oncall --expires-in 12h --out ~/.config/chaos/tls --force";

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Make a CA in DIR: ca.pem (give it to every host and person) and ca.key (mode 0600).
    #[command(
        after_help = "An existing CA is never replaced (everything it signed would stop working).\n\nExample:\n  chaos certs init ./ca --name prod --expires-in 3650d"
    )]
    Init {
        /// Directory for the CA (made with mode 0700).
        dir: PathBuf,
        /// A name for the CA (in its subject).
        #[arg(long, default_value = "fleet")]
        name: String,
        /// How long the CA is valid.
        #[arg(long, default_value = "3650d", value_parser = humantime::parse_duration)]
        expires_in: Duration,
    },
    /// Issue a key pair signed by the CA: cert.pem, key.pem (0600) and ca.pem into --out.
    #[command(after_help = ISSUE_HELP)]
    Issue {
        /// The CA directory (`chaos certs init DIR`).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// What the holder may do.
        #[arg(long, value_enum)]
        role: Role,
        /// Who the holder is: a person's login, an agent id, a coordinator name.
        #[arg(long)]
        name: String,
        /// A DNS name or IP address clients dial (agent and coordinator only; repeatable).
        #[arg(long = "san", value_name = "NAME|IP")]
        sans: Vec<String>,
        /// How long the certificate is valid.
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
        expires_in: Duration,
        /// Directory to write cert.pem, key.pem and ca.pem into (made with mode 0700).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Replace an existing cert.pem and key.pem in --out (renewal).
        #[arg(long)]
        force: bool,
    },
    /// What a certificate says: identity, role, names, expiry. FILE, or https://HOST:PORT for
    /// the certificate a server presents now.
    #[command(
        after_help = "Examples:\n  chaos certs show ~/.config/chaos/tls/cert.pem\n  chaos certs show https://10.0.0.7:50052     # checked with your ca.pem when you have one\n  chaos -o json certs show ./kafka-1/cert.pem | jq .not_after"
    )]
    Show {
        /// A PEM file, or https://HOST:PORT.
        what: String,
    },
}

pub async fn run(cmd: CertsCommand, fmt: Format) -> Result<u8, CliError> {
    match cmd {
        CertsCommand::Init { dir, name, expires_in } => {
            let cert = certs::init_ca_dir(&dir, &name, expires_in).map_err(usage)?;
            let info = certs::describe_file(&cert).map_err(usage)?.remove(0);
            match fmt {
                Format::Json => emit_json(&json!({"ca_cert": cert, "ca_key": dir.join(certs::CA_KEY), "certificate": info})),
                Format::Table => emit(&format!(
                    "CA made in {}: {} (share it) and {} (0600: keep it safe, it signs every identity)\nvalid until {}\nnext: chaos certs issue --ca {} --role operator --name $USER --out ~/.config/chaos/tls",
                    dir.display(),
                    cert.display(),
                    dir.join(certs::CA_KEY).display(),
                    humantime::format_rfc3339_seconds(info.not_after),
                    dir.display()
                )),
            }
            Ok(exit::OK)
        }
        CertsCommand::Issue { ca, role, name, sans, expires_in, out, force } => {
            let identity = Identity::new(role, &name).map_err(|e| CliError::new(exit::USAGE, format!("--name {name:?}: {e}")))?;
            let req = Request::new(identity, sans, expires_in);
            let w = certs::issue_to_dir(&ca, &req, &out, force).map_err(usage)?;
            let info = certs::describe_file(&w.cert).map_err(usage)?.remove(0);
            match fmt {
                Format::Json => emit_json(&json!({"cert": w.cert, "key": w.key, "ca": w.ca, "certificate": info})),
                Format::Table => emit(&format!(
                    "issued {} ({}) valid until {}\n  {}\n  {} (0600)\n  {}\nuse: --tls-dir {}",
                    info.identity.as_deref().unwrap_or("?"),
                    certs::role_help(role),
                    humantime::format_rfc3339_seconds(info.not_after),
                    w.cert.display(),
                    w.key.display(),
                    w.ca.display(),
                    out.display()
                )),
            }
            Ok(exit::OK)
        }
        CertsCommand::Show { what } => show(&what, fmt).await,
    }
}

fn usage(e: chaos_proto::trust::TrustError) -> CliError {
    CliError::new(exit::USAGE, e.to_string())
}

async fn show(what: &str, fmt: Format) -> Result<u8, CliError> {
    let (infos, source, rejected) = if what.contains("://") {
        let url = chaos_proto::trust::normalize_url(what, true).map_err(usage)?;
        let uri: tonic::codegen::http::Uri = url.parse().map_err(|e| CliError::new(exit::USAGE, format!("{what:?}: not a URL: {e}")))?;
        let (host, port) = tls::host_port(&uri).map_err(usage)?;
        // Checked with our CA when we have one; shown either way.
        let ours = conn::client_credentials().ok().flatten();
        let p = tls::presented(&host, port, ours.as_deref(), Duration::from_secs(5))
            .await
            .map_err(|e| CliError::new(exit::UNREACHABLE, e.to_string()))?;
        let infos = p.chain.iter().map(|c| certs::describe(c.as_ref())).collect::<Result<Vec<_>, _>>().map_err(usage)?;
        let verdict = match (&ours, p.rejected) {
            (None, _) => Some("not checked (no CA: --tls-dir or CHAOS_TLS_DIR)".to_string()),
            (Some(_), Some(why)) => Some(format!("NOT trusted by your CA: {why}")),
            (Some(_), None) => None,
        };
        (infos, format!("{host}:{port}"), verdict)
    } else {
        (certs::describe_file(&PathBuf::from(what)).map_err(usage)?, what.to_string(), None)
    };
    match fmt {
        Format::Json => emit_json(&json!({"source": source, "certificates": infos, "verification": rejected})),
        Format::Table => {
            let rows: Vec<Vec<String>> = infos.iter().map(row).collect();
            emit(&table(&["IDENTITY", "ROLE", "NAME", "NAMES", "NOT AFTER", "ISSUER"], &rows));
            if let Some(r) = &rejected {
                emit(&format!("{source}: {r}"));
            }
        }
    }
    Ok(if infos.iter().any(CertInfo::expired) { exit::FAILURE } else { exit::OK })
}

fn row(i: &CertInfo) -> Vec<String> {
    let mut names: Vec<String> = i.dns_names.clone();
    names.extend(i.ip_addresses.iter().cloned());
    let until = humantime::format_rfc3339_seconds(i.not_after).to_string();
    vec![
        i.identity.clone().unwrap_or_else(|| if i.is_ca { "(CA)".into() } else { "(none)".into() }),
        i.role.clone().unwrap_or_else(|| "-".into()),
        i.name.clone().unwrap_or_else(|| "-".into()),
        if names.is_empty() { "-".into() } else { names.join(",") },
        if i.expired() { format!("{until} EXPIRED") } else { until },
        i.issuer.clone(),
    ]
}

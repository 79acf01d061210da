//! `exactly`: the command-line tool for an exactly cluster. Human tables by default, `--json` for
//! scripts. Errors are printed with their gRPC code and the server's message; the exit code says
//! what kind of failure it was (see [`exit_code`]).

mod audit;
mod bench;
mod bench_open;
mod cancel;
mod cert;
mod cluster;
mod cron;
mod dlq;
mod get;
mod health;
mod list;
mod output;
mod queue;
mod status;
mod submit;
mod token;
mod watch;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use exactly_client::{Client, ClientOptions};

/// The local three-node cluster's addresses.
const DEFAULT_ENDPOINTS: &str = "http://127.0.0.1:7101,http://127.0.0.1:7102,http://127.0.0.1:7103";

/// Exit code: the command ran and succeeded.
pub const EXIT_OK: u8 = 0;
/// Exit code: the cluster refused the request (a final gRPC status such as INVALID_ARGUMENT,
/// NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, RESOURCE_EXHAUSTED, OUT_OF_RANGE), or some
/// items of a batch were refused, or the command failed for another reason.
pub const EXIT_REFUSED: u8 = 1;
/// Exit code: the command line was wrong (unknown flag, bad value, unreadable payload file);
/// nothing was sent.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: no node answered within --retry-time; nothing was applied.
pub const EXIT_UNAVAILABLE: u8 = 3;
/// Exit code: a write may or may not have been applied (the connection broke or the deadline
/// passed after it was sent); check with get or list.
pub const EXIT_UNKNOWN_OUTCOME: u8 = 4;

/// A mistake on the command line found after parsing (for example a payload file that cannot
/// be read). Exits with [`EXIT_USAGE`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Some items of a batch call were refused by the server although the call itself succeeded
/// (for example a cancel of an already finished job). Exits with [`EXIT_REFUSED`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RefusedError(pub String);

/// Submit, inspect, watch and manage jobs, dead letters, queues and cron schedules on an exactly
/// cluster.
///
/// Exit codes: 0 success, 1 refused by the cluster, 2 usage error, 3 cluster unavailable,
/// 4 outcome unknown (a write may or may not have been applied).
#[derive(Parser, Debug, PartialEq)]
#[command(name = "exactly", version)]
struct Cli {
    /// Cluster endpoints, comma-separated; any node will do.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "EXACTLY_ENDPOINTS",
        value_delimiter = ',',
        default_value = DEFAULT_ENDPOINTS
    )]
    endpoints: Vec<String>,
    /// Print JSON for scripts instead of tables.
    #[arg(long, global = true, help_heading = "Global options")]
    json: bool,
    /// Stop retrying a call on other endpoints after this long (for example 2s).
    #[arg(long, global = true, help_heading = "Global options", value_name = "DURATION", default_value = "15s", value_parser = submit::parse_positive_duration)]
    retry_time: Duration,
    /// Bearer token for a cluster with `[[tokens]]` (sent only over https:// or to loopback).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "EXACTLY_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: Option<String>,
    /// Read the bearer token from this file (a mounted secret) instead.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "EXACTLY_TOKEN_FILE",
        value_name = "PATH",
        conflicts_with = "token"
    )]
    token_file: Option<std::path::PathBuf>,
    /// CA certificate (PEM) to check the nodes' TLS certificates against; bare host:port
    /// endpoints then use https://.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "EXACTLY_CA",
        value_name = "PATH"
    )]
    ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM, from `exactly cert client`) to present to nodes that take
    /// client certificates; with --key. Bare host:port endpoints then use https://.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "EXACTLY_CERT",
        value_name = "PATH",
        requires = "key"
    )]
    cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "EXACTLY_KEY",
        value_name = "PATH",
        requires = "cert"
    )]
    key: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug, PartialEq)]
enum Command {
    /// Submit a job (or --count copies of it) and print the job ids.
    Submit(submit::SubmitArgs),
    /// Show one job: state, attempts and result.
    Get {
        /// The job's id.
        job_id: u64,
        /// Print only the job's payload, byte for byte (`exactly get 42 --payload > p.json`),
        /// while the cluster holds it: pending, running, or dead (a succeeded or cancelled
        /// job's payload is dropped).
        #[arg(long)]
        payload: bool,
    },
    /// List jobs in id order, filtered, a page at a time (or every page with --all).
    List(list::ListArgs),
    /// Print one line per job event until Ctrl-C: of one job, one queue, or every job.
    Watch(watch::WatchArgs),
    /// Cancel jobs: pending ones end at once, running ones are stopped.
    Cancel(cancel::CancelArgs),
    /// Dead letters: list, redrive (run again) or purge jobs out of attempts.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Queues: list them, or change a queue's concurrency, rate limit or pause.
    #[command(subcommand)]
    Queue(queue::QueueCommand),
    /// Cron schedules: add, list, remove, pause, resume.
    #[command(subcommand)]
    Cron(cron::CronCommand),
    /// Show the cluster: leader, term, log indexes, members and job counts (the same as
    /// `exactly cluster status`).
    Status,
    /// Ask every endpoint whether it is ready (the gRPC health check, which follows the node's
    /// /readyz); exits 0 only if all are serving, 3 otherwise. Needs no token.
    Health,
    /// Membership: status, join, drain, remove.
    Cluster {
        #[command(subcommand)]
        command: cluster::ClusterCommand,
    },
    /// Measure submit throughput and submit-to-finish latency.
    ///
    /// Completion is detected from the cluster-wide job counts, so run it on an otherwise idle
    /// cluster. Completion latency comes from each sampled job's own record (updated_at_ms minus
    /// created_at_ms, both stamped by the leader's clock).
    Bench(bench::BenchArgs),
    /// Certificates: a cluster CA, one per node for the peer port's mutual TLS, server
    /// certificates for the public port's TLS, client certificates, and revocation lists.
    #[command(subcommand)]
    Cert(cert::CertCommand),
    /// The audit trail: operators' and administrators' writes, with the token that made each
    /// (needs an admin token).
    Audit(audit::AuditArgs),
    /// Bearer tokens for the public API: make one with the entry the nodes' configuration needs,
    /// or issue, revoke and list the ones the cluster keeps.
    #[command(subcommand)]
    Token(token::TokenCommand),
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Cert(command) = &cli.command {
        // Local files only: no cluster to reach.
        return cert::run(command);
    }
    if let Command::Token(command) = &cli.command {
        if command.offline() {
            return token::run(command, cli.json);
        }
    }
    let endpoints: Vec<String> = cli
        .endpoints
        .iter()
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    // A short --retry-time also caps the backoff, so the options stay valid.
    let retry_ms = submit::millis(cli.retry_time);
    let defaults = ClientOptions::default();
    let ca_pem = match &cli.ca {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| UsageError(format!("--ca {}: {e}", path.display())))?,
        ),
        None => None,
    };
    let identity = match (&cli.cert, &cli.key) {
        (Some(cert), Some(key)) => {
            let read = |flag: &str, path: &std::path::Path| {
                std::fs::read_to_string(path)
                    .map_err(|e| UsageError(format!("{flag} {}: {e}", path.display())))
            };
            Some(exactly_client::ClientIdentity {
                cert_pem: read("--cert", cert)?,
                key_pem: read("--key", key)?,
            })
        }
        _ => None,
    };
    let options = ClientOptions {
        retry_total_ms_max: retry_ms,
        retry_backoff_max_ms: defaults.retry_backoff_max_ms.min(retry_ms),
        retry_backoff_initial_ms: defaults.retry_backoff_initial_ms.min(retry_ms),
        // An empty EXACTLY_TOKEN (`EXACTLY_TOKEN= exactly ...`) means none.
        token: match (
            cli.token.as_ref().filter(|t| !t.is_empty()),
            &cli.token_file,
        ) {
            (Some(token), _) => Some(exactly_client::Token(token.clone())),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| UsageError(format!("--token-file {}: {e}", path.display())))?;
                Some(exactly_client::Token(text.trim().to_string()))
            }
            (None, None) => None,
        },
        ca_pem,
        identity,
        ..defaults
    };
    let client = Client::connect_with(endpoints, options)?;
    let json = cli.json;
    match &cli.command {
        Command::Submit(args) => submit::run(&client, args, json).await,
        Command::Get { job_id, payload } => get::run(&client, *job_id, *payload, json).await,
        Command::List(args) => {
            list::run(&client, args.state.map(Into::into), &args.page, json).await
        }
        Command::Watch(args) => watch::run(&client, args, json).await,
        Command::Cancel(args) => cancel::run(&client, args, json).await,
        Command::Dlq(command) => dlq::run(&client, command, json).await,
        Command::Queue(command) => queue::run(&client, command, json).await,
        Command::Cron(command) => cron::run(&client, command, json).await,
        Command::Status => cluster::show_status(&client, json).await,
        Command::Health => health::run(&client, json).await,
        Command::Cluster { command } => cluster::run(&client, command, json).await,
        Command::Bench(args) => bench::run(&client, args, json).await,
        Command::Audit(args) => audit::run(&client, args, json).await,
        Command::Token(command) => token::run_online(&client, command, json).await,
        Command::Cert(_) => unreachable!("handled before connecting"),
    }
}

/// The exit code for an error: the first error in its chain that says what kind it is decides.
fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if cause.is::<UsageError>() {
            return EXIT_USAGE;
        }
        if cause.is::<RefusedError>() {
            return EXIT_REFUSED;
        }
        if cause.is::<health::NotReady>() {
            return EXIT_UNAVAILABLE;
        }
        if let Some(err) = cause.downcast_ref::<exactly_client::Error>() {
            return match err {
                exactly_client::Error::Config(_) => EXIT_USAGE,
                err if err.is_unknown_outcome() => EXIT_UNKNOWN_OUTCOME,
                err if err.is_unavailable() => EXIT_UNAVAILABLE,
                _ => EXIT_REFUSED,
            };
        }
    }
    EXIT_REFUSED
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            // --help and --version are not errors; usage mistakes are.
            let _ = err.print();
            return ExitCode::from(if err.use_stderr() {
                EXIT_USAGE
            } else {
                EXIT_OK
            });
        }
    };
    match run(cli).await {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(exit_code(&err))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::BenchArgs;
    use crate::submit::{JobArgs, SubmitArgs};

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("exactly").chain(args.iter().copied()))
    }

    /// The argument definitions pass clap's own consistency checks.
    #[test]
    fn cli_definition_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    /// Without --endpoints the three local addresses are used (unless EXACTLY_ENDPOINTS is set).
    #[test]
    fn default_endpoints_are_the_local_cluster() {
        if std::env::var_os("EXACTLY_ENDPOINTS").is_some() {
            return;
        }
        let cli = parse(&["status"]).unwrap();
        assert_eq!(
            cli.endpoints,
            vec![
                "http://127.0.0.1:7101",
                "http://127.0.0.1:7102",
                "http://127.0.0.1:7103"
            ]
        );
        assert!(!cli.json);
        assert_eq!(cli.command, Command::Status);
    }

    /// Global flags are accepted after the subcommand and endpoints split on commas.
    #[test]
    fn global_flags_after_subcommand() {
        let cli = parse(&["get", "42", "--json", "--endpoints", "a:1,b:2"]).unwrap();
        assert!(cli.json);
        assert_eq!(cli.endpoints, vec!["a:1", "b:2"]);
        assert_eq!(
            cli.command,
            Command::Get {
                job_id: 42,
                payload: false
            }
        );
    }

    /// Every submit flag parses into the spec fields, durations included.
    #[test]
    fn submit_flags_parse() {
        let cli = parse(&[
            "submit",
            "--kind",
            "exec",
            "--queue",
            "mail",
            "--payload",
            "hi",
            "--priority",
            "-3",
            "--max-attempts",
            "5",
            "--timeout",
            "1m 30s",
            "--delay",
            "10s",
            "--count",
            "7",
            "--ordering-key",
            "customer-9",
            "--label",
            "team=mail",
            "--label",
            "tier=gold",
            "--backoff-base",
            "500ms",
            "--backoff-max",
            "1m",
        ])
        .unwrap();
        let Command::Submit(args) = cli.command else {
            panic!("not submit")
        };
        assert_eq!(args.count, 7);
        let spec = args.spec(b"hi".to_vec());
        assert_eq!(spec.kind, "exec");
        assert_eq!(spec.queue, "mail");
        assert_eq!(spec.payload, b"hi");
        assert_eq!(spec.priority, -3);
        assert_eq!(spec.max_attempts, 5);
        assert_eq!(spec.timeout_ms, 90_000);
        // The delay is measured by the cluster, not by this machine's clock.
        assert_eq!((spec.delay_ms, spec.run_at_ms), (10_000, 0));
        assert_eq!(spec.ordering_key, "customer-9");
        assert_eq!(spec.labels.len(), 2);
        assert_eq!(spec.labels["tier"], "gold");
        assert_eq!((spec.backoff_base_ms, spec.backoff_max_ms), (500, 60_000));
        assert!(spec.idempotency_key.is_empty());
    }

    /// --run-at takes RFC 3339 and excludes --delay; --idempotency-key is sent as given.
    #[test]
    fn submit_run_at_and_key() {
        let cli = parse(&[
            "submit",
            "--kind",
            "noop",
            "--run-at",
            "2030-01-31T09:00:00Z",
            "--idempotency-key",
            "order-17",
        ])
        .unwrap();
        let Command::Submit(args) = cli.command else {
            panic!("not submit")
        };
        let spec = args.spec(Vec::new());
        assert_eq!(spec.run_at_ms, 1_896_080_400_000);
        assert_eq!(spec.idempotency_key, "order-17");
        let err = parse(&[
            "submit",
            "--kind",
            "k",
            "--delay",
            "1s",
            "--run-at",
            "1700000000000",
        ])
        .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    /// Omitted submit options become the wire's zero values, which mean "node default".
    #[test]
    fn submit_defaults_are_node_defaults() {
        let cli = parse(&["submit", "--kind", "noop"]).unwrap();
        let Command::Submit(args) = cli.command else {
            panic!("not submit")
        };
        let spec = args.spec(Vec::new());
        assert_eq!(
            (
                spec.queue.as_str(),
                spec.max_attempts,
                spec.timeout_ms,
                spec.run_at_ms,
                spec.delay_ms,
                spec.backoff_base_ms,
                args.count
            ),
            ("", 0, 0, 0, 0, 0, 1)
        );
    }

    /// The three payload sources exclude each other.
    #[test]
    fn payload_sources_conflict() {
        let err =
            parse(&["submit", "--kind", "k", "--payload", "x", "--payload-stdin"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    /// Submit needs a kind, and counts must be positive.
    #[test]
    fn submit_rejects_bad_input() {
        assert!(parse(&["submit"]).is_err());
        assert!(parse(&["submit", "--kind", "k", "--count", "0"]).is_err());
        assert!(parse(&["submit", "--kind", "k", "--timeout", "0s"]).is_err());
    }

    /// Bench defaults match the documented ones.
    #[test]
    fn bench_defaults() {
        let cli = parse(&["bench"]).unwrap();
        assert_eq!(
            cli.command,
            Command::Bench(BenchArgs {
                jobs: 10_000,
                batch: None,
                concurrency: 8,
                kind: "noop".into(),
                payload_bytes: 0,
                timeout: Duration::from_secs(300),
                sample: 2_000,
                rate: None,
                duration: Duration::from_secs(30),
                connections: 4,
                drain: Duration::from_secs(30),
            })
        );
        let Command::Bench(closed) = cli.command else {
            unreachable!()
        };
        assert_eq!(closed.jobs_per_request(), 100);
        let Command::Bench(open) = parse(&["bench", "--rate", "500"]).unwrap().command else {
            panic!("bench")
        };
        assert_eq!((open.rate, open.jobs_per_request()), (Some(500), 1));
    }

    /// The cluster subcommands parse their node ids, deadlines and flags; drain defaults to a
    /// 60 s deadline and waits.
    #[test]
    fn cluster_subcommands_parse() {
        use crate::cluster::ClusterCommand;
        let cluster = |args: &[&str]| match parse(args).unwrap().command {
            Command::Cluster { command } => command,
            other => panic!("not a cluster command: {other:?}"),
        };
        assert_eq!(cluster(&["cluster", "status"]), ClusterCommand::Status);
        assert_eq!(
            cluster(&["cluster", "drain", "3"]),
            ClusterCommand::Drain {
                node: 3,
                deadline: Duration::from_secs(60),
                no_wait: false
            }
        );
        assert_eq!(
            cluster(&["cluster", "drain", "3", "--deadline", "5m", "--no-wait"]),
            ClusterCommand::Drain {
                node: 3,
                deadline: Duration::from_secs(300),
                no_wait: true
            }
        );
        assert_eq!(
            cluster(&["cluster", "remove", "4"]),
            ClusterCommand::Remove {
                node: 4,
                no_wait: false
            }
        );
        assert_eq!(
            cluster(&["cluster", "join", "10.0.0.5:7101"]),
            ClusterCommand::Join {
                addr: "10.0.0.5:7101".into()
            }
        );
        assert!(parse(&["cluster", "drain"]).is_err());
        assert!(parse(&["cluster", "drain", "x"]).is_err());
        assert!(parse(&["cluster", "drain", "3", "--deadline", "soon"]).is_err());
    }

    /// Bench batches above the per-request limit of 1000 are refused at parse time.
    #[test]
    fn bench_batch_is_bounded() {
        assert!(parse(&["bench", "--batch", "1000"]).is_ok());
        assert!(parse(&["bench", "--batch", "1001"]).is_err());
        assert!(parse(&["bench", "--concurrency", "0"]).is_err());
    }

    /// A submit with a payload file parses the path (reading happens when the command runs).
    #[test]
    fn payload_file_parses() {
        let cli = parse(&["submit", "--kind", "k", "--payload-file", "/tmp/p.bin"]).unwrap();
        let Command::Submit(SubmitArgs {
            job: JobArgs { payload_file, .. },
            ..
        }) = cli.command
        else {
            panic!()
        };
        assert_eq!(payload_file.unwrap().to_str(), Some("/tmp/p.bin"));
    }

    /// Every subcommand and its flags parse into the right variant.
    #[test]
    fn subcommands_parse() {
        let cli = parse(&["list", "--state", "dead", "--queue", "mail", "--all"]).unwrap();
        let Command::List(args) = cli.command else {
            panic!("not list")
        };
        assert_eq!(args.state, Some(list::StateArg::Dead));
        assert!(args.page.all);
        assert_eq!(args.page.limit, 100);

        let cli = parse(&["watch", "--job", "5", "--after", "10:2"]).unwrap();
        let Command::Watch(args) = cli.command else {
            panic!("not watch")
        };
        assert_eq!(args.job, Some(5));
        assert_eq!(args.after.map(|p| (p.index, p.seq)), Some((10, 2)));
        assert!(parse(&["watch", "--job", "5", "--queue", "q"]).is_err());

        let cli = parse(&["cancel", "1", "2", "3"]).unwrap();
        assert_eq!(
            cli.command,
            Command::Cancel(cancel::CancelArgs {
                job_ids: vec![1, 2, 3]
            })
        );
        assert!(parse(&["cancel"]).is_err());

        let cli = parse(&["dlq", "redrive", "--id", "4", "--id", "9"]).unwrap();
        let Command::Dlq(dlq::DlqCommand::Redrive(args)) = cli.command else {
            panic!("not dlq redrive")
        };
        assert_eq!(args.ids, vec![4, 9]);
        assert!(parse(&["dlq", "purge", "--all", "--queue", "q"]).is_err());

        let cli = parse(&["queue", "configure", "mail", "--rate", "10/1s", "--pause"]).unwrap();
        let Command::Queue(queue::QueueCommand::Configure(args)) = cli.command else {
            panic!("not queue configure")
        };
        assert_eq!(args.rate.map(|r| (r.jobs, r.period_ms)), Some((10, 1_000)));
        assert!(args.pause);
        assert!(parse(&["queue", "configure", "q", "--pause", "--resume"]).is_err());
        assert!(parse(&["queue", "configure", "q", "--rate", "1/s", "--clear-rate"]).is_err());

        let cli = parse(&[
            "cron",
            "add",
            "nightly",
            "0 3 * * *",
            "--tz",
            "Europe/Berlin",
            "--missed",
            "run-once",
            "--kind",
            "noop",
            "--label",
            "a=b",
        ])
        .unwrap();
        let Command::Cron(cron::CronCommand::Add(args)) = cli.command else {
            panic!("not cron add")
        };
        let request = args.request(Vec::new());
        assert_eq!(request.cron, "0 3 * * *");
        assert_eq!(request.time_zone, "Europe/Berlin");
        assert_eq!(request.missed(), exactly_client::MissedTickPolicy::RunOnce);
        assert_eq!(request.overlap(), exactly_client::OverlapPolicy::Skip);
        assert_eq!(request.job.unwrap().labels["a"], "b");
        // A tick decides when its job runs and gives it its key.
        assert!(parse(&["cron", "add", "n", "@daily", "--kind", "k", "--delay", "1s"]).is_err());
        assert!(parse(&["cron", "pause", "nightly"]).is_ok());
    }

    /// Each kind of failure maps to its own exit code, wherever it sits in the error chain.
    #[test]
    fn exit_codes_are_distinct() {
        use exactly_client::{Code, Error};
        let status = |code| Error::Status {
            code,
            message: "m".into(),
            endpoint: "e".into(),
        };
        let code = |err: anyhow::Error| exit_code(&err);
        assert_eq!(code(status(Code::NotFound).into()), EXIT_REFUSED);
        assert_eq!(code(status(Code::AlreadyExists).into()), EXIT_REFUSED);
        assert_eq!(code(UsageError("bad".into()).into()), EXIT_USAGE);
        assert_eq!(
            code(Error::Config("no endpoints".into()).into()),
            EXIT_USAGE
        );
        let exhausted = Error::RetriesExhausted {
            code: Code::Unavailable,
            message: "m".into(),
            endpoint: "e".into(),
            attempts: 3,
            elapsed_ms: 10,
        };
        assert_eq!(
            code(anyhow::Error::new(exhausted).context("2 of 3 jobs were submitted")),
            EXIT_UNAVAILABLE
        );
        let unknown = Error::UnknownOutcome {
            code: Code::DeadlineExceeded,
            message: "m".into(),
            endpoint: "e".into(),
        };
        assert_eq!(code(unknown.into()), EXIT_UNKNOWN_OUTCOME);
        assert_eq!(code(RefusedError("1 of 2".into()).into()), EXIT_REFUSED);
        assert_eq!(code(anyhow::anyhow!("broken pipe")), EXIT_REFUSED);
    }
}

//! `exactly`: the command-line tool for an exactly cluster. Human tables by default, `--json` for
//! scripts; exit code 0 on success and 1 on any error, which is printed with its gRPC code.

mod bench;
mod cluster;
mod get;
mod output;
mod status;
mod submit;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use exactly_client::{Client, ClientOptions};

/// The local three-node cluster's addresses.
const DEFAULT_ENDPOINTS: &str = "http://127.0.0.1:7101,http://127.0.0.1:7102,http://127.0.0.1:7103";

/// Submit and inspect jobs on an exactly cluster.
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
    },
    /// Show the cluster: leader, term, log indexes, members and job counts (the same as
    /// `exactly cluster status`).
    Status,
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
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let endpoints: Vec<String> = cli
        .endpoints
        .iter()
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    // A short --retry-time also caps the backoff, so the options stay valid.
    let retry_ms = submit::millis(cli.retry_time);
    let defaults = ClientOptions::default();
    let options = ClientOptions {
        retry_total_ms_max: retry_ms,
        retry_backoff_max_ms: defaults.retry_backoff_max_ms.min(retry_ms),
        retry_backoff_initial_ms: defaults.retry_backoff_initial_ms.min(retry_ms),
        ..defaults
    };
    let client = Client::connect_with(endpoints, options)?;
    match &cli.command {
        Command::Submit(args) => submit::run(&client, args, cli.json).await,
        Command::Get { job_id } => get::run(&client, *job_id, cli.json).await,
        Command::Status => cluster::show_status(&client, cli.json).await,
        Command::Cluster { command } => cluster::run(&client, command, cli.json).await,
        Command::Bench(args) => bench::run(&client, args, cli.json).await,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            // --help and --version are not errors; usage mistakes are, with exit code 1.
            let _ = err.print();
            return if err.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::BenchArgs;
    use crate::submit::SubmitArgs;

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
        assert_eq!(cli.command, Command::Get { job_id: 42 });
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
        ])
        .unwrap();
        let Command::Submit(args) = cli.command else {
            panic!("not submit")
        };
        assert_eq!(args.count, 7);
        let spec = args.spec(b"hi".to_vec(), 1_000);
        assert_eq!(spec.kind, "exec");
        assert_eq!(spec.queue, "mail");
        assert_eq!(spec.priority, -3);
        assert_eq!(spec.max_attempts, 5);
        assert_eq!(spec.timeout_ms, 90_000);
        assert_eq!(spec.run_at_ms, 11_000);
    }

    /// Omitted submit options become the wire's zero values, which mean "node default".
    #[test]
    fn submit_defaults_are_node_defaults() {
        let cli = parse(&["submit", "--kind", "noop"]).unwrap();
        let Command::Submit(args) = cli.command else {
            panic!("not submit")
        };
        let spec = args.spec(Vec::new(), 5);
        assert_eq!(
            (
                spec.queue.as_str(),
                spec.max_attempts,
                spec.timeout_ms,
                spec.run_at_ms,
                args.count
            ),
            ("", 0, 0, 0, 1)
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
                batch: 100,
                concurrency: 8,
                kind: "noop".into(),
                payload_bytes: 0,
                timeout: Duration::from_secs(300),
                sample: 2_000,
            })
        );
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
        let Command::Submit(SubmitArgs { payload_file, .. }) = cli.command else {
            panic!()
        };
        assert_eq!(payload_file.unwrap().to_str(), Some("/tmp/p.bin"));
    }
}

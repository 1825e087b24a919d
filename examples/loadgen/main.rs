//! `loadgen`: a ghz-style load generator that knows this service's API from the descriptors compiled
//! into it, so a service generated from the template load-tests its own methods with no changes.
//!
//! ```text
//! cargo run --release --example loadgen -- --call <package>.OrderService/GetOrder \
//!     -d '{"id":"<an order id>"}' -n 100000 -c 64 --connections 4 127.0.0.1:50051
//! cargo run --release --example loadgen -- --config bench/scenarios/create-order.json 127.0.0.1:50051
//! ```
//!
//! ghz itself cannot be installed everywhere and h2load counts a gRPC error as a success (the status is
//! in the trailers). This tool takes ghz's common flags with ghz's meanings, encodes the JSON request
//! through the method's descriptor (prost-reflect), reads every call's status, and reports what ghz
//! reports: latency percentiles from an HdrHistogram and the distribution of status codes and errors.
//! Only calls that end with OK count as successes. The README's "Performance" section has more.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    io::IsTerminal,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail, ensure};
use bytes::{Buf, BufMut, Bytes};
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use hdrhistogram::Histogram;
use http::uri::PathAndQuery;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, MethodDescriptor};
use serde::Deserialize;
use tonic::{
    Code, Request, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    metadata::{AsciiMetadataKey, AsciiMetadataValue, MetadataMap},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

/// Flags follow ghz (https://ghz.sh/docs/options) where ghz has them.
#[derive(Parser, Debug)]
#[command(
    name = "loadgen",
    about = "A ghz-style gRPC load generator for this service's API"
)]
struct Args {
    /// Server address, `host:port`.
    host: Option<String>,
    /// Fully qualified method: `package.Service/Method` (or `package.Service.Method`).
    #[arg(long)]
    call: Option<String>,
    /// Request as JSON (an array of requests for a client or bidirectional stream). Templates:
    /// {{.RequestNumber}}, {{.WorkerID}}, {{.TimestampUnix}}, {{.UUID}} / {{newUUID}} / {{uuid}},
    /// {{env "NAME"}}, {{mod .RequestNumber N}}, {{div .RequestNumber N}}.
    #[arg(short = 'd', long = "data")]
    data: Option<String>,
    /// Read the request JSON from this file.
    #[arg(short = 'D', long = "data-file", conflicts_with = "data")]
    data_file: Option<PathBuf>,
    /// Scenario file (JSON, ghz's config keys); flags given on the command line win over it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Number of calls to make (default 200 unless --duration is given).
    #[arg(short = 'n', long = "total")]
    total: Option<u64>,
    /// Calls in flight at once, spread over the connections.
    #[arg(short = 'c', long = "concurrency")]
    concurrency: Option<usize>,
    /// HTTP/2 connections to open.
    #[arg(long)]
    connections: Option<usize>,
    /// Run for this long (e.g. 10s, 1m) instead of a number of calls; with -n, whichever comes first.
    #[arg(short = 'z', long = "duration", value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Rate limit, calls per second over all workers (0 = none).
    #[arg(short = 'r', long = "rps")]
    rps: Option<f64>,
    /// Deadline of each call (sent as grpc-timeout).
    #[arg(short = 't', long = "timeout", value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// Request metadata as a JSON object of strings, e.g. '{"x-tenant":"a"}'.
    #[arg(short = 'm', long = "metadata")]
    metadata: Option<String>,
    /// Calls made before measuring starts, on the same connections, not counted in the report.
    #[arg(long)]
    warmup: Option<u64>,
    /// Plaintext HTTP/2 (the default unless --cacert is given). Accepted for ghz compatibility.
    #[arg(long, conflicts_with_all = ["cacert", "cert", "key", "cname"])]
    insecure: bool,
    /// PEM CA bundle to verify the server with: turns TLS on. (The tool has no system roots: it
    /// load-tests servers whose CA you hold, as the service's own `tls`/`client` settings do.)
    #[arg(long)]
    cacert: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with --key).
    #[arg(long, requires_all = ["key", "cacert"])]
    cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Server name to verify the certificate against, when it differs from the host.
    #[arg(long, requires = "cacert")]
    cname: Option<String>,
    /// Bearer token sent as `authorization: Bearer …` on every call.
    #[arg(long, conflicts_with = "bearer_file")]
    bearer: Option<String>,
    /// File holding the bearer token.
    #[arg(long)]
    bearer_file: Option<PathBuf>,
    /// Report format.
    #[arg(short = 'O', long = "format", value_enum, default_value_t = Format::Summary)]
    format: Format,
    /// Progress line on stderr: auto (on a terminal, or every 10 s otherwise), always or never.
    #[arg(long, value_enum, default_value_t = Progress::Auto)]
    progress: Progress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Summary,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Progress {
    Auto,
    Always,
    Never,
}

/// A scenario file: ghz's config keys, plus `mix` for a weighted workload of several calls.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct Scenario {
    host: Option<String>,
    call: Option<String>,
    data: Option<serde_json::Value>,
    total: Option<u64>,
    concurrency: Option<usize>,
    connections: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    duration: Option<Duration>,
    rps: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    metadata: Option<BTreeMap<String, String>>,
    warmup: Option<u64>,
    /// Instead of `call` and `data`: calls picked by weight, in a fixed rotation.
    mix: Option<Vec<MixEntry>>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct MixEntry {
    call: String,
    data: serde_json::Value,
    #[serde(default = "one")]
    weight: u32,
}

fn one() -> u32 {
    1
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let plan = Plan::from_args(args)?;
    let report = plan.run().await?;
    match plan.format {
        Format::Summary => print!("{}", report.summary()),
        Format::Json => println!("{}", serde_json::to_string_pretty(&report.json())?),
    }
    Ok(())
}

/// Everything a run needs, from the flags and the scenario file.
struct Plan {
    host: String,
    calls: Vec<CallPlan>,
    /// Which of `calls` request number `i` makes: `rotation[i % rotation.len()]`.
    rotation: Vec<usize>,
    total: Option<u64>,
    duration: Option<Duration>,
    concurrency: usize,
    connections: usize,
    rps: Option<f64>,
    timeout: Duration,
    warmup: u64,
    metadata: MetadataMap,
    tls: Option<ClientTlsConfig>,
    format: Format,
    progress: Progress,
}

impl Plan {
    fn from_args(args: Args) -> anyhow::Result<Self> {
        let scenario: Scenario = match &args.config {
            Some(path) => serde_json::from_slice(
                &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
            )
            .with_context(|| format!("parsing scenario {}", path.display()))?,
            None => Scenario::default(),
        };
        let pool = descriptor_pool()?;

        let data_arg = match (&args.data, &args.data_file) {
            (Some(data), _) => Some(data.clone()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?,
            ),
            (None, None) => None,
        };
        let entries: Vec<(String, String, u32)> = match (args.call.or(scenario.call), scenario.mix)
        {
            (Some(call), _) => {
                let data = match (data_arg, scenario.data) {
                    (Some(data), _) => data,
                    (None, Some(value)) => value.to_string(),
                    (None, None) => "{}".to_owned(),
                };
                vec![(call, data, 1)]
            }
            (None, Some(mix)) => mix
                .into_iter()
                .map(|entry| (entry.call, entry.data.to_string(), entry.weight))
                .collect(),
            (None, None) => bail!("no method: give --call or a scenario file with call or mix"),
        };
        let mut calls = Vec::new();
        let mut rotation = Vec::new();
        for (index, (call, data, weight)) in entries.into_iter().enumerate() {
            ensure!(weight > 0, "mix entry {call}: weight must be at least 1");
            calls.push(CallPlan::new(&pool, &call, &data)?);
            rotation.extend(std::iter::repeat_n(index, weight as usize));
        }

        let host = args
            .host
            .or(scenario.host)
            .context("no server address: give host:port")?;
        let duration = args.duration.or(scenario.duration);
        let total =
            args.total
                .or(scenario.total)
                .or(if duration.is_none() { Some(200) } else { None });
        let concurrency = args.concurrency.or(scenario.concurrency).unwrap_or(50);
        let connections = args.connections.or(scenario.connections).unwrap_or(1);
        ensure!(concurrency > 0, "concurrency must be at least 1");
        ensure!(
            (1..=concurrency).contains(&connections),
            "connections must be between 1 and the concurrency"
        );

        let mut metadata = MetadataMap::new();
        let mut pairs: BTreeMap<String, String> = scenario.metadata.unwrap_or_default();
        if let Some(json) = &args.metadata {
            pairs.extend(
                serde_json::from_str::<BTreeMap<String, String>>(json)
                    .context("-m takes a JSON object of strings")?,
            );
        }
        let bearer = match (args.bearer, &args.bearer_file) {
            (Some(token), _) => Some(token),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        if let Some(token) = bearer {
            pairs.insert("authorization".to_owned(), format!("Bearer {token}"));
        }
        for (key, value) in pairs {
            metadata.insert(
                AsciiMetadataKey::from_bytes(key.as_bytes())
                    .with_context(|| format!("metadata key {key:?}"))?,
                AsciiMetadataValue::try_from(value.as_str())
                    .with_context(|| format!("metadata value of {key:?}"))?,
            );
        }

        let tls = if let Some(cacert) = &args.cacert {
            let mut tls =
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(cacert)?));
            if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            if let Some(name) = &args.cname {
                tls = tls.domain_name(name);
            }
            Some(tls)
        } else {
            None
        };

        Ok(Self {
            host,
            calls,
            rotation,
            total,
            duration,
            concurrency,
            connections,
            rps: args.rps.or(scenario.rps).filter(|rps| *rps > 0.0),
            timeout: args
                .timeout
                .or(scenario.timeout)
                .unwrap_or(Duration::from_secs(20)),
            warmup: args.warmup.or(scenario.warmup).unwrap_or(0),
            metadata,
            tls,
            format: args.format,
            progress: args.progress,
        })
    }

    async fn run(&self) -> anyhow::Result<Report> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut channels = Vec::with_capacity(self.connections);
        for _ in 0..self.connections {
            let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", self.host))?
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(5));
            if let Some(tls) = &self.tls {
                endpoint = endpoint.tls_config(tls.clone())?;
            }
            channels.push(
                endpoint
                    .connect()
                    .await
                    .with_context(|| format!("connecting to {}", self.host))?,
            );
        }
        if self.warmup > 0 {
            self.phase(&channels, 0, Some(self.warmup), None, false)
                .await?;
        }
        // Measured calls go on numbering after the warm-up's, so `{{.RequestNumber}}` stays unique.
        let last = self.total.map(|total| self.warmup.saturating_add(total));
        self.phase(&channels, self.warmup, last, self.duration, true)
            .await
    }

    /// Runs calls numbered from `first` until `end` (exclusive) or until `duration` has passed,
    /// `concurrency` at a time.
    async fn phase(
        &self,
        channels: &[Channel],
        first: u64,
        end: Option<u64>,
        duration: Option<Duration>,
        measured: bool,
    ) -> anyhow::Result<Report> {
        let shared = Arc::new(Shared {
            next: AtomicU64::new(first),
            done: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        });
        let started = Instant::now();
        let deadline = duration.map(|duration| started + duration);
        let progress = (measured && self.progress != Progress::Never).then(|| {
            let shared = shared.clone();
            let on_terminal = std::io::stderr().is_terminal();
            let every = if on_terminal || self.progress == Progress::Always {
                Duration::from_secs(1)
            } else {
                Duration::from_secs(10)
            };
            tokio::spawn(async move {
                let mut ticks =
                    tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                loop {
                    ticks.tick().await;
                    let done = shared.done.load(Ordering::Relaxed);
                    let elapsed = started.elapsed().as_secs_f64();
                    let line = format!(
                        "{elapsed:6.1}s {done} calls, {:.0}/s, {} not OK",
                        done as f64 / elapsed,
                        shared.failed.load(Ordering::Relaxed)
                    );
                    if on_terminal {
                        eprint!("\r{line}   ");
                    } else {
                        eprintln!("{line}");
                    }
                }
            })
        });

        let workers: Vec<_> = (0..self.concurrency)
            .map(|worker| {
                let job = Worker {
                    id: worker as u64,
                    channel: channels[worker % channels.len()].clone(),
                    calls: self.calls.clone(),
                    rotation: self.rotation.clone(),
                    shared: shared.clone(),
                    first,
                    end,
                    deadline,
                    started,
                    rps: self.rps,
                    timeout: self.timeout,
                    metadata: self.metadata.clone(),
                };
                tokio::spawn(job.run())
            })
            .collect();
        let mut report = Report::new(&self.calls);
        for worker in workers {
            report.merge(worker.await??);
        }
        report.duration = started.elapsed();
        if let Some(progress) = progress {
            progress.abort();
            if std::io::stderr().is_terminal() {
                eprintln!();
            }
        }
        Ok(report)
    }
}

fn read(path: &PathBuf) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// The API's descriptors and the health service's, as compiled into the service.
fn descriptor_pool() -> anyhow::Result<DescriptorPool> {
    let mut pool = DescriptorPool::decode(app::api::FILE_DESCRIPTOR_SET)?;
    pool.decode_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)?;
    Ok(pool)
}

fn positive(word: &str) -> anyhow::Result<u64> {
    let n: u64 = word
        .parse()
        .with_context(|| format!("{word:?} is not a number"))?;
    ensure!(n > 0, "mod and div take a number above 0");
    Ok(n)
}

mod report;
mod request;
mod worker;

use report::*;
use request::*;
use worker::*;

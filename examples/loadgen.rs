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

/// One method and how to build its requests.
#[derive(Clone)]
struct CallPlan {
    /// `package.Service/Method`
    name: Arc<str>,
    path: PathAndQuery,
    client_streaming: bool,
    server_streaming: bool,
    input: MessageDescriptor,
    data: Arc<Template>,
    /// The encoded requests when `data` has no placeholders: encoded once, sent as they are.
    fixed: Option<Arc<[Bytes]>>,
}

impl CallPlan {
    fn new(pool: &DescriptorPool, call: &str, data: &str) -> anyhow::Result<Self> {
        let method = find_method(pool, call)?;
        let name: Arc<str> =
            format!("{}/{}", method.parent_service().full_name(), method.name()).into();
        let path = PathAndQuery::try_from(format!("/{name}"))?;
        let template = Template::parse(data)?;
        let mut plan = Self {
            name,
            path,
            client_streaming: method.is_client_streaming(),
            server_streaming: method.is_server_streaming(),
            input: method.input(),
            data: Arc::new(template),
            fixed: None,
        };
        // Encoding the first request checks the JSON against the descriptor before any call is made.
        let first = plan.encode(0, 0)?;
        if plan.data.is_fixed() {
            plan.fixed = Some(first.into());
        }
        Ok(plan)
    }

    /// The request message(s) of call `number` made by `worker`, encoded.
    fn encode(&self, number: u64, worker: u64) -> anyhow::Result<Vec<Bytes>> {
        if let Some(fixed) = &self.fixed {
            return Ok(fixed.to_vec());
        }
        let json = self.data.render(number, worker);
        let value: serde_json::Value = serde_json::from_str(&json)
            .with_context(|| format!("{}: request is not JSON: {json}", self.name))?;
        let messages = match value {
            serde_json::Value::Array(items) if self.client_streaming => items,
            value if self.client_streaming => vec![value],
            serde_json::Value::Array(_) => {
                bail!("{}: an array is for streaming requests", self.name)
            }
            value => vec![value],
        };
        messages
            .into_iter()
            .map(|value| {
                let message =
                    DynamicMessage::deserialize(self.input.clone(), value).with_context(|| {
                        format!(
                            "{}: request does not fit {}",
                            self.name,
                            self.input.full_name()
                        )
                    })?;
                Ok(Bytes::from(message.encode_to_vec()))
            })
            .collect()
    }
}

/// `package.Service/Method`, `package.Service.Method` or `/package.Service/Method`; or
/// `Service/Method` when one service has that name, so that scenarios survive a renamed package.
fn find_method(pool: &DescriptorPool, call: &str) -> anyhow::Result<MethodDescriptor> {
    let call = call.trim_start_matches('/');
    let (service, method) = call
        .rsplit_once('/')
        .or_else(|| call.rsplit_once('.'))
        .with_context(|| format!("--call {call:?}: expected package.Service/Method"))?;
    let by_short_name = || {
        let mut named = pool
            .services()
            .filter(|candidate| candidate.name() == service);
        named.next().filter(|_| named.next().is_none())
    };
    let service = pool
        .get_service_by_name(service)
        .or_else(by_short_name)
        .with_context(|| {
            let known: Vec<_> = pool.services().map(|s| s.full_name().to_owned()).collect();
            format!("unknown service {service:?}; known: {}", known.join(", "))
        })?;
    service
        .methods()
        .find(|candidate| candidate.name() == method)
        .with_context(|| format!("{} has no method {method:?}", service.full_name()))
}

/// A request with `{{…}}` placeholders, parsed once.
#[derive(Debug, PartialEq)]
struct Template(Vec<Part>);

#[derive(Debug, PartialEq)]
enum Part {
    Text(String),
    RequestNumber,
    WorkerId,
    TimestampUnix,
    Uuid,
    ModRequestNumber(u64),
    DivRequestNumber(u64),
}

impl Template {
    fn parse(source: &str) -> anyhow::Result<Self> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut rest = source;
        while let Some(start) = rest.find("{{") {
            text.push_str(&rest[..start]);
            let end = rest[start..]
                .find("}}")
                .with_context(|| format!("unclosed {{{{ in {source:?}"))?;
            let action = rest[start + 2..start + end].trim();
            rest = &rest[start + end + 2..];
            let words: Vec<&str> = action.split_whitespace().collect();
            let part = match words[..] {
                [".RequestNumber"] => Part::RequestNumber,
                [".WorkerID"] => Part::WorkerId,
                [".TimestampUnix"] => Part::TimestampUnix,
                [".UUID"] | ["newUUID"] | ["uuid"] => Part::Uuid,
                ["mod", ".RequestNumber", n] => Part::ModRequestNumber(positive(n)?),
                ["div", ".RequestNumber", n] => Part::DivRequestNumber(positive(n)?),
                ["env", name] => {
                    // Quoted as in Go templates; inside a JSON string the quotes arrive escaped.
                    let name = name.trim_matches(|c| c == '"' || c == '\\');
                    let value = std::env::var(name)
                        .with_context(|| format!("{{{{env {name:?}}}}}: not set"))?;
                    text.push_str(&json_string_content(value));
                    continue;
                }
                _ => bail!("unknown template action {{{{{action}}}}}"),
            };
            if !text.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut text)));
            }
            parts.push(part);
        }
        text.push_str(rest);
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Self(parts))
    }

    fn is_fixed(&self) -> bool {
        self.0.iter().all(|part| matches!(part, Part::Text(_)))
    }

    fn render(&self, number: u64, worker: u64) -> String {
        let mut out = String::new();
        for part in &self.0 {
            // Writing to a String cannot fail.
            let _ = match part {
                Part::Text(text) => out.write_str(text),
                Part::RequestNumber => write!(out, "{number}"),
                Part::WorkerId => write!(out, "{worker}"),
                Part::TimestampUnix => write!(
                    out,
                    "{}",
                    SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |since| since.as_secs())
                ),
                Part::Uuid => write!(out, "{}", uuid::Uuid::new_v4()),
                Part::ModRequestNumber(n) => write!(out, "{}", number % n),
                Part::DivRequestNumber(n) => write!(out, "{}", number / n),
            };
        }
        out
    }
}

/// `value` escaped as the content of a JSON string, where an `{{env}}` value lands.
fn json_string_content(value: String) -> String {
    let quoted = serde_json::Value::String(value).to_string();
    quoted[1..quoted.len() - 1].to_owned()
}

fn positive(word: &str) -> anyhow::Result<u64> {
    let n: u64 = word
        .parse()
        .with_context(|| format!("{word:?} is not a number"))?;
    ensure!(n > 0, "mod and div take a number above 0");
    Ok(n)
}

struct Shared {
    /// The next request number to take.
    next: AtomicU64,
    done: AtomicU64,
    failed: AtomicU64,
}

/// One of `concurrency` loops, each with one call in flight at a time.
struct Worker {
    id: u64,
    channel: Channel,
    calls: Vec<CallPlan>,
    rotation: Vec<usize>,
    shared: Arc<Shared>,
    first: u64,
    end: Option<u64>,
    deadline: Option<Instant>,
    started: Instant,
    rps: Option<f64>,
    timeout: Duration,
    metadata: MetadataMap,
}

impl Worker {
    async fn run(self) -> anyhow::Result<Report> {
        let mut report = Report::new(&self.calls);
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        loop {
            let number = self.shared.next.fetch_add(1, Ordering::Relaxed);
            if self.end.is_some_and(|end| number >= end) {
                break;
            }
            if let Some(rps) = self.rps {
                // Call `number` is due `number / rps` seconds after the start, whichever worker makes it.
                let due =
                    self.started + Duration::from_secs_f64((number - self.first) as f64 / rps);
                if self.deadline.is_some_and(|deadline| due >= deadline) {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
            }
            if self
                .deadline
                .is_some_and(|deadline| Instant::now() >= deadline)
            {
                break;
            }
            let index = self.rotation[(number % self.rotation.len() as u64) as usize];
            let call = &self.calls[index];
            let messages = call.encode(number, self.id)?;
            let began = Instant::now();
            // grpc-timeout bounds the call at the server; this bounds it here too, response stream
            // included, so a stalled stream cannot hold a worker.
            let outcome = tokio::time::timeout(self.timeout, self.call(&mut grpc, call, messages))
                .await
                .unwrap_or_else(|_| Err(Status::deadline_exceeded("loadgen: --timeout passed")));
            let latency = began.elapsed();
            if outcome.is_err() {
                self.shared.failed.fetch_add(1, Ordering::Relaxed);
            }
            self.shared.done.fetch_add(1, Ordering::Relaxed);
            report.record(index, latency, outcome);
        }
        Ok(report)
    }

    /// One call; OK only when the status in the trailers is OK.
    async fn call(
        &self,
        grpc: &mut tonic::client::Grpc<Channel>,
        call: &CallPlan,
        messages: Vec<Bytes>,
    ) -> Result<(), Status> {
        grpc.ready()
            .await
            .map_err(|err| Status::unavailable(format!("connection not ready: {err}")))?;
        let path = call.path.clone();
        match (call.client_streaming, call.server_streaming) {
            (false, false) => {
                let message = messages.into_iter().next().unwrap_or_default();
                grpc.unary(self.request(message), path, RawCodec).await?;
            }
            (false, true) => {
                let message = messages.into_iter().next().unwrap_or_default();
                let mut stream = grpc
                    .server_streaming(self.request(message), path, RawCodec)
                    .await?
                    .into_inner();
                while let Some(message) = stream.next().await {
                    message?;
                }
            }
            (true, false) => {
                let requests = self.request(futures::stream::iter(messages));
                grpc.client_streaming(requests, path, RawCodec).await?;
            }
            (true, true) => {
                let requests = self.request(futures::stream::iter(messages));
                let mut stream = grpc.streaming(requests, path, RawCodec).await?.into_inner();
                while let Some(message) = stream.next().await {
                    message?;
                }
            }
        }
        Ok(())
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        *request.metadata_mut() = self.metadata.clone();
        request.set_timeout(self.timeout);
        request
    }
}

/// Sends requests encoded beforehand and takes responses as bytes: responses are counted, not decoded,
/// so the tool spends as little CPU as it can on the machine it shares with the server.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// Latencies and outcomes, per call of the plan and (merged) for the run.
struct Report {
    duration: Duration,
    per_call: Vec<CallReport>,
}

struct CallReport {
    name: Arc<str>,
    /// Microseconds, 1 µs to 1 h at 3 significant digits.
    latencies: Histogram<u64>,
    codes: HashMap<Code, u64>,
    errors: HashMap<String, u64>,
}

impl CallReport {
    fn new(name: Arc<str>) -> Self {
        Self {
            name,
            // The bounds are constants that `new_with_bounds` accepts.
            latencies: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .unwrap_or_else(|_| unreachable!("valid histogram bounds")),
            codes: HashMap::new(),
            errors: HashMap::new(),
        }
    }

    fn merge(&mut self, other: CallReport) {
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.latencies.add(&other.latencies);
        for (code, count) in other.codes {
            *self.codes.entry(code).or_default() += count;
        }
        for (message, count) in other.errors {
            *self.errors.entry(message).or_default() += count;
        }
    }

    fn count(&self) -> u64 {
        self.codes.values().sum()
    }

    fn ok(&self) -> u64 {
        self.codes.get(&Code::Ok).copied().unwrap_or(0)
    }
}

impl Report {
    fn new(calls: &[CallPlan]) -> Self {
        Self {
            duration: Duration::ZERO,
            per_call: calls
                .iter()
                .map(|call| CallReport::new(call.name.clone()))
                .collect(),
        }
    }

    fn record(&mut self, index: usize, latency: Duration, outcome: Result<(), Status>) {
        let call = &mut self.per_call[index];
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        call.latencies.saturating_record(micros.max(1));
        let code = match outcome {
            Ok(()) => Code::Ok,
            Err(status) => {
                *call
                    .errors
                    .entry(format!("{:?}: {}", status.code(), status.message()))
                    .or_default() += 1;
                status.code()
            }
        };
        *call.codes.entry(code).or_default() += 1;
    }

    fn merge(&mut self, other: Report) {
        for (mine, theirs) in self.per_call.iter_mut().zip(other.per_call) {
            mine.merge(theirs);
        }
    }

    fn overall(&self) -> CallReport {
        let mut all = CallReport::new("all".into());
        for call in &self.per_call {
            all.merge(CallReport {
                name: call.name.clone(),
                latencies: call.latencies.clone(),
                codes: call.codes.clone(),
                errors: call.errors.clone(),
            });
        }
        all
    }

    fn summary(&self) -> String {
        let all = self.overall();
        let seconds = self.duration.as_secs_f64();
        let ms = |micros: u64| micros as f64 / 1000.0;
        let mut out = String::new();
        let _ = writeln!(out, "Summary:");
        let _ = writeln!(out, "  Count:\t{}", all.count());
        let _ = writeln!(out, "  OK:\t\t{}", all.ok());
        let _ = writeln!(out, "  Total:\t{seconds:.2} s");
        let _ = writeln!(out, "  Slowest:\t{:.2} ms", ms(all.latencies.max()));
        let _ = writeln!(out, "  Fastest:\t{:.2} ms", ms(all.latencies.min()));
        let _ = writeln!(out, "  Average:\t{:.2} ms", all.latencies.mean() / 1000.0);
        let _ = writeln!(out, "  Requests/sec:\t{:.2}", all.count() as f64 / seconds);
        let _ = writeln!(out, "\nLatency distribution:");
        for percentile in [10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0] {
            let _ = writeln!(
                out,
                "  {percentile:.0} % in {:.2} ms",
                ms(all.latencies.value_at_percentile(percentile))
            );
        }
        if self.per_call.len() > 1 {
            let _ = writeln!(out, "\nPer call:");
            for call in &self.per_call {
                let _ = writeln!(
                    out,
                    "  {}: {} calls, {} OK, p50 {:.2} ms, p99 {:.2} ms",
                    call.name,
                    call.count(),
                    call.ok(),
                    ms(call.latencies.value_at_percentile(50.0)),
                    ms(call.latencies.value_at_percentile(99.0)),
                );
            }
        }
        let _ = writeln!(out, "\nStatus code distribution:");
        for (code, count) in sorted(&all.codes, |code| format!("{code:?}")) {
            let _ = writeln!(out, "  [{code}]\t{count} responses");
        }
        if !all.errors.is_empty() {
            let _ = writeln!(out, "\nError distribution:");
            for (message, count) in sorted(&all.errors, Clone::clone).into_iter().take(20) {
                let _ = writeln!(out, "  [{count}]\t{message}");
            }
        }
        out
    }

    fn json(&self) -> serde_json::Value {
        let seconds = self.duration.as_secs_f64();
        let describe = |call: &CallReport| {
            let latencies = &call.latencies;
            let percentile = |p: f64| latencies.value_at_percentile(p);
            serde_json::json!({
                "count": call.count(),
                "ok": call.ok(),
                "rps": call.count() as f64 / seconds,
                "latency_us": {
                    "min": latencies.min(),
                    "mean": latencies.mean(),
                    "p50": percentile(50.0),
                    "p90": percentile(90.0),
                    "p95": percentile(95.0),
                    "p99": percentile(99.0),
                    "max": latencies.max(),
                },
                "status_codes": sorted(&call.codes, |code| format!("{code:?}")).into_iter().collect::<BTreeMap<_, _>>(),
                "errors": call.errors.iter().map(|(m, c)| (m.clone(), *c)).collect::<BTreeMap<_, _>>(),
            })
        };
        let mut json = describe(&self.overall());
        json["duration_s"] = seconds.into();
        json["calls"] = self
            .per_call
            .iter()
            .map(|call| (call.name.to_string(), describe(call)))
            .collect::<serde_json::Map<_, _>>()
            .into();
        json
    }
}

/// Entries by count, most first, named by `name`.
fn sorted<K>(counts: &HashMap<K, u64>, name: impl Fn(&K) -> String) -> Vec<(String, u64)> {
    let mut entries: Vec<(String, u64)> = counts.iter().map(|(k, v)| (name(k), *v)).collect();
    entries.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_in_numbers_and_fresh_ids() {
        let template = Template::parse(
            r#"{"request_id":"r-{{ .RequestNumber }}-{{.WorkerID}}-{{mod .RequestNumber 3}}-{{div .RequestNumber 2}}","id":"{{uuid}}"}"#,
        )
        .expect("parses");
        assert!(!template.is_fixed());
        let first = template.render(7, 2);
        assert!(
            first.starts_with(r#"{"request_id":"r-7-2-1-3","id":""#),
            "{first}"
        );
        assert_ne!(first, template.render(7, 2), "a fresh uuid per request");
        assert!(Template::parse(r#"{"id":"x"}"#).expect("parses").is_fixed());
        assert!(Template::parse("{{.Nope}}").is_err());
        assert!(Template::parse("{{mod .RequestNumber 0}}").is_err());
        assert!(Template::parse("{{uuid").is_err());
        assert_eq!(
            json_string_content(r#"say "hi" \ now"#.to_owned()),
            r#"say \"hi\" \\ now"#
        );
    }

    #[test]
    fn requests_are_encoded_through_the_descriptors() {
        let pool = descriptor_pool().expect("descriptors");
        // The service's name as built (a generated service has its own package).
        let method = |name: &str| format!("{}/{name}", app::api::ORDER_SERVICE_NAME);
        let call = CallPlan::new(
            &pool,
            &method("GetOrder"),
            r#"{"id":"n-{{.RequestNumber}}"}"#,
        )
        .expect("plan");
        let encoded = call.encode(42, 0).expect("encodes");
        let decoded = app::api::GetOrderRequest::decode(encoded[0].clone()).expect("decodes");
        assert_eq!(decoded.id, "n-42");
        // A field the message does not have is refused before any call is made.
        assert!(CallPlan::new(&pool, &method("GetOrder"), r#"{"nope":1}"#).is_err());
        assert!(CallPlan::new(&pool, &method("Nope"), "{}").is_err());
        // A client stream takes an array, one message per element.
        let update = CallPlan::new(
            &pool,
            &format!("{}.UpdateOrders", app::api::ORDER_SERVICE_NAME),
            r#"[{"order":{"id":"a"}},{"order":{"id":"b"}}]"#,
        )
        .expect("plan");
        assert_eq!(update.encode(0, 0).expect("encodes").len(), 2);
        // The service's short name, as the bench scenarios write it, whatever its package.
        let short = CallPlan::new(&pool, "OrderService/GetOrder", r#"{"id":"x"}"#).expect("plan");
        assert_eq!(short.encode(0, 0).expect("encodes").len(), 1);
        assert!(CallPlan::new(&pool, "NoSuchService/GetOrder", "{}").is_err());
    }
}

//! A stand-in OTLP collector for local runs and benchmarks: serves the OpenTelemetry `TraceService`
//! on the given address (default 127.0.0.1:4317), accepts every export, and prints how many spans it
//! received when stopped (Ctrl-C or SIGTERM).
//!
//!     cargo run --example otlp-sink -- 127.0.0.1:4317
//!     APP_TELEMETRY__OTLP_ENDPOINT=http://127.0.0.1:4317 cargo run

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};

#[derive(Clone, Default)]
struct Sink {
    spans: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|resource| &resource.scope_spans)
            .map(|scope| scope.spans.len())
            .sum();
        self.spans.fetch_add(spans, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:4317".to_owned())
        .parse()?;
    let sink = Sink::default();
    eprintln!("otlp-sink: receiving spans on {addr}");
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(sink.clone()))
        .serve_with_shutdown(addr, platform::shutdown::signal())
        .await?;
    println!(
        "otlp-sink: {} spans received",
        sink.spans.load(Ordering::Relaxed)
    );
    Ok(())
}

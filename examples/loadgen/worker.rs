//! The workers: each makes its share of the calls on its connection and records how each ended.

use super::*;

pub(crate) struct Shared {
    /// The next request number to take.
    pub(crate) next: AtomicU64,
    pub(crate) done: AtomicU64,
    pub(crate) failed: AtomicU64,
}

/// One of `concurrency` loops, each with one call in flight at a time.
pub(crate) struct Worker {
    pub(crate) id: u64,
    pub(crate) channel: Channel,
    pub(crate) calls: Vec<CallPlan>,
    pub(crate) rotation: Vec<usize>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) first: u64,
    pub(crate) end: Option<u64>,
    pub(crate) deadline: Option<Instant>,
    pub(crate) started: Instant,
    pub(crate) rps: Option<f64>,
    pub(crate) timeout: Duration,
    pub(crate) metadata: MetadataMap,
}

impl Worker {
    pub(crate) async fn run(self) -> anyhow::Result<Report> {
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
    pub(crate) async fn call(
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

    pub(crate) fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        *request.metadata_mut() = self.metadata.clone();
        request.set_timeout(self.timeout);
        request
    }
}

/// Sends requests encoded beforehand and takes responses as bytes: responses are counted, not decoded,
/// so the tool spends as little CPU as it can on the machine it shares with the server.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RawCodec;

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

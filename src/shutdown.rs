//! The signals that stop the server: the first SIGTERM (what Kubernetes sends a pod it stops) or
//! SIGINT (Ctrl-C) starts the drain, a second one cuts it short.

use futures::{Stream, StreamExt};

/// One item per SIGINT or SIGTERM received, for as long as the stream is kept.
pub fn requests() -> impl Stream<Item = ()> + Send + 'static {
    futures::stream::unfold(Signals::new(), |mut signals| async move {
        let name = signals.recv().await;
        tracing::info!(signal = name, "shutdown requested");
        Some(((), signals))
    })
}

/// Completes on the first SIGINT or SIGTERM: for tools that stop at once, with no drain.
pub async fn signal() {
    let mut requests = std::pin::pin!(requests());
    requests.next().await;
}

struct Signals {
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let terminate = signal(SignalKind::terminate())
                .inspect_err(|err| tracing::error!(error = %err, "cannot listen for SIGTERM"))
                .ok();
            Self { terminate }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// The next signal's name.
    async fn recv(&mut self) -> &'static str {
        let interrupt = async {
            if let Err(err) = tokio::signal::ctrl_c().await {
                tracing::error!(error = %err, "cannot listen for Ctrl-C");
                std::future::pending::<()>().await;
            }
        };
        #[cfg(unix)]
        let terminate = async {
            let received = match self.terminate.as_mut() {
                Some(terminate) => terminate.recv().await.is_some(),
                None => false,
            };
            if !received {
                std::future::pending::<()>().await;
            }
        };
        #[cfg(not(unix))]
        let terminate = std::future::pending::<()>();
        tokio::select! {
            () = interrupt => "SIGINT",
            () = terminate => "SIGTERM",
        }
    }
}

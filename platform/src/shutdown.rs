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

/// The listeners, kept for the whole drain: a signal that arrives while nobody is waiting is
/// delivered at the next wait instead of being lost.
struct Signals {
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let listen = |kind: SignalKind, name: &str| {
                signal(kind)
                    .inspect_err(|err| tracing::error!(error = %err, "cannot listen for {name}"))
                    .ok()
            };
            Self {
                interrupt: listen(SignalKind::interrupt(), "SIGINT"),
                terminate: listen(SignalKind::terminate(), "SIGTERM"),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// The next signal's name.
    #[cfg(unix)]
    async fn recv(&mut self) -> &'static str {
        async fn next(signal: Option<&mut tokio::signal::unix::Signal>) {
            let received = match signal {
                Some(signal) => signal.recv().await.is_some(),
                None => false,
            };
            if !received {
                std::future::pending::<()>().await;
            }
        }
        tokio::select! {
            () = next(self.interrupt.as_mut()) => "SIGINT",
            () = next(self.terminate.as_mut()) => "SIGTERM",
        }
    }

    #[cfg(not(unix))]
    async fn recv(&mut self) -> &'static str {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
        "Ctrl-C"
    }
}

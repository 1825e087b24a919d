//! Transport security: TLS or mutual TLS from PEM files, reloaded without a restart.
//!
//! cert-manager and Vault rotate certificates by rewriting the files (Kubernetes swaps a symlinked
//! directory), so the files are re-read every `tls.reload_interval` and on SIGHUP; a changed set that
//! parses, whose key matches its certificate, replaces the configuration for new connections. Open
//! connections keep the session they negotiated. A set that does not load is logged and ignored, so
//! a bad rotation can never take the server down.
//!
//! Written over rustls directly because tonic's `ServerTlsConfig` builds one fixed configuration and
//! cannot reload it.

use std::{
    fmt, fs, io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use arc_swap::ArcSwap;
use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_util::sync::CancellationToken;

use crate::config::TlsSettings;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key} = {path:?}: {reason}")]
    File {
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The verified identity of a client that presented a certificate (mutual TLS): what its leaf
/// certificate names. Handlers and layers read it as a request extension.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientIdentity(Arc<IdentityNames>);

#[derive(Debug, PartialEq, Eq)]
struct IdentityNames {
    common_name: Option<String>,
    uris: Vec<String>,
    dns_names: Vec<String>,
}

impl ClientIdentity {
    /// Reads the names of a DER certificate that the handshake has already verified.
    fn from_certificate(der: &[u8]) -> Option<Self> {
        use x509_parser::{extensions::GeneralName, prelude::parse_x509_certificate};

        let (_, certificate) = parse_x509_certificate(der).ok()?;
        let common_name = certificate
            .subject()
            .iter_common_name()
            .find_map(|name| name.as_str().ok())
            .map(str::to_owned);
        let (mut uris, mut dns_names) = (Vec::new(), Vec::new());
        if let Ok(Some(names)) = certificate.subject_alternative_name() {
            for name in &names.value.general_names {
                match name {
                    GeneralName::URI(uri) => uris.push((*uri).to_owned()),
                    GeneralName::DNSName(dns) => dns_names.push((*dns).to_owned()),
                    _ => {}
                }
            }
        }
        Some(Self(Arc::new(IdentityNames {
            common_name,
            uris,
            dns_names,
        })))
    }

    /// The subject's common name (CN), if any.
    pub fn common_name(&self) -> Option<&str> {
        self.0.common_name.as_deref()
    }

    /// URI subject alternative names, such as a SPIFFE id (`spiffe://cluster.local/ns/x/sa/y`).
    pub fn uris(&self) -> &[String] {
        &self.0.uris
    }

    /// DNS subject alternative names.
    pub fn dns_names(&self) -> &[String] {
        &self.0.dns_names
    }

    /// The most specific name: a SPIFFE or other URI, else the CN, else the first DNS name.
    pub fn name(&self) -> &str {
        self.0
            .uris
            .first()
            .map(String::as_str)
            .or(self.0.common_name.as_deref())
            .or(self.0.dns_names.first().map(String::as_str))
            .unwrap_or("")
    }
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What one reload did.
#[derive(Debug)]
pub enum Reload {
    /// The files hold what is already in service.
    Unchanged,
    /// New connections now get the new files.
    Applied,
    /// The files changed but do not load; the previous configuration stays in service.
    Rejected(TlsError),
}

/// The server's TLS configuration, swapped atomically when the files change.
pub struct ServerTls {
    files: Files,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<ServerConfig>,
    /// The file contents last tried, applied or not (`None`: the files could not be read), so a bad
    /// set is reported once, not every tick.
    last_read: Mutex<Option<Contents>>,
}

struct Files {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

#[derive(PartialEq, Eq)]
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl ServerTls {
    /// Loads the files `settings` names; `None` when TLS is off. Fails, naming the key and the path,
    /// when a file cannot be read or the set does not form a valid configuration.
    pub fn load(settings: &TlsSettings) -> Result<Option<Arc<Self>>, TlsError> {
        let (Some(cert), Some(key)) = (&settings.cert_file, &settings.key_file) else {
            return Ok(None);
        };
        let files = Files {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: settings.client_ca_file.clone(),
        };
        // ring, explicitly: the one provider in the tree, whatever features other crates enable.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let contents = files.read()?;
        let config = build(&files, &contents, &provider)?;
        Ok(Some(Arc::new(Self {
            files,
            provider,
            current: ArcSwap::from_pointee(config),
            last_read: Mutex::new(Some(contents)),
        })))
    }

    /// Whether clients must present a certificate.
    pub fn is_mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// Re-reads the files and applies them if they changed and load.
    pub fn reload(&self) -> Reload {
        // A poisoned lock only means another reload panicked; the contents it guards are still whole.
        let mut last_read = self
            .last_read
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let contents = match self.files.read() {
            Ok(contents) => contents,
            // Reported when the files first become unreadable, not again on every tick after.
            Err(err) if last_read.take().is_some() => return Reload::Rejected(err),
            Err(_) => return Reload::Unchanged,
        };
        if last_read.as_ref() == Some(&contents) {
            return Reload::Unchanged;
        }
        let outcome = match build(&self.files, &contents, &self.provider) {
            Ok(config) => {
                self.current.store(Arc::new(config));
                Reload::Applied
            }
            Err(err) => Reload::Rejected(err),
        };
        *last_read = Some(contents);
        outcome
    }

    /// Performs the server side of a handshake with the configuration in service now, and returns the
    /// stream with the client's verified identity, if it presented a certificate.
    pub async fn accept<IO>(&self, io: IO) -> io::Result<(TlsStream<IO>, Option<ClientIdentity>)>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let stream = TlsAcceptor::from(self.current.load_full())
            .accept(io)
            .await?;
        let identity = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| ClientIdentity::from_certificate(leaf));
        Ok((stream, identity))
    }

    fn reload_and_log(&self) {
        match self.reload() {
            Reload::Unchanged => {}
            Reload::Applied => tracing::info!(
                cert_file = %self.files.cert.display(),
                "TLS certificate reloaded; new connections use it"
            ),
            Reload::Rejected(err) => tracing::warn!(
                error = %err,
                "TLS files changed but do not load; keeping the certificate in service"
            ),
        }
    }
}

/// Reloads `tls` every `interval` and on SIGHUP until `stop` is cancelled, logging each change.
/// Without TLS it still takes SIGHUP, which would otherwise end the process, and says so. SIGHUP is
/// listened for from the moment this is called, not from the returned future's first poll.
pub fn watch(
    tls: Option<Arc<ServerTls>>,
    interval: Duration,
    stop: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let hangups = hangup_signals();
    watch_with(tls, interval, stop, hangups)
}

async fn watch_with(
    tls: Option<Arc<ServerTls>>,
    interval: Duration,
    stop: CancellationToken,
    mut hangups: Hangups,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // The first tick is now, and the files were just loaded.
    loop {
        let hangup = tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => false,
            Some(()) = hangups.recv() => true,
        };
        match &tls {
            Some(tls) => {
                if hangup {
                    tracing::info!("SIGHUP: re-reading TLS files");
                }
                tls.reload_and_log();
            }
            None if hangup => tracing::info!("SIGHUP: nothing to reload (TLS is off)"),
            None => {}
        }
    }
}

/// Completes on each SIGHUP; never, where there is no SIGHUP or it cannot be listened for.
struct Hangups {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

fn hangup_signals() -> Hangups {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let signal = signal(SignalKind::hangup())
            .inspect_err(|err| tracing::warn!(error = %err, "cannot listen for SIGHUP"))
            .ok();
        Hangups { signal }
    }
    #[cfg(not(unix))]
    Hangups {}
}

impl Hangups {
    async fn recv(&mut self) -> Option<()> {
        #[cfg(unix)]
        if let Some(signal) = &mut self.signal {
            return signal.recv().await;
        }
        std::future::pending().await
    }
}

impl Files {
    fn read(&self) -> Result<Contents, TlsError> {
        Ok(Contents {
            cert: read("tls.cert_file", &self.cert)?,
            key: read("tls.key_file", &self.key)?,
            client_ca: self
                .client_ca
                .as_deref()
                .map(|path| read("tls.client_ca_file", path))
                .transpose()?,
        })
    }
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|err| file_error(key, path, err))
}

fn file_error(key: &'static str, path: &Path, reason: impl fmt::Display) -> TlsError {
    TlsError::File {
        key,
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// A server configuration from the files' contents: HTTP/2 only, client certificates required
/// when a client CA is given.
fn build(
    files: &Files,
    contents: &Contents,
    provider: &Arc<CryptoProvider>,
) -> Result<ServerConfig, TlsError> {
    let chain = CertificateDer::pem_slice_iter(&contents.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| file_error("tls.cert_file", &files.cert, err))?;
    if chain.is_empty() {
        return Err(file_error(
            "tls.cert_file",
            &files.cert,
            "no PEM certificate in the file",
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&contents.key)
        .map_err(|err| file_error("tls.key_file", &files.key, err))?;

    let builder = ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_safe_default_protocol_versions()?;
    let builder = match (&files.client_ca, &contents.client_ca) {
        (Some(path), Some(pem)) => {
            let mut roots = RootCertStore::empty();
            for certificate in CertificateDer::pem_slice_iter(pem) {
                let certificate =
                    certificate.map_err(|err| file_error("tls.client_ca_file", path, err))?;
                roots
                    .add(certificate)
                    .map_err(|err| file_error("tls.client_ca_file", path, err))?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
                    .build()
                    .map_err(|err| file_error("tls.client_ca_file", path, err))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    // `with_single_cert` checks that the key belongs to the certificate.
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|err| file_error("tls.key_file", &files.key, err))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

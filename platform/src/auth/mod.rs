//! Authentication and authorisation, as a layer in front of every service: handlers never see a call
//! that is not allowed.
//!
//! With `auth.mode = "jwt"` every call to a method that is not public needs
//! `authorization: Bearer <JWT>`: signature (HS256 with a shared secret, or RS256/ES256 with a public
//! key), `exp`, `iss` and `aud` are required and checked, and `nbf` is checked when the token has one
//! (RFC 7519 makes it optional, and Auth0, Google and Keycloak access tokens carry none); `aud` may be
//! a string or an array. A missing or bad token is
//! UNAUTHENTICATED; a good token without the scope the method needs (the standard space-separated
//! `scope` claim, matched against the scopes each service registers with its policy) is
//! PERMISSION_DENIED. The token's subject reaches handlers as a [`Subject`] request extension. Token
//! values are never logged.

use std::{
    collections::HashMap,
    fs,
    path::Path,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use futures::future::{Either, Ready, ready};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use pin_project_lite::pin_project;
use serde::Deserialize;
use tonic::{Code, Status};
use tower::{Layer, Service};

use crate::{
    config::{AuthMode, AuthSettings},
    methods::Method,
    status::{self, Reason},
};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{key} = {path:?}: {reason}")]
    KeyFile {
        key: &'static str,
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("auth.public_methods: {0}")]
    PublicMethods(String),
    #[error("auth: {0}")]
    Scopes(String),
}

/// The authenticated caller: the token's `sub` claim (empty when the token has none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject(Arc<str>);

impl Subject {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Subject {
    fn from(subject: &str) -> Self {
        Self(subject.into())
    }
}

/// What a method needs from its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Public,
    Scope(&'static str),
    /// Served, but neither public nor given a scope: nobody may call it (fail closed).
    Undeclared,
}

/// Who may call what, resolved once at start-up.
pub struct AuthPolicy {
    verifier: Option<JwtVerifier>,
    access: HashMap<String, Access>,
}

impl AuthPolicy {
    /// Builds the policy for the served `methods`; `scopes` names the scope each method of the API
    /// needs, by `package.Service/Method`. A served method that is neither public nor scoped is
    /// refused to every caller, so a method added without a scope is closed, not open. Fails on an
    /// unreadable key, or on a public method or scope naming a method that is not served.
    pub fn new(
        settings: &AuthSettings,
        methods: &[Method],
        scopes: &[(String, &'static str)],
    ) -> Result<Self, AuthError> {
        let is_public = |method: &Method| {
            settings.public_methods.iter().any(|entry| {
                entry == &method.full_name()
                    || entry
                        .strip_suffix("/*")
                        .is_some_and(|service| service == method.service)
            })
        };
        for entry in &settings.public_methods {
            let known = methods.iter().any(|method| {
                entry == &method.full_name()
                    || entry.strip_suffix("/*") == Some(method.service.as_str())
            });
            if !known {
                return Err(AuthError::PublicMethods(format!(
                    "{entry:?} names no served method (write \"package.Service/Method\" or \
                     \"package.Service/*\")"
                )));
            }
        }
        for (name, _) in scopes {
            if !methods.iter().any(|method| &method.full_name() == name) {
                return Err(AuthError::Scopes(format!(
                    "a scope is declared for {name:?}, which is not served"
                )));
            }
        }
        let mut access = HashMap::new();
        for method in methods {
            let rule = if is_public(method) {
                Access::Public
            } else if let Some((_, scope)) =
                scopes.iter().find(|(name, _)| *name == method.full_name())
            {
                Access::Scope(scope)
            } else {
                Access::Undeclared
            };
            access.insert(method.path(), rule);
        }
        let verifier = match settings.mode {
            AuthMode::None => None,
            AuthMode::Jwt => Some(JwtVerifier::new(settings)?),
        };
        Ok(Self { verifier, access })
    }

    /// Decides on a call to `path` with these request headers: the caller, or the refusal to send.
    fn check(&self, path: &str, headers: &http::HeaderMap) -> Result<Option<Subject>, Status> {
        let Some(verifier) = &self.verifier else {
            return Ok(None);
        };
        let access = self.access.get(path).copied();
        if access == Some(Access::Public) {
            return Ok(None);
        }
        let token = bearer_token(headers)?;
        let claims = verifier.verify(token)?;
        match access {
            Some(Access::Scope(scope)) if !claims.has_scope(scope) => Err(status::error(
                Code::PermissionDenied,
                Reason::PERMISSION_DENIED,
                format!("this method needs the {scope:?} scope"),
            )),
            Some(Access::Undeclared) => Err(status::error(
                Code::PermissionDenied,
                Reason::PERMISSION_DENIED,
                "no scope grants this method",
            )),
            // A path missing from the table is one the server does not serve: the router answers.
            _ => Ok(Some(Subject(claims.sub.unwrap_or_default().into()))),
        }
    }
}

fn unauthenticated(reason: Reason, message: &str) -> Status {
    status::error(Code::Unauthenticated, reason, message)
}

fn bearer_token(headers: &http::HeaderMap) -> Result<&str, Status> {
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Err(unauthenticated(
            Reason::UNAUTHENTICATED_TOKEN_MISSING,
            "this method needs `authorization: Bearer <token>` metadata",
        ));
    };
    value
        .to_str()
        .ok()
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|token| !token.is_empty())
        .ok_or_else(|| {
            unauthenticated(
                Reason::UNAUTHENTICATED_TOKEN_MALFORMED,
                "the authorization metadata is not `Bearer <token>`",
            )
        })
}

#[derive(Debug, Clone, Deserialize)]
struct Claims {
    sub: Option<String>,
    #[serde(default)]
    scope: String,
    /// Required by the validation, so always present once a token has passed it.
    #[serde(default)]
    exp: u64,
    /// Optional (RFC 7519 §4.1.5): most identity providers' access tokens have none.
    #[serde(default)]
    nbf: Option<u64>,
}

impl Claims {
    fn has_scope(&self, wanted: &str) -> bool {
        self.scope
            .split_ascii_whitespace()
            .any(|scope| scope == wanted)
    }
}

/// Checks JWTs against one key and the configured issuer, audience and leeway.
struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    verified: VerifiedTokens,
}

/// Tokens that passed verification, by their full text, until they expire. A client sends the same
/// token with every call for as long as it is valid, and checking an ES256 signature costs ~200 µs of
/// CPU (RS256 less, HS256 a few µs): more than the rest of a call. Keyed by the whole token, so only
/// the very token that was verified can match; `exp` and `nbf` are checked again on every hit; only
/// successes are kept. Written by hand because it is a dozen lines: a cache crate would bring
/// eviction policies this does not need. When full it starts over, which costs one verification per
/// token in use.
struct VerifiedTokens {
    tokens: Mutex<HashMap<Arc<str>, Claims>>,
}

/// Enough for every token of a busy service's callers; each entry is a token and its claims (< 1 KB).
const VERIFIED_TOKENS_KEPT: usize = 4096;

impl VerifiedTokens {
    fn get(&self, token: &str) -> Option<Claims> {
        self.lock().get(token).cloned()
    }

    fn insert(&self, token: &str, claims: &Claims) {
        let mut tokens = self.lock();
        if tokens.len() >= VERIFIED_TOKENS_KEPT {
            tokens.clear();
        }
        tokens.insert(token.into(), claims.clone());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Claims>> {
        // The map holds only finished entries; a panic elsewhere cannot leave one half-written.
        self.tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl JwtVerifier {
    fn new(settings: &AuthSettings) -> Result<Self, AuthError> {
        let (key, algorithm) = match (&settings.jwt_secret_file, &settings.jwt_public_key_file) {
            (Some(path), _) => {
                let secret = read_key("auth.jwt_secret_file", path)?;
                // Secrets written with `echo` end in a newline that is not part of the secret.
                let secret = secret.trim_ascii_end();
                if secret.is_empty() {
                    return Err(key_error("auth.jwt_secret_file", path, "the file is empty"));
                }
                (DecodingKey::from_secret(secret), Algorithm::HS256)
            }
            (None, Some(path)) => {
                let pem = read_key("auth.jwt_public_key_file", path)?;
                match DecodingKey::from_rsa_pem(&pem) {
                    Ok(key) => (key, Algorithm::RS256),
                    Err(_) => DecodingKey::from_ec_pem(&pem)
                        .map(|key| (key, Algorithm::ES256))
                        .map_err(|_| {
                            key_error(
                                "auth.jwt_public_key_file",
                                path,
                                "not a PEM RSA or EC (P-256) public key",
                            )
                        })?,
                }
            }
            (None, None) => {
                return Err(AuthError::KeyFile {
                    key: "auth.jwt_secret_file",
                    path: Default::default(),
                    reason: "auth.mode = \"jwt\" needs a key".to_owned(),
                });
            }
        };
        let mut validation = Validation::new(algorithm);
        validation.set_issuer(&[&settings.issuer]);
        validation.set_audience(&[&settings.audience]);
        // `nbf` is validated when present (jsonwebtoken skips an absent one), never required.
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = settings.leeway.as_secs();
        Ok(Self {
            key,
            validation,
            verified: VerifiedTokens {
                tokens: Mutex::new(HashMap::new()),
            },
        })
    }

    fn verify(&self, token: &str) -> Result<Claims, Status> {
        self.verify_at(token, jsonwebtoken::get_current_timestamp())
    }

    /// `verify` as of `now` (seconds since the epoch).
    fn verify_at(&self, token: &str, now: u64) -> Result<Claims, Status> {
        if let Some(claims) = self.verified.get(token) {
            let leeway = self.validation.leeway;
            if now > claims.exp.saturating_add(leeway) {
                return Err(unauthenticated(
                    Reason::UNAUTHENTICATED_TOKEN_EXPIRED,
                    "the bearer token has expired",
                ));
            }
            if claims
                .nbf
                .is_some_and(|nbf| now.saturating_add(leeway) < nbf)
            {
                return Err(unauthenticated(
                    Reason::UNAUTHENTICATED_TOKEN_NOT_YET_VALID,
                    "the bearer token is not valid yet (nbf)",
                ));
            }
            return Ok(claims);
        }
        let claims = self.decode(token)?;
        self.verified.insert(token, &claims);
        Ok(claims)
    }

    fn decode(&self, token: &str) -> Result<Claims, Status> {
        jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map(|data| data.claims)
            .map_err(|err| {
                let (reason, message) = match err.kind() {
                    ErrorKind::ExpiredSignature => (
                        Reason::UNAUTHENTICATED_TOKEN_EXPIRED,
                        "the bearer token has expired",
                    ),
                    ErrorKind::ImmatureSignature => (
                        Reason::UNAUTHENTICATED_TOKEN_NOT_YET_VALID,
                        "the bearer token is not valid yet (nbf)",
                    ),
                    ErrorKind::InvalidToken
                    | ErrorKind::Base64(_)
                    | ErrorKind::Json(_)
                    | ErrorKind::Utf8(_) => (
                        Reason::UNAUTHENTICATED_TOKEN_MALFORMED,
                        "the bearer token is not a well-formed JWT",
                    ),
                    ErrorKind::InvalidIssuer => (
                        Reason::UNAUTHENTICATED_TOKEN_INVALID,
                        "the bearer token's issuer is not accepted",
                    ),
                    ErrorKind::InvalidAudience => (
                        Reason::UNAUTHENTICATED_TOKEN_INVALID,
                        "the bearer token is not meant for this service (aud)",
                    ),
                    ErrorKind::MissingRequiredClaim(_) => (
                        Reason::UNAUTHENTICATED_TOKEN_INVALID,
                        "the bearer token lacks a required claim (exp, iss, aud)",
                    ),
                    _ => (
                        Reason::UNAUTHENTICATED_TOKEN_INVALID,
                        "the bearer token's signature or algorithm is not accepted",
                    ),
                };
                unauthenticated(reason, message)
            })
    }
}

fn read_key(key: &'static str, path: &Path) -> Result<Vec<u8>, AuthError> {
    fs::read(path).map_err(|err| key_error(key, path, err))
}

fn key_error(key: &'static str, path: &Path, reason: impl std::fmt::Display) -> AuthError {
    AuthError::KeyFile {
        key,
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

#[derive(Clone)]
pub struct AuthLayer {
    policy: Arc<AuthPolicy>,
}

impl AuthLayer {
    pub fn new(policy: AuthPolicy) -> Self {
        Self {
            policy: Arc::new(policy),
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Authenticate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticate {
            inner,
            policy: Arc::clone(&self.policy),
        }
    }
}

#[derive(Clone)]
pub struct Authenticate<S> {
    inner: S,
    policy: Arc<AuthPolicy>,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Authenticate<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<ResponseFuture<S::Future>, Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        match self.policy.check(request.uri().path(), request.headers()) {
            Ok(subject) => {
                if let Some(subject) = &subject {
                    request.extensions_mut().insert(subject.clone());
                }
                Either::Left(ResponseFuture {
                    inner: self.inner.call(request),
                    subject,
                })
            }
            Err(refusal) => Either::Right(ready(Ok(refusal.into_http()))),
        }
    }
}

pin_project! {
    /// Puts the subject on the response too, where the access log, outside this layer, finds it.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        subject: Option<Subject>,
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = std::task::ready!(this.inner.poll(cx))?;
        if let Some(subject) = this.subject.take() {
            response.extensions_mut().insert(subject);
        }
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests;

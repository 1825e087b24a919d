//! Failures as gRPC statuses: the code, a message safe to show the caller, and the `google.rpc`
//! details. The platform's own rejections (authentication, limits, the drain, deadlines, panics, the
//! framework's errors) are made here; a service maps its own errors with the same helpers, so every
//! error response carries an `ErrorInfo` whose `reason` a client can branch on and whose `domain` is
//! the service's proto package.

use std::{collections::HashMap, sync::OnceLock, time::Duration};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// A machine-readable `ErrorInfo.reason`. Stable: clients match on these strings, so a reason is
/// added, never renamed. The platform's are the constants below; a service declares its own with
/// [`Reason::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Reason(&'static str);

impl Reason {
    pub const INVALID_ARGUMENT: Reason = Reason("INVALID_ARGUMENT");
    pub const MALFORMED_MESSAGE: Reason = Reason("MALFORMED_MESSAGE");
    pub const MESSAGE_TOO_LARGE: Reason = Reason("MESSAGE_TOO_LARGE");
    pub const INTERNAL: Reason = Reason("INTERNAL");
    pub const UNAUTHENTICATED_TOKEN_MISSING: Reason = Reason("UNAUTHENTICATED_TOKEN_MISSING");
    pub const UNAUTHENTICATED_TOKEN_MALFORMED: Reason = Reason("UNAUTHENTICATED_TOKEN_MALFORMED");
    pub const UNAUTHENTICATED_TOKEN_EXPIRED: Reason = Reason("UNAUTHENTICATED_TOKEN_EXPIRED");
    pub const UNAUTHENTICATED_TOKEN_NOT_YET_VALID: Reason =
        Reason("UNAUTHENTICATED_TOKEN_NOT_YET_VALID");
    pub const UNAUTHENTICATED_TOKEN_INVALID: Reason = Reason("UNAUTHENTICATED_TOKEN_INVALID");
    pub const PERMISSION_DENIED: Reason = Reason("PERMISSION_DENIED");
    pub const RATE_LIMITED: Reason = Reason("RATE_LIMITED");
    pub const OVERLOADED: Reason = Reason("OVERLOADED");
    pub const SHUTTING_DOWN: Reason = Reason("SHUTTING_DOWN");
    pub const DEADLINE_EXCEEDED: Reason = Reason("DEADLINE_EXCEEDED");
    pub const METHOD_NOT_FOUND: Reason = Reason("METHOD_NOT_FOUND");

    /// Every reason the platform sends, for the documentation check.
    pub const PLATFORM: [Reason; 15] = [
        Reason::INVALID_ARGUMENT,
        Reason::MALFORMED_MESSAGE,
        Reason::MESSAGE_TOO_LARGE,
        Reason::INTERNAL,
        Reason::UNAUTHENTICATED_TOKEN_MISSING,
        Reason::UNAUTHENTICATED_TOKEN_MALFORMED,
        Reason::UNAUTHENTICATED_TOKEN_EXPIRED,
        Reason::UNAUTHENTICATED_TOKEN_NOT_YET_VALID,
        Reason::UNAUTHENTICATED_TOKEN_INVALID,
        Reason::PERMISSION_DENIED,
        Reason::RATE_LIMITED,
        Reason::OVERLOADED,
        Reason::SHUTTING_DOWN,
        Reason::DEADLINE_EXCEEDED,
        Reason::METHOD_NOT_FOUND,
    ];

    /// A service's own reason, in SCREAMING_SNAKE_CASE (`ORDER_NOT_FOUND`).
    pub const fn new(name: &'static str) -> Self {
        Self(name)
    }

    /// For a status that came from a library without a reason of ours: named after its code.
    pub fn unclassified(code: Code) -> Self {
        Self(code_name(code))
    }

    pub fn as_str(self) -> &'static str {
        self.0
    }
}

/// `ErrorInfo.domain` of every error: the service's proto package, set once as the server is built.
static ERROR_DOMAIN: OnceLock<&'static str> = OnceLock::new();

/// Sets `ErrorInfo.domain` for the process: the first call wins (one process serves one API).
pub fn set_error_domain(domain: &'static str) {
    let _ = ERROR_DOMAIN.set(domain);
}

/// The `ErrorInfo.domain` of this process's errors; empty until [`set_error_domain`].
pub fn error_domain() -> &'static str {
    ERROR_DOMAIN.get().copied().unwrap_or_default()
}

/// A status with an `ErrorInfo` detail and nothing else.
pub fn error(code: Code, reason: Reason, message: impl Into<String>) -> Status {
    Status::with_error_details(code, message, error_info(reason, HashMap::new()))
}

/// The details of an error with `reason` and `metadata`, for a service to add more details to.
pub fn error_info(reason: Reason, metadata: HashMap<String, String>) -> ErrorDetails {
    ErrorDetails::with_error_info(reason.as_str(), error_domain(), metadata)
}

/// INTERNAL for a call that panicked. What the panic said, and where, is logged once by the panic
/// hook (`telemetry::init`), and never sent.
pub fn panicked() -> Status {
    error(Code::Internal, Reason::INTERNAL, "internal error")
}

/// RESOURCE_EXHAUSTED for a client over its rate, with the wait as `RetryInfo` and in the
/// `grpc-retry-pushback-ms` trailer that gRPC retry policies honour.
pub fn rate_limited(retry_after: Duration) -> Status {
    let mut details = error_info(Reason::RATE_LIMITED, HashMap::new());
    details.set_retry_info(Some(retry_after));
    let mut status = Status::with_error_details(
        Code::ResourceExhausted,
        "rate limit exceeded; retry later",
        details,
    );
    let millis = u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX);
    status
        .metadata_mut()
        .insert("grpc-retry-pushback-ms", millis.into());
    status
}

/// The code's name as the gRPC specification spells it (`DEADLINE_EXCEEDED`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The `ErrorInfo.reason` of `status`, for tests; fails the test when there is none. (Its domain is
/// the process's, set when a server is built: the tests that build one check it.)
#[cfg(any(test, feature = "test-support"))]
pub fn error_reason(status: &Status) -> String {
    let details = status.get_error_details();
    let info = details
        .error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    info.reason.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limited_tells_when_to_retry() {
        let status = rate_limited(Duration::from_millis(250));
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(error_reason(&status), "RATE_LIMITED");
        assert_eq!(
            status
                .get_error_details()
                .retry_info()
                .and_then(|info| info.retry_delay),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            status
                .metadata()
                .get("grpc-retry-pushback-ms")
                .and_then(|v| v.to_str().ok()),
            Some("250")
        );
    }

    #[test]
    fn reasons_are_distinct_screaming_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for reason in Reason::PLATFORM {
            let name = reason.as_str();
            assert!(seen.insert(name), "{name} twice");
            assert!(
                name.chars().all(|c| c.is_ascii_uppercase() || c == '_'),
                "{name}"
            );
        }
    }
}

//! The one place that turns failures into gRPC statuses: the code, a message safe to show the caller,
//! and the `google.rpc` details. Domain errors, the layers' rejections and the framework's own errors
//! (see `server::error_details`) all end here, so every error response carries an `ErrorInfo` whose
//! `reason` a client can branch on and whose `domain` is this service's proto package.

use std::{collections::HashMap, time::Duration};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::error::Error;

/// `ErrorInfo.domain`: the proto package of the API, named by `build.rs`.
pub const ERROR_DOMAIN: &str = env!("API_PROTO_PACKAGE");

/// The resource type named in NOT_FOUND details.
const ORDER_RESOURCE_TYPE: &str = "Order";

/// The machine-readable `ErrorInfo.reason` of every error this service sends. Stable: clients match
/// on these strings, so a variant is added, never renamed. The README lists them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    InvalidArgument,
    InvalidOrder,
    OrderNotFound,
    OrderAlreadyShipped,
    OrderRepeatedInStream,
    MalformedMessage,
    MessageTooLarge,
    DatabaseUnavailable,
    Internal,
    UnauthenticatedTokenMissing,
    UnauthenticatedTokenMalformed,
    UnauthenticatedTokenExpired,
    UnauthenticatedTokenNotYetValid,
    UnauthenticatedTokenInvalid,
    PermissionDenied,
    RateLimited,
    Overloaded,
    ShuttingDown,
    DeadlineExceeded,
    MethodNotFound,
    /// A status that came from a library without a reason of ours: named after its code.
    Unclassified(Code),
}

impl Reason {
    /// Every named reason, for the README check.
    pub const NAMED: [Reason; 20] = [
        Reason::InvalidArgument,
        Reason::InvalidOrder,
        Reason::OrderNotFound,
        Reason::OrderAlreadyShipped,
        Reason::OrderRepeatedInStream,
        Reason::MalformedMessage,
        Reason::MessageTooLarge,
        Reason::DatabaseUnavailable,
        Reason::Internal,
        Reason::UnauthenticatedTokenMissing,
        Reason::UnauthenticatedTokenMalformed,
        Reason::UnauthenticatedTokenExpired,
        Reason::UnauthenticatedTokenNotYetValid,
        Reason::UnauthenticatedTokenInvalid,
        Reason::PermissionDenied,
        Reason::RateLimited,
        Reason::Overloaded,
        Reason::ShuttingDown,
        Reason::DeadlineExceeded,
        Reason::MethodNotFound,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidArgument => "INVALID_ARGUMENT",
            Reason::InvalidOrder => "INVALID_ORDER",
            Reason::OrderNotFound => "ORDER_NOT_FOUND",
            Reason::OrderAlreadyShipped => "ORDER_ALREADY_SHIPPED",
            Reason::OrderRepeatedInStream => "ORDER_REPEATED_IN_STREAM",
            Reason::MalformedMessage => "MALFORMED_MESSAGE",
            Reason::MessageTooLarge => "MESSAGE_TOO_LARGE",
            Reason::DatabaseUnavailable => "DATABASE_UNAVAILABLE",
            Reason::Internal => "INTERNAL",
            Reason::UnauthenticatedTokenMissing => "UNAUTHENTICATED_TOKEN_MISSING",
            Reason::UnauthenticatedTokenMalformed => "UNAUTHENTICATED_TOKEN_MALFORMED",
            Reason::UnauthenticatedTokenExpired => "UNAUTHENTICATED_TOKEN_EXPIRED",
            Reason::UnauthenticatedTokenNotYetValid => "UNAUTHENTICATED_TOKEN_NOT_YET_VALID",
            Reason::UnauthenticatedTokenInvalid => "UNAUTHENTICATED_TOKEN_INVALID",
            Reason::PermissionDenied => "PERMISSION_DENIED",
            Reason::RateLimited => "RATE_LIMITED",
            Reason::Overloaded => "OVERLOADED",
            Reason::ShuttingDown => "SHUTTING_DOWN",
            Reason::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Reason::MethodNotFound => "METHOD_NOT_FOUND",
            Reason::Unclassified(code) => code_name(code),
        }
    }
}

/// A status with an `ErrorInfo` detail and nothing else.
pub fn error(code: Code, reason: Reason, message: impl Into<String>) -> Status {
    Status::with_error_details(code, message, error_info(reason, HashMap::new()))
}

/// INTERNAL for a call that panicked. What the panic said, and where, is logged once by the panic
/// hook (`telemetry::init`), and never sent.
pub fn panicked() -> Status {
    error(Code::Internal, Reason::Internal, "internal error")
}

/// RESOURCE_EXHAUSTED for a client over its rate, with the wait as `RetryInfo` and in the
/// `grpc-retry-pushback-ms` trailer that gRPC retry policies honour.
pub fn rate_limited(retry_after: Duration) -> Status {
    let mut details = error_info(Reason::RateLimited, HashMap::new());
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

fn error_info(reason: Reason, metadata: HashMap<String, String>) -> ErrorDetails {
    ErrorDetails::with_error_info(reason.as_str(), ERROR_DOMAIN, metadata)
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::InvalidArgument(violations) => bad_request(Reason::InvalidArgument, &violations),
            Error::InvalidOrder(violations) => bad_request(Reason::InvalidOrder, &violations),
            Error::OrderNotFound(id) => {
                let mut details = error_info(
                    Reason::OrderNotFound,
                    HashMap::from([("order_id".to_owned(), id.to_string())]),
                );
                details.set_resource_info(
                    ORDER_RESOURCE_TYPE,
                    id.to_string(),
                    "",
                    "no order has this id",
                );
                Status::with_error_details(Code::NotFound, err.to_string(), details)
            }
            Error::OrderAlreadyShipped(id) | Error::OrderRepeatedInStream(id) => {
                let reason = if matches!(err, Error::OrderAlreadyShipped(_)) {
                    Reason::OrderAlreadyShipped
                } else {
                    Reason::OrderRepeatedInStream
                };
                let details = error_info(
                    reason,
                    HashMap::from([("order_id".to_owned(), id.to_string())]),
                );
                Status::with_error_details(Code::FailedPrecondition, err.to_string(), details)
            }
            // What went wrong inside is logged here, once, and not sent: it may name tables, hosts or
            // data that the caller has no business seeing.
            Error::Unavailable(_) | Error::SchemaBehind(_) => {
                tracing::warn!(error = %err, "database unavailable");
                error(
                    Code::Unavailable,
                    Reason::DatabaseUnavailable,
                    "the database is unavailable; retry later",
                )
            }
            Error::Database(_) | Error::Migration(_) | Error::CorruptData(_) => {
                tracing::error!(error = %err, "internal error");
                error(Code::Internal, Reason::Internal, "internal error")
            }
        }
    }
}

fn bad_request(reason: Reason, violations: &crate::domain::Violations) -> Status {
    let field_violations: Vec<FieldViolation> = violations
        .iter()
        .map(|violation| FieldViolation::new(&violation.field, &violation.description))
        .collect();
    let mut details = error_info(reason, HashMap::new());
    details.set_bad_request(field_violations);
    Status::with_error_details(Code::InvalidArgument, violations.to_string(), details)
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

/// The `ErrorInfo.reason` of `status`, for unit tests; fails the test when there is none or its
/// domain is not this service's.
#[cfg(test)]
pub(crate) fn error_reason(status: &Status) -> String {
    let details = status.get_error_details();
    let info = details
        .error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.domain, ERROR_DOMAIN);
    info.reason.clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{OrderId, Violations};

    #[test]
    fn invalid_argument_carries_one_field_violation_per_problem() {
        let mut violations = Violations::one("order.items[2]", "too long");
        violations.add("order.price_cents", "negative");
        let status = Status::from(Error::InvalidOrder(violations));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(error_reason(&status), "INVALID_ORDER");
        let details = status.get_error_details();
        let fields: Vec<_> = details
            .bad_request()
            .map(|bad| {
                bad.field_violations
                    .iter()
                    .map(|v| v.field.clone())
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(fields, ["order.items[2]", "order.price_cents"]);
    }

    #[test]
    fn not_found_names_the_order() {
        let id = OrderId::generate();
        let status = Status::from(Error::OrderNotFound(id));
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(error_reason(&status), "ORDER_NOT_FOUND");
        let resource = status.get_error_details().resource_info().cloned();
        assert_eq!(resource.map(|r| r.resource_name), Some(id.to_string()));
    }

    #[test]
    fn shipped_orders_are_a_failed_precondition() {
        let status = Status::from(Error::OrderAlreadyShipped(OrderId::generate()));
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(error_reason(&status), "ORDER_ALREADY_SHIPPED");
    }

    #[test]
    fn database_errors_do_not_leak_details() {
        let status = Status::from(Error::Database(sqlx::Error::RowNotFound));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
        assert_eq!(error_reason(&status), "INTERNAL");
        let status = Status::from(Error::from(sqlx::Error::PoolTimedOut));
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(error_reason(&status), "DATABASE_UNAVAILABLE");
    }

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
        for reason in Reason::NAMED {
            let name = reason.as_str();
            assert!(seen.insert(name), "{name} twice");
            assert!(
                name.chars().all(|c| c.is_ascii_uppercase() || c == '_'),
                "{name}"
            );
        }
    }
}

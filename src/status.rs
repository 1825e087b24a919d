//! The one place that turns the service's errors into gRPC statuses: the code, a message safe to show
//! the caller, and the `google.rpc` details, made with the platform's helpers (`platform::status`), so
//! they carry the same `ErrorInfo` domain as the platform's own rejections.

use std::collections::HashMap;

use platform::status::{self, Reason};
use tonic::{Code, Status};
use tonic_types::{FieldViolation, StatusExt};

use crate::error::Error;

/// `ErrorInfo.domain`: the proto package of the API, named by `build.rs`.
pub const ERROR_DOMAIN: &str = env!("API_PROTO_PACKAGE");

/// The resource type named in NOT_FOUND details.
const ORDER_RESOURCE_TYPE: &str = "Order";

/// The order service's own `ErrorInfo.reason`s, beside the platform's. Stable: clients match on
/// these strings, so one is added, never renamed. The README lists them.
pub const INVALID_ORDER: Reason = Reason::new("INVALID_ORDER");
pub const ORDER_NOT_FOUND: Reason = Reason::new("ORDER_NOT_FOUND");
pub const ORDER_ALREADY_SHIPPED: Reason = Reason::new("ORDER_ALREADY_SHIPPED");
pub const ORDER_REPEATED_IN_STREAM: Reason = Reason::new("ORDER_REPEATED_IN_STREAM");
pub const DATABASE_UNAVAILABLE: Reason = Reason::new("DATABASE_UNAVAILABLE");

/// Every reason a caller of this service can see: the platform's and the service's.
pub fn named_reasons() -> impl Iterator<Item = Reason> {
    Reason::PLATFORM.into_iter().chain([
        INVALID_ORDER,
        ORDER_NOT_FOUND,
        ORDER_ALREADY_SHIPPED,
        ORDER_REPEATED_IN_STREAM,
        DATABASE_UNAVAILABLE,
    ])
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::InvalidArgument(violations) => {
                bad_request(Reason::INVALID_ARGUMENT, &violations)
            }
            Error::InvalidOrder(violations) => bad_request(INVALID_ORDER, &violations),
            Error::OrderNotFound(id) => {
                let mut details = status::error_info(
                    ORDER_NOT_FOUND,
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
                    ORDER_ALREADY_SHIPPED
                } else {
                    ORDER_REPEATED_IN_STREAM
                };
                let details = status::error_info(
                    reason,
                    HashMap::from([("order_id".to_owned(), id.to_string())]),
                );
                Status::with_error_details(Code::FailedPrecondition, err.to_string(), details)
            }
            // What went wrong inside is logged here, once, and not sent: it may name tables, hosts or
            // data that the caller has no business seeing.
            Error::Unavailable(_) | Error::SchemaBehind(_) => {
                tracing::warn!(error = %err, "database unavailable");
                status::error(
                    Code::Unavailable,
                    DATABASE_UNAVAILABLE,
                    "the database is unavailable; retry later",
                )
            }
            Error::Database(_) | Error::Migration(_) | Error::CorruptData(_) => {
                tracing::error!(error = %err, "internal error");
                status::error(Code::Internal, Reason::INTERNAL, "internal error")
            }
        }
    }
}

fn bad_request(reason: Reason, violations: &crate::domain::Violations) -> Status {
    let field_violations: Vec<FieldViolation> = violations
        .iter()
        .map(|violation| FieldViolation::new(&violation.field, &violation.description))
        .collect();
    let mut details = status::error_info(reason, HashMap::new());
    details.set_bad_request(field_violations);
    Status::with_error_details(Code::InvalidArgument, violations.to_string(), details)
}

#[cfg(test)]
mod tests {
    use platform::status::error_reason;

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
    fn reasons_are_distinct_screaming_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for reason in named_reasons() {
            let name = reason.as_str();
            assert!(seen.insert(name), "{name} twice");
            assert!(
                name.chars().all(|c| c.is_ascii_uppercase() || c == '_'),
                "{name}"
            );
        }
    }
}

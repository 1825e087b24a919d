//! The one mapping from domain errors to gRPC statuses: codes, messages and `google.rpc` details.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::error::Error;

/// The resource type named in NOT_FOUND details.
const ORDER_RESOURCE_TYPE: &str = "Order";

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::InvalidArgument(violations) => {
                let field_violations: Vec<FieldViolation> = violations
                    .iter()
                    .map(|violation| FieldViolation::new(&violation.field, &violation.description))
                    .collect();
                Status::with_error_details(
                    Code::InvalidArgument,
                    violations.to_string(),
                    ErrorDetails::with_bad_request(field_violations),
                )
            }
            Error::OrderNotFound(id) => Status::with_error_details(
                Code::NotFound,
                format!("order {id} not found"),
                ErrorDetails::with_resource_info(
                    ORDER_RESOURCE_TYPE,
                    id.to_string(),
                    "",
                    "no order has this id",
                ),
            ),
            Error::FailedPrecondition(message) => Status::failed_precondition(message),
            // What went wrong inside is logged here, once, and not sent: it may name tables, hosts or
            // data that the caller has no business seeing.
            Error::Unavailable(_) | Error::SchemaBehind(_) => {
                tracing::warn!(error = %err, "database unavailable");
                Status::unavailable("the database is unavailable; retry later")
            }
            Error::Database(_) | Error::Migration(_) | Error::CorruptData(_) => {
                tracing::error!(error = %err, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{OrderId, Violations};

    #[test]
    fn invalid_argument_carries_one_field_violation_per_problem() {
        let mut violations = Violations::one("order.items[2]", "too long");
        violations.add("order.price_cents", "negative");
        let status = Status::from(Error::InvalidArgument(violations));
        assert_eq!(status.code(), Code::InvalidArgument);
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
        let resource = status.get_error_details().resource_info().cloned();
        assert_eq!(resource.map(|r| r.resource_name), Some(id.to_string()));
    }

    #[test]
    fn database_errors_do_not_leak_details() {
        let status = Status::from(Error::Database(sqlx::Error::RowNotFound));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
        let status = Status::from(Error::from(sqlx::Error::PoolTimedOut));
        assert_eq!(status.code(), Code::Unavailable);
    }
}

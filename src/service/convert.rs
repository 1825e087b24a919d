//! Conversions between the API's messages and domain types. Parsing collects every problem of a
//! message, with field paths as the client sees them (`order.items[2]`).

use std::time::SystemTime;

use chrono::{DateTime, Utc};

use crate::{
    api,
    domain::{
        Order, OrderDetails, OrderDetailsInput, OrderId, OrderStatus, OrderUpdate, RequestId,
        Shipment, Violations,
    },
};

/// The order and idempotency key of a CreateOrder request.
pub fn create_request(
    request: api::CreateOrderRequest,
) -> Result<(OrderDetails, Option<RequestId>), Violations> {
    let mut violations = Violations::new();
    let details = order_details(request.order, &mut violations);
    let request_id = RequestId::parse(request.request_id)
        .map_err(|problem| violations.add("request_id", problem))
        .ok()
        .flatten();
    match details {
        Some(details) if violations.is_empty() => Ok((details, request_id)),
        _ => Err(violations),
    }
}

/// The order id and new values of one UpdateOrders message.
pub fn update_request(request: api::UpdateOrdersRequest) -> Result<OrderUpdate, Violations> {
    let mut violations = Violations::new();
    let id = request.order.as_ref().and_then(|order| {
        OrderId::parse(&order.id)
            .map_err(|problem| violations.add("order.id", problem))
            .ok()
    });
    let details = order_details(request.order, &mut violations);
    match (id, details) {
        (Some(id), Some(details)) if violations.is_empty() => Ok(OrderUpdate { id, details }),
        _ => Err(violations),
    }
}

/// Parses an id field, naming `field` in the violation.
pub fn order_id(field: &str, id: &str) -> Result<OrderId, Violations> {
    OrderId::parse(id).map_err(|problem| Violations::one(field, problem))
}

/// The client-writable fields of `order`, or `None` with the problems added to `violations`.
fn order_details(order: Option<api::Order>, violations: &mut Violations) -> Option<OrderDetails> {
    let Some(order) = order else {
        violations.add("order", "is required");
        return None;
    };
    let input = OrderDetailsInput {
        items: order.items,
        description: order.description,
        price_cents: order.price_cents,
        destination: order.destination,
    };
    OrderDetails::parse(input)
        .map_err(|problems| violations.extend_under("order", problems))
        .ok()
}

impl From<Order> for api::Order {
    fn from(order: Order) -> Self {
        let status = match order.status {
            OrderStatus::Pending => api::OrderStatus::Pending,
            OrderStatus::Shipped => api::OrderStatus::Shipped,
        };
        let details = order.details;
        Self {
            id: order.id.to_string(),
            items: details.items().to_vec(),
            description: details.description().to_owned(),
            price_cents: details.price_cents(),
            destination: details.destination().to_owned(),
            status: status.into(),
            create_time: Some(timestamp(order.create_time)),
            update_time: Some(timestamp(order.update_time)),
        }
    }
}

impl From<Shipment> for api::Shipment {
    fn from(shipment: Shipment) -> Self {
        Self {
            id: shipment.id.to_string(),
            destination: shipment.destination,
            orders: shipment.orders.into_iter().map(Into::into).collect(),
        }
    }
}

fn timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    SystemTime::from(time).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(violations: &Violations) -> Vec<String> {
        violations.iter().map(|v| v.field.clone()).collect()
    }

    #[test]
    fn create_request_reports_all_problems_under_their_paths() {
        let request = api::CreateOrderRequest {
            order: Some(api::Order {
                items: vec!["ok".into(), "".into()],
                price_cents: -3,
                ..Default::default()
            }),
            request_id: "k".repeat(500),
        };
        let violations = create_request(request).expect_err("invalid");
        assert_eq!(
            fields(&violations),
            [
                "order.items[1]",
                "order.price_cents",
                "order.destination",
                "request_id"
            ]
        );
    }

    #[test]
    fn a_missing_order_is_a_violation() {
        let violations = create_request(api::CreateOrderRequest::default()).expect_err("no order");
        assert_eq!(fields(&violations), ["order"]);
        let violations = update_request(api::UpdateOrdersRequest::default()).expect_err("no order");
        assert_eq!(fields(&violations), ["order"]);
    }

    #[test]
    fn update_request_needs_a_valid_id() {
        let request = api::UpdateOrdersRequest {
            order: Some(api::Order {
                id: "nope".into(),
                items: vec!["a".into()],
                destination: "Oslo".into(),
                ..Default::default()
            }),
        };
        assert_eq!(
            fields(&update_request(request).expect_err("bad id")),
            ["order.id"]
        );
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// Text as clients send it: any Unicode, NULs and control characters included, short to long.
        fn text() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<String>(),
                "[a-z ]{0,10}",
                proptest::collection::vec(any::<char>(), 150..250).prop_map(String::from_iter),
            ]
        }

        fn order() -> impl Strategy<Value = api::Order> {
            (
                text(),
                proptest::collection::vec(text(), 0..120),
                text(),
                any::<i64>(),
                text(),
            )
                .prop_map(|(id, items, description, price_cents, destination)| {
                    api::Order {
                        id,
                        items,
                        description,
                        price_cents,
                        destination,
                        ..Default::default()
                    }
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(200))]

            /// Any CreateOrder request converts, or is refused with field violations that each name
            /// a field of the request; it never panics.
            #[test]
            fn any_create_request_converts_or_names_its_violations(
                order in proptest::option::of(order()),
                request_id in text(),
            ) {
                match create_request(api::CreateOrderRequest { order, request_id }) {
                    Ok((details, _)) => {
                        prop_assert!(!details.items().is_empty());
                        prop_assert!(details.price_cents() >= 0);
                    }
                    Err(violations) => {
                        prop_assert!(!violations.is_empty());
                        for field in fields(&violations) {
                            prop_assert!(
                                field.starts_with("order") || field == "request_id",
                                "{}", field
                            );
                        }
                    }
                }
            }

            #[test]
            fn any_update_request_converts_or_names_its_violations(
                order in proptest::option::of(order()),
            ) {
                if let Err(violations) = update_request(api::UpdateOrdersRequest { order }) {
                    prop_assert!(!violations.is_empty());
                    for field in fields(&violations) {
                        prop_assert!(field.starts_with("order"), "{}", field);
                    }
                }
            }

            #[test]
            fn any_id_parses_or_is_refused_with_one_violation(id in text()) {
                if let Err(violations) = order_id("id", &id) {
                    prop_assert_eq!(fields(&violations), ["id"]);
                }
            }
        }
    }
}

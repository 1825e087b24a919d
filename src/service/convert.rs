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
}

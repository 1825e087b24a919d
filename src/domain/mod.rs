//! The order domain: types that can only hold valid values, parsed from untrusted input. Parsing
//! reports every problem at once, each with the path of the field it concerns.

use std::fmt;

use chrono::{DateTime, SubsecRound, Utc};
use uuid::Uuid;

mod shipment;

pub use shipment::{Batch, Shipment, ShipmentBatches};

pub const MAX_ITEMS: usize = 100;
pub const MAX_ITEM_CHARS: usize = 200;
pub const MAX_DESTINATION_CHARS: usize = 200;
pub const MAX_DESCRIPTION_CHARS: usize = 2000;
pub const MAX_REQUEST_ID_CHARS: usize = 100;

/// One problem with one input field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Path of the field, for example `order.items[2]`.
    pub field: String,
    pub description: String,
}

/// Every problem found in one input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    pub fn new() -> Self {
        Self::default()
    }

    /// A single violation.
    pub fn one(field: impl Into<String>, description: impl Into<String>) -> Self {
        let mut violations = Self::new();
        violations.add(field, description);
        violations
    }

    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation {
            field: field.into(),
            description: description.into(),
        });
    }

    /// Moves every violation of `other` here, each field path under `prefix` (`order` turns `items[0]`
    /// into `order.items[0]`).
    pub fn extend_under(&mut self, prefix: &str, other: Violations) {
        self.0
            .extend(other.0.into_iter().map(|violation| FieldViolation {
                field: format!("{prefix}.{}", violation.field),
                ..violation
            }));
    }

    /// Adds `context` before every description, for example to say which message of a stream was wrong.
    pub fn with_context(mut self, context: &str) -> Self {
        for violation in &mut self.0 {
            violation.description = format!("{context}: {}", violation.description);
        }
        self
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &FieldViolation> {
        self.0.iter()
    }

    /// `Ok(value)` when nothing was found, otherwise the violations.
    pub fn into_result<T>(self, value: T) -> Result<T, Violations> {
        if self.is_empty() {
            Ok(value)
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for Violations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, violation) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", violation.field, violation.description)?;
        }
        Ok(())
    }
}

/// A server-assigned order id (a UUID).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OrderId(Uuid);

impl OrderId {
    pub fn generate() -> Self {
        Self(Uuid::new_v4())
    }

    /// Parses an id sent by a client; the error describes the problem for a field violation.
    pub fn parse(input: &str) -> Result<Self, String> {
        if input.is_empty() {
            return Err("is required".to_owned());
        }
        Uuid::try_parse(input)
            .map(Self)
            .map_err(|_| format!("{input:?} is not a valid order id (a UUID)"))
    }

    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl From<Uuid> for OrderId {
    fn from(uuid: Uuid) -> Self {
        Self(uuid)
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.as_hyphenated().fmt(f)
    }
}

/// A client-chosen idempotency key for CreateOrder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(String);

impl RequestId {
    /// `Ok(None)` for an empty key, which asks for no idempotency.
    pub fn parse(input: String) -> Result<Option<Self>, String> {
        if input.is_empty() {
            return Ok(None);
        }
        check_text(&input, 1, MAX_REQUEST_ID_CHARS)?;
        Ok(Some(Self(input)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The fields of an order that clients write, as sent.
#[derive(Debug, Clone, Default)]
pub struct OrderDetailsInput {
    pub items: Vec<String>,
    pub description: String,
    pub price_cents: i64,
    pub destination: String,
}

/// The fields of an order that clients write, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderDetails {
    items: Vec<String>,
    description: String,
    price_cents: i64,
    destination: String,
}

impl OrderDetails {
    /// Validates every field; violations name paths relative to the order (`items[2]`, `price_cents`).
    pub fn parse(input: OrderDetailsInput) -> Result<Self, Violations> {
        let mut violations = Violations::new();

        if input.items.is_empty() {
            violations.add("items", "at least one item is required");
        } else if input.items.len() > MAX_ITEMS {
            violations.add(
                "items",
                format!(
                    "at most {MAX_ITEMS} items are allowed, got {}",
                    input.items.len()
                ),
            );
        }
        for (index, item) in input.items.iter().enumerate() {
            if let Err(problem) = check_text(item, 1, MAX_ITEM_CHARS) {
                violations.add(format!("items[{index}]"), problem);
            }
        }
        if let Err(problem) = check_text(&input.description, 0, MAX_DESCRIPTION_CHARS) {
            violations.add("description", problem);
        }
        if input.price_cents < 0 {
            violations.add(
                "price_cents",
                format!("must not be negative, got {}", input.price_cents),
            );
        }
        if let Err(problem) = check_text(&input.destination, 1, MAX_DESTINATION_CHARS) {
            violations.add("destination", problem);
        }

        violations.into_result(Self {
            items: input.items,
            description: input.description,
            price_cents: input.price_cents,
            destination: input.destination,
        })
    }

    /// Rebuilds details that were validated before they were stored.
    pub(crate) fn from_storage(
        items: Vec<String>,
        description: String,
        price_cents: i64,
        destination: String,
    ) -> Self {
        Self {
            items,
            description,
            price_cents,
            destination,
        }
    }

    pub fn items(&self) -> &[String] {
        &self.items
    }

    pub fn description(&self) -> &str {
        &self.description
    }

    pub fn price_cents(&self) -> i64 {
        self.price_cents
    }

    pub fn destination(&self) -> &str {
        &self.destination
    }
}

/// Checks a text field's length in characters (not bytes). NUL is refused because PostgreSQL cannot
/// store it in text columns: both backends must accept exactly the same input.
fn check_text(text: &str, min_chars: usize, max_chars: usize) -> Result<(), String> {
    let chars = text.chars().count();
    if chars < min_chars || chars > max_chars {
        return Err(if min_chars == 0 {
            format!("must be at most {max_chars} characters, got {chars}")
        } else {
            format!("must be {min_chars} to {max_chars} characters, got {chars}")
        });
    }
    if text.contains('\0') {
        return Err("must not contain NUL characters".to_owned());
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderStatus {
    Pending,
    Shipped,
}

impl OrderStatus {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Shipped => "SHIPPED",
        }
    }

    pub fn from_storage(name: &str) -> Option<Self> {
        match name {
            "PENDING" => Some(Self::Pending),
            "SHIPPED" => Some(Self::Shipped),
            _ => None,
        }
    }
}

/// A stored order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub id: OrderId,
    pub details: OrderDetails,
    pub status: OrderStatus,
    pub create_time: DateTime<Utc>,
    pub update_time: DateTime<Utc>,
}

/// New values for an existing order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderUpdate {
    pub id: OrderId,
    pub details: OrderDetails,
}

/// The current time at the precision both databases keep (microseconds), so that an order returned on
/// creation compares equal to the same order read back later.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid_input() -> OrderDetailsInput {
        OrderDetailsInput {
            items: vec!["widget".to_owned()],
            description: "a widget".to_owned(),
            price_cents: 1250,
            destination: "Berlin".to_owned(),
        }
    }

    fn fields(violations: &Violations) -> Vec<&str> {
        violations.iter().map(|v| v.field.as_str()).collect()
    }

    #[test]
    fn accepts_valid_details() {
        let details = OrderDetails::parse(valid_input()).expect("valid input");
        assert_eq!(details.items(), ["widget"]);
        assert_eq!(details.price_cents(), 1250);
    }

    #[test]
    fn reports_every_violation_with_its_path() {
        let input = OrderDetailsInput {
            items: vec!["ok".to_owned(), String::new(), "x".repeat(201)],
            description: "d".repeat(2001),
            price_cents: -1,
            destination: String::new(),
        };
        let violations = OrderDetails::parse(input).expect_err("invalid input");
        assert_eq!(
            fields(&violations),
            [
                "items[1]",
                "items[2]",
                "description",
                "price_cents",
                "destination"
            ]
        );
    }

    #[test]
    fn limits_are_inclusive_and_count_characters_not_bytes() {
        let input = OrderDetailsInput {
            // 200 two-byte characters: 400 bytes, still within the limit.
            items: vec!["é".repeat(MAX_ITEM_CHARS); MAX_ITEMS],
            description: "ß".repeat(MAX_DESCRIPTION_CHARS),
            price_cents: 0,
            destination: "ü".repeat(MAX_DESTINATION_CHARS),
        };
        assert!(OrderDetails::parse(input).is_ok());
    }

    #[test]
    fn rejects_missing_and_too_many_items() {
        let mut input = valid_input();
        input.items.clear();
        assert_eq!(
            fields(&OrderDetails::parse(input).expect_err("no items")),
            ["items"]
        );

        let mut input = valid_input();
        input.items = vec!["a".to_owned(); MAX_ITEMS + 1];
        assert_eq!(
            fields(&OrderDetails::parse(input).expect_err("too many")),
            ["items"]
        );
    }

    #[test]
    fn rejects_nul_characters() {
        let mut input = valid_input();
        input.destination = "Ber\0lin".to_owned();
        assert_eq!(
            fields(&OrderDetails::parse(input).expect_err("NUL")),
            ["destination"]
        );
    }

    #[test]
    fn order_ids_must_be_uuids() {
        assert!(OrderId::parse("not-a-uuid").is_err());
        assert!(OrderId::parse("").is_err());
        let id = OrderId::generate();
        assert_eq!(OrderId::parse(&id.to_string()), Ok(id));
    }

    #[test]
    fn empty_request_id_means_no_idempotency() {
        assert_eq!(RequestId::parse(String::new()), Ok(None));
        assert!(RequestId::parse("r".repeat(MAX_REQUEST_ID_CHARS + 1)).is_err());
        assert!(RequestId::parse("retry-1".to_owned()).is_ok_and(|id| id.is_some()));
    }

    #[test]
    fn violations_nest_under_a_prefix() {
        let mut outer = Violations::new();
        outer.extend_under("order", Violations::one("items[0]", "bad"));
        assert_eq!(fields(&outer), ["order.items[0]"]);
        assert_eq!(outer.to_string(), "order.items[0]: bad");
    }

    proptest::proptest! {
        /// Any input parses into details that keep every rule, or is refused with violations that
        /// each name a field; nothing panics, whatever the text holds.
        #[test]
        fn any_order_input_parses_or_names_each_violation(
            items in proptest::collection::vec(proptest::prelude::any::<String>(), 0..110),
            description in proptest::prelude::any::<String>(),
            price_cents in proptest::prelude::any::<i64>(),
            destination in proptest::prelude::any::<String>(),
        ) {
            let input = OrderDetailsInput { items, description, price_cents, destination };
            match OrderDetails::parse(input) {
                Ok(details) => {
                    proptest::prop_assert!((1..=MAX_ITEMS).contains(&details.items().len()));
                    proptest::prop_assert!(details.price_cents() >= 0);
                    proptest::prop_assert!(!details.destination().is_empty());
                    proptest::prop_assert!(!details.description().contains('\0'));
                }
                Err(violations) => {
                    proptest::prop_assert!(!violations.is_empty());
                    for violation in violations.iter() {
                        let field = violation.field.split('[').next().unwrap_or_default();
                        proptest::prop_assert!(
                            ["items", "description", "price_cents", "destination"].contains(&field),
                            "{}", violation.field
                        );
                    }
                }
            }
        }

        #[test]
        fn any_request_id_parses_or_is_refused(input in proptest::prelude::any::<String>()) {
            let _ = RequestId::parse(input);
        }
    }
}

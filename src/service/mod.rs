//! The `OrderService` handlers: thin. Each converts the request to domain types, calls the
//! store and converts back; errors become statuses in `status.rs`.

mod convert;
mod page_token;

use std::sync::Arc;

use futures::{StreamExt, stream::BoxStream};
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

use crate::{
    api::{
        self, CreateOrderRequest, CreateOrderResponse, GetOrderRequest, GetOrderResponse,
        ListOrdersRequest, ListOrdersResponse, ProcessOrdersRequest, ProcessOrdersResponse,
        SearchOrdersRequest, SearchOrdersResponse, UpdateOrdersRequest, UpdateOrdersResponse,
        order_service_server::{OrderService, OrderServiceServer},
    },
    config::ServiceSettings,
    domain::{Batch, OrderId, OrderStatus, Shipment, ShipmentBatches, Violations},
    error::Error,
    store::OrderStore,
};

/// The scope each method needs when `auth.mode = "jwt"`: reads need `orders.read`, writes
/// `orders.write`. The auth layer checks it before a handler runs; a method missing here cannot be
/// called at all.
pub const METHOD_SCOPES: [(&str, &str); 6] = [
    ("GetOrder", READ),
    ("ListOrders", READ),
    ("SearchOrders", READ),
    ("CreateOrder", WRITE),
    ("UpdateOrders", WRITE),
    ("ProcessOrders", WRITE),
];
const READ: &str = "orders.read";
const WRITE: &str = "orders.write";

pub const DEFAULT_PAGE_SIZE: u32 = 50;
pub const MAX_PAGE_SIZE: u32 = 1000;
pub const MAX_QUERY_CHARS: usize = 200;

/// The implementation of `OrderService`.
#[derive(Clone)]
pub struct OrderApi {
    store: Arc<dyn OrderStore>,
    shipment_batch_size: usize,
    max_updates_per_stream: usize,
}

impl OrderApi {
    pub fn new(store: Arc<dyn OrderStore>, settings: &ServiceSettings) -> Self {
        Self {
            store,
            shipment_batch_size: usize::try_from(settings.shipment_batch_size.get())
                .unwrap_or(usize::MAX),
            max_updates_per_stream: usize::try_from(settings.max_updates_per_stream.get())
                .unwrap_or(usize::MAX),
        }
    }

    pub fn into_server(self) -> OrderServiceServer<Self> {
        OrderServiceServer::new(self)
    }
}

type ResponseStream<T> = BoxStream<'static, Result<T, Status>>;

/// A response stream whose panic ends the call with INTERNAL after the messages it already produced
/// (tonic buffers a few before sending, so a panic caught further out would lose them).
fn guarded<T: Send + 'static>(
    stream: impl futures::Stream<Item = Result<T, Status>> + Send + 'static,
) -> ResponseStream<T> {
    std::panic::AssertUnwindSafe(stream)
        .catch_unwind()
        .map(|item| item.unwrap_or_else(|_panic| Err(platform::status::panicked())))
        .boxed()
}

#[tonic::async_trait]
impl OrderService for OrderApi {
    async fn create_order(
        &self,
        request: Request<CreateOrderRequest>,
    ) -> Result<Response<CreateOrderResponse>, Status> {
        let (details, request_id) =
            convert::create_request(request.into_inner()).map_err(Error::InvalidOrder)?;
        let order = self.store.create(&details, request_id.as_ref()).await?;
        Ok(Response::new(CreateOrderResponse {
            order: Some(order.into()),
        }))
    }

    async fn get_order(
        &self,
        request: Request<GetOrderRequest>,
    ) -> Result<Response<GetOrderResponse>, Status> {
        let id = convert::order_id("id", &request.into_inner().id).map_err(Error::from)?;
        let order = self.store.get(id).await?;
        Ok(Response::new(GetOrderResponse {
            order: Some(order.into()),
        }))
    }

    async fn list_orders(
        &self,
        request: Request<ListOrdersRequest>,
    ) -> Result<Response<ListOrdersResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        let page_size = page_size(request.page_size).unwrap_or_else(|problem| {
            violations.add("page_size", problem);
            DEFAULT_PAGE_SIZE
        });
        let after = if request.page_token.is_empty() {
            None
        } else {
            let cursor = page_token::decode(&request.page_token);
            if cursor.is_none() {
                violations.add(
                    "page_token",
                    "is not a token returned by ListOrders; start again with an empty token",
                );
            }
            cursor
        };
        violations.into_result(()).map_err(Error::from)?;

        let page = self.store.list(after, page_size).await?;
        Ok(Response::new(ListOrdersResponse {
            orders: page.orders.into_iter().map(Into::into).collect(),
            next_page_token: page.next.map(page_token::encode).unwrap_or_default(),
        }))
    }

    type SearchOrdersStream = ResponseStream<SearchOrdersResponse>;

    async fn search_orders(
        &self,
        request: Request<SearchOrdersRequest>,
    ) -> Result<Response<Self::SearchOrdersStream>, Status> {
        let query = request.into_inner().query;
        let chars = query.chars().count();
        if chars > MAX_QUERY_CHARS {
            return Err(Error::from(Violations::one(
                "query",
                format!("must be at most {MAX_QUERY_CHARS} characters, got {chars}"),
            ))
            .into());
        }
        let matches = self.store.search(&query).map(|order| {
            Ok(SearchOrdersResponse {
                order: Some(order?.into()),
            })
        });
        Ok(Response::new(guarded(matches)))
    }

    async fn update_orders(
        &self,
        request: Request<Streaming<UpdateOrdersRequest>>,
    ) -> Result<Response<UpdateOrdersResponse>, Status> {
        let mut messages = request.into_inner();
        // The stream is read whole and then applied in one short transaction: holding a transaction
        // open while waiting on a client would let a slow client block other writers.
        let mut updates = Vec::new();
        while let Some(message) = messages.message().await? {
            let number = updates.len() + 1;
            if number > self.max_updates_per_stream {
                return Err(Error::from(Violations::one(
                    "order",
                    format!(
                        "message {number}: a stream may carry at most {} updates; split it",
                        self.max_updates_per_stream
                    ),
                ))
                .into());
            }
            let update = convert::update_request(message)
                .map_err(|violations| violations.with_context(&format!("message {number}")))
                .map_err(Error::InvalidOrder)?;
            updates.push(update);
        }
        self.store.update(&updates).await?;

        let mut updated_ids: Vec<OrderId> = Vec::with_capacity(updates.len());
        for update in &updates {
            if !updated_ids.contains(&update.id) {
                updated_ids.push(update.id);
            }
        }
        Ok(Response::new(UpdateOrdersResponse {
            updated_ids: updated_ids.iter().map(ToString::to_string).collect(),
        }))
    }

    type ProcessOrdersStream = ResponseStream<ProcessOrdersResponse>;

    async fn process_orders(
        &self,
        request: Request<Streaming<ProcessOrdersRequest>>,
    ) -> Result<Response<Self::ProcessOrdersStream>, Status> {
        let mut requests = request.into_inner();
        let store = Arc::clone(&self.store);
        let mut batches = ShipmentBatches::new(self.shipment_batch_size);
        let shipments = guarded(async_stream::try_stream! {
            while let Some(request) = requests.message().await? {
                let id = convert::order_id("order_id", &request.order_id).map_err(Error::from)?;
                let order = store.get(id).await?;
                if order.status == OrderStatus::Shipped {
                    Err(Error::OrderAlreadyShipped(id))?;
                }
                if batches.contains(id) {
                    Err(Error::OrderRepeatedInStream(id))?;
                }
                if let Some(batch) = batches.add(order.details.destination(), id) {
                    yield ship(store.as_ref(), batch).await?;
                }
            }
            // The client half-closed: ship whatever is left, full or not.
            for batch in batches.flush() {
                yield ship(store.as_ref(), batch).await?;
            }
        });
        Ok(Response::new(shipments))
    }
}

/// AIP-158: 0 means the default, and sizes above the maximum are lowered to it.
fn page_size(requested: i32) -> Result<u32, &'static str> {
    match u32::try_from(requested) {
        Ok(0) => Ok(DEFAULT_PAGE_SIZE),
        Ok(size) => Ok(size.min(MAX_PAGE_SIZE)),
        Err(_) => Err("must not be negative"),
    }
}

async fn ship(store: &dyn OrderStore, batch: Batch) -> Result<ProcessOrdersResponse, Error> {
    let orders = store.ship(&batch.order_ids).await?;
    let shipment = Shipment {
        id: Uuid::new_v4(),
        destination: batch.destination,
        orders,
    };
    Ok(ProcessOrdersResponse {
        shipment: Some(api::Shipment::from(shipment)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_of_the_service_needs_a_scope() {
        let served: Vec<String> = crate::api::served_methods()
            .into_iter()
            .filter(|method| method.service == crate::api::ORDER_SERVICE_NAME)
            .map(|method| method.name)
            .collect();
        let mut scoped: Vec<String> = METHOD_SCOPES
            .iter()
            .map(|(name, _)| (*name).to_owned())
            .collect();
        let mut served_sorted = served.clone();
        served_sorted.sort();
        scoped.sort();
        assert_eq!(scoped, served_sorted);
    }

    #[test]
    fn page_size_defaults_clamps_and_rejects_negatives() {
        assert_eq!(page_size(0), Ok(DEFAULT_PAGE_SIZE));
        assert_eq!(page_size(7), Ok(7));
        assert_eq!(page_size(1000), Ok(1000));
        assert_eq!(page_size(1001), Ok(MAX_PAGE_SIZE));
        assert_eq!(page_size(i32::MAX), Ok(MAX_PAGE_SIZE));
        assert!(page_size(-1).is_err());
    }
}

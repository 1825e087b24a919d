//! The order service's calls through the platform's reference client (`platform::client::Client`):
//! its deadlines, retries, rotation, TLS and tokens, with each method's idempotency.

use platform::client::{CallOptions, Client, Idempotency};
use tonic::Status;

use crate::api::{self, order_service_client::OrderServiceClient};

/// The order service's methods on the reference client: `use app::client::OrderCalls`, then
/// `client.get_order(request, CallOptions::default())`.
pub trait OrderCalls {
    /// Creates an order. A `request_id` is chosen when the request has none, and every retry sends
    /// the same one: the server creates the order once.
    fn create_order(
        &self,
        request: api::CreateOrderRequest,
        options: CallOptions,
    ) -> impl Future<Output = Result<api::CreateOrderResponse, Status>> + Send;

    fn get_order(
        &self,
        request: api::GetOrderRequest,
        options: CallOptions,
    ) -> impl Future<Output = Result<api::GetOrderResponse, Status>> + Send;

    fn list_orders(
        &self,
        request: api::ListOrdersRequest,
        options: CallOptions,
    ) -> impl Future<Output = Result<api::ListOrdersResponse, Status>> + Send;
}

impl OrderCalls for Client {
    async fn create_order(
        &self,
        mut request: api::CreateOrderRequest,
        options: CallOptions,
    ) -> Result<api::CreateOrderResponse, Status> {
        if request.request_id.is_empty() {
            request.request_id = uuid::Uuid::new_v4().to_string();
        }
        self.unary(
            Idempotency::Keyed,
            options,
            request,
            |channel, request| async move {
                OrderServiceClient::new(channel).create_order(request).await
            },
        )
        .await
    }

    async fn get_order(
        &self,
        request: api::GetOrderRequest,
        options: CallOptions,
    ) -> Result<api::GetOrderResponse, Status> {
        self.unary(Idempotency::Read, options, request, |channel, request| {
            async move { OrderServiceClient::new(channel).get_order(request).await }
        })
        .await
    }

    async fn list_orders(
        &self,
        request: api::ListOrdersRequest,
        options: CallOptions,
    ) -> Result<api::ListOrdersResponse, Status> {
        self.unary(
            Idempotency::Read,
            options,
            request,
            |channel, request| async move {
                OrderServiceClient::new(channel).list_orders(request).await
            },
        )
        .await
    }
}

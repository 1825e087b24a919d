//! The limit of this stack, for `bench/baseline.py`: plain tonic serving the service's proto, with
//! GetOrder answered from memory by an Order-shaped message (no database, no layers, no logs or
//! metrics). What the real server spends per GetOrder above this is what its layers and its store cost.
//!
//! `cargo run --release --example bare-server -- 127.0.0.1:50052`

use std::net::SocketAddr;

use anyhow::Context;
use app::api::{
    self,
    order_service_server::{OrderService, OrderServiceServer},
};
use futures::stream::BoxStream;
use tonic::{Request, Response, Status, Streaming};

struct Bare {
    order: api::Order,
}

#[tonic::async_trait]
impl OrderService for Bare {
    async fn get_order(
        &self,
        request: Request<api::GetOrderRequest>,
    ) -> Result<Response<api::GetOrderResponse>, Status> {
        let mut order = self.order.clone();
        order.id = request.into_inner().id;
        Ok(Response::new(api::GetOrderResponse { order: Some(order) }))
    }

    async fn create_order(
        &self,
        _: Request<api::CreateOrderRequest>,
    ) -> Result<Response<api::CreateOrderResponse>, Status> {
        Err(get_order_only())
    }

    async fn list_orders(
        &self,
        _: Request<api::ListOrdersRequest>,
    ) -> Result<Response<api::ListOrdersResponse>, Status> {
        Err(get_order_only())
    }

    type SearchOrdersStream = BoxStream<'static, Result<api::SearchOrdersResponse, Status>>;

    async fn search_orders(
        &self,
        _: Request<api::SearchOrdersRequest>,
    ) -> Result<Response<Self::SearchOrdersStream>, Status> {
        Err(get_order_only())
    }

    async fn update_orders(
        &self,
        _: Request<Streaming<api::UpdateOrdersRequest>>,
    ) -> Result<Response<api::UpdateOrdersResponse>, Status> {
        Err(get_order_only())
    }

    type ProcessOrdersStream = BoxStream<'static, Result<api::ProcessOrdersResponse, Status>>;

    async fn process_orders(
        &self,
        _: Request<Streaming<api::ProcessOrdersRequest>>,
    ) -> Result<Response<Self::ProcessOrdersStream>, Status> {
        Err(get_order_only())
    }
}

fn get_order_only() -> Status {
    Status::unimplemented("the bare server answers GetOrder only")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:50052".to_owned())
        .parse()
        .context("usage: bare-server [host:port]")?;
    let now = prost_types::Timestamp {
        seconds: 1_764_000_000,
        nanos: 0,
    };
    // What the baseline's seeded orders hold, so the reply is the size of the real server's.
    let order = api::Order {
        id: String::new(),
        items: vec!["widget".to_owned(), "gadget".to_owned()],
        description: "benchmark order 0123456789abcdef0123456789abcdef".to_owned(),
        price_cents: 1250,
        destination: "Oslo".to_owned(),
        status: api::OrderStatus::Pending.into(),
        create_time: Some(now),
        update_time: Some(now),
    };
    eprintln!("bare-server listening on {addr}");
    tonic::transport::Server::builder()
        .add_service(OrderServiceServer::new(Bare { order }))
        .serve_with_shutdown(addr, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

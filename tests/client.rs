//! The reference client (`platform::client`, with the API's calls from `app::client`) against servers in this process on loopback ports: it
//! honours the server's pushback, and it takes a dead address out of its rotation and retries
//! elsewhere. (Its rolling restart across real processes is in `tests/binary.rs`.)

mod common;

use std::time::Duration;

use app::{api, client::OrderCalls};
use common::{TcpServer, order_to};
use platform::{
    client::{CallOptions, Client},
    config::ClientSettings,
};
use tonic::Code;

fn create_request() -> api::CreateOrderRequest {
    api::CreateOrderRequest {
        order: Some(order_to("Oslo")),
        request_id: String::new(),
    }
}

#[tokio::test]
async fn calls_over_the_rate_limit_wait_for_the_servers_pushback_and_succeed() {
    let server = TcpServer::start(|settings| {
        settings.platform.server.rate_limit.per_second = 5;
        settings.platform.server.rate_limit.burst = 1;
    })
    .await;

    // A plain client is refused at once: the second call within 200ms is over the rate.
    let mut plain = api::order_service_client::OrderServiceClient::new(
        server
            .connect(server.plaintext_endpoint())
            .await
            .expect("connects"),
    );
    let mut refused = None;
    for _ in 0..3 {
        if let Err(status) = plain.create_order(create_request()).await {
            refused = Some(status);
            break;
        }
    }
    let refused = refused.expect("a burst of 1 refuses the next call");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.metadata().contains_key("grpc-retry-pushback-ms"));

    // The reference client waits as long as the server says, and every call goes through.
    let client = Client::new(&ClientSettings {
        targets: vec![server.addr.to_string()],
        ..ClientSettings::default()
    })
    .await
    .expect("client");
    for _ in 0..5 {
        let created = client
            .create_order(create_request(), CallOptions::default())
            .await
            .expect("retried after the pushback");
        assert!(created.order.is_some());
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_dead_address_is_left_out_and_its_calls_go_to_the_live_one() {
    let server = TcpServer::start(|_| {}).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port, closed again");
    let client = Client::new(&ClientSettings {
        targets: vec![dead.to_string(), server.addr.to_string()],
        ..ClientSettings::default()
    })
    .await
    .expect("client");
    assert_eq!(client.addresses().len(), 2);
    for _ in 0..20 {
        let created = client
            .create_order(create_request(), CallOptions::default())
            .await
            .expect("no call fails while one address is alive")
            .order
            .expect("order");
        let read = client
            .get_order(
                api::GetOrderRequest {
                    id: created.id.clone(),
                },
                CallOptions {
                    timeout: Some(Duration::from_secs(2)),
                },
            )
            .await
            .expect("read back");
        assert_eq!(read.order, Some(created));
    }

    // Errors that retrying cannot fix come back at once, unretried.
    let invalid = client
        .get_order(
            api::GetOrderRequest { id: "bad".into() },
            CallOptions::default(),
        )
        .await
        .expect_err("invalid id");
    assert_eq!(invalid.code(), Code::InvalidArgument);
    server.shutdown().await;
}

//! The reference client in use: `cargo run --example client` against a running server (`cargo run`
//! in another terminal). It reads the same configuration as the server (`[client]` in
//! `config/default.toml`, `APP_CLIENT__*`), creates an order and reads it back.
//!
//! Try `APP_CLIENT__TARGETS='["127.0.0.1:50051","127.0.0.1:50052"]'` with two servers, and stop one
//! while this runs in a loop (`-- --repeat 1000`): the calls move to the other without failing.

use anyhow::Context;
use app::{api, client::OrderCalls, config::Settings};
use platform::client::{CallOptions, Client};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let repeat: u32 = match std::env::args().skip_while(|arg| arg != "--repeat").nth(1) {
        Some(count) => count.parse().context("--repeat takes a number")?,
        None => 1,
    };
    let settings = Settings::load(None)?;
    // One client for the whole program: it holds the connections, the rotation and the retry budget.
    let client = Client::new(&settings.platform.client).await?;
    for _ in 0..repeat {
        let created = client
            .create_order(
                api::CreateOrderRequest {
                    order: Some(api::Order {
                        items: vec!["widget".into()],
                        description: "from the reference client".into(),
                        price_cents: 1250,
                        destination: "Oslo".into(),
                        ..Default::default()
                    }),
                    // Left empty, the client picks one; every retry of this call sends the same.
                    request_id: String::new(),
                },
                CallOptions::default(),
            )
            .await?
            .order
            .context("the server returned no order")?;
        let read = client
            .get_order(
                api::GetOrderRequest {
                    id: created.id.clone(),
                },
                // A tighter deadline for this one call than client.timeout.
                CallOptions {
                    timeout: Some(std::time::Duration::from_secs(1)),
                },
            )
            .await?;
        println!(
            "created and read order {}",
            read.order.map(|order| order.id).unwrap_or_default()
        );
    }
    Ok(())
}

//! Every OrderService RPC through the full in-memory gRPC stack, on SQLite and on PostgreSQL.

mod common;

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use app::{
    api::{
        self, CreateOrderRequest, ListOrdersRequest, OrderStatus, ProcessOrdersRequest,
        SearchOrdersRequest, UpdateOrdersRequest, order_service_client::OrderServiceClient,
    },
    domain::{Order, OrderDetails, OrderId, OrderUpdate, RequestId},
    store::{OrderStore, OrderStream, Page, PageCursor},
};
use common::{Backend, TestApp, order_to, search_and_take_one, test_settings, violated_fields};
use futures::{StreamExt, TryStreamExt, stream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request};

backend_tests!(
    create_assigns_id_status_and_times,
    create_ignores_output_only_fields,
    create_rejects_invalid_orders_with_field_violations_and_stores_nothing,
    create_with_a_used_request_id_returns_the_original_order,
    concurrent_retries_with_one_request_id_create_one_order,
    get_distinguishes_unknown_and_malformed_ids,
    list_pages_through_orders_in_creation_order,
    list_uses_the_default_page_size_for_zero,
    list_rejects_garbage_tokens_and_negative_sizes,
    paging_while_orders_are_added_never_skips_or_repeats,
    search_matches_items_and_description_ignoring_case,
    search_takes_wildcards_literally_and_matches_within_one_item,
    search_streams_rows_as_the_client_reads_them,
    search_rejects_overlong_queries,
    update_applies_every_message_of_the_stream,
    update_rolls_back_the_whole_stream_on_an_unknown_id,
    update_rolls_back_the_whole_stream_on_an_invalid_message,
    update_refuses_shipped_orders,
    client_deadline_aborts_an_update_stream_without_applying_it,
    process_sends_full_batches_at_once_and_flushes_the_rest_on_half_close,
    process_rejects_unknown_malformed_and_already_shipped_orders,
);

async fn create_assigns_id_status_and_times(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let created = app.create_for("Oslo").await;

    assert!(
        uuid::Uuid::try_parse(&created.id).is_ok(),
        "id {:?}",
        created.id
    );
    assert_eq!(created.status(), OrderStatus::Pending);
    assert_eq!(created.items, ["widget", "gadget"]);
    assert_eq!(created.price_cents, 4200);
    assert!(created.create_time.is_some());
    assert_eq!(created.create_time, created.update_time);

    assert_eq!(app.get(&created.id).await.expect("get"), created);
}

async fn create_ignores_output_only_fields(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let chosen_id = uuid::Uuid::new_v4().to_string();
    let created = app
        .create(api::Order {
            id: chosen_id.clone(),
            status: OrderStatus::Shipped.into(),
            create_time: Some(prost_types::Timestamp {
                seconds: 1,
                nanos: 0,
            }),
            ..order_to("Oslo")
        })
        .await;
    assert_ne!(created.id, chosen_id);
    assert_eq!(created.status(), OrderStatus::Pending);
    assert_ne!(created.create_time.map(|t| t.seconds), Some(1));
}

async fn create_rejects_invalid_orders_with_field_violations_and_stores_nothing(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let cases: Vec<(api::Order, Vec<&str>)> = vec![
        (
            api::Order {
                items: vec![],
                ..order_to("Oslo")
            },
            vec!["order.items"],
        ),
        (
            api::Order {
                items: vec!["fine".into(), "".into(), "x".repeat(201)],
                ..order_to("Oslo")
            },
            vec!["order.items[1]", "order.items[2]"],
        ),
        (
            api::Order {
                items: vec!["a".into(); 101],
                ..order_to("Oslo")
            },
            vec!["order.items"],
        ),
        (
            api::Order {
                price_cents: -1,
                description: "d".repeat(2001),
                ..order_to("")
            },
            vec![
                "order.description",
                "order.price_cents",
                "order.destination",
            ],
        ),
        (order_to(&"x".repeat(201)), vec!["order.destination"]),
    ];
    for (order, expected) in cases {
        let status = app
            .orders
            .clone()
            .create_order(CreateOrderRequest {
                order: Some(order),
                request_id: String::new(),
            })
            .await
            .expect_err("invalid order is rejected");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(violated_fields(&status), expected);
    }

    let status = app
        .orders
        .clone()
        .create_order(CreateOrderRequest::default())
        .await
        .expect_err("an order is required");
    assert_eq!(violated_fields(&status), ["order"]);

    assert!(app.list_all().await.is_empty(), "nothing was stored");
}

async fn create_with_a_used_request_id_returns_the_original_order(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let request = |destination: &str| CreateOrderRequest {
        order: Some(order_to(destination)),
        request_id: "checkout-42".to_owned(),
    };
    let mut client = app.orders.clone();
    let first = client.create_order(request("Oslo")).await.expect("first");
    let retry = client.create_order(request("Oslo")).await.expect("retry");
    assert_eq!(first.into_inner(), retry.into_inner());

    // A different key is a different order.
    let other = client
        .create_order(CreateOrderRequest {
            request_id: "checkout-43".to_owned(),
            ..request("Oslo")
        })
        .await
        .expect("other key");
    assert_eq!(app.list_all().await.len(), 2, "{other:?}");
}

async fn concurrent_retries_with_one_request_id_create_one_order(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let retries = (0..16).map(|_| {
        let mut client = app.orders.clone();
        tokio::spawn(async move {
            client
                .create_order(CreateOrderRequest {
                    order: Some(order_to("Oslo")),
                    request_id: "same-key".to_owned(),
                })
                .await
                .map(|response| response.into_inner().order.expect("order").id)
        })
    });
    let ids: HashSet<String> = futures::future::join_all(retries)
        .await
        .into_iter()
        .map(|joined| joined.expect("task").expect("create"))
        .collect();
    assert_eq!(ids.len(), 1, "every retry returns the same order: {ids:?}");
    assert_eq!(app.list_all().await.len(), 1);
}

async fn get_distinguishes_unknown_and_malformed_ids(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let unknown = app
        .get(&uuid::Uuid::new_v4().to_string())
        .await
        .expect_err("unknown id");
    assert_eq!(unknown.code(), Code::NotFound);

    for malformed in ["", "42", "not-a-uuid"] {
        let status = app.get(malformed).await.expect_err("malformed id");
        assert_eq!(status.code(), Code::InvalidArgument, "{malformed:?}");
        assert_eq!(violated_fields(&status), ["id"]);
    }
}

async fn list_pages_through_orders_in_creation_order(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let mut created = Vec::new();
    for n in 0..7 {
        created.push(app.create_for(&format!("city {n}")).await.id);
    }

    let pages: Vec<Vec<String>> = app
        .list_pages(3)
        .await
        .into_iter()
        .map(|page| page.into_iter().map(|o| o.id).collect())
        .collect();
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, [3, 3, 1]);
    assert_eq!(pages.concat(), created);
}

async fn list_uses_the_default_page_size_for_zero(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    for _ in 0..51 {
        app.create_for("Oslo").await;
    }
    let page = app
        .orders
        .clone()
        .list_orders(ListOrdersRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(page.orders.len(), 50);
    assert!(!page.next_page_token.is_empty());
}

async fn list_rejects_garbage_tokens_and_negative_sizes(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    for (request, field) in [
        (
            ListOrdersRequest {
                page_size: 10,
                page_token: "garbage".to_owned(),
            },
            "page_token",
        ),
        (
            ListOrdersRequest {
                page_size: -1,
                page_token: String::new(),
            },
            "page_size",
        ),
    ] {
        let status = app
            .orders
            .clone()
            .list_orders(request)
            .await
            .expect_err("rejected");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(violated_fields(&status), [field]);
    }
}

async fn paging_while_orders_are_added_never_skips_or_repeats(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let mut before = Vec::new();
    for _ in 0..10 {
        before.push(app.create_for("before").await.id);
    }
    // Writers add orders from several tasks at once while a reader pages through.
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let mut client = app.orders.clone();
            tokio::spawn(async move {
                for _ in 0..15 {
                    client
                        .create_order(CreateOrderRequest {
                            order: Some(order_to("during")),
                            request_id: String::new(),
                        })
                        .await
                        .expect("concurrent create");
                }
            })
        })
        .collect();

    let seen: Vec<String> = app
        .list_pages(4)
        .await
        .concat()
        .into_iter()
        .map(|o| o.id)
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }

    let all: Vec<String> = app.list_all().await.into_iter().map(|o| o.id).collect();
    assert_eq!(all.len(), 70);
    // The keyset guarantee: no order twice, none committed before paging began left out, and all of
    // it in creation order. An order created while paging may or may not be seen.
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "an order was listed twice");
    assert!(
        seen.len() >= before.len(),
        "orders from before paging were skipped"
    );
    assert_eq!(
        seen[..before.len()],
        before,
        "an order from before paging was skipped"
    );
    let mut in_creation_order = all.iter().filter(|id| unique.contains(id));
    assert!(
        seen.iter().all(|id| in_creation_order.next() == Some(id)),
        "pages out of creation order"
    );
}

async fn search_matches_items_and_description_ignoring_case(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let create = |item: &str, description: &str| {
        app.create(api::Order {
            items: vec![item.to_owned()],
            description: description.to_owned(),
            ..order_to("Oslo")
        })
    };
    let by_item = create("Blue WIDGET", "plain").await;
    let by_description = create("lamp", "comes with a widget").await;
    let unicode = create("ÄPFEL", "obst").await;
    let other = create("chair", "wooden").await;

    let search = |query: &str| {
        let mut client = app.orders.clone();
        let query = query.to_owned();
        async move {
            client
                .search_orders(SearchOrdersRequest { query })
                .await
                .expect("search starts")
                .into_inner()
                .map_ok(|response| response.order.expect("order").id)
                .try_collect::<Vec<_>>()
                .await
                .expect("search completes")
        }
    };
    assert_eq!(
        search("widget").await,
        [by_item.id.clone(), by_description.id]
    );
    assert_eq!(search("äpfel").await, [unicode.id]);
    assert_eq!(search("WOODEN").await, [other.id]);
    assert!(search("no such thing").await.is_empty());
    assert_eq!(
        search("").await.len(),
        4,
        "an empty query matches everything"
    );
}

async fn search_takes_wildcards_literally_and_matches_within_one_item(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let create = |items: &[&str], description: &str| {
        app.create(api::Order {
            items: items.iter().map(|item| (*item).to_owned()).collect(),
            description: description.to_owned(),
            ..order_to("Oslo")
        })
    };
    let percent = create(&["widget"], "50% off").await;
    let underscore = create(&["snake_case"], "plain").await;
    let backslash = create(&[r"back\slash"], "plain").await;
    let _two_items = create(&["first", "second"], "plain").await;
    let search = |query: &str| {
        let mut client = app.orders.clone();
        let query = query.to_owned();
        async move {
            client
                .search_orders(SearchOrdersRequest { query })
                .await
                .expect("search starts")
                .into_inner()
                .map_ok(|response| response.order.expect("order").id)
                .try_collect::<Vec<_>>()
                .await
                .expect("search completes")
        }
    };
    // `%`, `_` and `\` are text, not LIKE wildcards or escapes.
    assert_eq!(search("0% o").await, [percent.id]);
    assert_eq!(search("e_c").await, [underscore.id]);
    assert!(search("a_e").await.is_empty());
    assert_eq!(search(r"k\s").await, [backslash.id]);
    // A match may not span two items.
    assert!(search("first\nsecond").await.is_empty());
    assert!(search("stsec").await.is_empty());
}

async fn search_streams_rows_as_the_client_reads_them(backend: Backend) {
    let rows_read = Arc::new(AtomicUsize::new(0));
    let Some(app) = TestApp::spawn_wrapping(backend, |store| {
        Arc::new(CountingSearches {
            inner: store,
            rows_read: Arc::clone(&rows_read),
        })
    })
    .await
    else {
        return;
    };
    // 400 orders of about 2 KB each, 800 KB in all, for a client that lets the server send 64 KiB
    // (HTTP/2's smallest stream and connection windows) before it reads: more than ten windows.
    const ORDERS: usize = 400;
    const WINDOW: u32 = 65_535;
    for n in 0..ORDERS {
        app.create(api::Order {
            description: format!("bulk order {n} {}", "x".repeat(1950)),
            ..order_to("Oslo")
        })
        .await;
    }
    let mut client = OrderServiceClient::new(
        app.channel_with(|endpoint| {
            endpoint
                .initial_stream_window_size(WINDOW)
                .initial_connection_window_size(WINDOW)
        })
        .await,
    );

    let mut matches = search_and_take_one(&mut client, "BULK ORDER").await;
    // The client reads nothing more for now. A server that streams stops reading rows once the window
    // is full; one that collects the whole result first reads all of them.
    let read_ahead = rows_read_once_settled(&rows_read).await;
    assert!(
        read_ahead < ORDERS / 2,
        "the server read {read_ahead} of {ORDERS} rows for a client that had taken one"
    );
    let mut count = 1;
    while let Some(response) = matches.message().await.expect("stream continues") {
        assert!(response.order.is_some());
        count += 1;
    }
    assert_eq!(count, ORDERS);

    // Clients that walk away mid-stream, more of them than the pool has connections: each abandoned
    // search gives its connection back, so the service still answers.
    for _ in 0..2 * test_settings().database.max_connections.get() {
        drop(search_and_take_one(&mut client, "bulk").await);
    }
    assert_eq!(app.list_all().await.len(), ORDERS);
}

/// The number of rows searches have read, once it has stopped growing (or after ten seconds).
async fn rows_read_once_settled(rows_read: &AtomicUsize) -> usize {
    let mut last = rows_read.load(Ordering::SeqCst);
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = rows_read.load(Ordering::SeqCst);
        if now == last {
            break;
        }
        last = now;
    }
    last
}

/// A store that counts the rows its searches hand to the service.
struct CountingSearches {
    inner: Arc<dyn OrderStore>,
    rows_read: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl OrderStore for CountingSearches {
    async fn create(
        &self,
        details: &OrderDetails,
        request_id: Option<&RequestId>,
    ) -> app::error::Result<Order> {
        self.inner.create(details, request_id).await
    }

    async fn get(&self, id: OrderId) -> app::error::Result<Order> {
        self.inner.get(id).await
    }

    async fn list(&self, after: Option<PageCursor>, page_size: u32) -> app::error::Result<Page> {
        self.inner.list(after, page_size).await
    }

    fn search(&self, query: &str) -> OrderStream {
        let rows_read = Arc::clone(&self.rows_read);
        self.inner
            .search(query)
            .inspect(move |_| {
                rows_read.fetch_add(1, Ordering::SeqCst);
            })
            .boxed()
    }

    async fn update(&self, updates: &[OrderUpdate]) -> app::error::Result<()> {
        self.inner.update(updates).await
    }

    async fn ship(&self, ids: &[OrderId]) -> app::error::Result<Vec<Order>> {
        self.inner.ship(ids).await
    }

    async fn migrate(&self) -> app::error::Result<()> {
        self.inner.migrate().await
    }

    async fn check_ready(&self) -> app::error::Result<()> {
        self.inner.check_ready().await
    }

    fn system(&self) -> &'static str {
        self.inner.system()
    }

    fn pool_status(&self) -> platform::telemetry::metrics::PoolStatus {
        self.inner.pool_status()
    }

    async fn close(&self) {
        self.inner.close().await;
    }
}

async fn search_rejects_overlong_queries(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let status = app
        .orders
        .clone()
        .search_orders(SearchOrdersRequest {
            query: "q".repeat(201),
        })
        .await
        .expect_err("too long");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["query"]);
}

fn update_of(order: &api::Order, destination: &str) -> UpdateOrdersRequest {
    UpdateOrdersRequest {
        order: Some(api::Order {
            id: order.id.clone(),
            items: vec!["replacement".into()],
            description: "changed".into(),
            price_cents: 999,
            destination: destination.into(),
            ..Default::default()
        }),
    }
}

async fn update_applies_every_message_of_the_stream(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let first = app.create_for("Oslo").await;
    let second = app.create_for("Rome").await;
    let response = app
        .orders
        .clone()
        .update_orders(stream::iter([
            update_of(&first, "Lima"),
            update_of(&second, "Kyiv"),
            update_of(&first, "Quito"),
        ]))
        .await
        .expect("update")
        .into_inner();
    assert_eq!(response.updated_ids, [first.id.clone(), second.id.clone()]);

    let updated = app.get(&first.id).await.expect("get");
    assert_eq!(updated.destination, "Quito", "later messages win");
    assert_eq!(updated.items, ["replacement"]);
    assert_eq!(updated.price_cents, 999);
    assert_eq!(updated.create_time, first.create_time);
    let seconds_and_nanos = |t: Option<prost_types::Timestamp>| t.map(|t| (t.seconds, t.nanos));
    assert!(seconds_and_nanos(updated.update_time) >= seconds_and_nanos(first.update_time));
    assert_eq!(app.get(&second.id).await.expect("get").destination, "Kyiv");
}

async fn update_rolls_back_the_whole_stream_on_an_unknown_id(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let existing = app.create_for("Oslo").await;
    let unknown = api::Order {
        id: uuid::Uuid::new_v4().to_string(),
        ..Default::default()
    };
    let status = app
        .orders
        .clone()
        .update_orders(stream::iter([
            update_of(&existing, "Lima"),
            update_of(&unknown, "Rome"),
        ]))
        .await
        .expect_err("unknown id");
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(app.get(&existing.id).await.expect("get"), existing);
}

async fn update_rolls_back_the_whole_stream_on_an_invalid_message(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let existing = app.create_for("Oslo").await;
    let mut invalid = update_of(&existing, "Rome");
    if let Some(order) = invalid.order.as_mut() {
        order.price_cents = -5;
    }
    let status = app
        .orders
        .clone()
        .update_orders(stream::iter([update_of(&existing, "Lima"), invalid]))
        .await
        .expect_err("invalid message");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["order.price_cents"]);
    assert!(
        status.message().contains("message 2"),
        "{}",
        status.message()
    );
    assert_eq!(app.get(&existing.id).await.expect("get"), existing);
}

async fn update_refuses_shipped_orders(backend: Backend) {
    let Some(app) = TestApp::spawn_with(backend, |settings| {
        settings.service.shipment_batch_size = 1.try_into().expect("non-zero");
    })
    .await
    else {
        return;
    };
    let order = app.create_for("Oslo").await;
    let shipped = ship(&app, &[order.id.as_str()]).await.expect("shipped");
    assert_eq!(shipped.len(), 1);

    let status = app
        .orders
        .clone()
        .update_orders(stream::iter([update_of(&order, "Lima")]))
        .await
        .expect_err("shipped orders are final");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(app.get(&order.id).await.expect("get").destination, "Oslo");
}

async fn client_deadline_aborts_an_update_stream_without_applying_it(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let order = app.create_for("Oslo").await;
    // One update, then the client neither sends more nor half-closes: the deadline ends the call.
    let (sender, receiver) = mpsc::channel(1);
    sender
        .send(update_of(&order, "Lima"))
        .await
        .expect("queue update");
    let mut request = Request::new(ReceiverStream::new(receiver));
    request.set_timeout(Duration::from_millis(200));
    // tonic's Channel would give up on its own at the deadline and then half-close the stream when
    // `sender` drops, racing the server; this client waits for the server's answer.
    let status = app
        .orders_without_client_deadlines()
        .await
        .update_orders(request)
        .await
        .expect_err("deadline exceeded");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    drop(sender);
    assert_eq!(app.get(&order.id).await.expect("get"), order);
}

/// Sends `ids` on one ProcessOrders stream, half-closes, and returns every shipment.
async fn ship(app: &TestApp, ids: &[&str]) -> Result<Vec<api::Shipment>, tonic::Status> {
    let requests: Vec<ProcessOrdersRequest> = ids
        .iter()
        .map(|id| ProcessOrdersRequest {
            order_id: (*id).to_owned(),
        })
        .collect();
    app.orders
        .clone()
        .process_orders(stream::iter(requests))
        .await?
        .into_inner()
        .map_ok(|response| response.shipment.expect("shipment"))
        .try_collect()
        .await
}

async fn process_sends_full_batches_at_once_and_flushes_the_rest_on_half_close(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let oslo: Vec<api::Order> =
        futures::future::join_all((0..3).map(|_| app.create_for("Oslo"))).await;
    let rome: Vec<api::Order> =
        futures::future::join_all((0..2).map(|_| app.create_for("Rome"))).await;

    let (requests, receiver) = mpsc::channel(8);
    let mut shipments = app
        .orders
        .clone()
        .process_orders(ReceiverStream::new(receiver))
        .await
        .expect("process starts")
        .into_inner();
    let send = |id: &str| {
        requests.send(ProcessOrdersRequest {
            order_id: id.to_owned(),
        })
    };
    for id in [&oslo[0].id, &rome[0].id, &oslo[1].id, &oslo[2].id] {
        send(id).await.expect("send");
    }

    // Oslo has a full batch: it arrives while the stream is still open.
    let full = shipments
        .message()
        .await
        .expect("stream continues")
        .and_then(|response| response.shipment)
        .expect("a full batch ships before half-close");
    assert_eq!(full.destination, "Oslo");
    let ids: Vec<&str> = full.orders.iter().map(|o| o.id.as_str()).collect();
    assert_eq!(ids, [&oslo[0].id, &oslo[1].id, &oslo[2].id]);
    assert!(
        full.orders
            .iter()
            .all(|o| o.status() == OrderStatus::Shipped)
    );
    assert!(uuid::Uuid::try_parse(&full.id).is_ok());

    send(&rome[1].id).await.expect("send");
    drop(requests); // half-close: Rome's partial batch is flushed
    let flushed = shipments
        .message()
        .await
        .expect("stream continues")
        .and_then(|response| response.shipment)
        .expect("partial batch flushed");
    assert_eq!(flushed.destination, "Rome");
    assert_eq!(flushed.orders.len(), 2);
    assert!(shipments.message().await.expect("clean end").is_none());

    for order in oslo.iter().chain(&rome) {
        let stored = app.get(&order.id).await.expect("get");
        assert_eq!(stored.status(), OrderStatus::Shipped);
    }
}

async fn process_rejects_unknown_malformed_and_already_shipped_orders(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let unknown = uuid::Uuid::new_v4().to_string();
    let status = ship(&app, &[&unknown]).await.expect_err("unknown");
    assert_eq!(status.code(), Code::NotFound);

    let status = ship(&app, &["not-an-id"]).await.expect_err("malformed");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["order_id"]);

    let order = app.create_for("Oslo").await;
    let status = ship(&app, &[&order.id, &order.id])
        .await
        .expect_err("same order twice");
    assert_eq!(status.code(), Code::FailedPrecondition);

    let shipped = ship(&app, &[&order.id]).await.expect("ships");
    assert_eq!(shipped.len(), 1);
    let status = ship(&app, &[&order.id]).await.expect_err("already shipped");
    assert_eq!(status.code(), Code::FailedPrecondition);
}

/// SearchOrders on PostgreSQL can be answered from the pg_trgm indexes. With sequential and plain index
/// scans priced out, a plan that reads no trigram index would have to scan the table.
#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_search_can_use_the_trigram_indexes() {
    use sqlx::Connection;

    let Some(app) = TestApp::spawn(Backend::Postgres).await else {
        return;
    };
    app.create_for("Oslo").await;
    let options = app.postgres_options().expect("a PostgreSQL app");
    let mut session = sqlx::PgConnection::connect_with(&options)
        .await
        .expect("connect");
    for setting in ["SET enable_seqscan = off", "SET enable_indexscan = off"] {
        sqlx::query(setting)
            .execute(&mut session)
            .await
            .expect(setting);
    }
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN {}",
        app::store::PostgresStore::SEARCH_SQL
    )))
    .bind("%widget%")
    .fetch_all(&mut session)
    .await
    .expect("explain");
    let plan = plan.join("\n");
    assert!(plan.contains("orders_description_trgm"), "{plan}");
    assert!(plan.contains("orders_items_trgm"), "{plan}");
    assert!(!plan.contains("Seq Scan on orders"), "{plan}");
}

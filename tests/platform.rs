//! What surrounds the API: health from real database state, reflection, graceful shutdown.

mod common;

use app::{
    api::ORDER_SERVICE_NAME,
    api::{self, UpdateOrdersRequest},
};
use common::{Backend, TestApp, order_to};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
use tonic_reflection::pb::{v1, v1alpha};

backend_tests!(
    health_reports_serving_for_the_server_and_the_order_service,
    health_waits_for_migrations_before_serving,
    serve_applies_migrations_when_configured_to,
    shutdown_reports_not_serving_and_lets_running_calls_finish,
);

async fn health_reports_serving_for_the_server_and_the_order_service(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    assert_eq!(
        app.health_status("").await.ok(),
        Some(ServingStatus::Serving)
    );
    assert_eq!(
        app.health_status(ORDER_SERVICE_NAME).await.ok(),
        Some(ServingStatus::Serving)
    );
    assert!(ORDER_SERVICE_NAME.ends_with(".OrderService"));
    let unknown = app
        .health_status("no.such.Service")
        .await
        .expect_err("unknown service");
    assert_eq!(unknown.code(), Code::NotFound);
}

async fn health_waits_for_migrations_before_serving(backend: Backend) {
    // Migrations are someone else's job (the `migrate` command), and nobody has run them yet.
    let Some(app) = TestApp::start(backend, |s| s.database.migrate = false, false).await else {
        return;
    };
    assert!(
        app.store.check_ready().await.is_err(),
        "an unmigrated database is not ready"
    );
    // Alive, not ready: restarting the process would not run the migrations.
    assert_eq!(
        app.health_status("").await.ok(),
        Some(ServingStatus::Serving)
    );
    assert_eq!(
        app.health_status(ORDER_SERVICE_NAME).await.ok(),
        Some(ServingStatus::NotServing)
    );

    app.store.migrate().await.expect("migrate");
    app.wait_for_status(ORDER_SERVICE_NAME, ServingStatus::Serving)
        .await;
}

async fn serve_applies_migrations_when_configured_to(backend: Backend) {
    let Some(app) = TestApp::start(backend, |s| s.database.migrate = true, false).await else {
        return;
    };
    app.wait_for_status(ORDER_SERVICE_NAME, ServingStatus::Serving)
        .await;
    let created = app.create_for("Oslo").await;
    assert_eq!(app.get(&created.id).await.expect("get"), created);
}

async fn shutdown_reports_not_serving_and_lets_running_calls_finish(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let order = app.create_for("Oslo").await;

    // A call in flight when shutdown starts: a client stream that has not finished sending.
    let (updates, receiver) = mpsc::channel(1);
    let mut client = app.orders.clone();
    let in_flight = tokio::spawn(async move {
        client
            .update_orders(ReceiverStream::new(receiver))
            .await
            .map(|response| response.into_inner().updated_ids)
    });
    let mut watch = app
        .health
        .clone()
        .watch(HealthCheckRequest::default())
        .await
        .expect("watch")
        .into_inner();
    assert_eq!(
        watch.message().await.expect("watch").map(|r| r.status()),
        Some(ServingStatus::Serving)
    );

    let store = std::sync::Arc::clone(&app.store);
    let stopped = tokio::spawn(app.shutdown());

    assert_eq!(
        watch.message().await.expect("watch").map(|r| r.status()),
        Some(ServingStatus::NotServing),
        "readiness drops as soon as shutdown starts"
    );
    drop(watch); // a watch never ends by itself; a real client goes away when told NOT_SERVING

    updates
        .send(UpdateOrdersRequest {
            order: Some(api::Order {
                id: order.id.clone(),
                ..order_to("Lima")
            }),
        })
        .await
        .expect("send");
    drop(updates);
    assert_eq!(
        in_flight
            .await
            .expect("task")
            .expect("in-flight call finishes"),
        std::slice::from_ref(&order.id)
    );
    stopped
        .await
        .expect("server task")
        .expect("server stops cleanly");
    assert!(
        store.check_ready().await.is_err(),
        "the pool is closed after shutdown"
    );
}

/// Health and errors while PostgreSQL cannot be reached: never reached at all, or lost and regained.
#[cfg(feature = "postgres")]
mod database_outages {
    use std::{net::SocketAddr, str::FromStr, sync::Arc, time::Duration};

    use app::{
        api::ORDER_SERVICE_NAME,
        config::DatabaseUrl,
        store::{self, OrderStore, PostgresStore},
    };
    use tokio::{
        net::{TcpListener, TcpStream},
        sync::watch,
        task::JoinHandle,
    };
    use tonic::Code;
    use tonic_health::pb::health_check_response::ServingStatus;

    use app::api;

    use crate::common::{TestApp, TestDatabase, logs, test_settings};

    #[tokio::test]
    async fn health_is_not_serving_and_calls_are_unavailable_while_the_database_is_unreachable() {
        let mut settings = test_settings();
        // Nothing listens on port 1: every connection attempt is refused.
        settings.database.url =
            DatabaseUrl::from_str("postgres://postgres@127.0.0.1:1/test").expect("URL");
        settings.database.acquire_timeout = Duration::from_millis(300);
        settings.database.connect_timeout = Duration::from_millis(300);
        let store = store::connect(&settings.database, &Default::default()).expect("lazy store");
        assert!(store.check_ready().await.is_err());

        let application = app::server::with_store(Arc::clone(&store), &settings)
            .await
            .expect("builds without a database");
        let app = TestApp::serve_application(application, store).await;
        // Alive (a restart would not bring the database), not ready.
        assert_eq!(
            app.health_status("").await.ok(),
            Some(ServingStatus::Serving)
        );
        assert_eq!(
            app.health_status(ORDER_SERVICE_NAME).await.ok(),
            Some(ServingStatus::NotServing)
        );
        let status = app
            .get(&uuid::Uuid::new_v4().to_string())
            .await
            .expect_err("no database");
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            !status.message().contains("127.0.0.1"),
            "internal details stay internal: {}",
            status.message()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn health_follows_the_database_through_an_outage_and_back() {
        let Some((options, _database)) = TestDatabase::postgres_schema().await else {
            return;
        };
        let upstream = tokio::net::lookup_host((options.get_host(), options.get_port()))
            .await
            .ok()
            .and_then(|mut addrs| addrs.next())
            .expect("TEST_POSTGRES_URL names a TCP address");
        let link = Link::start(upstream).await;
        let mut settings = test_settings();
        // Far longer than the call deadline below: only failing fast can answer UNAVAILABLE in time.
        settings.database.acquire_timeout = Duration::from_secs(3600);
        settings.database.connect_timeout = Duration::from_millis(500);
        settings.platform.health.failure_threshold = 3.try_into().expect("non-zero");
        let store: Arc<dyn OrderStore> = Arc::new(PostgresStore::with_options(
            options.host("127.0.0.1").port(link.addr.port()),
            &settings.database,
            &Default::default(),
        ));
        store.migrate().await.expect("migrate through the link");
        let application = app::server::with_store(Arc::clone(&store), &settings)
            .await
            .expect("application builds");
        logs::capture();
        let app = TestApp::serve_application(application, store).await;
        app.wait_for_status(ORDER_SERVICE_NAME, ServingStatus::Serving)
            .await;
        let order = app.create_for("Oslo").await;

        link.cut();
        app.wait_for_status(ORDER_SERVICE_NAME, ServingStatus::NotServing)
            .await;
        // Readiness dropped only after the threshold of failed checks in a row, said once.
        // (A change after more than one failure can only be this test's: the others start unready.)
        let changes = logs::find(|line| {
            line["message"] == "health status changed"
                && line["status"] == "NotServing"
                && line["failures"].as_u64() > Some(1)
        });
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!(changes[0]["failures"], 3, "{changes:?}");
        // Liveness holds: restarting the process would not bring the database back.
        assert_eq!(
            app.health_status("").await.ok(),
            Some(ServingStatus::Serving)
        );
        // Calls fail fast with UNAVAILABLE rather than waiting out `acquire_timeout`: within a
        // deadline far shorter than it.
        for _ in 0..3 {
            let mut request = tonic::Request::new(api::GetOrderRequest {
                id: order.id.clone(),
            });
            request.set_timeout(Duration::from_secs(5));
            let status = app
                .orders
                .clone()
                .get_order(request)
                .await
                .expect_err("database unreachable");
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        }

        link.restore();
        app.wait_for_status(ORDER_SERVICE_NAME, ServingStatus::Serving)
            .await;
        assert_eq!(
            app.get(&order.id)
                .await
                .expect("get after the outage, without a restart"),
            order
        );
    }

    /// The pool does not ping a connection on every acquire (a round trip per call), only one idle
    /// long enough to have been cut: such a connection, dropped on the database's side while it sat
    /// in the pool, is replaced before a call gets it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pooled_connection_dropped_while_idle_never_reaches_a_call() {
        let Some((options, _database)) = TestDatabase::postgres_schema().await else {
            return;
        };
        let upstream = tokio::net::lookup_host((options.get_host(), options.get_port()))
            .await
            .ok()
            .and_then(|mut addrs| addrs.next())
            .expect("TEST_POSTGRES_URL names a TCP address");
        let link = Link::start(upstream).await;
        let mut settings = test_settings();
        // No health check in between to find the dead connections first.
        settings.platform.health.check_interval = Duration::from_secs(3600);
        let store: Arc<dyn OrderStore> = Arc::new(PostgresStore::with_options(
            options.host("127.0.0.1").port(link.addr.port()),
            &settings.database,
            &Default::default(),
        ));
        store.migrate().await.expect("migrate through the link");
        let application = app::server::with_store(Arc::clone(&store), &settings)
            .await
            .expect("application builds");
        let app = TestApp::serve_application(application, store).await;
        let order = app.create_for("Oslo").await;
        assert!(app.get(&order.id).await.is_ok());

        // Every pooled connection is closed under the pool, which does not notice until it uses one;
        // they then sit idle past the ping threshold (1s) before the next call.
        link.cut();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        link.restore();
        for _ in 0..3 {
            assert_eq!(
                app.get(&order.id)
                    .await
                    .expect("a dead pooled connection must not reach the call"),
                order
            );
        }
    }

    /// A TCP relay to the database that the test can cut like a network partition: cut, it closes
    /// every relayed connection, and accepts new ones without ever answering until it is restored.
    struct Link {
        addr: SocketAddr,
        cut: watch::Sender<bool>,
        relay: JoinHandle<()>,
    }

    impl Link {
        async fn start(upstream: SocketAddr) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
            let addr = listener.local_addr().expect("relay address");
            let (cut, cut_changes) = watch::channel(false);
            let relay = tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    let mut cut_changes = cut_changes.clone();
                    tokio::spawn(async move {
                        if *cut_changes.borrow_and_update() {
                            // A partition, not a refusal: the connection is accepted and never
                            // answered, so a client waits out its own timeouts.
                            let _ = cut_changes.wait_for(|cut| !*cut).await;
                            return;
                        }
                        let Ok(mut server) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = cut_changes.wait_for(|cut| *cut) => {}
                        }
                    });
                }
            });
            Self { addr, cut, relay }
        }

        fn cut(&self) {
            self.cut.send_replace(true);
        }

        fn restore(&self) {
            self.cut.send_replace(false);
        }
    }

    impl Drop for Link {
        fn drop(&mut self) {
            self.cut();
            self.relay.abort();
        }
    }
}

#[tokio::test]
async fn reflection_lists_every_service_in_v1_and_v1alpha() {
    let app = TestApp::spawn(Backend::Sqlite).await.expect("SQLite app");
    let mut expected = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        ORDER_SERVICE_NAME,
    ];
    expected.sort();

    let mut client = v1::server_reflection_client::ServerReflectionClient::new(app.channel.clone());
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let response = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .expect("v1 reflection")
        .into_inner()
        .message()
        .await
        .expect("v1 answer")
        .and_then(|r| r.message_response);
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response
    else {
        panic!("v1 did not list services: {response:?}");
    };
    let mut names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(names, expected);

    let mut client =
        v1alpha::server_reflection_client::ServerReflectionClient::new(app.channel.clone());
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                ORDER_SERVICE_NAME.to_owned(),
            ),
        ),
    };
    let response = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .expect("v1alpha reflection")
        .into_inner()
        .message()
        .await
        .expect("v1alpha answer")
        .and_then(|r| r.message_response);
    assert!(
        matches!(
            response,
            Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(ref files))
                if !files.file_descriptor_proto.is_empty()
        ),
        "v1alpha did not describe the order service: {response:?}"
    );
}

#[tokio::test]
async fn reflection_can_be_turned_off() {
    let app = TestApp::spawn_with(Backend::Sqlite, |s| s.platform.server.reflection = false)
        .await
        .expect("SQLite app");
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(app.channel.clone());
    let status = client
        .server_reflection_info(futures::stream::iter([
            v1::ServerReflectionRequest::default(),
        ]))
        .await
        .map(drop)
        .expect_err("reflection is off");
    assert_eq!(status.code(), Code::Unimplemented);
}

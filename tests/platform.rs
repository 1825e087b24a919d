//! What surrounds the API: health from real database state, reflection, graceful shutdown.

mod common;

use app::{
    api::{self, UpdateOrdersRequest},
    health::ORDER_SERVICE_NAME,
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
    assert_eq!(
        app.health_status("").await.ok(),
        Some(ServingStatus::NotServing)
    );
    assert_eq!(
        app.health_status(ORDER_SERVICE_NAME).await.ok(),
        Some(ServingStatus::NotServing)
    );

    app.store.migrate().await.expect("migrate");
    app.wait_for_status("", ServingStatus::Serving).await;
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

/// The database is PostgreSQL on a port where nothing listens.
#[cfg(feature = "postgres")]
mod unreachable_database {
    use std::{str::FromStr, sync::Arc, time::Duration};

    use app::{config::DatabaseUrl, server::Application, store};
    use tonic::Code;
    use tonic_health::pb::health_check_response::ServingStatus;

    use crate::common::{TestApp, test_settings};

    #[tokio::test]
    async fn health_is_not_serving_and_calls_are_unavailable_while_the_database_is_unreachable() {
        let mut settings = test_settings();
        // Nothing listens on port 1: every connection attempt is refused.
        settings.database.url =
            DatabaseUrl::from_str("postgres://postgres@127.0.0.1:1/test").expect("URL");
        settings.database.acquire_timeout = Duration::from_millis(300);
        settings.database.connect_timeout = Duration::from_millis(300);
        let store = store::connect(&settings.database).expect("lazy store");
        assert!(store.check_ready().await.is_err());

        let application = Application::with_store(Arc::clone(&store), &settings)
            .await
            .expect("builds without a database");
        let app = TestApp::serve_application(application, store).await;
        assert_eq!(
            app.health_status("").await.ok(),
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
    let app = TestApp::spawn_with(Backend::Sqlite, |s| s.server.reflection = false)
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

//! Configuration layering and validation. `figment::Jail` gives each test its own working directory
//! and environment, restored afterwards.

// `Jail` closures must return `figment::Result`, whose error type is large; nothing to do about it here.
#![allow(clippy::result_large_err)]

use std::{net::SocketAddr, path::Path, time::Duration};

use app::config::Settings;
use figment::Jail;
use platform::config::{ConfigError, LogFormat};

/// `Settings::load` with its error in the form `Jail` closures return.
fn load(config_file: Option<&Path>) -> figment::Result<Settings> {
    Settings::load(config_file).map_err(|err| err.to_string().into())
}

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("test address")
}

fn error_text(result: Result<Settings, ConfigError>) -> String {
    result.expect_err("configuration is rejected").to_string()
}

#[test]
fn built_in_defaults_apply_without_any_file() {
    Jail::expect_with(|_| {
        let settings = load(None)?;
        assert_eq!(settings, Settings::default());
        assert_eq!(settings.platform.server.grpc_addr, addr("0.0.0.0:50051"));
        assert_eq!(
            settings.platform.server.metrics_addr,
            Some(addr("0.0.0.0:9090"))
        );
        assert!(settings.platform.server.reflection);
        assert_eq!(settings.database.url.expose(), "sqlite://orders.db");
        assert!(settings.database.migrate);
        assert_eq!(settings.service.shipment_batch_size.get(), 3);
        assert_eq!(settings.platform.telemetry.log_format, LogFormat::Json);
        Ok(())
    });
}

#[test]
fn the_shipped_default_file_matches_the_built_in_defaults() {
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml"))
            .expect("config/default.toml");
    Jail::expect_with(|jail| {
        jail.create_dir("config")?;
        jail.create_file("config/default.toml", &shipped)?;
        assert_eq!(load(None)?, Settings::default());
        Ok(())
    });
}

#[test]
fn layers_override_in_order_defaults_file_env_file_cli_file_environment() {
    Jail::expect_with(|jail| {
        jail.create_dir("config")?;
        jail.create_file(
            "config/default.toml",
            r#"
            [server]
            grpc_addr = "127.0.0.1:1001"
            metrics_addr = "127.0.0.1:2001"
            reflection = false
            [service]
            shipment_batch_size = 4
            "#,
        )?;
        jail.create_file(
            "config/staging.toml",
            r#"
            [server]
            metrics_addr = "127.0.0.1:2002"
            [service]
            shipment_batch_size = 5
            "#,
        )?;
        jail.create_file(
            "override.toml",
            r#"
            [service]
            shipment_batch_size = 6
            [database]
            acquire_timeout = "750ms"
            "#,
        )?;
        jail.set_env("APP_ENV", "staging");
        jail.set_env("APP_DATABASE__URL", "sqlite://from-env.db");
        jail.set_env("APP_DATABASE__CONNECT_TIMEOUT", "1m");
        jail.set_env("APP_TELEMETRY__LOG_LEVEL", "warn");
        jail.set_env("RUST_LOG", "debug,sqlx=warn");

        let settings = load(Some(Path::new("override.toml")))?;
        assert_eq!(settings.platform.server.grpc_addr, addr("127.0.0.1:1001"));
        assert!(!settings.platform.server.reflection);
        assert_eq!(
            settings.platform.server.metrics_addr,
            Some(addr("127.0.0.1:2002"))
        );
        assert_eq!(settings.service.shipment_batch_size.get(), 6);
        assert_eq!(
            settings.database.acquire_timeout,
            Duration::from_millis(750)
        );
        assert_eq!(settings.database.connect_timeout, Duration::from_secs(60));
        assert_eq!(settings.database.url.expose(), "sqlite://from-env.db");
        assert_eq!(
            settings.platform.telemetry.log_level.as_str(),
            "debug,sqlx=warn",
            "RUST_LOG wins"
        );

        jail.set_env("APP_SERVICE__SHIPMENT_BATCH_SIZE", "7");
        let settings = load(Some(Path::new("override.toml")))?;
        assert_eq!(
            settings.service.shipment_batch_size.get(),
            7,
            "environment beats files"
        );
        Ok(())
    });
}

#[test]
fn unknown_keys_fail_naming_the_key_and_the_file() {
    Jail::expect_with(|jail| {
        jail.create_dir("config")?;
        jail.create_file("config/default.toml", "[server]\ngrpc_port = 1\n")?;
        let message = error_text(Settings::load(None));
        assert!(message.contains("grpc_port"), "{message}");
        assert!(message.contains("default.toml"), "{message}");
        Ok(())
    });
    Jail::expect_with(|jail| {
        jail.set_env("APP_DATABSE__URL", "sqlite://typo.db");
        let message = error_text(Settings::load(None));
        assert!(message.contains("databse"), "{message}");
        assert!(message.contains("APP_"), "{message}");
        Ok(())
    });
}

#[test]
fn invalid_values_fail_naming_the_key_and_the_layer() {
    let cases = [
        ("APP_SERVER__GRPC_ADDR", "not-an-address", "grpc_addr"),
        ("APP_DATABASE__URL", "mysql://db/orders", "url"),
        #[cfg(not(feature = "postgres"))]
        ("APP_DATABASE__URL", "postgres://db/orders", "url"),
        ("APP_DATABASE__MAX_CONNECTIONS", "0", "max_connections"),
        ("APP_DATABASE__ACQUIRE_TIMEOUT", "soon", "acquire_timeout"),
        (
            "APP_SERVICE__SHIPMENT_BATCH_SIZE",
            "0",
            "shipment_batch_size",
        ),
        ("APP_TELEMETRY__LOG_FORMAT", "xml", "log_format"),
        ("APP_TELEMETRY__LOG_LEVEL", "info,[", "log_level"),
    ];
    for (variable, value, key) in cases {
        Jail::expect_with(|jail| {
            jail.set_env(variable, value);
            let message = error_text(Settings::load(None)).to_lowercase();
            assert!(message.contains(key), "{variable}: {message}");
            assert!(
                message.contains("app_"),
                "{variable} names its layer: {message}"
            );
            Ok(())
        });
    }
    Jail::expect_with(|jail| {
        jail.set_env("RUST_LOG", "info,[");
        let message = error_text(Settings::load(None));
        assert!(message.contains("RUST_LOG"), "{message}");
        Ok(())
    });
}

#[test]
fn a_config_file_named_on_the_command_line_must_exist() {
    Jail::expect_with(|_| {
        let message = error_text(Settings::load(Some(Path::new("missing.toml"))));
        assert!(message.contains("missing.toml"), "{message}");
        Ok(())
    });
}

#[cfg(feature = "postgres")]
#[test]
fn printed_configuration_redacts_the_database_password() {
    Jail::expect_with(|jail| {
        jail.set_env("APP_DATABASE__URL", "postgres://svc:hunter2@db:5432/orders");
        let settings = load(None)?;
        let printed = settings.to_redacted_toml().map_err(|e| e.to_string())?;
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(
            printed.contains("postgres://svc:REDACTED@db:5432/orders"),
            "{printed}"
        );
        assert!(!format!("{settings:?}").contains("hunter2"));
        // What is printed is itself a valid configuration file.
        jail.create_file("printed.toml", &printed)?;
        load(Some(Path::new("printed.toml")))?;
        Ok(())
    });
}

#[test]
fn a_timeout_added_in_a_file_joins_the_built_in_ones() {
    let service = app::api::ORDER_SERVICE_NAME;
    Jail::expect_with(|jail| {
        jail.create_dir("config")?;
        jail.create_file(
            "config/default.toml",
            &format!("[server.timeouts.methods]\n\"{service}/GetOrder\" = \"2s\"\n"),
        )?;
        let timeouts = load(None)?.platform.server.timeouts;
        assert_eq!(
            timeouts.methods.get(&format!("{service}/GetOrder")),
            Some(&Duration::from_secs(2))
        );
        // The built-in entries are still there.
        assert_eq!(
            timeouts.methods.get(&format!("{service}/SearchOrders")),
            Some(&Duration::from_secs(60))
        );
        assert_eq!(
            timeouts.methods.get("grpc.health.v1.Health/Watch"),
            Some(&Duration::ZERO)
        );
        Ok(())
    });
}

#[test]
fn settings_that_only_work_together_fail_naming_both_keys() {
    Jail::expect_with(|jail| {
        jail.set_env("APP_TLS__CERT_FILE", "/etc/tls/tls.crt");
        let message = error_text(Settings::load(None));
        assert!(
            message.contains("tls.cert_file") && message.contains("tls.key_file"),
            "{message}"
        );
        jail.clear_env();
        jail.set_env("APP_AUTH__MODE", "jwt");
        let message = error_text(Settings::load(None));
        assert!(message.contains("auth.jwt_secret_file"), "{message}");
        Ok(())
    });
}

#[test]
fn printed_configuration_shows_key_file_paths_and_never_their_contents() {
    Jail::expect_with(|jail| {
        jail.create_file("jwt-secret", "hunter2-very-secret")?;
        jail.set_env("APP_AUTH__MODE", "jwt");
        jail.set_env("APP_AUTH__JWT_SECRET_FILE", "jwt-secret");
        jail.set_env("APP_AUTH__ISSUER", "dev");
        jail.set_env("APP_AUTH__AUDIENCE", "orders");
        let printed = load(None)?
            .to_redacted_toml()
            .map_err(|err| err.to_string())?;
        assert!(
            printed.contains("jwt_secret_file = \"jwt-secret\""),
            "{printed}"
        );
        assert!(!printed.contains("hunter2"), "{printed}");
        Ok(())
    });
}

#[test]
fn the_docs_list_every_error_reason() {
    // docs/security.md lists the reasons every service has; the README, those of its own API.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let docs = ["docs/security.md", "README.md"]
        .map(|file| std::fs::read_to_string(root.join(file)).expect(file))
        .concat();
    for reason in app::status::named_reasons() {
        let name = format!("`{}`", reason.as_str());
        assert!(docs.contains(&name), "the docs do not list {name}");
    }
}

#[test]
fn the_database_url_can_come_from_a_file_and_wins_over_the_url() {
    Jail::expect_with(|jail| {
        // As `kubectl create secret --from-file` stores it: with the editor's trailing newline.
        jail.create_file("database-url", "sqlite://from-secret.db\n")?;
        jail.set_env("APP_DATABASE__URL", "sqlite://ignored.db");
        jail.set_env("APP_DATABASE__URL_FILE", "database-url");
        let settings = load(None)?;
        assert_eq!(settings.database.url.expose(), "sqlite://from-secret.db");
        Ok(())
    });
}

#[cfg(feature = "postgres")]
#[test]
fn a_database_url_file_never_shows_its_password() {
    Jail::expect_with(|jail| {
        jail.create_file("database-url", "postgres://svc:hunter2@db:5432/orders")?;
        jail.set_env("APP_DATABASE__URL_FILE", "database-url");
        let settings = load(None)?;
        let printed = settings.to_redacted_toml().map_err(|e| e.to_string())?;
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("url_file = \"database-url\""), "{printed}");
        assert!(!format!("{settings:?}").contains("hunter2"));
        Ok(())
    });
}

#[test]
fn an_unreadable_or_invalid_database_url_file_fails_naming_the_key() {
    Jail::expect_with(|jail| {
        jail.set_env("APP_DATABASE__URL_FILE", "missing");
        let message = error_text(Settings::load(None));
        assert!(
            message.contains("database.url_file") && message.contains("missing"),
            "{message}"
        );
        jail.create_file("database-url", "mysql://db/orders")?;
        jail.set_env("APP_DATABASE__URL_FILE", "database-url");
        let message = error_text(Settings::load(None));
        assert!(
            message.contains("database.url_file") && message.contains("expected"),
            "{message}"
        );
        Ok(())
    });
}

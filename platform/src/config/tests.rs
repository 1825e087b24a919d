//! The loader with a service's sections beside the platform's: both read from the same layers, and
//! a top-level key that neither knows is refused with its layer.
// `figment::Jail` closures return figment's own (large) error type.
#![allow(clippy::result_large_err)]

use std::num::NonZeroU32;

use figment::Jail;
use serde::{Deserialize, Serialize};

use super::*;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
struct Widgets {
    per_page: NonZeroU32,
}

impl Default for Widgets {
    fn default() -> Self {
        Self {
            per_page: NonZeroU32::MIN,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default)]
struct WidgetSections {
    widgets: Widgets,
}

impl ServiceSections for WidgetSections {
    fn platform_defaults(platform: &mut PlatformSettings) {
        platform.telemetry.redact_fields = vec!["secret".to_owned()];
    }

    fn check(&self) -> Result<(), String> {
        if self.widgets.per_page.get() > 100 {
            return Err("widgets.per_page must be at most 100".to_owned());
        }
        Ok(())
    }
}

fn load() -> Result<Settings<WidgetSections>, String> {
    Settings::load(None).map_err(|err| err.to_string())
}

#[test]
fn the_service_sections_and_the_platform_sections_come_from_the_same_layers() {
    Jail::expect_with(|jail| {
        jail.create_dir(CONFIG_DIR)?;
        jail.create_file(
            "config/default.toml",
            "[widgets]\nper_page = 20\n[server]\nreflection = false\n",
        )?;
        jail.set_env("APP_WIDGETS__PER_PAGE", "30");
        let settings = load()?;
        assert_eq!(
            settings.widgets.per_page.get(),
            30,
            "the service's, through Deref"
        );
        assert!(!settings.platform.server.reflection);
        assert_eq!(
            settings.platform.telemetry.redact_fields,
            ["secret"],
            "the service's defaults for platform keys"
        );
        let printed = settings.to_redacted_toml().map_err(|err| err.to_string())?;
        assert!(printed.contains("[widgets]"), "{printed}");
        assert!(printed.contains("[server]"), "{printed}");
        Ok(())
    });
}

#[test]
fn a_top_level_key_neither_side_knows_is_refused_naming_it_and_its_layer() {
    Jail::expect_with(|jail| {
        jail.set_env("APP_WIDGTES__PER_PAGE", "3");
        let message = load().expect_err("unknown section");
        assert!(message.contains("widgtes"), "{message}");
        assert!(message.contains("APP_"), "{message}");
        Ok(())
    });
    Jail::expect_with(|jail| {
        jail.create_dir(CONFIG_DIR)?;
        jail.create_file("config/default.toml", "[widgets]\nper_pgae = 3\n")?;
        let message = load().expect_err("unknown key in the service's section");
        assert!(message.contains("per_pgae"), "{message}");
        assert!(message.contains("default.toml"), "{message}");
        Ok(())
    });
}

#[test]
fn the_service_checks_its_own_rules_after_the_platform_checks_its() {
    Jail::expect_with(|jail| {
        jail.set_env("APP_WIDGETS__PER_PAGE", "101");
        let message = load().expect_err("over the service's limit");
        assert!(message.contains("widgets.per_page"), "{message}");
        jail.set_env("APP_WIDGETS__PER_PAGE", "10");
        jail.set_env("APP_TLS__CERT_FILE", "cert.pem");
        let message = load().expect_err("a certificate without its key");
        assert!(message.contains("tls.key_file"), "{message}");
        Ok(())
    });
}

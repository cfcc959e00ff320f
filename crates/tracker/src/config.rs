//! Configuration: built-in defaults, then a TOML file (`--config`), then
//! `TRACKER_*` environment variables, then command-line flags. Loaded and
//! checked once at start-up; what the rest of the program sees is valid.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tracker_domain::{InstitutionId, SourceTimeZone};

/// A secret string: never shown by `Debug` or `Display`, so it cannot end up
/// in a log line by accident.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Which institutions a credential may act for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstitutionScope {
    All,
    Only(HashSet<u64>),
}

impl InstitutionScope {
    pub fn allows(&self, institution: InstitutionId) -> bool {
        match self {
            Self::All => true,
            Self::Only(ids) => ids.contains(&institution.get()),
        }
    }
}

/// `institutions = [12345, 678]` or `institutions = ["*"]`.
impl<'de> Deserialize<'de> for InstitutionScope {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Item {
            Id(u64),
            Text(String),
        }
        let items = Vec::<Item>::deserialize(d)?;
        let mut ids = HashSet::new();
        let mut all = false;
        for item in items {
            match item {
                Item::Text(s) if s == "*" => all = true,
                Item::Text(s) => match s.parse::<u64>() {
                    Ok(id) if id > 0 => {
                        ids.insert(id);
                    }
                    _ => {
                        return Err(serde::de::Error::custom(format!(
                            "institutions: expected positive integer ids or \"*\", got {s:?}"
                        )));
                    }
                },
                Item::Id(0) => {
                    return Err(serde::de::Error::custom(
                        "institutions: ids are positive integers, got 0",
                    ));
                }
                Item::Id(id) => {
                    ids.insert(id);
                }
            }
        }
        if all {
            Ok(Self::All)
        } else {
            Ok(Self::Only(ids))
        }
    }
}

impl Serialize for InstitutionScope {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::All => ["*"].serialize(s),
            Self::Only(ids) => {
                let mut ids: Vec<_> = ids.iter().copied().collect();
                ids.sort_unstable();
                ids.serialize(s)
            }
        }
    }
}

/// A webhook sender: its URL token and the institutions it may post for.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub id: String,
    pub token: Secret,
    pub institutions: InstitutionScope,
    /// Standard Webhooks secret (`whsec_<base64>`); when set, every delivery
    /// of this source must carry a valid signature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_secret: Option<Secret>,
}

/// A client of the query API (`/v1`): its bearer key and the institutions
/// it may read. `["*"]` is an operator key.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    pub id: String,
    pub key: Secret,
    pub institutions: InstitutionScope,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EventStoreConfig {
    /// Unset: the embedded store in `data_dir`. `esdb://...` or
    /// `esdb+discover://...`: EventStoreDB / KurrentDB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<Secret>,
    /// EventStoreDB only: the prefix of this tracker's streams, which the
    /// server-side `$all` filter selects on.
    #[serde(default = "default_stream_prefix")]
    pub stream_prefix: String,
}

fn default_stream_prefix() -> String {
    "tracker-".to_owned()
}

impl Default for EventStoreConfig {
    fn default() -> Self {
        Self {
            url: None,
            stream_prefix: default_stream_prefix(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReadStoreConfig {
    /// Unset: SQLite files in `data_dir/readmodels`. `postgres://...`: PostgreSQL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<Secret>,
    /// PostgreSQL only: where the query API reads, e.g. a hot standby of
    /// `url` (it only reads). Unset: `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_url: Option<Secret>,
}

/// What a projector does with an event it cannot apply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OnErrorSetting {
    /// Record it in the dead letters and go on.
    #[default]
    DeadLetter,
    /// Stop the projection before it.
    Stop,
}

impl From<OnErrorSetting> for tracker_projections::runner::OnError {
    fn from(setting: OnErrorSetting) -> Self {
        match setting {
            OnErrorSetting::DeadLetter => Self::DeadLetter,
            OnErrorSetting::Stop => Self::Stop,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectorConfig {
    /// Most events applied in one transaction.
    pub batch_size: usize,
    pub on_error: OnErrorSetting,
    /// How long a projector's lease lasts without renewal, in seconds.
    pub lease_ttl_secs: u64,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            // Measured: a catching-up projector (400k events, alone) wrote
            // 60 KB per event to disk at 1,000 a batch, 31 KB at 5,000 and
            // 11 KB at 20,000 (pages shared by a batch's events are
            // written once), applying 7.8k, 13.4k and 19.4k events/s;
            // peak memory 220 MiB -> 370 MiB.
            batch_size: 20_000,
            on_error: OnErrorSetting::DeadLetter,
            lease_ttl_secs: 15,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryLogConfig {
    /// Days a call stays in the delivery log; 0 keeps every call for ever.
    pub retention_days: u32,
}

impl Default for DeliveryLogConfig {
    fn default() -> Self {
        // A troubleshooting aid, not the record (the event log keeps every
        // accepted delivery verbatim); refused bodies hold personal data.
        Self { retention_days: 90 }
    }
}

impl DeliveryLogConfig {
    pub fn keep(&self) -> Option<chrono::Duration> {
        (self.retention_days > 0).then(|| chrono::Duration::days(i64::from(self.retention_days)))
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Everything the tracker can be told. Field names are the TOML keys and,
/// upper-cased behind `TRACKER_`, the environment variables.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub source_timezone: String,
    /// Largest accepted webhook body, in bytes.
    pub body_limit: usize,
    /// How long a webhook body may take to arrive once its headers have,
    /// in seconds.
    pub body_timeout_secs: u64,
    /// How long SIGTERM waits for in-flight requests, in seconds.
    pub shutdown_timeout_secs: u64,
    pub log_format: LogFormat,
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    /// Keys of the query API; none: `serve` makes a development operator key.
    #[serde(default)]
    pub api_keys: Vec<ApiKeyConfig>,
    #[serde(default)]
    pub event_store: EventStoreConfig,
    #[serde(default)]
    pub read_store: ReadStoreConfig,
    #[serde(default)]
    pub projector: ProjectorConfig,
    #[serde(default)]
    pub delivery_log: DeliveryLogConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./data"),
            source_timezone: SourceTimeZone::DEFAULT_NAME.to_owned(),
            body_limit: 64 * 1024,
            body_timeout_secs: 10,
            shutdown_timeout_secs: 30,
            log_format: LogFormat::Text,
            sources: Vec::new(),
            api_keys: Vec::new(),
            event_store: EventStoreConfig::default(),
            read_store: ReadStoreConfig::default(),
            projector: ProjectorConfig::default(),
            delivery_log: DeliveryLogConfig::default(),
        }
    }
}

/// Tables whose keys come from `TRACKER_<TABLE>_<KEY>` variables
/// (`TRACKER_READ_STORE_URL` is `read_store.url`).
const ENV_SECTIONS: &[&str] = &["event_store", "read_store", "projector", "delivery_log"];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("configuration: {0}")]
    Invalid(String),
}

/// Flags given on the command line; `None` leaves the layer below in force.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
}

impl Config {
    /// Defaults, then `file` (if any), then `TRACKER_*`, then `overrides`.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError::Invalid(format!(
                    "config file {} does not exist",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file(file));
        }
        // Unknown keys are refused (a typo must not be silently ignored), so
        // variables that are not settings are left out here: the config
        // file's path, the log filter, and the test suites' own variables.
        let env = Env::prefixed("TRACKER_")
            .filter(|key| {
                let key = key.as_str().to_ascii_lowercase();
                key != "config" && key != "log" && !key.starts_with("test_")
            })
            .map(|key| {
                let key = key.as_str().to_ascii_lowercase();
                ENV_SECTIONS
                    .iter()
                    .find_map(|section| {
                        key.strip_prefix(section)
                            .and_then(|rest| rest.strip_prefix('_'))
                            .map(|rest| format!("{section}.{rest}").into())
                    })
                    .unwrap_or_else(|| key.into())
            });
        let config: Config = figment
            .merge(env)
            .merge(Serialized::defaults(overrides))
            .extract()
            .map_err(Box::new)?;
        config.check()?;
        Ok(config)
    }

    pub fn timezone(&self) -> Result<SourceTimeZone, ConfigError> {
        SourceTimeZone::parse(&self.source_timezone)
            .map_err(|e| ConfigError::Invalid(format!("source_timezone {e}")))
    }

    fn check(&self) -> Result<(), ConfigError> {
        self.timezone()?;
        if self.body_limit < 1024 {
            return Err(ConfigError::Invalid(
                "body_limit must be at least 1024 bytes".into(),
            ));
        }
        if self.body_timeout_secs == 0 {
            return Err(ConfigError::Invalid(
                "body_timeout_secs must be at least 1".into(),
            ));
        }
        self.check_api_keys()?;
        let mut ids = HashSet::new();
        let mut tokens = HashSet::new();
        for s in &self.sources {
            if s.id.is_empty() {
                return Err(ConfigError::Invalid(
                    "sources: a source has an empty id".into(),
                ));
            }
            if !ids.insert(s.id.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "sources: id {:?} is used twice",
                    s.id
                )));
            }
            if s.token.expose().len() < 16 {
                return Err(ConfigError::Invalid(format!(
                    "sources: the token of {:?} must be at least 16 characters",
                    s.id
                )));
            }
            if !tokens.insert(s.token.expose()) {
                return Err(ConfigError::Invalid(format!(
                    "sources: the token of {:?} is also another source's",
                    s.id
                )));
            }
            if let Some(secret) = &s.signing_secret {
                crate::signature::SigningKey::parse(secret.expose()).map_err(|e| {
                    ConfigError::Invalid(format!("sources: signing_secret of {:?}: {e}", s.id))
                })?;
            }
        }
        Ok(())
    }
}

impl Config {
    fn check_api_keys(&self) -> Result<(), ConfigError> {
        let mut ids = HashSet::new();
        let mut keys = HashSet::new();
        for k in &self.api_keys {
            if k.id.is_empty() {
                return Err(ConfigError::Invalid(
                    "api_keys: a key has an empty id".into(),
                ));
            }
            if !ids.insert(k.id.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "api_keys: id {:?} is used twice",
                    k.id
                )));
            }
            if k.key.expose().len() < 16 {
                return Err(ConfigError::Invalid(format!(
                    "api_keys: the key of {:?} must be at least 16 characters",
                    k.id
                )));
            }
            if !keys.insert(k.key.expose()) {
                return Err(ConfigError::Invalid(format!(
                    "api_keys: the key of {:?} is also another key's",
                    k.id
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
// `Jail` closures return figment's own (large) error type: not ours to shrink.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn defaults_need_no_file() {
        Jail::expect_with(|_| {
            let c = Config::load(None, &Overrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
            assert_eq!(c.data_dir, PathBuf::from("./data"));
            assert_eq!(c.source_timezone, "America/Sao_Paulo");
            assert_eq!(c.body_limit, 65536);
            assert!(c.sources.is_empty());
            assert_eq!(c.delivery_log.keep(), Some(chrono::Duration::days(90)));
            Ok(())
        });
    }

    #[test]
    fn file_then_env_then_flags() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "tracker.toml",
                r#"
                listen = "127.0.0.1:9000"
                data_dir = "/var/lib/tracker"
                source_timezone = "America/Manaus"

                [[sources]]
                id = "toolzz-main"
                token = "0123456789abcdef0123"
                institutions = [12345]

                [[sources]]
                id = "ops"
                token = "fedcba9876543210fedc"
                institutions = ["*"]
                "#,
            )?;
            jail.set_env("TRACKER_DATA_DIR", "/srv/tracker");
            jail.set_env("TRACKER_EVENT_STORE_URL", "esdb://es:2113?tls=false");
            jail.set_env("TRACKER_READ_STORE_URL", "postgres://db/tracker");
            jail.set_env("TRACKER_READ_STORE_QUERY_URL", "postgres://standby/tracker");
            jail.set_env("TRACKER_PROJECTOR_ON_ERROR", "stop");
            jail.set_env("TRACKER_DELIVERY_LOG_RETENTION_DAYS", "0");
            let overrides = Overrides {
                listen: Some(SocketAddr::from(([0, 0, 0, 0], 8081))),
                data_dir: None,
            };
            let c = Config::load(Some(Path::new("tracker.toml")), &overrides)
                .map_err(|e| e.to_string())?;
            assert_eq!(c.listen.to_string(), "0.0.0.0:8081");
            assert_eq!(c.data_dir, PathBuf::from("/srv/tracker"));
            assert_eq!(c.source_timezone, "America/Manaus");
            assert_eq!(
                c.event_store.url.as_ref().map(Secret::expose),
                Some("esdb://es:2113?tls=false")
            );
            assert_eq!(
                c.read_store.url.as_ref().map(Secret::expose),
                Some("postgres://db/tracker")
            );
            assert_eq!(
                c.read_store.query_url.as_ref().map(Secret::expose),
                Some("postgres://standby/tracker")
            );
            assert_eq!(c.projector.on_error, OnErrorSetting::Stop);
            assert_eq!(c.projector.batch_size, 20_000);
            assert_eq!(c.delivery_log.keep(), None, "0 keeps every call");
            assert_eq!(c.sources.len(), 2);
            let inst = InstitutionId::try_from(12345).map_err(|e| e.to_string())?;
            let other = InstitutionId::try_from(1).map_err(|e| e.to_string())?;
            assert!(c.sources[0].institutions.allows(inst));
            assert!(!c.sources[0].institutions.allows(other));
            assert_eq!(c.sources[1].institutions, InstitutionScope::All);
            Ok(())
        });
    }

    #[test]
    fn sources_from_the_environment_alone() {
        Jail::expect_with(|jail| {
            jail.set_env(
                "TRACKER_SOURCES",
                r#"[{id="a",token="0123456789abcdef",institutions=[1,2]}]"#,
            );
            let c = Config::load(None, &Overrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(c.sources.len(), 1);
            assert_eq!(c.sources[0].id, "a");
            Ok(())
        });
    }

    #[test]
    fn refuses_bad_settings_with_their_name() {
        Jail::expect_with(|jail| {
            jail.set_env("TRACKER_SOURCE_TIMEZONE", "Mars/Base");
            let e = Config::load(None, &Overrides::default()).unwrap_err();
            assert!(e.to_string().contains("source_timezone"), "{e}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env(
                "TRACKER_SOURCES",
                r#"[{id="a",token="short",institutions=["*"]}]"#,
            );
            let e = Config::load(None, &Overrides::default()).unwrap_err();
            assert!(e.to_string().contains("at least 16"), "{e}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env(
                "TRACKER_SOURCES",
                r#"[{id="a",token="0123456789abcdef",institutions=[0]}]"#,
            );
            let e = Config::load(None, &Overrides::default()).unwrap_err();
            assert!(
                e.to_string().contains("institutions: ids are positive"),
                "{e}"
            );
            Ok(())
        });
    }

    #[test]
    fn unknown_settings_are_refused_by_name() {
        Jail::expect_with(|jail| {
            jail.set_env("TRACKER_LISTNE", "0.0.0.0:1");
            let e = Config::load(None, &Overrides::default()).unwrap_err();
            assert!(e.to_string().contains("listne"), "{e}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("TRACKER_READ_STORE_URI", "postgres://x");
            let e = Config::load(None, &Overrides::default()).unwrap_err();
            assert!(e.to_string().contains("uri"), "{e}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("TRACKER_LOG", "debug");
            jail.set_env("TRACKER_TEST_EVENTSTORE_URL", "esdb://x");
            Config::load(None, &Overrides::default()).map_err(|e| e.to_string())?;
            Ok(())
        });
    }

    #[test]
    fn api_keys_from_a_file_or_the_environment() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "tracker.toml",
                r#"
                [[api_keys]]
                id = "dashboard-12345"
                key = "0123456789abcdef0123"
                institutions = [12345]
                "#,
            )?;
            let c = Config::load(Some(Path::new("tracker.toml")), &Overrides::default())
                .map_err(|e| e.to_string())?;
            assert_eq!(c.api_keys.len(), 1);
            assert_eq!(c.api_keys[0].id, "dashboard-12345");
            assert_eq!(
                c.api_keys[0].institutions,
                InstitutionScope::Only([12345].into_iter().collect())
            );
            assert!(!format!("{c:?}").contains("0123456789abcdef0123"));
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env(
                "TRACKER_API_KEYS",
                r#"[{id="ops",key="fedcba9876543210",institutions=["*"]}]"#,
            );
            let c = Config::load(None, &Overrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(c.api_keys[0].institutions, InstitutionScope::All);
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env(
                "TRACKER_API_KEYS",
                r#"[{id="a",key="short",institutions=["*"]}]"#,
            );
            let e = Config::load(None, &Overrides::default()).unwrap_err();
            assert!(e.to_string().contains("api_keys"), "{e}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env(
                "TRACKER_API_KEYS",
                r#"[{id="a",key="0123456789abcdef",institutions=[1]},{id="a",key="0123456789abcdeg",institutions=[2]}]"#,
            );
            let e = Config::load(None, &Overrides::default()).unwrap_err();
            assert!(e.to_string().contains("used twice"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn secrets_do_not_show_in_debug() {
        let s = SourceConfig {
            id: "x".into(),
            token: Secret::new("supersecrettoken1234"),
            institutions: InstitutionScope::All,
            signing_secret: None,
        };
        assert!(!format!("{s:?}").contains("supersecret"));
    }
}

//! Who may call the query API: bearer keys, each scoped to institutions.
//!
//! Keys are compared as SHA-256 digests in constant time, against every
//! configured key (as webhook tokens are in [`crate::sources`]), and never
//! logged: spans name the key by its id. The institution check runs before
//! anything is read, so a key without the institution learns nothing of it,
//! not even whether it exists.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderMap};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracker_domain::InstitutionId;

use super::Failure;
use crate::config::{ApiKeyConfig, InstitutionScope};
use crate::error::ApiError;

pub struct ApiKey {
    pub id: String,
    digest: [u8; 32],
    pub institutions: InstitutionScope,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey")
            .field("id", &self.id)
            .field("institutions", &self.institutions)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
pub struct ApiKeys(Vec<ApiKey>);

impl ApiKeys {
    pub fn from_config(configs: &[ApiKeyConfig]) -> Self {
        Self(
            configs
                .iter()
                .map(|c| ApiKey {
                    id: c.id.clone(),
                    digest: Sha256::digest(c.key.expose().as_bytes()).into(),
                    institutions: c.institutions.clone(),
                })
                .collect(),
        )
    }

    /// The key this is, if any.
    pub fn find(&self, key: &str) -> Option<&ApiKey> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut found = None;
        for k in &self.0 {
            if bool::from(k.digest.ct_eq(&digest)) {
                found = Some(k);
            }
        }
        found
    }

    /// The caller's key, from `Authorization: Bearer <key>`.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<&ApiKey, Failure> {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, key) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
            })
            .filter(|k| !k.is_empty());
        let Some(presented) = presented else {
            return Err(Failure::from(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing_api_key",
                "send an API key as `Authorization: Bearer <key>`",
            ))
            .authenticate("Bearer realm=\"tracker\""));
        };
        let key = self.find(presented).ok_or_else(|| {
            Failure::from(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "this API key is not one of the configured keys",
            ))
            .authenticate("Bearer realm=\"tracker\", error=\"invalid_token\"")
        })?;
        tracing::Span::current().record("key", key.id.as_str());
        Ok(key)
    }
}

impl ApiKey {
    /// 403 unless the key holds `institution`.
    pub fn check(&self, institution: InstitutionId) -> Result<(), Failure> {
        tracing::Span::current().record("institution", institution.get());
        if self.institutions.allows(institution) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden_institution",
                format!("API key {} may not read institution {institution}", self.id),
            )
            .with_field("institution_id")
            .into())
        }
    }
}

impl ApiKey {
    /// 403 unless the key holds every institution (`institutions = ["*"]`):
    /// what reading the whole log takes.
    pub fn check_every_institution(&self) -> Result<(), Failure> {
        if self.institutions == InstitutionScope::All {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "operator_key_required",
                format!(
                    "API key {} holds only some institutions; the whole log needs a key for every institution (institutions = [\"*\"])",
                    self.id
                ),
            )
            .into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use actix_web::http::header::HeaderValue;

    fn keys() -> ApiKeys {
        ApiKeys::from_config(&[
            ApiKeyConfig {
                id: "one".into(),
                key: Secret::new("key-one-0123456789"),
                institutions: InstitutionScope::Only([7].into_iter().collect()),
            },
            ApiKeyConfig {
                id: "ops".into(),
                key: Secret::new("key-ops-0123456789"),
                institutions: InstitutionScope::All,
            },
        ])
    }

    fn with_auth(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn bearer_keys_are_found_and_scoped() {
        let keys = keys();
        let one = keys
            .authenticate(&with_auth("Bearer key-one-0123456789"))
            .unwrap();
        assert_eq!(one.id, "one");
        assert!(one.check(InstitutionId::try_from(7).unwrap()).is_ok());
        let refused = one.check(InstitutionId::try_from(8).unwrap()).unwrap_err();
        assert_eq!(refused.error.status, StatusCode::FORBIDDEN);
        let ops = keys
            .authenticate(&with_auth("bearer  key-ops-0123456789"))
            .unwrap();
        assert!(ops.check(InstitutionId::try_from(8).unwrap()).is_ok());
    }

    #[test]
    fn only_a_key_for_every_institution_reads_the_whole_log() {
        let keys = keys();
        let ops = keys
            .authenticate(&with_auth("Bearer key-ops-0123456789"))
            .unwrap();
        assert!(ops.check_every_institution().is_ok());
        let one = keys
            .authenticate(&with_auth("Bearer key-one-0123456789"))
            .unwrap();
        let refused = one.check_every_institution().unwrap_err();
        assert_eq!(refused.error.status, StatusCode::FORBIDDEN);
        assert_eq!(refused.error.code, "operator_key_required");
    }

    #[test]
    fn missing_or_unknown_keys_are_401() {
        let keys = keys();
        for h in [
            HeaderMap::new(),
            with_auth("Basic a2V5LW9uZQ=="),
            with_auth("Bearer"),
            with_auth("Bearer key-one-012345678"),
        ] {
            let e = keys.authenticate(&h).unwrap_err();
            assert_eq!(e.error.status, StatusCode::UNAUTHORIZED);
            assert!(e.www_authenticate.is_some());
        }
    }

    #[test]
    fn debug_never_shows_the_key() {
        let keys = keys();
        assert!(!format!("{keys:?}").contains("0123456789"));
    }
}

//! The configured webhook senders, looked up by the token in their URL.
//!
//! The source cannot sign or add headers, so the URL token is the credential.
//! Tokens are compared as SHA-256 digests in constant time, against every
//! source, so neither the answer time nor an early exit tells an attacker how
//! close a guess was.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{InstitutionScope, SourceConfig};
use crate::signature::{SignatureError, SigningKey};

#[derive(Debug)]
pub struct Source {
    pub id: String,
    token_digest: [u8; 32],
    pub institutions: InstitutionScope,
    pub signing_key: Option<SigningKey>,
}

#[derive(Debug, Default)]
pub struct Sources(Vec<Source>);

impl Sources {
    pub fn from_config(configs: &[SourceConfig]) -> Result<Self, SignatureError> {
        configs
            .iter()
            .map(|c| {
                Ok(Source {
                    id: c.id.clone(),
                    token_digest: Sha256::digest(c.token.expose().as_bytes()).into(),
                    institutions: c.institutions.clone(),
                    signing_key: c
                        .signing_secret
                        .as_ref()
                        .map(|s| SigningKey::parse(s.expose()))
                        .transpose()?,
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    /// The source whose token this is, if any.
    pub fn find(&self, token: &str) -> Option<&Source> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for source in &self.0 {
            if bool::from(source.token_digest.ct_eq(&digest)) {
                found = Some(source);
            }
        }
        found
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn finds_by_token_only() {
        let sources = Sources::from_config(&[
            SourceConfig {
                id: "a".into(),
                token: Secret::new("aaaaaaaaaaaaaaaaaaaa"),
                institutions: InstitutionScope::All,
                signing_secret: None,
            },
            SourceConfig {
                id: "b".into(),
                token: Secret::new("bbbbbbbbbbbbbbbbbbbb"),
                institutions: InstitutionScope::All,
                signing_secret: None,
            },
        ])
        .unwrap();
        assert_eq!(
            sources.find("bbbbbbbbbbbbbbbbbbbb").map(|s| s.id.as_str()),
            Some("b")
        );
        assert!(sources.find("bbbbbbbbbbbbbbbbbbb").is_none());
        assert!(sources.find("").is_none());
    }
}

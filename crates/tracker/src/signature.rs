//! Standard Webhooks signature verification, for deployments where a relay
//! in front of the tracker signs what the source sends unsigned.
//!
//! Headers `webhook-id`, `webhook-timestamp` (Unix seconds) and
//! `webhook-signature` (space-separated `v1,<base64>` entries, several during
//! key rotation). The signature is HMAC-SHA256 over `id.timestamp.body` with
//! the secret that follows `whsec_` (base64). Timestamps more than five
//! minutes from now are refused, which bounds replays.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How far a signed timestamp may be from our clock.
pub const TOLERANCE_SECS: i64 = 5 * 60;

#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(***)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("signing secret must be whsec_ followed by base64")]
    BadSecret,
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("webhook-timestamp is not a Unix time in seconds")]
    BadTimestamp,
    #[error("webhook-timestamp is more than five minutes from now")]
    StaleTimestamp,
    #[error("no signature in webhook-signature matches")]
    Mismatch,
}

/// The three signature headers as received.
#[derive(Debug, Clone, Copy)]
pub struct SignedHeaders<'a> {
    pub id: Option<&'a str>,
    pub timestamp: Option<&'a str>,
    pub signature: Option<&'a str>,
}

impl SigningKey {
    pub fn parse(secret: &str) -> Result<Self, SignatureError> {
        let encoded = secret
            .strip_prefix("whsec_")
            .ok_or(SignatureError::BadSecret)?;
        let key = STANDARD
            .decode(encoded)
            .map_err(|_| SignatureError::BadSecret)?;
        if key.is_empty() {
            return Err(SignatureError::BadSecret);
        }
        Ok(Self(key))
    }

    fn mac(&self, id: &str, timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
        // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.0) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC accepts keys of any length"),
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// `v1,<base64>` for this message (what a sender puts in the header).
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let tag = self.mac(id, &timestamp.to_string(), body).finalize();
        format!("v1,{}", STANDARD.encode(tag.into_bytes()))
    }

    /// Checks the headers against `body` at time `now` (Unix seconds).
    pub fn verify(
        &self,
        headers: SignedHeaders<'_>,
        body: &[u8],
        now: i64,
    ) -> Result<(), SignatureError> {
        let id = headers
            .id
            .ok_or(SignatureError::MissingHeader("webhook-id"))?;
        let ts_text = headers
            .timestamp
            .ok_or(SignatureError::MissingHeader("webhook-timestamp"))?;
        let signatures = headers
            .signature
            .ok_or(SignatureError::MissingHeader("webhook-signature"))?;
        let ts: i64 = ts_text
            .trim()
            .parse()
            .map_err(|_| SignatureError::BadTimestamp)?;
        if now.abs_diff(ts) > TOLERANCE_SECS.unsigned_abs() {
            return Err(SignatureError::StaleTimestamp);
        }
        let expected = self.mac(id, ts_text.trim(), body);
        for entry in signatures.split_whitespace() {
            let Some(("v1", encoded)) = entry.split_once(',') else {
                continue;
            };
            let Ok(given) = STANDARD.decode(encoded) else {
                continue;
            };
            // `verify_slice` compares in constant time.
            if expected.clone().verify_slice(&given).is_ok() {
                return Ok(());
            }
        }
        Err(SignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn headers<'a>(id: &'a str, ts: &'a str, sig: &'a str) -> SignedHeaders<'a> {
        SignedHeaders {
            id: Some(id),
            timestamp: Some(ts),
            signature: Some(sig),
        }
    }

    #[test]
    fn standard_webhooks_reference_vector() {
        // The example from the Standard Webhooks specification's test suite.
        let key = SigningKey::parse(SECRET).unwrap();
        let body = br#"{"test": 2432232314}"#;
        let sig = key.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        key.verify(
            headers("msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265330", &sig),
            body,
            1614265330 + 10,
        )
        .unwrap();
    }

    #[test]
    fn any_of_several_signatures_may_match() {
        let key = SigningKey::parse(SECRET).unwrap();
        let good = key.sign("id1", 1000, b"{}");
        let list = format!("v1,AAAA v2,zzz {good}");
        assert_eq!(
            key.verify(headers("id1", "1000", &list), b"{}", 1000),
            Ok(())
        );
    }

    #[test]
    fn refusals_say_why() {
        let key = SigningKey::parse(SECRET).unwrap();
        let sig = key.sign("id1", 1000, b"{}");
        assert_eq!(
            key.verify(headers("id1", "1000", &sig), b"{ }", 1000),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            key.verify(headers("id2", "1000", &sig), b"{}", 1000),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            key.verify(headers("id1", "1000", &sig), b"{}", 1000 + 301),
            Err(SignatureError::StaleTimestamp)
        );
        assert_eq!(
            key.verify(headers("id1", "1000", &sig), b"{}", 1000 - 301),
            Err(SignatureError::StaleTimestamp)
        );
        assert_eq!(
            key.verify(headers("id1", "soon", &sig), b"{}", 1000),
            Err(SignatureError::BadTimestamp)
        );
        // Timestamps at the ends of i64 are stale, not an overflow.
        for ts in [i64::MIN, i64::MAX] {
            let text = ts.to_string();
            let sig = key.sign("id1", ts, b"{}");
            assert_eq!(
                key.verify(headers("id1", &text, &sig), b"{}", 1000),
                Err(SignatureError::StaleTimestamp),
                "{ts}"
            );
        }
        let missing = SignedHeaders {
            id: Some("id1"),
            timestamp: Some("1000"),
            signature: None,
        };
        assert_eq!(
            key.verify(missing, b"{}", 1000),
            Err(SignatureError::MissingHeader("webhook-signature"))
        );
        assert_eq!(
            SigningKey::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap_err(),
            SignatureError::BadSecret
        );
    }
}

//! Request parameters: path ids, query strings and page cursors, each
//! refused with a 400 that names the parameter.
//!
//! Query strings are read into the same `IntoParams` structs the OpenAPI
//! document is generated from, so a parameter is accepted exactly when it
//! is documented: an unknown or repeated one is a 400 too (a typo such as
//! `limt=10` must not silently give the default).

use std::any::TypeId;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock, PoisonError};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracker_domain::InstitutionId;
use tracker_projections::query::{CompletionKey, SortKey};
use utoipa::IntoParams;
use utoipa::openapi::path::ParameterIn;

use super::Failure;
use actix_web::HttpRequest;

/// Rows in a page when `limit` is not given.
pub const DEFAULT_LIMIT: u32 = 50;
/// Most rows in a page.
pub const MAX_LIMIT: u32 = 1000;

/// The query string as `T`, refusing unknown, repeated and malformed
/// parameters by name.
pub fn query<T: DeserializeOwned + IntoParams + 'static>(req: &HttpRequest) -> Result<T, Failure> {
    let raw = req.query_string();
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw).map_err(|e| {
        Failure::bad_request(
            "query",
            "invalid_parameter",
            format!("unreadable query string: {e}"),
        )
    })?;
    let known = known_parameters::<T>();
    // A valid query string is read once; only a refused one is taken apart
    // below to name the parameter at fault.
    let distinct = pairs
        .iter()
        .enumerate()
        .all(|(i, (name, _))| known.contains(name) && !pairs[..i].iter().any(|(n, _)| n == name));
    if distinct && let Ok(value) = serde_urlencoded::from_str::<T>(raw) {
        return Ok(value);
    }
    let mut seen = std::collections::HashSet::new();
    for (name, value) in &pairs {
        if !known.iter().any(|k| k == name) {
            return Err(Failure::bad_request(
                name,
                "unknown_parameter",
                format!(
                    "{name:?} is not a parameter of this endpoint (known: {})",
                    known.join(", ")
                ),
            ));
        }
        if !seen.insert(name.as_str()) {
            return Err(Failure::bad_request(
                name,
                "invalid_parameter",
                format!("{name} is given more than once"),
            ));
        }
        let alone = serde_urlencoded::to_string([(name, value)]).unwrap_or_default();
        if let Err(e) = serde_urlencoded::from_str::<T>(&alone) {
            return Err(Failure::bad_request(
                name,
                "invalid_parameter",
                format!("{name}: {value:?} is not valid: {e}"),
            ));
        }
    }
    serde_urlencoded::from_str(raw)
        .map_err(|e| Failure::bad_request("query", "invalid_parameter", e.to_string()))
}

/// The documented query parameters of `T`, computed once per type
/// (`into_params` builds the whole OpenAPI description of each).
fn known_parameters<T: IntoParams + 'static>() -> &'static [String] {
    static KNOWN: OnceLock<Mutex<HashMap<TypeId, &'static [String]>>> = OnceLock::new();
    let mut known = KNOWN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    known.entry(TypeId::of::<T>()).or_insert_with(|| {
        let names: Vec<String> = T::into_params(|| Some(ParameterIn::Query))
            .into_iter()
            .map(|p| p.name)
            .collect();
        // One small slice per parameter struct, for the life of the process.
        Box::leak(names.into_boxed_slice())
    })
}

/// A positive id from the path.
pub fn path_id(req: &HttpRequest, name: &str) -> Result<u64, Failure> {
    let text = req.match_info().get(name).unwrap_or_default();
    text.parse::<u64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| {
            Failure::bad_request(
                name,
                "invalid_parameter",
                format!("{name} must be a positive integer, got {text:?}"),
            )
        })
}

pub fn institution(req: &HttpRequest) -> Result<InstitutionId, Failure> {
    let id = path_id(req, "institution_id")?;
    InstitutionId::try_from(id)
        .map_err(|e| Failure::bad_request("institution_id", "invalid_parameter", e.to_string()))
}

pub fn limit(limit: Option<u32>) -> Result<usize, Failure> {
    let limit = limit.unwrap_or(DEFAULT_LIMIT);
    if (1..=MAX_LIMIT).contains(&limit) {
        Ok(limit as usize)
    } else {
        Err(Failure::bad_request(
            "limit",
            "invalid_parameter",
            format!("limit must be between 1 and {MAX_LIMIT}, got {limit}"),
        ))
    }
}

/// Which list and sort a cursor belongs to: a cursor is refused anywhere
/// else (another institution, list, trail, learner or sort).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CursorScope {
    pub list: String,
    pub sort: &'static str,
}

impl CursorScope {
    pub fn new(list: impl Into<String>, sort: &'static str) -> Self {
        Self {
            list: list.into(),
            sort,
        }
    }
}

/// The position after which a page starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum CursorKey {
    Id { i: u64 },
    Name { v: String, i: u64 },
    Count { n: u64, i: u64 },
    Position { p: u64 },
    FinishedAt { f: DateTime<Utc>, p: u64 },
    Revision { r: u64 },
}

#[derive(Serialize, Deserialize)]
struct CursorBody {
    l: String,
    s: String,
    k: CursorKey,
}

/// The opaque text of a cursor: base64url of a small JSON document.
pub fn encode_cursor(scope: &CursorScope, key: CursorKey) -> String {
    let body = CursorBody {
        l: scope.list.clone(),
        s: scope.sort.to_owned(),
        k: key,
    };
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&body).unwrap_or_default())
}

pub fn decode_cursor(scope: &CursorScope, text: &str) -> Result<CursorKey, Failure> {
    let bytes = URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .map_err(|_| not_ours())?;
    let body: CursorBody = serde_json::from_slice(&bytes).map_err(|_| not_ours())?;
    if body.l != scope.list || body.s != scope.sort {
        return Err(Failure::bad_request(
            "cursor",
            "invalid_cursor",
            "the cursor was made for another list or sort",
        ));
    }
    Ok(body.k)
}

fn not_ours() -> Failure {
    Failure::bad_request(
        "cursor",
        "invalid_cursor",
        "the cursor is not one this API made; pass next_cursor back unchanged",
    )
}

fn foreign() -> Failure {
    Failure::bad_request(
        "cursor",
        "invalid_cursor",
        "the cursor was made for another list or sort",
    )
}

impl From<SortKey> for CursorKey {
    fn from(k: SortKey) -> Self {
        match k {
            SortKey::Id(i) => Self::Id { i },
            SortKey::Name(v, i) => Self::Name { v, i },
            SortKey::Completions(n, i) => Self::Count { n, i },
        }
    }
}

impl From<CompletionKey> for CursorKey {
    fn from(k: CompletionKey) -> Self {
        match k {
            CompletionKey::Position(p) => Self::Position { p },
            CompletionKey::FinishedAt(f, p) => Self::FinishedAt { f, p },
        }
    }
}

impl CursorKey {
    pub fn sort_key(self) -> Result<SortKey, Failure> {
        match self {
            Self::Id { i } => Ok(SortKey::Id(i)),
            // No stored name holds NUL (ingest refuses it), and PostgreSQL
            // refuses it as a parameter: only a hand-made cursor has one.
            Self::Name { v, .. } if v.contains('\0') => Err(not_ours()),
            Self::Name { v, i } => Ok(SortKey::Name(v, i)),
            Self::Count { n, i } => Ok(SortKey::Completions(n, i)),
            _ => Err(foreign()),
        }
    }

    pub fn completion_key(self) -> Result<CompletionKey, Failure> {
        match self {
            Self::Position { p } => Ok(CompletionKey::Position(p)),
            // Stored finish times are whole seconds; the backends would
            // compare a fraction differently (SQLite as text cut to the
            // second, PostgreSQL as the instant). A year past 9999 can end
            // a page of rows an earlier build projected: it is ours.
            Self::FinishedAt { f, .. } if f.timestamp_subsec_nanos() != 0 => Err(not_ours()),
            Self::FinishedAt { f, p } => Ok(CompletionKey::FinishedAt(f, p)),
            _ => Err(foreign()),
        }
    }

    pub fn position(self) -> Result<u64, Failure> {
        match self {
            Self::Position { p } => Ok(p),
            _ => Err(foreign()),
        }
    }

    pub fn revision(self) -> Result<u64, Failure> {
        match self {
            Self::Revision { r } => Ok(r),
            _ => Err(foreign()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_stay_in_their_list() {
        let scope = CursorScope::new("trails/7", "name");
        let text = encode_cursor(
            &scope,
            CursorKey::Name {
                v: "Ciência de Dados".into(),
                i: 3,
            },
        );
        assert!(
            text.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(
            decode_cursor(&scope, &text).unwrap().sort_key().unwrap(),
            SortKey::Name("Ciência de Dados".into(), 3)
        );
        for other in [
            CursorScope::new("trails/8", "name"),
            CursorScope::new("trails/7", "id"),
            CursorScope::new("courses/7", "name"),
        ] {
            let e = decode_cursor(&other, &text).unwrap_err();
            assert_eq!(e.error.field.as_deref(), Some("cursor"));
        }
        for junk in [
            "",
            "!!!",
            "bm90IGpzb24",
            &URL_SAFE_NO_PAD.encode("{\"l\":1}"),
        ] {
            assert!(decode_cursor(&scope, junk).is_err(), "{junk}");
        }
    }

    /// Keys no page of ours ends with, which the backends would read
    /// differently: a name with NUL, a finish time that is not a whole
    /// second.
    #[test]
    fn hand_made_keys_the_backends_disagree_on_are_refused() {
        let names = CursorScope::new("learners/7", "name");
        let text = encode_cursor(
            &names,
            CursorKey::Name {
                v: "Ana\0".into(),
                i: 3,
            },
        );
        let e = decode_cursor(&names, &text)
            .and_then(CursorKey::sort_key)
            .unwrap_err();
        assert_eq!(
            (e.error.code, e.error.field.as_deref()),
            ("invalid_cursor", Some("cursor"))
        );

        let times = CursorScope::new("completions/7", "finished_at");
        let at = |text: &str| CursorKey::FinishedAt {
            f: text.parse().unwrap(),
            p: 9,
        };
        let text = encode_cursor(&times, at("2024-01-01T10:00:00.5Z"));
        let e = decode_cursor(&times, &text)
            .and_then(CursorKey::completion_key)
            .unwrap_err();
        assert_eq!(e.error.code, "invalid_cursor");
        // Whole seconds are ours, past year 9999 too (a page can end on a
        // row an earlier build projected there).
        for good in ["2024-01-01T10:00:00Z", "+10000-01-01T02:59:59Z"] {
            let text = encode_cursor(&times, at(good));
            assert!(
                decode_cursor(&times, &text)
                    .and_then(CursorKey::completion_key)
                    .is_ok(),
                "{good}"
            );
        }
    }

    #[test]
    fn limits_outside_the_range_are_refused() {
        assert_eq!(limit(None).unwrap(), 50);
        assert_eq!(limit(Some(1000)).unwrap(), 1000);
        assert!(limit(Some(0)).is_err());
        assert!(limit(Some(1001)).is_err());
    }
}

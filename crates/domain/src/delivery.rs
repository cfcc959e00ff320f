//! Parsing a webhook body into a [`Delivery`].
//!
//! The wire shape is `{ "event": { "slug", "send_at", ... }, "data": { ... } }`.
//! `activities.trail.completed` is parsed strictly into a [`TrailCompleted`];
//! any other slug is accepted with only its envelope checked (`event.slug`,
//! an object `data`) and kept whole, with `data.institution.id` and
//! `data.user.id` where they read as ids (numbers or digit strings).
//! Every refusal names the JSON path of the offending field.

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::event::{Course, Learner, OtherEvent, TrailCompleted, TrailInfo};
use crate::ids::{CourseId, IdError, InstitutionId, TrailId, UserId};
use crate::time::{SourceTime, SourceTimeZone, TimeError};

/// What kind of mistake a delivery has; stable, for clients to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The body is not JSON at all.
    InvalidJson,
    MissingField,
    WrongType,
    InvalidId,
    InvalidTimestamp,
    InvalidSlug,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::MissingField => "missing_field",
            Self::WrongType => "wrong_type",
            Self::InvalidId => "invalid_id",
            Self::InvalidTimestamp => "invalid_timestamp",
            Self::InvalidSlug => "invalid_slug",
        }
    }
}

/// Why a body is not a delivery.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// Not JSON (or not UTF-8): the sender's bug, answered 400.
    #[error("body is not valid JSON: {0}")]
    NotJson(String),
    /// JSON, but not a delivery: answered 422 naming the field.
    #[error("{field} {message}")]
    Invalid {
        code: ErrorCode,
        /// JSON path of the offending value, e.g. `data.trail.finished_at`.
        field: String,
        message: String,
    },
}

impl DeliveryError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::NotJson(_) => ErrorCode::InvalidJson,
            Self::Invalid { code, .. } => *code,
        }
    }

    pub fn field(&self) -> Option<&str> {
        match self {
            Self::NotJson(_) => None,
            Self::Invalid { field, .. } => Some(field),
        }
    }
}

/// What a delivery says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    TrailCompleted(TrailCompleted),
    Other(OtherEvent),
}

/// A checked delivery, ready to be recorded.
#[derive(Debug, Clone)]
pub struct ParsedDelivery {
    pub delivery: Delivery,
    /// The JSON document as received (the body without surrounding white space).
    pub document: Box<RawValue>,
    /// `sha256:<hex>` of `document`.
    pub content_hash: String,
}

impl ParsedDelivery {
    pub fn event_id(&self) -> Uuid {
        match &self.delivery {
            Delivery::TrailCompleted(e) => e.event_id(),
            Delivery::Other(e) => e.event_id(),
        }
    }

    pub fn stream(&self) -> String {
        match &self.delivery {
            Delivery::TrailCompleted(e) => e.stream(),
            Delivery::Other(e) => e.stream(),
        }
    }

    pub fn event_type(&self) -> &str {
        match &self.delivery {
            Delivery::TrailCompleted(_) => TrailCompleted::EVENT_TYPE,
            Delivery::Other(e) => e.event_type(),
        }
    }

    pub fn schema_version(&self) -> u32 {
        match &self.delivery {
            Delivery::TrailCompleted(_) => TrailCompleted::SCHEMA_VERSION,
            Delivery::Other(_) => OtherEvent::SCHEMA_VERSION,
        }
    }

    /// The institution the delivery is for; another slug may name none.
    pub fn institution_id(&self) -> Option<InstitutionId> {
        match &self.delivery {
            Delivery::TrailCompleted(e) => Some(e.institution_id),
            Delivery::Other(e) => e.institution_id,
        }
    }

    pub fn slug(&self) -> &str {
        match &self.delivery {
            Delivery::TrailCompleted(_) => TrailCompleted::SLUG,
            Delivery::Other(e) => &e.slug,
        }
    }

    /// The event data to record (see [`crate::event`]).
    pub fn event_data(&self, zone: &SourceTimeZone) -> Result<String, serde_json::Error> {
        match &self.delivery {
            Delivery::TrailCompleted(e) => e.to_data(zone.name(), &self.document),
            Delivery::Other(e) => e.to_data(&self.document),
        }
    }
}

/// Parses a webhook body. Times are resolved in `zone`.
pub fn parse_delivery(body: &[u8], zone: &SourceTimeZone) -> Result<ParsedDelivery, DeliveryError> {
    let text =
        std::str::from_utf8(body).map_err(|e| DeliveryError::NotJson(format!("not UTF-8: {e}")))?;
    let text = text.trim_matches(|c: char| matches!(c, ' ' | '\t' | '\n' | '\r'));
    let UniqueKeys(root) =
        serde_json::from_str(text).map_err(|e| DeliveryError::NotJson(e.to_string()))?;
    let document = RawValue::from_string(text.to_owned())
        .map_err(|e| DeliveryError::NotJson(e.to_string()))?;

    let root = Obj::root(&root)?;
    let event = root.object("event")?;
    let slug = event.string("slug")?;
    check_slug(slug, &event.path("slug"))?;
    let data = root.object("data")?;

    let delivery = if slug == TrailCompleted::SLUG {
        let institution_id = data.object("institution")?.id("id", InstitutionId::parse)?;
        Delivery::TrailCompleted(parse_trail_completed(institution_id, &event, &data, zone)?)
    } else {
        // Never refused for the shape of its data: the institution and the
        // learner are taken where they can be read, else left out.
        let data_value = root.get("data").unwrap_or(&Value::Null);
        Delivery::Other(OtherEvent {
            slug: slug.to_owned(),
            institution_id: lenient_id(data_value, "institution", InstitutionId::parse),
            user_id: lenient_id(data_value, "user", UserId::parse),
            data_digest: Sha256::digest(canonical_json(data_value).as_bytes()).into(),
        })
    };

    let content_hash = format!(
        "sha256:{}",
        hex::encode(Sha256::digest(document.get().as_bytes()))
    );
    Ok(ParsedDelivery {
        delivery,
        document,
        content_hash,
    })
}

/// A JSON document as a [`Value`], refusing an object that names a key
/// twice. RFC 8259 leaves such a document's meaning to each reader: serde
/// keeps the last value, others the first, so the typed fact (and the
/// institution a source is allowed to post for) could disagree with what a
/// reader of the verbatim copy sees.
struct UniqueKeys(Value);

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_any(UniqueKeysVisitor)
            .map(UniqueKeys)
    }
}

/// Builds the [`Value`] serde_json's own visitor would, but for repeated
/// keys, and for the key serde_json reserves for its `RawValue` (its own
/// visitor reads that one's string as embedded JSON; here it is a key like
/// any other).
struct UniqueKeysVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueKeysVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(UniqueKeys(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format_args!(
                    "the key {key:?} appears twice in one object"
                )));
            }
            let UniqueKeys(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

fn parse_trail_completed(
    institution_id: InstitutionId,
    event: &Obj<'_>,
    data: &Obj<'_>,
    zone: &SourceTimeZone,
) -> Result<TrailCompleted, DeliveryError> {
    let send_at = event.time("send_at", zone)?;
    let user = data.object("user")?;
    let user = Learner {
        id: user.id("id", UserId::parse)?,
        name: user.string("name")?.to_owned(),
        email: user.string("email")?.to_owned(),
    };
    let trail = data.object("trail")?;
    let courses = trail
        .array("courses")?
        .map(|course| {
            let course = course?;
            Ok(Course {
                id: course.id("id", CourseId::parse)?,
                title: course.string("title")?.to_owned(),
            })
        })
        .collect::<Result<Vec<_>, DeliveryError>>()?;
    let finished_at = trail.time("finished_at", zone)?;
    Ok(TrailCompleted {
        institution_id,
        user,
        trail: TrailInfo {
            id: trail.id("id", TrailId::parse)?,
            name: trail.string("name")?.to_owned(),
            courses,
        },
        finished_at,
        send_at,
    })
}

/// `data.<object>.id` of another slug, if it reads as an id: a positive
/// number, or a string of digits (some slugs write their ids as strings).
fn lenient_id<T>(data: &Value, object: &str, parse: fn(&Value) -> Result<T, IdError>) -> Option<T> {
    match data.get(object)?.get("id")? {
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            parse(&Value::from(s.parse::<u64>().ok()?)).ok()
        }
        other => parse(other).ok(),
    }
}

/// Slugs name event types and streams: keep them to printable ASCII words,
/// and never the name of a type this tracker records itself.
fn check_slug(slug: &str, field: &str) -> Result<(), DeliveryError> {
    if slug == TrailCompleted::EVENT_TYPE {
        return Err(invalid(
            ErrorCode::InvalidSlug,
            field,
            format!("{slug:?} is the name of a recorded event type, not a slug"),
        ));
    }
    let ok = !slug.is_empty()
        && slug.len() <= 128
        && slug
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            ErrorCode::InvalidSlug,
            field,
            "must be 1 to 128 characters of letters, digits, '.', '_' or '-'".to_owned(),
        ))
    }
}

fn invalid(code: ErrorCode, field: &str, message: String) -> DeliveryError {
    DeliveryError::Invalid {
        code,
        field: field.to_owned(),
        message,
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A JSON object and the path that led to it, so errors can name fields.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

impl<'a> Obj<'a> {
    fn root(v: &'a Value) -> Result<Self, DeliveryError> {
        match v {
            Value::Object(map) => Ok(Self {
                map,
                path: String::new(),
            }),
            other => Err(invalid(
                ErrorCode::WrongType,
                "$",
                format!("must be an object, got {}", type_name(other)),
            )),
        }
    }

    fn path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key)
    }

    fn required(&self, key: &str) -> Result<&'a Value, DeliveryError> {
        match self.map.get(key) {
            Some(v) if !v.is_null() => Ok(v),
            _ => Err(invalid(
                ErrorCode::MissingField,
                &self.path(key),
                "is required".to_owned(),
            )),
        }
    }

    fn wrong_type(&self, key: &str, wanted: &str, got: &Value) -> DeliveryError {
        invalid(
            ErrorCode::WrongType,
            &self.path(key),
            format!("must be {wanted}, got {}", type_name(got)),
        )
    }

    fn object(&self, key: &str) -> Result<Obj<'a>, DeliveryError> {
        match self.required(key)? {
            Value::Object(map) => Ok(Obj {
                map,
                path: self.path(key),
            }),
            other => Err(self.wrong_type(key, "an object", other)),
        }
    }

    fn string(&self, key: &str) -> Result<&'a str, DeliveryError> {
        match self.required(key)? {
            // NUL is valid JSON but no text column (PostgreSQL's included)
            // can hold it, and no name or title means it.
            Value::String(s) if s.contains('\0') => Err(invalid(
                ErrorCode::WrongType,
                &self.path(key),
                "must not contain the NUL character (\\u0000)".to_owned(),
            )),
            Value::String(s) => Ok(s),
            other => Err(self.wrong_type(key, "a string", other)),
        }
    }

    fn id<T>(
        &self,
        key: &str,
        parse: fn(&Value) -> Result<T, IdError>,
    ) -> Result<T, DeliveryError> {
        parse(self.required(key)?)
            .map_err(|e| invalid(ErrorCode::InvalidId, &self.path(key), e.to_string()))
    }

    fn time(&self, key: &str, zone: &SourceTimeZone) -> Result<SourceTime, DeliveryError> {
        SourceTime::parse(self.string(key)?, zone).map_err(|e: TimeError| {
            invalid(ErrorCode::InvalidTimestamp, &self.path(key), e.to_string())
        })
    }

    fn array(
        &self,
        key: &str,
    ) -> Result<impl Iterator<Item = Result<Obj<'a>, DeliveryError>> + 'a, DeliveryError> {
        let items = match self.required(key)? {
            Value::Array(items) => items,
            other => return Err(self.wrong_type(key, "an array", other)),
        };
        let base = self.path(key);
        Ok(items.iter().enumerate().map(move |(i, item)| {
            let path = format!("{base}[{i}]");
            match item {
                Value::Object(map) => Ok(Obj { map, path }),
                other => Err(invalid(
                    ErrorCode::WrongType,
                    &path,
                    format!("must be an object, got {}", type_name(other)),
                )),
            }
        }))
    }
}

/// JSON with object keys sorted and no white space: the same content always
/// gives the same text, whatever order or spacing the sender used.
fn canonical_json(v: &Value) -> String {
    fn write(v: &Value, out: &mut String) {
        match v {
            Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                out.push('{');
                for (i, (k, v)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push(':');
                    write(v, out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(item, out);
                }
                out.push(']');
            }
            scalar => out.push_str(&scalar.to_string()),
        }
    }
    let mut out = String::new();
    write(v, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const DOCUMENTED: &str = include_str!("../../../tests/fixtures/trail-completed.json");
    const MULTI: &str = include_str!("../../../tests/fixtures/trail-completed-multi-course.json");
    const OTHER: &str = include_str!("../../../tests/fixtures/course-completed-other-slug.json");

    fn sp() -> SourceTimeZone {
        SourceTimeZone::default()
    }

    fn parse(body: &str) -> Result<ParsedDelivery, DeliveryError> {
        parse_delivery(body.as_bytes(), &sp())
    }

    fn trail(p: &ParsedDelivery) -> &TrailCompleted {
        match &p.delivery {
            Delivery::TrailCompleted(t) => t,
            Delivery::Other(o) => panic!("expected a trail completion, got {o:?}"),
        }
    }

    /// The documented example with one value replaced (or removed, for `None`).
    fn documented_with(path: &[&str], value: Option<Value>) -> String {
        let mut root: Value = serde_json::from_str(DOCUMENTED).unwrap();
        let mut at = &mut root;
        for key in &path[..path.len() - 1] {
            at = match key.parse::<usize>() {
                Ok(i) => &mut at[i],
                Err(_) => &mut at[*key],
            };
        }
        let last = path[path.len() - 1];
        let obj = at.as_object_mut().unwrap();
        match value {
            Some(v) => obj.insert(last.to_owned(), v),
            None => obj.remove(last),
        };
        root.to_string()
    }

    #[test]
    fn documented_example() {
        let p = parse(DOCUMENTED).unwrap();
        let t = trail(&p);
        assert_eq!(t.institution_id.get(), 12345);
        assert_eq!(t.user.id.get(), 123456798);
        assert_eq!(t.user.name, "Student");
        assert_eq!(t.user.email, "student@toolzz.com");
        assert_eq!(t.trail.id.get(), 987654);
        assert_eq!(t.trail.name, "Trail Name");
        assert_eq!(t.trail.courses.len(), 1);
        assert_eq!(t.trail.courses[0].id.get(), 123456);
        assert_eq!(t.trail.courses[0].title, "Course Name");
        assert_eq!(t.finished_at.raw(), "2022-03-10 18:56:47");
        assert_eq!(
            t.finished_at.utc().to_rfc3339(),
            "2022-03-10T21:56:47+00:00"
        );
        assert_eq!(t.send_at.raw(), "2022-03-10 18:56:47");
        assert_eq!(p.event_type(), "TrailCompleted");
        assert_eq!(p.stream(), "learner-12345-123456798");
        // The document is kept exactly as received.
        assert_eq!(p.document.get(), DOCUMENTED.trim());
        assert_eq!(
            p.content_hash,
            format!("sha256:{}", hex::encode(Sha256::digest(DOCUMENTED.trim())))
        );
    }

    #[test]
    fn accents_and_several_courses_are_kept_as_sent() {
        let p = parse(MULTI).unwrap();
        let t = trail(&p);
        assert_eq!(t.user.name, "João Conceição da Silva");
        assert_eq!(t.trail.name, "Formação em Ciência de Dados — Módulo 1");
        let titles: Vec<_> = t.trail.courses.iter().map(|c| c.title.as_str()).collect();
        assert_eq!(
            titles,
            [
                "Estatística Básica",
                "Python para Análise",
                "Visualização de Dados"
            ]
        );
        // Just after midnight in São Paulo is 03:29:58 UTC the same day.
        assert_eq!(
            t.finished_at.utc().to_rfc3339(),
            "2024-11-03T03:29:58+00:00"
        );
    }

    #[test]
    fn other_slugs_are_kept_on_their_learner_or_institution_stream() {
        let p = parse(OTHER).unwrap();
        match &p.delivery {
            Delivery::Other(o) => {
                assert_eq!(o.slug, "activities.course.completed");
                assert_eq!(o.institution_id.map(InstitutionId::get), Some(4401));
                assert_eq!(o.user_id.map(UserId::get), Some(90017));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(p.event_type(), "activities.course.completed");
        assert_eq!(p.stream(), "learner-4401-90017");
        // A shape nothing knows yet, with no user: kept on the institution stream.
        let p = parse(r#"{"event":{"slug":"shop.product.redemption"},"data":{"institution":{"id":9},"whatever":[1,{"x":null}]}}"#).unwrap();
        assert_eq!(p.stream(), "institution-9");
        assert_eq!(p.event_type(), "shop.product.redemption");
    }

    /// Ids already recorded must stay what they were: redeliveries of them
    /// are recognised by these values (computed by the code before other
    /// slugs could name no institution).
    #[test]
    fn other_slug_ids_and_streams_are_pinned() {
        let p = parse(OTHER).unwrap();
        assert_eq!(
            (p.event_id().to_string(), p.stream()),
            (
                "66a58fae-d8f7-5aa9-aca7-f38525fe8e29".into(),
                "learner-4401-90017".into()
            )
        );
        let p = parse(r#"{"event":{"slug":"shop.product.redemption"},"data":{"institution":{"id":9},"whatever":[1,{"x":null}]}}"#).unwrap();
        assert_eq!(
            (p.event_id().to_string(), p.stream()),
            (
                "e17d2cd0-f142-5d60-9cc2-19996a805bd8".into(),
                "institution-9".into()
            )
        );
    }

    #[test]
    fn other_slug_ids_follow_content_not_spacing_or_send_at() {
        let a = parse(r#"{"event":{"slug":"members.updated","send_at":"01/02/2024 10:00:00"},"data":{"institution":{"id":9},"user":{"id":5,"name":"A"}}}"#).unwrap();
        let b = parse(r#"{ "data": { "user": { "name": "A", "id": 5 }, "institution": { "id": 9 } }, "event": { "slug": "members.updated", "send_at": "02/02/2024 11:00:00" } }"#).unwrap();
        let c = parse(r#"{"event":{"slug":"members.updated"},"data":{"institution":{"id":9},"user":{"id":5,"name":"B"}}}"#).unwrap();
        assert_eq!(a.event_id(), b.event_id());
        assert_ne!(a.event_id(), c.event_id());
    }

    #[test]
    fn event_id_is_deterministic_and_ignores_send_at() {
        let a = parse(DOCUMENTED).unwrap();
        let again = parse(&documented_with(
            &["event", "send_at"],
            Some(json!("2022-03-11 08:00:00")),
        ))
        .unwrap();
        assert_eq!(a.event_id(), again.event_id());
        // Stable across versions of this code: auditors and dedup rely on it.
        assert_eq!(a.event_id().get_version_num(), 5);
        let later = parse(&documented_with(
            &["data", "trail", "finished_at"],
            Some(json!("2022-04-01 10:00:00")),
        ))
        .unwrap();
        assert_ne!(a.event_id(), later.event_id());
        for (path, v) in [
            (&["data", "institution", "id"][..], json!(2)),
            (&["data", "user", "id"][..], json!(2)),
            (&["data", "trail", "id"][..], json!(2)),
        ] {
            let other = parse(&documented_with(path, Some(v))).unwrap();
            assert_ne!(a.event_id(), other.event_id(), "{path:?}");
        }
    }

    #[test]
    fn not_json_is_its_own_error() {
        // The source's own Portuguese page shows this trailing comma.
        let body = r#"{ "event": { "slug": "activities.trail.completed" }, "data": { "institution": { "id": 12345, } } }"#;
        assert!(matches!(parse(body), Err(DeliveryError::NotJson(_))));
        assert!(matches!(parse(""), Err(DeliveryError::NotJson(_))));
        assert!(matches!(
            parse_delivery(&[0xff, 0xfe, b'{', b'}'], &sp()),
            Err(DeliveryError::NotJson(_))
        ));
        assert_eq!(parse("{").unwrap_err().code(), ErrorCode::InvalidJson);
    }

    #[test]
    fn a_key_named_twice_in_one_object_is_refused_wherever_it_is() {
        let documented = include_str!("../../../tests/fixtures/trail-completed.json");
        let other = include_str!("../../../tests/fixtures/course-completed-other-slug.json");
        for (body, key) in [
            (
                documented.replacen(r#""id": 12345"#, r#""id": 12345, "id": 999"#, 1),
                "id",
            ),
            (
                documented.replacen(r#""event": {"#, r#""event": {"slug": "x.y","#, 1),
                "slug",
            ),
            (
                other.replacen(r#""data": {"#, r#""data": {"a": 1, "a": 1,"#, 1),
                "a",
            ),
        ] {
            assert_ne!(body, documented);
            match parse(&body) {
                Err(DeliveryError::NotJson(message)) => assert!(
                    message.contains(&format!("the key \"{key}\" appears twice in one object")),
                    "{message}"
                ),
                other => panic!("expected a refusal of the repeated {key:?}, got {other:?}"),
            }
        }
        // The same keys in different objects are fine, and the document
        // reads as serde_json's own `Value` would read it.
        let parsed = parse(documented).unwrap();
        let value: Value = serde_json::from_str(documented).unwrap();
        let UniqueKeys(strict) = serde_json::from_str(documented).unwrap();
        assert_eq!(strict, value);
        assert_eq!(parsed.document.get(), documented.trim());
        let scalars = r#"{"a": [1, -2, 3.5, -0.0, 1e300, 18446744073709551615, null, true, "s\u00e9"], "b": {}}"#;
        let UniqueKeys(strict) = serde_json::from_str(scalars).unwrap();
        let value: Value = serde_json::from_str(scalars).unwrap();
        assert_eq!(strict, value);
    }

    #[test]
    fn each_bad_field_is_named() {
        use ErrorCode::*;
        let cases: Vec<(Vec<&str>, Option<Value>, ErrorCode, &str)> = vec![
            (vec!["event"], None, MissingField, "event"),
            (vec!["event"], Some(json!("x")), WrongType, "event"),
            (vec!["event", "slug"], None, MissingField, "event.slug"),
            (
                vec!["event", "slug"],
                Some(json!(7)),
                WrongType,
                "event.slug",
            ),
            (
                vec!["event", "slug"],
                Some(json!("")),
                InvalidSlug,
                "event.slug",
            ),
            (
                vec!["event", "slug"],
                Some(json!("a b")),
                InvalidSlug,
                "event.slug",
            ),
            (
                vec!["event", "send_at"],
                None,
                MissingField,
                "event.send_at",
            ),
            (
                vec!["event", "send_at"],
                Some(json!("10/03/2022 18:56:47")),
                InvalidTimestamp,
                "event.send_at",
            ),
            (vec!["data"], None, MissingField, "data"),
            (vec!["data"], Some(json!([])), WrongType, "data"),
            (
                vec!["data", "institution"],
                None,
                MissingField,
                "data.institution",
            ),
            (
                vec!["data", "institution", "id"],
                None,
                MissingField,
                "data.institution.id",
            ),
            (
                vec!["data", "institution", "id"],
                Some(json!(0)),
                InvalidId,
                "data.institution.id",
            ),
            (
                vec!["data", "institution", "id"],
                Some(json!("12345")),
                InvalidId,
                "data.institution.id",
            ),
            (vec!["data", "user"], None, MissingField, "data.user"),
            (
                vec!["data", "user", "id"],
                Some(json!(-1)),
                InvalidId,
                "data.user.id",
            ),
            (
                vec!["data", "user", "id"],
                Some(json!(1.5)),
                InvalidId,
                "data.user.id",
            ),
            (
                vec!["data", "user", "name"],
                None,
                MissingField,
                "data.user.name",
            ),
            (
                vec!["data", "user", "email"],
                Some(json!(null)),
                MissingField,
                "data.user.email",
            ),
            (
                vec!["data", "user", "email"],
                Some(json!(["a"])),
                WrongType,
                "data.user.email",
            ),
            (
                vec!["data", "user", "name"],
                Some(json!("a\u{0}b")),
                WrongType,
                "data.user.name",
            ),
            (vec!["data", "trail"], None, MissingField, "data.trail"),
            (
                vec!["data", "trail", "id"],
                Some(json!(true)),
                InvalidId,
                "data.trail.id",
            ),
            (
                vec!["data", "trail", "name"],
                Some(json!(5)),
                WrongType,
                "data.trail.name",
            ),
            (
                vec!["data", "trail", "finished_at"],
                None,
                MissingField,
                "data.trail.finished_at",
            ),
            (
                vec!["data", "trail", "finished_at"],
                Some(json!("2022-02-30 10:00:00")),
                InvalidTimestamp,
                "data.trail.finished_at",
            ),
            (
                vec!["data", "trail", "finished_at"],
                Some(json!("2022-03-10 25:00:00")),
                InvalidTimestamp,
                "data.trail.finished_at",
            ),
            (
                vec!["data", "trail", "finished_at"],
                Some(json!("2022-03-10T18:56:47Z")),
                InvalidTimestamp,
                "data.trail.finished_at",
            ),
            (
                vec!["data", "trail", "courses"],
                None,
                MissingField,
                "data.trail.courses",
            ),
            (
                vec!["data", "trail", "courses"],
                Some(json!({})),
                WrongType,
                "data.trail.courses",
            ),
            (
                vec!["data", "trail", "courses"],
                Some(json!([1])),
                WrongType,
                "data.trail.courses[0]",
            ),
            (
                vec!["data", "trail", "courses", "0", "id"],
                None,
                MissingField,
                "data.trail.courses[0].id",
            ),
            (
                vec!["data", "trail", "courses", "0", "title"],
                Some(json!(3)),
                WrongType,
                "data.trail.courses[0].title",
            ),
        ];
        for (path, value, code, field) in cases {
            let body = documented_with(&path, value.clone());
            match parse(&body) {
                Err(e @ DeliveryError::Invalid { .. }) => {
                    assert_eq!(
                        (e.code(), e.field()),
                        (code, Some(field)),
                        "{path:?} = {value:?}"
                    );
                }
                other => panic!("{path:?} = {value:?}: expected a refusal, got {other:?}"),
            }
        }
        assert_eq!(parse("[1]").unwrap_err().field(), Some("$"));
    }

    #[test]
    fn other_slugs_need_only_the_envelope() {
        let other = |data: &str| {
            let body = format!(r#"{{"event":{{"slug":"members.created"}},"data":{data}}}"#);
            let p = parse(&body).unwrap_or_else(|e| panic!("{data}: {e:?}"));
            (
                p.institution_id().map(InstitutionId::get),
                match &p.delivery {
                    Delivery::Other(e) => e.user_id.map(UserId::get),
                    Delivery::TrailCompleted(_) => panic!("{data}: a trail completion"),
                },
                p.stream(),
            )
        };
        assert_eq!(
            other("{}"),
            (None, None, "no-institution-members.created".into())
        );
        assert_eq!(
            other(r#"{"user":{"id":7}}"#),
            (None, Some(7), "no-institution-members.created-7".into())
        );
        assert_eq!(
            other(r#"{"institution":{"id":"12"},"user":{"id":"x"}}"#),
            (Some(12), None, "institution-12".into())
        );
        assert_eq!(
            other(r#"{"institution":{"id":12},"user":{"id":"0034"}}"#),
            (Some(12), Some(34), "learner-12-34".into())
        );
        assert_eq!(
            other(r#"{"institution":[{"id":1}],"user":{"id":-1}}"#),
            (None, None, "no-institution-members.created".into())
        );
        // The envelope itself is still checked.
        let no_data = parse(r#"{"event":{"slug":"members.created"}}"#).unwrap_err();
        assert_eq!(no_data.field(), Some("data"));
        let no_slug = parse(r#"{"event":{},"data":{}}"#).unwrap_err();
        assert_eq!(no_slug.field(), Some("event.slug"));
    }

    #[test]
    fn a_slug_may_not_take_a_recorded_event_type() {
        let body = r#"{"event":{"slug":"TrailCompleted"},"data":{"institution":{"id":1}}}"#;
        let e = parse(body).unwrap_err();
        assert_eq!(
            (e.code(), e.field()),
            (ErrorCode::InvalidSlug, Some("event.slug"))
        );
    }

    #[test]
    fn recorded_data_keeps_the_delivery_verbatim() {
        let body = "{\"event\":{\"slug\":\"activities.trail.completed\",\"send_at\":\"2022-03-10 18:56:47\"},  \"data\":{\"institution\":{\"id\":1},\"user\":{\"id\":2,\"name\":\"Zoë \\\"Q\\\" 🎓\",\"email\":\"z@x\"},\"trail\":{\"id\":3,\"name\":\"T\",\"finished_at\":\"2022-03-10 18:56:47\",\"courses\":[]}}}\n";
        let p = parse(body).unwrap();
        let data = p.event_data(&sp()).unwrap();
        let back: Value = serde_json::from_str(&data).unwrap();
        assert_eq!(back["source_timezone"], "America/Sao_Paulo");
        assert_eq!(back["finished_at"]["utc"], "2022-03-10T21:56:47Z");
        #[derive(serde::Deserialize)]
        struct D<'a> {
            #[serde(borrow)]
            delivery: &'a RawValue,
        }
        let d: D<'_> = serde_json::from_str(&data).unwrap();
        assert_eq!(d.delivery.get(), body.trim());
        let t = TrailCompleted::from_data(1, &data).unwrap();
        assert_eq!(&t, trail(&p));
        assert_eq!(t.user.name, "Zoë \"Q\" 🎓");
        assert!(TrailCompleted::from_data(2, &data).is_err());
    }

    fn arb_text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>().prop_map(|s| s.replace('\0', "")),
            "[a-zA-Zçãéô \"\\\\🎓-]{0,30}"
        ]
    }

    fn arb_time() -> impl Strategy<Value = String> {
        (
            1970i32..2100,
            1u32..=12,
            1u32..=28,
            0u32..24,
            0u32..60,
            0u32..60,
        )
            .prop_map(|(y, mo, d, h, mi, s)| format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}"))
    }

    proptest! {
        /// Any valid delivery survives parse -> event -> JSON -> event unchanged.
        #[test]
        fn valid_deliveries_round_trip(
            inst in 1u64..=u64::MAX,
            user in 1u64..=u64::MAX,
            trail_id in 1u64..=u64::MAX,
            name in arb_text(),
            email in arb_text(),
            trail_name in arb_text(),
            courses in proptest::collection::vec((1u64..=u64::MAX, arb_text()), 0..10),
            finished in arb_time(),
            sent in arb_time(),
        ) {
            let body = json!({
                "event": {"name": "Atividades - Trilha concluída", "slug": "activities.trail.completed", "send_at": sent},
                "data": {
                    "institution": {"id": inst},
                    "user": {"id": user, "name": name, "email": email},
                    "trail": {
                        "id": trail_id, "name": trail_name, "finished_at": finished,
                        "courses": courses.iter().map(|(id, t)| json!({"id": id, "title": t})).collect::<Vec<_>>(),
                    }
                }
            }).to_string();
            let p = parse(&body).unwrap();
            let t = trail(&p).clone();
            prop_assert_eq!(t.user.name.as_str(), name.as_str());
            prop_assert_eq!(t.trail.courses.len(), courses.len());
            prop_assert_eq!(t.finished_at.raw(), finished.as_str());
            let data = p.event_data(&sp()).unwrap();
            let back = TrailCompleted::from_data(TrailCompleted::SCHEMA_VERSION, &data).unwrap();
            prop_assert_eq!(&back, &t);
            prop_assert_eq!(back.event_id(), p.event_id());
        }
    }
}

//! The OpenAPI 3.1 document of the query API, generated from the handlers'
//! annotations and served at `GET /openapi.json` (no key needed).

use std::sync::OnceLock;

use actix_web::HttpResponse;
use actix_web::http::header;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::{dto, events, models};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Learning-progress tracker: query API",
        version = "1",
        description = "Read models (summary, trails, courses, learners, completions, activity) and the raw event log of one institution at a time, and the whole event log for operators.

Every `/v1` request needs `Authorization: Bearer <key>`; a key only reads the institutions it holds (403 otherwise, before anything is read). The whole log (`/v1/events`) needs a key that holds every institution.

Read-model answers carry `X-Consistent-Through`: every event up to that log position is reflected. `min_position` (e.g. a webhook answer's `position`) waits up to `wait_ms` for the read model to reach it, else 503 `not_caught_up` with the position reached.

Lists are pages: `limit` (1-1000, default 50) and the opaque `next_cursor` passed back as `cursor`. Default sorts are on immutable keys (ids, positions): walking every page yields every row that existed when the walk began exactly once, even while events arrive. Sorts on names or completion counts are live orderings: a row whose value changes between two pages may move; use the default sort for exact exports. `Accept: text/csv` gives the same rows as CSV with a header row (the cursor in `X-Next-Cursor`); a cell starting with `=`, `+`, `-`, `@`, a tab or a carriage return gets a leading `'` so that spreadsheets read it as text, not a formula.

Errors: `{\"error\": {\"code\", \"message\", \"field\"}}`. An institution with no completion projected yet is 404 on every read-model endpoint."
    ),
    paths(
        models::summary,
        models::trails,
        models::trail,
        models::trail_learners,
        models::courses,
        models::learners,
        models::learner,
        models::completions,
        models::activity,
        events::log_events,
        events::institution_events,
        events::learner_events,
    ),
    components(schemas(dto::ErrorBody, dto::ErrorDetail)),
    modifiers(&BearerAuth),
    tags(
        (name = "read models", description = "Projections of the completions, with the checkpoint they were read at."),
        (name = "raw events", description = "The event log itself, for audits.")
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The document as served.
pub fn json() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| ApiDoc::openapi().to_pretty_json().unwrap_or_default())
}

pub async fn document() -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "application/json"))
        .body(json())
}

//! The served OpenAPI document and the real answers agree: every answer's
//! status, content type, headers and JSON body (validated with the
//! `jsonschema` crate against the document's own schemas, with no
//! undeclared property allowed) are as documented, for every endpoint.

use std::collections::BTreeSet;

use serde_json::{Value, json};
use tracker::server::StartOptions;

use crate::api::{known_app, trail_done};
use crate::support::*;

struct Doc(Value);

/// `schema` with `additionalProperties: false` on every object that lists
/// its properties: an answer may not carry a field the document omits.
fn closed(schema: &Value) -> Value {
    match schema {
        Value::Object(map) => {
            let mut out: serde_json::Map<String, Value> =
                map.iter().map(|(k, v)| (k.clone(), closed(v))).collect();
            if out.contains_key("properties") && !out.contains_key("additionalProperties") {
                out.insert("additionalProperties".into(), Value::Bool(false));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(closed).collect()),
        other => other.clone(),
    }
}

impl Doc {
    fn operation(&self, template: &str) -> &Value {
        let op = &self.0["paths"][template]["get"];
        assert!(op.is_object(), "{template} is not documented");
        op
    }

    /// Checks one real answer against the document; returns the documented
    /// (template, status) it matched.
    fn check(
        &self,
        template: &str,
        status: u16,
        headers: &reqwest::header::HeaderMap,
        body: &str,
    ) -> (String, u16) {
        let response = &self.operation(template)["responses"][status.to_string()];
        assert!(
            response.is_object(),
            "{template}: status {status} is not documented ({body})"
        );
        let content_type = headers["content-type"].to_str().unwrap();
        let media = content_type.split(';').next().unwrap().trim();
        let content = &response["content"][media];
        assert!(
            content.is_object(),
            "{template} {status}: content type {media} is not documented"
        );
        for (name, _) in response["headers"].as_object().into_iter().flatten() {
            let always = match name.as_str() {
                "X-Next-Cursor" => false,
                "X-Consistent-Through" => !template.ends_with("/events"),
                _ => true,
            };
            if always {
                assert!(
                    headers.contains_key(name.as_str()),
                    "{template} {status}: documented header {name} missing"
                );
            }
        }
        if media == "application/json" {
            let root = json!({
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "components": closed(&self.0["components"]),
                "allOf": [closed(&content["schema"])],
            });
            let validator = jsonschema::options()
                .should_validate_formats(true)
                .build(&root)
                .unwrap_or_else(|e| panic!("{template}: the document's schema is invalid: {e}"));
            let instance: Value = serde_json::from_str(body).unwrap();
            let errors: Vec<String> = validator
                .iter_errors(&instance)
                .map(|e| format!("{} at {}", e, e.instance_path()))
                .collect();
            assert!(
                errors.is_empty(),
                "{template} {status}: the answer breaks the document: {errors:?}\n{body}"
            );
        }
        (template.to_owned(), status)
    }
}

fn templates() -> Vec<&'static str> {
    vec![
        "/v1/institutions/{institution_id}/summary",
        "/v1/institutions/{institution_id}/trails",
        "/v1/institutions/{institution_id}/trails/{trail_id}",
        "/v1/institutions/{institution_id}/trails/{trail_id}/learners",
        "/v1/institutions/{institution_id}/courses",
        "/v1/institutions/{institution_id}/learners",
        "/v1/institutions/{institution_id}/learners/{user_id}",
        "/v1/institutions/{institution_id}/completions",
        "/v1/institutions/{institution_id}/activity",
        "/v1/institutions/{institution_id}/events",
        "/v1/institutions/{institution_id}/learners/{user_id}/events",
        "/v1/events",
    ]
}

/// The key that reads `template`: the whole log needs an operator key.
fn reader(template: &str) -> &'static str {
    if template == "/v1/events" {
        OPERATOR_KEY
    } else {
        KEY_100
    }
}

fn fill(template: &str, institution: u64) -> String {
    template
        .replace("{institution_id}", &institution.to_string())
        .replace("{trail_id}", "10")
        .replace("{user_id}", "1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_document_and_the_answers_agree() {
    let app = known_app().await;
    let res = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200, "served without a key");
    let doc = Doc(res.json().await.unwrap());
    assert_eq!(doc.0["openapi"], "3.1.0");
    assert_eq!(
        doc.0["components"]["securitySchemes"]["bearer"],
        json!({"type": "http", "scheme": "bearer"})
    );
    let documented: BTreeSet<String> = doc.0["paths"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let ours: BTreeSet<String> = templates().into_iter().map(str::to_owned).collect();
    assert_eq!(documented, ours);

    let mut seen = BTreeSet::new();
    for template in templates() {
        let op = doc.operation(template);
        assert_eq!(op["security"], json!([{"bearer": []}]), "{template}");
        for status in ["200", "400", "401", "403", "404", "503"] {
            let documented = op["responses"][status].is_object();
            // Only the event logs (an institution's, the whole) answer no 404.
            let expected = !(status == "404"
                && (template.ends_with("{institution_id}/events") || template == "/v1/events"));
            assert!(documented || !expected, "{template}: {status} undocumented");
        }
        let path = fill(template, 100);
        let accepts: Vec<&str> = op["responses"]["200"]["content"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        for accept in accepts {
            let (status, headers, body) = app
                .api_get(&path, Some(reader(template)), Some(accept))
                .await;
            assert_eq!(status, 200, "{path} as {accept}: {body}");
            assert!(
                headers["content-type"]
                    .to_str()
                    .unwrap()
                    .starts_with(accept)
            );
            seen.insert(doc.check(template, status, &headers, &body));
        }
        // A second page, where there is one.
        if op["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "cursor")
        {
            let (_, _, first) = app
                .api_get(&format!("{path}?limit=1"), Some(reader(template)), None)
                .await;
            let first: Value = serde_json::from_str(&first).unwrap();
            if let Some(cursor) = first["next_cursor"].as_str() {
                let (status, headers, body) = app
                    .api_get(
                        &format!("{path}?limit=1&cursor={cursor}"),
                        Some(reader(template)),
                        None,
                    )
                    .await;
                seen.insert(doc.check(template, status, &headers, &body));
            }
        }
        // Every documented parameter is accepted with a valid value.
        for p in op["parameters"].as_array().unwrap() {
            if p["in"] != "query" || p["name"] == "cursor" {
                continue;
            }
            let name = p["name"].as_str().unwrap();
            let schema = &p["schema"];
            let value = match (schema["type"].as_str(), schema["format"].as_str()) {
                (_, Some("date-time")) => "2024-01-01T00:00:00Z".to_owned(),
                (_, Some("date")) => "2024-01-01".to_owned(),
                (Some("integer"), _) => schema["minimum"].as_u64().unwrap_or(1).max(1).to_string(),
                (Some("string"), _) if schema["enum"].is_array() => {
                    schema["enum"][0].as_str().unwrap().to_owned()
                }
                other => panic!("{template}: parameter {name} of an unexpected type {other:?}"),
            };
            let url = format!("{path}?{name}={value}");
            let (status, headers, body) = app.api_get(&url, Some(reader(template)), None).await;
            assert!(status == 200 || status == 404, "{url}: {status} {body}");
            doc.check(template, status, &headers, &body);
        }
        // The errors.
        let mut errors: Vec<(String, Option<&str>)> = vec![
            (format!("{path}?unknown=1"), Some(reader(template))),
            (path.clone(), None),
            (path.clone(), Some("wrong-key-0123456789")),
        ];
        if template.contains("{institution_id}") {
            errors.push((fill(template, 10), Some(KEY_100)));
            errors.push((fill(template, 555), Some(OPERATOR_KEY)));
        } else {
            // The whole log with an institution's key.
            errors.push((path.clone(), Some(KEY_100)));
        }
        if template.contains("{trail_id}") || template.contains("{user_id}") {
            errors.push((
                path.replace("/trails/10", "/trails/99")
                    .replace("/learners/1", "/learners/99"),
                Some(OPERATOR_KEY),
            ));
        }
        for (url, key) in errors {
            let (status, headers, body) = app.api_get(&url, key, None).await;
            assert!(
                status >= 400 || url.contains("/555/events"),
                "{url}: {status}"
            );
            seen.insert(doc.check(template, status, &headers, &body));
        }
    }
    for template in templates() {
        for status in [200, 400, 401, 403] {
            assert!(
                seen.contains(&(template.to_owned(), status)),
                "{template} {status} never checked"
            );
        }
    }
    app.stop().await;

    // 503 `not_caught_up`: a tracker whose projections do not run.
    let idle = TestApp::spawn_with_options(
        |c| c.api_keys = api_keys(),
        StartOptions {
            handle_signals: false,
            workers: Some(2),
            projector: false,
        },
    )
    .await;
    let (status, _) = idle
        .post(
            TOKEN,
            &trail_done(100, 1, 10, "2024-01-01 09:00:00", &[(1, "A")]),
        )
        .await;
    assert_eq!(status, 200);
    for template in templates().into_iter().filter(|t| !t.ends_with("/events")) {
        let url = format!("{}?min_position=1&wait_ms=20", fill(template, 100));
        let (status, headers, body) = idle.api_get(&url, Some(KEY_100), None).await;
        assert_eq!(status, 503, "{url}: {body}");
        doc.check(template, status, &headers, &body);
    }
    idle.stop().await;
}

//! `exactly health`: whether each endpoint is ready, by the standard gRPC health check (a node
//! answers `SERVING` exactly when its `/readyz` says ready). For scripts and container
//! healthchecks: exit 0 only when every endpoint asked is serving.

use exactly_client::Client;
use serde::Serialize;

use crate::output::{emit, emit_json, Table};

/// One or more endpoints are not serving (or did not answer): exit code 3, like a cluster
/// that cannot be reached.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotReady(pub String);

#[derive(Serialize)]
struct View<'a> {
    endpoint: &'a str,
    serving: bool,
    error: Option<String>,
}

/// What each endpoint said: "serving", "not serving", or the failure.
fn render(answers: &[(String, Result<bool, exactly_client::Error>)]) -> String {
    let mut table = Table::new(&["ENDPOINT", "HEALTH"]);
    for (endpoint, answer) in answers {
        let health = match answer {
            Ok(true) => "serving".to_string(),
            Ok(false) => "not serving".to_string(),
            Err(e) => format!("no answer: {e}"),
        };
        table.row(vec![endpoint.clone(), health]);
    }
    table.render()
}

pub async fn run(client: &Client, json: bool) -> anyhow::Result<()> {
    let answers = client.health().await;
    if json {
        let views: Vec<View<'_>> = answers
            .iter()
            .map(|(endpoint, answer)| View {
                endpoint,
                serving: matches!(answer, Ok(true)),
                error: answer.as_ref().err().map(ToString::to_string),
            })
            .collect();
        emit_json(&views)?;
    } else {
        emit(&render(&answers))?;
    }
    let down: Vec<&str> = answers
        .iter()
        .filter(|(_, a)| !matches!(a, Ok(true)))
        .map(|(e, _)| e.as_str())
        .collect();
    if down.is_empty() {
        Ok(())
    } else {
        Err(NotReady(format!("not serving: {}", down.join(", "))).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_render_one_line_per_endpoint() {
        let text = render(&[
            ("http://127.0.0.1:7101".into(), Ok(true)),
            ("http://127.0.0.1:7102".into(), Ok(false)),
            (
                "http://127.0.0.1:7103".into(),
                Err(exactly_client::Error::Config("down".into())),
            ),
        ]);
        assert!(text.contains("7101") && text.contains("serving"), "{text}");
        assert!(text.contains("not serving"), "{text}");
        assert!(
            text.contains("no answer") && text.contains("down"),
            "{text}"
        );
    }
}

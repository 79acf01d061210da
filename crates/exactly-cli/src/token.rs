//! `exactly token`: bearer tokens for the public API. `new` makes one offline, with the
//! `[[tokens]]` entry (its SHA-256 digest, never the token) that every node's configuration or
//! tokens file needs; `issue`, `revoke` and `list` manage the tokens the cluster keeps in its
//! replicated state (an admin token is needed, and the nodes need configured tokens).

use std::time::Duration;

use clap::Subcommand;
use exactly_client::{Client, TokenInfo};

use crate::output::{emit, emit_json, time_ms, Table};
use crate::UsageError;

#[derive(Subcommand, Debug, PartialEq)]
pub enum TokenCommand {
    /// Make a new random token and print it once, with the `[[tokens]]` entry for the nodes.
    New {
        /// Who holds it (shown in logs and refusals): 1-64 printable characters, no spaces.
        #[arg(long)]
        name: String,
        /// What it may do (repeatable): submit, submit:<queue>, read, operate (cancel, redrive,
        /// pause, drain; includes read) or admin (everything).
        #[arg(long = "scope", required = true, value_name = "SCOPE")]
        scopes: Vec<String>,
    },
    /// Issue a token through the API: the cluster keeps its digest, every node admits it at
    /// once (no config change, no restart), and the token is printed once. Needs an admin token.
    Issue {
        /// Who holds it (shown in logs, refusals and the audit trail): 1-64 printable
        /// characters, no spaces.
        #[arg(long)]
        name: String,
        /// What it may do (repeatable): submit, submit:<queue>, read, operate or admin.
        #[arg(long = "scope", required = true, value_name = "SCOPE")]
        scopes: Vec<String>,
        /// Nodes refuse it after this long (for example 30d, 12h); without it, it never expires.
        #[arg(long, value_name = "DURATION", value_parser = crate::submit::parse_positive_duration)]
        expires_in: Option<Duration>,
    },
    /// Revoke a token issued through the API: every node refuses it once it applied the
    /// revocation. Needs an admin token.
    Revoke {
        /// The token's name.
        name: String,
    },
    /// The issued tokens and the answering node's configured ones (never their secrets).
    List,
}

impl TokenCommand {
    /// Whether it runs without a cluster.
    pub fn offline(&self) -> bool {
        matches!(self, TokenCommand::New { .. })
    }
}

/// Checks a scope as a node will (`exactly_node::auth::Scope`).
fn check_scope(scope: &str) -> Result<(), String> {
    match scope {
        "submit" | "read" | "operate" | "admin" => Ok(()),
        other => match other.strip_prefix("submit:") {
            Some(queue) if !queue.is_empty() && !queue.chars().any(char::is_control) => Ok(()),
            _ => Err(format!(
                "scope {other:?}: scopes are submit, submit:<queue>, read, operate and admin"
            )),
        },
    }
}

/// A TOML basic string (the name and scopes are printable, but may hold quotes).
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn check_name_and_scopes(name: &str, scopes: &[String]) -> Result<(), UsageError> {
    if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(UsageError(format!(
            "--name {name:?}: 1-64 printable ASCII characters without spaces"
        )));
    }
    for scope in scopes {
        check_scope(scope).map_err(UsageError)?;
    }
    Ok(())
}

/// `exactly token new` (offline).
pub fn run(command: &TokenCommand, json: bool) -> anyhow::Result<()> {
    let TokenCommand::New { name, scopes } = command else {
        unreachable!("only `new` runs offline");
    };
    check_name_and_scopes(name, scopes)?;
    let token = exactly_client::token::generate();
    let sha256 = exactly_client::token::digest_hex(&token);
    if json {
        println!(
            "{}",
            serde_json::json!({"name": name, "token": token, "sha256": sha256, "scopes": scopes})
        );
        return Ok(());
    }
    let scopes = scopes
        .iter()
        .map(|s| toml_string(s))
        .collect::<Vec<_>>()
        .join(", ");
    println!("token: {token}");
    println!(
        "(shown once: give it to the client as EXACTLY_TOKEN or --token; it cannot be recovered)"
    );
    println!();
    println!(
        "# add to every node's config file or --tokens-file, then restart the nodes one at a time:"
    );
    println!("[[tokens]]");
    println!("name = {}", toml_string(name));
    println!("sha256 = \"{sha256}\"");
    println!("scopes = [{scopes}]");
    Ok(())
}

#[derive(serde::Serialize)]
struct TokenView<'a> {
    name: &'a str,
    scopes: &'a [String],
    source: &'a str,
    issued_at_ms: u64,
    issued_by: &'a str,
    /// 0: never.
    expires_at_ms: u64,
}

impl<'a> From<&'a TokenInfo> for TokenView<'a> {
    fn from(t: &'a TokenInfo) -> Self {
        Self {
            name: &t.name,
            scopes: &t.scopes,
            source: &t.source,
            issued_at_ms: t.issued_at_ms,
            issued_by: &t.issued_by,
            expires_at_ms: t.expires_at_ms,
        }
    }
}

pub fn render(tokens: &[TokenInfo]) -> String {
    if tokens.is_empty() {
        return "no tokens: this node admits every caller\n".into();
    }
    let mut table = Table::new(&["NAME", "SCOPES", "SOURCE", "ISSUED", "BY", "EXPIRES"]);
    for t in tokens {
        let when = |ms: u64, none: &str| {
            if ms == 0 {
                none.to_string()
            } else {
                time_ms(ms)
            }
        };
        table.row(vec![
            t.name.clone(),
            t.scopes.join(","),
            t.source.clone(),
            when(t.issued_at_ms, "-"),
            if t.issued_by.is_empty() {
                "-".into()
            } else {
                t.issued_by.clone()
            },
            when(t.expires_at_ms, "never"),
        ]);
    }
    table.render()
}

/// `exactly token issue`, `revoke` and `list`.
pub async fn run_online(client: &Client, command: &TokenCommand, json: bool) -> anyhow::Result<()> {
    match command {
        TokenCommand::New { .. } => run(command, json),
        TokenCommand::Issue {
            name,
            scopes,
            expires_in,
        } => {
            check_name_and_scopes(name, scopes)?;
            let expires_at_ms = match expires_in {
                Some(d) => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default();
                    Some(crate::submit::millis(now + *d))
                }
                None => None,
            };
            let token = exactly_client::token::generate();
            let digest = exactly_client::token::digest(&token);
            let info = client
                .issue_token(name, digest, scopes, expires_at_ms)
                .await?;
            if json {
                let mut view = serde_json::to_value(TokenView::from(&info))?;
                view["token"] = serde_json::Value::String(token);
                return emit_json(&view);
            }
            let mut out = format!("token: {token}\n");
            out.push_str(
                "(shown once: give it to the client as EXACTLY_TOKEN or --token; it cannot be \
                 recovered, only revoked with `exactly token revoke`)\n\n",
            );
            out.push_str(&render(std::slice::from_ref(&info)));
            emit(&out)
        }
        TokenCommand::Revoke { name } => {
            client.revoke_token(name).await?;
            if json {
                return emit_json(&serde_json::json!({ "revoked": name }));
            }
            emit(&format!("revoked token {name:?}\n"))
        }
        TokenCommand::List => {
            let tokens = client.list_tokens().await?;
            if json {
                let views: Vec<TokenView<'_>> = tokens.iter().map(TokenView::from).collect();
                return emit_json(&views);
            }
            emit(&render(&tokens))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_checked_before_a_token_is_made() {
        for good in ["submit", "submit:emails", "read", "operate", "admin"] {
            assert!(check_scope(good).is_ok(), "{good}");
        }
        for bad in ["write", "submit:", "submit:a\u{7}", "Admin", ""] {
            assert!(check_scope(bad).is_err(), "{bad:?}");
        }
        let bad = TokenCommand::New {
            name: "web app".into(),
            scopes: vec!["read".into()],
        };
        assert!(run(&bad, false).unwrap_err().is::<UsageError>());
        assert_eq!(toml_string(r#"a"b\c"#), r#""a\"b\\c""#);
    }

    #[test]
    fn tokens_render_as_a_table() {
        assert!(render(&[]).contains("admits every caller"));
        let text = render(&[
            TokenInfo {
                name: "root".into(),
                scopes: vec!["admin".into()],
                source: "config".into(),
                ..Default::default()
            },
            TokenInfo {
                name: "ci".into(),
                scopes: vec!["submit:emails".into(), "read".into()],
                source: "api".into(),
                issued_at_ms: 1_700_000_000_000,
                issued_by: "root".into(),
                expires_at_ms: 0,
            },
        ]);
        assert!(text.contains("submit:emails,read"), "{text}");
        assert!(
            text.contains("2023-11-14T22:13:20") && text.contains("never"),
            "{text}"
        );
        assert!(text.lines().nth(1).unwrap().contains("root"), "{text}");
    }
}

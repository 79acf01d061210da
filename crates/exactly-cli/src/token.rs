//! `exactly token new`: a bearer token for the public API, and the `[[tokens]]` entry (its
//! SHA-256 digest, never the token) that every node's configuration or tokens file needs.

use clap::Subcommand;

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

pub fn run(command: &TokenCommand, json: bool) -> anyhow::Result<()> {
    let TokenCommand::New { name, scopes } = command;
    if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(UsageError(format!(
            "--name {name:?}: 1-64 printable ASCII characters without spaces"
        ))
        .into());
    }
    for scope in scopes {
        check_scope(scope).map_err(UsageError)?;
    }
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
}

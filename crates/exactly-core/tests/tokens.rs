//! Tokens issued and revoked through the API, and the record of a node's admission: applied only
//! inside `Audited`, checked whole, bounded, and recorded in the audit trail.

mod common;

use std::collections::BTreeMap;

use common::{Harness, NOW};
use exactly_core::access::{Scope, TokenGrant};
use exactly_core::limits::ISSUED_TOKENS_MAX;
use exactly_core::{Audited, Command, JoinNote, Rejection, Response};
use proptest::prelude::*;

fn audited(by: &str, command: Command) -> Command {
    Command::Audited(Box::new(Audited {
        by: by.into(),
        command,
    }))
}

fn grant(name: &str, secret: u8) -> TokenGrant {
    TokenGrant {
        name: name.into(),
        sha256: [secret; 32],
        scopes: vec![Scope::Submit(Some("emails".into())), Scope::Read],
        expires_at_ms: None,
    }
}

fn issue(h: &mut Harness, now: u64, g: TokenGrant) -> Result<(), Rejection> {
    match h.apply(now, audited("root", Command::IssueToken(g))).0 {
        Response::TokenChanged(r) => r,
        other => panic!("expected TokenChanged, got {other:?}"),
    }
}

fn revoke(h: &mut Harness, now: u64, name: &str) -> Result<(), Rejection> {
    match h
        .apply(now, audited("root", Command::RevokeToken(name.into())))
        .0
    {
        Response::TokenChanged(r) => r,
        other => panic!("expected TokenChanged, got {other:?}"),
    }
}

/// An issued token is kept with who issued it and when, by name; a second one with the same
/// name or the same secret, or one that expired already, is refused and changes nothing but the
/// trail; a revoked one is gone, and its name is free again.
#[test]
fn tokens_are_issued_and_revoked_once() {
    let mut h = Harness::new();
    assert_eq!(issue(&mut h, NOW, grant("web", 1)), Ok(()));
    let kept = &h.table.issued_tokens()["web"];
    assert_eq!(kept.issued_by, "root");
    assert_eq!(kept.issued_at_ms, NOW);
    assert_eq!(kept.sha256, [1; 32]);
    assert_eq!(kept.expires_at_ms, None);

    let before = h.table.issued_tokens().clone();
    assert_eq!(
        issue(&mut h, NOW + 1, grant("web", 2)),
        Err(Rejection::TokenExists("web".into()))
    );
    assert_eq!(
        issue(&mut h, NOW + 1, grant("other", 1)),
        Err(Rejection::TokenDigestInUse)
    );
    let past = TokenGrant {
        expires_at_ms: Some(NOW),
        ..grant("late", 3)
    };
    assert!(matches!(
        issue(&mut h, NOW + 1, past),
        Err(Rejection::Invalid(why)) if why.contains("past")
    ));
    let no_scope = TokenGrant {
        scopes: vec![],
        ..grant("none", 4)
    };
    assert!(matches!(
        issue(&mut h, NOW + 1, no_scope),
        Err(Rejection::Invalid(_))
    ));
    assert_eq!(h.table.issued_tokens(), &before);

    assert_eq!(revoke(&mut h, NOW + 2, "web"), Ok(()));
    assert!(h.table.issued_tokens().is_empty());
    assert_eq!(
        revoke(&mut h, NOW + 3, "web"),
        Err(Rejection::UnknownToken("web".into()))
    );
    assert_eq!(issue(&mut h, NOW + 4, grant("web", 2)), Ok(()));

    let trail: Vec<(String, String)> = h
        .table
        .audit()
        .iter()
        .map(|r| (r.action.clone(), r.outcome.clone()))
        .collect();
    assert_eq!(
        trail[0],
        (
            "issue token \"web\" (submit:emails, read)".to_string(),
            "done".to_string()
        )
    );
    assert_eq!(trail.len(), 8);
    assert!(trail[1]
        .1
        .starts_with("refused: a token named \"web\" exists"));
    assert_eq!(trail[5], ("revoke token \"web\"".into(), "done".into()));
    assert!(trail[6].1.starts_with("refused: no token named"));
}

/// Issuing, revoking and admitting are administrators' acts: bare (not inside `Audited`, which
/// names who asked) they are refused whole.
#[test]
fn bare_token_commands_are_refused() {
    let mut h = Harness::new();
    h.apply(NOW, Command::Cancel(vec![]));
    let before = h.table.clone();
    let note = JoinNote {
        node: 4,
        addr: "127.0.0.1:7004".into(),
        voter: false,
        new_member: true,
    };
    for bare in [
        Command::IssueToken(grant("web", 1)),
        Command::RevokeToken("web".into()),
        Command::Joined(note.clone()),
    ] {
        match h.apply(NOW, bare).0 {
            Response::Refused(Rejection::Invalid(why)) => {
                assert!(why.contains("only inside Audited"), "{why}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    assert_eq!(h.table, before);

    let (response, effects) = h.apply(NOW, audited("node-2", Command::Joined(note)));
    assert_eq!(response, Response::Empty);
    assert!(effects.is_empty());
    let record = h.table.audit().back().cloned().unwrap();
    assert_eq!(record.by, "node-2");
    assert_eq!(record.action, "admit node 4 (127.0.0.1:7004) as a learner");
    assert_eq!(record.outcome, "done");
}

/// The cluster keeps at most `ISSUED_TOKENS_MAX` issued tokens.
#[test]
fn issued_tokens_are_bounded() {
    let mut h = Harness::new();
    for i in 0..ISSUED_TOKENS_MAX {
        let mut g = grant(&format!("t{i}"), 1);
        g.sha256[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
        assert_eq!(issue(&mut h, NOW, g), Ok(()));
    }
    assert_eq!(
        issue(&mut h, NOW, grant("one-more", 9)),
        Err(Rejection::TooManyTokens(ISSUED_TOKENS_MAX))
    );
    assert_eq!(revoke(&mut h, NOW, "t7"), Ok(()));
    assert_eq!(issue(&mut h, NOW, grant("one-more", 9)), Ok(()));
}

#[derive(Clone, Debug)]
enum Op {
    Issue {
        name: u8,
        secret: u8,
        expires_in: Option<i64>,
    },
    Revoke(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..6, 1u8..8, proptest::option::of(-5i64..50)).prop_map(|(name, secret, expires_in)| Op::Issue { name, secret, expires_in }),
        2 => (0u8..6).prop_map(Op::Revoke),
    ]
}

proptest! {
    /// Against a model (a map of name to secret): every issue and revoke answers as the model
    /// says, and the table holds exactly the model's tokens (the harness checks every invariant,
    /// distinct digests included, after each entry).
    #[test]
    fn issued_tokens_follow_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        let mut h = Harness::new();
        let mut model: BTreeMap<String, u8> = BTreeMap::new();
        for (step, op) in ops.into_iter().enumerate() {
            let now = NOW + step as u64 * 10;
            match op {
                Op::Issue { name, secret, expires_in } => {
                    let name = format!("n{name}");
                    let expires_at_ms = expires_in.map(|d| (now as i64 + d) as u64);
                    let expect = if expires_at_ms.is_some_and(|at| at <= now) {
                        "invalid"
                    } else if model.contains_key(&name) {
                        "exists"
                    } else if model.values().any(|&s| s == secret) {
                        "digest"
                    } else {
                        "ok"
                    };
                    let got = issue(&mut h, now, TokenGrant {
                        expires_at_ms,
                        ..grant(&name, secret)
                    });
                    let said = match &got {
                        Ok(()) => "ok",
                        Err(Rejection::Invalid(_)) => "invalid",
                        Err(Rejection::TokenExists(_)) => "exists",
                        Err(Rejection::TokenDigestInUse) => "digest",
                        Err(other) => panic!("unexpected {other:?}"),
                    };
                    prop_assert_eq!(said, expect, "step {}", step);
                    if got.is_ok() {
                        model.insert(name, secret);
                    }
                }
                Op::Revoke(name) => {
                    let name = format!("n{name}");
                    let got = revoke(&mut h, now, &name);
                    prop_assert_eq!(got.is_ok(), model.remove(&name).is_some(), "step {}", step);
                }
            }
            let held: BTreeMap<String, u8> = h
                .table
                .issued_tokens()
                .iter()
                .map(|(n, t)| (n.clone(), t.sha256[0]))
                .collect();
            prop_assert_eq!(&held, &model, "step {}", step);
        }
    }
}

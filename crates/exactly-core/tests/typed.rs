//! Every typed proposal reads the reply `apply` gives its command: accepted and refused, bare
//! and audited, so no caller of `Proposal::reply` ever meets a response it cannot read.

mod common;

use common::{assignment, completion, new_job, registration, spec, succeeded, Harness};
use exactly_core::access::{Scope, TokenGrant};
use exactly_core::schedule::Fire;
use exactly_core::{
    Command, DeadFilter, DrainNode, Expiry, JoinNote, LeaveReason, NodeLease, NodeRegistration,
    Proposal, QueuePatch, Renewal, Response, Retention,
};

const T0: u64 = 1_767_225_600_000;

/// Applies the proposal's command and reads the reply; fails the test if it cannot be read.
fn check<T: std::fmt::Debug>(h: &mut Harness, name: &str, proposal: Proposal<T>) -> T {
    let (response, _) = h.apply(T0, proposal.command().clone());
    match proposal.reply(response) {
        Ok(reply) => reply,
        Err(response) => panic!("{name}: apply answered {response:?}, which it cannot read"),
    }
}

fn filter(all: bool) -> DeadFilter {
    DeadFilter {
        all,
        max: 10,
        ..DeadFilter::default()
    }
}

#[test]
fn each_proposal_gets_its_reply() {
    let mut h = Harness::new();
    h.apply(T0, registration(1, 1, 4));
    let groups = vec![
        vec![new_job("q", "noop", b"1"); 2],
        vec![new_job("q", "", b"2")],
    ];
    let results = check(&mut h, "submit groups", Proposal::submit_groups(groups));
    assert!(
        results[0].iter().all(|r| r.is_ok()) && results[1][0].is_err(),
        "{results:?}"
    );
    h.apply(T0, Command::Submit(vec![new_job("q", "noop", b"3")]));
    let lease = NodeLease {
        node: 1,
        incarnation: 1,
    };

    // The node's own and the leader's commands, bare.
    let assigned = check(
        &mut h,
        "assign",
        Proposal::assign(vec![assignment(1, 1, 1)]),
    );
    assert_eq!(assigned.accepted, 1);
    let token = h.index;
    let refused = check(
        &mut h,
        "assign again",
        Proposal::assign(vec![assignment(1, 1, 1)]),
    );
    assert_eq!(refused.rejected.len(), 1);
    let done = completion(1, token, succeeded(b""));
    assert_eq!(
        check(&mut h, "complete", Proposal::complete(vec![done.clone()])).accepted,
        1
    );
    assert_eq!(
        check(&mut h, "complete again", Proposal::complete(vec![done]))
            .rejected
            .len(),
        1
    );
    let renewal = Renewal {
        lease,
        applied: u64::MAX,
    };
    check(&mut h, "renew", Proposal::renew(renewal)).expect("renewed");
    let unknown = Renewal {
        lease: NodeLease {
            node: 9,
            incarnation: 1,
        },
        applied: 0,
    };
    check(&mut h, "renew unknown", Proposal::renew(unknown)).expect_err("unknown node");
    let registration = NodeRegistration {
        node: 2,
        incarnation: 1,
        slots: 2,
        addr: "10.0.0.2:7000".into(),
        applied: u64::MAX,
    };
    check(&mut h, "register", Proposal::register(registration.clone())).expect("registered");
    let registered_at = h.index;
    let stale = NodeRegistration {
        incarnation: 0,
        ..registration
    };
    check(&mut h, "register stale", Proposal::register(stale)).expect_err("older incarnation");
    let expiry = Expiry {
        lease: NodeLease {
            node: 2,
            incarnation: 1,
        },
        renewed_index: registered_at,
    };
    check(&mut h, "expire", Proposal::expire(expiry)).expect("expired");
    let unknown = Expiry {
        lease: NodeLease {
            node: 9,
            incarnation: 1,
        },
        renewed_index: 1,
    };
    check(&mut h, "expire unknown", Proposal::expire(unknown)).expect_err("unknown node");
    let retention = Retention {
        finished_before_ms: T0 + 1,
        dead_before_ms: T0 + 1,
        keys_before_ms: T0 + 1,
        max: 100,
    };
    assert_eq!(check(&mut h, "retain", Proposal::retain(retention)).jobs, 1);
    check(
        &mut h,
        "add schedule",
        Proposal::add_schedule(spec("nightly", "0 3 * * *")),
    )
    .expect("added");
    let fires = vec![Fire {
        name: "nightly".into(),
        tick_ms: T0,
    }];
    assert_eq!(check(&mut h, "fire", Proposal::fire(fires)).len(), 1);
    check(
        &mut h,
        "node left (still registered, not leaving)",
        Proposal::node_left(1),
    )
    .expect_err("not leaving");

    // The operators' commands, audited and bare where apply takes them bare.
    let by = || "ops".to_string();
    for audited in [false, true] {
        let results = check(
            &mut h,
            "cancel",
            audit(audited, Proposal::cancel(vec![2, 404])),
        );
        assert_eq!(results.len(), 2);
        check(
            &mut h,
            "redrive",
            audit(audited, Proposal::redrive(filter(true))),
        )
        .expect("all");
        check(
            &mut h,
            "redrive bad",
            audit(audited, Proposal::redrive(filter(false))),
        )
        .expect_err("empty filter");
        check(
            &mut h,
            "purge",
            audit(audited, Proposal::purge_dead(filter(true))),
        )
        .expect("all");
        let patch = QueuePatch {
            paused: Some(audited),
            ..QueuePatch::default()
        };
        check(
            &mut h,
            "queue",
            audit(audited, Proposal::configure_queue("q".into(), patch)),
        )
        .expect("configured");
        let name = format!("s{audited}");
        check(
            &mut h,
            "add",
            audit(audited, Proposal::add_schedule(spec(&name, "* * * * *"))),
        )
        .expect("added");
        check(
            &mut h,
            "add twice",
            audit(audited, Proposal::add_schedule(spec(&name, "* * * * *"))),
        )
        .expect_err("exists");
        check(
            &mut h,
            "pause",
            audit(audited, Proposal::pause_schedule(name.clone(), true)),
        )
        .expect("paused");
        check(
            &mut h,
            "remove",
            audit(audited, Proposal::remove_schedule(name.clone())),
        )
        .expect("removed");
        check(
            &mut h,
            "remove twice",
            audit(audited, Proposal::remove_schedule(name)),
        )
        .expect_err("gone");
        let drain = DrainNode {
            node: 1,
            deadline_after_ms: 1000,
            reason: LeaveReason::Drained,
        };
        check(&mut h, "drain", audit(audited, Proposal::drain(drain))).expect("draining");
    }
    // Only audited: the token commands and the join note.
    let grant = TokenGrant {
        name: "ci".into(),
        sha256: [7; 32],
        scopes: vec![Scope::Read],
        expires_at_ms: None,
    };
    check(
        &mut h,
        "issue",
        Proposal::issue_token(grant.clone()).audited(by()),
    )
    .expect("issued");
    check(
        &mut h,
        "issue twice",
        Proposal::issue_token(grant).audited(by()),
    )
    .expect_err("exists");
    check(
        &mut h,
        "revoke",
        Proposal::revoke_token("ci".into()).audited(by()),
    )
    .expect("revoked");
    check(
        &mut h,
        "revoke twice",
        Proposal::revoke_token("ci".into()).audited(by()),
    )
    .expect_err("unknown");
    let note = JoinNote {
        node: 5,
        addr: "10.0.0.5:7001".into(),
        voter: false,
        new_member: true,
    };
    check(&mut h, "joined", Proposal::joined(note).audited(by())).expect("recorded");

    // A command that may not be audited is refused whole, which no typed reply reads: the node
    // reports that as a bug rather than guessing.
    let (response, _) = h.apply(T0, Proposal::renew(renewal).audited(by()).into_command());
    assert!(matches!(response, Response::Refused(_)), "{response:?}");
}

fn audit<T>(audited: bool, p: Proposal<T>) -> Proposal<T> {
    if audited {
        p.audited("ops".into())
    } else {
        p
    }
}

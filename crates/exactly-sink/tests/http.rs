//! The sink's HTTP surface, against the real binary (this test also makes `cargo test
//! --workspace` build the binary, which `exactly-node`'s fencing tests start).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

struct Sink(Child);

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends one request with `Connection: close`; returns the status code and the body.
fn request(addr: &str, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: sink\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or_default();
    (code, body.to_string())
}

/// The first effect for a job is applied; a later one with a token at least the largest seen
/// is a repeat (200, not applied again, largest token raised); an older one gets 409, also after
/// a newer repeat; the report and the call log show each call.
#[test]
fn applies_each_job_once_and_refuses_older_tokens() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_exactly-sink"))
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _sink = Sink(child);
    let mut addr = String::new();
    BufReader::new(stdout).read_line(&mut addr).unwrap();
    let addr = addr.trim();

    assert_eq!(request(addr, "GET", "/healthz").0, 200);
    let effect = |job, token| {
        request(
            addr,
            "POST",
            &format!("/effect?job={job}&token={token}&node=1"),
        )
    };
    let applied = (200, "applied\n".to_string());
    let repeat = (200, "repeat\n".to_string());
    assert_eq!(effect(1, 5), applied);
    assert_eq!(effect(1, 5), repeat);
    assert_eq!(effect(1, 9), repeat);
    assert_eq!(effect(1, 7).0, 409);
    assert_eq!(effect(1, 5).0, 409);
    assert_eq!(effect(2, 3), applied);
    assert_eq!(request(addr, "POST", "/effect?job=x").0, 400);

    let (code, report) = request(addr, "GET", "/report");
    assert_eq!(code, 200);
    assert!(
        report.contains(
            r#""totals":{"calls":6,"jobs":2,"applied":2,"repeats":2,"refused_stale":2,"jobs_applied_more_than_once":0}"#
        ),
        "{report}"
    );
    assert!(
        report.contains(
            r#""1":{"applied_token":5,"applied":1,"newest_token":9,"repeats":2,"refused_stale":2}"#
        ),
        "{report}"
    );
    let (_, calls) = request(addr, "GET", "/calls.txt");
    let verdicts: Vec<&str> = calls
        .lines()
        .map(|l| l.split_whitespace().nth(3).unwrap())
        .collect();
    assert_eq!(
        verdicts,
        ["applied", "repeat", "repeat", "stale", "stale", "applied"]
    );
}

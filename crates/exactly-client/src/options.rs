//! Timeouts and retry limits of a [`Client`](crate::Client), one typed struct with named limits.

use crate::Error;

/// How long a call may take and how hard the client retries.
///
/// The worst-case duration of one client call is about
/// `retry_total_ms_max + call_timeout_ms + connect_timeout_ms`: no new try starts after
/// `retry_total_ms_max`, and each try is bounded by its own timeouts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientOptions {
    /// Time one request to one endpoint may take once connected, in milliseconds. Sent to the
    /// server as the gRPC deadline too.
    pub call_timeout_ms: u64,
    /// Time to establish a connection to one endpoint, in milliseconds.
    pub connect_timeout_ms: u64,
    /// Delay before the first retry, in milliseconds; it doubles with every retry.
    pub retry_backoff_initial_ms: u64,
    /// Upper bound of one retry delay, in milliseconds.
    pub retry_backoff_max_ms: u64,
    /// No new try starts once this much time has passed since the call began, in milliseconds.
    pub retry_total_ms_max: u64,
    /// Tries per call, the first included.
    pub retry_attempts_max: u32,
    /// How often an HTTP/2 ping checks a connection, in milliseconds. A Watch can be silent for
    /// hours; the ping is what notices a node that froze or vanished without closing the
    /// connection, so the watch moves to another endpoint.
    pub keepalive_interval_ms: u64,
    /// How long a ping may go unanswered before the connection is closed, in milliseconds.
    pub keepalive_timeout_ms: u64,
    /// Ask for linearizable reads (`exactly-read: linearizable`): every read first learns the
    /// leader's read index, so it sees every write acknowledged to anyone before it began, at the
    /// cost of a round trip to the leader. Off by default: reads then see at least every write
    /// this client saw acknowledged (read-your-writes), from any node.
    pub linearizable_reads: bool,
    /// Calls this client has in flight at once, at most; more wait for a free place (not
    /// counted in their timeouts) instead of piling onto an overloaded cluster. Watch streams
    /// are not counted.
    pub in_flight_max: u32,
    /// The bearer token sent with every call (`authorization: Bearer …`), for a cluster with
    /// `[[tokens]]`; see [`crate::token`].
    pub token: Option<Token>,
    /// The CA certificate (PEM) that an `https://` endpoint's certificate must chain to (the
    /// nodes' `[api-tls]`). Unset: the bundled web PKI roots.
    pub ca_pem: Option<String>,
    /// A client certificate and its key (PEM) presented to `https://` endpoints, for a cluster
    /// whose nodes take client certificates (`[api-tls] client-ca`, `[[client-certs]]`;
    /// `exactly cert client` makes one). A token, when set too, is what the node goes by.
    pub identity: Option<ClientIdentity>,
}

/// A client certificate and its private key, PEM; its `Debug` shows neither.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientIdentity(…)")
    }
}

/// A bearer token; its `Debug` shows only its first characters, so options can be logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(pub String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: String = self.0.chars().take(8).collect();
        write!(f, "Token({shown}…)")
    }
}

impl Default for ClientOptions {
    /// Sized for the design's timing defaults: an election takes 1–2 s, so a retry budget of 15 s
    /// rides out a leader change, and a crashed node is skipped after one refused connection.
    fn default() -> Self {
        Self {
            call_timeout_ms: 5_000,
            connect_timeout_ms: 1_000,
            retry_backoff_initial_ms: 25,
            retry_backoff_max_ms: 1_000,
            retry_total_ms_max: 15_000,
            retry_attempts_max: 64,
            keepalive_interval_ms: 5_000,
            keepalive_timeout_ms: 5_000,
            linearizable_reads: false,
            in_flight_max: 1_024,
            token: None,
            ca_pem: None,
            identity: None,
        }
    }
}

impl ClientOptions {
    /// Checks every limit and the relations between them, naming the offending key and value.
    pub fn validate(self) -> Result<Self, Error> {
        fn positive(key: &str, value: u64) -> Result<(), Error> {
            if value == 0 {
                return Err(Error::Config(format!(
                    "{key} = {value}: must be at least 1"
                )));
            }
            Ok(())
        }
        positive("call-timeout-ms", self.call_timeout_ms)?;
        positive("connect-timeout-ms", self.connect_timeout_ms)?;
        positive("retry-backoff-initial-ms", self.retry_backoff_initial_ms)?;
        positive("retry-attempts-max", u64::from(self.retry_attempts_max))?;
        positive("in-flight-max", u64::from(self.in_flight_max))?;
        positive("keepalive-interval-ms", self.keepalive_interval_ms)?;
        positive("keepalive-timeout-ms", self.keepalive_timeout_ms)?;
        if self.retry_backoff_max_ms < self.retry_backoff_initial_ms {
            return Err(Error::Config(format!(
                "retry-backoff-max-ms = {}: must be at least retry-backoff-initial-ms ({})",
                self.retry_backoff_max_ms, self.retry_backoff_initial_ms
            )));
        }
        if self.retry_total_ms_max < self.retry_backoff_max_ms {
            return Err(Error::Config(format!(
                "retry-total-ms-max = {}: must be at least retry-backoff-max-ms ({})",
                self.retry_total_ms_max, self.retry_backoff_max_ms
            )));
        }
        if let Some(Token(token)) = &self.token {
            let visible = |b: u8| b.is_ascii_graphic();
            if token.is_empty() || token.len() > TOKEN_BYTES_MAX || !token.bytes().all(visible) {
                return Err(Error::Config(format!(
                    "token: must be 1..={TOKEN_BYTES_MAX} printable ASCII characters without spaces"
                )));
            }
        }
        Ok(self)
    }
}

/// Longest bearer token a client sends.
pub const TOKEN_BYTES_MAX: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults pass their own validation.
    #[test]
    fn defaults_are_valid() {
        assert!(ClientOptions::default().validate().is_ok());
    }

    /// A backoff ceiling below the first delay is rejected with the key and value named.
    #[test]
    fn inverted_backoff_is_rejected() {
        let options = ClientOptions {
            retry_backoff_initial_ms: 500,
            retry_backoff_max_ms: 100,
            ..ClientOptions::default()
        };
        let err = options.validate().unwrap_err().to_string();
        assert!(err.contains("retry-backoff-max-ms = 100"), "{err}");
    }

    /// A token that could not travel in a header is refused before any call, and never shown.
    #[test]
    fn a_token_must_be_printable_and_is_not_debug_printed() {
        for bad in ["", "a b", "tok\n", "é"] {
            let options = ClientOptions {
                token: Some(Token(bad.into())),
                ..ClientOptions::default()
            };
            assert!(options.validate().is_err(), "{bad:?}");
        }
        let options = ClientOptions {
            token: Some(Token("exa_0123456789abcdef".into())),
            ..ClientOptions::default()
        };
        assert!(!format!("{options:?}").contains("0123456789abcdef"));
        assert!(options.validate().is_ok());
    }

    /// A zero call timeout is rejected.
    #[test]
    fn zero_timeout_is_rejected() {
        let options = ClientOptions {
            call_timeout_ms: 0,
            ..ClientOptions::default()
        };
        let err = options.validate().unwrap_err().to_string();
        assert!(err.contains("call-timeout-ms = 0"), "{err}");
    }
}

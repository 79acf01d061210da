#!/bin/bash
# The container image's HEALTHCHECK (installed as /usr/local/bin/exactly-healthcheck): exits 0
# when this node is ready (a leader is known, the node holds a valid lease and has applied the
# log). It asks the node's own gRPC health check on its API port with `exactly health`, which
# follows /readyz and needs no token, over https when the API has TLS (EXACTLY_API_TLS_CERT;
# the CA from EXACTLY_CA, and the certificate must name 127.0.0.1, as exactly-certs' does), so
# the HTTP port is free to serve only TLS ([http-tls]).
set -u
listen=${EXACTLY_LISTEN:-0.0.0.0:7101}
port=${listen##*:}
scheme=http
if [ -n "${EXACTLY_API_TLS_CERT:-}" ]; then
  scheme=https
fi
exec /usr/local/bin/exactly --endpoints "$scheme://127.0.0.1:$port" --retry-time 2s health >/dev/null

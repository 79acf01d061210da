#!/bin/sh
# Certificates and tokens for a containerized cluster, made at deploy time (installed in the
# image as /usr/local/bin/exactly-certs; cluster-config/compose.yaml uses it).
#
#   exactly-certs cluster CA_DIR CERTS_DIR NODES NAME...
#       Once (files that exist are kept): a cluster CA in CA_DIR (ca.pem, ca.key: only this
#       step and `worker` read the key), and in CERTS_DIR: ca.pem, node-1 .. node-NODES
#       certificates for the peer port's mutual TLS, api.pem/api.key for the public port
#       naming NAME..., and tokens.toml with one admin token, whose secret is in admin.token
#       (for the CLI in the containers: EXACTLY_TOKEN_FILE). Run as root, it hands every file
#       to the image's user (uid 10001).
#
#   exactly-certs worker CA_DIR [exactlyd flags]
#       A node without a fixed id (compose's `--scale worker=N`): picks its node id once and
#       keeps it in its data volume, issues its own peer certificate from CA_DIR into the data
#       volume on every start (so it never expires while the node restarts now and then), then
#       runs exactlyd with them. It reads the CA's key: see README, "Running in containers".
set -eu

cluster() {
  ca=$1 certs=$2 nodes=$3
  shift 3
  mkdir -p "$ca" "$certs"
  [ -f "$ca/ca.pem" ] || exactly cert ca --dir "$ca"
  cp "$ca/ca.pem" "$certs/ca.pem"
  n=1
  while [ "$n" -le "$nodes" ]; do
    [ -f "$certs/node-$n.pem" ] || exactly cert node --ca-dir "$ca" --dir "$certs" --node-id "$n"
    n=$((n + 1))
  done
  if [ ! -f "$certs/api.pem" ]; then
    set --
    for name in $names; do set -- "$@" --name "$name"; done
    exactly cert server --ca-dir "$ca" --dir "$certs" "$@"
  fi
  if [ ! -f "$certs/tokens.toml" ]; then
    out=$(exactly token new --name admin --scope admin)
    printf '%s\n' "$out" | sed -n 's/^token: //p' >"$certs/admin.token"
    printf '%s\n' "$out" | sed -n '/^\[\[tokens\]\]/,$p' >"$certs/tokens.toml"
    chmod 0600 "$certs/admin.token"
  fi
  if [ "$(id -u)" = 0 ]; then
    chown -R 10001:10001 "$ca" "$certs"
  fi
  echo "certificates and tokens ready in $certs"
}

worker() {
  ca=$1
  shift
  data=${EXACTLY_DATA_DIR:-/var/lib/exactly}
  if [ ! -s "$data/worker-node-id" ]; then
    # 32 random bits, never 0, never one of the fixed ids 1..999.
    id=$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')
    echo $((id + 1000)) >"$data/worker-node-id"
  fi
  id=$(cat "$data/worker-node-id")
  mkdir -p "$data/tls"
  exactly cert node --ca-dir "$ca" --dir "$data/tls" --node-id "$id" --days 30 --force >/dev/null
  export EXACTLY_NODE_ID="$id"
  export EXACTLY_PEER_TLS_CERT="$data/tls/node-$id.pem"
  export EXACTLY_PEER_TLS_KEY="$data/tls/node-$id.key"
  exec /usr/local/bin/exactly-entrypoint "$@"
}

case "${1:-}" in
  cluster)
    shift
    [ $# -ge 4 ] || { echo "usage: exactly-certs cluster CA_DIR CERTS_DIR NODES NAME..." >&2; exit 2; }
    ca_dir=$1 certs_dir=$2 nodes=$3
    shift 3
    names=$*
    cluster "$ca_dir" "$certs_dir" "$nodes"
    ;;
  worker)
    shift
    [ $# -ge 1 ] || { echo "usage: exactly-certs worker CA_DIR [exactlyd flags]" >&2; exit 2; }
    worker "$@"
    ;;
  *)
    echo "usage: exactly-certs cluster CA_DIR CERTS_DIR NODES NAME... | worker CA_DIR [flags]" >&2
    exit 2
    ;;
esac

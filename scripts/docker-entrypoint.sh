#!/bin/sh
# The container image's entrypoint (installed as /usr/local/bin/exactly-entrypoint).
#
#   docker run IMAGE [exactlyd flags]        runs exactlyd, e.g. `--init` or `--join node-1:7101`
#   docker run IMAGE exactly status          runs another command: the CLI, exactly-sink, bash
#
# exactlyd advertises EXACTLY_ADVERTISE to the other nodes; unset, it is this container's host
# name and the gRPC port of EXACTLY_LISTEN, which resolves on a Docker/compose network (the
# container id is an alias there). Kubernetes sets it from the pod name (cluster-config/k8s/).
# EXACTLY_PEER_ADVERTISE, with EXACTLY_PEER_LISTEN set, defaults the same way.
set -eu
case "${1:-}" in
  "" | -*)
    if [ -z "${EXACTLY_ADVERTISE:-}" ]; then
      listen=${EXACTLY_LISTEN:-0.0.0.0:7101}
      # Docker and Kubernetes set HOSTNAME; `hostname` covers a runtime that does not.
      # shellcheck disable=SC3028
      EXACTLY_ADVERTISE="${HOSTNAME:-$(hostname)}:${listen##*:}"
      export EXACTLY_ADVERTISE
    fi
    # The same for the peer port, when there is one.
    if [ -n "${EXACTLY_PEER_LISTEN:-}" ] && [ -z "${EXACTLY_PEER_ADVERTISE:-}" ]; then
      EXACTLY_PEER_ADVERTISE="${HOSTNAME:-$(hostname)}:${EXACTLY_PEER_LISTEN##*:}"
      export EXACTLY_PEER_ADVERTISE
    fi
    exec /usr/local/bin/exactlyd "$@"
    ;;
  *)
    exec "$@"
    ;;
esac

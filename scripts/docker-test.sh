#!/usr/bin/env bash
# The container fault test (tests/docker.rs): builds the image with scripts/docker-image.sh,
# starts a 3-node cluster and a fencing sink in containers on a private network of its own,
# streams jobs that call the sink while it kills the leader's container, cuts a follower off
# the network past its lease, scales 3 -> 5, drains a voter and removes a dead learner (back to
# 3), recreates a follower under a new host name and restarts every node in turn, then checks
# that no job was lost, duplicated or accepted from a stale attempt. Everything it creates is
# removed at the end.
#
#   scripts/docker-test.sh                               # about 2.5 min here once the base image exists
#   EXACTLY_DOCKER_IMAGE=exactly:local scripts/docker-test.sh   # use an image as it is, no build
#
# `cargo test` runs the same test (it skips, saying why, where `docker info` fails).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! docker info >/dev/null 2>&1; then
  echo "docker-test: no usable Docker engine (docker info failed)" >&2
  exit 1
fi
exec cargo test -p exactly-tests --test docker -- --nocapture "$@"

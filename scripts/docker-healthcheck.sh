#!/bin/bash
# The container image's HEALTHCHECK (installed as /usr/local/bin/exactly-healthcheck): exits 0
# when this node's GET /readyz answers 200 (a leader is known, the node holds a valid lease and
# has applied the log). bash's /dev/tcp makes the request, so the image needs no curl.
set -u
listen=${EXACTLY_HTTP_LISTEN:-0.0.0.0:8101}
port=${listen##*:}
host=${listen%:*}
case "$host" in
  0.0.0.0 | "[::]" | "") host=127.0.0.1 ;;
esac
host=${host#[}
host=${host%]}
exec 3<>"/dev/tcp/$host/$port" || exit 1
printf 'GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
read -r -t 2 _ code _ <&3 || exit 1
[ "$code" = 200 ]

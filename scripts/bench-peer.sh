#!/usr/bin/env bash
# Benchmarks exactly against a peer, NATS JetStream, under the same loads on this machine. Each
# scenario runs on a fresh 3-node JetStream cluster (an R3 file-backed stream, measured by
# exactly-peer-bench), then on a fresh 3-node exactly cluster started as scripts/bench.sh starts
# it (release, fsync on, --slots 1024, measured by `exactly bench`), and prints both systems'
# figures side by side with their ratios.
# Usage: scripts/bench-peer.sh
#   env RATES="500 2000 5000" (open-loop rates, jobs/s; empty: none), DURATION=30s, DRAIN=30s,
#       JOBS=100000 (batched maximum; 0 skips it), BACKLOG=0 (a backlog of that many jobs
#       filled into a paused queue and then drained, as scripts/backlog.sh; 0 skips it)
set -euo pipefail
cd "$(dirname "$0")/.."
rates=${RATES-500 2000 5000}
duration=${DURATION:-30s}
drain=${DRAIN:-30s}
jobs=${JOBS:-100000}
backlog=${BACKLOG:-0}

if ! command -v nats-server >/dev/null; then
  apt-get install -y nats-server
fi
# Two builds: the exactly binaries exactly as bench.sh builds them (the same features, so the
# same cached artifacts), then the peer client on its own.
cargo build --release -p exactly-peer-bench --bins
cargo build --release -p exactly-node -p exactly-handlers -p exactly-cli --bins
bin=${CARGO_TARGET_DIR:-target}/release
dir=$(mktemp -d)
pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  pids=()
}
cleanup() {
  stop_all
  rm -rf "$dir"
}
trap cleanup EXIT INT TERM

# Waits (at most 10 s) until something listens on 127.0.0.1:$1.
wait_port() {
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "nothing listens on 127.0.0.1:$1 after 10 s" >&2
  return 1
}

# nats-server fsyncs its file store on a timer unless told otherwise; `sync_interval: always`
# (an option since 2.10.0) makes it fsync every write, as exactly does before it acknowledges.
# Use it when this nats-server knows it, else say which sync the figures were measured with.
nats_version=$(nats-server --version | sed 's/^nats-server: /nats-server /')
mkdir -p "$dir/probe"
printf 'jetstream {\n  store_dir: "%s/probe"\n  sync_interval: always\n}\n' "$dir" >"$dir/probe.conf"
if nats-server -c "$dir/probe.conf" -t >/dev/null 2>&1; then
  sync_line='  sync_interval: always'
  sync_note="$nats_version, sync_interval: always (fsync on every write)"
else
  sync_line=''
  sync_note="$nats_version has no sync_interval option (added in 2.10.0): its file store \
fsyncs on a background timer (every 60 s in 2.9, every 2 min since 2.10), not before a PubAck"
fi

# Starts a 3-node JetStream cluster on random loopback ports; sets $servers.
start_nats() {
  local base=$((20000 + RANDOM % 2000)) i routes=""
  for i in 1 2 3; do routes+="${routes:+, }nats-route://127.0.0.1:$((base + 10 + i))"; done
  for i in 1 2 3; do
    mkdir -p "$dir/nats$i"
    cat >"$dir/nats$i.conf" <<EOF
server_name: n$i
listen: 127.0.0.1:$((base + i))
jetstream {
  store_dir: "$dir/nats$i"
$sync_line
}
cluster {
  name: bench
  listen: 127.0.0.1:$((base + 10 + i))
  routes: [$routes]
}
EOF
    nats-server -c "$dir/nats$i.conf" >"$dir/nats$i.log" 2>&1 &
    pids+=($!)
  done
  for i in 1 2 3; do wait_port $((base + i)); done
  servers="nats://127.0.0.1:$((base + 1)),nats://127.0.0.1:$((base + 2)),nats://127.0.0.1:$((base + 3))"
}

# Starts a 3-node exactly cluster exactly as scripts/bench.sh does; sets $eps.
start_exactly() {
  local base=$((17000 + RANDOM % 2000)) i n
  eps="127.0.0.1:$((base + 1)),127.0.0.1:$((base + 2)),127.0.0.1:$((base + 3))"
  # Each node serves node-to-node traffic on its own peer port (`--peer-listen`, base + 10 + i).
  "$bin/exactlyd" --init --node-id 1 --listen 127.0.0.1:$((base + 1)) --peer-listen 127.0.0.1:$((base + 11)) --data-dir "$dir/x1" --slots 1024 >"$dir/x1.log" 2>&1 &
  pids+=($!)
  for i in 2 3; do
    "$bin/exactlyd" --join 127.0.0.1:$((base + 11)) --node-id $i --listen 127.0.0.1:$((base + i)) --peer-listen 127.0.0.1:$((base + 10 + i)) --data-dir "$dir/x$i" --slots 1024 >"$dir/x$i.log" 2>&1 &
    pids+=($!)
  done
  # Wait (at most 30 s) until all three nodes are members and registered.
  for _ in $(seq 1 150); do
    n=$("$bin/exactly" --endpoints "$eps" --json status 2>/dev/null | grep -cE '"incarnation": *[1-9]' || true)
    if [[ "$n" -ge 3 ]]; then break; fi
    sleep 0.2
  done
}

# Runs one scenario on both systems: $1 names it, $2 is `open` or `batch`, then the flags of
# exactly-peer-bench after `--`, then those of `exactly bench`.
scenario() {
  local name=$1 mode=$2 nats_args=() exactly_args=()
  shift 2
  while [[ $# -gt 0 && $1 != -- ]]; do nats_args+=("$1"); shift; done
  shift
  exactly_args=("$@")
  echo
  echo "== $name =="
  rm -rf "$dir"/nats? "$dir"/x?
  start_nats
  "$bin/exactly-peer-bench" --servers "$servers" "${nats_args[@]}" --json \
    >"$dir/nats.json" 2>"$dir/nats.err" || echo "exactly-peer-bench exited with $?: $(tail -3 "$dir/nats.err")"
  stop_all
  start_exactly
  "$bin/exactly" --endpoints "$eps" --json bench "${exactly_args[@]}" \
    >"$dir/exactly.json" 2>"$dir/exactly.err" || echo "exactly bench exited with $?: $(tail -3 "$dir/exactly.err")"
  stop_all
  compare "$mode"
}

# Prints the two JSON reports side by side. Ratios are oriented so that above 1 means exactly
# did better: exactly/JetStream for throughput, JetStream/exactly for latency.
compare() {
  python3 - "$1" "$dir/nats.json" "$dir/exactly.json" <<'PY'
import json, sys

mode, nats_path, exactly_path = sys.argv[1:4]

def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

nats, exactly = load(nats_path), load(exactly_path)

def get(report, *keys):
    value = report
    for key in keys:
        if not isinstance(value, dict) or value.get(key) is None:
            return None
        value = value[key]
    return value

def show(value, scale=1.0, digits=1):
    if value is None:
        return "-"
    if isinstance(value, float) or scale != 1.0:
        return f"{value / scale:.{digits}f}"
    return str(value)

def ratio(num, den):
    if num is None or den is None or den == 0:
        return "-"
    return f"{num / den:.2f}x"

rows = []
def row(label, keys, kind=None, scale=1.0, digits=1):
    n, x = get(nats, *keys), get(exactly, *keys)
    r = ""
    if kind == "throughput":
        r = ratio(x, n) + "  (exactly/JetStream)"
    elif kind == "latency":
        r = ratio(n, x) + "  (JetStream/exactly)"
    rows.append((label, show(n, scale, digits), show(x, scale, digits), r))

if mode == "open":
    row("offered requests", ["requests", "offered"])
    row("acknowledged", ["requests", "acknowledged"])
    row("refused", ["requests", "refused"])
    row("unknown", ["requests", "unknown"])
    row("errors", ["requests", "errors"])
    row("not sent", ["requests", "not_sent"])
    row("finished jobs", ["finished_jobs"])
    row("unfinished jobs", ["unfinished_jobs"])
    row("goodput jobs/s", ["goodput_jobs_per_s"], "throughput")
    row("submit p50 ms", ["submit_latency_us", "p50"], "latency", 1000.0, 3)
    row("submit p99 ms", ["submit_latency_us", "p99"], "latency", 1000.0, 3)
    row("submit max ms", ["submit_latency_us", "max"], "latency", 1000.0, 3)
    row("end-to-end p50 ms", ["end_to_end_latency_us", "p50"], "latency", 1000.0, 3)
    row("end-to-end p99 ms", ["end_to_end_latency_us", "p99"], "latency", 1000.0, 3)
    row("end-to-end max ms", ["end_to_end_latency_us", "max"], "latency", 1000.0, 3)
    row("slowest refusal ms", ["slowest_refusal_ms"])
else:
    row("jobs", ["jobs"])
    row("acknowledged", ["acknowledged"])
    row("failed submits", ["failures", "submit_requests"])
    row("elapsed s", ["elapsed_ms"], None, 1000.0, 3)
    row("throughput jobs/s", ["throughput_jobs_per_s"], "throughput")
    row("submit jobs/s", ["submit_jobs_per_s"], "throughput")
    row("submit p50 ms", ["submit_latency_us", "p50"], None, 1000.0, 3)
    row("submit p99 ms", ["submit_latency_us", "p99"], None, 1000.0, 3)
    row("completion p50 ms", ["completion_latency_ms", "p50"], "latency")
    row("completion p99 ms", ["completion_latency_ms", "p99"], "latency")
    row("completion max ms", ["completion_latency_ms", "max"], "latency")

head = ("", "JetStream", "exactly", "ratio (>1: exactly better)")
widths = [max(len(r[i]) for r in rows + [head]) for i in range(3)]
for r in [head] + rows:
    print(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip())
if mode == "batch":
    print("submit latency: JetStream per publish of 1 message; exactly per Submit request of "
          f"{get(exactly, 'batch') or '-'} jobs ({get(exactly, 'concurrency') or '-'} in flight)")
    print("completion: JetStream every message, publish to confirmed ack (this machine's clock); "
          f"exactly {get(exactly, 'sampled_jobs') or '-'} sampled jobs (leader's clock)")
for label, report in (("JetStream", nats), ("exactly", exactly)):
    if report is None:
        print(f"{label}: no report (the run failed; see the message above)")
    elif report.get("first_error") or get(report, "failures", "first_submit_error"):
        print(f"{label} first error: {report.get('first_error') or report['failures']['first_submit_error']}")
PY
}

echo "JetStream: stream R3, file storage, work-queue retention, durable pull consumer; a job is one"
echo "           message, submitted at its PubAck, ended by a confirmed ack (double ack)"
echo "JetStream sync: $sync_note"
echo "exactly:   release build, fsync on, --slots 1024, no-op jobs (as scripts/bench.sh)"
for rate in $rates; do
  scenario "open loop: $rate jobs/s for $duration ($drain drain, 4 connections)" open \
    --rate "$rate" --duration "$duration" --drain "$drain" -- \
    --rate "$rate" --duration "$duration" --drain "$drain"
done
if [[ "$jobs" -gt 0 ]]; then
  scenario "batched maximum: $jobs jobs" batch --messages "$jobs" -- --jobs "$jobs"
fi
# The backlog: JetStream publishes with no consumer pulling, then drains with the worker;
# exactly fills a paused queue, then resumes it (scripts/backlog.sh). Both print each tenth's
# rate, the servers' RSS and data directories.
if [[ "$backlog" -gt 0 ]]; then
  echo
  echo "== backlog: $backlog jobs filled (requests of 1,000), then drained =="
  rm -rf "$dir"/nats? "$dir"/x?
  start_nats
  echo "-- JetStream"
  "$bin/exactly-peer-bench" --servers "$servers" --backlog "$backlog" --timeout 3600s \
    --watch-pid "$(IFS=,; echo "${pids[*]}")" \
    --watch-dir "$dir/nats1,$dir/nats2,$dir/nats3" | tee "$dir/nats-backlog.txt" ||
    echo "exactly-peer-bench exited with $?"
  stop_all
  echo "-- exactly"
  BIN=$bin scripts/backlog.sh "$backlog" | tee "$dir/exactly-backlog.txt" ||
    echo "backlog.sh exited with $?"
  overall() { sed -n "s/^$1: \([0-9]*\) [a-z]*\/s overall.*/\1/p" "$2"; }
  for phase in fill drain; do
    n=$(overall "$phase" "$dir/nats-backlog.txt")
    x=$(overall "$phase" "$dir/exactly-backlog.txt")
    if [[ -n "$n" && -n "$x" ]]; then
      printf '%s: JetStream %s/s, exactly %s/s, %.2fx (exactly/JetStream)\n' "$phase" "$n" "$x" \
        "$(echo "$x / $n" | bc -l)"
    fi
  done
fi

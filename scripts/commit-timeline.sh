#!/usr/bin/env bash
# Where one Raft commit's time goes: starts a local 3-node cluster (release build, fsync on) with
# the nodes' timeline trace events on (`RUST_LOG=exactly::timeline=trace`: append, durability
# point, AppendEntries sent / received / acknowledged / answered, applied), submits N one-job
# requests one after another straight to the leader, and prints the median and 90th percentile
# of each hop of their entries. Usage: scripts/commit-timeline.sh [N] (default 300). Needs
# python3. The nodes print their logs' timestamps in microseconds from the same clock, so the
# hops between nodes are comparable on one machine only.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-300}
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
# bench.sh starts the cluster (node 1 bootstraps and leads it), and its client sends every
# request to the first endpoint that answers, node 1; the parser below checks that node 1
# applied the entries.
RUST_LOG="info,exactly::timeline=trace" LOGS="$logs" scripts/bench.sh "$n" --batch 1 \
  --concurrency 1 | grep -E 'submit latency|completion latency'
python3 - "$logs" <<'EOF'
import datetime, re, statistics, sys

d = sys.argv[1]
line_re = re.compile(r'^(\S+Z)\s+TRACE\b.*exactly::timeline: (\w+) (.*)$')
field_re = re.compile(r'(\w+)=(\S+)')


def micros(stamp):
    t = datetime.datetime.strptime(stamp.rstrip('Z')[:26], '%Y-%m-%dT%H:%M:%S.%f')
    return int(t.replace(tzinfo=datetime.timezone.utc).timestamp() * 1e6)


def events(node):
    out = {}
    with open(f'{d}/n{node}.log', errors='replace') as f:
        for line in f:
            m = line_re.match(line)
            if not m:
                continue
            fields = dict(field_re.findall(m.group(3)))
            if 'index' not in fields:
                continue
            peer = fields.get('to') or fields.get('from')
            key = (m.group(2), peer)
            out.setdefault(key, []).append((int(fields['index']), micros(m.group(1)), fields))
    for v in out.values():
        v.sort(key=lambda e: e[1])
    return out


nodes = {i: events(i) for i in (1, 2, 3)}
leader = nodes[1]
applied = leader.get(('applied', None), [])
if not applied:
    sys.exit('no applied entries on node 1: is it the leader? see the logs')


def first(evs, index, after):
    """The first event covering `index` (an entry batch ends at or after it) at or after `after`."""
    for i, t, _ in evs:
        if t >= after and i >= index:
            return t
    return None


hops = {}


def add(name, a, b, signed=False):
    if a is not None and b is not None and (signed or b >= a):
        hops.setdefault(name, []).append(b - a)


for index, end, fields in applied[-min(len(applied), 1000):]:
    start = end - int(fields['took_us'])
    appended = first(leader.get(('appended', None), []), index, start)
    add('propose -> leader append', start, appended)
    durable = first(leader.get(('durable', None), []), index, appended or start)
    add('leader append -> durable', appended, durable)
    for f in ('2', '3'):
        sent = first(leader.get(('sent', f), []), index, appended or start)
        fol = nodes[int(f)]
        received = first(fol.get(('received', None), []), index, sent or start)
        f_appended = first(fol.get(('appended', None), []), index, received or start)
        f_durable = first(fol.get(('durable', None), []), index, f_appended or start)
        acked = first(fol.get(('acknowledged', None), []), index, f_durable or start)
        answered = first(leader.get(('answered', f), []), index, acked or start)
        add(f'leader append -> sent to {f}', appended, sent)
        # Negative: the entry left before the leader's own durability point (they overlap).
        add(f'leader durable -> sent to {f} (signed)', durable, sent, signed=True)
        add(f'sent -> received by {f}', sent, received)
        add(f'{f}: received -> appended', received, f_appended)
        add(f'{f}: appended -> durable', f_appended, f_durable)
        add(f'{f}: durable -> acknowledged', f_durable, acked)
        add(f'{f}: acknowledged -> answer at leader', acked, answered)
        add(f'answer from {f} -> applied', answered, end)
    add('propose -> applied (one commit)', start, end)

print(f'{len(applied)} entries applied on the leader; microseconds, median / p90 / samples:')
for name, v in hops.items():
    v.sort()
    print(f'  {name:40s} {statistics.median(v):8.0f} {v[int(len(v) * 0.9)]:8d} {len(v):6d}')
EOF

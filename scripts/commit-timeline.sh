#!/usr/bin/env bash
# Where one Raft commit's time goes, and where one job's: starts a local 3-node cluster (release
# build, fsync on) with the nodes' timeline trace events on (`RUST_LOG=exactly::timeline=trace`:
# append, durability point, AppendEntries sent / received / acknowledged / answered, applied;
# and per job: submit answered, attempt started by apply, handler run and ended, completion
# proposed and committed, event sent on a Watch stream), loads it, and prints the median and
# 90th percentile of each hop.
#   scripts/commit-timeline.sh [N]   N one-job requests one after another straight to the leader
#                                    (default 300): the commit hops.
#   RATE=R scripts/commit-timeline.sh   an open-loop load of R one-job requests per second for
#                                    5 s over every node (`exactly bench --rate`), as users load
#                                    it: the commit hops and each job's path, submit to event.
# Needs python3. The nodes print their logs' timestamps in microseconds from the same clock, so
# the hops between nodes are comparable on one machine only.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-300}
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
# bench.sh starts the cluster (node 1 bootstraps and leads it); in the closed-loop mode its
# client sends every request to the first endpoint that answers, node 1. The parser below checks
# that node 1 applied the entries; the open-loop client watches on node 1.
if [[ -n "${RATE:-}" ]]; then
  RUST_LOG="info,exactly::timeline=trace" LOGS="$logs" scripts/bench.sh 1 --rate "$RATE" \
    --duration 5s --drain 3s | grep -E 'end to end|submit|acknowledged'
else
  RUST_LOG="info,exactly::timeline=trace" LOGS="$logs" scripts/bench.sh "$n" --batch 1 \
    --concurrency 1 | grep -E 'submit latency|completion latency'
fi
python3 - "$logs" <<'EOF'
import bisect, datetime, re, statistics, sys

d = sys.argv[1]
line_re = re.compile(r'^(\S+Z)\s+TRACE\b.*exactly::timeline: (\w+) (.*)$')
field_re = re.compile(r'(\w+)=(\S+)')


def micros(stamp):
    t = datetime.datetime.strptime(stamp.rstrip('Z')[:26], '%Y-%m-%dT%H:%M:%S.%f')
    return int(t.replace(tzinfo=datetime.timezone.utc).timestamp() * 1e6)


def timeline(node):
    """Every timeline event in `node`'s log: (name, time in microseconds, fields)."""
    with open(f'{d}/n{node}.log', errors='replace') as f:
        for line in f:
            m = line_re.match(line)
            if m:
                yield m.group(2), micros(m.group(1)), dict(field_re.findall(m.group(3)))


def events(node):
    """The entry-keyed events: (name, peer) -> [(index, time, fields)] by time."""
    out = {}
    for name, t, fields in timeline(node):
        if 'index' not in fields:
            continue
        peer = fields.get('to') or fields.get('from')
        out.setdefault((name, peer), []).append((int(fields['index']), t, fields))
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


def show(title, hops):
    print(title)
    for name, v in hops.items():
        v.sort()
        print(f'  {name:44s} {statistics.median(v):8.0f} {v[int(len(v) * 0.9)]:8d} {len(v):6d}')


show(f'{len(applied)} entries applied on the leader; microseconds, median / p90 / samples:', hops)

# One job's path, from its job-keyed events: (name, job) -> [(time, node, fields)].
jobs = {}
for node in (1, 2, 3):
    for name, t, fields in timeline(node):
        if 'job' in fields:
            jobs.setdefault((name, int(fields['job'])), []).append((t, node, fields))

leader_applied = {i: t for i, t, _ in applied}
path = {}


def once(name, job, node=None, after=0):
    for t, n, f in sorted(jobs.get((name, job), []), key=lambda e: e[0]):
        if t >= after and (node is None or n == node):
            return t, n, f
    return None


by_node = {}
for (ev, _), evs in jobs.items():
    for t, n, _ in evs:
        by_node.setdefault((ev, n), []).append(t)
for v in by_node.values():
    v.sort()


def later(name, node, after):
    """The first `name` event on `node` at or after `after`, whatever its job (completions go
    in batches named by their first job)."""
    v = by_node.get((name, node), [])
    i = bisect.bisect_left(v, after)
    return v[i] if i < len(v) else None


def hop(name, a, b, signed=False):
    if a is not None and b is not None and (signed or b >= a):
        path.setdefault(name, []).append(b - a)


submitted = [(job, e) for (name, job), evs in jobs.items() if name == 'submitted' for e in evs]
for job, (t, node, f) in submitted[:2000]:
    received = t - int(f['took_us'])
    committed = leader_applied.get(int(f['index']))
    start = once('start', job, after=received)
    if start is None:
        continue
    s_t, x, _ = start
    run = once('run', job, x, s_t)
    ran = once('ran', job, x, run[0] if run else s_t)
    ran_t = ran[0] if ran else None
    proposed = later('complete', x, ran_t) if ran_t else None
    completed = later('completed', x, proposed) if proposed else None
    watched = None
    for wt, wn, wf in sorted(jobs.get(('watched', job), []), key=lambda e: e[0]):
        if wn == 1 and wf.get('status') == 'Succeeded':
            watched = wt
            break
    where = 'leader' if x == 1 else 'follower'
    hop('submit received -> submit applied on leader', received, committed)
    hop(f'submit applied on leader -> start on {where}', committed, s_t, signed=True)
    hop('start -> handler run', s_t, run[0] if run else None)
    hop('handler run -> ended', run[0] if run else None, ran_t)
    hop('ended -> completion proposed', ran_t, proposed)
    hop(f'proposed -> committed ({where})', proposed, completed)
    hop(f'proposed -> event sent on node 1 ({where})', proposed, watched)
    hop('submit received -> event sent on node 1', received, watched)
    hop('submit received -> submit answered', received, t)

show(f'{len(submitted)} jobs submitted; microseconds, median / p90 / samples:', path)

# Forwarded writes (a follower's Submit groups and Completes): the follower's round trip, the
# leader's handling (decode to answer), and that entry's commit on the leader.
fwd = {}
took = {i: int(f['took_us']) for i, _, f in applied}
answered_at_leader = {i: int(f['took_us']) for i, _, f in leader.get(('forward_answered', None), [])}
for node in (2, 3):
    for index, _, f in nodes[node].get(('forwarded', None), []):
        rtt = int(f['took_us'])
        fwd.setdefault('follower: forward sent -> reply', []).append(rtt)
        handled = answered_at_leader.get(index)
        if handled is not None:
            fwd.setdefault('leader: forward received -> answered', []).append(handled)
            fwd.setdefault('forward round trip outside the leader (signed)', []).append(rtt - handled)
        if index in took:
            fwd.setdefault('leader: that entry proposed -> applied', []).append(took[index])
if fwd:
    show('forwarded writes; microseconds, median / p90 / samples:', fwd)
EOF

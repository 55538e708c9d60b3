#!/usr/bin/env bash
# Devices page benchmark: DEVICES devices (default 10,000) inserted straight into the
# catalog of a running `morgana serve`, then filtered, sorted and paged pages of the web UI
# (the htmx fragment and the full page) and the REST API, each requested RUNS times over
# HTTPS. Prints one table; "server" is the time from the end of the TLS handshake to the
# first byte of the answer, which is what the appliance spends (query + render).
#
#   bench/web.sh [WORKDIR]   (default bench/out-web; DEVICES=N RUNS=N; PROFILE=release,
#                             or MORGANA_BIN=path to use a built binary)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=${1:-$REPO/bench/out-web}
DEVICES=${DEVICES:-10000}
RUNS=${RUNS:-30}
PROFILE=${PROFILE:-debug}

if [ -n "${MORGANA_BIN:-}" ]; then
    BIN=$MORGANA_BIN
elif [ "$PROFILE" = release ]; then
    cargo build --release -q -p morgana
    BIN=$REPO/target/release/morgana
else
    cargo build -q -p morgana
    BIN=$REPO/target/debug/morgana
fi
rm -rf "$WORK"; mkdir -p "$WORK"
DATA=$WORK/data
PASSWORD="bench password 123"

MORGANA_ADMIN_PASSWORD=$PASSWORD "$BIN" serve --data-dir "$DATA" --listen 127.0.0.1:0 --gc-every off \
    >"$WORK/serve.out" 2>"$WORK/serve.err" &
SERVE=$!
trap 'kill $SERVE 2>/dev/null; wait $SERVE 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
    grep -q "morgana listening on" "$WORK/serve.out" 2>/dev/null && break
    sleep 0.1
done
URL=$(sed -n 's/^morgana listening on //p' "$WORK/serve.out")
[ -n "$URL" ] || { echo "serve did not start; see $WORK/serve.err" >&2; exit 1; }

echo "inserting $DEVICES devices into $DATA/catalog.sqlite ..." >&2
python3 - "$DATA/catalog.sqlite" "$DEVICES" <<'PY'
import datetime, os, random, sqlite3, sys
path, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(11)
now = datetime.datetime.now(datetime.timezone.utc)
def ts(dt):
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (dt.microsecond // 1000)
rows = []
for i in range(n):
    created = ts(now - datetime.timedelta(days=rng.randint(30, 900), seconds=rng.randint(0, 86399)))
    r = rng.random()
    if r < 0.80:    # synced today
        last = ts(now - datetime.timedelta(seconds=rng.randint(0, 80000)))
    elif r < 0.95:  # stale
        last = ts(now - datetime.timedelta(days=rng.randint(2, 60)))
    else:           # never synced
        last = ""
    site = rng.choice(["hq", "lab", "branch-nord", "branch-sud", "remote"])
    rows.append(("%016x" % (0x5eed000000000000 + i), "%s-pc-%05d" % (site, i), os.urandom(32),
                 created, int(rng.random() < 0.01), "user%04d" % (i % 3000),
                 last, rng.randint(10**9, 2 * 10**11) if last else 0))
db = sqlite3.connect(path, timeout=30)
db.executemany("INSERT INTO devices (id, hostname, cert_fingerprint, created, revoked, owner, "
               "last_snapshot_at, last_snapshot_bytes) VALUES (?,?,?,?,?,?,?,?)", rows)
db.commit()
db.execute("ANALYZE")
db.commit()
PY

CURL=(curl -sS --cacert "$DATA/tls/ca.pem" -b "$WORK/cookies" -c "$WORK/cookies")
"${CURL[@]}" -o /dev/null -d "name=admin" --data-urlencode "password=$PASSWORD" "$URL/login"
CSRF=$("${CURL[@]}" "$URL/users" | sed -n 's/.*name="csrf" value="\([0-9a-f]*\)".*/\1/p' | head -1)
TOKEN=$("${CURL[@]}" -d "csrf=$CSRF&label=bench" "$URL/users/admin/api-tokens" \
    | sed -n 's/.*id="secret">\([^<]*\)<.*/\1/p')
[ -n "$TOKEN" ] || { echo "could not sign in and issue an API token" >&2; exit 1; }

# A cursor deep in the list: the key of the 5,000th device by hostname.
DEEP=$(python3 - "$DATA/catalog.sqlite" <<'PY'
import sqlite3, sys, urllib.parse
db = sqlite3.connect(sys.argv[1])
h, i = db.execute("SELECT hostname, id FROM devices ORDER BY hostname, id LIMIT 1 OFFSET 4999").fetchone()
print(urllib.parse.quote(h + "|" + i))
PY
)

measure() { # label, url, extra curl args...
    local label=$1 url=$2; shift 2
    local times=()
    for _ in $(seq 1 "$RUNS"); do
        times+=("$("${CURL[@]}" -o /dev/null -w '%{time_appconnect} %{time_starttransfer} %{time_total} %{http_code}\n' "$@" "$url")")
    done
    printf '%s\n' "${times[@]}" | python3 -c '
import sys, statistics
label = sys.argv[1]
rows = [l.split() for l in sys.stdin if l.strip()]
codes = {r[3] for r in rows}
server = sorted((float(r[1]) - float(r[0])) * 1000 for r in rows)
total = sorted(float(r[2]) * 1000 for r in rows)
p95 = lambda xs: xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]
print("| %-46s | %6s | %8.1f | %8.1f | %8.1f | %8.1f |" % (label, ",".join(sorted(codes)),
      statistics.median(server), p95(server), statistics.median(total), p95(total)))
' "$label"
}

echo
echo "devices page, $DEVICES devices, $RUNS requests each, profile $PROFILE ($(nproc) cores)"
echo
echo "| request                                        | status | server median ms | server p95 ms | total median ms | total p95 ms |"
echo "|---|---|---|---|---|---|"
measure "UI fragment: first page, by hostname"        "$URL/devices/rows"
measure "UI fragment: search 'nord-pc-04'"            "$URL/devices/rows?q=nord-pc-04"
measure "UI fragment: stale, by last snapshot desc"   "$URL/devices/rows?state=stale&sort=last_snapshot&dir=desc"
measure "UI fragment: never synced"                   "$URL/devices/rows?state=never"
measure "UI fragment: page after device 5,000"        "$URL/devices/rows?after=$DEEP"
measure "UI fragment: search with no match"           "$URL/devices/rows?q=no-such-host"
measure "UI full page: search 'lab', protected"       "$URL/devices?q=lab&state=protected"
measure "API: search 'sud', 100 per page"             "$URL/api/v1/devices?q=sud&limit=100" -H "Authorization: Bearer $TOKEN"
measure "UI dashboard"                                "$URL/"

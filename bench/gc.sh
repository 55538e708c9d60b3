#!/usr/bin/env bash
# Garbage-collection benchmark: a repository of FILES single-chunk files (default 1,000,000,
# so over a million chunks), 10 % of them garbage once the older snapshot is pruned.
# Prints one table: GC wall time and peak RSS, what it freed, and how much a sync running
# at the same time slows down against the same sync alone.
#
#   bench/gc.sh [WORKDIR]        (default bench/out-gc; FILES=N for a smaller run)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=${1:-$REPO/bench/out-gc}
FILES=${FILES:-1000000}
LOAD_MIB=${LOAD_MIB:-600}

cargo build --release -q -p morgana -p morgana-agent
BIN=$REPO/target/release
rm -rf "$WORK"; mkdir -p "$WORK"

echo "generating $FILES small files and two ${LOAD_MIB} MiB load trees ..." >&2
python3 - "$WORK" "$FILES" "$LOAD_MIB" <<'PY'
import os, random, sys
work, files, load_mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(7)
per_dir = 1000
for i in range(files):
    d = os.path.join(work, "big", "d%04d" % (i // per_dir))
    if i % per_dir == 0:
        os.makedirs(d)
    # Above the inline limit and below the smallest chunk: exactly one chunk per file.
    with open(os.path.join(d, "f%04d" % (i % per_dir)), "wb") as f:
        f.write(rng.randbytes(rng.randint(600, 3000)))
for name in ("load-a", "load-b"):
    d = os.path.join(work, name)
    os.makedirs(d)
    for i in range(load_mib // 4):
        with open(os.path.join(d, "part%04d.bin" % i), "wb") as f:
            f.write(rng.randbytes(4 << 20))
PY

M=$WORK/m
"$BIN/morgana" serve --data-dir "$M/data" --listen 127.0.0.1:0 --gc-every off \
    > "$M.serve.out" 2> "$M.serve.err" &
SERVE=$!
trap 'kill $SERVE 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q listening "$M.serve.out" 2>/dev/null && break; sleep 0.1; done
URL=$(sed -n 's/^morgana listening on //p' "$M.serve.out")
enroll() {
    "$BIN/morgana-agent" enroll --server "$URL" --token "$("$BIN/morgana" enroll-token --data-dir "$M/data")" \
        --root "$1" --state-dir "$2" > /dev/null
}
seconds() {
    local t0 t1
    t0=$(date +%s.%N); "$@" > /dev/null; t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc -l
}
enroll "$WORK/big" "$M/s-big"
enroll "$WORK/load-a" "$M/s-a"
enroll "$WORK/load-b" "$M/s-b"

echo "first sync of the small-file tree ..." >&2
T_BIG=$(seconds "$BIN/morgana-agent" sync --state-dir "$M/s-big")
find "$WORK/big" -type f -name 'f???0' -delete     # every tenth file
"$BIN/morgana-agent" sync --state-dir "$M/s-big" > /dev/null
BLOBS=$(python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from blobs').fetchone()[0])" "$M/data/catalog.sqlite")

echo "sync alone ..." >&2
sync
T_ALONE=$(seconds "$BIN/morgana-agent" sync --state-dir "$M/s-a")

echo "gc beside a sync ..." >&2
sync
/usr/bin/time -f "%e %M" -o "$WORK/gc.time" "$BIN/morgana" gc --data-dir "$M/data" --json \
    --keep-hourly 0 --keep-daily 0 --keep-weekly 0 --keep-monthly 0 > "$WORK/gc.json" &
GC=$!
T_DURING=$(seconds "$BIN/morgana-agent" sync --state-dir "$M/s-b")
wait $GC
read -r GC_S GC_KB < "$WORK/gc.time"

python3 - "$WORK/gc.json" "$BLOBS" "$GC_S" "$GC_KB" "$T_ALONE" "$T_DURING" "$T_BIG" "$FILES" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
blobs, gc_s, gc_kb, alone, during, big, files = sys.argv[2:]
gc_s, alone, during = float(gc_s), float(alone), float(during)
rows = [
    ("chunks + trees in the repository", blobs),
    ("first sync of %s small files" % files, "%.1f s" % float(big)),
    ("garbage freed (blobs)", r["blobs_freed"]),
    ("garbage freed (stored bytes)", r["bytes_freed"]),
    ("packs rewritten / retired", "%d / %d" % (r["packs_rewritten"], r["packs_retired"])),
    ("fence retries (commits during gc)", r["fence_retries"]),
    ("gc wall time", "%.1f s" % gc_s),
    ("gc peak RSS", "%.0f MiB   (target < 512)" % (int(gc_kb) / 1024)),
    ("sync alone", "%.2f s" % alone),
    ("same sync beside gc", "%.2f s" % during),
    ("slowdown", "%.2fx   (target < 2x)" % (during / alone)),
]
w = max(len(k) for k, _ in rows)
for k, v in rows:
    print(f"{k:<{w}}  {v}")
PY

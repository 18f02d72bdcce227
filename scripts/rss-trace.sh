#!/usr/bin/env bash
# Runs a command and samples its memory every INTERVAL seconds (default 0.5) from /proc: resident
# anonymous memory (what the program allocated) and resident file pages (memory-mapped inputs), in
# MB, with the elapsed time. For finding which phase of a job sets its peak; the peak RSS itself
# is better read from /usr/bin/time or the job's own report.
#
#   scripts/rss-trace.sh OUT.tsv shrink prune … -o out.gguf
#
# OUT.tsv: seconds, anon MB, file MB, one line per sample; the maxima are printed at the end.
set -euo pipefail
out="$1"; shift
interval="${INTERVAL:-0.5}"
"$@" &
pid=$!
start=$(date +%s.%N)
printf 's\tanon_mb\tfile_mb\n' >"$out"
while kill -0 "$pid" 2>/dev/null; do
  if read -r anon file < <(awk '/^RssAnon:/ {a = $2} /^RssFile:/ {f = $2} END {print a, f}' \
      "/proc/$pid/status" 2>/dev/null); then
    now=$(date +%s.%N)
    awk -v s="$start" -v n="$now" -v a="$anon" -v f="$file" \
      'BEGIN { printf "%.1f\t%d\t%d\n", n - s, a / 1024, f / 1024 }' >>"$out"
  fi
  sleep "$interval"
done
wait "$pid"
awk -F'\t' 'NR > 1 { if ($2 > a) { a = $2; at = $1 } if ($3 > f) f = $3 }
  END { printf "max anon %d MB (at %.1f s), max file %d MB\n", a, at, f }' "$out"

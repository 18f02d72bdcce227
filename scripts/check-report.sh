#!/usr/bin/env bash
# Renders a report.html in headless Chromium and fails unless the page has charts and tables and
# the screenshot is substantial (a blank or broken page screenshots to a few kB).
# Usage: scripts/check-report.sh REPORT.html [SCREENSHOT.png]; prints the screenshot path.
set -euo pipefail
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: $0 REPORT.html [SCREENSHOT.png]" >&2
  exit 2
fi
html="$1"
[ -f "$html" ] || { echo "[check-report] no such file: $html" >&2; exit 2; }
abs="$(cd "$(dirname "$html")" && pwd)/$(basename "$html")"
shot="${2:-${abs%.html}.png}"
mkdir -p "$(dirname "$shot")"
shot="$(cd "$(dirname "$shot")" && pwd)/$(basename "$shot")"
chromium_bin="$(command -v chromium || true)"
if [ -z "$chromium_bin" ]; then
  echo "[check-report] chromium not found (apt-get install chromium)" >&2
  exit 1
fi
flags=(--headless --no-sandbox --disable-gpu --hide-scrollbars)
# A wedged browser must fail the check rather than hang it.
chromium=(timeout 120 "$chromium_bin")
dom="$("${chromium[@]}" "${flags[@]}" --dump-dom "file://$abs" 2>/dev/null)" || {
  echo "[check-report] chromium failed to load $abs" >&2
  exit 1
}
for tag in '<svg' '<table'; do
  if ! grep -q "$tag" <<<"$dom"; then
    echo "[check-report] rendered DOM of $html has no $tag" >&2
    exit 1
  fi
done
rm -f "$shot"
"${chromium[@]}" "${flags[@]}" --screenshot="$shot" --window-size=1280,2400 "file://$abs" >/dev/null 2>&1 || true
if [ ! -f "$shot" ]; then
  echo "[check-report] chromium wrote no screenshot to $shot" >&2
  exit 1
fi
size=$(stat -c %s "$shot")
if [ "$size" -lt 20480 ]; then
  echo "[check-report] screenshot $shot is only $size bytes (< 20 kB): page likely blank" >&2
  exit 1
fi
echo "$shot"

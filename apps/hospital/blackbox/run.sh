#!/usr/bin/env bash
# Black-box checks of the running dashboard (`make test` runs this): starts
# `hospital simulate` on 127.0.0.1 (a short run on synthetic data, SQLite in
# a temporary folder), waits for its first model, then runs
#   - checks.py: our own checks (headers, tokens, roles, throttling, JSON
#     errors, uploads, sessions, caps, slow clients), and
#   - schemathesis with all checks against /api/openapi.json as the admin,
#     except the event stream (endless) and sign-out and password change
#     (they end the very session the run uses; tests/api.rs covers them).
# Bounded: a few minutes, only 127.0.0.1.
#
#   apps/hospital/blackbox/run.sh [path/to/hospital]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
bin=${1:-$root/target/debug/hospital}
schemathesis=${SCHEMATHESIS:-$root/.venv/bin/schemathesis}
[ -x "$schemathesis" ] || { echo "blackbox: $schemathesis is missing (scripts/setup.sh installs it)" >&2; exit 1; }

work=$(mktemp -d)
pid=
cleanup() {
    local rc=$?
    if [ -n "$pid" ]; then
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT

# A tiny MNIST (the digit is where a bright square sits) for the runs the
# API run queues (hooks.py keeps them to one round of MNIST).
python3 - "$work/mnist" <<'PY'
import os, random, struct, sys
d = sys.argv[1]; os.makedirs(d); rng = random.Random(7)
for prefix, n in (("train", 200), ("t10k", 50)):
    images = bytearray(struct.pack(">IIII", 0x803, n, 28, 28)); labels = bytearray(struct.pack(">II", 0x801, n))
    for _ in range(n):
        k = rng.randrange(10); labels.append(k); r0, c0 = 4 + (k // 5) * 12, 1 + (k % 5) * 5
        images += bytes(255 if r0 <= r < r0 + 6 and c0 <= c < c0 + 5 else rng.randrange(60) for r in range(28) for c in range(28))
    open(os.path.join(d, prefix + "-images-idx3-ubyte"), "wb").write(images)
    open(os.path.join(d, prefix + "-labels-idx1-ubyte"), "wb").write(labels)
PY

admin_pw=blackbox-admin-password-1
doctor_pw=blackbox-doctor-password-1
viewer_pw=blackbox-viewer-password-1
HOSPITAL_ADMIN_PASSWORD=$admin_pw HOSPITAL_DOCTOR_PASSWORD=$doctor_pw HOSPITAL_VIEWER_PASSWORD=$viewer_pw \
DATABASE_URL="sqlite://$work/blackbox.sqlite?mode=rwc" \
    "$bin" simulate --rounds 2 --image-size 32 --patients 90 --public-patients 30 --run-dir "$work/run" \
    --listen 127.0.0.1:0 --mnist-dir "$work/mnist" >"$work/server.log" 2>&1 &
pid=$!

base=
for _ in $(seq 1 240); do
    base=$(sed -n 's|^dashboard: \(http://127\.0\.0\.1:[0-9]*\)/.*|\1|p' "$work/server.log" | head -1)
    [ -n "$base" ] && break
    kill -0 "$pid" 2>/dev/null || { cat "$work/server.log" >&2; echo "blackbox: the dashboard exited" >&2; exit 1; }
    sleep 0.5
done
[ -n "$base" ] || { cat "$work/server.log" >&2; echo "blackbox: the dashboard did not start" >&2; exit 1; }
echo "blackbox: dashboard at $base"

token() {
    python3 -c 'import json, sys, urllib.request
r = urllib.request.Request(sys.argv[1] + "/api/auth/login", method="POST",
    data=json.dumps({"username": "admin", "password": sys.argv[2]}).encode(),
    headers={"Content-Type": "application/json"})
print(json.load(urllib.request.urlopen(r, timeout=20))["token"])' "$base" "$admin_pw"
}
# The first model (the inference and export endpoints answer 503 before).
admin=$(token)
for _ in $(seq 1 360); do
    code=$(python3 -c 'import sys, urllib.request, urllib.error
r = urllib.request.Request(sys.argv[1] + "/api/model/export", headers={"Authorization": "Bearer " + sys.argv[2]})
try:
    print(urllib.request.urlopen(r, timeout=20).status)
except urllib.error.HTTPError as e:
    print(e.code)' "$base" "$admin")
    [ "$code" = 200 ] && break
    sleep 0.5
done
[ "$code" = 200 ] || { echo "blackbox: no model after 180 s" >&2; exit 1; }

python3 "$here/checks.py" "$base" "$admin_pw" "$doctor_pw" "$viewer_pw"

echo "blackbox: schemathesis (all checks)"
cd "$work"
FEDCORE_ADMIN_TOKEN=$(token) PYTHONPATH="$here" timeout 900 "$schemathesis" \
    --config-file "$here/schemathesis.toml" run "$base/api/openapi.json" \
    --checks all --exclude-path /api/events \
    --exclude-path /api/auth/logout --exclude-path /api/auth/password

#!/usr/bin/env python3
"""Black-box checks of a running dashboard, as an outside tester would run
them: only HTTP against 127.0.0.1, no knowledge of the code. Bounded: a few
hundred requests, about a minute (most of it waiting out the header-read
timeout). Standard library only.

    checks.py BASE_URL ADMIN_PASSWORD DOCTOR_PASSWORD VIEWER_PASSWORD

Exits non-zero, naming each failed check, when any fails.
"""

import base64
import http.client
import json
import socket
import struct
import sys
import time
import urllib.parse
import zlib

BASE = sys.argv[1].rstrip("/")
PASSWORDS = {"admin": sys.argv[2], "doctor": sys.argv[3], "viewer": sys.argv[4]}
URL = urllib.parse.urlparse(BASE)
HOST, PORT = URL.hostname, URL.port
assert HOST in ("127.0.0.1", "localhost", "::1"), "only against this machine"

failures = []
passed = 0
requests = 0
MAX_REQUESTS = 400


def check(name, ok, detail=""):
    global passed
    if ok:
        passed += 1
    else:
        failures.append(f"{name}: {detail}")
        print(f"blackbox: FAILED {name}: {detail}", flush=True)


def call(method, path, token=None, body=None, headers=None, raw=None, timeout=20):
    """One request; (status, headers as a lower-case dict, body bytes)."""
    global requests
    requests += 1
    assert requests <= MAX_REQUESTS, "request budget spent"
    h = dict(headers or {})
    if token:
        h["Authorization"] = f"Bearer {token}"
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        h.setdefault("Content-Type", "application/json")
    c = http.client.HTTPConnection(HOST, PORT, timeout=timeout)
    try:
        c.request(method, path, body=data, headers=h)
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def is_json_error(status, headers, body):
    if not headers.get("content-type", "").startswith("application/json"):
        return False
    try:
        return isinstance(json.loads(body).get("error"), str)
    except ValueError:
        return False


def login(user, password=None):
    s, h, b = call("POST", "/api/auth/login", body={"username": user, "password": password or PASSWORDS[user]})
    if s != 200:
        raise SystemExit(f"blackbox: cannot sign in as {user}: {s} {b[:200]!r}")
    return json.loads(b)["token"]


def png(width, height, pixels=True):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
    if pixels:
        rows = b"".join(b"\x00" + bytes((x + y) % 256 for x in range(width)) for y in range(height))
        out += chunk(b"IDAT", zlib.compress(rows))
    return out + chunk(b"IEND", b"")


def upload(token, data, field="image"):
    boundary = "blackboxBOUNDARY"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="x.png"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return call("POST", "/api/inference/predict", token, raw=body,
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})


def open_stream(token):
    """Opens the event stream; (status, socket or None)."""
    global requests
    requests += 1
    s = socket.create_connection((HOST, PORT), timeout=10)
    s.sendall(f"GET /api/events HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}\r\n"
              "Accept: text/event-stream\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        part = s.recv(4096)
        if not part:
            break
        head += part
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1") else 0
    if status != 200:
        s.close()
        return status, None
    return status, s


def closes_within(sock, seconds):
    """Whether the server closes `sock`, or ends the chunked answer on it
    (an event stream that ends on a kept-alive connection), within
    `seconds`."""
    sock.settimeout(0.5)
    end = time.monotonic() + seconds
    seen = b""
    while time.monotonic() < end:
        try:
            part = sock.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            return True
        if not part:
            return True
        # The last chunk: `0` on a line of its own, then an empty line.
        seen = (seen + part)[-16:]
        if (b"\n" + seen).endswith(b"\n0\r\n\r\n"):
            return True
    return False


started = time.monotonic()

# 1. Headers every answer carries.
s, h, _ = call("GET", "/login")
for name in ("content-security-policy", "x-frame-options", "x-content-type-options", "referrer-policy"):
    check(f"header {name} on a page", name in h, str(h))
s, h, b = call("GET", "/api/auth/me")
check("no token: 401 JSON", s == 401 and is_json_error(s, h, b), f"{s} {b[:100]!r}")
check("API answers are not cached", h.get("cache-control") == "no-store", str(h))

# 2. Forged tokens.
admin = login("admin")
header, payload, _sig = admin.split(".")
claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
claims["role"] = "admin"
none_header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
for label, token in [("alg none", f"{none_header}.{forged_payload}."),
                     ("wrong signature", f"{header}.{forged_payload}.{'A' * 43}"),
                     ("garbage", "not.a.token")]:
    s, h, b = call("GET", "/api/users", token)
    check(f"forged token ({label}) refused", s == 401 and is_json_error(s, h, b), f"{s}")

# 3. Roles.
doctor = login("doctor")
viewer = login("viewer")
for who, token, method, path in [("viewer", viewer, "GET", "/api/users"), ("viewer", viewer, "GET", "/api/audit"),
                                 ("doctor", doctor, "GET", "/api/users"), ("doctor", doctor, "GET", "/api/model/export"),
                                 ("viewer", viewer, "PATCH", "/api/clients/hospital-1/status")]:
    s, h, b = call(method, path, token, body={"status": "suspended"} if method == "PATCH" else None)
    check(f"{who} may not {method} {path}", s == 403 and is_json_error(s, h, b), f"{s}")
s, _, _ = call("GET", "/api/metrics/overview", viewer)
check("viewer reads metrics", s == 200, f"{s}")

# 4. Sign-in: same answer for an unknown name, a 60 KB name is not stored, throttling.
s1, _, b1 = call("POST", "/api/auth/login", body={"username": "doctor", "password": "wrong-password-1"})
s2, _, b2 = call("POST", "/api/auth/login", body={"username": "nobody-here", "password": "wrong-password-1"})
check("wrong password and unknown name answer alike", s1 == s2 == 401 and b1 == b2, f"{s1} {s2}")
huge = "A" * 60_000
s, h, b = call("POST", "/api/auth/login", body={"username": huge, "password": "x" * 12})
check("a 60 KB user name is refused", s in (400, 401) and is_json_error(s, h, b), f"{s}")
statuses = [call("POST", "/api/auth/login", body={"username": "throttle-me", "password": "wrong-password-1"})[0]
            for _ in range(7)]
check("repeated failures are throttled", statuses[-1] == 429, str(statuses))
s, h, b = call("POST", "/api/auth/login", body={"username": "throttle-me", "password": "wrong-password-1"})
check("throttled answer says when", s == 429 and "retry-after" in h, f"{s} {h}")
s, _, b = call("GET", "/api/audit?limit=1000", admin)
check("the audit log holds no attacker text", s == 200 and huge.encode() not in b, f"{s} {len(b)}")

# 5. Framework errors are JSON with their status.
for label, kwargs, want in [
    ("malformed JSON", dict(raw=b"{not json", headers={"Content-Type": "application/json"}), 400),
    ("wrong content type", dict(raw=b"{}", headers={"Content-Type": "text/plain"}), 415),
    ("missing field", dict(body={"username": "abc"}), 422),
    ("body over the limit", dict(raw=b"{" + b" " * 100_000 + b"}", headers={"Content-Type": "application/json"}), 413),
]:
    s, h, b = call("POST", "/api/auth/register", admin, **kwargs)
    check(f"{label}: {want} JSON", s == want and is_json_error(s, h, b), f"{s} {h.get('content-type')} {b[:80]!r}")
s, h, b = call("GET", "/api/users/abc/export", admin)
check("bad path parameter: 400 JSON", s == 400 and is_json_error(s, h, b), f"{s} {b[:80]!r}")
s, h, b = call("DELETE", "/api/metrics/overview", admin)
check("wrong method: 405 JSON with Allow", s == 405 and is_json_error(s, h, b) and "allow" in h, f"{s} {h}")
s, h, b = call("GET", "/api/clients/x';%20DROP%20TABLE%20clients;--", admin)
check("SQL-shaped id: 404 JSON", s == 404 and is_json_error(s, h, b), f"{s}")

# 6. Uploads.
s, h, b = upload(doctor, png(64, 64))
check("an X-ray is read", s == 200 and len(json.loads(b).get("findings", [])) == 14, f"{s} {b[:100]!r}")
s, h, b = upload(doctor, png(50_000, 50_000, pixels=False))
check("a decompression bomb is refused before decoding", s == 422 and is_json_error(s, h, b), f"{s}")
s, h, b = upload(doctor, b"GIF89a\x01\x00\x01\x00")
check("not a PNG or JPEG: 415", s == 415 and is_json_error(s, h, b), f"{s}")
s, h, b = upload(doctor, b"\x00" * (9 << 20))
check("an upload over 8 MiB: 413", s == 413 and is_json_error(s, h, b), f"{s}")

# 7. Sessions end: sign-out kills the token; a role change closes the open stream.
d1, d2 = login("doctor"), login("doctor")
s, _, _ = call("POST", "/api/auth/logout", d1)
s2, _, _ = call("GET", "/api/auth/me", d2)
check("signing out ends the user's other tokens", s == 204 and s2 == 401, f"{s} {s2}")
s, _, b = call("POST", "/api/auth/refresh", viewer)
check("refresh gives a new token", s == 200 and json.loads(b).get("token"), f"{s}")
status, stream = open_stream(viewer)
check("viewer opens the event stream", status == 200, f"{status}")
users = json.loads(call("GET", "/api/users", admin)[2])
viewer_id = next(u["id"] for u in users if u["username"] == "viewer")
s, _, _ = call("PATCH", f"/api/users/{viewer_id}/role", admin, body={"role": "doctor"})
check("a role change closes the user's open stream", s == 200 and stream is not None and closes_within(stream, 5), f"{s}")
s, _, _ = call("GET", "/api/auth/me", viewer)
check("and ends the token of the old role", s == 401, f"{s}")
call("PATCH", f"/api/users/{viewer_id}/role", admin, body={"role": "viewer"})

# 8. Caps: event streams per user.
viewer = login("viewer")
streams = [open_stream(viewer) for _ in range(5)]
codes = [code for code, _ in streams]
check("at most 4 event streams per user", codes[:4] == [200] * 4 and codes[4] == 429, str(codes))
for _, sock in streams:
    if sock:
        sock.close()

# 9. Slow clients: half-sent headers are cut off (header-read timeout 10 s).
slow = []
for _ in range(3):
    sock = socket.create_connection((HOST, PORT), timeout=5)
    sock.sendall(f"GET /login HTTP/1.1\r\nHost: {HOST}\r\nX-Slow: ".encode())
    slow.append(sock)
closed = [closes_within(sock, 15) for sock in slow]
check("slow-header connections are closed", all(closed), str(closed))

print(f"blackbox: {passed} checks passed, {len(failures)} failed, {requests} requests, "
      f"{time.monotonic() - started:.0f} s", flush=True)
sys.exit(1 if failures else 0)

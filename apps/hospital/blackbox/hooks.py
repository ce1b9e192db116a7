"""Schemathesis hooks for the dashboard's API run.

The run signs in once as the admin. Operations that would end that very
session are kept off user 1 (the admin): a role change, an erasure and a
password reset of user 1 would revoke the run's token (by design, tested in
apps/hospital/tests/api.rs), and every later request would only see 401.
"""

import schemathesis

ADMIN_ID = 1


@schemathesis.hook("filter_path_parameters")
def not_the_signed_in_admin(ctx, path_parameters):
    if not path_parameters or "id" not in path_parameters:
        return True
    return str(path_parameters["id"]) != str(ADMIN_ID)


@schemathesis.hook("map_body")
def small_jobs(ctx, body):
    """Runs queued by the API run train for real once the command line's
    run ends: keep them to one round of MNIST (the tiny set run.sh writes),
    so that they end in seconds; the other fields stay as generated, and
    tests/jobs.rs covers the X-ray settings."""
    op = ctx.operation
    if op.method.upper() == "POST" and op.path == "/api/jobs" and isinstance(body, dict):
        body = dict(body)
        # Only values the schema allows are swapped or dropped: a value
        # schemathesis made invalid on purpose (a negative case) stays as
        # it is, so that the request stays invalid and must be refused.
        if body.get("data") in VALID["data"]:
            body["data"] = "mnist"
        if _whole_in(body.get("rounds"), 1, 100):
            body["rounds"] = 1
        for k in ("image_size", "encrypt", "model", "keys", "threshold"):
            if k in body and (body[k] is None or body[k] in VALID.get(k, ()) or
                              (k == "image_size" and _whole_in(body[k], 32, 224)) or
                              (k == "threshold" and _whole_in(body[k], 2, 10))):
                body.pop(k)
    return body


VALID = {
    "data": ("synthetic_xrays", "chestxray14", "mnist"),
    "encrypt": ("none", "head", "all"),
    "keys": ("single", "multiparty"),
    "model": ("densenet121", "small_cnn"),
}


def _whole_in(v, lo, hi):
    """A JSON integer (8 or 8.0, not true) from lo to hi."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return float(v).is_integer() and lo <= v <= hi

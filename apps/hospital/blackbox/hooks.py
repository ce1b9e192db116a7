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
        body["data"] = "mnist"
        body["rounds"] = 1
        for k in ("image_size", "encrypt", "model"):
            body.pop(k, None)
    return body

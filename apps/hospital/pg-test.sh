# Sourced by scripts/test.sh (from the repository root): starts a throwaway PostgreSQL cluster (Debian's
# server binaries) on 127.0.0.1:55432 for the dashboard store's tests, exports
# FEDCORE_TEST_POSTGRES and stops the cluster when the shell exits.
_pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
if [ -z "$_pg_bin" ] || [ ! -x "$_pg_bin/initdb" ]; then
    echo "pg-test: Debian's PostgreSQL server is not installed; the PostgreSQL tests are skipped" >&2
else
    _pg_dir=$(mktemp -d /tmp/fedcore-pg.XXXXXX)
    _pg_as=()
    if [ "$(id -u)" -eq 0 ]; then
        # PostgreSQL refuses to run as root.
        chown postgres "$_pg_dir"
        _pg_as=(runuser -u postgres --)
    fi
    _pg_port=55432
    if "${_pg_as[@]}" "$_pg_bin/initdb" -D "$_pg_dir/data" -U postgres -A trust >"$_pg_dir/initdb.log" 2>&1 \
        && "${_pg_as[@]}" "$_pg_bin/pg_ctl" -D "$_pg_dir/data" -l "$_pg_dir/server.log" -w \
            -o "-c listen_addresses=127.0.0.1 -p $_pg_port -k $_pg_dir -c fsync=off" start >/dev/null; then
        export FEDCORE_TEST_POSTGRES="postgres://postgres@127.0.0.1:$_pg_port/postgres"
        trap '"${_pg_as[@]}" "$_pg_bin/pg_ctl" -D "$_pg_dir/data" -m fast stop >/dev/null 2>&1; rm -rf "$_pg_dir"' EXIT
        echo "pg-test: PostgreSQL $("$_pg_bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$_pg_port"
    else
        echo "pg-test: PostgreSQL did not start (see below); the PostgreSQL tests are skipped" >&2
        cat "$_pg_dir"/*.log >&2 || true
    fi
fi

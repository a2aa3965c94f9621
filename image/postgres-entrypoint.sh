#!/bin/sh
# The entrypoint of berth.test/postgres:15 (hack/build-image --postgres installs it as
# /usr/local/bin/berth-postgres-entrypoint; deploy/examples/postgres.yaml; docs/postgres.md):
#
#   berth-postgres-entrypoint [POSTGRES-OPTION...]     (e.g. -c shared_buffers=64MB; passed on to postgres)
#
# Runs PostgreSQL 15 on the volume mounted at /var/lib/postgresql/data, as the user it is started as, never root.
# - PGDATA (the image sets /var/lib/postgresql/data/pgdata) is a subdirectory of the mount, not the mount itself:
#   the mount's own mode and group are kubelet's (fsGroup: setgid and group-writable), and an ext4 volume's root
#   holds lost+found, which initdb refuses.
# - PGDATA is made mode 0700 at every start: PostgreSQL refuses to start on a data directory group or others can
#   write, and kubelet's fsGroup handling makes everything on the volume group-writable whenever it applies it
#   (fsGroupChangePolicy: Always, or OnRootMismatch when the root's group or mode differ).
# - An empty (or new) PGDATA gets `initdb`: superuser POSTGRES_USER (default postgres) with the password
#   POSTGRES_PASSWORD, required then; local (Unix socket) connections trusted, TCP ones with the password
#   (scram-sha-256) from any address, the server listening on all of them. The pod network reaches it only
#   with the password; `kubectl exec` (the readiness probe's pg_isready, psql, pgbench) through the socket without.
#   Encoding UTF8, locale C.UTF-8 (in libc; the image has no other). A later start ignores POSTGRES_PASSWORD.
# - Then `exec postgres`: the server is the container's process and gets its stop signal (the image's StopSignal is
#   SIGINT, a fast shutdown).
# Every refusal says what is wrong on stderr (kubectl logs) and exits 1.
set -eu

me=berth-postgres-entrypoint
die() {
  echo "$me: $*" >&2
  exit 1
}

uid=$(id -u)
if [ "$uid" = 0 ]; then
  die "started as root: PostgreSQL does not run as root and neither does this entrypoint. Run the container" \
    "as the image's user, postgres 999:999 (securityContext runAsUser: 999, runAsGroup: 999, runAsNonRoot: true;" \
    "deploy/examples/postgres.yaml)"
fi
user=$(id -un 2>/dev/null) || die "uid $uid has no entry in /etc/passwd, which initdb and postgres need: run as 999:999 (postgres)"

PGDATA=${PGDATA:-/var/lib/postgresql/data/pgdata}
export PGDATA
case $PGDATA in
  /*) ;;
  *) die "PGDATA=$PGDATA is not an absolute path" ;;
esac
mount=$(dirname "$PGDATA")
[ -d "$mount" ] || die "$mount does not exist: mount the volume there (PGDATA=$PGDATA is its subdirectory)"

# A new cluster needs its superuser's password: without it, refused before anything is made on the volume.
if [ ! -e "$PGDATA" ] || { [ -d "$PGDATA" ] && [ -O "$PGDATA" ] && [ -z "$(ls -A "$PGDATA")" ]; }; then
  [ -n "${POSTGRES_PASSWORD:-}" ] || die "$PGDATA holds no cluster and POSTGRES_PASSWORD is not set: a new" \
    "cluster needs the password of its superuser for connections over TCP (deploy/examples/postgres.yaml takes it" \
    "from the Secret postgres)"
fi
if [ ! -e "$PGDATA" ]; then
  mkdir "$PGDATA" 2>/dev/null || die "cannot create $PGDATA: $mount is $(stat -c '%U:%G mode %a' "$mount")" \
    "and this is uid $uid ($user), groups $(id -G). Give the pod securityContext fsGroup: 999 (kubelet then makes" \
    "the volume group-writable for gid 999)"
fi
[ -d "$PGDATA" ] || die "$PGDATA exists and is not a directory"
[ -O "$PGDATA" ] || die "$PGDATA belongs to $(stat -c '%U (uid %u)' "$PGDATA"), not to $user (uid $uid):" \
  "PostgreSQL runs only on a data directory its own user owns. Run as the user that made it, or chown it"
chmod 0700 "$PGDATA" || die "cannot chmod 0700 $PGDATA"

# The Unix socket's directory (Debian's build: /var/run/postgresql, made 2775 postgres:postgres by the package).
sockets=/var/run/postgresql
[ -d "$sockets" ] && [ -w "$sockets" ] || die "$sockets (the server's socket directory) is missing or not" \
  "writable by uid $uid: $(stat -c '%U:%G mode %a' "$sockets" 2>&1)"

if [ -s "$PGDATA/PG_VERSION" ]; then
  version=$(cat "$PGDATA/PG_VERSION")
  [ "$version" = 15 ] || die "$PGDATA holds a PostgreSQL $version cluster; this image runs PostgreSQL 15" \
    "(no upgrade is attempted)"
  echo "$me: starting the PostgreSQL $version cluster in $PGDATA" >&2
else
  if [ -n "$(ls -A "$PGDATA")" ]; then
    die "$PGDATA has no PG_VERSION but is not empty ($(ls -A "$PGDATA" | head -n 5 | tr '\n' ' ')):" \
      "not a cluster, and initdb would refuse it. Empty it or point PGDATA elsewhere"
  fi
  superuser=${POSTGRES_USER:-postgres}
  # initdb reads the password from a file; this one only the current user can read, removed whatever happens.
  pwfile=$(umask 077 && mktemp "${TMPDIR:-/tmp}/$me.XXXXXX") || die "cannot create a temporary file in ${TMPDIR:-/tmp}"
  trap 'rm -f "$pwfile"' EXIT
  printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
  echo "$me: $PGDATA is empty: initdb (superuser $superuser)" >&2
  initdb --username="$superuser" --pwfile="$pwfile" --auth-local=trust --auth-host=scram-sha-256 \
    --encoding=UTF8 --locale=C.UTF-8 >&2 || die "initdb failed (its messages are above); $PGDATA is left as" \
    "initdb left it: empty it before the next start"
  rm -f "$pwfile"
  trap - EXIT
  # initdb's pg_hba.conf lets TCP in from 127.0.0.1 and ::1 only; the pod network is every other address.
  printf '%s\n' '' "# $me: TCP from any address (the pod network), with the password." \
    'host all all all scram-sha-256' >> "$PGDATA/pg_hba.conf"
  printf '%s\n' '' "# $me: listen on every address of the pod, not only localhost." \
    "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
fi

exec postgres -D "$PGDATA" "$@"

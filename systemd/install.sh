#!/usr/bin/env bash
# Install mcp-sse as a hardened systemd service, from a checkout of this repository:
#
#   python setup_secure.py            # writes .env (mode 0600)
#   sudo systemd/install.sh           # then: sudo systemctl enable --now mcp-sse
#
# What it does: a system user `mcp-sse`; a virtualenv in /opt/mcp-sse/venv with this repository
# pip-installed (a copy, not an editable install: the unit hides /home); /etc/mcp-sse (0750,
# group mcp-sse) holding the .env as mcp-sse.env (0600, read by systemd only) and copies of the
# servers file and TLS files the .env names (0640, rewritten to point there); the unit in
# /etc/systemd/system; `systemctl daemon-reload`. Rerun it to upgrade: the venv is reused.
#
# --root DIR (or DESTDIR=DIR) stages everything under DIR and skips the user, chown and
# systemctl, for packaging and tests. --dry-run prints the commands instead of running them.
set -euo pipefail
umask 077

usage() {
    cat <<'EOF'
usage: sudo systemd/install.sh [--env-file PATH] [--root DIR] [--skip-venv] [--dry-run]

  --env-file PATH  the settings file from setup_secure.py (default: <repo>/.env)
  --root DIR       stage under DIR (alias --prefix; also DESTDIR=DIR); no user, chown, systemctl
  --skip-venv      keep /opt/mcp-sse/venv as it is (only update settings and the unit)
  --dry-run        print what would be done, change nothing
EOF
}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
env_file=$repo/.env
root=${DESTDIR:-}
dry_run=0
skip_venv=0
python=${PYTHON:-python3}

while (($#)); do
    case $1 in
        --env-file) env_file=${2:?--env-file needs a path}; shift ;;
        --root | --prefix) root=${2:?$1 needs a directory}; shift ;;
        --skip-venv) skip_venv=1 ;;
        --dry-run) dry_run=1 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
    shift
done
root=${root%/}
live=0
[[ -z $root ]] && live=1

opt=/opt/mcp-sse
etc=/etc/mcp-sse
unit_dir=/etc/systemd/system

run() {  # run a command, or only show it under --dry-run
    if ((dry_run)); then
        printf '+'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

live_only() {  # things that need the real system: skipped when staging under --root
    if ((live)); then run "$@"; else printf 'skipped under --root: %s\n' "$*"; fi
}

env_get() {  # KEY FILE: the value, one level of quotes removed (as setup_secure.py writes it)
    local line
    line=$(grep -E "^[[:space:]]*(export[[:space:]]+)?$1[[:space:]]*=" "$2" | tail -n 1) || return 0
    line=${line#*=}
    if [[ $line =~ ^\"(.*)\"$ || $line =~ ^\'(.*)\'$ ]]; then
        line=${BASH_REMATCH[1]}
    fi
    printf '%s\n' "$line"
}

env_set() {  # KEY VALUE FILE: replace KEY's line; an empty VALUE removes it
    if ((dry_run)); then
        printf '+ set %s=%s in %s\n' "$1" "$2" "$3"
        return
    fi
    sed -i -E "/^[[:space:]]*(export[[:space:]]+)?$1[[:space:]]*=/d" "$3"
    if [[ -n $2 ]]; then
        printf '%s=%s\n' "$1" "$2" >>"$3"
    fi
}

[[ -f $env_file ]] || { echo "install.sh: no $env_file: run python setup_secure.py first" >&2; exit 1; }
if ((live && !dry_run && EUID != 0)); then
    echo "install.sh: run as root (sudo), or use --dry-run or --root DIR" >&2
    exit 1
fi
env_dir=$(cd "$(dirname "$env_file")" && pwd)

# 1. The service's own user, owner of /var/lib/mcp-sse and /var/log/mcp-sse (systemd makes those).
if ((live)) && ! getent passwd mcp-sse >/dev/null; then
    run useradd --system --user-group --home-dir /var/lib/mcp-sse --no-create-home \
        --shell /usr/sbin/nologin mcp-sse
fi

# 2. The code, in its own virtualenv.
if ((skip_venv)); then
    if ((live && !dry_run)) && [[ ! -x $opt/venv/bin/python ]]; then
        echo "install.sh: --skip-venv, but there is no $opt/venv yet" >&2
        exit 1
    fi
    echo "keeping $root$opt/venv as it is"
else
    run install -d -m 0755 "$root$opt"
    run "$python" -m venv "$root$opt/venv"
    run "$root$opt/venv/bin/pip" install --quiet "${repo}[fast]"  # uvloop: less CPU per call (bench/README.md)
fi

# 3. Settings: the .env, and the files it names, copied where the service can read them.
run install -d -m 0750 "$root$etc"
live_only chgrp mcp-sse "$etc"
run install -m 0600 "$env_file" "$root$etc/mcp-sse.env"
copy_named() {  # KEY DEST: copy the file KEY names to $etc/DEST and point KEY there
    local source
    source=$(env_get "$1" "$env_file")
    [[ -n $source ]] || return 0
    [[ $source == /* ]] || source=$env_dir/$source
    [[ -f $source ]] || { echo "install.sh: $1=$source: no such file" >&2; exit 1; }
    run install -m 0640 "$source" "$root$etc/$2"
    live_only chgrp mcp-sse "$etc/$2"
    env_set "$1" "$etc/$2" "$root$etc/mcp-sse.env"
}
copy_named MCP_SERVERS_FILE servers.json
copy_named TLS_CERT tls.crt
copy_named TLS_KEY tls.key
# A relative AUDIT_LOG would land in /var/lib/mcp-sse; drop it so the unit's /var/log/mcp-sse applies.
audit=$(env_get AUDIT_LOG "$env_file")
if [[ -n $audit && $audit != /* && $audit != off && $audit != none ]]; then
    env_set AUDIT_LOG "" "$root$etc/mcp-sse.env"
fi

# 4. The unit.
run install -d -m 0755 "$root$unit_dir"
run install -m 0644 "$repo/systemd/mcp-sse.service" "$root$unit_dir/mcp-sse.service"
live_only systemctl daemon-reload

cat <<EOF

Installed mcp-sse${root:+ under $root}. Next:
    sudo systemctl enable --now mcp-sse
    journalctl -u mcp-sse -f
    systemctl status mcp-sse
Settings: $etc/mcp-sse.env (rerun setup_secure.py --output $etc/mcp-sse.env to change them,
then sudo systemctl restart mcp-sse). Backends needing more: sudo systemctl edit mcp-sse
(see systemd/README.md).
EOF

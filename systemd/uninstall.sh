#!/usr/bin/env bash
# Undo systemd/install.sh: stop and remove the service, its unit and /opt/mcp-sse.
# Settings (/etc/mcp-sse), state, the audit log and the mcp-sse user are kept unless --purge.
# --root DIR (or DESTDIR=DIR) and --dry-run work as in install.sh.
set -euo pipefail

usage() {
    echo "usage: sudo systemd/uninstall.sh [--purge] [--root DIR] [--dry-run]"
}

root=${DESTDIR:-}
dry_run=0
purge=0
while (($#)); do
    case $1 in
        --purge) purge=1 ;;
        --root | --prefix) root=${2:?$1 needs a directory}; shift ;;
        --dry-run) dry_run=1 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
    shift
done
root=${root%/}
live=0
[[ -z $root ]] && live=1
if ((live && !dry_run && EUID != 0)); then
    echo "uninstall.sh: run as root (sudo), or use --dry-run or --root DIR" >&2
    exit 1
fi

run() {
    if ((dry_run)); then
        printf '+'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

if ((live)); then
    # Not installed, or already stopped: nothing to undo there.
    run systemctl disable --now mcp-sse.service || true
fi
run rm -f "$root/etc/systemd/system/mcp-sse.service"
run rm -rf "$root/etc/systemd/system/mcp-sse.service.d"
if ((live)); then
    run systemctl daemon-reload
fi
run rm -rf "$root/opt/mcp-sse"

if ((purge)); then
    run rm -rf "$root/etc/mcp-sse" "$root/var/lib/mcp-sse" "$root/var/log/mcp-sse"
    if ((live)) && getent passwd mcp-sse >/dev/null; then
        run userdel mcp-sse
    fi
    echo "Removed mcp-sse, its settings, state and logs."
else
    echo "Removed mcp-sse. Kept: $root/etc/mcp-sse (settings, secrets), /var/lib/mcp-sse," \
        "/var/log/mcp-sse (audit log) and the mcp-sse user; --purge removes them."
fi

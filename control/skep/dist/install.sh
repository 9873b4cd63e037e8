#!/bin/sh
# Installs skep as a systemd service on this machine.
#
#   install.sh server [ARGS...]                 control plane + node
#   install.sh agent --server URL --token TOKEN --ca-file FILE [ARGS...]
#
# The binary is taken from $SKEP_BIN (default: target/release/skep of this
# checkout; build it with `cargo xtask build`). ARGS go to the service's
# command line through /etc/default/skep-<role>. Run as root.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
bin=${SKEP_BIN:-$here/../../../target/release/skep}
prefix=${SKEP_PREFIX:-}

die() { echo "install.sh: $*" >&2; exit 1; }

[ $# -ge 1 ] || die "usage: install.sh server [ARGS...] | agent --server URL --token TOKEN --ca-file FILE [ARGS...]"
role=$1; shift
case $role in server|agent) ;; *) die "unknown role '$role' (server or agent)";; esac
[ -x "$bin" ] || die "no skep binary at $bin (run \`cargo xtask build\` or set SKEP_BIN)"
[ "$(id -u)" = 0 ] || [ -n "$prefix" ] || die "run as root"

env_file="$prefix/etc/default/skep-$role"
mkdir -p "$prefix/usr/local/bin" "$prefix/etc/systemd/system" "$prefix/etc/default" "$prefix/var/lib/skep"
install -m 0755 "$bin" "$prefix/usr/local/bin/skep"
install -m 0644 "$here/skep-$role.service" "$prefix/etc/systemd/system/skep-$role.service"

if [ "$role" = agent ]; then
    server= token= ca=
    rest=
    while [ $# -gt 0 ]; do
        case $1 in
            --server) server=$2; shift 2;;
            --token) token=$2; shift 2;;
            --ca-file) ca=$2; shift 2;;
            *) rest="$rest $1"; shift;;
        esac
    done
    [ -n "$server" ] || die "agent needs --server URL (the server's API address)"
    [ -n "$token" ] || die "agent needs --token TOKEN (DATA_DIR/node-token on the server)"
    [ -n "$ca" ] || die "agent needs --ca-file FILE (DATA_DIR/tls/ca.crt on the server)"
    [ -r "$ca" ] || die "cannot read the CA file $ca"
    mkdir -p "$prefix/etc/skep"
    install -m 0644 "$ca" "$prefix/etc/skep/ca.crt"
    umask 077
    cat > "$env_file" <<ENV
SKEP_SERVER=$server
SKEP_TOKEN=$token
SKEP_CA_FILE=/etc/skep/ca.crt
SKEP_AGENT_ARGS=${rest# }
SKEP_LOG=info
ENV
else
    umask 077
    cat > "$env_file" <<ENV
SKEP_SERVER_ARGS=$*
SKEP_LOG=info
ENV
fi
echo "installed skep-$role (settings: $env_file)"

if [ -z "$prefix" ]; then
    systemctl daemon-reload
    systemctl enable --now "skep-$role.service"
    echo "started: systemctl status skep-$role; logs: journalctl -u skep-$role"
    [ "$role" = server ] && echo "kubeconfig: /var/lib/skep/server/kubeconfig.yaml"
fi

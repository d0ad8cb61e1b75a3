#!/usr/bin/env bash
# One command from a fresh host to a running outline-mcp-proxy behind nginx (the seed's
# install.sh). Debian 12 / Ubuntu (apt) and Amazon Linux 2023 (dnf).
#
#   sudo systemd/install.sh --domain mcp.example.com --outline-url https://wiki.example.com
#   sudo systemd/install.sh --uninstall
#
# It installs Docker and nginx when missing (a running Docker is used as it is), creates
# the service user `mcp-proxy` in group docker, installs the binary, the env file
# (0600 root:root, never overwritten once there), the unit, the containers' slice, a
# drop-in that keeps nginx from the OOM killer, and nginx's site with the
# domain filled in, a self-signed certificate, a random password for /stats and /metrics
# (MCP_PROXY_STATS_PASSWORD in the env file, and nginx's htpasswd made from it; its place
# is printed, never the password), the firewall unit that keeps the containers off the
# cloud metadata address (169.254.0.0/16, a DOCKER-USER rule), pulls the image, enables
# and starts the services, and runs `check`. Running it again changes nothing;
# --uninstall removes what it added and leaves Docker, its images and the users'
# containers alone.
#
# Options: --binary PATH (default: target/release/outline-mcp-proxy beside this script,
# else one on PATH), --image REF (default: the proxy's), --no-pull (use a local image),
# --set NAME=VALUE (a setting for the env file when it is first written; repeatable).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
domain="" outline_url="" binary="" image="" pull=1 uninstall=0 settings=()
while [ $# -gt 0 ]; do
  case "$1" in
    --domain) domain=$2; shift 2 ;;
    --outline-url) outline_url=$2; shift 2 ;;
    --binary) binary=$2; shift 2 ;;
    --image) image=$2; shift 2 ;;
    --no-pull) pull=0; shift ;;
    --set) settings+=("$2"); shift 2 ;;
    --uninstall) uninstall=1; shift ;;
    -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

BIN=/usr/local/bin/outline-mcp-proxy
ENV_FILE=/etc/outline-mcp-proxy.env
UNIT=/etc/systemd/system/mcp-proxy.service
FIREWALL_UNIT=/etc/systemd/system/mcp-proxy-firewall.service
FIREWALL=/usr/local/lib/outline-mcp-proxy/metadata-firewall
SLICE=/etc/systemd/system/outline_mcp_proxy.slice
NGINX_OOM=/etc/systemd/system/nginx.service.d/outline-mcp-proxy.conf
SITE=/etc/nginx/conf.d/mcp.conf
CRT=/etc/ssl/certs/self-signed.crt
KEY=/etc/ssl/private/self-signed.key
HTPASSWD=/etc/nginx/.htpasswd
SVC_USER=mcp-proxy

say() { printf '%s\n' "$*"; }
changed() { say "  changed: $*"; }
[ "$(id -u)" -eq 0 ] || { say "run as root (sudo)" >&2; exit 1; }

# put $2 at $1 with mode $3 and owner $4, only when it differs; says so when it changed
place() {
  local dest=$1 src=$2 mode=$3 owner=$4
  if [ -f "$dest" ] && cmp -s "$src" "$dest"; then return 1; fi
  install -D -m "$mode" -o "${owner%%:*}" -g "${owner##*:}" "$src" "$dest"
  changed "$dest"
}

if [ "$uninstall" -eq 1 ]; then
  say "removing outline-mcp-proxy (Docker, its images and the users' containers stay)"
  if systemctl list-unit-files mcp-proxy.service >/dev/null 2>&1; then
    systemctl disable --now mcp-proxy.service >/dev/null 2>&1 || true
  fi
  # stopping the firewall unit removes its DOCKER-USER rule; the script again, in case
  # the unit was never started
  systemctl disable --now mcp-proxy-firewall.service >/dev/null 2>&1 || true
  if [ -x "$FIREWALL" ]; then "$FIREWALL" remove || true; fi
  rm -f "$UNIT" "$FIREWALL_UNIT" "$BIN" "$SITE" "$ENV_FILE" "$CRT" "$KEY" "$HTPASSWD" "$SLICE" "$NGINX_OOM"
  rmdir "$(dirname "$NGINX_OOM")" 2>/dev/null || true
  rm -rf "$(dirname "$FIREWALL")"
  rm -rf /var/lib/outline-mcp-proxy   # the OAuth grants (sealed; useless without the tokens)
  systemctl daemon-reload
  if id "$SVC_USER" >/dev/null 2>&1; then userdel "$SVC_USER"; fi
  if systemctl is-active --quiet nginx; then nginx -t -q && systemctl reload nginx; fi
  say "done"
  exit 0
fi

[ -n "$domain" ] && [ -n "$outline_url" ] || { say "--domain and --outline-url are required (see --help)" >&2; exit 2; }
case "$domain" in *[!A-Za-z0-9.-]*|"") say "--domain: a host name" >&2; exit 2 ;; esac
case "$outline_url" in http://*|https://*) ;; *) say "--outline-url: an http(s) URL" >&2; exit 2 ;; esac

if command -v apt-get >/dev/null; then pm=apt
elif command -v dnf >/dev/null; then pm=dnf
else say "neither apt-get nor dnf: install Docker and nginx by hand, then run this again" >&2; exit 1; fi
pkg_install() {
  say "installing $*"
  if [ "$pm" = apt ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    dnf install -y -q "$@"
  fi
}

# 1. Docker: one that answers is used as it is
if ! docker version --format '{{.Server.Version}}' >/dev/null 2>&1; then
  command -v docker >/dev/null || pkg_install "$([ "$pm" = apt ] && echo docker.io || echo docker)"
  systemctl enable --now docker
fi
# 2. nginx, openssl, and iptables (the metadata firewall)
command -v nginx >/dev/null || pkg_install nginx
command -v openssl >/dev/null || pkg_install openssl
command -v iptables >/dev/null || pkg_install "$([ "$pm" = apt ] && echo iptables || echo iptables-nft)"

# 3. the service user, in group docker (the socket's group)
getent group docker >/dev/null || groupadd --system docker
if ! id "$SVC_USER" >/dev/null 2>&1; then
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin --groups docker "$SVC_USER"
  changed "user $SVC_USER"
elif ! id -nG "$SVC_USER" | grep -qw docker; then
  usermod -a -G docker "$SVC_USER"; changed "user $SVC_USER joins docker"
fi

# 4. the binary
if [ -z "$binary" ]; then
  if [ -x "$here/target/release/outline-mcp-proxy" ]; then binary=$here/target/release/outline-mcp-proxy
  else binary=$(command -v outline-mcp-proxy || true); fi
fi
[ -n "$binary" ] && [ -x "$binary" ] || { say "no binary: cargo build --release, or --binary PATH" >&2; exit 1; }
place "$BIN" "$binary" 0755 root:root || true

# 5. the env file: written once, never overwritten (the operator edits it)
if [ ! -f "$ENV_FILE" ]; then
  tmp=$(mktemp)
  {
    echo "# outline-mcp-proxy settings: see outline-mcp-proxy --help and the README"
    echo "OUTLINE_URL=$outline_url"
    # the OAuth front door's issuer and resource (Claude's and ChatGPT's connectors)
    echo "MCP_PROXY_PUBLIC_URL=https://$domain"
    echo "# sign-in with Outline accounts: an OAuth app in Outline with redirect URI"
    echo "# https://$domain/oauth/callback (without it people paste an API key instead)"
    echo "# OUTLINE_OAUTH_CLIENT_ID="
    echo "# OUTLINE_OAUTH_CLIENT_SECRET="
    [ -n "$image" ] && echo "MCP_PROXY_IMAGE=$image"
    for s in "${settings[@]}"; do
      case "$s" in
        *[[:cntrl:]]*) echo "--set: a control character (a new line?) in a setting" >&2; exit 2 ;;
        [A-Z]*=*) echo "$s" ;;
        *) echo "--set $s: NAME=VALUE" >&2; exit 2 ;;
      esac
    done
  } > "$tmp"
  install -m 0600 -o root -g root "$tmp" "$ENV_FILE"; rm -f "$tmp"
  changed "$ENV_FILE"
fi
setting() { (set -a; . "$ENV_FILE"; set +a; eval "printf '%s' \"\${$1:-}\""); }
image=${image:-$(setting MCP_PROXY_IMAGE)}
image=${image:-ghcr.io/vortiago/mcp-outline:latest}
env_changed=0
# the password the proxy asks for on /stats and /metrics, besides nginx's: made once,
# never replaced; kept only in the env file (never on a command line)
stats_password=$(setting MCP_PROXY_STATS_PASSWORD)
if [ -z "$stats_password" ] && [ ! -f "$HTPASSWD" ]; then
  stats_password=$(openssl rand -hex 20)
  printf '# /stats and /metrics (HTTP Basic, user MCP_PROXY_STATS_USER, default admin): nginx\n' >> "$ENV_FILE"
  printf '# asks for it too, from %s, made from it by install.sh\n' "$HTPASSWD" >> "$ENV_FILE"
  printf 'MCP_PROXY_STATS_PASSWORD=%s\n' "$stats_password" >> "$ENV_FILE"
  changed "$ENV_FILE: MCP_PROXY_STATS_PASSWORD"; env_changed=1
fi

# 6. the units (the proxy, the metadata firewall), and nginx's site with the domain
place "$UNIT" "$here/systemd/mcp-proxy.service" 0644 root:root && unit_changed=1 || unit_changed=0
place "$FIREWALL_UNIT" "$here/systemd/mcp-proxy-firewall.service" 0644 root:root && unit_changed=1 || true
place "$FIREWALL" "$here/systemd/metadata-firewall.sh" 0755 root:root && firewall_changed=1 || firewall_changed=0
# the containers' slice (Docker's systemd driver; its MemoryMax is set by the unit's
# ExecStartPre), and nginx out of the OOM killer's reach (a drop-in: a restart applies it)
place "$SLICE" "$here/systemd/outline_mcp_proxy.slice" 0644 root:root && unit_changed=1 || true
place "$NGINX_OOM" "$here/systemd/nginx-oom.conf" 0644 root:root && nginx_oom_changed=1 || nginx_oom_changed=0
tmp=$(mktemp); sed "s/DOMAIN_PLACEHOLDER/$domain/g" "$here/nginx.conf" > "$tmp"
place "$SITE" "$tmp" 0644 root:root && site_changed=1 || site_changed=0; rm -f "$tmp"
mkdir -p /var/www/certbot

# 7. a self-signed certificate (certbot replaces it) and the htpasswd for /stats
if [ ! -f "$CRT" ] || [ ! -f "$KEY" ]; then
  mkdir -p "$(dirname "$CRT")" "$(dirname "$KEY")"
  openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=$domain" \
    -addext "subjectAltName=DNS:$domain,DNS:localhost,IP:127.0.0.1" -keyout "$KEY" -out "$CRT" 2>/dev/null
  chmod 0600 "$KEY"; changed "$CRT (self-signed, 365 days)"; site_changed=1
fi
stats_user=$(setting MCP_PROXY_STATS_USER); stats_user=${stats_user:-admin}
if [ ! -f "$HTPASSWD" ] && [ -n "$stats_password" ]; then
  # one credential passes both walls: nginx's htpasswd holds the env file's password hashed
  # (openssl reads it from stdin, not its arguments)
  printf '%s:%s\n' "$stats_user" "$(printf '%s\n' "$stats_password" | openssl passwd -apr1 -stdin)" > "$HTPASSWD"
  # readable by nginx's workers (www-data on Debian, nginx on Amazon Linux), no one else
  nginx_user=$(sed -n 's/^[[:space:]]*user[[:space:]]\{1,\}\([^[:space:];]*\).*/\1/p' /etc/nginx/nginx.conf | head -1)
  chmod 0640 "$HTPASSWD"; chgrp "$(id -gn "${nginx_user:-www-data}" 2>/dev/null || echo root)" "$HTPASSWD"
  changed "$HTPASSWD"
  say "  /stats and /metrics: user $stats_user, password: MCP_PROXY_STATS_PASSWORD in $ENV_FILE (root only)"
  site_changed=1
elif [ -z "$stats_password" ]; then
  say "  note: MCP_PROXY_STATS_PASSWORD is not set in $ENV_FILE: /stats is guarded by nginx's $HTPASSWD alone"
fi

# 8. the image
if docker image inspect "$image" >/dev/null 2>&1; then :
elif [ "$pull" -eq 1 ]; then docker pull -q "$image" >/dev/null && changed "image $image"
else say "image $image is missing and --no-pull was given" >&2; exit 1; fi

# 9. both services, enabled and running
{ [ "$unit_changed" -eq 1 ] || [ "$nginx_oom_changed" -eq 1 ]; } && systemctl daemon-reload
systemctl enable --quiet mcp-proxy.service mcp-proxy-firewall.service nginx.service
if [ "$unit_changed" -eq 1 ] || [ "$env_changed" -eq 1 ] || ! systemctl is-active --quiet mcp-proxy; then
  systemctl restart mcp-proxy
fi
# the DOCKER-USER rule (after the proxy: it makes the containers' network)
if [ "$unit_changed" -eq 1 ] || [ "$firewall_changed" -eq 1 ] || [ "$env_changed" -eq 1 ] \
  || ! systemctl is-active --quiet mcp-proxy-firewall; then
  systemctl restart mcp-proxy-firewall
  changed "DOCKER-USER: containers on the proxy's network cannot reach 169.254.0.0/16 (cloud metadata)"
fi
nginx -t -q
if ! systemctl is-active --quiet nginx; then systemctl start nginx
elif [ "$nginx_oom_changed" -eq 1 ]; then systemctl restart nginx
elif [ "$site_changed" -eq 1 ]; then systemctl reload nginx; fi

# 10. check, as the service runs it
for _ in $(seq 1 50); do systemctl is-active --quiet mcp-proxy && break; sleep 0.2; done
say "checking:"
set +e
# the settings reach it through the environment (the env file is root's, sourced here),
# never its arguments
# with a HOME of its own (the docker CLI runs plugins and reads contexts from
# $HOME/.docker: never from a directory others may write, such as /tmp)
check_home=$(mktemp -d)
chown "$SVC_USER" "$check_home"
(set -a; . "$ENV_FILE"; set +a; export STATE_DIRECTORY=/var/lib/outline-mcp-proxy HOME="$check_home"
 export DOCKER_CONFIG="$check_home/.docker"
 exec runuser -p -u "$SVC_USER" -- "$BIN" check)
status=$?
rm -rf "$check_home"
set -e
say ""
say "next: a real certificate:  sudo certbot --nginx -d $domain"
exit $status

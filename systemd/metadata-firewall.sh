#!/bin/sh
# Keeps the proxy's containers off the cloud metadata address (169.254.169.254) and the
# rest of the link-local range 169.254.0.0/16: one REJECT rule in Docker's DOCKER-USER
# chain for traffic from the containers' network's bridge. Run by
# mcp-proxy-firewall.service (installed by install.sh) after Docker and the proxy start,
# and again whenever Docker restarts; its settings come from the proxy's env file.
#
#   metadata-firewall add      the rule, once (an earlier one of ours is replaced)
#   metadata-firewall remove   every rule of ours for that network
set -eu

network=${MCP_PROXY_NETWORK:-outline-mcp-proxy}
docker=${MCP_PROXY_DOCKER:-docker}
range=169.254.0.0/16
mark="outline-mcp-proxy: no link-local ($network)"

say() { printf 'metadata-firewall: %s\n' "$*" >&2; }

# the Linux bridge of the network: its own name when it was given one, else Docker's
# br-<first 12 hex of the network id>; the proxy makes the network when it starts, so
# it is waited for (up to 60 s)
bridge_of() {
  tries=0
  while ! "$docker" network inspect "$network" >/dev/null 2>&1; do
    tries=$((tries + 1))
    [ "$tries" -le 120 ] || { say "docker network $network does not exist"; return 1; }
    sleep 0.5
  done
  name=$("$docker" network inspect -f '{{index .Options "com.docker.network.bridge.name"}}' "$network")
  case "$name" in
    ""|"<no value>") id=$("$docker" network inspect -f '{{.Id}}' "$network"); echo "br-$(echo "$id" | cut -c1-12)" ;;
    *) echo "$name" ;;
  esac
}

remove() {
  iptables -S DOCKER-USER 2>/dev/null | grep -F -- "$mark" | sed 's/^-A /-D /' | while read -r rule; do
    eval "iptables $rule"
  done
}

case "${1:-}" in
  add)
    iptables -S DOCKER-USER >/dev/null 2>&1 || { say "no DOCKER-USER chain: is Docker running with iptables on?"; exit 1; }
    bridge=$(bridge_of)
    remove
    iptables -I DOCKER-USER -i "$bridge" -d "$range" -m comment --comment "$mark" -j REJECT
    say "containers on $network ($bridge) cannot reach $range"
    ;;
  remove) remove ;;
  *) echo "usage: $0 add|remove" >&2; exit 2 ;;
esac

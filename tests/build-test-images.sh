#!/usr/bin/env bash
# Builds the test backend images with no registry: the example binary `test-backend`
# and the shared libraries it links, in a rootfs made here, imported with `docker import`.
#   outline-mcp-proxy-test-backend:latest       the backend
#   outline-mcp-proxy-test-backend:never-ready  /health answers 503 for ever
#   outline-mcp-proxy-test-backend:exits        exits with code 3 at start
#   outline-mcp-proxy-test-backend:slow-boot    listens only after 3 s
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --example test-backend
bin=target/release/examples/test-backend
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/etc" "$root/tmp"
chmod 755 "$root"
chmod 1777 "$root/tmp"   # Docker's tmpfs on /tmp takes the image's mode
cp "$bin" "$root/test-backend"
# the dynamic loader and every library, at the paths the binary looks for them
for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
echo 'nobody:x:65534:65534:nobody:/tmp:/sbin/nologin' > "$root/etc/passwd"
tag() {
  tar -C "$root" -c . | docker import \
    --change 'ENTRYPOINT ["/test-backend"]' \
    --change 'USER 65534:65534' \
    --change 'ENV MCP_PORT=3000' \
    "$@" - "$TAGNAME" >/dev/null
  echo "built $TAGNAME"
}
TAGNAME=outline-mcp-proxy-test-backend:latest tag
TAGNAME=outline-mcp-proxy-test-backend:never-ready tag --change 'ENV BACKEND_MODE=never-ready'
TAGNAME=outline-mcp-proxy-test-backend:exits tag --change 'ENV BACKEND_MODE=exit'
TAGNAME=outline-mcp-proxy-test-backend:slow-boot tag --change 'ENV BACKEND_BOOT_MS=3000'

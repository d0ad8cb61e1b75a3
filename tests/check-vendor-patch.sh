#!/usr/bin/env bash
# The vendored tiny_http is upstream's 0.12.0 plus vendor/tiny_http.patch, and nothing
# else: this fetches the pristine crate with cargo (a throwaway manifest under target/),
# applies the patch to a copy, and compares the result with vendor/tiny_http file by
# file. Every hunk of the patch in Rust source must carry a PATCH marker, so a reviewer
# can find each changed place in the tree too.
#   tests/check-vendor-patch.sh           check (tests/run calls this)
#   tests/check-vendor-patch.sh --write   rewrite vendor/tiny_http.patch from the tree
set -euo pipefail
cd "$(dirname "$0")/.."
work=target/pristine-tiny-http
mkdir -p "$work/src"
cat > "$work/Cargo.toml" <<'TOML'
[package]
name = "pristine-tiny-http"
version = "0.0.0"
edition = "2021"
publish = false
[dependencies]
tiny_http = { version = "=0.12.0", default-features = false }
[workspace]
TOML
echo 'fn main() {}' > "$work/src/main.rs"
manifest=$(cargo metadata --quiet --format-version 1 --manifest-path "$work/Cargo.toml" |
  python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="tiny_http"))')
pristine=$(dirname "$manifest")

# the files the vendored copy keeps (upstream's benches, examples and tests are left out)
files=$(cd vendor/tiny_http && find . -type f ! -name PATCHES.md | sed 's|^\./||' | sort)
old=$(mktemp -d); new=$(mktemp -d)
trap 'rm -rf "$old" "$new"' EXIT
for f in $files; do
  mkdir -p "$old/a/$(dirname "$f")" "$new/b/$(dirname "$f")"
  [ -f "$pristine/$f" ] && cp "$pristine/$f" "$old/a/$f"
  cp "vendor/tiny_http/$f" "$new/b/$f"
done

if [ "${1:-}" = "--write" ]; then
  (cd "$old" && mkdir -p b && cp -r "$new/b/." b/ && diff -ruN a b) > vendor/tiny_http.patch || true
  echo "wrote vendor/tiny_http.patch ($(grep -c '^@@' vendor/tiny_http.patch) hunks)"
  exit 0
fi

# apply the patch to the pristine files; the result must be the vendored tree exactly
(cd "$old/a" && patch -s -p1 --no-backup-if-mismatch < "$OLDPWD/vendor/tiny_http.patch")
if ! diff -r "$old/a" "$new/b" > /dev/null; then
  echo "vendor/tiny_http differs from upstream 0.12.0 + vendor/tiny_http.patch:" >&2
  diff -r "$old/a" "$new/b" | head -40 >&2
  echo "(after a deliberate change: tests/check-vendor-patch.sh --write)" >&2
  exit 1
fi
# one marker per changed place
python3 - vendor/tiny_http.patch <<'PY'
import re, sys
text = open(sys.argv[1]).read()
unmarked = []
for part in re.split(r"^diff -ruN ", text, flags=re.M)[1:]:
    name = part.split("\n", 1)[0].split()[-1]
    if not name.endswith(".rs"):
        continue
    for hunk in re.split(r"^(?=@@ )", part, flags=re.M)[1:]:
        if "PATCH" not in hunk:
            unmarked.append(f"{name} {hunk.splitlines()[0]}")
if unmarked:
    print("hunks without a PATCH marker:\n  " + "\n  ".join(unmarked), file=sys.stderr)
    sys.exit(1)
PY
echo "vendor/tiny_http = tiny_http 0.12.0 + vendor/tiny_http.patch ($(grep -c '^@@' vendor/tiny_http.patch) hunks, each marked)"

# Shared shell helpers. Source it; it sets strict mode.
set -euo pipefail

HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HACK_DIR/.." && pwd)"
# shellcheck source=versions.env
source "$HACK_DIR/versions.env"

# Heavy builds live outside the checkout, keyed by version, so CI and later runs reuse them.
CRYOPOD_CACHE="${CRYOPOD_CACHE:-/var/cache/cryopod}"
export CRYOPOD_CACHE

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# go_install_cached NAME VERSION MODULE_PATH PACKAGE: builds PACKAGE@VERSION once into
# $CRYOPOD_CACHE/NAME-VERSION/NAME and prints that path.
go_install_cached() {
  local name=$1 version=$2 package=$3
  local dir="$CRYOPOD_CACHE/$name-$version"
  if [[ ! -x "$dir/$name" ]]; then
    command -v go >/dev/null || die "go is needed to build $name"
    log "building $name $version (cached in $dir)"
    mkdir -p "$dir.tmp"
    GOBIN="$dir.tmp" CGO_ENABLED=0 GOFLAGS=-trimpath go install "$package@$version"
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
  fi
  printf '%s\n' "$dir/$name"
}

#!/usr/bin/env bash
# Prints the path of the s3s-fs S3 server of the pinned version, building it on first use.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
dir="$CRYOPOD_CACHE/s3s-fs-$S3S_FS_VERSION"
if [[ ! -x "$dir/bin/s3s-fs" ]]; then
  log "building s3s-fs $S3S_FS_VERSION (cached in $dir)"
  cargo install --quiet --locked --features binary --root "$dir.tmp" "s3s-fs@$S3S_FS_VERSION" >&2
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
fi
printf '%s\n' "$dir/bin/s3s-fs"

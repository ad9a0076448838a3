#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy
# and kubectl of $KUBERNETES_VERSION from the k8s.io/kubernetes Go module, once, into
# $CRYOPOD_CACHE/kubernetes-<version>/bin. Prints that directory.
#
# `go install k8s.io/kubernetes/cmd/...@v` fails: the module's go.mod replaces its
# staging modules with local paths. A wrapper module requires k8s.io/kubernetes and
# replaces each staging module with its published v0.X tag; the list comes from the
# release's own go.mod.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

version=$KUBERNETES_VERSION
out="$CRYOPOD_CACHE/kubernetes-$version"
commands=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)

have_all() { for c in "${commands[@]}"; do [[ -x "$out/bin/$c" ]] || return 1; done; }
if have_all; then printf '%s\n' "$out/bin"; exit 0; fi

command -v go >/dev/null || die "go is needed to build Kubernetes"
staging_version="v0.${version#v1.}"
work="$out.work"
rm -rf "$work" && mkdir -p "$work"
cd "$work"

log "building Kubernetes $version from its Go module (about 5 minutes on 2 cores; cached in $out)"
upstream_mod=$(go mod download -json "k8s.io/kubernetes@$version" | sed -n 's/^\s*"GoMod": "\(.*\)",$/\1/p')
[[ -f "$upstream_mod" ]] || die "cannot download k8s.io/kubernetes@$version"
go_line=$(grep -m1 '^go ' "$upstream_mod")
{
  echo "module cryopod.local/kubernetes-build"
  echo
  echo "$go_line"
  echo
  echo "require k8s.io/kubernetes $version"
  echo
  echo "replace ("
  sed -n 's#^\s*\(k8s\.io/[a-z0-9.-]*\) => \./staging/src/.*#\t\1 => \1 '"$staging_version"'#p' "$upstream_mod"
  echo ")"
} > go.mod
grep -q "k8s.io/api => k8s.io/api $staging_version" go.mod || die "no staging replaces found in $upstream_mod"

packages=()
for c in "${commands[@]}"; do packages+=("k8s.io/kubernetes/cmd/$c"); done
versioned=("${packages[@]/%/@$version}")
# Resolve the whole build list (go.sum) for exactly these packages.
GOFLAGS=-mod=mod go get "${versioned[@]}"

# Version stamping as upstream's hack/lib/version.sh does, so binaries do not report v0.0.0.
build_date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$(cut -d. -f2 <<<"$version")"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date"
done
mkdir -p bin
CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o bin/ "${packages[@]}"
have_all_in() { for c in "${commands[@]}"; do [[ -x "$1/$c" ]] || return 1; done; }
have_all_in bin || die "the build did not produce every command"
rm -rf "$out" && mkdir -p "$out" && mv bin "$out/bin" && cp go.mod go.sum "$out/"
cd / && rm -rf "$work"
printf '%s\n' "$out/bin"

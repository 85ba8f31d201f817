#!/usr/bin/env bash
# Builds the pinned Kubernetes tools that the real-apiserver tests use, from Go modules through
# the Go module proxy (nothing else is downloaded), into target/tools/bin/, and copies the
# network-policy-api CRDs into target/tools/crds/. Each binary has a stamp file holding the
# recipe it was built from; a binary whose stamp matches is not rebuilt, so a re-run takes
# seconds.
#
#   scripts/tools.sh            build what is missing or stale
#   TOOLS_FORCE=1 scripts/tools.sh   rebuild everything
#
# Go's module and build caches stay where `go env` puts them (about 5 GB after a cold build);
# the wrapper modules live under target/tools/src/.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBE_VERSION=v1.37.2
KUBE_STAGING_VERSION=v0.37.2
ETCD_VERSION=v3.7.3
HELM_VERSION=v3.22.0
# ClusterNetworkPolicy v1alpha2/v1beta1 ship with v0.3.0; AdminNetworkPolicy and
# BaselineAdminNetworkPolicy v1alpha1 were dropped after v0.1.7, their last release.
NPAPI_VERSION=v0.3.0
NPAPI_ANP_VERSION=v0.1.7

TOOLS="$PWD/target/tools"
BIN="$TOOLS/bin"
SRC="$TOOLS/src"
CRDS="$TOOLS/crds"
mkdir -p "$BIN" "$SRC" "$CRDS"

# Only the module proxy: never fall back to fetching from version control hosts.
export GOPROXY=https://proxy.golang.org
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0

command -v go >/dev/null || { echo "tools.sh: the go command is required" >&2; exit 1; }

log() { echo "tools.sh: $*" >&2; }

# stamp_ok NAME RECIPE: true when NAME is built and its stamp holds RECIPE.
stamp_ok() {
  [[ "${TOOLS_FORCE:-}" != 1 && -x "$BIN/$1" && -f "$BIN/.$1.stamp" ]] &&
    [[ "$(cat "$BIN/.$1.stamp")" == "$2" ]]
}
write_stamp() { printf '%s' "$2" >"$BIN/.$1.stamp"; }

# ---------------------------------------------------------------------------------------------
# Kubernetes: k8s.io/kubernetes replaces its staging modules with ./staging/src/..., which
# `go install pkg@version` refuses, so a wrapper module requires it and points each staging
# module at its published version instead.
kube_bins=(kube-apiserver kube-controller-manager kubectl kube-proxy)
kube_recipe="kubernetes $KUBE_VERSION staging $KUBE_STAGING_VERSION ldflags-v1"
kube_todo=()
for b in "${kube_bins[@]}"; do stamp_ok "$b" "$kube_recipe" || kube_todo+=("$b"); done

if ((${#kube_todo[@]})); then
  log "building ${kube_todo[*]} $KUBE_VERSION"
  dir="$SRC/kubernetes"
  mkdir -p "$dir"
  kdir="$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" |
    sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
  [[ -f "$kdir/go.mod" ]] || { log "k8s.io/kubernetes@$KUBE_VERSION not in the module cache"; exit 1; }
  {
    echo "module palisade.local/kubetools"
    echo
    sed -n 's/^go \(.*\)$/go \1/p; s/^godebug \(.*\)$/godebug \1/p' "$kdir/go.mod"
    echo
    echo "require k8s.io/kubernetes $KUBE_VERSION"
    echo
    echo "replace ("
    sed -n 's|^\t\(k8s.io/[^ ]*\) => ./staging/src/.*$|\t\1 => \1 '"$KUBE_STAGING_VERSION"'|p' "$kdir/go.mod"
    echo ")"
  } >"$dir/go.mod.new"
  nrep="$(grep -c '=> k8s.io/' "$dir/go.mod.new")"
  ((nrep > 20)) || { log "found only $nrep staging replacements in kubernetes' go.mod"; exit 1; }
  # Keep the resolved go.mod/go.sum between runs unless the recipe changed.
  if ! cmp -s "$dir/go.mod.new" "$dir/go.mod.base" 2>/dev/null; then
    cp "$dir/go.mod.new" "$dir/go.mod"
    cp "$dir/go.mod.new" "$dir/go.mod.base"
    rm -f "$dir/go.sum"
  fi
  rm -f "$dir/go.mod.new"
  pkgs=()
  for b in "${kube_todo[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
  # An explicit version: a bare `go get pkg` would upgrade k8s.io/kubernetes.
  (cd "$dir" && go get "${pkgs[@]/%/@$KUBE_VERSION}")
  major="${KUBE_VERSION#v}"; major="${major%%.*}"
  minor="${KUBE_VERSION#v*.}"; minor="${minor%%.*}"
  ldflags="-s -w"
  for p in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    ldflags+=" -X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=$major -X $p.gitMinor=$minor"
    ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  # One build for all four, so they share the compiled packages.
  (cd "$dir" && go build -trimpath -ldflags "$ldflags" -o "$BIN/" "${pkgs[@]}")
  for b in "${kube_todo[@]}"; do
    # Clients refuse a server without a proper version, so check the ldflags took.
    got="$("$BIN/$b" --version 2>/dev/null || "$BIN/$b" version --client 2>/dev/null || true)"
    [[ "$got" == *"$KUBE_VERSION"* ]] || { log "$b reports '$got', not $KUBE_VERSION"; exit 1; }
    write_stamp "$b" "$kube_recipe"
  done
fi

# ---------------------------------------------------------------------------------------------
# etcd: its main module also uses relative replaces, so a tiny main calls etcdmain.Main.
etcd_recipe="etcd $ETCD_VERSION v1"
if ! stamp_ok etcd "$etcd_recipe"; then
  log "building etcd $ETCD_VERSION"
  dir="$SRC/etcd"
  mkdir -p "$dir"
  cat >"$dir/main.go" <<'EOF'
// Command etcd is upstream etcd's server, built from its published Go modules.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
  if [[ ! -f "$dir/go.mod" ]] || ! grep -q "go.etcd.io/etcd/server/v3 $ETCD_VERSION" "$dir/go.mod"; then
    rm -f "$dir/go.mod" "$dir/go.sum"
    (cd "$dir" && go mod init palisade.local/etcd >/dev/null 2>&1 &&
      go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" && go mod tidy)
  fi
  (cd "$dir" && go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" .)
  "$BIN/etcd" --version | grep -q "etcd Version: ${ETCD_VERSION#v}$" ||
    { log "etcd is not $ETCD_VERSION"; exit 1; }
  write_stamp etcd "$etcd_recipe"
fi

# ---------------------------------------------------------------------------------------------
# Helm: its module has no replaces, so `go install` works. Its Makefile stamps the version and
# the Kubernetes version that offline rendering (`helm template`) assumes, derived from its
# client-go; without them that default is Kubernetes 1.20.
helm_recipe="helm $HELM_VERSION v1"
if ! stamp_ok helm "$helm_recipe"; then
  log "building helm $HELM_VERSION"
  hdir="$(go mod download -json "helm.sh/helm/v3@$HELM_VERSION" |
    sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
  cgo="$(sed -n 's/^\tk8s.io\/client-go v0\.\([0-9]*\)\..*$/\1/p' "$hdir/go.mod")"
  [[ -n "$cgo" ]] || { log "cannot find helm's client-go version"; exit 1; }
  ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    ldflags+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$cgo"
  done
  GOBIN="$BIN" GOFLAGS=-buildvcs=false go install -trimpath -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  [[ "$("$BIN/helm" version --template '{{.Version}}')" == "$HELM_VERSION" ]] ||
    { log "helm is not $HELM_VERSION"; exit 1; }
  write_stamp helm "$helm_recipe"
fi

# ---------------------------------------------------------------------------------------------
# network-policy-api CRDs, the ones users install, per release channel.
crd_stamp="npapi $NPAPI_VERSION anp $NPAPI_ANP_VERSION v1"
if [[ "${TOOLS_FORCE:-}" == 1 || ! -f "$CRDS/.stamp" || "$(cat "$CRDS/.stamp")" != "$crd_stamp" ]]; then
  log "copying network-policy-api CRDs ($NPAPI_VERSION; ANP/BANP from $NPAPI_ANP_VERSION)"
  for v in "$NPAPI_VERSION" "$NPAPI_ANP_VERSION"; do
    ndir="$(go mod download -json "sigs.k8s.io/network-policy-api@$v" |
      sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
    for ch in standard experimental; do
      mkdir -p "$CRDS/$ch"
      for f in "$ndir/config/crd/$ch"/policy.networking.k8s.io_*.yaml; do
        install -m 0644 "$f" "$CRDS/$ch/"
      done
    done
  done
  printf '%s' "$crd_stamp" >"$CRDS/.stamp"
fi

log "ready in $BIN: $(cd "$BIN" && echo *)"

#!/usr/bin/env bash
# Builds the Kubernetes binaries the walt test harness runs, from the official Go modules pinned in
# go.mod next to this script: kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy,
# kubectl (k8s.io/kubernetes) and etcd (go.etcd.io/etcd/server/v3, the version Kubernetes itself requires);
# and CoreDNS, the cluster tier's DNS, from its own module pinned in coredns/go.mod (only the plugins that
# coredns/main.go names).
#
# Usage: tests/k8s/build.sh            # prints the bin directory on its last line
# Output: ${WALT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/walt}/k8s/<version>/bin
# Rebuilt only when go.mod, go.sum, coredns/* or this script change (a stamp file records their hash).
# Needs Go >= 1.24 and the Go module proxy (or a filled module cache). Cold build: see README.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
export PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null || { echo "build.sh: Go is missing: install Go >= 1.24 (https://go.dev/dl) or set WALT_K8S_BIN to prebuilt binaries" >&2; exit 1; }

version="$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" {print $3} $1 == "k8s.io/kubernetes" && $2 ~ /^v/ {print $2}' go.mod | head -n1)"
[ -n "$version" ] || { echo "build.sh: no k8s.io/kubernetes version in $here/go.mod" >&2; exit 1; }
minor="$(echo "$version" | cut -d. -f2)"
cache="${WALT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/walt}"
out="$cache/k8s/$version/bin"
stamp_value="$(cat go.mod go.sum coredns/go.mod coredns/go.sum coredns/main.go "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"
binaries=(etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl coredns)

up_to_date() {
  [ -f "$out/.stamp" ] && [ "$(cat "$out/.stamp")" = "$stamp_value" ] || return 1
  for b in "${binaries[@]}"; do [ -x "$out/$b" ] || return 1; done
}

mkdir -p "$cache/k8s"
# One build at a time per cache (several developers or test runs may ask at once).
exec 9>"$cache/k8s/.build.lock"
flock 9
if up_to_date; then
  echo "build.sh: Kubernetes $version binaries are up to date" >&2
  echo "$out"
  exit 0
fi

echo "build.sh: building Kubernetes $version, etcd and CoreDNS into $out (first time: tens of minutes on 2 cores)" >&2
start=$(date +%s)
tmp="$cache/k8s/.build-$version.$$"
rm -rf "$tmp"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
# Version stamps as Kubernetes' own build sets them (hack/lib/version.sh), so that
# `kubectl version` and the node's kubelet version say the real release.
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
# Static binaries (as the official release), one `go build` so that shared packages compile once.
CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$tmp/" \
  go.etcd.io/etcd/server/v3 \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-proxy \
  k8s.io/kubernetes/cmd/kube-scheduler \
  k8s.io/kubernetes/cmd/kubelet \
  k8s.io/kubernetes/cmd/kubectl
mv "$tmp/server" "$tmp/etcd"
(cd coredns && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$tmp/coredns" .)
mkdir -p "$out"
for b in "${binaries[@]}"; do mv -f "$tmp/$b" "$out/$b"; done
echo "$stamp_value" > "$out/.stamp"
echo "build.sh: built in $(( $(date +%s) - start )) s" >&2
echo "$out"

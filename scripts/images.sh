#!/usr/bin/env bash
# Builds the OCI images the Helm chart runs, with buildah, from scratch plus the exact files
# each binary needs, taken from this machine's Debian packages (no base image, no registry):
#   palisade/palisade-agent:<appVersion>       palisade-agent, nft, their shared libraries
#   palisade/palisade-controller:<appVersion>  palisade-controller, its shared libraries
# Names and tag come from charts/palisade (values.yaml repositories, Chart.yaml appVersion),
# so the chart's defaults are what this builds. Each image is then run once with a real
# container runtime (podman) to print --version.
#
#   scripts/images.sh [--no-build] [--no-run] [agent] [controller]
#
# --no-build  use the existing target/release binaries (e.g. after scripts/test.sh)
# --no-run    do not run the images after building them
# Needs: buildah, podman, runc (apt-get install buildah podman runc), binutils (strip),
# nftables.
# Push to your registry afterwards, e.g.:
#   podman push palisade/palisade-agent:0.1.0 registry.example/palisade/palisade-agent:0.1.0
set -euo pipefail
cd "$(dirname "$0")/.."

build=1
run=1
components=()
for arg in "$@"; do
    case "$arg" in
        --no-build) build=0 ;;
        --no-run) run=0 ;;
        agent | controller) components+=("$arg") ;;
        *) echo "usage: $0 [--no-build] [--no-run] [agent] [controller]" >&2; exit 2 ;;
    esac
done
if [ ${#components[@]} -eq 0 ]; then
    components=(agent)
    if [ -f controller/Cargo.toml ]; then
        components+=(controller)
    else
        echo "note: no controller/ crate in this tree yet: building the agent image only" >&2
    fi
fi

for tool in buildah podman strip ldd dpkg-query; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found (apt-get install buildah podman binutils)" >&2; exit 1; }
done

tag=$(awk '$1 == "appVersion:" { gsub(/"/, "", $2); print $2 }' charts/palisade/Chart.yaml)
# The repository under controller: / agent: in values.yaml (first `repository:` after it).
repository() {
    awk -v section="$1:" '$1 == section && /^[a-z]/ { inside = 1; next }
        /^[a-z]/ { inside = 0 }
        inside && $1 == "repository:" { print $2; exit }' charts/palisade/values.yaml
}

if [ "$build" = 1 ]; then
    packages=()
    for c in "${components[@]}"; do packages+=(-p "palisade-$c"); done
    cargo build --release --locked "${packages[@]}"
fi

# Installs file $1 at path $2 of root $3 (mode $4); a file from the host is recorded in
# $3.files for the package list.
add_file() {
    install -D -m "$4" "$1" "$3$2"
    case "$1" in /*) echo "$1" >>"$3.files" ;; esac
}

# Every shared library binary $1 loads (and the dynamic loader), at the same paths under $2.
add_libraries() {
    local lib
    for lib in $(ldd "$1" | awk '/=> \// { print $3 } /^\t\/[^ ]+ \(/ { print $1 }'); do
        local real
        real=$(readlink -f "$lib")
        # The source's mode: the dynamic loader must stay executable.
        [ -e "$2$lib" ] || add_file "$real" "$lib" "$2" "$(stat -c %a "$real")"
    done
}

# The Debian packages (name, version) of the files listed in $1.files, with their copyright
# files (licences), into the image.
add_package_records() {
    local root=$1 pkgs pkg
    pkgs=$(while read -r f; do
        dpkg-query -S "$f" 2>/dev/null || dpkg-query -S "${f#/usr}" 2>/dev/null || true
    done <"$root.files" | cut -d: -f1 | sort -u)
    mkdir -p "$root/usr/share/palisade"
    for pkg in $pkgs; do
        dpkg-query -W -f '${Package} ${Version}\n' "$pkg"
        if [ -f "/usr/share/doc/$pkg/copyright" ]; then
            install -D -m 0644 "/usr/share/doc/$pkg/copyright" "$root/usr/share/doc/$pkg/copyright"
        fi
    done >"$root/usr/share/palisade/debian-packages.txt"
}

# Runs the agent image as the chart does (root, every capability dropped but NET_ADMIN,
# no privilege escalation, read-only root filesystem) in a network namespace of its own,
# on the demo's cluster files, and waits for its table: proof that nft and its libraries
# are complete and that NET_ADMIN is enough.
smoke_test_agent() {
    local ctr i
    ctr=$(podman run -d "${run_flags[@]}" --read-only --cap-drop ALL --cap-add NET_ADMIN \
        --security-opt no-new-privileges --user 0:0 -v "$PWD/cli/demo:/demo:ro" "$1" \
        --cluster /demo/cluster.yaml --policies /demo/policies.yaml --node node-1)
    for i in $(seq 50); do
        if podman exec "$ctr" nft list table inet palisade >/dev/null 2>&1; then
            echo "  agent in $1 applied its table with NET_ADMIN only, read-only root"
            podman rm -f "$ctr" >/dev/null
            return 0
        fi
        sleep 0.2
    done
    podman logs "$ctr" >&2 || true
    podman rm -f "$ctr" >/dev/null
    echo "error: the agent in $1 applied no table within 10 s" >&2
    exit 1
}

# No network; low fixed limits (a runtime inside a container may not raise them); runc
# when installed, since crun refuses hosts with hybrid cgroup v1/v2 hierarchies.
run_flags=(--network none --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
if command -v runc >/dev/null; then run_flags+=(--runtime runc); fi

for c in "${components[@]}"; do
    binary="target/release/palisade-$c"
    [ -x "$binary" ] || { echo "error: $binary not built (run without --no-build)" >&2; exit 1; }
    # Fully qualified as Kubernetes resolves the chart's default "palisade/palisade-agent".
    image="docker.io/$(repository "$c"):$tag"
    root="target/images/$c/rootfs"
    rm -rf "target/images/$c" "target/images/$c.tar"
    mkdir -p "$root"
    # The binary, without its debug info (the release profile keeps some for benchmarks).
    strip --strip-debug -o "target/images/$c/palisade-$c" "$binary"
    add_file "target/images/$c/palisade-$c" "/usr/local/bin/palisade-$c" "$root" 0755
    add_libraries "$binary" "$root"
    case "$c" in
        agent)
            # The agent applies its table with `nft -j`: the binary and its libraries
            # (libnftables, libnftnl, libmnl, libjansson, libgmp, libxtables, ...).
            nft=$(command -v nft) || { echo "error: nft not found (apt-get install nftables)" >&2; exit 1; }
            add_file "$nft" /usr/sbin/nft "$root" 0755
            add_libraries "$nft" "$root"
            # nft resolves protocol and service names through these (package netbase).
            for f in /etc/protocols /etc/services; do
                if [ -f "$f" ]; then add_file "$f" "$f" "$root" 0644; fi
            done
            user=0:0 ;;
        controller)
            # In a pod the apiserver's CA comes with the ServiceAccount; the system roots
            # (package ca-certificates) serve a kubeconfig naming a publicly signed server.
            f=/etc/ssl/certs/ca-certificates.crt
            if [ -f "$f" ]; then add_file "$f" "$f" "$root" 0644; fi
            user=65532:65532 ;;
    esac
    add_package_records "$root"

    ctr=$(buildah from --quiet scratch)
    buildah copy --quiet "$ctr" "$root" / >/dev/null
    buildah config \
        --entrypoint "[\"/usr/local/bin/palisade-$c\"]" \
        --cmd "" \
        --user "$user" \
        --env PATH=/usr/local/bin:/usr/sbin:/usr/bin \
        --label org.opencontainers.image.title="palisade-$c" \
        --label org.opencontainers.image.version="$tag" \
        --label org.opencontainers.image.licenses=Apache-2.0 \
        "$ctr"
    old=$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
    # Timestamp 0: the same files give the same image id.
    buildah commit --quiet --rm --timestamp 0 "$ctr" "$image" >/dev/null
    new=$(podman image inspect --format '{{.Id}}' "$image")
    if [ -n "$old" ] && [ "$old" != "$new" ]; then podman rmi "$old" >/dev/null 2>&1 || true; fi
    # An archive for nodes without a registry (ctr -n k8s.io images import, kind load
    # image-archive); it keeps the docker.io/ name the chart's default resolves to.
    podman save --quiet --format docker-archive -o "target/images/$c.tar" "$image"
    size=$(podman image inspect --format '{{.Size}}' "$image")
    echo "built $image ($((size / 1024 / 1024)) MiB, $(wc -l <"$root.files") files from $(wc -l <"$root/usr/share/palisade/debian-packages.txt") Debian packages, id ${new:0:12}; archive target/images/$c.tar)"

    if [ "$run" = 1 ]; then
        version=$(podman run --rm "${run_flags[@]}" "$image" --version)
        echo "  podman run $image --version: $version"
        case "$version" in
            *" $tag") ;;
            *) echo "error: $image reports '$version', not version $tag" >&2; exit 1 ;;
        esac
        if [ "$c" = agent ]; then smoke_test_agent "$image"; fi
    fi
done

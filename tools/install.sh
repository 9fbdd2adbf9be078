#!/usr/bin/env bash
# Installs everything datatether and its test suite need on Debian 12.
#   tools/install.sh          runtime: FUSE, Python packages, the dt command
#   tools/install.sh --test   also what the tests and benchmarks use: rsync, lsyncd, fio,
#                             mkfs tools, Java and Maven (for the Kafka broker)
# As root it installs Debian packages with apt-get and creates the groups of the control API;
# otherwise it says what is missing.

# engine/api.py: members of dtadmin may act through a daemon's control API, members of
# dtmonitor may read its state; without the groups only root can.
ensure_groups() {
    local g missing=()
    for g in dtadmin dtmonitor; do
        getent group "$g" >/dev/null || missing+=("$g")
    done
    ((${#missing[@]})) || return 0
    if [[ $(id -u) -eq 0 ]]; then
        for g in "${missing[@]}"; do
            groupadd --system "$g"
            echo "install: created group $g"
        done
    else
        echo "install: missing groups ${missing[*]} (only root can use the daemons' control API); as root run:" >&2
        for g in "${missing[@]}"; do echo "  groupadd --system $g" >&2; done
    fi
}
[[ "${BASH_SOURCE[0]}" != "$0" ]] && return 0  # sourced (tests): the functions only

set -euo pipefail
cd "$(dirname "$0")/.."

runtime_pkgs=(fuse3 libfuse3-3 attr python3-pip)
test_pkgs=(rsync lsyncd fio e2fsprogs xfsprogs btrfs-progs iproute2 openjdk-17-jre-headless maven
           gcc make libfuse3-dev pkg-config)
want=("${runtime_pkgs[@]}")
[[ "${1:-}" == "--test" ]] && want+=("${test_pkgs[@]}")

missing=()
for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]]; then
        echo "install: apt-get install ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "install: missing Debian packages: ${missing[*]}" >&2
        echo "install: run as root, or: sudo apt-get install ${missing[*]}" >&2
        exit 2
    fi
fi

ensure_groups

extra=""
[[ "${1:-}" == "--test" ]] && extra="[test]"
python3 -m pip install -q --disable-pip-version-check -e ".${extra}" 2>&1 | grep -v "Running pip as the 'root' user" || true
python3 -c "import datatether.tools.cli" || { echo "install: the datatether package did not install" >&2; exit 2; }
echo "install: ready (dt $(python3 -c 'import datatether; print(datatether.__version__)'))"

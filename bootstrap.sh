#!/usr/bin/env bash
# Install everything Kestrel needs on Debian 12, idempotently: system packages with apt-get (only the
# missing ones), then the Python environment in .venv from the pinned constraints.txt.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(
  mosquitto mosquitto-clients                      # embedded MQTT broker and CLI clients
  postgresql-15                                    # PostgreSQL binaries (we run our own cluster)
  mosquitto-dev libmosquitto-dev libcurl4-openssl-dev libcjson-dev libssl-dev gcc make  # auth plugin build
  python3 python3-venv ca-certificates curl openssl
  chromium chromium-driver                         # the console's browser tests (headless)
  prometheus                                       # promtool: checks and unit-tests the SLO rules
  nftables                                         # nft -c: checks the Ansible roles' firewall rules
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  [[ "$pkg" == \#* ]] && continue
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "bootstrap: missing Debian packages: ${missing[*]}; run as root or: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "bootstrap: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts a system-wide mosquitto on :1883 when the package is installed; Kestrel runs its own.
for unit in mosquitto prometheus; do  # Kestrel runs its own; the prometheus package is here for promtool
  if command -v systemctl >/dev/null && systemctl is-active --quiet "$unit" 2>/dev/null; then
    systemctl stop "$unit" && systemctl disable "$unit" >/dev/null 2>&1 || true
  fi
done

PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "bootstrap: Python 3.11+ is required ($PYTHON is $("$PYTHON" -V 2>&1))" >&2; exit 1; }
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv

stamp=.venv/.kestrel-installed
want=$(cat pyproject.toml sdk/pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  echo "bootstrap: pip install (pinned by constraints.txt)"
  .venv/bin/python -m pip install -q --upgrade "pip==26.3" 2>/dev/null || .venv/bin/python -m pip install -q --upgrade pip
  # The device SDK (with the pure core) is a distribution of its own (ADR-0014); the platform installs it from the tree.
  .venv/bin/python -m pip install -q -c constraints.txt -e ./sdk -e ".[dev]"
  echo "$want" > "$stamp"
fi

# Tools whose dependencies would clash with .venv's, each in a virtual environment of its own, pinned by its own
# constraints file and reinstalled only when that file changes.
pinned_venv() {  # pinned_venv DIR CONSTRAINTS PACKAGE...
  local dir=$1 constraints=$2
  shift 2
  [[ -x $dir/bin/python ]] || "$PYTHON" -m venv "$dir"
  local stamp=$dir/.kestrel-installed want
  want=$(sha256sum "$constraints" | cut -d' ' -f1)
  if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
    echo "bootstrap: pip install $* into $dir (pinned by $constraints)"
    "$dir/bin/python" -m pip install -q -c "$constraints" "$@"
    echo "$want" > "$stamp"
  fi
}
pinned_venv .venv-tools tools-constraints.txt openapi-python-client          # the API client test
pinned_venv .venv-checkov checkov-constraints.txt checkov                     # the chart's and Terraform's scans
pinned_venv .venv-ansible ansible-constraints.txt ansible-core ansible-lint    # the VM install (tests/deploy)

# JavaScript tooling (the AsyncAPI JSON Schema the contract test validates against), pinned by package-lock.json.
if ! command -v npm >/dev/null; then
  if [[ $(id -u) -ne 0 ]]; then
    echo "bootstrap: npm is missing; run as root or: sudo apt-get install -y npm" >&2
    exit 1
  fi
  echo "bootstrap: apt-get install npm"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null
fi
npm_stamp=node_modules/.kestrel-installed
npm_want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [[ ! -f $npm_stamp || $(cat "$npm_stamp") != "$npm_want" ]]; then
  echo "bootstrap: npm ci (pinned by package-lock.json)"
  npm ci --no-audit --no-fund --silent
  echo "$npm_want" > "$npm_stamp"
fi

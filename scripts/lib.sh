# Shared by scripts/serve, scripts/test and bench/run: install what is missing, once.
# Debian (as root); safe to run again: it only installs what is not there yet.

apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        if [ "$(id -u)" -ne 0 ]; then
            echo "pacsgrid: need root to install Debian packages: ${missing[*]}" >&2
            exit 1
        fi
        echo "pacsgrid: installing Debian packages: ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        # Never start services while installing (orthanc, postgresql, haproxy): tests and
        # benchmarks start their own instances on ports they pick.
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
            chmod +x /usr/sbin/policy-rc.d
            trap 'rm -f /usr/sbin/policy-rc.d' EXIT
        fi
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

python_bin() {
    for py in python3.13 python3.12 python3.11 python3; do
        if command -v "$py" >/dev/null 2>&1 &&
            "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$py"
            return
        fi
    done
}

ensure_python() {
    local py
    py=$(python_bin)
    if [ -z "$py" ]; then
        apt_install python3 python3-venv
        py=$(python_bin)
    fi
    if [ -z "$py" ]; then
        echo "pacsgrid: needs Python 3.11 or newer" >&2
        exit 1
    fi
    if ! "$py" -c 'import ensurepip, venv' 2>/dev/null; then
        apt_install python3-venv
    fi
    PYTHON=$py
}

# ensure_venv [extras]: .venv with pacsgrid installed (editable), reinstalled when
# pyproject.toml changes.
ensure_venv() {
    local extras=${1:-}
    local spec="."
    [ -n "$extras" ] && spec=".[$extras]"
    local stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)-${extras:-base}"
    if [ ! -x .venv/bin/python ]; then
        ensure_python
        "$PYTHON" -m venv .venv
    fi
    if [ ! -e "$stamp" ]; then
        .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
        .venv/bin/python -m pip install -q -e "$spec"
        touch "$stamp"
    fi
}

# ensure_ohif: the prebuilt OHIF viewer (npm @ohif/app ships its built site in dist/), for
# `pacsgrid serve --viewer DIR` and the browser tests; kept in .cache/ohif/VERSION/dist.
OHIF_VERSION=3.13.2
ensure_ohif() {
    local dir=".cache/ohif/$OHIF_VERSION"
    if [ ! -f "$dir/dist/index.html" ]; then
        command -v npm >/dev/null 2>&1 || apt_install nodejs npm
        mkdir -p "$dir"
        echo "pacsgrid: fetching the OHIF viewer (npm @ohif/app@$OHIF_VERSION)" >&2
        (cd "$dir" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null &&
            tar xzf "ohif-app-$OHIF_VERSION.tgz" --strip-components=1 package/dist &&
            rm -f "ohif-app-$OHIF_VERSION.tgz")
    fi
}

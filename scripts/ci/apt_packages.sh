# Sourced by scripts/ci/install_*.sh: apt_install TAG PACKAGE... installs Debian packages as root
# (or through sudo), and fails with a message naming them where that is not possible.
apt_install() {
    local tag=$1
    shift
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "[$tag] missing $* and no apt-get: install them by hand" >&2
        return 1
    fi
    local as_root=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || { echo "[$tag] missing $*: run as root" >&2; return 1; }
        as_root=(sudo -n)
    fi
    echo "[$tag] installing $*"
    export DEBIAN_FRONTEND=noninteractive
    "${as_root[@]}" apt-get update -qq
    "${as_root[@]}" apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

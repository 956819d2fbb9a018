# shellcheck shell=bash
# Shared by scripts/setup-and-run and scripts/setup-and-test: install what
# nsbuild needs on Debian 12 (as root), or say exactly what to run (otherwise).

NSBUILD_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
APT_PACKAGES_FILE=$NSBUILD_SRC/.ci/apt-packages

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
is_root() { [ "$(id -u)" -eq 0 ]; }

apt_packages() { sed -e 's/#.*//' "$APT_PACKAGES_FILE" | xargs; }

# Install the Debian packages of .ci/apt-packages (as root), or print the
# apt-get command that would and stop (otherwise).
ensure_apt_packages() {
    local pkg missing=()
    for pkg in $(apt_packages); do
        dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed$' \
            || missing+=("$pkg")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        say "Debian packages: all of .ci/apt-packages are installed"
        return 0
    fi
    if is_root; then
        say "installing: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
    else
        printf 'missing Debian packages; install them with:\n\n  sudo apt-get install --no-install-recommends %s\n\n' \
            "${missing[*]}" >&2
        printf 'or run this script as root, which does it for you.\n' >&2
        exit 1
    fi
}

# The venv nsbuild runs from: world-readable under /opt for root (the test
# user runs from it too), in the user's cache otherwise. Installs the checkout
# given (default: this one) editable, with the test extras.
default_venv() {
    if is_root; then echo /opt/nsbuild/venv
    else echo "${XDG_CACHE_HOME:-$HOME/.cache}/nsbuild/venv"; fi
}

ensure_venv() {
    local venv=$1 src=${2:-$NSBUILD_SRC}
    if [ ! -x "$venv/bin/python" ]; then
        say "creating venv $venv"
        mkdir -p "$(dirname "$venv")"
        /usr/bin/python3 -m venv "$venv"
    fi
    if ! is_root && [ ! -w "$src" ]; then
        die "$src is not writable by $(id -un): pip installs it in place (editable); clone it yourself, or run this as root"
    fi
    say "installing nsbuild from $src into $venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$src[test,farm]" </dev/null
    # pip drops interpreter options from a script's #! line; the command
    # starts without `site` and isolated (-IS, see bin/nsbuild): a quarter of
    # the interpreter's start-up.
    sed -i '1s|^#!\(/[^ ]*python[0-9.]*\)$|#!\1 -IS|' "$venv/bin/nsbuild"
    # Byte-compile now: other users cannot write __pycache__ in a root-owned
    # checkout, and would otherwise compile nsbuild on every start.
    "$venv/bin/python" -m compileall -q "$src/src" >/dev/null || true
    if is_root; then
        chmod -R a+rX "$venv" "$src/src"
        # On every user's PATH: `nsbuild`, and the virt server autopkgtest and
        # sbuild look up by name (`-- nsbuild ENV`, --autopkgtest-virt-server=nsbuild).
        if [ "${NSBUILD_LINK_COMMANDS:-1}" = 1 ]; then
            ln -sf "$venv/bin/nsbuild" "$venv/bin/autopkgtest-virt-nsbuild" /usr/local/bin/
        fi
    fi
}

# First range of USER (by name or uid) in a subuid/subgid file, as START:COUNT.
subid_range() {
    local file=$1 user=$2 uid
    uid=$(id -u "$user")
    awk -F: -v n="$user" -v u="$uid" '($1 == n || $1 == u) && $3 > 0 { print $2 ":" $3; exit }' \
        "$file" 2>/dev/null
}

# The first id above every range in /etc/subuid and /etc/subgid (at least 100000).
free_subid_start() {
    cat /etc/subuid /etc/subgid 2>/dev/null \
        | awk -F: 'BEGIN { m = 100000 } NF == 3 && $2 + $3 > m { m = $2 + $3 } END { print m }'
}

# Give USER 65536 subordinate uids and gids if it has none (root only); as a
# user, print the command to run instead and return 1.
ensure_subids() {
    local user=$1 start
    if [ -n "$(subid_range /etc/subuid "$user")" ] && [ -n "$(subid_range /etc/subgid "$user")" ]; then
        say "subordinate ids of $user: uids $(subid_range /etc/subuid "$user"), gids $(subid_range /etc/subgid "$user")"
        return 0
    fi
    start=$(free_subid_start)
    if is_root; then
        say "giving $user subordinate ids $start-$((start + 65535))"
        [ -n "$(subid_range /etc/subuid "$user")" ] || usermod --add-subuids "$start-$((start + 65535))" "$user"
        [ -n "$(subid_range /etc/subgid "$user")" ] || usermod --add-subgids "$start-$((start + 65535))" "$user"
    else
        printf '%s has no range in /etc/subuid and /etc/subgid; add one with:\n\n  sudo usermod --add-subuids %s-%s --add-subgids %s-%s %s\n\n' \
            "$user" "$start" "$((start + 65535))" "$start" "$((start + 65535))" "$user" >&2
        return 1
    fi
}

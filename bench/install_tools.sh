#!/bin/sh
# Install the tools the benches need: by default nginx, haproxy, wrk (`foretell
# bench overhead`); or the ones named as arguments (e.g. valgrind for `foretell
# bench instructions`). Debian package names equal the tool names. Only what is missing; `apt-get update` only when something is. Services are
# not started by the packages (policy-rc.d), because the bench starts its own
# instances on loopback ports with its own config files.
set -eu

tools="${*:-nginx haproxy wrk}"
missing=""
for tool in $tools; do
    if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$tool" ]; then
        missing="$missing $tool"
    fi
done
if [ -z "$missing" ]; then
    echo "install_tools: $tools: present"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
else
    SUDO=
fi

created_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
    # 101 = "action not allowed": keeps the packages from starting their daemons.
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    created_policy=1
fi
cleanup() {
    if [ "$created_policy" -eq 1 ]; then
        $SUDO rm -f /usr/sbin/policy-rc.d
    fi
}
trap cleanup EXIT

echo "install_tools: installing:$missing"
$SUDO apt-get update -q
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing

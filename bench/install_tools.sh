#!/bin/sh
# Install the tools `foretell bench overhead` compares against: nginx, haproxy, wrk.
# Only what is missing; `apt-get update` only when something is. Services are
# not started by the packages (policy-rc.d), because the bench starts its own
# instances on loopback ports with its own config files.
set -eu

missing=""
for tool in nginx haproxy wrk; do
    if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$tool" ]; then
        missing="$missing $tool"
    fi
done
if [ -z "$missing" ]; then
    echo "install_tools: nginx, haproxy and wrk are present"
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

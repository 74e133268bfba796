# Sourced by scripts/test and .ci/run: brings up what the test suites need on a Debian machine
# and exports the variables they read. Each part is skipped when already there, so a second run
# costs seconds. What it cannot set up (not root, no apt-get) it names, and it stops.
#
#   RabbitMQ on 127.0.0.1:5672 and PostgreSQL on 127.0.0.1:5432 (started if installed and down)
#   Chromium and ChromeDriver            the web page test
#   Docker engine, docker-compose and the images rabbitmq:4-management and postgres:17
#                                        the containers suite (testcontainers) and compose/smoke.sh
#   jq, ss                               compose/smoke.sh and the shutdown suite
#   promtool (Debian's prometheus)       the docs suite checks monitoring/'s alerting rules
#   a Python venv in target/ci-venv      the Python participant, schema checks, the API fuzzer

setup_step() { printf '\n== %s\n' "$*"; }
setup_fail() { printf 'scripts/setup.sh: %s\n' "$*" >&2; exit 1; }

# Debian's package lists, once, before anything is installed.
setup_apt_updated=
setup_install() {
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        setup_fail "the tests need these Debian packages: $* (install them as root, then run this again)"
    fi
    if [ -z "$setup_apt_updated" ]; then apt-get update -q >/dev/null; setup_apt_updated=1; fi
    echo "installing $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null
}

setup_listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

setup_step "services: RabbitMQ and PostgreSQL"
if ! setup_listening 5672; then
    command -v rabbitmq-server >/dev/null || setup_fail "nothing listens on 127.0.0.1:5672 and RabbitMQ is not installed"
    echo "RabbitMQ is down; starting it"
    rabbitmq-server -detached
fi
if ! setup_listening 5432; then
    command -v pg_ctlcluster >/dev/null || setup_fail "nothing listens on 127.0.0.1:5432 and PostgreSQL is not installed"
    echo "PostgreSQL is down; starting it"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
fi
for _ in $(seq 1 60); do
    if setup_listening 5672 && setup_listening 5432; then break; fi
    sleep 1
done
setup_listening 5672 || setup_fail "RabbitMQ did not come up on 127.0.0.1:5672"
setup_listening 5432 || setup_fail "PostgreSQL did not come up on 127.0.0.1:5432"

setup_step "tools: Chromium, Docker, docker-compose, jq, ss, promtool"
setup_missing=()
command -v chromium >/dev/null || setup_missing+=(chromium)
command -v chromedriver >/dev/null || setup_missing+=(chromium-driver)
command -v dockerd >/dev/null || setup_missing+=(docker.io)
command -v docker-compose >/dev/null || setup_missing+=(docker-compose)
command -v debootstrap >/dev/null || setup_missing+=(debootstrap)
command -v jq >/dev/null || setup_missing+=(jq)
command -v ss >/dev/null || setup_missing+=(iproute2)
command -v promtool >/dev/null || setup_missing+=(prometheus)
if [ ${#setup_missing[@]} -gt 0 ]; then setup_install "${setup_missing[@]}"; fi

setup_step "the Docker engine and the RabbitMQ/PostgreSQL images for testcontainers"
if ! docker info >/dev/null 2>&1; then
    echo "starting dockerd (log: /var/log/dockerd.log)"
    (dockerd >/var/log/dockerd.log 2>&1 &)
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
fi
docker info >/dev/null 2>&1 || setup_fail "the Docker engine did not start (see /var/log/dockerd.log)"
if ! docker image inspect rabbitmq:4-management postgres:17 >/dev/null 2>&1; then
    if [ -x ../shared/containers/build-images.sh ]; then
        # A machine without a registry: the images are built locally under the official names.
        (cd ../shared/containers && SUITE=trixie PG_MAJOR=17 ./build-images.sh)
    else
        docker pull rabbitmq:4-management && docker pull postgres:17 && docker pull debian:trixie-slim
    fi
fi
# compose/'s Dockerfiles start FROM debian:trixie-slim; without a registry that is the locally built base.
docker image inspect debian:trixie-slim >/dev/null 2>&1 || docker tag local/debian:trixie debian:trixie-slim

setup_step "Python: target/ci-venv (schema checks, the Python participant, the API fuzzer)"
setup_requirements="'jsonschema>=4.18,<5' 'selenium>=4.20,<5' 'schemathesis>=4.32,<5' $(cat examples/python-shipping/requirements.txt)"
if [ "$(cat target/ci-venv/.installed 2>/dev/null)" != "$setup_requirements" ]; then
    python3 -m venv target/ci-venv
    target/ci-venv/bin/pip install --quiet --disable-pip-version-check 'jsonschema>=4.18,<5' 'selenium>=4.20,<5' 'schemathesis>=4.32,<5'
    target/ci-venv/bin/pip install --quiet --disable-pip-version-check -r examples/python-shipping/requirements.txt   # as docs/participants.md says
    printf '%s' "$setup_requirements" > target/ci-venv/.installed
fi

# What the suites read (these are also their defaults).
export SAGAFLOW_TEST_AMQP_URL="${SAGAFLOW_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
export SAGAFLOW_TEST_DATABASE_URL="${SAGAFLOW_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export SAGAFLOW_PYTHON="${SAGAFLOW_PYTHON:-$PWD/target/ci-venv/bin/python}"

#!/usr/bin/env bash
# sd-multi provisioning. `./setup.sh help` lists the modes; every mode is idempotent and quick on a second run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
PORT="${SD_PORT:-7860}"
SERVICE_USER="sd-multi"
ENV_DIR="/etc/sd-multi"
APT_UPDATED=0

usage() {
    cat <<EOF
Usage: ./setup.sh MODE [ARGS]

  demo        set up and run the server with tiny models on http://127.0.0.1:$PORT (gunicorn, SD_ROLE=all)
  test        set up and run ruff, mypy and the whole test suite (CI runs exactly this); ARGS go to pytest
  dev         like demo, with Django's runserver (auto-reload) and DJANGO_DEBUG=1
  venv        create .venv (Python 3.11) and install requirements-dev.txt when the requirements changed
  env         print every setting's effective value (secrets shown only as set / not set)
  sd_model    explain where checkpoints go and list the ones in models/Stable-diffusion
  apache [ROLE]  install Apache as a reverse proxy to gunicorn for ROLE (node or balancer)
  node        provision this Debian machine as a GPU node: venv, database, systemd unit, Apache
  lb          provision this Debian machine as the balancer: venv, PostgreSQL, Redis, systemd units, Apache
  help        this text

Variables read by this script (the server's own settings are in README.md, "Settings"):
  SD_PORT=7860              port gunicorn listens on (127.0.0.1 only)
  SD_SERVER_NAME=\$(hostname -f)   Apache ServerName (apache, node, lb)
  SD_TORCH_INDEX_URL=       extra pip index for torch wheels (e.g. PyTorch's index for your CUDA version)
  SD_TORCH_CUDA=auto        node: 1 requires a CUDA build of torch, 0 does not; auto = 1 when nvidia-smi exists
EOF
}

log() { printf 'setup.sh: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}
is_ci() { [ -n "${CI:-}" ] && [ "${CI}" != "false" ] && [ "${CI}" != "0" ]; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
has_systemd() { [ -d /run/systemd/system ]; }

# Polls a readiness function for up to $2 seconds.
wait_for() {
    local check="$1" seconds="$2"
    for _ in $(seq "$seconds"); do
        if "$check"; then return 0; fi
        sleep 1
    done
    "$check"
}

apt_install() {
    command -v apt-get >/dev/null || {
        log "apt-get not found: install $* by hand"
        return 1
    }
    if [ "$APT_UPDATED" = 0 ]; then
        as_root apt-get update -q || return 1
        APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

# --- Python and the virtualenv ------------------------------------------------------------------------------------

is_python311() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; }

find_python() {
    local candidate
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null && is_python311 "$candidate"; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

# Installs $1 (a requirements file) into .venv, only when it or requirements.txt changed since the last install.
ensure_venv() {
    local requirements="$1" python stamp wanted
    if [ -e "$PY" ] && ! is_python311 "$PY"; then
        log "rebuilding .venv: it is not Python 3.11"
        rm -rf "$VENV"
    fi
    if [ ! -x "$PY" ]; then
        python="$(find_python)" || {
            apt_install python3.11 python3.11-venv || true
            python="$(find_python)" || die "Python 3.11 is required (Django 5.2 and the torch wheels need it)"
        }
        if ! "$python" -m venv "$VENV"; then
            rm -rf "$VENV"
            apt_install python3.11-venv || die "cannot create .venv: install python3.11-venv"
            "$python" -m venv "$VENV"
        fi
    fi
    stamp="$VENV/.sd-multi-requirements"
    wanted="$({
        echo "$requirements ${SD_TORCH_INDEX_URL:-}"
        cat requirements.txt "$requirements"
    } | sha256sum | cut -d' ' -f1)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
        local extra=()
        if [ -n "${SD_TORCH_INDEX_URL:-}" ]; then extra=(--extra-index-url "$SD_TORCH_INDEX_URL"); fi
        log "installing $requirements into .venv"
        "$PY" -m pip install -q -r "$requirements" "${extra[@]}"
        echo "$wanted" >"$stamp"
    fi
}

# A GPU node needs torch built for CUDA; on Linux the default wheel is one, a CPU wheel from a local index is not.
ensure_cuda_torch() {
    local wanted="${SD_TORCH_CUDA:-auto}" version
    if [ "$wanted" = auto ]; then
        if command -v nvidia-smi >/dev/null; then wanted=1; else wanted=0; fi
    fi
    [ "$wanted" = 1 ] || return 0
    if "$PY" -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then return 0; fi
    version="$(sed -n 's/^torch==//p' requirements.txt)"
    log "torch $version in .venv has no CUDA: reinstalling it"
    local extra=()
    if [ -n "${SD_TORCH_INDEX_URL:-}" ]; then extra=(--extra-index-url "$SD_TORCH_INDEX_URL"); fi
    "$PY" -m pip install -q --force-reinstall --no-deps "torch==$version" "${extra[@]}"
    # A CUDA build depends on CUDA libraries the CPU build did not need.
    "$PY" -m pip install -q "torch==$version" "${extra[@]}"
    "$PY" -c 'import sys, torch; sys.exit(torch.version.cuda is None)' ||
        die "torch still has no CUDA: set SD_TORCH_INDEX_URL to PyTorch's wheel index for your CUDA version"
}

# --- Services the tests need --------------------------------------------------------------------------------------

postgres_ready() { command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432; }
redis_ready() { command -v redis-cli >/dev/null && [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]; }
postgres_installed() { command -v pg_ctlcluster >/dev/null && [ -n "$(find /etc/postgresql -mindepth 1 -maxdepth 1 2>/dev/null)" ]; }

start_postgres() {
    local version
    version="$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)"
    if has_systemd; then as_root systemctl start postgresql || true; fi
    postgres_ready || as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    wait_for postgres_ready 30
}

start_redis() {
    if has_systemd; then as_root systemctl start redis-server || true; fi
    redis_ready && return 0
    as_root mkdir -p /var/lib/redis /var/log/redis
    as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
    wait_for redis_ready 15
}

ensure_postgres() {
    postgres_ready && return 0
    postgres_installed || apt_install postgresql || return 1
    start_postgres
}

ensure_redis() {
    redis_ready && return 0
    command -v redis-server >/dev/null || apt_install redis-server || return 1
    start_redis
}

# Runs SQL as the postgres superuser over the local socket (peer authentication, Debian's default).
psql_admin() { (cd / && as_root runuser -u postgres -- psql -v ON_ERROR_STOP=1 -Atq "$@"); }

# Creates a login role $1 with password $2 owning database $3, when they do not exist yet.
ensure_pg_database() {
    local role="$1" password="$2" database="$3"
    psql_admin -c "DO \$\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$role') THEN
        CREATE ROLE $role LOGIN CREATEDB PASSWORD '$password'; END IF; END \$\$;"
    if [ -z "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$database'")" ]; then
        psql_admin -c "CREATE DATABASE $database OWNER $role"
    fi
}

# The URL the tests get: the CI machine's trusted postgres user, else a password role made here (fresh machines
# authenticate loopback TCP with passwords).
postgres_test_url() {
    local trusted="postgres://postgres@127.0.0.1:5432/test"
    if psql "$trusted" -Atqc 'SELECT 1' >/dev/null 2>&1; then
        echo "$trusted"
    elif ensure_pg_database sd_multi_test sd_multi_test sd_multi_test >/dev/null; then
        echo "postgres://sd_multi_test:sd_multi_test@127.0.0.1:5432/sd_multi_test"
    else
        return 1
    fi
}

ensure_test_services() {
    local missing=()
    if ensure_postgres && SD_TEST_POSTGRES_URL="$(postgres_test_url)"; then
        export SD_TEST_POSTGRES_URL
    else
        missing+=(PostgreSQL)
    fi
    if ensure_redis; then
        export SD_TEST_REDIS_URL="redis://127.0.0.1:6379/15"
    else
        missing+=(Redis)
    fi
    # The browser tests drive Debian's Chromium (never a browser download).
    if [ ! -x /usr/bin/chromium ]; then
        log "installing Debian's chromium for the browser tests"
        as_root sh -c 'apt-get update -qq && apt-get install -y -qq chromium' >/dev/null || missing+=(Chromium)
    fi
    if [ "${#missing[@]}" -gt 0 ]; then
        if is_ci; then die "not available under CI: ${missing[*]}"; fi
        log "warning: not available: ${missing[*]}; the tests that need them are skipped"
    fi
}

# --- Modes --------------------------------------------------------------------------------------------------------

export_offline() { export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 DO_NOT_TRACK=1; }

cmd_venv() { ensure_venv requirements-dev.txt; }

cmd_test() {
    local name failures=() status=0
    ensure_venv requirements-dev.txt
    ensure_test_services
    # The suite runs on the defaults: a developer's own SD_* or DATABASE_URL must not change what it tests.
    for name in $(compgen -e); do
        case "$name" in
        SD_TEST_*) ;;
        SD_* | DJANGO_* | DATABASE_URL | CACHE_URL | REDIS_URL | MEDIA_ROOT) unset "$name" ;;
        esac
    done
    export_offline
    log "ruff check"
    "$VENV/bin/ruff" check . || failures+=("ruff check")
    log "ruff format --check"
    "$VENV/bin/ruff" format --check . || failures+=("ruff format")
    log "mypy"
    "$VENV/bin/mypy" . || failures+=(mypy)
    log "pytest"
    "$VENV/bin/pytest" "$@" || status=$?
    if [ "$status" = 5 ]; then
        failures+=("pytest (no test ran)")
    elif [ "$status" != 0 ]; then
        failures+=(pytest)
    fi
    if [ "${#failures[@]}" -gt 0 ]; then die "failed: ${failures[*]}"; fi
    log "all checks passed"
}

has_checkpoint() {
    local dir="${SD_MODELS_DIR:-$ROOT/models}/Stable-diffusion"
    [ -n "$(find "$dir" \( -name '*.safetensors' -o -name '*.ckpt' -o -name model_index.json \) -print -quit 2>/dev/null)" ]
}

prepare_server() {
    ensure_venv requirements-dev.txt
    export_offline
    export SD_ROLE=all
    # The balancer half of the server reaches its node half at this server's own address.
    export SD_LOCAL_NODE_URL="${SD_LOCAL_NODE_URL:-http://127.0.0.1:$PORT}"
    mkdir -p "$ROOT/var"
    "$PY" manage.py migrate --noinput
    if ! has_checkpoint; then
        log "no checkpoint in models/Stable-diffusion: writing the tiny demo models"
        "$PY" manage.py make_tiny_models
    fi
    log "API docs:  http://127.0.0.1:$PORT/docs"
    log "demo page: http://127.0.0.1:$PORT/multi_demo/"
    log "A1111 API: http://127.0.0.1:$PORT/sdapi/v1/txt2img"
}

cmd_demo() {
    prepare_server
    # One process owns the GPU and the model pool (two would load every model twice and fight for memory);
    # its threads serve the many HTTP clients, most of whom wait on a blocking txt2img or poll progress.
    # No worker timeout: a request lasts as long as its generation.
    exec "$VENV/bin/gunicorn" sd_multi.wsgi:application --bind "127.0.0.1:$PORT" \
        --workers 1 --threads 16 --timeout 0 --no-control-socket --access-logfile -
}

cmd_dev() {
    export DJANGO_DEBUG="${DJANGO_DEBUG:-1}"
    prepare_server
    exec "$PY" manage.py runserver "127.0.0.1:$PORT"
}

cmd_env() {
    ensure_venv requirements-dev.txt
    DJANGO_SETTINGS_MODULE=sd_multi.settings "$PY" - <<'EOF'
import django

django.setup()
from sd_multi.env import READ_VARIABLES

for read in sorted(READ_VARIABLES.values(), key=lambda read: read.name):
    print(f"{read.name}={read.shown}" + ("" if read.is_set else "  (default)"))
EOF
}

cmd_sd_model() {
    local dir="${SD_MODELS_DIR:-$ROOT/models}/Stable-diffusion"
    cat <<EOF
Checkpoints go into $dir:
  - AUTOMATIC1111-style single files: NAME.safetensors (.ckpt loads only with SD_ALLOW_PICKLE=1);
    a file may carry its configuration in a sibling diffusers-format folder NAME.config/;
  - or diffusers folders (a folder holding model_index.json).
LoRA files go into models/Lora, VAEs into models/VAE, textual inversions into models/embeddings.
Nothing is downloaded. A running node sees new files after POST /sdapi/v1/refresh-checkpoints or a restart.

Now in $dir:
EOF
    find "$dir" -maxdepth 2 \( -name '*.safetensors' -o -name '*.ckpt' -o -name model_index.json \) \
        -printf '  %P  (%s bytes)\n' 2>/dev/null | sort || true
    has_checkpoint || echo "  (no checkpoint: ./setup.sh demo writes tiny test models here)"
}

server_name() { echo "${SD_SERVER_NAME:-$(hostname -f 2>/dev/null || hostname)}"; }

cmd_apache() {
    local role="${1:-}" site
    if [ -z "$role" ]; then
        if [ -f "$ENV_DIR/balancer.env" ]; then role=balancer; else role=node; fi
    fi
    case "$role" in node | balancer) ;; *) die "apache: ROLE is node or balancer, not '$role'" ;; esac
    command -v apache2ctl >/dev/null || apt_install apache2 || die "cannot install apache2"
    as_root a2enmod -q proxy proxy_http headers >/dev/null
    site="/etc/apache2/sites-available/sd-multi-$role.conf"
    sed -e "s|@SERVER_NAME@|$(server_name)|g" -e "s|@PORT@|$PORT|g" -e "s|@STATIC_ROOT@|$ROOT/var/static|g" \
        "deploy/apache/$role.conf.template" | as_root tee "$site" >/dev/null
    # Nodes are called by IP address: our site must be the default virtual host, not Debian's placeholder.
    as_root a2dissite -q 000-default >/dev/null 2>&1 || true
    as_root a2ensite -q "sd-multi-$role" >/dev/null
    as_root apache2ctl configtest
    if has_systemd; then
        as_root systemctl reload-or-restart apache2
    else
        as_root apache2ctl graceful || as_root apache2ctl start
    fi
    log "Apache serves $(server_name):80 -> gunicorn 127.0.0.1:$PORT ($site)"
}

ensure_service_user() {
    id -u "$SERVICE_USER" >/dev/null 2>&1 ||
        useradd --system --create-home --home-dir "/var/lib/$SERVICE_USER" --shell /usr/sbin/nologin "$SERVICE_USER"
    runuser -u "$SERVICE_USER" -- test -r "$ROOT/manage.py" ||
        die "user $SERVICE_USER cannot read $ROOT: put the checkout where it can (e.g. /opt/sd-multi)"
    runuser -u "$SERVICE_USER" -- "$PY" -c "" ||
        die "user $SERVICE_USER cannot run $PY: its Python must not live in a private home (use Debian's python3.11)"
    mkdir -p "$ROOT/var"
    chown -R "$SERVICE_USER:" "$ROOT/var" "$ROOT/models"
}

random_secret() { "$PY" -c 'import secrets; print(secrets.token_hex(32))'; }

allowed_hosts() {
    local hosts=("$(server_name)" 127.0.0.1 localhost "[::1]") address
    for address in $(hostname -I 2>/dev/null); do
        if [[ "$address" == *:* ]]; then hosts+=("[$address]"); else hosts+=("$address"); fi
    done
    (
        IFS=,
        echo "${hosts[*]}"
    )
}

# Written once with fresh secrets; an existing file is the operator's and is never touched.
write_env_file() {
    local role="$1" file="$ENV_DIR/$1.env" node_secret draft
    if [ -f "$file" ]; then
        log "keeping $file"
        return 0
    fi
    install -d -m 0750 -o root -g "$SERVICE_USER" "$ENV_DIR"
    node_secret="${SD_NODE_SECRET:-$(random_secret)}"
    draft="$(mktemp)"
    {
        echo "# sd-multi $role settings (README.md, \"Settings\"). Written once by ./setup.sh; edit, then restart."
        echo "SD_ROLE=$role"
        echo "SD_AUTH=token"
        echo "DJANGO_SECRET_KEY=$(random_secret)"
        echo "# The same value on the balancer and on every node."
        echo "SD_NODE_SECRET=$node_secret"
        echo "DJANGO_ALLOWED_HOSTS=$(allowed_hosts)"
        echo "SD_BEHIND_PROXY=1"
        echo "SD_SERVE_STATIC=0"
        if [ "$role" = node ]; then
            echo "# To register with a balancer: its URL, and the URL it reaches this node at (http://10.0.0.11)."
            echo "SD_BALANCER_URL=${SD_BALANCER_URL:-}"
            echo "SD_NODE_URL=${SD_NODE_URL:-}"
        else
            echo "DATABASE_URL=postgres://sd_multi:$(random_secret)@127.0.0.1:5432/sd_multi"
            echo "REDIS_URL=redis://127.0.0.1:6379/0"
            echo "SD_WEBHOOK_SECRET=$(random_secret)"
            echo "# sd-multi-dispatcher.service dispatches the async tasks, not the web workers."
            echo "SD_TASK_DISPATCHER=command"
            echo "# Comma-separated node URLs, e.g. http://10.0.0.11,http://10.0.0.12"
            echo "SD_NODES=${SD_NODES:-}"
        fi
    } >"$draft"
    install -m 0640 -o root -g "$SERVICE_USER" "$draft" "$file"
    rm -f "$draft"
    log "wrote $file"
    if [ -z "${SD_NODE_SECRET:-}" ]; then
        log "generated SD_NODE_SECRET: copy it from $file to the other machines' env files"
    fi
}

# Runs manage.py as the service user with the role's env file.
manage_as_service() {
    local role="$1"
    shift
    (
        set -a
        # shellcheck disable=SC1090
        . "$ENV_DIR/$role.env"
        set +a
        export_offline
        runuser -u "$SERVICE_USER" -- "$PY" manage.py "$@"
    )
}

install_unit() {
    local unit="$1"
    sed -e "s|@APP_DIR@|$ROOT|g" -e "s|@PORT@|$PORT|g" -e "s|@USER@|$SERVICE_USER|g" "deploy/systemd/$unit" \
        >"/etc/systemd/system/$unit"
}

start_units() {
    if ! has_systemd; then
        log "no systemd here: start by hand with: ${ROOT}/.venv/bin/gunicorn ... (see deploy/systemd/$1)"
        return 0
    fi
    systemctl daemon-reload
    systemctl enable -q "$@"
    systemctl restart "$@"
}

cmd_provision() {
    local role="$1" units password
    [ "$(id -u)" = 0 ] || die "$role: run as root (sudo ./setup.sh ...)"
    ensure_venv requirements.txt
    ensure_service_user
    write_env_file "$role"
    if [ "$role" = node ]; then
        ensure_cuda_torch
        units=(sd-multi-node.service)
    else
        ensure_postgres || die "PostgreSQL is not running"
        ensure_redis || die "Redis is not running"
        password="$(sed -n 's|^DATABASE_URL=postgres://sd_multi:\([^@]*\)@127\.0\.0\.1:5432/sd_multi$|\1|p' \
            "$ENV_DIR/$role.env")"
        if [ -n "$password" ]; then ensure_pg_database sd_multi "$password" sd_multi; fi
        units=(sd-multi-balancer.service)
    fi
    manage_as_service "$role" migrate --noinput
    manage_as_service "$role" collectstatic --noinput --verbosity 0
    for unit in "${units[@]}"; do install_unit "$unit"; done
    if [ "$role" = balancer ]; then
        install_unit sd-multi-dispatcher.service
        units+=(sd-multi-dispatcher.service)
    fi
    start_units "${units[@]}"
    cmd_apache "$role"
    log "$role ready; settings in $ENV_DIR/$role.env"
}

main() {
    local mode="${1:-help}"
    if [ "$#" -gt 0 ]; then shift; fi
    case "$mode" in
    demo) cmd_demo ;;
    test) cmd_test "$@" ;;
    dev) cmd_dev ;;
    venv) cmd_venv ;;
    env) cmd_env ;;
    sd_model) cmd_sd_model ;;
    apache) cmd_apache "$@" ;;
    node) cmd_provision node ;;
    lb | balancer) cmd_provision balancer ;;
    help | -h | --help) usage ;;
    *)
        usage >&2
        die "unknown mode '$mode'"
        ;;
    esac
}

main "$@"

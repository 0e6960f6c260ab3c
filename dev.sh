#!/usr/bin/env bash
# Set-up and entry point for a fresh machine with Python >= 3.11.
#
#   ./dev.sh demo [flywheel demo options]   # install into .venv, then run the whole loop on embedded defaults
#   ./dev.sh test [pytest options]          # install into .venv (+ Mosquitto when root), then run the tests
#                                           # (no options: in two parts, see run_suite; options: one pytest run)
#   ./dev.sh install                        # only install
#
# What it does, so nothing surprises you:
#   * creates ./.venv (python3 -m venv) unless VIRTUAL_ENV is already active;
#   * without an NVIDIA GPU, installs PyTorch's CPU build first (a plain `torch` requirement
#     would pull a multi-GB CUDA build); with a GPU, pip picks the CUDA build;
#   * installs this project with its test extras (editable), once per pyproject change, through
#     uv (pip-installed into the venv first; pip itself where uv cannot be installed or fails);
#   * `test` only: if `mosquitto` or `prometheus` is missing and we are root, runs
#     `apt-get update && apt-get install -y mosquitto mosquitto-clients prometheus` (Debian/Ubuntu)
#     for what is missing. The tests start their own brokers and Prometheus servers on free
#     ports; they never touch 1883 or 9090.
set -euo pipefail
cd "$(dirname "$0")"
cmd="${1:-demo}"; shift || true
PY="${PYTHON:-python3}"

log() { printf '\033[1;34m[dev.sh]\033[0m %s\n' "$*" >&2; }

if [[ -z "${VIRTUAL_ENV:-}" ]]; then
  if [[ ! -x .venv/bin/python ]]; then
    log "creating virtual environment .venv"
    "$PY" -m venv .venv
  fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi

install() {
  local stamp=.venv/.flywheel-installed
  local want
  want="$(cat pyproject.toml | sha1sum | cut -c1-12)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && python -c "import flywheel, torch" 2>/dev/null; then
    return
  fi
  # uv (from PyPI, into the venv) installs the same packages as pip in half the time
  # (benchmarks/bench_install.py: a cold install ~43 s instead of ~94 s); pip where uv cannot be had
  # or fails.
  # --compile-bytecode, as pip does: where PYTHONDONTWRITEBYTECODE is set (CI machines often
  # set it), every process would otherwise compile every module it imports, each time (a tiny
  # tree campaign: 50 s instead of 29 s).
  local pkg=(python -m pip install -q)
  if python -m pip install -q uv >/dev/null 2>&1 && python -m uv --version >/dev/null 2>&1; then
    pkg=(python -m uv pip install -q --compile-bytecode --python "$(command -v python)")
  else
    python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  fi
  if ! python -c "import torch" 2>/dev/null; then
    local tag wheel
    tag="$(python -c 'import sys; print("cp%d%d" % sys.version_info[:2])')"
    wheel="$(ls /opt/wheels/torch-2.13.0+cpu-"$tag"-"$tag"-*.whl 2>/dev/null | head -1 || true)"
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      log "NVIDIA GPU found: installing PyTorch with CUDA"
      python -m pip install -q "torch>=2.4,<3"
    elif [[ -n "$wheel" ]]; then   # the file itself: uv does not read pip's find-links
      log "no GPU: installing the local PyTorch 2.13.0 CPU build"
      "${pkg[@]}" "$wheel" || python -m pip install -q "torch==2.13.0"
    elif ls /opt/wheels/torch-2.13.0* >/dev/null 2>&1; then
      log "no GPU: installing the local PyTorch 2.13.0 CPU build"
      python -m pip install -q "torch==2.13.0"
    else
      log "no GPU: installing PyTorch's CPU build"
      python -m pip install -q "torch>=2.4,<3" --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
  log "installing flywheel-stack and its dependencies (first time: about a minute)"
  if ! "${pkg[@]}" -e ".[test]"; then
    [[ "${pkg[2]}" == "uv" ]] || exit 1
    log "uv could not install the project (above); trying pip"
    python -m pip install -q -e ".[test]"
  fi
  # Earlier installs pulled in rfc3987-syntax (see pyproject.toml): it costs every Ray process ~2 s
  # of CPU when imported, so an environment that still has it drops it.
  python -m pip uninstall -y -q rfc3987-syntax >/dev/null 2>&1 || true
  echo "$want" > "$stamp"
}

compile_own() {
  # The project's own modules, compiled as the installer compiles the dependencies: where
  # PYTHONDONTWRITEBYTECODE is set Python writes no bytecode for them either, and every process
  # that imports them (each CLI call, each Ray worker) compiled its ~26,000 lines again (~0.7 s of
  # CPU; part 1 of the suite 205 -> 191 s). Only changed files are compiled (~0.3 s when none); a
  # file edited later is read from source until the next run here.
  python -m compileall -q -j 0 flywheel factory_sim ingest finetune serve gateway >/dev/null || true
}

ensure_services() {
  # The tests run real brokers (Mosquitto) and a real Prometheus; they start their own on free ports.
  local missing=()
  command -v mosquitto >/dev/null 2>&1 || [[ -x /usr/sbin/mosquitto ]] || missing+=(mosquitto mosquitto-clients)
  command -v prometheus >/dev/null 2>&1 || [[ -x /usr/bin/prometheus ]] || missing+=(prometheus)
  if [[ ${#missing[@]} -eq 0 ]]; then return; fi
  if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null 2>&1; then
    log "not found: ${missing[*]}: running apt-get update && apt-get install -y ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    # Debian starts a system broker on 1883 and a Prometheus on 9090; the tests need neither.
    for svc in mosquitto prometheus prometheus-node-exporter; do
      (service "$svc" stop || systemctl stop "$svc") >/dev/null 2>&1 || true
    done
  else
    log "not found and cannot install (not root or no apt-get): ${missing[*]}; tests that need them will fail."
    log "install them yourself (Debian/Ubuntu: sudo apt-get install -y ${missing[*]})"
  fi
}

run_suite() {
  # The whole suite in two parts. Most tests wait (on brokers, paced plants, servers) far more
  # than they compute: those that share nothing run first, on several workers (pytest-xdist, each
  # test file on one worker). Then the `serial` ones (tests/conftest.py: on the session's local Ray,
  # a Ray of their own, a fixture that trains, or busy cores) in one process, one at a time.
  local workers="${FLYWHEEL_TEST_WORKERS:-3}" first=0 second=0
  if [[ ! "$workers" =~ ^([0-9]+|auto|logical)$ ]]; then
    log "FLYWHEEL_TEST_WORKERS=$workers is not a number of workers: set it to a whole number or auto, or unset it for the default, 3"
    exit 2
  fi
  log "tests, part 1 of 2: the ones that share nothing, on $workers workers"
  python -m pytest -m "not serial" -n "$workers" --dist loadfile || first=$?
  log "tests, part 2 of 2: the serial ones (the session's Ray, training, busy cores), one at a time"
  # --durations: the log ends with where part 2's time went (it is most of the suite's length).
  python -m pytest -m serial --durations=25 || second=$?
  [[ $first -eq 5 ]] && first=0     # 5: nothing selected (a part that is empty)
  [[ $second -eq 5 ]] && second=0
  if [[ $first -ne 0 || $second -ne 0 ]]; then
    log "tests failed: part 1 exit $first, part 2 exit $second (the summaries above name the tests)"
    exit $(( first != 0 ? first : second ))
  fi
}

case "$cmd" in
  install) install ;;
  demo)    install; compile_own; exec flywheel demo "$@" ;;
  test)    install; compile_own; ensure_services
           if [[ $# -gt 0 ]]; then exec python -m pytest "$@"; fi
           run_suite ;;
  *) echo "usage: ./dev.sh {demo|test|install} [args...]" >&2; exit 2 ;;
esac

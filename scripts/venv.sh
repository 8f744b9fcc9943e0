# Sourced by the other scripts: makes ./.venv and installs torchmhc with the given extras into it.
# Usage: ensure_venv EXTRAS   (e.g. "test" or "train,plots").
# TORCH_SPEC overrides the torch requirement (default: torch==2.13.0, the CPU build the project's
# machines keep on disk; on a GPU machine with its own torch, set TORCH_SPEC=torch).
ensure_venv() {
    local extras="$1"
    local python="${PYTHON:-python3}"
    if [ ! -x .venv/bin/python ]; then
        echo "creating .venv with $($python --version)"
        "$python" -m venv .venv
    fi
    # Reinstall only when the project's requirements changed since the last install.
    local stamp=".venv/.torchmhc-${extras//,/-}-$(cat pyproject.toml | sha1sum | cut -c1-12)"
    if [ ! -f "$stamp" ]; then
        echo "installing torchmhc[$extras] into .venv (first run only)"
        # --no-compile: byte-compiling all of torch took 10 of the 18 s its install took; Python
        # compiles the modules it imports (a few seconds, once) on first use instead
        .venv/bin/python -m pip install -q --no-compile --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
        .venv/bin/python -m pip install -q --no-compile --disable-pip-version-check -e ".[$extras]"
        touch "$stamp"
    fi
}

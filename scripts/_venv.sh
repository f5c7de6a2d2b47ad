# shellcheck shell=bash
# Shared by scripts/demo and scripts/test (sourced, not run): create or refresh the
# repository's .venv with Python 3.11 or newer.
#
# Set PYTHON to choose the interpreter; otherwise the first of python3, python3.13,
# python3.12 and python3.11 that is 3.11 or newer is used.

# Print the first Python 3.11+ interpreter found.
find_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3 python3.13 python3.12 python3.11; do
        [[ -n "$candidate" ]] || continue
        command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            printf '%s\n' "$candidate"
            return 0
        fi
    done
    printf 'error: no Python 3.11 or newer found (tried %s); install one (Debian 12: apt-get install python3) or set PYTHON=/path/to/python3.11\n' \
        "${PYTHON:+$PYTHON, }python3, python3.13, python3.12, python3.11" >&2
    return 1
}

# Name the Debian/Ubuntu package that brings the venv module to a Python interpreter.
venv_package() {
    local python="$1" version default_version
    version="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    default_version="$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")' 2>/dev/null || true)"
    if [[ "$version" == "$default_version" ]]; then
        printf 'python3-venv\n'
    else
        printf 'python%s-venv\n' "$version"
    fi
}

# Create the venv at $1 with $2, installing the distribution's venv package first when
# that Python lacks it (Debian and Ubuntu ship venv and ensurepip separately).
create_venv() {
    local venv_dir="$1" python="$2" output package
    if output="$("$python" -m venv "$venv_dir" 2>&1)"; then
        return 0
    fi
    rm -rf "$venv_dir"
    package="$(venv_package "$python")"
    if [[ "$output" != *ensurepip* && "$output" != *"No module named venv"* ]]; then
        printf '%s\n' "$output" >&2
        printf 'error: %s -m venv %s failed (output above)\n' "$python" "$venv_dir" >&2
        return 1
    fi
    if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        printf 'error: %s cannot create virtual environments because its venv/ensurepip module is missing; install it with: sudo apt-get install -y %s\n' \
            "$python" "$package" >&2
        return 1
    fi
    printf 'installing %s with apt-get: %s cannot create virtual environments without it\n' "$package" "$python" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >&2
    "$python" -m venv "$venv_dir"
}

# Make sure $1 is a working venv with Python 3.11+; create it (again) when it is not.
ensure_venv() {
    local venv_dir="$1" python
    if [[ -x "$venv_dir/bin/python" ]] \
        && "$venv_dir/bin/python" -c 'import sys, pip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        return 0
    fi
    python="$(find_python)" || return 1
    if [[ -e "$venv_dir" ]]; then
        printf 'recreating %s: its Python is missing, broken or older than 3.11\n' "$venv_dir" >&2
        rm -rf "$venv_dir"
    fi
    printf 'creating %s with %s (%s)\n' "$venv_dir" "$python" "$("$python" --version 2>&1)" >&2
    create_venv "$venv_dir" "$python"
}

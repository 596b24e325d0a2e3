#!/usr/bin/env bash
# Prints the CPython interpreters ferroloop is tested on, one path a line: 3.11 always
# (the default `python3`, or the first 3.11 found), then each of 3.10, 3.12 and 3.13
# that this machine has. An interpreter counts only if it runs, is the version its name
# says, and has what the tests need (venv with ensurepip, and the `test` package for the
# conformance run). Bare `python3.X` names may be pyenv shims that refuse to run, so
# pyenv's own version folders are searched first, by path.
set -uo pipefail

usable() {  # usable PATH MINOR
    "$1" -c "import sys, venv, ensurepip, test.test_asyncio
sys.exit(0 if sys.version_info[:2] == (3, $2) else 1)" >/dev/null 2>&1
}

candidates() {  # candidates MINOR: possible paths, best first
    local minor=$1 root
    [ "$minor" = 11 ] && command -v python3
    if root=$(pyenv root 2>/dev/null) || root=${PYENV_ROOT:-$HOME/.pyenv}; then
        # Highest patch release first.
        ls -d "$root"/versions/3."$minor".*/bin/python3."$minor" 2>/dev/null | sort -t. -k3,3nr -k2,2nr
    fi
    command -v python3."$minor"
    echo /usr/local/bin/python3."$minor"
    echo /usr/bin/python3."$minor"
}

found_any_311=0
for minor in 11 10 12 13; do
    while read -r path; do
        [ -n "$path" ] && [ -x "$path" ] || continue
        if usable "$path" "$minor"; then
            "$path" -c "import sys; print(sys.executable)"
            [ "$minor" = 11 ] && found_any_311=1
            break
        fi
    done < <(candidates "$minor")
done
if [ "$found_any_311" = 0 ]; then
    echo "pythons.sh: no usable CPython 3.11 (with venv, ensurepip and the test package)" >&2
    exit 1
fi

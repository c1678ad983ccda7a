#!/usr/bin/env bash
# Prints the path of a Python >= 3.12: PATH first, then pyenv (oldest
# first: 3.12 matches the GPU runners).
# Exits 1 with a message on stderr when there is none.
set -u
ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }
for name in python3 python3.14 python3.13 python3.12 python; do
  path=$(command -v "$name" 2>/dev/null) || continue
  # pyenv shims exist for versions that are not selected and then fail: ok()
  # runs the interpreter, so only a working one is accepted.
  if ok "$path"; then echo "$path"; exit 0; fi
done
root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
for path in $(ls -d "$root"/versions/3.*/bin/python3 2>/dev/null | sort -V); do
  if ok "$path"; then echo "$path"; exit 0; fi
done
echo "error: fp4jax needs Python >= 3.12 (jax >= 0.11 does). None was found on" \
  "PATH or in pyenv ($root/versions). Install one, or run" \
  "'make PYTHON=/path/to/python3.12 ...'." >&2
exit 1

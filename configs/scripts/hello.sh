#!/bin/sh
# Print each argument on its own line, proving they arrive unchanged (no shell expansion).
echo "hello from $(hostname), pid $$, in $(pwd)"
for arg in "$@"; do
    printf 'arg: %s\n' "$arg"
done

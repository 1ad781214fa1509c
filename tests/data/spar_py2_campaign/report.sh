#!/bin/sh
# Records which role ran where, in the component's base directory.
echo "$* on $(hostname)" > "$1.out"

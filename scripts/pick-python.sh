#!/bin/sh
# Prints the interpreter to build .venv with: the first of python3.11, python3.12, python3.13,
# python3 on the PATH that is 3.11-3.14 (the Python versions every pinned package has wheels
# for). Otherwise says in one line what was found and what is needed, and exits 1.
found=""
for p in python3.11 python3.12 python3.13 python3; do
    command -v "$p" >/dev/null 2>&1 || continue
    version=$("$p" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || continue
    if "$p" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 14))' 2>/dev/null; then
        echo "$p"
        exit 0
    fi
    found="$found $p $version,"
done
found=${found%,}
echo "make: needs Python 3.11 to 3.14 (the pinned wheels); found:${found:- none} on the PATH. Install one, or run make PYTHON=/path/to/python3.12 ..." >&2
exit 1

#!/usr/bin/env bash
# Download, here, the cp312 wheels that benchmarks/gpu_suite.sh installs on a lent GPU machine (no network
# there): pyro-ppl and pyro-api (slt requires pyro for its diagnostics; the machine's image lacks it) and
# devinterp 2.0.1 with the dependencies the image lacks.  Versions are those of this environment where it
# has them.  Then run the suite through the device tool with carry=[".whl"] (see gpu_suite.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo /.whl/ >> .git/info/exclude; }
ver() { python3 -m pip show "$1" 2>/dev/null | awk '/^Version/{print "=="$2}'; }
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"
for pkg in pyro-ppl pyro-api devinterp datasets multiprocess dill zarr numcodecs donfig google-crc32c pydantic \
           pydantic_core annotated-types typing-inspection; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT \
    -d .whl "$pkg$(ver "$pkg")" 2>&1 | grep -v "^WARNING" || true
done
ls .whl && du -sh .whl

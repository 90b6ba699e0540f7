#!/bin/sh
# Run the whole asv suite -- this working tree's benchmarks/ -- against each commit
# named, in the current environment: each commit's numbabn/ and keras_layer/ are
# extracted (git archive) to a temporary folder that asv's benchmark processes import
# (ASV_PYTHONPATH), and the results are recorded under that commit's hash. The
# dependencies are this environment's for every commit, so a history shows what the
# code changed, not what a new TensorFlow did; no per-commit virtualenv is built
# (asv's own way takes ~5 min a commit to install TensorFlow and PyTorch). Each commit
# compiles its kernels afresh (its own Numba cache), as a user's first run would.
#
#   benchmarks/asv_commits.sh COMMIT...        (SKIP_EXISTING=1: skip commits with results)
#   ASV_ARGS="-b Peers" benchmarks/asv_commits.sh HEAD   (extra `asv run` arguments)
set -e
ASV=${ASV:-asv}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/numbabn-asv-XXXXXX")
trap 'rm -rf "$tmp"' EXIT INT TERM
for c in "$@"; do
    hash=$(git rev-parse --verify "$c^{commit}")
    if [ "${SKIP_EXISTING:-0}" = 1 ] && ls .asv/results/*/"$(echo "$hash" | cut -c1-8)"-*.json >/dev/null 2>&1; then
        echo "== $c ($hash): results exist, skipped"
        continue
    fi
    src="$tmp/$hash"
    mkdir -p "$src"
    git archive "$hash" numbabn keras_layer | tar -x -C "$src"
    echo "== $c ($hash) $(date -u +%H:%M:%S)"
    start=$(date +%s)
    # shellcheck disable=SC2086
    ASV_PYTHONPATH="$src" OMP_WAIT_POLICY=PASSIVE "$ASV" run --python=same --show-stderr \
        --set-commit-hash "$hash" $ASV_ARGS
    echo "== $c: $(( $(date +%s) - start )) s (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
    rm -rf "$src"
done

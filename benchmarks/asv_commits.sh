#!/bin/sh
# Run the whole asv suite -- this working tree's benchmarks/ -- against each commit
# named, in the current environment: each commit's numbabn/ and keras_layer/ are
# extracted (git archive) to a temporary folder that asv's benchmark processes import
# (ASV_PYTHONPATH), and the results are recorded under that commit's hash. The
# dependencies are this environment's for every commit, so a history shows what the
# code changed, not what a new TensorFlow did; no per-commit virtualenv is built
# (asv's own way takes ~5 min a commit to install TensorFlow and PyTorch). Commits whose
# numbabn/ and keras_layer/ are the same (README, benchmark or test commits) share one
# extracted copy and so its Numba cache: the kernels compile once per distinct code
# (~70 s a commit on the 2-core machine), not once per commit. The cost of compiling is
# FirstCall's figure, measured in a new process with an empty cache, for every commit.
#
#   benchmarks/asv_commits.sh COMMIT...        (SKIP_EXISTING=1: skip commits with results)
#   ASV_ARGS="-b Peers" benchmarks/asv_commits.sh HEAD   (extra `asv run` arguments)
#   CODE_ROOT=.asv/code benchmarks/asv_commits.sh COMMIT...   (keep the extracted copies
#       there, each also named by its commit's full hash: `make bench-gate`'s A/B step,
#       benchmarks/ab_gate.py, runs the two commits' kernels from them, compiled)
set -e
ASV=${ASV:-asv}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/numbabn-asv-XXXXXX")
trap 'rm -rf "$tmp"' EXIT INT TERM
# the code a commit runs: the trees of its numbabn/ and keras_layer/
code_of() {
    git rev-parse "$1:numbabn" "$1:keras_layer" | git hash-object --stdin | cut -c1-16
}
codes=""
for c in "$@"; do codes="$codes$(code_of "$c") "; done
for c in "$@"; do
    hash=$(git rev-parse --verify "$c^{commit}")
    code=$(code_of "$hash")
    codes=${codes#* }  # the codes of the commits after this one
    if [ "${SKIP_EXISTING:-0}" = 1 ] && ls .asv/results/*/"$(echo "$hash" | cut -c1-8)"-*.json >/dev/null 2>&1; then
        echo "== $c ($hash): results exist, skipped"
        continue
    fi
    src="${CODE_ROOT:-$tmp}/$code"
    if [ -d "$src" ]; then
        reuse=" (same numbabn/ and keras_layer/ as a commit before: its compiled kernels)"
    else
        reuse=""
        mkdir -p "$src"
        git archive "$hash" numbabn keras_layer | tar -x -C "$src"
    fi
    if [ -n "$CODE_ROOT" ]; then
        ln -sfn "$code" "$CODE_ROOT/$hash"
    fi
    echo "== $c ($hash) $(date -u +%H:%M:%S)$reuse"
    start=$(date +%s)
    # shellcheck disable=SC2086
    ASV_PYTHONPATH="$src" OMP_WAIT_POLICY=PASSIVE "$ASV" run --python=same --show-stderr \
        --set-commit-hash "$hash" $ASV_ARGS
    echo "== $c: $(( $(date +%s) - start )) s (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
    case " $codes " in
        *" $code "*) ;;  # a later commit runs the same code
        *) [ -n "$CODE_ROOT" ] || rm -rf "$src" ;;
    esac
done

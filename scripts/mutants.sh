#!/usr/bin/env bash
# Mutation check of the agreement property: each mutant below plants one plausible bug in
# the compiled side (selectors, named ports, ipBlock excepts, tier order, exemptions), in a
# scratch copy of the workspace, and the property `compiled_rule_sets_agree_with_the_evaluator`
# must then fail. A mutant that survives means the reference evaluator shares the bug (or
# the generators never reach it): the property could not have caught it.
#
# Usage: scripts/mutants.sh [NAME...]   (default: every mutant)
# Env:   MUTANTS_CASES (default 4000; a caught mutant stops at its first failure; the
#        PROPTEST_CASES of other tests is not used, so CI's setting cannot weaken this),
#        PROPTEST_RNG_SEED (default 1: runs are repeatable),
#        MUTANTS_TARGET_DIR (default target/mutants; kept between runs to build faster).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

# One mutant: name, file, exact text (must occur once), replacement; `\n` is a newline.
names=(); files=(); froms=(); tos=()
m() { names+=("$1"); files+=("$2"); froms+=("$3"); tos+=("$4"); }
m 'notin-missing-key' policy/src/selector.rs \
  'Operator::NotIn => value.is_none_or(' \
  'Operator::NotIn => value.is_some_and('
m 'in-missing-key' policy/src/selector.rs \
  'Operator::In => value.is_some_and(' \
  'Operator::In => value.is_none_or('
m 'doesnotexist-as-exists' policy/src/selector.rs \
  'Operator::DoesNotExist => value.is_none(),' \
  'Operator::DoesNotExist => value.is_some(),'
m 'match-labels-key-only' policy/src/selector.rs \
  '.all(|(k, v)| labels.get(k) == Some(v))' \
  '.all(|(k, _)| labels.get(k).is_some())'
m 'node-local-inverted' policy/src/verdict.rs \
  'endpoints.src.host_network && endpoints.src.node == endpoints.dst.node' \
  'endpoints.src.host_network && endpoints.src.node != endpoints.dst.node'
m 'to-itself-dropped' policy/src/verdict.rs \
  'if endpoints.src.key() == endpoints.dst.key() {' \
  'if false {'
m 'pass-as-allow' policy/src/verdict.rs \
  'Action::Pass => None,' \
  'Action::Pass => Some(Verdict::Allow),'
m 'named-port-any-protocol' policy/src/model.rs \
  '.filter(move |p| p.protocol == protocol && p.name.as_deref() == Some(name))' \
  '.filter(move |p| p.name.as_deref() == Some(name))'
m 'named-port-group-ignores-except' policy/src/compile/groups.rs \
  'cidr.contains(addr) && !except.iter().any(|e| e.contains(addr))' \
  'cidr.contains(addr)'
m 'ipblock-except-ignored' policy/src/addrset.rs \
  'set.v4 = subtract(&set.v4, &cut.v4);' \
  ''
m 'ipblock-except-keeps-last-address' policy/src/addrset.rs \
  'start = if chi >= hi { None } else { chi.succ() };' \
  'start = if chi >= hi { None } else { Some(chi) };'
m 'priority-order-reversed' policy/src/compile/index/mod.rs \
  'ranks.sort();' \
  'ranks.sort_by(|a, b| b.cmp(a));'
m 'tie-order-kind-swapped' policy/src/model.rs \
  '    ClusterNetworkPolicy,\n    AdminNetworkPolicy,\n' \
  '    AdminNetworkPolicy,\n    ClusterNetworkPolicy,\n'

export PROPTEST_CASES="${MUTANTS_CASES:-4000}"
export PROPTEST_RNG_SEED="${PROPTEST_RNG_SEED:-1}"
# A failure is all this script needs; shrinking it would only cost time.
export PROPTEST_MAX_SHRINK_ITERS=0
export CARGO_TARGET_DIR="${MUTANTS_TARGET_DIR:-$root/target/mutants}"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# The scratch copy: the workspace's sources without build output or git data, every file
# stamped now (`-m`) so that cargo rebuilds: restored sources keep no older time that would
# let it reuse the previous mutant's build.
copy_workspace() {
    rm -rf "$scratch/ws"
    mkdir -p "$scratch/ws"
    tar -C "$root" --exclude=./target --exclude=./.git -cf - . | tar -C "$scratch/ws" -xmf -
}

# Replaces the one occurrence of $2 in file $1 by $3 (literal texts, `\n` a newline).
mutate() {
    FROM=$(printf '%b' "$2") TO=$(printf '%b' "$3") perl -0pi -e '
        my $n = () = /\Q$ENV{FROM}\E/g;
        die "mutant text found $n times (want 1) in $ARGV: $ENV{FROM}\n" unless $n == 1;
        s/\Q$ENV{FROM}\E/$ENV{TO}/;
    ' "$scratch/ws/$1"
}

agreement() {
    (cd "$scratch/ws" && cargo test -q -p palisade-policy --test agreement \
        compiled_rule_sets_agree_with_the_evaluator -- --exact) >"$scratch/log" 2>&1
}

copy_workspace
echo "== unmutated: the property must pass ($PROPTEST_CASES cases, seed $PROPTEST_RNG_SEED)"
if ! agreement; then
    tail -40 "$scratch/log"
    echo "error: the agreement property fails without any mutant" >&2
    exit 1
fi

survived=()
for i in "${!names[@]}"; do
    name=${names[$i]} file=${files[$i]} from=${froms[$i]} to=${tos[$i]}
    if [ $# -gt 0 ] && [[ " $* " != *" $name "* ]]; then
        continue
    fi
    copy_workspace
    mutate "$file" "$from" "$to"
    start=$SECONDS
    if agreement; then
        echo "SURVIVED $name ($file), $((SECONDS - start)) s"
        survived+=("$name")
    elif grep -q "minimal failing input\|Test failed" "$scratch/log"; then
        echo "caught   $name ($file), $((SECONDS - start)) s"
    else
        tail -30 "$scratch/log"
        echo "error: mutant $name broke the build or the test harness, not the property" >&2
        exit 1
    fi
done

if [ ${#survived[@]} -gt 0 ]; then
    echo "error: mutants survived the agreement property: ${survived[*]}" >&2
    exit 1
fi
echo "every mutant was caught"

#!/usr/bin/env bash
# Fails when a module imports a module that imports it back (directly or through other modules), in the lib
# and bin targets of every workspace package.
#
# The module graph comes from cargo-modules (rust-analyzer's name resolution): for each target,
#   cargo modules dependencies --no-fns --no-types --no-traits --no-owns
# folds every item into the module that defines it, keeps only "uses" edges (a parent owning a child is not an
# import), and prints the graph as DOT; python3 keeps the edges between the target's own modules and looks for
# strongly connected components. A "uses" edge is a `use` item, or a type named in a signature, a struct or enum
# field or a type alias (aliases expanded: `-> crate::Result<T>` counts as a use of the aliased types, but
# `use crate::Result` of the alias defined in lib.rs as one of lib.rs); a path written only inside a function
# body (`crate::x::f()`) is not seen.
# Not `--no-externs`/`--no-sysroot`: without std loaded, `Option<Box<crate::q::Q>>` no longer resolves and the
# edge to `q` is lost; so rust-src should be installed (without it the check falls back to --no-sysroot, with
# a warning, and sees only the edges that do not go through std's types).
#
# Not `--acyclic`: cargo-modules runs that on its item graph before any filter, where every type whose method
# mentions the type (`fn new() -> Self`, prost's `encode_raw`) is already a "cycle", and it stops at the first.
# Not `--cfg-test`: `use super::*` in `mod tests` also brings the parent's other child modules into scope, so two
# test modules side by side in one file would read as a cycle. Default features only, as clippy in .ci/run.
#
# Needs cargo-modules (CI installs it; see the message below) and python3. Uses CARGO_TARGET_DIR like cargo:
# each run of cargo-modules does `cargo check --compile-time-deps` (build scripts, proc macros), which is already
# fresh after `cargo clippy --workspace --all-targets` in the same target directory.
#
# Output: one line per target, `ok` or `CYCLE` with each cycle below it (`a -> b`: module a uses module b).
# Exit status: 0 no cycle; 1 a cycle in some target; 2 cargo-modules missing or failed.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_MODULES_VERSION=0.27.0 # the newest that builds with Rust 1.95 (0.28 needs 1.98)
if ! command -v cargo-modules >/dev/null; then
  echo "error: cargo-modules is not installed: cargo install --locked cargo-modules@$CARGO_MODULES_VERSION" >&2
  exit 2
fi
command -v python3 >/dev/null || { echo "error: python3 is needed" >&2; exit 2; }
sysroot=()
if [ ! -d "$(rustc --print sysroot)/lib/rustlib/src/rust/library" ]; then
  # Without std's source rust-analyzer cannot resolve types such as Option<T>, and edges through them are
  # missed; `use` items still resolve, so the check still runs, with fewer edges, rather than not at all.
  echo "warning: rust-src is not installed (rustup component add rust-src): checking without std," \
    "so a module named only inside std types (Option<Box<crate::m::T>>) is not seen as used" >&2
  sysroot=(--no-sysroot)
fi

start=$SECONDS
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# "package<TAB>lib|bin<TAB>target name", one per lib or bin target of each workspace member.
cargo metadata --format-version 1 --no-deps | python3 -c '
import json, sys
meta = json.load(sys.stdin)
members = set(meta["workspace_members"])
lib_kinds = {"lib", "rlib", "dylib", "cdylib", "staticlib", "proc-macro"}
for pkg in meta["packages"]:
    if pkg["id"] not in members:
        continue
    for t in pkg["targets"]:
        if lib_kinds & set(t["kind"]):
            print(pkg["name"], "lib", t["name"], sep="\t")
        elif "bin" in t["kind"]:
            print(pkg["name"], "bin", t["name"], sep="\t")
' >"$work/targets"

# Reads the DOT graph on stdin; prints nothing if it has no cycle, else one line per cycle.
# Each strongly connected component is shown as its mutual pairs (a <-> b), then, for each of its modules in
# no pair, the shortest cycle through that module, so every module of the component appears at least once.
cat >"$work/cycles.py" <<'EOF'
import collections, re, sys
crate, generated = sys.argv[1], sys.argv[2:]
inside = lambda n, g: n == g or n.startswith(g + "::")
ours = lambda n: inside(n, crate)
edges = collections.defaultdict(set)
nodes = set()
for line in sys.stdin:
    m = re.match(r'\s*"([^"]+)" -> "([^"]+)" \[label="uses"', line)
    if m:
        a, b = m.groups()
        if any(inside(a, g) and inside(b, g) for g in generated):
            continue
        if a != b and ours(a) and ours(b):
            edges[a].add(b)
            nodes.update((a, b))

def name(n):
    return "crate" if n == crate else n[len(crate) + 2:] if n.startswith(crate + "::") else n

# Tarjan's strongly connected components, iteratively.
index, low, on_stack, stack, sccs, counter = {}, {}, set(), [], [], 0
for root in sorted(nodes):
    if root in index:
        continue
    work = [(root, iter(sorted(edges[root])))]
    index[root] = low[root] = counter; counter += 1
    stack.append(root); on_stack.add(root)
    while work:
        v, it = work[-1]
        w = next(it, None)
        if w is not None:
            if w not in index:
                index[w] = low[w] = counter; counter += 1
                stack.append(w); on_stack.add(w)
                work.append((w, iter(sorted(edges[w]))))
            elif w in on_stack:
                low[v] = min(low[v], index[w])
            continue
        work.pop()
        if work:
            low[work[-1][0]] = min(low[work[-1][0]], low[v])
        if low[v] == index[v]:
            scc = set()
            while True:
                w = stack.pop(); on_stack.discard(w); scc.add(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(scc)

def shortest_cycle(start, scc):
    prev, queue = {start: None}, collections.deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(edges[v] & scc):
            if w == start:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return [start] + path[::-1][1:] + [start]
            if w not in prev:
                prev[w] = v
                queue.append(w)

for scc in sorted(sccs, key=lambda s: sorted(map(name, s))):
    covered = set()
    for a in sorted(scc, key=name):
        for b in sorted(edges[a] & scc, key=name):
            if name(a) < name(b) and a in edges[b]:
                print(f"{name(a)} <-> {name(b)}")
                covered.update((a, b))
    for n in sorted(scc - covered, key=name):
        if n not in covered:
            cycle = shortest_cycle(n, scc)
            print(" -> ".join(map(name, cycle)))
            covered.update(cycle)
EOF

flags=(--no-fns --no-types --no-traits --no-owns --layout dot "${sysroot[@]}")
# Generated code, whose own module structure is not ours to change: an edge between two modules inside one of
# these is ignored (edges from or to hand-written modules still count). tonic/prost put a message's oneofs and
# nested messages in a child module that refers back to the parent (`v1::Rendezvous` <-> `v1::rendezvous::Kind`).
generated=(tessera_proto::v1)
cycles=0
errors=0
while IFS=$'\t' read -r pkg kind target; do
  if [ "$kind" = lib ]; then
    select=(--lib)
    label="$pkg (lib)"
  else
    select=(--bin "$target")
    label="$pkg (bin $target)"
  fi
  crate=${target//-/_}
  t0=$SECONDS
  if ! RUST_LIB_BACKTRACE=0 cargo modules dependencies -p "$pkg" "${select[@]}" "${flags[@]}" \
    </dev/null >"$work/graph.dot" 2>"$work/stderr" || ! grep -q '^digraph' "$work/graph.dot"; then
    echo "ERROR  $label: cargo-modules failed:"
    sed 's/^/         /' "$work/stderr" | tail -20
    errors=$((errors + 1))
    continue
  fi
  python3 "$work/cycles.py" "$crate" "${generated[@]}" <"$work/graph.dot" >"$work/found"
  if [ -s "$work/found" ]; then
    echo "CYCLE  $label ($((SECONDS - t0)) s): $(wc -l <"$work/found") module import cycle(s):"
    sed 's/^/         /' "$work/found"
    cycles=$((cycles + 1))
  else
    echo "ok     $label ($((SECONDS - t0)) s)"
  fi
  # rust-analyzer's warnings (a build script that failed, say) would leave the graph incomplete: show them.
  if [ -s "$work/stderr" ]; then
    sed 's/^/         warning: /' "$work/stderr" | tail -20
  fi
done <"$work/targets"

echo "module cycles: $(wc -l <"$work/targets") targets checked in $((SECONDS - start)) s," \
  "$cycles with a cycle, $errors failed"
if [ "$errors" -gt 0 ]; then
  exit 2
fi
if [ "$cycles" -gt 0 ]; then
  exit 1
fi

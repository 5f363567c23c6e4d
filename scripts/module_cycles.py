#!/usr/bin/env python3
"""Module dependency cycles in src/: prints them; exits 1 on any but the allowed one.

A module is a file: `src/a/b.rs` is `a::b`, `src/a/mod.rs` is `a`, `src/lib.rs` is the
crate root, named `lib`. `src/main.rs` is another crate (it uses `warren::`) and is left
out, as is test code (`#[cfg(test)]` items and the files they declare): the graph is
the one the shipped binary is built from.

An edge A -> B means code in A names an item defined in B: a `use` of it, or a path
`crate::…`, `super::…`, `self::…` or `<child module>::…` (also inside attributes such
as `#[utoipa::path(…)]`). A path is resolved to the file that *defines* the item, by
following `pub use` re-exports (and the imports a child may reach through `super::`),
so naming `crate::broker::Broker` is an edge to `broker/channel.rs` if that is where
`mod.rs` re-exports it from. Declaring a module (`mod x;`) and re-exporting an item
(`pub use x::Y;` with no other use of `Y` in the file) are not edges: they are the
module tree, not a dependency.

A cycle is a strongly connected component of more than one file; the edges printed
are the ones inside it. Two kinds of edge are set aside, and only these:

- A file's use of an item its own folder's `mod.rs` (or an enclosing folder's, but
  never `lib`) defines: `mod.rs` is the folder's shared vocabulary (`ConfigError` for
  every config section, `Broker` for the broker's parts), and its files using it while
  `mod.rs` uses them is one module's inside, not a cycle. A use of a name `mod.rs`
  merely re-exports is not set aside: it resolves to the sibling that defines it.
  `--strict` counts these edges too, to see the folders' insides.
- The one cycle allowed: the crate root `lib` holds `App`/`AppState`, which the request
  handlers take as axum state, and `App` holds the handlers' shared state. So edges
  from a file under `api/`, `ws/` or `edge/` to `lib` are set aside. A cycle through
  `lib` on an edge from anywhere else fails.

`--folders` also prints the cycles between the folders of each level (each child
folder one node), for information: they do not change the exit status.

Usage: scripts/module_cycles.py [--src DIR] [--edges] [--strict] [--folders]
"""

import argparse
import os
import re
import sys
from collections import defaultdict

HANDLER_DIRS = ("api", "ws", "edge")
ROOT = "lib"

ITEM_RE = re.compile(
    r"^\s*(?:pub(?:\([^)]*\))?\s+)?(?:unsafe\s+|async\s+|const\s+|extern\s+\"[^\"]*\"\s+)*"
    r"(?:struct|enum|fn|trait|type|const|static|union|mod|macro_rules!)\s+(\w+)",
    re.M,
)
USE_RE = re.compile(r"\b(pub(?:\([^)]*\))?\s+)?use\s+([^;]+);")
PATH_RE = re.compile(r"(?<![\w:])((?:[A-Za-z_]\w*)(?:::[A-Za-z_]\w*)+)")


def strip_comments_and_strings(text):
    """Code with comments, string and char literals blanked (newlines kept)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append("\n" * text.count("\n", i, j))
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:i + 10]) and not (i and (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = re.match(r'r(#*)"', text[i:]).group(1)
            end = text.find('"' + hashes, i + len(hashes) + 2)
            end = n if end < 0 else end + 1 + len(hashes)
            out.append('""' + "\n" * text.count("\n", i, end))
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""' + "\n" * text.count("\n", i, j))
            i = j + 1
        elif c == "'":
            m = re.match(r"'(?:\\u\{[0-9a-fA-F]+\}|\\x[0-9a-fA-F]{2}|\\.|[^\\'\n])'", text[i:])
            if m:
                out.append("' '")
                i += m.end()
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def skip_item(code, i):
    """Index just past the item starting at `i` (through its `;` or its `{…}` block)."""
    n = len(code)
    depth_paren = 0
    while i < n:
        c = code[i]
        if c in "([":
            depth_paren += 1
        elif c in ")]":
            depth_paren -= 1
        elif c == ";" and depth_paren == 0:
            return i + 1
        elif c == "{" and depth_paren == 0:
            depth, j = 1, i + 1
            while j < n and depth:
                if code[j] == "{":
                    depth += 1
                elif code[j] == "}":
                    depth -= 1
                j += 1
            return j
        i += 1
    return n


def strip_test_items(code):
    """Code without `#[cfg(test)]` items; also the names of test-only `mod x;` files."""
    test_mods = set()
    out, pos = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]", code):
        if m.start() < pos:
            continue
        j = m.end()
        # further attributes on the same item
        while True:
            a = re.match(r"\s*#\[", code[j:])
            if not a:
                break
            j = _skip_attr(code, j + a.end() - 2)
        decl = re.match(r"\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;", code[j:])
        if decl:
            test_mods.add(decl.group(1))
        end = skip_item(code, j)
        out.append(code[pos:m.start()])
        out.append("\n" * code.count("\n", m.start(), end))
        pos = end
    out.append(code[pos:])
    return "".join(out), test_mods


def _skip_attr(code, i):
    """`code[i]` is `#`; index past the attribute's closing `]`."""
    depth, j = 0, i + 1
    while j < len(code):
        if code[j] == "[":
            depth += 1
        elif code[j] == "]":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return j


def parse_use_tree(tree):
    """`a::{b, c::d, f::*}` (whitespace removed) -> [[a, b], [a, c, d], [a, f, *]]."""
    tree = re.sub(r"\s+", "", tree)
    results = []

    def walk(prefix, s):
        # split s at top-level commas
        parts, depth, cur = [], 0, ""
        for ch in s:
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
        if cur:
            parts.append(cur)
        for p in parts:
            if "{" in p:
                head, rest = p.split("{", 1)
                head = [x for x in head.split("::") if x]
                walk(prefix + head, rest[: rest.rfind("}")])
            else:
                segs = [x for x in p.split("::") if x]
                if not segs:
                    continue
                results.append(prefix + segs)

    walk([], tree)
    return results


def parse_uses(stmt_text):
    """Parse one use tree keeping `as` aliases (done before whitespace removal)."""
    # mark aliases: `x as y` -> `x@y`
    marked = re.sub(r"(\w|\*)\s+as\s+(\w+)", r"\1@\2", stmt_text)
    out = []
    for segs in parse_use_tree(marked):
        last = segs[-1]
        alias = None
        if "@" in last:
            last, alias = last.split("@", 1)
            segs = segs[:-1] + [last]
        if last == "self":
            segs = segs[:-1]
            name = alias or (segs[-1] if segs else None)
        else:
            name = alias or last
        out.append((segs, name))
    return out


class Module:
    def __init__(self, name, path, code, test_mods):
        self.name = name  # "a::b", or "lib"
        self.path = path
        self.code = code
        self.test_mods = test_mods
        self.defined = set(ITEM_RE.findall(code))
        # inline `mod x { ... }` blocks: (start, end, [x, ...]) for resolving super::
        self.inline = []
        for m in re.finditer(r"\bmod\s+(\w+)\s*\{", code):
            end = skip_item(code, m.end() - 1)
            outer = [names for (s, e, names) in self.inline if s < m.start() < e]
            base = max(outer, key=len) if outer else []
            self.inline.append((m.start(), end, base + [m.group(1)]))
        self.children = set()  # file modules declared here
        self.uses = []  # (is_pub, segs, name, line, inline path)
        for m in USE_RE.finditer(code):
            line = code.count("\n", 0, m.start()) + 1
            inner = self.inline_at(m.start())
            for segs, name in parse_uses(m.group(2)):
                self.uses.append((bool(m.group(1)), segs, name, line, inner))

    def inline_at(self, pos):
        """The inline modules around `pos`, outermost first."""
        around = [names for (s, e, names) in self.inline if s < pos < e]
        return max(around, key=len) if around else []

    @property
    def segs(self):
        return [] if self.name == ROOT else self.name.split("::")


def load(src):
    modules = {}
    excluded = set()
    for dirpath, _, files in os.walk(src):
        for f in sorted(files):
            if not f.endswith(".rs"):
                continue
            full = os.path.join(dirpath, f)
            rel = os.path.relpath(full, src)
            if rel == "main.rs":
                continue
            parts = rel[:-3].split(os.sep)
            if parts[-1] == "mod":
                parts = parts[:-1]
            name = "::".join(parts) if parts != ["lib"] else ROOT
            with open(full, encoding="utf-8") as fh:
                code = strip_comments_and_strings(fh.read())
            code, test_mods = strip_test_items(code)
            modules[name] = Module(name, rel, code, test_mods)
    # drop files only declared under #[cfg(test)]
    for m in modules.values():
        for t in m.test_mods:
            excluded.add("::".join(m.segs + [t]))
    for name in list(modules):
        if name in excluded:
            del modules[name]
    for name, m in modules.items():
        if name != ROOT:
            parent = "::".join(m.segs[:-1]) or ROOT
            if parent in modules:
                modules[parent].children.add(m.segs[-1])
    return modules


class Resolver:
    def __init__(self, modules):
        self.modules = modules

    def module_of(self, segs):
        """Longest prefix of absolute `segs` that is a file module: (module, rest)."""
        for k in range(len(segs), -1, -1):
            name = "::".join(segs[:k]) or ROOT
            if name in self.modules:
                return self.modules[name], segs[k:]
        return None, segs

    def absolute(self, mod, segs, inner=()):
        """Absolute segments of a path written in `mod` (inside its inline modules
        `inner`), or None when it names another crate."""
        if not segs:
            return None
        head = segs[0]
        if head == "crate":
            return segs[1:]
        if head in ("super", "self"):
            base = list(mod.segs) + list(inner)
            i = 0
            while i < len(segs) and segs[i] in ("super", "self"):
                if segs[i] == "super":
                    if not base:
                        return None
                    base = base[:-1]
                i += 1
            return base + segs[i:]
        if head in mod.children:
            return mod.segs + segs
        return None

    def define_site(self, segs, seen=None):
        """The module defining the item `segs` names (absolute), following re-exports."""
        seen = seen if seen is not None else set()
        key = tuple(segs)
        if key in seen:
            return None
        seen.add(key)
        mod, rest = self.module_of(segs)
        if mod is None:
            return None
        if not rest or rest[0] in mod.defined:
            return mod
        item = rest[0]
        # an import of that module: a re-export, or one its children reach via super::
        for _, usegs, name, _, inner in mod.uses:
            if name == item and usegs[-1] != "*":
                target = self.absolute(mod, usegs, inner)
                if target is not None:
                    found = self.define_site(target + rest[1:], seen)
                    if found is not None:
                        return found
        for _, usegs, name, _, inner in mod.uses:
            if name == "*":
                target = self.absolute(mod, usegs[:-1], inner)
                if target is not None:
                    found = self.define_site(target + rest, seen)
                    if found is not None and found.name != self.module_of(target)[0].name:
                        return found
                    if found is not None and rest[0] in found.defined:
                        return found
        return mod


def edges_of(modules):
    """{(a, b): [line, ...]}: module a names an item module b defines."""
    res = Resolver(modules)
    edges = defaultdict(list)

    def add(mod, target, line):
        if target is not None and target.name != mod.name:
            edges[(mod.name, target.name)].append(line)

    for mod in modules.values():
        aliases = {}  # a module imported by name -> its absolute path
        for is_pub, segs, name, line, inner in mod.uses:
            glob = segs[-1] == "*"
            absolute = res.absolute(mod, segs[:-1] if glob else segs, inner)
            if absolute is None:
                continue
            target = res.define_site(absolute)
            if target is None:
                continue
            if glob:
                if not is_pub:
                    add(mod, target, line)
                continue
            if target.segs == absolute:
                aliases[name] = absolute  # its uses are resolved path by path below
                continue
            if is_pub:
                # a re-export is the module tree, unless this file also uses the name
                mentions = re.findall(r"(?<![\w:])" + re.escape(name) + r"\b", mod.code)
                if len(mentions) <= 1:
                    continue
            add(mod, target, line)
        body = USE_RE.sub(lambda m: "\n" * m.group(0).count("\n"), mod.code)
        for m in PATH_RE.finditer(body):
            segs = m.group(1).split("::")
            if segs[0] in aliases:
                absolute = aliases[segs[0]] + segs[1:]
            else:
                absolute = res.absolute(mod, segs, mod.inline_at(m.start()))
            if absolute is None:
                continue
            line = body.count("\n", 0, m.start()) + 1
            add(mod, res.define_site(absolute), line)
    return edges


def sccs(nodes, adj):
    """Tarjan's strongly connected components of more than one node."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(adj[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return [c for c in out if len(c) > 1]


def levels(modules, edges, strict):
    """One graph per folder module F: its own file and its children (a child folder
    collapsed into one node). Yields (F, nodes, {(u, v): [(file a, file b), ...]}).

    At a folder other than the root, an edge from a child to F's own file is set aside
    unless `strict`: a folder's `mod.rs` is the vocabulary its files share."""
    folders = {ROOT} | {"::".join(m.segs[:k]) for m in modules.values() for k in range(1, len(m.segs))}
    for folder in sorted(folders, key=lambda f: (f != ROOT, f)):
        fsegs = [] if folder == ROOT else folder.split("::")
        depth = len(fsegs)

        def unit(name):
            if name == folder:
                return folder
            segs = [] if name == ROOT else name.split("::")
            if segs[:depth] != fsegs or len(segs) <= depth:
                return None
            return "::".join(segs[: depth + 1])

        graph = defaultdict(list)
        for (a, b) in edges:
            ua, ub = unit(a), unit(b)
            if ua is None or ub is None or ua == ub:
                continue
            if ub == folder and folder != ROOT and not strict:
                continue
            graph[(ua, ub)].append((a, b))
        nodes = {u for e in graph for u in e}
        yield folder, nodes, graph


def is_handler(unit):
    return unit.split("::")[0] in HANDLER_DIRS


def ancestors(name):
    """The folder modules a file sits in, nearest first (not the crate root)."""
    segs = [] if name == ROOT else name.split("::")
    return ["::".join(segs[:k]) for k in range(len(segs) - 1, 0, -1)]


def report(title, nodes, graph, allowed, edges, modules):
    """Print the cycles of `graph` ({(u, v): [(file, file), ...]}) once the edges
    `allowed` rejects are set aside, and what the handler -> lib edges add back;
    return how many cycles remain."""
    def adjacency(keep):
        adj = defaultdict(set)
        for (u, v) in graph:
            if keep(u, v):
                adj[u].add(v)
        return adj

    failing = sccs(nodes, adjacency(allowed))
    with_lib = adjacency(lambda u, v: allowed(u, v) or (v == ROOT and is_handler(u)))
    for comp in sccs(nodes, with_lib):
        if not any(set(f) <= set(comp) for f in failing):
            print(f"allowed{title}: {ROOT} <-> the handlers: {', '.join(comp)}")
    for comp in failing:
        members = set(comp)
        print(f"cycle{title}: {' <-> '.join(comp)}")
        for (u, v), pairs in sorted(graph.items()):
            if u in members and v in members and allowed(u, v):
                for a, b in sorted(set(pairs)):
                    lines = ", ".join(str(x) for x in sorted(set(edges[(a, b)]))[:4])
                    print(f"    {a} -> {b}  ({modules[a].path}:{lines})")
    return len(failing)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", default=os.path.join(os.path.dirname(__file__), "..", "src"))
    ap.add_argument("--edges", action="store_true", help="print every file-to-file edge")
    ap.add_argument("--strict", action="store_true",
                    help="also count a file's uses of its own folder's mod.rs items")
    ap.add_argument("--folders", action="store_true",
                    help="also print the cycles between the folders of each level "
                         "(information: they do not change the exit status)")
    args = ap.parse_args()

    modules = load(args.src)
    edges = edges_of(modules)
    if args.edges:
        for (a, b), lines in sorted(edges.items()):
            print(f"{a} -> {b}  ({modules[a].path}:{lines[0]})")
        print()

    def allowed(a, b):
        if b == ROOT:
            return not is_handler(a)  # lib <-> the handlers
        return args.strict or b not in ancestors(a)  # a folder's own vocabulary

    graph = {(a, b): [(a, b)] for (a, b) in edges}
    failures = report("", set(modules), graph, allowed, edges, modules)

    if args.folders:
        for folder, nodes, fgraph in levels(modules, edges, args.strict):
            where = "crate" if folder == ROOT else folder
            report(f" (folders in {where})", nodes, fgraph,
                   lambda u, v: not (v == ROOT and is_handler(u)), edges, modules)

    if failures:
        print(f"{failures} module cycle(s) besides {ROOT} <-> the handlers.")
        return 1
    print(f"No module cycle besides {ROOT} <-> the handlers "
          f"({len(modules)} files, {len(edges)} edges).")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Runs the command examples of README.md and of the book (docs/src, in SUMMARY.md
order) against a real Warren, as a newcomer would type them. Called by
scripts/docs-examples.sh, which starts the services and builds the binary first.

Which blocks run:
  ```sh               run; the block must exit 0
  ```sh expect-error  run; the block must fail (e.g. curl --fail-with-body on a 4xx)
  anything else       (console, text, toml, json, js, python, ...) shown, not run
The README's first block (the two commands, scripts/run-dev.sh and scripts/test.sh)
is what a developer and CI run themselves, so it is skipped.

How they run, in one temporary directory:
  1. README.md against a dev-mode gateway this script starts (`warren serve`, the
     newcomer's scripts/run-dev.sh); `TOKEN` is taken from the `export TOKEN=` line it
     prints, as the README says to paste it. The gateway is stopped afterwards (the
     newcomer's Ctrl-C before Getting started).
  2. Every page of the book, in order, in one bash, so that what Getting started
     starts (its gateway, its push receiver) and exports serves the later guides.
Each part is one `bash -e -o pipefail` script. `curl` is a function that adds
--fail-with-body unless the command already says --fail/-f, so an HTTP error fails
the example. The ports of the examples (8080 for the gateway, 9999 for the push
receiver) are replaced by free ones, so nothing on this machine's 8080 is disturbed.
`warren` is the debug binary ($CARGO_TARGET_DIR/debug on PATH). Whatever an example leaves
running is killed at the end of its part. Exits 1 naming the failing block.

    python3 scripts/docs_examples.py [--keep]     # --keep: leave the directory
"""
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
BOOK = ROOT / "docs/src"
FENCE = re.compile(r"^```(\S*)\s*(.*)$")
TIMEOUT_S = 600


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def blocks(path):
    """(line, info, text) of every fenced block of a page, top level or indented."""
    found = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        stripped = lines[i].lstrip()
        indent = len(lines[i]) - len(stripped)
        match = FENCE.match(stripped)
        if match and stripped != "```":
            start, info = i + 1, f"{match.group(1)} {match.group(2)}".strip()
            body = []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i][indent:])
                i += 1
            found.append((start, info, "\n".join(body) + "\n"))
        i += 1
    return found


def book_pages():
    summary = (BOOK / "SUMMARY.md").read_text(encoding="utf-8")
    return [BOOK / target for target in re.findall(r"\]\(([^)#]+\.md)\)", summary)]


CURL = r'''curl() {
  local arg
  for arg in "$@"; do
    if [[ $arg == --fail* || $arg =~ ^-[a-zA-Z]*f[a-zA-Z]*$ ]]; then
      command curl "$@"
      return
    fi
  done
  command curl --fail-with-body "$@"
}
'''


def script(pages, ports, skip_first=False):
    parts = ["set -eo pipefail", CURL]
    count = 0
    for page in pages:
        for index, (line, info, text) in enumerate(blocks(page)):
            words = info.split()
            if not words or words[0] != "sh" or (skip_first and index == 0):
                continue
            if set(words[1:]) - {"expect-error"}:
                sys.exit(f"{page.relative_to(ROOT)}:{line}: unknown block attribute {info!r}")
            for old, new in ports.items():
                text = text.replace(old, new)
            where = f"{page.relative_to(ROOT)}:{line}"
            parts.append(f"printf '\\n== %s\\n' '{where}'")
            if "expect-error" in words:
                parts.append(
                    f"if ( set -e\n{text}); then echo 'FAILED {where}: "
                    "the block was expected to fail and did not' >&2; exit 1; fi"
                )
            else:
                parts.append(text)
            count += 1
    return "\n".join(parts) + "\n", count


def run_part(name, text, work, env):
    path = work / f"{name}.sh"
    path.write_text(text)
    started = time.monotonic()
    proc = subprocess.Popen(["bash", str(path)], cwd=work, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(f"FAILED {name}: still running after {TIMEOUT_S} s", file=sys.stderr)
        rc = 1
    finally:
        kill_group(proc)
    print(f"-- {name}: exit {rc} in {time.monotonic() - started:.1f} s")
    return rc


def kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(50):
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def ready(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def start_dev_gateway(port, work, env):
    """`warren serve` in dev mode; returns the process and the token it printed."""
    log = open(work / "dev-gateway.log", "w+")
    proc = subprocess.Popen(
        ["warren", "serve", "--listen", f"127.0.0.1:{port}"],
        cwd=work, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        match = re.match(r"export TOKEN=(\S+)", line)
        if match:
            # The banner comes before the broker link is up; a newcomer pasting the
            # token takes longer than that, so wait as long as they would, for /readyz.
            while time.monotonic() < deadline:
                if ready(port):
                    return proc, match.group(1)
                time.sleep(0.2)
            break
        if time.monotonic() > deadline:
            break
    kill_group(proc)
    log.seek(0)
    sys.exit(f"the dev-mode gateway printed no token:\n{log.read()}")


def main():
    keep = "--keep" in sys.argv[1:]
    work = pathlib.Path(tempfile.mkdtemp(prefix="warren-docs-"))
    port, hook_port = free_port(), free_port()
    ports = {
        "127.0.0.1:8080": f"127.0.0.1:{port}",
        "localhost:8080": f"localhost:{port}",
        "127.0.0.1:9999": f"127.0.0.1:{hook_port}",
        '"127.0.0.1", 9999': f'"127.0.0.1", {hook_port}',
    }
    env = dict(os.environ)
    target = pathlib.Path(env.get("CARGO_TARGET_DIR") or ROOT / "target")
    env["PATH"] = f"{(ROOT / target).resolve() / 'debug'}:{env['PATH']}"
    env.pop("TOKEN", None)
    # A config from the environment would change what the examples mean.
    for key in [k for k in env if k.startswith("WARREN_") and "__" in k]:
        del env[key]

    failed = False
    readme, readme_count = script([ROOT / "README.md"], ports, skip_first=True)
    book, book_count = script(book_pages(), ports)
    print(f"docs examples: {readme_count} README blocks, {book_count} book blocks, in {work}")

    gateway, token = start_dev_gateway(port, work, env)
    try:
        failed |= run_part("readme", readme, work, {**env, "TOKEN": token}) != 0
    finally:
        kill_group(gateway)
        gateway.wait()
    if not failed:
        failed |= run_part("book", book, work, env) != 0

    if failed:
        print(f"docs examples FAILED (scripts and logs in {work})", file=sys.stderr)
        return 1
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    print("docs examples: every block ran as documented")
    return 0


if __name__ == "__main__":
    sys.exit(main())

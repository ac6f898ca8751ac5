"""Shared helpers for the torchrun tests: the environment of a 2-process gloo job, and a probe of what a rank
still runs when it exits."""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Imported by every process of the job (sitecustomize): at exit, after main returned and every atexit handler
# registered later has run, a rank writes the names of its native threads. The process group's gloo threads must
# be gone by then: if anything still holds the group, they run into interpreter teardown and the rank aborts now
# and then ("terminate called without an active exception").
EXIT_PROBE = """
import atexit, json, os
def _write_threads():
    rank = os.environ.get("RANK")
    if rank is None:
        return  # the torchrun agent
    task = f"/proc/{os.getpid()}/task"
    names = []
    for tid in os.listdir(task):
        try:
            with open(f"{task}/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass  # a thread that ended meanwhile
    with open(os.path.join(os.environ["SAE_TOOLKIT_EXIT_PROBE"], f"threads-at-exit.{rank}.json"), "w") as f:
        json.dump(names, f)
atexit.register(_write_threads)
"""


def torchrun_env(probe_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a test's torchrun job: this checkout importable, one thread per rank, no bars, Python
    stacks on a fatal signal, and the exit probe writing into `probe_dir`."""
    probe = probe_dir / "exit-probe"
    probe.mkdir(parents=True, exist_ok=True)
    (probe / "sitecustomize.py").write_text(EXIT_PROBE)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(probe)]), "OMP_NUM_THREADS": "1",
            "TQDM_DISABLE": "1", "PYTHONFAULTHANDLER": "1", "SAE_TOOLKIT_EXIT_PROBE": str(probe_dir), **extra}


def threads_at_exit(probe_dir: Path, world: int = 2) -> dict[int, list[str]]:
    """{rank: native thread names} as each rank exited (see EXIT_PROBE)."""
    return {r: json.loads((probe_dir / f"threads-at-exit.{r}.json").read_text()) for r in range(world)}


def assert_process_group_ended(probe_dir: Path, world: int = 2) -> None:
    left = {r: [n for n in names if "gloo" in n] for r, names in threads_at_exit(probe_dir, world).items()}
    assert left == {r: [] for r in range(world)}, f"gloo threads still running at exit: {left}"

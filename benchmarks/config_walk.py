"""The run config's walk from `vlajax train` to the first update: which vlajax modules it passes
through, in call order, and how often it goes back up a floor.

    python benchmarks/config_walk.py [overrides ...]

A call "carries the config" when one of its arguments (or `self`) is a config section
(`vlajax.config._Section`: the RunConfig or any part of it). Such a call from one vlajax module into
another is a move (each caller -> callee pair counted once); a move to a higher floor (below) is a climb. Floors, low to high: components
(model, envs, data) 0; rl, distributed 1; config.py 2; what the commands share (session, states, resume,
metrics) 3; the commands (train, sft, evaluate, demos) 4; cli 5. Stops at the first `Learner.update`.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1] / "vlajax")
FLOORS = {"model": 0, "envs": 0, "data": 0, "rl": 1, "distributed": 1, "config": 2, "session": 3, "states": 3,
          "resume": 3, "metrics": 3, "compile_meter": 3, "eval_report": 3, "train": 4, "sft": 4, "evaluate": 4,
          "demos": 4, "cli": 5}


class Done(Exception):
    pass


def module_of(filename: str) -> str:
    rel = Path(filename).resolve().relative_to(ROOT)
    return str(rel.with_suffix("")).replace("/", ".")


def floor_of(module: str) -> int:
    return FLOORS.get(module.split(".")[0], 3)


def main() -> None:
    from vlajax import config as C
    from vlajax.cli import main as cli_main

    section = C._Section  # noqa: SLF001 - the config's own base class
    walk: list[tuple[str, str]] = []  # (caller module, callee module), first occurrence order

    def hook(frame, event, arg):
        if event != "call":
            return
        fn = frame.f_code.co_filename
        if not fn.startswith(ROOT):
            return
        if frame.f_code.co_name == "update" and fn.endswith("rl/learner.py"):
            raise Done
        if any(isinstance(v, section) for v in frame.f_locals.values()):
            caller = frame.f_back
            while caller is not None and not caller.f_code.co_filename.startswith(ROOT):
                caller = caller.f_back  # through library frames (functools, dataclasses) to vlajax's
            if caller is not None:
                a, b = module_of(caller.f_code.co_filename), module_of(fn)
                if a != b and (a, b) not in walk:
                    walk.append((a, b))

    sys.setprofile(hook)
    try:
        cli_main(["train", *sys.argv[1:]])
    except Done:
        pass
    finally:
        sys.setprofile(None)
    climbs = [(a, b) for a, b in walk if floor_of(b) > floor_of(a)]
    for a, b in walk:
        print(f"  {a} -> {b}" + ("   (climb)" if (a, b) in climbs else ""))
    print(f"moves {len(walk)}, climbs {len(climbs)}, "
          f"enters config.py from {sum(b == 'config' for _, b in walk)} modules")


if __name__ == "__main__":
    main()

"""The run config's walk from `vlajax train` to the first update: which vlajax modules it passes
through, in call order, and how often it goes back up a floor.

    python benchmarks/config_walk.py [overrides ...]

A call "carries the config" when one of its arguments (or `self`) is a config section
(`vlajax.config._Section`: the RunConfig or any part of it). Such a call from one vlajax module into
another is a move. Two counts:
- pairs: each caller module -> callee module pair once;
- call sites: each (caller file:line -> callee function) once, which is how a reader walking the code meets them.
A move to a higher floor is a climb. Floors, low to high: components (model, envs, data) 0; rl,
distributed 1; config.py 2; what the commands share (session, states, resume, metrics, ...) 3; the
commands (train, sft, evaluate, demos) 4; cli 5. Stops at the first `Learner.update`. Runs against
whatever `vlajax` is importable, so an older checkout can be measured with PYTHONPATH.
"""

from __future__ import annotations

import sys
from pathlib import Path

FLOORS = {"model": 0, "envs": 0, "data": 0, "rl": 1, "distributed": 1, "config": 2, "train": 4, "sft": 4,
          "evaluate": 4, "demos": 4, "cli": 5}  # anything else directly under vlajax/: 3


class Done(Exception):
    pass


def main() -> None:
    import vlajax
    from vlajax import config as C
    from vlajax.cli import main as cli_main

    root = str(Path(vlajax.__file__).resolve().parent)

    def module_of(filename: str) -> str:
        return str(Path(filename).resolve().relative_to(root).with_suffix("")).replace("/", ".")

    def floor_of(module: str) -> int:
        return FLOORS.get(module.split(".")[0], 3)

    section = C._Section  # noqa: SLF001 - the config's own base class
    pairs: list[tuple[str, str]] = []  # (caller module, callee module), first occurrence order
    sites: list[tuple[str, str, str]] = []  # (caller module:line, callee module, callee function)

    def hook(frame, event, arg):
        if event != "call":
            return
        fn = frame.f_code.co_filename
        if not fn.startswith(root):
            return
        if frame.f_code.co_name == "update" and fn.endswith("rl/learner.py"):
            raise Done
        if frame.f_code.co_name.startswith("__") and frame.f_code.co_name != "__init__":
            return  # attribute reads and other dunders of the sections: reading a key is not a move
        if any(isinstance(v, section) for v in frame.f_locals.values()):
            caller = frame.f_back
            while caller is not None and not caller.f_code.co_filename.startswith(root):
                caller = caller.f_back  # through library frames (functools, dataclasses) to vlajax's
            if caller is not None:
                a, b = module_of(caller.f_code.co_filename), module_of(fn)
                if a != b:
                    if (a, b) not in pairs:
                        pairs.append((a, b))
                    site = (f"{a}:{caller.f_lineno}", b, frame.f_code.co_name)
                    if site not in sites:
                        sites.append(site)

    sys.setprofile(hook)
    try:
        cli_main(["train", *sys.argv[1:]])
    except Done:
        pass
    finally:
        sys.setprofile(None)

    def climb(a: str, b: str) -> bool:
        return floor_of(b) > floor_of(a.split(":")[0])

    print("call sites:")
    for a, b, f in sites:
        print(f"  {a} -> {b}.{f}" + ("   (climb)" if climb(a, b) else ""))
    n_pair_climbs = sum(climb(a, b) for a, b in pairs)
    n_site_climbs = sum(climb(a, b) for a, b, _ in sites)
    print(f"pairs: moves {len(pairs)}, climbs {n_pair_climbs}, "
          f"modules that enter config.py {sum(b == 'config' for _, b in pairs)}")
    print(f"call sites: moves {len(sites)}, climbs {n_site_climbs}, "
          f"entries into config.py {sum(b == 'config' for _, b, _ in sites)}")


if __name__ == "__main__":
    main()

"""Run every asv benchmark once, in this process, on small inputs (NUMBABN_BENCH_SMALL=1).

asv would start one process per benchmark (minutes, each importing TensorFlow); this
walks the same classes, setup_cache, params, setup and methods directly. Prints one JSON
line: the benchmarks run, the classes whose setup declined (NotImplementedError) with
why, and every benchmark class found.
"""

import importlib
import inspect
import itertools
import json
import os
import sys
from pathlib import Path

os.environ["NUMBABN_BENCH_SMALL"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PREFIXES = ("time_", "track_", "peakmem_", "mem_")


def main():
    ran, declined, classes = [], {}, []
    for path in sorted(Path("benchmarks").glob("bench_*.py")):
        module = importlib.import_module(f"benchmarks.{path.stem}")
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__:
                continue
            methods = [m for m in dir(cls) if m.startswith(PREFIXES)]
            if not methods:
                continue
            classes.append(f"{path.stem}.{cls_name}")
            params = getattr(cls, "params", [])
            if params and not isinstance(params[0], (list, tuple)):
                params = [params]
            # asv runs setup_cache once; its result, unless None, leads every call's args
            cached = (cls().setup_cache(),) if hasattr(cls, "setup_cache") else ()
            cached = tuple(c for c in cached if c is not None)
            for combo in itertools.product(*params) if params else [()]:
                obj, args = cls(), cached + tuple(combo)
                try:
                    if hasattr(obj, "setup"):
                        obj.setup(*args)
                except NotImplementedError as exc:
                    declined[f"{path.stem}.{cls_name}{combo}"] = str(exc)
                    continue
                for name in methods:
                    getattr(obj, name)(*args)
                    ran.append(f"{path.stem}.{cls_name}.{name}{combo}")
                if hasattr(obj, "teardown"):
                    obj.teardown(*args)
    print(json.dumps({"ran": ran, "declined": declined, "classes": classes}))


if __name__ == "__main__":
    main()

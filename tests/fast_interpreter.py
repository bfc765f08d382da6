"""A faster Triton interpreter for the tests and ``benchmarks/gpu_check.py --dry``.

Triton's interpreter patches ``triton.language`` (``inspect.getmembers`` over it) when a kernel
is launched, and again on every call of a ``@triton.jit`` helper inside it. Our kernels call
helpers per tile, and the repeats took 20-40% of interpreted time (measured on triton 3.8;
3.9's interpreter patches the same way).
:func:`install` skips a repeat where the launch has already patched the same language modules
(their patches stay until the launch returns). The kernels' arithmetic is untouched.
"""

from __future__ import annotations

import inspect
import runpy
import sys
from pathlib import Path


def install() -> None:
    """Skip the repeated patches from now on in this process. A no-op where the interpreter's
    internals are not the ones this was written against."""
    from triton.runtime import interpreter

    executor = getattr(interpreter, "GridExecutor", None)
    patch = getattr(interpreter, "_patch_lang", None)
    scope = getattr(interpreter, "_LangPatchScope", None)
    device_fn = getattr(interpreter, "InterpretedFunction", None)
    if not (executor and patch and scope and device_fn
            and "_patch_lang(self.fn)" in inspect.getsource(device_fn.__call__)):
        return
    import triton.language as tl

    launch = {"patched": None}  # the language modules the running launch patched; None: none runs

    def patch_once(fn):
        langs = {id(value) for value in fn.__globals__.values() if value is tl or value is tl.core}
        patched = launch["patched"]
        if patched is not None:
            if langs <= patched:
                return scope()
            patched |= langs
        return patch(fn)

    run = executor.__call__

    def run_and_unpatch(self, *args, **kwargs):
        launch["patched"] = set()
        try:
            return run(self, *args, **kwargs)
        finally:
            launch["patched"] = None

    interpreter._patch_lang = patch_once
    executor.__call__ = run_and_unpatch


if __name__ == "__main__":  # python fast_interpreter.py SCRIPT ARGS...: run SCRIPT with it
    install()
    sys.argv = sys.argv[1:]
    sys.path[0] = str(Path(sys.argv[0]).resolve().parent)
    runpy.run_path(sys.argv[0], run_name="__main__")

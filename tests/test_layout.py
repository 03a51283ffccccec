"""The core does not need the image application's dependencies (the ``images`` extra).

Each test runs a fresh interpreter in which the extra's packages are absent: a
``sys.meta_path`` wrapper makes every finder find nothing for them, so ``import`` raises
``ModuleNotFoundError`` and ``importlib.util.find_spec`` returns ``None``, as when they are
not installed. ArviZ, a core dependency, imports matplotlib itself; it is imported first
and matplotlib's modules are then dropped from ``sys.modules``, so any later import of
matplotlib (by pyro_lpc) meets the blocker.
"""
import subprocess
import sys

EXTRA = ("matplotlib", "sklearn", "torchmetrics", "prdc")

BLOCKER = f"""
import sys
import arviz  # noqa: F401 (a core dependency that needs matplotlib itself)

BLOCKED = {EXTRA!r}


class Absent:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        return self.finder.find_spec(name, path, target)

    def invalidate_caches(self):
        getattr(self.finder, "invalidate_caches", lambda: None)()


for name in [m for m in sys.modules if m.partition(".")[0] in BLOCKED]:
    del sys.modules[name]
sys.meta_path[:] = [Absent(f) for f in sys.meta_path]
try:
    import matplotlib  # noqa: F401
    raise SystemExit("the blocker let matplotlib through")
except ModuleNotFoundError:
    pass
"""


def run(code):
    return subprocess.run([sys.executable, "-c", BLOCKER + code], capture_output=True, text=True, timeout=300)


def test_core_modules_import_without_the_images_extra():
    out = run("""
import importlib, pkgutil
import pyro_lpc

core = [m.name for m in pkgutil.iter_modules(pyro_lpc.__path__) if not m.ispkg and m.name != "__main__"]
for name in core:
    importlib.import_module("pyro_lpc." + name)
assert not [m for m in sys.modules if m.startswith("pyro_lpc.images")], "the core imported pyro_lpc.images"
print(" ".join(sorted(core)))
""")
    assert out.returncode == 0, out.stderr
    imported = set(out.stdout.split())
    assert {"langevin", "potential", "kernel", "warm_start", "fit", "checkpoint", "distributed", "baselines",
            "diagnostics", "marginal_likelihood", "schedule", "compiled"} <= imported


def test_image_application_without_the_extra_names_it():
    out = run("""
try:
    import pyro_lpc.images.cli  # noqa: F401
except ImportError as error:
    print(error)
else:
    raise SystemExit("pyro_lpc.images.cli imported without the images extra")
""")
    assert out.returncode == 0, out.stderr
    assert 'pip install "pyro-lpc[images]"' in out.stdout
    assert "matplotlib, scikit-learn, torchmetrics, prdc" in out.stdout

"""Builds the C++ block allocator with its Makefile as part of every install.

``pip install .`` copies ``libblockmanager.so`` into the wheel; ``pip install -e .`` builds it in
place, next to the Python file that loads it. Everything else lives in pyproject.toml.
"""
import shutil
import subprocess
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

MEMORY_DIR = Path(__file__).resolve().parent / "pagedattention" / "memory"
LIBRARY = "libblockmanager.so"


class BuildPyWithBlockManager(build_py):
    def run(self):
        subprocess.run(["make", "-C", str(MEMORY_DIR), LIBRARY], check=True)
        super().run()
        if not self.editable_mode:  # an editable install loads the library from the source tree
            target = Path(self.build_lib) / "pagedattention" / "memory"
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(MEMORY_DIR / LIBRARY, target / LIBRARY)


class BinaryDistribution(Distribution):
    """The wheel holds a compiled library, so it is tagged for this platform, not 'any'."""

    def has_ext_modules(self):
        return True


setup(cmdclass={"build_py": BuildPyWithBlockManager}, distclass=BinaryDistribution)

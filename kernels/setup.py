"""Builds mixtral_kernels._ext with CMake against the installed mlx (mlx.extension, as mlx's
examples/extensions). A machine without a C++ compiler, or a Mac (where Metal runs the model), gets
the package without its module: the model then runs on MLX's own kernels and says so."""

import shutil
import sys
from pathlib import Path

from setuptools import setup

try:
    from mlx import extension
except ImportError:  # a build environment without mlx (should not happen: pyproject.toml requires it)
    extension = None


def cmdclass():
    if extension is None:
        return {}

    class OptionalBuild(extension.CMakeBuild):
        def run(self):
            # Nothing from an earlier build: its CMake cache names another build env, its module another mlx.
            shutil.rmtree(self.build_temp, ignore_errors=True)
            for ext in self.extensions:
                Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
            try:
                super().run()
            except Exception as e:  # no compiler, no cmake: install what we can
                print(
                    f"warning: mixtral_kernels: the fast CPU kernels were not built ({e}); the model will run on "
                    "MLX's own kernels. Install a C++ compiler, then pip install ./kernels again.",
                    file=sys.stderr,
                )

    return {"build_ext": OptionalBuild}


build = extension is not None and sys.platform.startswith("linux")
setup(
    packages=["mixtral_kernels"],
    ext_modules=[extension.CMakeExtension("mixtral_kernels._ext")] if build else [],
    cmdclass=cmdclass(),
    package_data={"mixtral_kernels": ["*.so"]},
    zip_safe=False,
)

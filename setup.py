"""Build and metadata for linattn.

The native module linattn._C is built by CMake + ninja (CMakeLists.txt) through the build_ext
below; it does not compile against torch, so torch is a runtime dependency only.

Environment knobs for the native build:
  LINATTN_NATIVE_ARCH=0   compile for the compiler's default instruction set instead of
                          -march=native (needed for a wheel or image that runs on other CPUs)
  LINATTN_BUILD_TYPE      CMake build type (default Release; `build_ext --debug` gives Debug)

A failed native build fails the installation: a user who installs linattn from source asked for
the kernels. (A copy of the package whose module is missing still imports and runs on the
reference backend; linattn.backends() reports why the kernels are unavailable.)
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _version() -> str:
    # Read, not imported: importing linattn needs torch, which the build does not.
    text = (ROOT / "linattn" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE).group(1)


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in ("1", "on", "true", "yes"):
        return True
    if value.lower() in ("0", "off", "false", "no"):
        return False
    raise ValueError(f"{name}={value!r}: expected 0/1, on/off, true/false or yes/no")


def _require_tool(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"linattn: `{name}` was not found on PATH; {hint}")
    return path


class CMakeExtension(Extension):
    """An extension whose sources CMake compiles; setuptools only places the result."""

    def __init__(self, name: str, source_dir: Path):
        super().__init__(name, sources=[])
        self.source_dir = source_dir


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            super().build_extension(ext)
            return
        import pybind11  # a build requirement (pyproject.toml), so only here

        cmake = _require_tool("cmake", "pip install cmake (a build requirement in pyproject.toml)")
        ninja = _require_tool("ninja", "pip install ninja (a build requirement in pyproject.toml)")
        module_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        module_path.parent.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / "cmake"
        config = "Debug" if self.debug else os.environ.get("LINATTN_BUILD_TYPE", "Release")
        on_off = lambda flag: "ON" if flag else "OFF"  # noqa: E731
        configure = [
            cmake, "-S", str(ext.source_dir), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DLINATTN_MODULE_DIR={module_path.parent}",
            f"-DLINATTN_MODULE_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
            f"-DLINATTN_NATIVE_ARCH={on_off(_env_flag('LINATTN_NATIVE_ARCH', True))}",
        ]
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--config", config], check=True)
        if not module_path.exists():
            raise RuntimeError(f"linattn: the CMake build finished but produced no "
                               f"{module_path.name} in {module_path.parent}")

    def run(self) -> None:
        super().run()
        if not self.inplace:  # editable installs already place the module in the source tree
            self._mirror_into_source_tree()

    def _mirror_into_source_tree(self) -> None:
        """Put the built module beside the package sources too.

        `python -m pytest tests/` and `python -m linattn.demo`, run from the repository root (as
        README.md and .ci/run do), put the current directory first on sys.path: they import
        this source tree, not the installed copy, and without the module here they would run
        without the kernels. The file is ignored by git (*.so)."""
        for ext in self.extensions:
            target = ROOT / self.get_ext_filename(ext.name)
            if target.parent.is_dir():
                self.copy_file(self.get_ext_fullpath(ext.name), str(target))

    def copy_file(self, infile, outfile, *args, **kwargs):
        """Replace the module file instead of overwriting it in place.

        Editable installs copy the built module into the source tree; writing over a shared
        library that a running process has mapped can crash that process, while a rename
        leaves it on the old file."""
        if str(outfile).endswith(("/", os.sep)) or os.path.isdir(outfile):
            outfile = os.path.join(outfile, os.path.basename(infile))
        tmp = f"{outfile}.tmp{os.getpid()}"
        shutil.copy2(infile, tmp)
        os.replace(tmp, outfile)
        return outfile, True


# diffusers, pinned exactly and only where it is used: linattn.dit (convert, load_converted,
# the per-family selectors and processors) copies internals of diffusers 0.42.1's video
# transformers (attention processors, dispatch), which other releases change. The op, the
# feature maps and LinearAttention never import it.
DIT_REQUIRES = ["diffusers==0.42.1"]
# accelerate: diffusers' from_pretrained refuses to load a model that keeps modules in float32
# (Wan) without it ("low_cpu_mem_usage cannot be False ..."), so train's model.pretrained needs it.
TRAIN_REQUIRES = [*DIT_REQUIRES, "transformers>=5", "sentencepiece", "matplotlib",
                  "accelerate>=1.1"]
# Triton is not a requirement: torch's CUDA wheels bring the Triton each release was built
# with (and pin it), and linattn uses that one, so installing linattn never replaces it.
# README.md says which versions the kernels are tested with. The test extra asks for a tested
# one because CPU-only torch wheels bring none and the tests run the Triton kernels in
# Triton's interpreter; Triton wheels exist for Linux only.
TESTED_TRITON = "triton>=3.6,<3.7; platform_system == 'Linux'"

setup(
    name="linattn",
    version=_version(),
    description="Fast non-causal linear attention for video diffusion transformers",
    packages=find_packages(include=["linattn", "linattn.*"]),
    python_requires=">=3.11",  # linattn.train reads TOML configs with the stdlib tomllib
    install_requires=[
        "torch>=2.4",  # torch.library.custom_op
        "numpy",
        "pyyaml",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        "dit": DIT_REQUIRES,
        "train": TRAIN_REQUIRES,
        "test": ["pytest>=8", "pytest-benchmark>=4", TESTED_TRITON, *TRAIN_REQUIRES],
    },
    entry_points={"console_scripts": ["linattn = linattn.train.cli:main"]},
    package_data={"linattn.train": ["configs/*.yaml"],
                  # The trained toy teacher and its classifier (a few MB), loaded offline.
                  "linattn.toy": ["weights/*.json", "weights/*.safetensors", "weights/teacher/*"]},
    ext_modules=[CMakeExtension("linattn._C", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)

"""Packaging that installs beside a user's torch (issue 10, item 5).

* The core requirements ask for no Triton: torch's CUDA wheels pin their own, and an install of
  linattn must leave it alone. Checked on the metadata setup.py produces, and with pip's own
  resolver (offline): installing linattn together with a torch that pins a different Triton
  resolves to that torch's Triton.
* diffusers is pinned only in the extras that need it, and the op never imports it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reqs(tmp_path_factory) -> dict[str, list[str]]:
    """{extra or "": [requirement, ...]} from the metadata setup.py writes (no build)."""
    folder = tmp_path_factory.mktemp("egg")
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(folder)],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    text = (folder / "linattn.egg-info" / "requires.txt").read_text()
    sections, current = {"": []}, ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1].split(":")[0]
            sections.setdefault(current, [])
        elif line:
            sections[current].append(line)
    return sections


def names(reqs: list[str]) -> set[str]:
    return {r.split(";")[0].split("=")[0].split("<")[0].split(">")[0].strip() for r in reqs}


def test_core_requirements_leave_triton_and_diffusers_to_others(reqs):
    assert "triton" not in names(reqs[""]), reqs[""]
    assert "diffusers" not in names(reqs[""]), reqs[""]
    assert "torch>=2.4" in reqs[""]
    for extra in ("dit", "train", "test"):
        assert "diffusers==0.42.1" in reqs[extra], (extra, reqs[extra])
    # The test extra asks for a tested Triton (CPU-only torch wheels bring none).
    tested = [r for r in reqs["test"] if r.startswith("triton")]
    assert tested and ">=" in tested[0] and "<" in tested[0], reqs["test"]


def _stub_wheel(folder: Path, name: str, version: str, requires: list[str] = ()) -> None:
    """A wheel that holds nothing but its metadata: enough for pip's resolver."""
    dist = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    wheel = "Wheel-Version: 1.0\nGenerator: linattn-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as zf:
        zf.writestr(f"{dist}/METADATA", metadata)
        zf.writestr(f"{dist}/WHEEL", wheel)
        zf.writestr(f"{dist}/RECORD", "")


def _pip_environment() -> dict[str, str]:
    """This machine's environment without pip's settings: no configured indexes, wheel folders
    or constraints (a machine's pip.conf may cap torch's version), so that only the stub wheels
    are seen. PIP_CONFIG_FILE=os.devnull is pip's documented way to load no config file."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def test_pip_keeps_the_triton_a_different_torch_pins(reqs, tmp_path):
    """pip's resolver, offline: linattn beside a torch that pins Triton 3.5.1 (a release other
    than the one tested here) installs that Triton, not another one."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _stub_wheel(wheels, "torch", "99.0", ["triton==3.5.1; platform_system == 'Linux'"])
    for version in ("3.5.1", "3.6.0", "3.8.0"):
        _stub_wheel(wheels, "triton", version)
    for name in names(reqs[""]) - {"torch"}:
        _stub_wheel(wheels, name, "999.0")
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-index",
         "--find-links", str(wheels), "--no-build-isolation", "--quiet", "--report",
         str(report), "torch==99.0", str(ROOT)],
        capture_output=True, text=True, timeout=300, env=_pip_environment())
    assert result.returncode == 0, result.stderr[-3000:]
    installed = {item["metadata"]["name"]: item["metadata"]["version"]
                 for item in json.loads(report.read_text())["install"]}
    assert installed["linattn"] and installed["torch"] == "99.0"
    if sys.platform.startswith("linux"):
        assert installed["triton"] == "3.5.1", installed
    assert "diffusers" not in installed


def test_the_op_runs_without_diffusers():
    """`import linattn` and the op (forward, backward, the module) with diffusers unimportable;
    nothing on the way imports it."""
    script = textwrap.dedent("""
        import importlib.abc, sys

        class NoDiffusers(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "diffusers" or name.startswith("diffusers."):
                    raise ImportError("diffusers is not installed here")
                return None

        sys.meta_path.insert(0, NoDiffusers())
        import torch, linattn
        q = torch.randn(2, 9, 2, 16, requires_grad=True)
        out = linattn.linear_attention(q, q, q, key_padding_mask=torch.rand(2, 9) < 0.7)
        out.sum().backward()
        attention = linattn.LinearAttention(num_heads=2, head_dim=16, feature_map="hedgehog")
        attention(q, q, q).sum().backward()
        assert not any(m == "diffusers" or m.startswith("diffusers.") for m in sys.modules)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@pytest.mark.parametrize("path", ["README.md", "setup.py", "CMakeLists.txt"])
def test_no_cuda_backend_is_advertised(path):
    """The cuda backend had no kernels: neither it nor a CUDA build step is mentioned."""
    text = (ROOT / path).read_text()
    for phrase in ('"cuda"', "`cuda`", "csrc/cuda", "nvcc", "LINATTN_CUDA"):
        assert phrase not in text, f"{path} still mentions {phrase}"

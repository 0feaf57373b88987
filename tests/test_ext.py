"""Which implementation `ext` picks for each C core module, and that it says so."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ext

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("_reqtable", "_frames", "_codec", "_pages", "_actiontable")
BUILT = {name: importlib.util.find_spec(f"ext.{name}") is not None for name in MODULES}

_PROBE = """
import json, sys, warnings
{prelude}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import ext
print(json.dumps({{
    "using_c": ext.USING_C,
    "modules": sorted(ext.IMPLEMENTATIONS.values()),
    "table": ext.RequestTable.__module__,
    "warnings": [w.category.__name__ for w in caught],
}}))
"""


def _import_ext(pure: str | None, prelude: str = "") -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MTSERVE_PUREPYTHON"}
    if pure is not None:
        env["MTSERVE_PUREPYTHON"] = pure
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE.format(prelude=prelude)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(proc.stdout)


def test_ext_is_pure_python_with_env_var() -> None:
    got = _import_ext(pure="1")
    twins = sorted(f"ext.{name}_py" for name in MODULES)
    assert got == {"using_c": False, "modules": twins, "table": "ext._reqtable_py",
                   "warnings": []}  # fmt: skip


@pytest.mark.skipif(not all(BUILT.values()), reason="the C core is not fully built")
def test_ext_is_c_by_default() -> None:
    for pure in (None, "0", ""):
        got = _import_ext(pure=pure)
        assert got == {"using_c": True, "modules": sorted(f"ext.{n}" for n in MODULES),
                       "table": "ext._reqtable", "warnings": []}  # fmt: skip


@pytest.mark.parametrize("name", MODULES)
def test_ext_falls_back_per_module_with_a_warning(name: str) -> None:
    block = f"sys.modules['ext.{name}'] = None  # makes importing it fail"
    got = _import_ext(pure=None, prelude=block)
    assert f"ext.{name}_py" in got["modules"]
    assert got["using_c"] is False
    assert got["warnings"].count("RuntimeWarning") >= 1


def test_ext_exports_match_this_process() -> None:
    pure = os.environ.get("MTSERVE_PUREPYTHON") == "1"
    assert ext.USING_C is (not pure and all(BUILT.values()))
    assert set(ext.__all__) == {"IMPLEMENTATIONS", "USING_C", "RequestTable", "decode_header",
                                "encode_header", "recv_frames", "recv_from", "send_frames",
                                "PagePool", "Allocation", "ActionTable", "TableFull"}  # fmt: skip
    if pure:
        twins = {name: f"ext.{name}_py" for name in MODULES}
        assert twins == ext.IMPLEMENTATIONS


@pytest.mark.skipif(not BUILT["_frames"], reason="ext._frames is not built")
def test_frames_refuses_another_pyzmq_than_it_was_built_against() -> None:
    """It reads pyzmq's structs: under another pyzmq version the twin must take over."""
    got = _import_ext(pure=None, prelude="import zmq; zmq.__version__ = '0.0.0'")
    assert "ext._frames_py" in got["modules"]
    assert "ext._reqtable" in got["modules"]  # the other modules are unaffected
    assert got["warnings"] == ["RuntimeWarning"]

"""The built wheel ships the Lua scripts and py.typed, and the installed package finds them."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(ROOT)], check=True, capture_output=True)
    (built,) = out.glob("victor_rcache-*.whl")
    return built


def test_wheel_contains_every_lua_file_unchanged(wheel: Path) -> None:
    sources = sorted(p.relative_to(ROOT / "lua") for p in (ROOT / "lua").rglob("*.lua"))
    assert len(sources) >= 5
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert "victor_rcache/py.typed" in names
        for rel in sources:
            packaged = f"victor_rcache/lua/{rel.as_posix()}"
            assert packaged in names, f"{packaged} missing from the wheel"
            assert zf.read(packaged) == (ROOT / "lua" / rel).read_bytes()


def test_installed_package_loads_scripts_from_inside_itself(wheel: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp_path)
    probe = ("import victor_rcache.scripts as s; from victor_rcache.tiers import default_scripts; "
             "print(s.lua_dir()); print(len(default_scripts().all()))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)},
                         check=True, capture_output=True, text=True).stdout.split()
    assert Path(out[0]) == tmp_path / "victor_rcache" / "lua"
    assert out[1] == str(len(list((ROOT / "lua").glob("*.lua"))))

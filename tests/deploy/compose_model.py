"""docker-compose.yml and the Dockerfile read the way Docker would, for tests that run without Docker.

* :func:`interpolate` applies compose's variable rules (``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
  ``${VAR:?message}``, ``${VAR?message}``, ``$VAR``, and ``$$`` for a literal ``$``) to one value;
* :func:`service_environment` / :func:`service_command` give a service's environment and command as the
  container would see them, with the variables of ``.env.example`` standing in for a user's ``.env``;
* :func:`runtime_layout` reads the runtime stage of the Dockerfile: the service user, its home, the
  working directory, the directories created for it (``install -d -o USER``, ``COPY --chown=USER``) and
  the image's environment.
"""

from __future__ import annotations

import itertools
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
DEPLOY_DOC = REPO_ROOT / "docs" / "deploy.md"

_VARIABLE = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|-|:\?|\?|:\+|\+)(?P<arg>.*))?$", re.S)


class MissingVariableError(KeyError):
    """A ``${VAR:?message}`` variable is unset: compose would refuse to start."""


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


def env_example() -> dict[str, str]:
    """``KEY=VALUE`` lines of ``.env.example`` (the values a user replaces)."""
    values = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def interpolate(value: str, variables: dict[str, str]) -> str:
    """``value`` after compose's interpolation with ``variables`` (see the module docstring)."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group("plain"):
            return variables.get(match.group("plain"), "")
        spec = _BRACED.match(match.group("braced"))
        assert spec, f"unsupported interpolation {match.group(0)!r}"
        name, op, arg = spec.group("name"), spec.group("op"), spec.group("arg") or ""
        current = variables.get(name)
        empty = not current
        if op in (":?", "?") and (current is None or (op == ":?" and empty)):
            raise MissingVariableError(f"{name}: {arg}")
        if op == ":-" and empty:
            return interpolate(arg, variables)
        if op == "-" and current is None:
            return interpolate(arg, variables)
        if op == ":+":
            return "" if empty else interpolate(arg, variables)
        if op == "+":
            return "" if current is None else interpolate(arg, variables)
        return current or ""

    return _VARIABLE.sub(substitute, value)


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def service_environment(service: dict[str, Any], variables: dict[str, str]) -> dict[str, str]:
    """The ``environment`` of ``service`` (mapping or list form), interpolated."""
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) if "=" in item else (item, "") for item in environment)
    return {key: interpolate(_as_text(value), variables) for key, value in environment.items()}


def service_command(service: dict[str, Any], variables: dict[str, str]) -> list[str]:
    """The ``command`` of ``service`` as argv (a string is split the way compose splits it: shell words)."""
    command = service.get("command")
    argv = command if isinstance(command, list) else shlex.split(str(command or ""))
    return [interpolate(_as_text(word), variables) for word in argv]


@dataclass
class RuntimeLayout:
    """What the runtime stage of the Dockerfile gives a service process."""

    user: str
    uid: int | None
    home: str
    workdir: str
    owned_dirs: list[str] = field(default_factory=list)  # created for, or copied owned by, the user
    env: dict[str, str] = field(default_factory=dict)


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments and heredoc bodies dropped."""
    result: list[tuple[str, str]] = []
    lines = iter(text.splitlines())
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        while line.endswith("\\"):
            line = line[:-1] + " " + next(lines).strip()
        keyword, _, rest = line.partition(" ")
        heredoc = re.search(r"<<-?'?(\w+)'?", rest)
        if heredoc:
            for body in lines:
                if body.strip() == heredoc.group(1):
                    break
        result.append((keyword.upper(), rest.strip()))
    return result


def runtime_layout(text: str | None = None) -> RuntimeLayout:
    """The last stage's user, home, WORKDIR, user-owned directories and ENV (see :class:`RuntimeLayout`)."""
    instructions = dockerfile_instructions(text if text is not None else DOCKERFILE.read_text(encoding="utf-8"))
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    stage = instructions[last_from + 1 :]
    user = next((rest for keyword, rest in reversed(stage) if keyword == "USER"), "root").split(":")[0]
    workdir = next((rest for keyword, rest in reversed(stage) if keyword == "WORKDIR"), "/")
    layout = RuntimeLayout(user=user, uid=None, home=f"/home/{user}", workdir=workdir)
    for keyword, rest in stage:
        if keyword == "RUN":
            for command in re.split(r"&&|;", rest):
                words = shlex.split(command)
                if words[:1] == ["useradd"] and words[-1] == user:
                    for flag, value in itertools.pairwise(words):
                        if flag in ("--uid", "-u"):
                            layout.uid = int(value)
                        if flag in ("--home-dir", "-d"):
                            layout.home = value
                if words[:1] == ["install"] and "-d" in words:
                    owner = words[words.index("-o") + 1] if "-o" in words else "root"
                    paths = [w for w in words[1:] if w.startswith("/")]
                    if owner == user:
                        layout.owned_dirs.extend(paths)
        elif keyword == "COPY" and re.search(rf"--chown={re.escape(user)}\b", rest):
            layout.owned_dirs.append(shlex.split(rest)[-1])
        elif keyword == "ENV":
            for word in shlex.split(rest):
                key, _, value = word.partition("=")
                layout.env[key] = value
    return layout

"""The container image's contract, checked without Docker: these machines cannot build images.

What `docker build` would do is repeated as far as it can be without a Docker engine. The build context
is worked out from `.dockerignore`; the wheel is built from exactly the files the Dockerfile copies, the
way its build stage builds it, and installed the way that stage installs it (pinned by constraints.txt,
binary wheels only) into a fresh venv, from which the Dockerfile's ENTRYPOINT and every subcommand run.
The dependency set is then resolved for the base image's Python, glibc and CPU architectures, proving that
every pin has a wheel there: the final stage has no compiler. The Dockerfile's own rules (stages, base
pin, numeric user, exec-form entrypoint, labels) are read from the file.

Needs the package index, or pip's cache, for the dependencies' wheels: the module takes about 15 s here.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
CONSTRAINTS = REPO / "constraints.txt"
HADOLINT_CONFIG = REPO / ".hadolint.yaml"
DEPLOYMENT = REPO / "manifests" / "operator" / "deployment.yaml"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
PIP_TIMEOUT = 300  # seconds for one pip run: a cold cache downloads ~40 wheels
RUN_TIMEOUT = 60  # seconds for one `pgwarden ... --help` (they take well under one)
BASE_IMAGE = re.compile(r"python:(?P<python>3\.\d+)\.\d+-slim-(?P<debian>[a-z]+)")
GLIBC_MINOR = {"bookworm": 36, "trixie": 41}  # the glibc of each Debian release the slim images use
GENERATED = re.compile(r"(^|/)(__pycache__|[^/]+\.egg-info)(/|$)|\.pyc$")  # build leftovers, never sources


# -- reading the Dockerfile ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str


def parse_dockerfile(text: str) -> list[list[Instruction]]:
    """Instructions grouped by stage (each list starts with its FROM); comments and continuations resolved."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):  # Docker drops comment lines, even inside a continuation
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends in a line continuation"
    stages: list[list[Instruction]] = []
    global_args: dict[str, str] = {}  # ARGs before the first FROM: what FROM lines may use, with defaults
    for line in logical:
        keyword, _, value = line.partition(" ")
        instruction = Instruction(keyword.upper(), value.strip())
        if instruction.keyword == "ARG" and not stages:
            name, _, default = instruction.value.partition("=")
            global_args[name] = default
            continue
        if instruction.keyword == "FROM":
            # As a build without --build-arg sees it: the defaults are what upstream builds from.
            value = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args[m[1] or m[2]], instruction.value)
            instruction = Instruction("FROM", value)
            stages.append([])
        assert stages, f"{instruction.keyword} before the first FROM"
        stages[-1].append(instruction)
    return stages


def values(stage: list[Instruction], keyword: str) -> list[str]:
    return [i.value for i in stage if i.keyword == keyword]


def key_values(value: str) -> dict[str, str]:
    """`LABEL`/`ENV` pairs: `a="x y" b=z`."""
    return dict(word.split("=", 1) for word in shlex.split(value))


def stage_env(stage: list[Instruction]) -> dict[str, str]:
    """Every `ENV` of the stage, later ones winning."""
    env: dict[str, str] = {}
    for value in values(stage, "ENV"):
        env |= key_values(value)
    return env


def copy_sources(stage: list[Instruction]) -> list[str]:
    """What the stage copies from the build context (COPY without --from), as written."""
    sources: list[str] = []
    for value in values(stage, "COPY"):
        words = shlex.split(value)
        if any(w.startswith("--from") for w in words):
            continue
        sources += [w.rstrip("/") for w in words[:-1] if not w.startswith("--")]
    return sources


@pytest.fixture(scope="module")
def stages() -> list[list[Instruction]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def entrypoint(stages: list[list[Instruction]]) -> list[str]:
    (value,) = values(stages[-1], "ENTRYPOINT")
    argv = json.loads(value)  # exec form is a JSON array; shell form would not parse
    assert isinstance(argv, list)
    assert all(isinstance(a, str) for a in argv)
    return argv


# -- .dockerignore, as Docker reads it (moby/patternmatcher: last matching pattern wins) -------------------


@dataclass(frozen=True)
class IgnorePattern:
    text: str
    negated: bool
    regex: re.Pattern[str]


def _translate(pattern: str) -> re.Pattern[str]:
    """`**` spans directories, `*` and `?` stay within one path segment."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def read_dockerignore() -> list[IgnorePattern]:
    patterns = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        text = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        patterns.append(IgnorePattern(text, negated, _translate(text)))
    return patterns


def ignored(path: str, patterns: list[IgnorePattern]) -> bool:
    """Whether `path` (relative, `/`-separated) stays out of the context; a match on a parent counts."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for pattern in patterns:
        if any(pattern.regex.fullmatch(c) for c in candidates):
            result = not pattern.negated
    return result


def build_context(patterns: list[IgnorePattern]) -> set[str]:
    """Every file `docker build .` would send, relative to the repository root."""
    found: set[str] = set()
    for root, dirs, files in os.walk(REPO):
        rel_root = Path(root).relative_to(REPO).as_posix()
        prefix = "" if rel_root == "." else rel_root + "/"
        # Skip a directory only if no `!` pattern could bring back something inside it.
        dirs[:] = [
            d
            for d in dirs
            if not ignored(prefix + d, patterns)
            or any(p.negated and p.text.startswith(prefix + d + "/") for p in patterns)
        ]
        found.update(prefix + f for f in files if not ignored(prefix + f, patterns))
    return found


# -- a fresh install of the wheel, as the image's build stage makes it -----------------------------------


def pip(*args: str) -> subprocess.CompletedProcess[str]:
    """pip of the interpreter running the tests; uses pip's cache, so repeated runs download nothing."""
    return subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT,
        check=True,
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("packaging")
    yield path
    shutil.rmtree(path, ignore_errors=True)  # a venv is ~100 MB; do not keep three of them around


@pytest.fixture(scope="module")
def wheel(work: Path, stages: list[list[Instruction]]) -> Path:
    """The wheel, built like the build stage does, from a copy of exactly the files the Dockerfile copies."""
    context = work / "context"
    patterns = read_dockerignore()
    for rel in sorted(build_context(patterns)):
        if any(rel == s or rel.startswith(s + "/") for s in copy_sources(stages[0])):
            (context / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, context / rel)
    pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(work / "dist"), str(context))
    (built,) = (work / "dist").glob("pgwarden-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(work: Path, wheel: Path) -> Path:
    """A fresh venv with only the wheel and its pinned dependencies, installed as the Dockerfile does."""
    path = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=PIP_TIMEOUT)
    pip(
        "--python",
        str(path / "bin" / "python"),
        "install",
        "--quiet",
        "--no-compile",  # the image compiles; here it would only cost time
        "--constraint",
        str(CONSTRAINTS),
        "--only-binary=:all:",
        str(wheel),
    )
    return path


def run_in(venv: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run a command as the image would: the venv first on PATH, no PYTHONPATH, away from the checkout."""
    env = {
        "PATH": f"{venv / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "HOME": str(venv.parent),
        "LANG": "C.UTF-8",
    }
    return subprocess.run(
        list(argv), cwd=venv.parent, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
    )


def pins() -> dict[str, str]:
    """constraints.txt as {normalized name: version}."""
    found = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            found[normalize(name)] = version.strip()
    return found


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# -- the tests -------------------------------------------------------------------------------------------


def test_entrypoint_from_the_dockerfile_runs_from_a_fresh_install(venv: Path, stages: list[list[Instruction]]) -> None:
    argv = entrypoint(stages)
    assert argv == ["pgwarden", "run"]
    done = run_in(venv, *argv, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: pgwarden run"), done.stdout


def test_version_is_the_package_version(venv: Path) -> None:
    done = run_in(venv, "pgwarden", "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"pgwarden {VERSION}\n"
    assert VERSION == "0.1.0"


@pytest.mark.parametrize("command", ["run", "sidecar", "enforce"])
def test_every_subcommand_answers_help(venv: Path, command: str) -> None:
    done = run_in(venv, "pgwarden", command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: pgwarden {command}"), done.stdout


def test_kubectl_plugin_is_installed_with_the_package(venv: Path) -> None:
    """kubectl finds plugins as `kubectl-NAME` on PATH: the wheel installs `kubectl-pgwarden` next to `pgwarden`."""
    done = run_in(venv, "kubectl-pgwarden", "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"kubectl-pgwarden {VERSION}\n"
    for command in ("status", "explain"):
        done = run_in(venv, "kubectl-pgwarden", command, "--help")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"usage: kubectl pgwarden {command}"), done.stdout


def test_every_module_imports_from_the_installed_wheel(venv: Path) -> None:
    """`--help` loads no kopf or kubernetes (imports are deferred); this catches a dependency the wheel lacks."""
    script = (
        "import importlib, pkgutil, pgwarden\n"
        "print(pgwarden.__file__)\n"
        "for m in pkgutil.walk_packages(pgwarden.__path__, 'pgwarden.'):\n"
        "    if not m.name.endswith('__main__'):\n"  # __main__ runs the CLI when imported
        "        importlib.import_module(m.name)\n"
    )
    done = run_in(venv, "python", "-c", script)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.splitlines()[0]).is_relative_to(venv), "imported pgwarden from outside the venv"


def test_fresh_install_holds_exactly_the_pinned_versions(venv: Path) -> None:
    listing = pip("--python", str(venv / "bin" / "python"), "list", "--format=json").stdout
    installed = {normalize(d["name"]): d["version"] for d in json.loads(listing)}
    assert installed.pop("pgwarden") == VERSION
    expected = pins()
    assert {name: expected.get(name) for name in installed} == installed
    pip("--python", str(venv / "bin" / "python"), "check")


def test_wheel_holds_the_package_only(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert "pgwarden/py.typed" in names
    assert "pgwarden/cli/__init__.py" in names
    top_level = {n.split("/", 1)[0] for n in names}
    assert top_level == {"pgwarden", f"pgwarden-{VERSION}.dist-info"}
    assert not any(n.startswith(("tests/", "operator/")) for n in names)


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_every_dependency_has_a_wheel_for_the_image(
    wheel: Path, work: Path, stages: list[list[Instruction]], arch: str
) -> None:
    """Resolve for the base image's CPython and glibc as the build stage would (--only-binary): no compiling."""
    match = BASE_IMAGE.fullmatch(stages[0][0].value.split()[0])
    assert match is not None
    platforms = [f"manylinux_2_{minor}_{arch}" for minor in range(17, GLIBC_MINOR[match["debian"]] + 1)]
    platforms.append(f"manylinux2014_{arch}")
    if arch == "x86_64":
        platforms += ["manylinux2010_x86_64", "manylinux1_x86_64"] + [f"manylinux_2_{m}_x86_64" for m in (5, 12)]
    report = work / f"resolution-{arch}.json"
    pip(
        "install",
        "--quiet",
        "--dry-run",
        "--ignore-installed",
        "--report",
        str(report),
        "--only-binary=:all:",
        "--implementation=cp",
        f"--python-version={match['python']}",
        *(f"--platform={p}" for p in platforms),
        "--constraint",
        str(CONSTRAINTS),
        str(wheel),
    )
    resolved = {
        normalize(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    assert resolved.pop("pgwarden") == VERSION
    expected = pins()
    assert {name: expected.get(name) for name in resolved} == resolved, "a dependency is not pinned"
    assert {"kopf", "kubernetes", "psycopg-binary", "pydantic-core"} <= resolved.keys()


def test_dockerfile_follows_the_image_rules(stages: list[list[Instruction]]) -> None:
    assert len(stages) >= 2, "multi-stage: the final stage gets the venv only"
    bases = {stage[0].value.split()[0] for stage in stages}
    assert len(bases) == 1, f"one base for every stage (the venv links to its interpreter): {bases}"
    assert BASE_IMAGE.fullmatch(bases.pop()), "an official slim Python image pinned to a patch version"
    final = stages[-1]
    assert not values(final, "RUN"), "nothing is built or installed in the final stage"
    assert all("--from=" in v for v in values(final, "COPY")), "the final stage copies from the build stage only"
    assert not values(final, "ADD")
    (user,) = values(final, "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit()
    assert int(uid) > 0, "numeric and non-root, so runAsNonRoot can check it"
    assert gid.isdigit()
    labels: dict[str, str] = {}
    for value in values(final, "LABEL"):
        labels |= key_values(value)
    assert labels["org.opencontainers.image.version"] == VERSION
    assert {"title", "description", "source", "licenses"} <= {k.rsplit(".", 1)[1] for k in labels}
    env = stage_env(final)
    venv_bin = next(w for w in shlex.split(" ".join(values(stages[0], "RUN"))) if w.endswith("/pgwarden"))
    assert env["PATH"].startswith(f"{venv_bin}/bin:"), "the entrypoint's `pgwarden` is the venv's"
    assert entrypoint(stages) == ["pgwarden", "run"]


def test_the_benchmarks_run_the_operator_with_the_images_malloc_settings(stages: list[list[Instruction]]) -> None:
    """bench/operator_cycle.py's IMAGE_ENV is what the memory figures in the README were measured with: it must
    be the image's glibc settings, or those figures describe a process that does not ship."""
    shipped = {k: v for k, v in stage_env(stages[-1]).items() if k.startswith("MALLOC_")}
    bench = ast.parse((REPO / "bench" / "operator_cycle.py").read_text())
    (assigned,) = [
        node.value
        for node in bench.body
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["IMAGE_ENV"]
    ]
    assert shipped
    assert ast.literal_eval(assigned) == shipped


def test_deployment_runs_this_version_as_this_user(stages: list[list[Instruction]]) -> None:
    deployment = yaml.safe_load(DEPLOYMENT.read_text())
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == f"localhost/pgwarden:{VERSION}"
    assert "command" not in container, "the image's ENTRYPOINT (`pgwarden run`) is what runs"
    (user,) = values(stages[-1], "USER")
    assert f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}" == user


def test_build_context_is_exactly_what_the_dockerfile_copies(stages: list[list[Instruction]]) -> None:
    patterns = read_dockerignore()
    context = build_context(patterns)
    sources = [s for stage in stages for s in copy_sources(stage)]
    expected = set()
    for source in sources:
        path = REPO / source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        expected |= {f.relative_to(REPO).as_posix() for f in files}
    expected = {f for f in expected if not GENERATED.search(f)}
    assert context == expected
    assert "operator/pgwarden/py.typed" in context
    for outside in (".git", ".venv", ".devcluster/kubeconfig", "tests/conftest.py", "manifests/kustomization.yaml"):
        assert ignored(outside, patterns), outside


def test_hadolint_ignores_each_say_why() -> None:
    """No rule is ignored today; one may be, but only with a reason next to it."""
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if re.match(r"\s*#\s*hadolint\s+(global\s+)?ignore=", line):
            before = lines[number - 1].strip() if number else ""
            assert before.startswith("#"), f"Dockerfile:{number + 1}: say why above the ignore pragma"
            assert "hadolint" not in before, f"Dockerfile:{number + 1}: say why above the ignore pragma"
    config = HADOLINT_CONFIG.read_text()
    for rule in yaml.safe_load(config).get("ignored") or []:
        (line,) = [raw for raw in config.splitlines() if re.match(rf"\s*-\s*{rule}\b", raw)]
        assert "#" in line, f".hadolint.yaml: say why {rule} is ignored, in a comment on its line"

"""The container image recipe (infra/docker), checked without a container runtime.

hadolint lints the Dockerfile; the rest reads the Dockerfile and its ignore file: the project is installed only by
infra/install-wheel.sh, from files the build context really holds, and the image carries what `dvc repro` needs.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / "infra" / "docker" / "Dockerfile.dockerignore"
INSTALL_SCRIPT = "infra/install-wheel.sh"
HADOLINT = Path(sys.executable).parent / "hadolint"


# --- a small Dockerfile reader -------------------------------------------------------------------------------


@dataclass
class Instruction:
    line: int  # first line, 1-based
    cmd: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest, continuation lines joined
    stage: int  # index of the FROM this instruction belongs to


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comment lines (also inside continuations) dropped."""
    out: list[Instruction] = []
    stage = -1
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        cmd, _, args = buf.partition(" ")
        cmd = cmd.upper()
        if cmd == "FROM":
            stage += 1
        out.append(Instruction(start, cmd, " ".join(args.split()), stage))
        buf = ""
    return out


def copy_parts(ins: Instruction) -> tuple[dict[str, str], list[str], str]:
    """(flags, sources, destination) of a COPY/ADD."""
    words = shlex.split(ins.args)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    return flags, words[:-1], words[-1]


def copies_into(instructions: list[Instruction], stage: int, before_line: int) -> dict[str, str]:
    """Build-context path -> absolute path in the image, for COPYs of `stage` before `before_line`."""
    workdir, dests = "/", {}
    for ins in instructions:
        if ins.stage != stage or ins.line >= before_line:
            continue
        if ins.cmd == "WORKDIR":
            workdir = os.path.join(workdir, ins.args)
        if ins.cmd in ("COPY", "ADD"):
            flags, sources, dest = copy_parts(ins)
            if "from" in flags:
                continue
            dest = os.path.join(workdir, dest)
            for src in sources:
                name = src.rstrip("/")
                # a folder's contents go into dest; a file goes into dest/ (ending in / or one of several) or is dest
                into_dir = not (ROOT / name).is_dir() and (dest.endswith("/") or len(sources) > 1)
                dests[name] = os.path.normpath(
                    os.path.join(dest, os.path.basename(name)) if into_dir else dest
                )
    return dests


def workdir_of(instructions: list[Instruction], stage: int, before_line: int) -> str:
    workdir = "/"
    for ins in instructions:
        if ins.stage == stage and ins.line < before_line and ins.cmd == "WORKDIR":
            workdir = os.path.join(workdir, ins.args)
    return workdir


# --- .dockerignore semantics (moby/patternmatcher): last matching pattern wins, `!` re-includes, a pattern
# --- that matches a folder matches everything in it, `*` stays within one path element, `**` spans several.


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif c == "*":
            out, i = out + "[^/]*", i + 1
        elif c == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(c), i + 1
    return re.compile(out + r"\Z")


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip().lstrip("/"))
        rules.append((negated, _pattern_regex(pattern)))
    return rules


def is_ignored(rules: list[tuple[bool, re.Pattern[str]]], path: str) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negated, regex in rules:
        if any(regex.match(p) for p in prefixes):
            ignored = not negated
    return ignored


def context_files(src: str) -> list[str]:
    """The files a COPY source names, relative to the repository root (a folder: every file under it)."""
    matches = sorted(ROOT.glob(src.rstrip("/")))
    files = []
    for m in matches:
        if m.is_dir():
            files += [
                str(p.relative_to(ROOT)) for p in m.rglob("*") if p.is_file() and "__pycache__" not in p.parts
            ]
        else:
            files.append(str(m.relative_to(ROOT)))
    return files


# --- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def rules() -> list[tuple[bool, re.Pattern[str]]]:
    return dockerignore_rules(DOCKERIGNORE.read_text())


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def run_hadolint(dockerfile: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """hadolint with no configuration file of anyone's (cwd, HOME and XDG_CONFIG_HOME point at cwd), failing on
    every finding down to style."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(cwd), "XDG_CONFIG_HOME": str(cwd)}
    return subprocess.run(
        [str(HADOLINT), "--no-color", "--failure-threshold", "style", str(dockerfile)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


IGNORE_PRAGMA = re.compile(r"#\s*hadolint\s+(?:global\s+)?ignore=([\w,\s]+)")


def unexplained_ignores(text: str) -> list[str]:
    """Rules ignored by a pragma without a reason: each ignored RULE needs a comment `# RULE: why` just above."""
    lines = text.splitlines()
    bad = []
    for i, line in enumerate(lines):
        m = IGNORE_PRAGMA.search(line)
        if not m:
            continue
        above = []
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#") and not IGNORE_PRAGMA.search(lines[j]):
            above.append(lines[j].strip())
            j -= 1
        for rule in (r.strip() for r in m.group(1).split(",")):
            reason = next((c for c in above if re.match(rf"#\s*{rule}:\s*\S", c)), None)
            if reason is None or len(reason.split()) < 5:
                bad.append(f"line {i + 1}: {rule}")
    return bad


# --- hadolint ------------------------------------------------------------------------------------------------


def test_hadolint_passes(tmp_path):
    result = run_hadolint(DOCKERFILE, tmp_path)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_every_ignored_hadolint_rule_has_a_written_reason():
    assert unexplained_ignores(DOCKERFILE.read_text()) == []
    assert not list((ROOT / "infra" / "docker").glob("*hadolint*")), (
        "no config file that ignores rules silently"
    )


def test_hadolint_fails_a_broken_dockerfile(tmp_path):
    broken = tmp_path / "Dockerfile"
    broken.write_text(
        "FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\nRUN pip install requests\n"
    )
    result = run_hadolint(broken, tmp_path)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3009", "DL3013", "DL3015"):
        assert rule in result.stdout


def test_an_ignore_without_a_reason_is_caught():
    assert unexplained_ignores("# hadolint ignore=DL3008\nRUN apt-get install -y curl\n") == [
        "line 1: DL3008"
    ]
    assert unexplained_ignores("# DL3008: short\n# hadolint ignore=DL3008\nRUN x\n") == ["line 2: DL3008"]
    explained = "# DL3008: the archive drops old versions of this package.\n# hadolint ignore=DL3008\nRUN x\n"
    assert unexplained_ignores(explained) == []


# --- the install step ----------------------------------------------------------------------------------------


def install_step(instructions: list[Instruction]) -> Instruction:
    steps = [i for i in instructions if i.cmd == "RUN" and INSTALL_SCRIPT in i.args]
    assert len(steps) == 1, "exactly one RUN runs the install script"
    return steps[0]


def test_the_project_is_installed_only_by_the_install_script(instructions):
    step = install_step(instructions)
    commands = [shlex.split(c) for c in re.split(r"&&|;", step.args)]
    runs = [c for c in commands if c and c[0] == INSTALL_SCRIPT]
    assert len(runs) == 1 and runs[0][1] == "/opt/venv", step.args
    # run from the folder the script's files were copied to, so that it finds them as in a checkout
    workdir = workdir_of(instructions, step.stage, step.line)
    assert copies_into(instructions, step.stage, step.line)[INSTALL_SCRIPT] == os.path.join(
        workdir, INSTALL_SCRIPT
    )
    # no second way in: every other RUN leaves Python packages alone
    installers = re.compile(r"\bpip3?\s+install\b|\buv\s+(?:pip|sync|add|tool)\b|\bpoetry\b|\bconda\b")
    for ins in instructions:
        if ins.cmd == "RUN" and ins is not step:
            assert not installers.search(ins.args), f"line {ins.line}: {ins.args}"
    # the venv that the final image puts first on PATH is the one the script filled
    final = max(i.stage for i in instructions)
    assert any(i.cmd == "COPY" and i.stage == final and "/opt/venv /opt/venv" in i.args for i in instructions)
    env = " ".join(i.args for i in instructions if i.cmd == "ENV" and i.stage == final)
    assert re.search(r"\bPATH=/opt/venv/bin:", env)
    # and the install script is a real, executable file of the repository, the one the wheel test runs
    script = ROOT / INSTALL_SCRIPT
    assert script.is_file() and os.access(script, os.X_OK)
    wheel_test = ROOT / "tests" / "test_wheel.py"
    if wheel_test.exists():
        assert INSTALL_SCRIPT in wheel_test.read_text()


def test_the_install_step_has_every_file_the_script_needs(instructions, pyproject, rules):
    step = install_step(instructions)
    workdir = workdir_of(instructions, step.stage, step.line)
    needed = {"pyproject.toml", "uv.lock", INSTALL_SCRIPT, pyproject["project"]["readme"]}
    needed |= set(pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"])
    lic = pyproject["project"].get("license", {})
    if isinstance(lic, dict) and "file" in lic:
        needed.add(lic["file"])
    copied = copies_into(instructions, step.stage, step.line)
    for path in sorted(needed):
        assert copied.get(path) == os.path.normpath(os.path.join(workdir, path)), (
            f"{path} is not copied in place"
        )
        files = context_files(path)
        assert files, f"{path} is not in the repository"
        assert not [f for f in files if is_ignored(rules, f)], f"{path} is left out of the build context"


def test_every_copied_file_is_in_the_build_context(instructions, rules):
    for ins in instructions:
        if ins.cmd not in ("COPY", "ADD"):
            continue
        flags, sources, _ = copy_parts(ins)
        if "from" in flags:
            continue
        assert ins.cmd == "COPY", f"line {ins.line}: ADD"
        for src in sources:
            files = context_files(src)
            assert files or "*" in src, f"line {ins.line}: {src} matches nothing"
            ignored = [f for f in files if is_ignored(rules, f)]
            assert not ignored, f"line {ins.line}: {ignored[:3]} left out of the context"


def test_the_ignore_file_leaves_out_the_heavy_and_private_paths(rules):
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        ".stack/seaweedfs/volume.dat",
        ".pytest_cache/v/cache",
        ".ruff_cache/CACHEDIR.TAG",
        "resnet/__pycache__/cli.cpython-312.pyc",
        "pipelines/__pycache__/tune.cpython-312.pyc",
        "data/prepared/digits/train-00000-of-00001.parquet",
        "data/downloads/cifar-10-python.tar.gz",
        "models/pretrain/model.pt",
        "mlruns/0/meta.yaml",
        "mlruns.db",
        "mlartifacts/1/model.pt",
        "runs/sweep/state.json",
        ".dvc/cache/files/md5/00/ff",
        ".dvc/tmp/lock",
        ".dvc/config.local",
        "metrics/pretrain.json",
        "tests/test_docker.py",
        ".env",
    ):
        assert is_ignored(rules, path), path


def test_the_ignore_file_matcher():
    rules = dockerignore_rules("*\n!keep/\n!a/b.txt\n**/__pycache__\nkeep/drop*\n")
    assert is_ignored(rules, "x.txt") and is_ignored(rules, "a/c.txt")
    assert not is_ignored(rules, "a/b.txt") and not is_ignored(rules, "keep/deep/er.py")
    assert is_ignored(rules, "keep/__pycache__/m.pyc") and is_ignored(rules, "keep/drop.py")


# --- what the jobs run from -----------------------------------------------------------------------------------


def dvc_code_deps() -> set[str]:
    """Files of the repository that dvc.yaml's stages depend on: every dependency that no stage makes."""
    stages = [s.get("do", s) for s in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values()]
    made = []
    for body in stages:
        for key in ("outs", "metrics", "plots"):
            for out in body.get(key, []):
                path = next(iter(out)) if isinstance(out, dict) else out
                made.append(path.split("${")[0])
    deps = {"dvc.yaml", "params.yaml"}
    for body in stages:
        for dep in body.get("deps", []):
            if not any(dep.startswith(m) for m in made):
                assert "${" not in dep, dep
                deps.add(dep)
    return deps


def test_the_image_holds_the_pipeline_files(instructions, rules):
    final = max(i.stage for i in instructions)
    last = max(i.line for i in instructions) + 1
    assert workdir_of(instructions, final, last) == "/app"
    copied = copies_into(instructions, final, last)
    in_app = {src for src, dest in copied.items() if dest.startswith("/app")}
    wanted = dvc_code_deps() | ({".dvc/config"} if (ROOT / ".dvc" / "config").exists() else set())
    for path in sorted(wanted):
        top = next((s for s in in_app if path == s or path.startswith(s + "/")), None)
        assert top, f"{path} (a dependency of dvc.yaml) is not copied into /app"
        assert copied[top] == os.path.join("/app", top), f"{top} is not at /app/{top}"
        assert not is_ignored(rules, path), f"{path} is left out of the build context"
    for secret in (".dvc/config.local", ".env"):
        assert secret not in copied


def test_the_image_runs_as_a_non_root_user(instructions):
    final = max(i.stage for i in instructions)
    users = [i.args for i in instructions if i.stage == final and i.cmd == "USER"]
    assert users, "the final stage sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric and not root, so that runAsNonRoot can verify it"


def test_no_secrets_in_the_image_recipe(instructions):
    secretish = re.compile(r"KEY|SECRET|PASSWORD|TOKEN|CREDENTIAL", re.I)
    for ins in instructions:
        if ins.cmd in ("ENV", "ARG", "LABEL"):
            names = re.findall(r"([A-Za-z_][\w.]*)=", ins.args) or [ins.args.split()[0]]
            assert not [n for n in names if secretish.search(n)], f"line {ins.line}: {ins.args}"


def test_image_version_and_bases(instructions, pyproject):
    text = DOCKERFILE.read_text()
    version = pyproject["project"]["version"]
    assert re.search(rf"ARG VERSION={re.escape(version)}\b", text)
    assert f"ghcr.io/resnet-pipeline/resnet-pipeline:{version} " in text
    assert f"ghcr.io/resnet-pipeline/resnet-pipeline:{version}-cuda" in text
    assert re.search(r"BASE_IMAGE=nvidia/cuda:\S+-ubuntu24\.04", text), "the CUDA base is documented"
    froms = [i.args for i in instructions if i.cmd == "FROM"]
    assert all(f.startswith("${BASE_IMAGE}") for f in froms), "CPU and CUDA images differ only in the base"
    # pinned tools: the uv image by exact version, the Python every image of a cluster shares by patch level
    assert re.search(r"ghcr\.io/astral-sh/uv:\d+\.\d+\.\d+ ", text)
    assert re.search(r"ARG PYTHON_VERSION=3\.\d+\.\d+\n", text)


def test_dockerfile_reader():
    text = "FROM a AS b\n# c\nRUN x \\\n  # inside\n  && y\nFROM b\nWORKDIR /w\nCOPY p q/ ./\nCOPY --from=b /o /o\n"
    ins = parse_dockerfile(text)
    assert [(i.cmd, i.stage) for i in ins] == [("FROM", 0), ("RUN", 0), ("FROM", 1), ("WORKDIR", 1)] + [
        ("COPY", 1),
        ("COPY", 1),
    ]
    assert ins[1].args == "x && y" and ins[1].line == 3
    assert copies_into(ins, 1, 100) == {"p": "/w/p", "q": "/w/q"}

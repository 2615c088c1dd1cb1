"""dvc.yaml declares every input that decides a stage's output: its code (the import closure of
pipelines/<stage>.py) and the params that change results; `dvc status` on a committed copy of the pipeline
reports exactly the stages a change should re-run."""

from __future__ import annotations

import ast
import contextlib
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
STAGES = ("prepare", "pretrain", "tune", "evaluate", "register")
PACKAGES = ("resnet", "pipelines")  # the repository's top-level packages; anything else is a library
PARAMS = {
    "prepare": ["datasets.${key}"],
    "pretrain": [
        "augment",
        "finetune.model",
        "finetune.pretrained",
        "pretrain",
        "ray.num_workers",
        "ray.use_gpu",
    ],
    "tune": ["augment", "finetune", "ray.num_workers", "ray.use_gpu", "tune"],
    "evaluate": [],
    "register": ["mlflow", "register"],
}


def _parents(name: str) -> list[str]:
    """`a.b.c` -> a, a.b, a.b.c: importing a module runs each of its packages' __init__ first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def module_file(root: Path, name: str) -> str | None:
    """The repo-relative file of module `name`, or None for a library module or a non-module name."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path.relative_to(root).as_posix()
    return None


def imported_names(root: Path, rel: str) -> set[str]:
    """Every module name an import statement anywhere in `rel` may load (also inside functions), with its
    parent packages; `from p import x` adds `p.x` too (kept only where p/x.py exists)."""
    parts = rel.removesuffix(".py").split("/")
    package = parts[:-1]  # the package relative imports start from (for __init__.py: the package itself)
    names: set[str] = set()
    for node in ast.walk(ast.parse((root / rel).read_text(), rel)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return {parent for name in names if name for parent in _parents(name)}


def import_closure(root: Path, module: str) -> list[str]:
    """Sorted repo-relative files that running `python -m <module>` may execute."""
    todo, files = _parents(module), set()
    while todo:
        rel = module_file(root, todo.pop())
        if rel is not None and rel not in files:
            files.add(rel)
            todo.extend(imported_names(root, rel))
    return sorted(files)


def dvc_stages() -> dict[str, dict]:
    """dvc.yaml's stage definitions as written (the foreach stage's `do` body, uninterpolated)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


def _entry_path(entry: str | dict) -> str:
    return entry if isinstance(entry, str) else next(iter(entry))


CLOSURES = {stage: import_closure(REPO, f"pipelines.{stage}") for stage in STAGES}
DATASETS = list(yaml.safe_load((REPO / "params.yaml").read_text())["datasets"])
STAGE_NAMES = {
    stage: [f"{stage}@{key}" for key in DATASETS] if stage == "prepare" else [stage] for stage in STAGES
}
ALL_STAGES = {name for names in STAGE_NAMES.values() for name in names}
SOURCES = sorted(p.relative_to(REPO).as_posix() for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def test_closure_follows_lazy_submodule_and_package_imports():
    """Anchors that do not depend on dvc.yaml: imports inside functions, `from resnet import weights` (a
    submodule), and the packages' __init__ files all count."""
    assert set(CLOSURES) == set(STAGES)
    tune = CLOSURES["tune"]
    assert {"pipelines/__init__.py", "resnet/__init__.py", "resnet/data/__init__.py"} <= set(tune)
    assert {"resnet/sweep.py", "resnet/weights.py", "resnet/config.py"} <= set(tune)
    assert "resnet/sweep.py" not in CLOSURES["pretrain"]
    assert "resnet/data/fractals.py" in CLOSURES["prepare"]  # resnet/data/sources.py imports it lazily


def test_import_closure_of_a_small_tree(tmp_path):
    """Relative imports, `from package import submodule`, imports inside functions, parent packages; a module
    nothing imports and names that are not modules stay out."""
    files = {
        "pipelines/__init__.py": "",
        "pipelines/stage.py": "import json\nfrom resnet import c\n\n\ndef run():\n    import resnet.data.a\n"
        "    from .helper import x\n",
        "pipelines/helper.py": "x = 1\n",
        "resnet/__init__.py": "",
        "resnet/c.py": "",
        "resnet/unused.py": "",
        "resnet/data/__init__.py": "from resnet.c import *\n",
        "resnet/data/a.py": "from . import b\nfrom ..c import f\n",
        "resnet/data/b.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert import_closure(tmp_path, "pipelines.stage") == [
        "pipelines/__init__.py",
        "pipelines/helper.py",
        "pipelines/stage.py",
        "resnet/__init__.py",
        "resnet/c.py",
        "resnet/data/__init__.py",
        "resnet/data/a.py",
        "resnet/data/b.py",
    ]
    assert import_closure(tmp_path, "pipelines.helper") == ["pipelines/__init__.py", "pipelines/helper.py"]


def test_dvc_yaml_has_exactly_the_pipeline_stages():
    assert sorted(dvc_stages()) == sorted(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_are_the_import_closure(stage):
    """A stage's .py deps are exactly the files its entry module imports, transitively, in sorted order."""
    declared = [_entry_path(dep) for dep in dvc_stages()[stage]["deps"]]
    code = [path for path in declared if path.endswith(".py")]
    expected = CLOSURES[stage]
    missing = sorted(set(expected) - set(code))
    extra = sorted(set(code) - set(expected))
    assert code == expected, (
        f"dvc.yaml stage {stage!r} .py deps differ from the import closure of pipelines/{stage}.py:\n"
        f"  missing (add): {missing}\n  extra (remove): {extra}\n"
        + ("  (same files, not sorted)\n" if not missing and not extra else "")
    )


@pytest.mark.parametrize("stage", STAGES)
def test_params_are_the_ones_that_change_results(stage):
    assert (dvc_stages()[stage].get("params") or []) == PARAMS[stage]


# `dvc status` on a copy of the pipeline whose lock was committed over placeholder outputs (no stage runs).


@contextlib.contextmanager
def _dvc_repo(root: Path):
    """A DVC repo object for `root`, with `root` as the working directory (DVC resolves stage paths from it)."""
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(root) as repo:
        yield repo


def changed_stages(root: Path) -> dict:
    """`dvc status`: stage name -> what changed, for each stage that is not up to date."""
    with _dvc_repo(root) as repo:
        return repo.status()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A git + DVC copy of the pipeline's code and params with placeholder outputs and a committed lock."""
    from dvc.dependency.param import ParamsDependency

    root = tmp_path_factory.mktemp("pipeline")
    for package in PACKAGES:
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", ".dvcignore", ".dvc/config"):
        (root / name).parent.mkdir(exist_ok=True)
        shutil.copyfile(REPO / name, root / name)
    # DVC's hash database, kept inside the copy (default: a directory under /var/tmp)
    (root / ".dvc/config.local").write_text(f"[core]\n    site_cache_dir = {root / '.dvc/site'}\n")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    with _dvc_repo(root) as repo:
        paths = {
            entry.def_path
            for stage in repo.index.stages
            for entry in (*stage.outs, *stage.deps)
            if not isinstance(entry, ParamsDependency) and not entry.def_path.endswith(".py")
        }
        for path in sorted(paths, key=lambda p: Path(p).suffix == ""):  # files first, then directories
            target = root / path
            if Path(path).suffix:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(f"placeholder {path}\n")
            elif not target.is_dir():
                target.mkdir(parents=True)
                (target / "placeholder").write_text(f"placeholder {path}\n")
        repo.commit(force=True)
    assert changed_stages(root) == {}
    return root


@contextlib.contextmanager
def _edited(path: Path, text: str):
    original = path.read_bytes()
    path.write_text(text)
    try:
        yield
    finally:
        path.write_bytes(original)


def status_after_appending(root: Path, rel: str) -> dict:
    """`dvc status` after appending a comment line to `rel` (reverted afterwards)."""
    path = root / rel
    with _edited(path, path.read_text() + "# changed\n"):
        return changed_stages(root)


def status_after_setting(root: Path, key: str, value) -> dict:
    """`dvc status` after setting the dotted params.yaml `key` to `value` (reverted afterwards)."""
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    *parents, leaf = key.split(".")
    section = params
    for name in parents:
        section = section[name]
    assert leaf in section and section[leaf] != value, f"{key}: not in params.yaml or already {value!r}"
    section[leaf] = value
    with _edited(path, yaml.safe_dump(params, sort_keys=False)):
        return changed_stages(root)


def assert_reported(status: dict, expected: set[str], changed: str) -> None:
    """`status` names exactly the `expected` stages, each only for a changed dep `changed` (not its command)."""
    got = set(status)
    assert got == expected, (
        f"missing: {sorted(expected - got)}, unexpected: {sorted(got - expected)}\n{status}"
    )
    reasons = {
        name: [(kind, sorted(what)) for change in changes for kind, what in change.items()]
        for name, changes in status.items()
    }
    assert reasons == {name: [("changed deps", [changed])] for name in expected}, status


@pytest.mark.parametrize("rel", SOURCES)
def test_a_code_change_marks_exactly_the_stages_that_import_it(workspace, rel):
    expected = {name for stage in STAGES if rel in CLOSURES[stage] for name in STAGE_NAMES[stage]}
    assert_reported(status_after_appending(workspace, rel), expected, rel)


@pytest.mark.parametrize(
    ("rel", "expected"),
    [
        (
            "resnet/config.py",
            {"prepare@fractals", "prepare@digits", "pretrain", "tune", "evaluate", "register"},
        ),
        ("resnet/sweep.py", {"tune"}),
    ],
)
def test_code_change_anchors(workspace, rel, expected):
    """Pinned by hand, independent of the closure code."""
    assert_reported(status_after_appending(workspace, rel), expected, rel)


def test_a_dataset_source_change_reprepares_every_dataset(workspace):
    status = status_after_appending(workspace, "resnet/data/fractals.py")
    assert {"prepare@fractals", "prepare@digits"} <= set(status), status


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("ray.num_workers", 3, {"pretrain", "tune"}),  # the global batch splits differently across ranks
        ("ray.use_gpu", True, {"pretrain", "tune"}),
        ("ray.max_failures", 5, set()),
        ("ray.checkpoints_to_keep", 5, set()),
        ("ray.storage_path", "elsewhere/ray", set()),
        ("pretrain.epochs", 7, {"pretrain"}),
        ("finetune.lr", 0.03, {"tune"}),
        ("finetune.pretrained", "none", {"pretrain", "tune"}),
        ("tune.num_samples", 11, {"tune"}),
        ("augment.hflip", True, {"pretrain", "tune"}),
        ("datasets.digits.seed", 1, {"prepare@digits"}),
        ("register.alias", "challenger", {"register"}),
        ("mlflow.experiment", "elsewhere", {"register"}),
    ],
)
def test_a_params_change_marks_exactly_the_stages_it_affects(workspace, key, value, expected):
    assert_reported(status_after_setting(workspace, key, value), expected, "params.yaml")

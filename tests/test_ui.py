"""The MLflow UI as a user sees it: a real `mlflow server` on the store of the session's pipeline run
(`pipeline_project`), rendered by headless Chromium; assertions on the rendered text, a screenshot of every page.

Screenshots (and the rendered DOM) go to $RESNET_UI_SCREENSHOTS if set, else to a directory under pytest's
basetemp; its path is printed. Chromium comes from `make chromium` (apt); outside CI the module is skipped when
it is missing, in CI (CI=true) it fails.

Routes (MLflow 3.17, hash router): #/experiments/<id>/runs, #/experiments/<id>/runs/<run>[/model-metrics|
/artifacts[/<path>]], #/models/<name>, #/models/<name>/versions/<v>. Experiment pages take
`?workflowType=machine_learning`, the "Model training" view (the UI opens in its "GenAI" view otherwise).
"""

from __future__ import annotations

import contextlib
import html.parser
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest
from localservers import MlflowServer

pytestmark = pytest.mark.integration

EXPERIMENT = "resnet-pipeline"
MODEL = "resnet-digits"
ALIAS = "champion"
STAGE_RUNS = ("pretrain", "tune", "evaluate", "register")
CLASSIC = "?workflowType=machine_learning"  # the "Model training" view of an experiment
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_HINT = (
    "install it with `make chromium` (apt-get install -y chromium), or set CHROMIUM to a Chrome binary"
)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session", autouse=True)
def chromium() -> str:
    """The browser, checked before the (slow) pipeline fixture is built: skipped without it, except in CI."""
    wanted = os.environ.get("CHROMIUM")
    found = shutil.which(wanted) if wanted else next(filter(None, map(shutil.which, BROWSERS)), None)
    if found is None:
        what = (
            f"CHROMIUM={wanted!r} not found"
            if wanted
            else f"no Chromium on PATH (looked for {', '.join(BROWSERS)})"
        )
        if _in_ci():
            pytest.fail(f"{what}: CI must run the UI tests; {INSTALL_HINT}", pytrace=False)
        pytest.skip(f"{what}; {INSTALL_HINT}")
    return found


class _Text(html.parser.HTMLParser):
    """The text of a DOM as a user reads it: text nodes outside <script>/<style>, whitespace collapsed."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag, attrs):
        self.hidden += tag in ("script", "style", "noscript")

    def handle_endtag(self, tag):
        self.hidden -= tag in ("script", "style", "noscript") and self.hidden > 0

    def handle_data(self, data):
        if not self.hidden:
            self.parts.append(data)


def visible_text(dom: str) -> str:
    parser = _Text()
    parser.feed(dom)
    return " ".join(" ".join(parser.parts).split())


def js_number(value: float) -> str:
    """How the UI writes a number (JavaScript's String(n)): shortest round-trip digits, positional between 1e-7
    and 1e21 (0.15, 2, 0.0000020523580223862966), else an exponent (1e-7, 1.5e+21)."""
    if value == int(value) and abs(value) < 1e21:
        return str(int(value))
    if 1e-7 <= abs(value) < 1e21:
        return format(Decimal(repr(value)), "f")
    mantissa, exponent = repr(value).split("e")
    return f"{mantissa}e{int(exponent):+d}"


@dataclass
class Page:
    url: str
    text: str
    dom: str
    screenshot: Path

    def __contains__(self, needle: str) -> bool:
        return needle in self.text

    def why(self, expected: str) -> str:
        return f"{expected!r} not rendered at {self.url} (see {self.screenshot}); the page reads: {self.text[:3000]}"


@dataclass
class UI:
    url: str
    chromium: str
    shots: Path
    client: object  # MlflowClient on the server's store
    experiment_id: str

    def render(self, name: str, route: str, *, height: int = 900, budget_ms: int = 15000) -> Page:
        """Load `#/<route>` in a fresh headless Chromium, let the app settle (virtual time: the budget runs only
        while no request is in flight), keep a screenshot and the DOM, return the rendered text."""
        url = f"{self.url}/#/{route}"
        png, dom_file = self.shots / f"{name}.png", self.shots / f"{name}.html"
        with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
            command = [
                self.chromium,
                "--headless",
                "--no-sandbox",  # as root, and in containers without user namespaces
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                # Nothing but the server: the browser's own calls home can stall virtual time without internet.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                # Without it, lazily drawn parts (the metric charts) never see themselves on screen.
                "--run-all-compositor-stages-before-draw",
                f"--user-data-dir={profile}",
                f"--window-size=1400,{height}",
                f"--virtual-time-budget={budget_ms}",
                f"--screenshot={png}",
                "--dump-dom",
                url,
            ]
            browser = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
            )
            try:
                dom, errors = browser.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                dom, errors = "", "timed out after 120 s"
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(browser.pid, signal.SIGKILL)  # renderers and zygotes too
                browser.wait()
        dom_file.write_text(dom)
        assert dom.strip(), f"chromium rendered nothing for {url}: {errors[-2000:]}"
        return Page(url, visible_text(dom), dom, png)


@pytest.fixture(scope="module")
def ui(chromium: str, pipeline_project: dict, tmp_path_factory, request) -> Iterator[UI]:
    """`mlflow server` on the pipeline's SQLite store, for this module; stopped with its whole process group."""
    from mlflow.tracking import MlflowClient

    project: Path = pipeline_project["dir"]
    store = f"sqlite:///{project / 'mlruns.db'}"
    shots = Path(os.environ.get("RESNET_UI_SCREENSHOTS") or tmp_path_factory.mktemp("ui-screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\nUI screenshots: {shots}", flush=True)  # shown as the module starts, captured or not

    # The experiment's artifact location is an absolute file URI (<project>/mlartifacts), which the server reads
    # directly: no --artifacts-destination needed. The server runs elsewhere so that nothing lands in the project.
    server = MlflowServer(store, tmp_path_factory.mktemp("mlflow-server"))
    try:
        server.start()
        client = MlflowClient(server.url)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        assert experiment is not None, f"no experiment {EXPERIMENT!r} in {store}"
        yield UI(server.url, chromium, shots, client, experiment.experiment_id)
    finally:
        server.stop()


def _squash(text: str) -> str:
    """Text without whitespace or Markdown's inline marks, to compare Markdown with its rendering."""
    return re.sub(r"[\s*`#_>\\]", "", text)


def _latest(ui: UI, name: str):
    runs = ui.client.search_runs(
        [ui.experiment_id],
        filter_string=f"attributes.run_name = '{name}'",
        order_by=["attributes.start_time DESC"],
    )
    assert runs, f"no run named {name!r} in experiment {EXPERIMENT!r}"
    return runs[0]


def test_experiment_page_lists_the_stage_runs_with_trials_nested(ui: UI):
    runs = ui.client.search_runs([ui.experiment_id], max_results=1000)
    top = {run.info.run_id: run.info.run_name for run in runs if "mlflow.parentRunId" not in run.data.tags}
    assert set(STAGE_RUNS) <= set(top.values()), f"stage runs missing from the store: {sorted(top.values())}"
    page = ui.render("experiment", f"experiments/{ui.experiment_id}/runs{CLASSIC}")
    for name in STAGE_RUNS:
        assert re.search(rf"\b{name}\b", page.text), page.why(name)
    # Every run is counted, but only those without a parent are rows: the trials are folded under `tune`.
    assert f"{len(runs)} matching runs" in page, page.why(f"{len(runs)} matching runs")
    rows = set(re.findall(rf'href="#/experiments/{ui.experiment_id}/runs/([0-9a-f]{{32}})"', page.dom))
    assert rows == set(top), (
        f"rows {sorted(rows)} != runs without a parent {sorted(top)} (see {page.screenshot})"
    )
    register = _latest(ui, "register")
    models = ui.client.search_model_versions(f"run_id = '{register.info.run_id}'")
    for version in models:  # the Models column of the register run
        assert f"{version.name} v{version.version}" in page, page.why(f"{version.name} v{version.version}")


def test_a_trial_run_page_names_tune_as_its_parent(ui: UI):
    tune = _latest(ui, "tune")
    trials = ui.client.search_runs(
        [ui.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{tune.info.run_id}'"
    )
    assert trials, "the tune run has no child runs"
    trial = trials[0]
    page = ui.render("trial-run", f"experiments/{ui.experiment_id}/runs/{trial.info.run_id}{CLASSIC}")
    assert trial.info.run_name in page, page.why(trial.info.run_name)
    assert "Parent run tune" in page, page.why("Parent run tune")


def _split_metrics(metrics: dict) -> tuple[dict, dict]:
    """(model metrics, system metrics): the UI files `system/...` apart, in their own table and tab."""
    system = {k: v for k, v in metrics.items() if k.startswith("system/")}
    return {k: v for k, v in metrics.items() if k not in system}, system


def test_pretrain_run_page_shows_its_metrics(ui: UI):
    run = _latest(ui, "pretrain")
    metrics = run.data.metrics
    assert "val_acc" in metrics, f"pretrain logged no val_acc: {sorted(metrics)}"
    page = ui.render("pretrain-run", f"experiments/{ui.experiment_id}/runs/{run.info.run_id}{CLASSIC}")
    model, system = _split_metrics(metrics)
    headings = [f"Metrics ({len(metrics)})"]  # split in two tables when there are system metrics
    headings += [f"System metrics ({len(system)})", f"Model metrics ({len(model)})"] if system else []
    for heading in headings:
        assert heading in page, page.why(heading)
    # The Metrics tables: a name, then its latest value as JavaScript writes it.
    for name, value in metrics.items():
        assert f"{name} {js_number(value)}" in page, page.why(f"{name} {js_number(value)}")


def test_pretrain_model_metrics_tab_draws_a_chart_per_metric(ui: UI):
    run = _latest(ui, "pretrain")
    model, _ = _split_metrics(run.data.metrics)
    route = f"experiments/{ui.experiment_id}/runs/{run.info.run_id}/model-metrics{CLASSIC}"
    page = ui.render("pretrain-charts", route, height=2400)  # charts are drawn when on screen: a tall window
    assert f"Model metrics ({len(model)})" in page, page.why(f"Model metrics ({len(model)})")
    for name, value in model.items():
        if [m.step for m in ui.client.get_metric_history(run.info.run_id, name)] == [0]:
            expected = f"{name} {value:.2f}"  # one value at step 0: a bar, labelled with its value
        else:
            expected = f"{run.info.run_name} ({name})"  # a line per run, in the legend
        assert expected in page, page.why(expected)


def _artifact_files(ui: UI, run_id: str, path: str | None = None, depth: int = 3) -> list[str]:
    """Every file under `path` in the run's artifacts, down to `depth` folders."""
    files = []
    for entry in ui.client.list_artifacts(run_id, path):
        if not entry.is_dir:
            files.append(entry.path)
        elif depth > 0:
            files += _artifact_files(ui, run_id, entry.path, depth - 1)
    return files


def test_evaluate_artifacts_are_listed_and_served(ui: UI, tmp_path: Path):
    run = _latest(ui, "evaluate")
    artifacts = ui.client.list_artifacts(run.info.run_id)
    assert artifacts, "the evaluate run logged no artifacts"
    base = f"experiments/{ui.experiment_id}/runs/{run.info.run_id}/artifacts"
    page = ui.render("evaluate-artifacts", f"{base}{CLASSIC}")
    for artifact in artifacts:  # the tree's top level, files and folders
        name = Path(artifact.path).name
        assert re.search(rf"(^| ){re.escape(name)}( |$)", page.text), page.why(name)

    # Opened in the preview, a file's content comes through the server, not only the listing.
    files = _artifact_files(ui, run.info.run_id)
    shown = next((f for f in files if f.endswith(".json")), files[0] if files else None)
    if shown is not None:
        preview = ui.render("evaluate-artifact-preview", f"{base}/{shown}{CLASSIC}")
        expected = f"Path: {run.info.artifact_uri}/{shown}"
        assert expected in preview, preview.why(expected)
        if shown.endswith(".json"):
            content = json.loads(
                Path(ui.client.download_artifacts(run.info.run_id, shown, str(tmp_path))).read_text()
            )
            for key in content if isinstance(content, dict) else ():
                assert f'"{key}"' in preview, preview.why(f'"{key}"')

    # An image is fetched (GET /get-artifact) and shown from a blob: URL once its bytes have arrived.
    image = next((f for f in files if f.lower().endswith(".png")), None)
    if image is None:
        print(f"the evaluate run logs no PNG (artifacts: {files}): no image preview checked")
        return
    preview = ui.render("evaluate-image-preview", f"{base}/{image}{CLASSIC}")
    shown_as = f'<img alt="{image}" src="blob:'
    assert shown_as in preview.dom, preview.why(f"an image {image} loaded into a blob")
    folder = str(Path(image).parent)
    for sibling in (f for f in files if str(Path(f).parent) == folder):  # its folder, opened in the tree
        name = Path(sibling).name
        assert re.search(rf"(^| ){re.escape(name)}( |$)", preview.text), preview.why(name)


def test_registered_model_page_shows_the_champion_version(ui: UI):
    version = ui.client.get_model_version_by_alias(MODEL, ALIAS).version
    page = ui.render("registered-model", f"models/{MODEL}")
    assert MODEL in page, page.why(MODEL)
    # The versions table: "Version <v>", its registration time, tags, then its aliases.
    row = re.search(rf"Version {version}\b(.*?)(Version \d|Previous Next)", page.text)
    assert row, page.why(f"Version {version}")
    assert f"@ {ALIAS}" in row.group(1), page.why(f"Version {version} … @ {ALIAS}")


def test_model_version_page_shows_alias_tags_and_source_run(ui: UI):
    version = ui.client.get_model_version_by_alias(MODEL, ALIAS)
    page = ui.render("model-version", f"models/{MODEL}/versions/{version.version}")
    assert f"Version {version.version}" in page, page.why(f"Version {version.version}")
    assert f"Aliases : @ {ALIAS}" in page, page.why(f"Aliases : @ {ALIAS}")
    source = ui.client.get_run(version.run_id).info.run_name
    assert f"Source Run : {source}" in page, page.why(f"Source Run : {source}")
    assert version.tags or version.description, "the champion version has neither tags nor a description"
    # The description is Markdown, shown rendered: each line's words in order, whatever became of its markup.
    squashed = _squash(page.text)
    for line in (version.description or "").splitlines():
        if _squash(line) and "](" not in line:  # (a link shows its text only)
            assert _squash(line) in squashed, page.why(f"the description's line {line!r}")
    for key, value in version.tags.items():  # the Tags table: name, value
        assert f"{key} {value}" in page, page.why(f"{key} {value}")

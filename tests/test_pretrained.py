"""resnet.weights (torchvision's weights table, torch hub downloads) and resnet.pretrained (source string -> model),
with real components: a local HTTP server behind torch hub's own download code, files written by the pipeline's
`save_model_file`, the session's SeaweedFS S3 server and an MLflow SQLite store."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import subprocess
import sys
import threading
import uuid
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from resnet import weights
from resnet.engine import save_model_file
from resnet.errors import PipelineError
from resnet.models import ResNet, build_model, count_parameters
from resnet.pretrained import (
    KINDS,
    Pretrained,
    _NoRandomInit,
    describe_source,
    load_pretrained,
    state_dict_digest,
    validate_source_syntax,
)

integration = pytest.mark.integration
PREFIX = "finetune.pretrained: "
HEAD = ("fc.weight", "fc.bias")


# --- helpers --------------------------------------------------------------------------------------------------


def seeded(name: str, num_classes: int, seed: int = 0) -> ResNet:
    """A model with reproducible, non-trivial weights (BN statistics included, so buffers are checked too)."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key.endswith(("running_mean", "running_var")):
                tensor.uniform_(0.5, 1.5)
            elif key.endswith("num_batches_tracked"):
                tensor.fill_(7)
    return model


def clone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_backbone_equal(model: torch.nn.Module, expected: dict[str, torch.Tensor], *, head: bool) -> None:
    """Every tensor of `expected` equals the model's (the head too when `head`); the key sets agree."""
    got = model.state_dict()
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        if key in HEAD and not head:
            continue
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key], tensor), key


def assert_pipeline_error(excinfo: pytest.ExceptionInfo, source: str, *parts: str) -> str:
    message = str(excinfo.value)
    assert isinstance(excinfo.value, PipelineError)
    assert "\n" not in message, message
    assert message.startswith(f"{PREFIX}{source}: "), message
    for part in parts:
        assert part in message, message
    return message


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the weights table ----------------------------------------------------------------------------------------


def test_table_matches_torchvision():
    tv_models = pytest.importorskip("torchvision.models")
    models = sorted({entry.model for entry in weights.WEIGHTS.values()})
    assert models == ["resnet101", "resnet152", "resnet18", "resnet34", "resnet50"]
    for model in models:
        enum = tv_models.get_model_weights(model)
        # every published weight of the model is in the table, and nothing else
        published = {f"{model}.{w.name}" for w in enum} | {f"{model}.DEFAULT"}
        assert published == {key for key in weights.WEIGHTS if key.startswith(f"{model}.")}
        assert weights.WEIGHTS[f"{model}.DEFAULT"].name == f"{model}.{enum.DEFAULT.name}"
    for key, entry in weights.WEIGHTS.items():
        model, version = key.split(".")
        tv = tv_models.get_weight(f"{tv_models.get_model_weights(model).__name__}.{version}")
        assert entry.url == tv.url, key
        assert entry.url.startswith(weights.BASE_URL + "/") and entry.file_name == tv.url.rsplit("/", 1)[1]
        assert entry.model == model
        assert entry.num_classes == len(tv.meta["categories"]) == 1000
        assert entry.acc1 == tv.meta["_metrics"]["ImageNet-1K"]["acc@1"], key
        assert entry.acc5 == tv.meta["_metrics"]["ImageNet-1K"]["acc@5"], key
        assert entry.num_params == tv.meta["num_params"], key
        transform = tv.transforms()
        assert [entry.resize_size] == list(transform.resize_size), key
        assert [entry.crop_size] == list(transform.crop_size), key
        assert tuple(transform.mean) == weights.IMAGENET_MEAN and tuple(transform.std) == weights.IMAGENET_STD


def test_table_entries_fit_our_models():
    for name in weights.weights_names():
        entry = weights.get_weights(name)
        with torch.device("meta"), _NoRandomInit():
            model = build_model(entry.model, entry.num_classes)
        assert count_parameters(model) == entry.num_params, name
    assert weights.get_weights("resnet50.DEFAULT") is weights.get_weights("resnet50.IMAGENET1K_V2")
    assert weights.get_weights("resnet34.DEFAULT").name == "resnet34.IMAGENET1K_V1"
    assert (
        weights.WEIGHTS["resnet50.IMAGENET1K_V2"].url
        == "https://download.pytorch.org/models/resnet50-11ad3fa6.pth"
    )
    with pytest.raises(ValueError) as caught:
        weights.get_weights("resnet50.IMAGENET1K_V3")
    assert "'resnet50.IMAGENET1K_V3'" in str(caught.value)
    for name in weights.WEIGHTS:
        assert name in str(caught.value)


def test_mirror_replaces_the_base_url(monkeypatch, tmp_path):
    entry = weights.get_weights("resnet50.IMAGENET1K_V2")
    monkeypatch.delenv(weights.MIRROR_ENV, raising=False)
    assert weights.resolve_url(entry) == entry.url
    monkeypatch.setenv(weights.MIRROR_ENV, "http://mirror.internal:8080/torch/models/")
    assert weights.resolve_url(entry) == "http://mirror.internal:8080/torch/models/resnet50-11ad3fa6.pth"
    monkeypatch.setenv(weights.MIRROR_ENV, str(tmp_path))  # a plain directory
    assert weights.resolve_url(entry) == (tmp_path / "resnet50-11ad3fa6.pth").as_uri()


def test_imports_are_torch_only():
    code = (
        "import sys, resnet.weights, resnet.pretrained; "
        "heavy = sorted(m for m in ('torchvision', 'mlflow', 'boto3', 'botocore', 'ray') if m in sys.modules); "
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# --- torch hub downloads from a local HTTP server ------------------------------------------------------------


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (the base class's signature)
        pass


class WeightsServer:
    """http.server serving a directory on 127.0.0.1, on a port picked by the OS, in a thread."""

    def __init__(self, root: Path) -> None:
        self.root = root
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(timeout=10)
            self.running = False


@pytest.fixture
def weights_server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    server = WeightsServer(root)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache of this test's own: $TORCH_HOME/hub/checkpoints."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.delenv(weights.MIRROR_ENV, raising=False)
    assert weights.cache_dir() == home / "hub" / "checkpoints"
    return home / "hub" / "checkpoints"


def serve_state_dict(root: Path, state_dict: dict[str, torch.Tensor], file_name: str | None = None) -> str:
    """Save `state_dict` in `root` as `file_name`, by default torch hub's `resnet18-<sha256[:8]>.pth`."""
    tmp = root / "upload.tmp"
    torch.save(state_dict, tmp)
    name = file_name or f"resnet18-{sha256_of(tmp)[:8]}.pth"
    tmp.rename(root / name)
    return name


def test_download_through_mirror_loads_caches_and_works_offline(weights_server, torch_home, monkeypatch):
    served = clone_state(seeded("resnet18", 1000))
    name = serve_state_dict(weights_server.root, served)
    # a table entry whose file (unlike torchvision's real one) the test can serve with a matching hash
    entry = dataclasses.replace(
        weights.WEIGHTS["resnet18.IMAGENET1K_V1"], name="resnet18.TEST", url=f"{weights.BASE_URL}/{name}"
    )
    monkeypatch.setitem(weights.WEIGHTS, "resnet18.TEST", entry)
    monkeypatch.setenv(weights.MIRROR_ENV, weights_server.url)

    loaded = load_pretrained("torchvision:resnet18.TEST", 10)
    assert isinstance(loaded, Pretrained) and isinstance(loaded.model, ResNet)
    assert (loaded.model_name, loaded.source, loaded.kind) == (
        "resnet18",
        "torchvision:resnet18.TEST",
        "torchvision",
    )
    assert loaded.num_pretrained_classes == 1000 and loaded.head_replaced
    assert loaded.model.fc.out_features == 10 and loaded.model.fc.in_features == 512
    assert loaded.model.training
    assert_backbone_equal(loaded.model, served, head=False)
    assert not torch.equal(loaded.model.fc.weight, served["fc.weight"][:10])  # a fresh head
    assert loaded.digest == state_dict_digest(served)

    cached = torch_home / name
    assert cached.is_file() and cached.read_bytes() == (weights_server.root / name).read_bytes()
    assert not list(torch_home.glob("*.partial"))

    weights_server.stop()  # from now on only the cache can answer
    again = load_pretrained("torchvision:resnet18.TEST", 1000)
    assert again.digest == loaded.digest and not again.head_replaced
    assert_backbone_equal(again.model, served, head=True)
    direct = weights.download_state_dict_from(f"{weights_server.url}/{name}", progress=False)
    assert list(direct) == list(served) and all(torch.equal(direct[k], served[k]) for k in served)


def test_download_state_dict_from_a_url(weights_server, torch_home):
    served = clone_state(seeded("resnet18", 1000, seed=3))
    name = serve_state_dict(weights_server.root, served)
    got = weights.download_state_dict_from(f"{weights_server.url}/{name}", progress=False)
    assert list(got) == list(served)
    assert all(torch.equal(got[k], served[k]) and got[k].device.type == "cpu" for k in served)
    assert sha256_of(torch_home / name) == sha256_of(weights_server.root / name)


def test_directory_mirror(tmp_path, torch_home, monkeypatch):
    served = clone_state(seeded("resnet18", 1000, seed=1))
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    name = serve_state_dict(mirror, served)
    entry = dataclasses.replace(weights.WEIGHTS["resnet18.IMAGENET1K_V1"], url=f"{weights.BASE_URL}/{name}")
    monkeypatch.setitem(weights.WEIGHTS, "resnet18.MIRRORED", entry)
    monkeypatch.setenv(weights.MIRROR_ENV, str(mirror))  # a plain path: read as file:// through urllib
    got = weights.download_state_dict("resnet18.MIRRORED", progress=False)
    assert all(torch.equal(got[k], served[k]) for k in served)
    assert (torch_home / name).is_file()


def test_wrong_hash_is_refused_and_not_cached(weights_server, torch_home, monkeypatch):
    # our weights under torchvision's real file name: their sha256 does not start with f37072fd
    name = serve_state_dict(
        weights_server.root, clone_state(seeded("resnet18", 1000)), "resnet18-f37072fd.pth"
    )
    assert not sha256_of(weights_server.root / name).startswith("f37072fd")
    monkeypatch.setenv(weights.MIRROR_ENV, weights_server.url + "/")
    url = f"{weights_server.url}/resnet18-f37072fd.pth"

    with pytest.raises(weights.WeightsError) as caught:
        weights.download_state_dict("resnet18.IMAGENET1K_V1", progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{url}: ") and "sha256" in message and '"f37072fd"' in message, message
    assert not list(torch_home.iterdir())  # nothing cached, no partial file left

    with pytest.raises(PipelineError) as caught:
        load_pretrained("torchvision:resnet18.DEFAULT", 10)
    assert_pipeline_error(caught, "torchvision:resnet18.DEFAULT", url, "sha256")


def test_dead_mirror_and_missing_file_name_the_url(weights_server, torch_home, monkeypatch):
    # a port that was free a moment ago and on which nothing listens
    dead = WeightsServer(weights_server.root)
    dead_url = dead.url
    dead.stop()
    monkeypatch.setenv(weights.MIRROR_ENV, dead_url)
    with pytest.raises(weights.WeightsError) as caught:
        weights.download_state_dict("resnet50.IMAGENET1K_V2", progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"cannot download {dead_url}/resnet50-11ad3fa6.pth: "), message
    assert "refused" in message.lower(), message
    assert f"place resnet50-11ad3fa6.pth in {torch_home}" in message and "RESNET_WEIGHTS_MIRROR" in message

    monkeypatch.setenv(weights.MIRROR_ENV, weights_server.url)  # up, but without the file
    with pytest.raises(PipelineError) as caught:
        load_pretrained("torchvision:resnet50.DEFAULT", 10)
    assert_pipeline_error(
        caught,
        "torchvision:resnet50.DEFAULT",
        f"cannot download {weights_server.url}/resnet50-11ad3fa6.pth: HTTP 404",
    )
    assert not list(torch_home.iterdir())


def test_preplaced_cache_file_needs_no_network(tmp_path, torch_home, monkeypatch):
    """The air-gapped recipe: torchvision's file copied into the cache dir. Like torchvision's 2017 files, this one
    has no BatchNorm `num_batches_tracked` counters (saved before PyTorch 0.4.1); they start at 0."""
    served = clone_state(seeded("resnet18", 1000, seed=2))
    old_style = {k: v for k, v in served.items() if not k.endswith("num_batches_tracked")}
    torch_home.mkdir(parents=True)
    torch.save(old_style, torch_home / "resnet18-f37072fd.pth")  # the cache does not check hashes
    monkeypatch.setenv(weights.MIRROR_ENV, "http://127.0.0.1:9")  # nothing there: no download may happen

    loaded = load_pretrained("torchvision:resnet18.IMAGENET1K_V1", 7)
    assert loaded.model.fc.out_features == 7 and loaded.num_pretrained_classes == 1000
    expected = {k: (torch.tensor(0) if k.endswith("num_batches_tracked") else v) for k, v in served.items()}
    assert_backbone_equal(loaded.model, expected, head=False)

    with pytest.raises(PipelineError) as caught:
        load_pretrained("torchvision:resnet50.IMAGENET1K_V1", 7, model="resnet18")
    assert_pipeline_error(
        caught, "torchvision:resnet50.IMAGENET1K_V1", "resnet50", "finetune.model is resnet18"
    )


def test_corrupt_cached_file_says_to_delete_it(torch_home, monkeypatch):
    torch_home.mkdir(parents=True)
    (torch_home / "resnet34-b627a593.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(weights.WeightsError) as caught:
        weights.download_state_dict("resnet34.IMAGENET1K_V1", progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{torch_home / 'resnet34-b627a593.pth'}: ") and "delete the file" in message


# --- local files ---------------------------------------------------------------------------------------------


def test_a_model_file_whose_weights_changed_since_it_was_saved_is_refused(tmp_path):
    """Model files carry the sha256 of their weights (engine.save_model_file); a starting point whose weights no
    longer match it is refused, by path or as the pretrain stage's output, before fine-tuning begins."""
    path = tmp_path / "model.pt"
    save_model_file(path, seeded("resnet20", 10), {"model_name": "resnet20", "num_classes": 10})
    blob = torch.load(path, weights_only=True)
    assert blob["meta"]["weights_sha256"] == state_dict_digest(blob["model"])
    blob["model"]["conv1.weight"][0, 0, 0, 0] += 0.5
    torch.save(blob, path)
    for source, kwargs in ((str(path), {}), ("pretrain", {"pretrain_path": path})):
        with pytest.raises(PipelineError) as caught:
            load_pretrained(source, 10, **kwargs)
        assert "its weights do not match the sha256 saved with them" in str(caught.value), caught.value


def test_model_file_keeps_or_replaces_the_head(tmp_path):
    model = seeded("resnet20", 10)
    saved = clone_state(model)
    path = tmp_path / "model.pt"
    save_model_file(path, model, {"model_name": "resnet20", "num_classes": 10, "classes": list("abcdefghij")})

    same = load_pretrained(str(path), 10)
    assert (same.model_name, same.kind, same.num_pretrained_classes) == ("resnet20", "file", 10)
    assert not same.head_replaced
    assert_backbone_equal(same.model, saved, head=True)
    assert (
        same.digest
        == state_dict_digest(saved)
        == hashlib.sha256(
            b"".join(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() for t in saved.values())
        ).hexdigest()
    )

    other = load_pretrained(str(path), 5, model="resnet20")
    assert other.model.fc.out_features == 5 and other.num_pretrained_classes == 10 and other.head_replaced
    assert other.model.fc.weight.shape == (5, 64)
    assert_backbone_equal(
        other.model,
        {k: v for k, v in saved.items() if k not in HEAD}
        | {"fc.weight": other.model.fc.weight, "fc.bias": other.model.fc.bias},
        head=False,
    )
    assert other.digest == same.digest  # the digest is the starting point's, before the head swap

    # the same weights as a pipeline `pretrain` source and as a checkpoint directory
    by_stage = load_pretrained("pretrain", 10, pretrain_path=path)
    by_dir = load_pretrained(str(tmp_path), 10)
    assert by_stage.kind == "pretrain" and by_stage.digest == by_dir.digest == same.digest

    with pytest.raises(PipelineError) as caught:
        load_pretrained(str(path), 10, model="resnet32")
    assert_pipeline_error(caught, str(path), "resnet20", "finetune.model is resnet32")


def test_raw_state_dicts_infer_the_architecture(tmp_path):
    model = seeded("resnet18_cifar", 10, seed=4)
    saved = clone_state(model)
    raw = tmp_path / "raw.pth"
    torch.save(saved, raw)
    loaded = load_pretrained(str(raw), 10)
    assert loaded.model_name == "resnet18_cifar" and loaded.num_pretrained_classes == 10
    assert_backbone_equal(loaded.model, saved, head=True)

    # a DDP save wrapped as {"state_dict": {"module.…": …}}, loaded for 3 classes
    ddp = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in saved.items()}, "epoch": 3}, ddp)
    wrapped = load_pretrained(str(ddp), 3)
    assert wrapped.model_name == "resnet18_cifar" and wrapped.model.fc.out_features == 3
    assert_backbone_equal(
        wrapped.model,
        saved | {"fc.weight": wrapped.model.fc.weight, "fc.bias": wrapped.model.fc.bias},
        head=True,
    )
    assert wrapped.digest == loaded.digest == state_dict_digest(saved)

    # the architecture may be given; then it must fit
    assert load_pretrained(str(raw), 10, model="resnet18_cifar").digest == loaded.digest
    with pytest.raises(PipelineError) as caught:
        load_pretrained(str(raw), 10, model="resnet18")
    assert_pipeline_error(caught, str(raw), "does not fit resnet18", "conv1.weight has shape [64, 3, 3, 3]")

    # every registered ImageNet-layout net is told apart from the others (resnet34 vs resnet18: block counts)
    sd34 = tmp_path / "r34.pth"
    torch.save(seeded("resnet34", 4).state_dict(), sd34)
    assert load_pretrained(str(sd34), 4).model_name == "resnet34"


def test_none_is_random_init_of_the_given_model():
    torch.manual_seed(0)
    first = load_pretrained("none", 10, model="resnet20")
    torch.manual_seed(0)
    second = load_pretrained("none", 10, model="resnet20")
    assert (first.kind, first.model_name, first.num_pretrained_classes) == ("none", "resnet20", 10)
    assert first.model.fc.out_features == 10 and first.digest == second.digest
    torch.manual_seed(0)
    assert first.digest == state_dict_digest(build_model("resnet20", 10).state_dict())
    with pytest.raises(PipelineError) as caught:
        load_pretrained("none", 10)
    assert_pipeline_error(caught, "none", "finetune.model")


def test_sources_that_are_not_models(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(PipelineError) as caught:
        load_pretrained(str(missing), 10)
    assert_pipeline_error(caught, str(missing), "no such file")

    with pytest.raises(PipelineError) as caught:
        load_pretrained("pretrain", 10, pretrain_path=missing)
    assert_pipeline_error(caught, "pretrain", f"no such file {missing}", "pretrain stage")

    text = tmp_path / "notes.txt"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(PipelineError) as caught:
        load_pretrained(str(text), 10)
    assert_pipeline_error(caught, str(text), "not a model file or state dict", "torch.save")

    linear = tmp_path / "linear.pt"  # a state dict, but of something else
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 3)).state_dict(), linear)
    with pytest.raises(PipelineError) as caught:
        load_pretrained(str(linear), 10)
    assert_pipeline_error(caught, str(linear), "keys match no known ResNet", "0.weight")

    pickled = tmp_path / "module.pt"  # a whole pickled module: weights_only refuses it
    torch.save(build_model("resnet20", 10), pickled)
    with pytest.raises(PipelineError) as caught:
        load_pretrained(str(pickled), 10)
    assert_pipeline_error(caught, str(pickled), "resnet.models.ResNet", "state_dict()")

    training_state = tmp_path / "state.pt"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, training_state)
    with pytest.raises(PipelineError) as caught:
        load_pretrained(str(training_state), 10)
    assert_pipeline_error(caught, str(training_state), "not a model file or state dict", "epoch, optimizer")

    bad_meta = tmp_path / "bad_meta.pt"
    torch.save({"meta": {"model_name": "resnet9"}, "model": seeded("resnet20", 10).state_dict()}, bad_meta)
    with pytest.raises(PipelineError) as caught:
        load_pretrained(str(bad_meta), 10)
    assert_pipeline_error(caught, str(bad_meta), "unknown model 'resnet9'")

    empty_dir = tmp_path / "checkpoint_000001"
    empty_dir.mkdir()
    with pytest.raises(PipelineError) as caught:
        load_pretrained(str(empty_dir), 10)
    assert_pipeline_error(caught, str(empty_dir), "without model.pt")

    with pytest.raises(PipelineError) as caught:
        load_pretrained("torchvision:resnet50.IMAGENET1K_V3", 10)
    assert_pipeline_error(
        caught, "torchvision:resnet50.IMAGENET1K_V3", "resnet50.IMAGENET1K_V2", "resnet18.DEFAULT"
    )


@pytest.mark.parametrize(
    ("source", "kind"),
    [
        ("pretrain", "pretrain"),
        ("none", "none"),
        ("torchvision:resnet50.IMAGENET1K_V2", "torchvision"),
        ("s3://bucket/models/model.pt", "s3"),
        ("models:/digits@champion", "mlflow"),
        ("models:/digits/3", "mlflow"),
        ("runs:/0123abcd/model", "mlflow"),
        ("models/pretrain/model.pt", "file"),
        ("/abs/checkpoint_000004", "file"),
    ],
)
def test_describe_and_validate_good_sources(source, kind):
    assert describe_source(source) == kind and kind in KINDS
    validate_source_syntax(source)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("", "empty source"),
        ("   ", "empty source"),
        (" pretrain", "whitespace"),
        ("torchvision:", "unknown torchvision weights"),
        ("torchvision:resnet50", "resnet50.IMAGENET1K_V2"),
        ("torchvision:resnet20.IMAGENET1K_V1", "resnet152.DEFAULT"),
        ("models:/", "models:/NAME/VERSION"),
        ("models:/@champion", "models:/NAME@ALIAS"),
        ("models:/digits@", "models:/NAME@ALIAS"),
        ("models:/digits/", "models:/NAME/VERSION"),
        ("runs:/", "runs:/RUN_ID/PATH"),
        ("runs:/0123abcd", "runs:/RUN_ID/PATH"),
        ("s3://bucket", "s3://BUCKET/KEY"),
        ("s3:///key", "s3://BUCKET/KEY"),
    ],
)
def test_syntax_errors_without_io(source, expected):
    with pytest.raises(ValueError) as caught:
        validate_source_syntax(source)
    assert expected in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(PipelineError) as caught:
        load_pretrained(source, 10, model="resnet20")
    assert_pipeline_error(caught, source, expected)


# --- S3 --------------------------------------------------------------------------------------------------------


@integration
def test_s3_model_file(s3_env, tmp_path):
    from resnet.data import s3

    model = seeded("resnet20", 10, seed=5)
    saved = clone_state(model)
    path = tmp_path / "model.pt"
    save_model_file(path, model, {"model_name": "resnet20", "num_classes": 10})
    prefix = f"tests/pretrained-{uuid.uuid4().hex[:12]}"
    s3.s3_client().upload_file(str(path), "ray", f"{prefix}/checkpoint_000002/model.pt")

    source = f"s3://ray/{prefix}/checkpoint_000002/model.pt"
    loaded = load_pretrained(source, 4)
    assert (loaded.kind, loaded.model_name, loaded.num_pretrained_classes) == ("s3", "resnet20", 10)
    assert loaded.model.fc.out_features == 4
    assert_backbone_equal(
        loaded.model,
        saved | {"fc.weight": loaded.model.fc.weight, "fc.bias": loaded.model.fc.bias},
        head=True,
    )
    assert loaded.digest == state_dict_digest(saved)
    # a checkpoint "directory" (a prefix ending in /) means its model.pt
    assert load_pretrained(f"s3://ray/{prefix}/checkpoint_000002/", 10).digest == loaded.digest

    missing = f"s3://ray/{prefix}/nope.pt"
    with pytest.raises(PipelineError) as caught:
        load_pretrained(missing, 10)
    message = assert_pipeline_error(caught, missing, "no such object")
    assert message == f"{PREFIX}{missing}: no such object"

    with pytest.raises(PipelineError) as caught:
        load_pretrained("s3://no-such-bucket-here/model.pt", 10)
    assert_pipeline_error(caught, "s3://no-such-bucket-here/model.pt", "no such bucket")


# --- MLflow ----------------------------------------------------------------------------------------------------


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A SQLite tracking store in tmp_path, reached the way a stage reaches it: MLFLOW_TRACKING_URI only."""
    import mlflow.tracking._tracking_service.utils as tracking_utils

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)  # forget a URI set by an earlier test
    return uri


@integration
def test_the_stages_find_an_mlflow_model_in_the_projects_store(tmp_path, monkeypatch, tiny_fractals):
    """`finetune.pretrained: models:/NAME@champion` resolves in the project's tracking store (here
    `mlflow.tracking_uri` in params, MLFLOW_TRACKING_URI unset). Before, the stages asked MLflow's own default
    store (./mlflow.db), did not find the model, and left that file behind."""
    import mlflow
    import mlflow.pytorch
    import mlflow.tracking._tracking_service.utils as tracking_utils
    from mlflow.tracking import MlflowClient

    from resnet.config import parse_config
    from resnet.predict import Classifier
    from resnet.stages import pretrain

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    store = f"sqlite:///{tmp_path / 'project.db'}"
    model = seeded("resnet20", 10, seed=7)
    mlflow.set_tracking_uri(store)
    try:
        experiment = MlflowClient().create_experiment(
            "x", artifact_location=(tmp_path / "artifacts").as_uri()
        )
        with mlflow.start_run(experiment_id=experiment):
            info = mlflow.pytorch.log_model(
                Classifier(model, (0.5,) * 3, (0.25,) * 3).eval(),
                name="model",
                registered_model_name="project-model",
                input_example=np.zeros((2, 3, 32, 32), dtype=np.float32),
                pip_requirements=["torch"],
                serialization_format="pickle",
            )
        MlflowClient().set_registered_model_alias("project-model", "champion", info.registered_model_version)
    finally:  # back to MLflow's own default (set_tracking_uri also exports MLFLOW_TRACKING_URI)
        monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert mlflow.get_tracking_uri() != store
    cfg = parse_config(
        {
            "datasets": {"fractals": {"source": "fractals"}},
            "pretrain": {"dataset": "fractals"},
            "finetune": {"dataset": "fractals", "pretrained": "models:/project-model@champion"},
            "mlflow": {"tracking_uri": store},
        }
    )
    summary = pretrain.run(cfg, data=str(tiny_fractals), out="out", metrics="pretrain.json")
    assert summary["kind"] == "mlflow" and summary["digest"] == state_dict_digest(clone_state(model))
    assert not (tmp_path / "mlflow.db").exists()


@integration
def test_mlflow_model_uris(mlflow_store, tmp_path):
    import mlflow
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    from resnet.predict import Classifier

    assert mlflow.get_tracking_uri() == mlflow_store
    model = seeded("resnet20", 10, seed=6)
    saved = clone_state(model)
    client = MlflowClient()
    experiment = client.create_experiment(
        "pretrained-tests", artifact_location=(tmp_path / "artifacts").as_uri()
    )
    name = "pretrained-test-model"
    classifier = Classifier(model, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).eval()  # eval, as load_classifier
    runs, versions = {}, {}
    # version 1: as resnet.registry logs it (MLflow's default pt2 export, a traced graph whose `.model` is no
    # longer our ResNet class); version 2: the pickle format (unpickles to resnet.predict.Classifier)
    for fmt in ("pt2", "pickle"):
        with mlflow.start_run(experiment_id=experiment) as run:
            info = mlflow.pytorch.log_model(
                classifier,
                name="model",
                registered_model_name=name,
                # the pt2 export traces the model on this example (batch 2: a dynamic batch dimension)
                input_example=np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32),
                pip_requirements=["torch"],  # skip requirement inference (slow, and irrelevant here)
                serialization_format=fmt,
            )
        runs[fmt], versions[fmt] = run.info.run_id, int(info.registered_model_version)
    assert versions == {"pt2": 1, "pickle": 2}
    client.set_registered_model_alias(name, "champion", versions["pt2"])
    assert_backbone_equal(classifier.model, saved, head=True)  # logging changed nothing

    by_alias = load_pretrained(f"models:/{name}@champion", 10)
    assert (by_alias.kind, by_alias.model_name, by_alias.num_pretrained_classes) == ("mlflow", "resnet20", 10)
    assert type(by_alias.model) is ResNet and not by_alias.head_replaced
    assert_backbone_equal(by_alias.model, saved, head=True)
    assert by_alias.digest == state_dict_digest(saved)

    by_version = load_pretrained(f"models:/{name}/{versions['pickle']}", 3, model="resnet20")
    assert type(by_version.model) is ResNet and by_version.model.fc.out_features == 3
    assert by_version.digest == by_alias.digest

    for fmt, run_id in runs.items():
        by_run = load_pretrained(f"runs:/{run_id}/model", 10)
        assert_backbone_equal(by_run.model, saved, head=True)
        assert by_run.digest == by_alias.digest, fmt

    with pytest.raises(PipelineError) as caught:
        load_pretrained("models:/nope/1", 10)
    assert_pipeline_error(caught, "models:/nope/1", "MLflow", mlflow_store, "nope")

    with pytest.raises(PipelineError) as caught:
        load_pretrained(f"models:/{name}@champion", 10, model="resnet32")
    assert_pipeline_error(caught, f"models:/{name}@champion", "does not fit resnet32")

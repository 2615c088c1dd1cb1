"""The one typed schema of `params.yaml`.

Configuration enters a stage once, as a validated `Config`, and is passed down. Every section forbids unknown
keys, so a typo is an error naming the key rather than a silently ignored setting. Service addresses are not
here unless the user puts them here: by default they come from the standard environment variables
(`RAY_ADDRESS`, `MLFLOW_TRACKING_URI`), and with neither set everything runs embedded.

Imports only the standard library, pydantic and PyYAML, so any module may depend on it.
"""

from __future__ import annotations

import itertools
import math
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from resnet.errors import PipelineError

DEFAULT_PARAMS = "params.yaml"


class ConfigError(PipelineError):
    """A params file that cannot be used; the message is one line naming the file and the key."""


NUMBER_TYPES = (int, float, int | None, float | None)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, raw: Any) -> Any:
        # pydantic's lax mode reads `epochs: true` as 1; in a params file that is a mistake, not a number.
        if isinstance(raw, dict):
            for key, value in raw.items():
                field = cls.model_fields.get(key)
                if isinstance(value, bool) and field is not None and field.annotation in NUMBER_TYPES:
                    # "@key:" tells _format_error to report the field's own dotted path, not the section's.
                    raise ValueError(f"@{key}: expected a number, got a boolean ({str(value).lower()})")
        return raw


# ---------------------------------------------------------------- data


class SplitConfig(Section):
    """Fractions of each class held out; the rest is the training split (stratified, seeded)."""

    val: float = Field(0.15, gt=0, lt=0.5)
    test: float = Field(0.15, gt=0, lt=0.5)


class FractalsConfig(Section):
    """The `fractals` source: IFS classes rendered by the chaos game, determined by `seed`."""

    num_classes: int = Field(50, ge=2, le=10_000)
    per_class: int = Field(40, ge=3, le=100_000)
    seed: int = Field(0, ge=0)
    points: int = Field(1500, ge=100, le=1_000_000)  # chaos-game iterations per image
    jitter: float = Field(0.1, ge=0, le=0.5)  # relative per-image perturbation of the maps


PATH_SOURCES = ("cifar10", "cifar100", "imagefolder")  # the sources that read files (local or s3://)
DATASET_NAME = r"^[a-z0-9][a-z0-9_-]*$"  # a directory name and a DVC stage name (prepare@NAME)


class DatasetConfig(Section):
    """One dataset the prepare stage builds into data/prepared/<name>: where the images come from and how
    they are decoded, checked, resized and split."""

    source: Literal["digits", "fractals", "cifar10", "cifar100", "imagefolder"]
    # cifar10/cifar100: the python-pickle archive (.tar.gz, local or s3://), or null to download it;
    # imagefolder: a directory of class directories, local or s3://bucket/prefix.
    path: str | None = None
    image_size: int = Field(32, ge=8, le=512)
    resize: Literal["stretch", "center_crop", "pad"] = "center_crop"  # for images that are not square
    min_size: int = Field(8, ge=1)  # smaller images (either side, in pixels) are rejected as too small
    max_rejected: float = Field(0.05, ge=0, le=1)  # fail if more than this fraction of files is rejected
    split: SplitConfig = SplitConfig()
    seed: int = Field(0, ge=0)
    shard_size: int = Field(10_000, ge=1)  # images per Parquet shard
    fractals: FractalsConfig = FractalsConfig()

    @model_validator(mode="after")
    def _path_fits_source(self):
        if self.source == "imagefolder" and not self.path:
            raise ValueError("@path: required for source imagefolder (a directory or s3://bucket/prefix)")
        if self.path is not None and self.source not in PATH_SOURCES:
            raise ValueError(
                f"@path: source {self.source} reads no files; path is for {', '.join(PATH_SOURCES)}"
            )
        return self

    def source_options(self) -> dict[str, Any]:
        """The selected source's own settings, as keyword arguments for `load_source`."""
        if self.source == "fractals":
            return self.fractals.model_dump()
        if self.source == "imagefolder":
            return {"path": self.path, "resize": self.resize, "min_size": self.min_size}
        if self.source in ("cifar10", "cifar100"):
            return {"path": self.path}
        return {}


DEFAULT_DATASETS = {
    # The offline default: pretrain on formula-driven fractals (the stand-in for ImageNet), fine-tune on digits.
    "fractals": DatasetConfig(source="fractals", split=SplitConfig(val=0.1, test=0.1)),
    "digits": DatasetConfig(source="digits"),
}


class AugmentConfig(Section):
    """Training-time augmentation of uint8 batches, in torchvision's reference order: pad-and-crop and flip,
    an automatic policy per image, random erasing, then mixup or cutmix across the batch."""

    crop_padding: int = Field(4, ge=0, le=64)
    hflip: bool = False  # off by default: handwritten digits are not mirror-symmetric
    policy: Literal["none", "trivialaugment", "randaugment"] = "none"
    randaugment_num_ops: int = Field(2, ge=1, le=10)
    randaugment_magnitude: int = Field(9, ge=0, le=30)
    random_erasing: float = Field(0.0, ge=0, le=1)  # probability per image
    mixup_alpha: float = Field(0.0, ge=0)  # 0: off
    cutmix_alpha: float = Field(0.0, ge=0)  # 0: off; with mixup too, each batch picks one of the two


# ---------------------------------------------------------------- training


class OptimizerConfig(Section):
    """The training recipe either stage shares: optimiser, schedule, batch, precision, regularisation, stopping.

    torchvision's classification reference and timm are the bar: every knob there that matters for a ResNet
    is here, with their defaults where the two agree.
    """

    epochs: int = Field(ge=1, le=10_000)
    batch_size: int = Field(
        32, ge=1, le=65_536
    )  # global, per optimiser step: split over workers (and micro-batches)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(gt=0, le=10)  # peak LR (after warmup)
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd
    nesterov: bool = False  # sgd
    betas: tuple[float, float] = (0.9, 0.999)  # adamw
    weight_decay: float = Field(5e-4, ge=0, le=1)  # on conv/linear weights only, never on norm or bias
    # Per optimiser step: cosine decays to 0; step multiplies by lr_step_gamma every lr_step_epochs; onecycle is
    # torch's OneCycleLR (its rise is warmup_epochs, or 30% of the run when 0); constant holds the peak.
    schedule: Literal["cosine", "step", "onecycle", "constant"] = "cosine"
    warmup_epochs: int = Field(0, ge=0)  # linear warmup from ~0 to lr (cosine, step, constant)
    lr_step_epochs: int = Field(30, ge=1)
    lr_step_gamma: float = Field(0.1, gt=0, le=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    dropout: float = Field(0.0, ge=0, lt=1)  # before the classifier
    grad_clip_norm: float = Field(0.0, ge=0)  # clip the global gradient norm to this; 0: off
    accumulate_steps: int = Field(
        1, ge=1, le=1024
    )  # micro-batches per optimiser step (same maths, less memory)
    # bf16, or fp16 with a gradient scaler: autocast on GPU (CPU autocast works but is rarely faster)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = True  # NHWC memory format: faster convolutions on CPU (oneDNN) and tensor cores
    compile: bool = False  # torch.compile the model (first epoch pays the compilation)
    ema_decay: float = Field(0.0, ge=0, lt=1)  # > 0: validate, checkpoint and hand on an EMA of the weights
    metric: Literal["val_acc", "val_loss"] = "val_acc"  # picks the best checkpoints; drives early stopping
    early_stopping_patience: int = Field(0, ge=0)  # stop after this many epochs without improvement; 0: off
    early_stopping_min_delta: float = Field(0.0, ge=0)  # smaller improvements do not count
    deterministic: bool = False  # deterministic kernels (slower; cuDNN autotuning off)
    # memory: the prepared split as one uint8 tensor per worker (small data); ray_data: the train split
    # streams from its Parquet shards through Ray Data to each worker's shard (data larger than memory).
    loader: Literal["memory", "ray_data"] = "memory"

    @model_validator(mode="after")
    def _warmup_within_epochs(self):
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise ValueError(
                f"@warmup_epochs: must be less than epochs ({self.epochs}), got {self.warmup_epochs}"
            )
        return self

    @field_validator("betas")
    @classmethod
    def _betas_in_unit_interval(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"expected two numbers in [0, 1), got {list(betas)}")
        return betas

    @property
    def mode(self) -> Literal["max", "min"]:
        """Whether `metric` is maximised or minimised."""
        return "max" if self.metric == "val_acc" else "min"


class PretrainConfig(OptimizerConfig):
    dataset: str = "fractals"  # a key of `datasets`
    model: str = "resnet20"
    epochs: int = Field(6, ge=1, le=10_000)
    lr: float = Field(0.1, gt=0, le=10)
    warmup_epochs: int = Field(1, ge=0)
    zero_init_residual: bool = False
    seed: int = Field(0, ge=0)

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        from resnet.models import available_models  # torch-only; imported here to keep config light

        valid = available_models()
        if name not in valid:
            raise ValueError(f"unknown model {name!r}: expected one of {', '.join(valid)}")
        return name


class FinetuneConfig(OptimizerConfig):
    """One fine-tuning run: where the weights start, which layers train when and at what LR (the strategy),
    and the recipe. The sweep overrides fields from `tune.search_space`.

    The network is split top-down into groups: the head (`fc`, depth 0), the stages from the last to the
    first (layer4 ... layer1, depth 1..n) and the stem (conv1/bn1, depth n+1). Strategies say from which epoch
    each group trains; `lr_decay` gives a group at depth d the LR `lr × lr_decay^d`.
    """

    dataset: str = "digits"  # a key of `datasets`: the target the sweep, evaluate and register use
    # pretrain (the pretrain stage's model) | none (random init: the from-scratch baseline) |
    # torchvision:resnet50.IMAGENET1K_V2 (torch hub download) | a local file or directory | s3://bucket/key |
    # an MLflow model URI (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/PATH). See resnet/pretrained.py.
    pretrained: str = Field("pretrain", min_length=1)
    model: str | None = (
        None  # the architecture for `none`, and for a state dict (null: inferred from its keys)
    )
    # full: every group from the start | linear_probe: the head only (a frozen feature extractor) |
    # lp_ft: the head for lp_epochs, then everything (Kumar et al. 2022) | gradual: the head for lp_epochs,
    # then one more group every unfreeze_epochs, top-down (ULMFiT; the stem comes with the first stage).
    strategy: Literal["full", "linear_probe", "lp_ft", "gradual"] = "full"
    lp_epochs: int = Field(1, ge=0)  # lp_ft and gradual: head-only epochs first
    unfreeze_epochs: int = Field(1, ge=1)  # gradual: epochs between unfreezing one more group
    lr_decay: float = Field(1.0, gt=0, le=1)  # layer-wise LR decay: depth d trains at lr × lr_decay^d; 1: off
    # BatchNorm keeps its pretrained running statistics (eval mode) and its scale and shift. Frozen groups'
    # BN layers are always kept so: train-mode BN would drift the features of a "frozen" backbone.
    freeze_bn: bool = False
    # Each backbone group's LR rises linearly from 0 over this many epochs after it starts training (the head
    # starts at full LR): a fresh head's large early gradients do not wreck the pretrained features.
    backbone_warmup_epochs: int = Field(0, ge=0)
    epochs: int = Field(15, ge=1, le=10_000)
    lr: float = Field(0.02, gt=0, le=10)
    seed: int = Field(0, ge=0)

    @field_validator("pretrained")
    @classmethod
    def _pretrained_syntax(cls, source: str) -> str:
        from resnet.pretrained import validate_source_syntax  # torch-only; imported here to keep config light

        validate_source_syntax(source)
        return source

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str | None) -> str | None:
        return name if name is None else PretrainConfig._known_model(name)

    @model_validator(mode="after")
    def _strategy_fits_epochs(self):
        if self.strategy == "lp_ft" and not 1 <= self.lp_epochs < self.epochs:
            raise ValueError(
                f"@lp_epochs: lp_ft needs 1 <= lp_epochs < epochs ({self.epochs}), got {self.lp_epochs}"
            )
        if self.strategy == "gradual" and self.lp_epochs >= self.epochs:
            raise ValueError(
                f"@lp_epochs: gradual needs lp_epochs < epochs ({self.epochs}), got {self.lp_epochs}"
            )
        if self.backbone_warmup_epochs and self.schedule == "onecycle":
            raise ValueError(
                "@backbone_warmup_epochs: needs schedule cosine, step or constant (onecycle has its own warmup)"
            )
        if self.pretrained == "none" and self.model is None:
            raise ValueError(
                "@model: required with pretrained: none (which architecture to start from scratch)"
            )
        return self


# ---------------------------------------------------------------- sweep


class Interval(Section):
    """A distribution over [low, high] (or [low, high) for integers): low must be below high."""

    @model_validator(mode="after")
    def _ordered(self):
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be less than high ({self.high})")
        return self


class LogUniform(Interval):
    distribution: Literal["loguniform"]
    low: float = Field(gt=0)
    high: float = Field(gt=0)


class Uniform(Interval):
    distribution: Literal["uniform"]
    low: float
    high: float


class RandInt(Interval):
    """Integers in [low, high): Ray Tune's convention (upper bound exclusive)."""

    distribution: Literal["randint"]
    low: int
    high: int


class Choice(Section):
    distribution: Literal["choice"]
    values: list[Any] = Field(min_length=1)


DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")
MAX_CORNERS = 4096  # search-space corners validated together; beyond, each key's on its own


def _corners(dist) -> list[Any]:
    """The values a distribution can draw that are most likely to break a config: every choice, both ends."""
    if dist.distribution == "choice":
        return list(dist.values)
    if dist.distribution == "randint":
        return [dist.low, dist.high - 1]  # [low, high): Ray Tune's convention
    return [dist.low, dist.high]


Distribution = Annotated[LogUniform | Uniform | RandInt | Choice, Field(discriminator="distribution")]


class AshaConfig(Section):
    """ASHA early stopping: a trial must survive `grace_period` epochs; each rung keeps 1/reduction_factor."""

    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(3.0, gt=1)
    # What a rung counts: epoch | backbone_epochs (epochs in which the backbone trained: a head-only phase,
    # lp_ft's and gradual's first lp_epochs, does not count, so such a trial is first compared with the
    # others after it has fine-tuned as long as they have, not while only its new head trains).
    clock: Literal["epoch", "backbone_epochs"] = "backbone_epochs"
    # The epoch at which a trial has run to the end (ASHA's max_t). It is the trial's length, so it must be
    # null (the default: finetune.epochs, or the largest value search_space.epochs can draw) or equal to it.
    max_epochs: int | None = Field(None, ge=1)


# The sections a search space may draw into. Their field names do not overlap (checked at import), so a key
# names its section unambiguously: `lr` is finetune.lr, `mixup_alpha` is augment.mixup_alpha.
SEARCHABLE = {"finetune": FinetuneConfig, "augment": AugmentConfig}
assert not set(FinetuneConfig.model_fields) & set(AugmentConfig.model_fields)
INTEGER_FIELDS = (int, int | None)
# finetune fields that decide what the driver loads once for every trial: a drawn value would be recorded but
# not used, so they are refused rather than ignored.
NOT_SEARCHABLE = {
    "pretrained": "every trial starts from the weights the driver loads once; run one sweep per source",
    "model": "every trial starts from the weights the driver loads once; run one sweep per architecture",
    "dataset": "every trial trains on the data the driver loads once; run one sweep per dataset",
}

DEFAULT_SEARCH_SPACE = {
    "lr": {"distribution": "loguniform", "low": 0.03, "high": 0.12},
    "strategy": {"distribution": "choice", "values": ["full", "lp_ft", "gradual"]},
    "lp_epochs": {"distribution": "randint", "low": 1, "high": 3},
    "lr_decay": {"distribution": "uniform", "low": 0.5, "high": 1.0},
    "weight_decay": {"distribution": "loguniform", "low": 1e-5, "high": 1e-3},
    "label_smoothing": {"distribution": "choice", "values": [0.0, 0.1]},
    "mixup_alpha": {"distribution": "choice", "values": [0.2]},
    "batch_size": {"distribution": "choice", "values": [32, 64]},
}


def searchable_section(key: str) -> str | None:
    """The section (`finetune` or `augment`) that a search-space key belongs to, or None."""
    return next((name for name, section in SEARCHABLE.items() if key in section.model_fields), None)


class TuneConfig(Section):
    num_samples: int = Field(9, ge=1, le=10_000)
    seed: int = Field(0, ge=0)  # the sampler's: the same params draw the same trial configurations
    # What ASHA compares and the best checkpoint is picked by. val_loss: on a small validation split accuracy
    # saturates (many checkpoints at 0.996-1.0 on digits' 269 images), the loss still tells them apart.
    metric: Literal["val_acc", "val_loss"] = "val_loss"
    # random: independent draws (seeded) | optuna: TPE, which proposes from the results so far
    search: Literal["random", "optuna"] = "random"
    asha: AshaConfig = AshaConfig()
    workers_per_trial: int | None = Field(1, ge=1)  # Ray Train workers of each trial; null: ray.num_workers
    max_concurrent_trials: int | None = Field(None, ge=1)  # None: as many as the cluster's resources allow
    search_space: dict[str, Distribution] = Field(
        default_factory=lambda: dict(DEFAULT_SEARCH_SPACE), validate_default=True
    )

    @property
    def mode(self) -> Literal["max", "min"]:
        return "max" if self.metric == "val_acc" else "min"

    @field_validator("search_space")
    @classmethod
    def _keys_are_searchable(cls, space: dict[str, Any]) -> dict[str, Any]:
        for key in space:
            if key in NOT_SEARCHABLE:
                raise ValueError(f"@{key}: cannot be swept: {NOT_SEARCHABLE[key]}")
        unknown = sorted(key for key in space if searchable_section(key) is None)
        if unknown:
            fields = set(FinetuneConfig.model_fields) | set(AugmentConfig.model_fields)
            raise ValueError(
                f"unknown key(s) {', '.join(unknown)}: expected fields of finetune or augment "
                f"({', '.join(sorted(fields - set(NOT_SEARCHABLE)))})"
            )
        for key, dist in space.items():
            field = SEARCHABLE[searchable_section(key)].model_fields[key]
            if field.annotation in INTEGER_FIELDS and dist.distribution in ("loguniform", "uniform"):
                raise ValueError(
                    f"@{key}: an integer field: expected randint or choice, got {dist.distribution}"
                )
        return space


# ---------------------------------------------------------------- services


class RayConfig(Section):
    """How training scales. The cluster itself comes from `address`, else `RAY_ADDRESS`, else a local one.

    Two kinds of settings: those that change what a run computes (`RESULT_FIELDS`: the DDP world size, which
    splits each batch and shards the data, and the device) are part of a training run's identity, its name
    and its MLflow params; the rest say how it is executed (restarts, placement, checkpoints kept, where they
    go), may be changed when a stopped run is resumed, and are recorded as MLflow tags."""

    RESULT_FIELDS: ClassVar[tuple[str, ...]] = ("num_workers", "use_gpu")

    address: str | None = None
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    # With a `ray_data` loader, the part of each worker's CPUs left to Ray Data's read-and-decode tasks.
    data_cpus_per_worker: float = Field(0.25, gt=0)
    use_gpu: bool = False  # DDP over NCCL instead of gloo
    gpus_per_worker: float = Field(1.0, gt=0)  # with use_gpu; a fraction shares a GPU between workers
    # PACK: as few nodes as possible (fast all-reduce); SPREAD: across nodes; STRICT_*: or fail to place.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = Field(2, ge=-1)  # worker-group restarts from the last checkpoint; -1: unlimited
    # Retries when Ray Train's controller fails, e.g. the workers cannot be placed within its 60 s start-up
    # timeout (too few nodes for STRICT_SPREAD): fail instead of waiting forever. -1 (Ray's default): unlimited,
    # for clusters that autoscale.
    controller_failure_limit: int = Field(2, ge=-1)
    checkpoints_to_keep: int = Field(2, ge=1)  # the best k by the stage's `metric`
    storage_path: str = "runs/ray"  # local directory (relative to the repo) or s3://bucket/prefix

    def result_settings(self) -> dict[str, Any]:
        return self.model_dump(include=set(self.RESULT_FIELDS))

    def execution_settings(self) -> dict[str, Any]:
        return self.model_dump(exclude=set(self.RESULT_FIELDS))

    @property
    def device(self) -> str:
        return "cuda" if self.use_gpu else "cpu"


class MlflowConfig(Section):
    """Tracking: `tracking_uri`, else `MLFLOW_TRACKING_URI`, else an embedded SQLite store in the repo."""

    tracking_uri: str | None = None
    experiment: str = Field("resnet-pipeline", min_length=1)


ALIAS = r"^[A-Za-z_][A-Za-z0-9_-]*$"


class RegisterConfig(Section):
    """Who becomes champion: a candidate better by `min_improvement` on `metric` whose difference from the
    champion is significant (McNemar's exact test on their paired test predictions, at level `alpha`)."""

    # Lower is better for these; higher for the rest.
    LOWER_IS_BETTER: ClassVar[tuple[str, ...]] = ("test_loss", "test_ece")

    model_name: str = Field("resnet-digits", min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    alias: str = Field("champion", min_length=1, pattern=ALIAS)
    challenger_alias: str = Field("challenger", min_length=1, pattern=ALIAS)
    metric: Literal["test_acc", "test_f1_macro", "test_top5_acc", "test_loss", "test_ece"] = "test_acc"
    min_improvement: float = Field(0.0, ge=0)
    alpha: float = Field(0.05, gt=0, lt=1)

    @model_validator(mode="after")
    def _distinct_aliases(self) -> RegisterConfig:
        if self.alias == self.challenger_alias:
            raise ValueError(f"@challenger_alias: must differ from alias ({self.alias!r})")
        return self


with warnings.catch_warnings():
    # `register` (the stage's name) shadows ABCMeta.register, a class-level method no one calls on a Config.
    warnings.filterwarnings("ignore", message='Field name "register"')

    class Config(Section):
        datasets: dict[str, DatasetConfig] = Field(default_factory=lambda: dict(DEFAULT_DATASETS))
        augment: AugmentConfig = AugmentConfig()
        pretrain: PretrainConfig = PretrainConfig()
        finetune: FinetuneConfig = FinetuneConfig()
        tune: TuneConfig = TuneConfig()
        ray: RayConfig = RayConfig()
        mlflow: MlflowConfig = MlflowConfig()
        register: RegisterConfig = RegisterConfig()

        @field_validator("datasets")
        @classmethod
        def _dataset_names(cls, datasets: dict[str, DatasetConfig]) -> dict[str, DatasetConfig]:
            if not datasets:
                raise ValueError("expected at least one dataset")
            for name in datasets:
                if not re.fullmatch(DATASET_NAME, name):
                    raise ValueError(
                        f"dataset name {name!r}: expected a lower-case letter or digit, then lower-case "
                        "letters, digits, - or _ (it names a directory and a DVC stage)"
                    )
            return datasets

        @model_validator(mode="after")
        def _stages_name_known_datasets(self):
            for stage in ("pretrain", "finetune"):
                name = getattr(self, stage).dataset
                if name not in self.datasets:
                    raise ValueError(
                        f"@{stage}.dataset: no dataset {name!r} in datasets "
                        f"(expected one of {', '.join(sorted(self.datasets))})"
                    )
            return self

        @model_validator(mode="after")
        def _data_share_below_worker_share(self):
            streaming = "ray_data" in (self.pretrain.loader, self.finetune.loader)
            if streaming and self.ray.data_cpus_per_worker >= self.ray.cpus_per_worker:
                raise ValueError(
                    f"@ray.data_cpus_per_worker: must be less than ray.cpus_per_worker "
                    f"({self.ray.cpus_per_worker}) with a ray_data loader, got {self.ray.data_cpus_per_worker}"
                )
            return self

        @model_validator(mode="after")
        def _batch_splits_evenly(self):
            # Each rank trains on batch_size / (workers × accumulate_steps) images per micro-batch: a batch that
            # does not split evenly would silently train on a smaller one. Fine-tuning runs only as sweep
            # trials, with tune.workers_per_trial workers each.
            workers = {"pretrain": ("ray.num_workers", self.ray.num_workers)}
            workers["finetune"] = ("the workers per trial", self.workers_per_trial)
            for stage, (what, count) in workers.items():
                optim = getattr(self, stage)
                parts = count * optim.accumulate_steps
                if optim.batch_size % parts:
                    raise ValueError(
                        f"@{stage}.batch_size: must be a multiple of {what} × {stage}.accumulate_steps "
                        f"({count} × {optim.accumulate_steps} = {parts}), so that every worker's micro-batch "
                        f"is the same size, got {optim.batch_size}"
                    )
            return self

        @property
        def workers_per_trial(self) -> int:
            return self.tune.workers_per_trial or self.ray.num_workers

        @property
        def max_trial_epochs(self) -> int:
            """The length of the longest trial: finetune.epochs, or the largest epochs the space can draw."""
            dist = self.tune.search_space.get("epochs")
            return max(int(value) for value in _corners(dist)) if dist else self.finetune.epochs

        @model_validator(mode="after")
        def _asha_fits_the_trials(self):
            asha, longest = self.tune.asha, self.max_trial_epochs
            what = (
                "the largest epochs tune.search_space draws"
                if "epochs" in self.tune.search_space
                else "finetune.epochs"
            )
            if asha.max_epochs is not None and asha.max_epochs != longest:
                raise ValueError(
                    f"@tune.asha.max_epochs: is the epoch at which a trial ends: must be null or {what} "
                    f"({longest}), got {asha.max_epochs}"
                )
            if asha.grace_period > longest:
                raise ValueError(
                    f"@tune.asha.grace_period: must be at most the trial length, {what} ({longest}), "
                    f"got {asha.grace_period}"
                )
            return self

        @model_validator(mode="after")
        def _search_space_draws_valid_configs(self):
            """Every corner of the search space (each choice value, each range's ends, all combined) must give
            a valid config, checked with every rule of the whole config (a drawn loader, batch or epochs must
            fit the rest): a bad draw fails here, naming the draw and the key, not in a trial an hour in."""
            space = self.tune.search_space
            if not space:
                return self
            candidates = {key: _corners(dist) for key, dist in space.items()}
            combos = math.prod(len(values) for values in candidates.values())
            if combos > MAX_CORNERS:  # too many to try together: each key on its own
                draws = [{key: value} for key, values in candidates.items() for value in values]
            else:
                draws = [
                    dict(zip(candidates, values, strict=True))
                    for values in itertools.product(*candidates.values())
                ]
            # Validated sections go in as they are (pydantic does not validate a model instance again); the drawn
            # sections are validated from their fields, then every whole-config rule runs. The space itself is
            # left out of the copy: its draws are checked here, not again inside each check.
            base = {name: getattr(self, name) for name in type(self).model_fields}
            base["tune"] = self.tune.model_copy(update={"search_space": {}})
            for draw in draws:
                raw = dict(base)
                for section in SEARCHABLE:
                    fields = {key: value for key, value in draw.items() if searchable_section(key) == section}
                    if fields:
                        raw[section] = getattr(self, section).model_dump() | fields
                try:
                    Config.model_validate(raw)
                except ValidationError as err:
                    key, message = _first_error(err)
                    where = ", ".join(f"{key}={value!r}" for key, value in draw.items())
                    raise ValueError(
                        f"@tune.search_space: the draw {where} makes {key} invalid: {message}"
                    ) from None
            return self

        def dataset(self, name: str) -> DatasetConfig:
            """The dataset `name`, or a one-line ConfigError naming the known ones."""
            try:
                return self.datasets[name]
            except KeyError:
                raise ConfigError(
                    f"no dataset {name!r} in datasets (expected one of {', '.join(sorted(self.datasets))})"
                ) from None


# ---------------------------------------------------------------- loading


def _first_error(err: ValidationError) -> tuple[str, str]:
    """(dotted key, message) of a validation error's first error. A validator's message may name its own key
    as "@key: message"; a discriminated union's tag (search_space.lr.loguniform) is not a key."""
    first = err.errors()[0]
    key = ".".join(str(part) for part in first["loc"] if part not in DISTRIBUTIONS)
    if first["type"] == "extra_forbidden":
        return key, "unknown key"
    message = first["msg"].removeprefix("Value error, ")
    if message.startswith("@"):
        field, _, message = message[1:].partition(": ")
        key = f"{key}.{field}" if key else field
    elif "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], dict):
        message += f" (got {first['input']!r})"
    return key, message


def _format_error(source: str, err: ValidationError) -> str:
    key, message = _first_error(err)
    more = len(err.errors()) - 1
    return f"{source}: {key or '(top level)'}: {message}" + (
        f" (and {more} more error{'s' * (more > 1)})" if more else ""
    )


def _check_mapping(raw: Any, source: str) -> None:
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}"
        )


def parse_config(raw: Any, source: str = DEFAULT_PARAMS) -> Config:
    """Validate a mapping (as read from YAML) into a `Config`, or raise one-line `ConfigError`."""
    _check_mapping(raw, source)
    try:
        return Config.model_validate(raw or {})
    except ValidationError as err:
        raise ConfigError(_format_error(source, err)) from None


def load_config(path: str | Path = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate a params file; `overrides` maps dotted keys ("pretrain.epochs") to values."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such params file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a params file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    _check_mapping(raw, str(path))
    for dotted, value in (overrides or {}).items():
        try:
            raw = set_dotted(raw or {}, dotted, value)
        except ValueError as err:
            raise ConfigError(f"{path}: {err}") from None
    return parse_config(raw, str(path))


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """Return a copy of `raw` with `a.b.c` set to `value`, creating intermediate mappings."""
    out = dict(raw)
    head, _, rest = dotted.partition(".")
    if rest:
        inner = out.get(head, {})
        if not isinstance(inner, dict):
            raise ValueError(f"cannot set {dotted}: {head} is {inner!r}, not a mapping")
        out[head] = set_dotted(inner, rest, value)
    else:
        out[head] = value
    return out

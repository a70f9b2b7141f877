"""``SaSConfig``: what to adapt and how, with validation and a JSON round trip."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import List, Optional, Union

from .reference import QUANTIZED_INPUT_DTYPES
from .targets import check_regex

#: Targets used when none are given: the four Linear roles of every timm ViT block.
VIT_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]

#: Every Linear of a Hugging Face BERT encoder: q/k/v, the attention output, and the FFN's two layers.
#: The FFN output is named "<i>.output.dense" and the attention output "<i>.attention.output.dense", so
#: the pattern anchors on the layer index to keep them apart (PEFT takes the same full-match regex).
BERT_LINEAR_TARGETS = (r".*\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                       r"|intermediate\.dense|output\.dense)")

#: Every Linear of a LLaMA-style decoder block (LLaMA, Mistral, Qwen2 and Gemma name them so): attention's
#: q/k/v/o projections and the gated MLP's gate/up/down. Each suffix is a role, so with sharing="role" (the
#: default) the q_proj of every block shares one A and one B, and so on: 7 sharing groups, each layer keeping
#: its own h. Under grouped-query attention k_proj and v_proj are narrower than q_proj; being roles of their
#: own, they never need splitting by shape. The LM head (lm_head) stays frozen.
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

SHARING_CHOICES = ("role", "shape", "layer")
ACTIVATION_CHOICES = ("tanh", "relu", "gelu")
LAYER_OP_CHOICES = ("kernels", "fold")
#: What an adapted layer keeps of its input x for dA = du.T @ x: x itself, an 8-bit copy
#: (sas.reference.quantize_rows), or nothing where x is rebuilt exactly from its producer (sas.recompute).
SAVED_INPUT_CHOICES = ("full", *QUANTIZED_INPUT_DTYPES, "recompute")
#: The default saved_input, decided here once (SaSConfig, a standalone SaSLinear, a saved config without the
#: field): "recompute" is exact (every gradient bit for bit the full mode's); where no input can be rebuilt it
#: keeps what "full" keeps. Its measured memory and step time: docs/memory.md, "Which default".
DEFAULT_SAVED_INPUT = "recompute"
#: Names of layer_op before they said what they are; configs saved with them still load (mapped to the new ones).
LEGACY_LAYER_OPS = {"adapter": "kernels", "fused": "fold"}

# Upper bounds of the integer fields. A width of 2**16 is over twice the widest nn.Linear of current
# large models (28,672 in Llama-3-70B). Each task is one Parameter (about 30 us to build, so 2**16 tasks
# take about 2 s): far more tasks than one model serves, and a config asking for 10**9 is refused at
# once instead of building for hours.
MAX_WIDTH = 2**16
MAX_NUM_TASKS = 2**16
INT_FIELD_MAXIMA = {"rank": MAX_WIDTH, "embed_dim": MAX_WIDTH, "hyper_hidden": MAX_WIDTH, "num_tasks": MAX_NUM_TASKS}


def canonical_layer_op(layer_op: str) -> str:
    """``layer_op`` under its current name (the old names map to the new ones), checked."""
    layer_op = LEGACY_LAYER_OPS.get(layer_op, layer_op) if isinstance(layer_op, str) else layer_op
    _check_choice("layer_op", layer_op, LAYER_OP_CHOICES)
    return layer_op


def _check_choice(name: str, value, choices) -> None:
    # The type test comes first: an unhashable or non-str value must get the same clear message.
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def parse_json(text: Union[str, bytes], source) -> object:
    """``json.loads(text)``; malformed or absurdly nested text raises ``ValueError`` naming ``source``."""
    try:
        return json.loads(text)
    except ValueError as exc:  # malformed text, bad UTF-8, an int over Python's 4,300-digit limit
        raise ValueError(f"{source} is not valid JSON: {exc}") from None
    except RecursionError:  # json's decoder recurses once per nesting level
        raise ValueError(f"{source} is nested too deeply to be a SaS adapter config") from None


class JsonConfig:
    """The JSON round trip of an adapter config dataclass (``SaSConfig``, ``sas.ScalingConfig``): unknown
    fields and non-objects are refused with the class's name; values are checked by the class itself."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        name = cls.__name__
        if not isinstance(data, dict):
            raise ValueError(f"a {name} must be given as a JSON object (dict), got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {name} fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    def to_json(self, path: Optional[Union[str, Path]] = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: Union[str, Path]):
        candidate = Path(text_or_path) if not str(text_or_path).lstrip().startswith("{") else None
        text = candidate.read_text() if candidate is not None else str(text_or_path)
        return cls.from_dict(parse_json(text, candidate or f"{cls.__name__} JSON"))


@dataclass
class SaSConfig(JsonConfig):
    """Configuration of a SaS adapter (docs/design.md §1).

    Every field's ``metadata["help"]`` says what it does; ``__post_init__``
    rejects bad values with a message naming the field.
    """

    rank: int = field(default=8, metadata={"help": "Rank r of the shared projections A (r, d_in) and B (d_out, r)."})
    targets: Union[str, List[str]] = field(
        default_factory=lambda: list(VIT_TARGETS),
        metadata={"help": "Which nn.Linear modules to adapt. A str is a regex that must fully match the module "
                          "name; a list holds exact module names or dotted suffixes (e.g. 'attn.qkv')."})
    embed_dim: int = field(default=8, metadata={"help": "Size k of each adapted layer's learned embedding e_l."})
    hyper_hidden: int = field(default=32, metadata={"help": "Hidden width of the hypernetwork H: k -> hidden -> r."})
    hyper_activation: str = field(default="tanh",
                                  metadata={"help": f"Activation inside H, one of {ACTIVATION_CHOICES}."})
    scale: float = field(default=1.0, metadata={"help": "Scale s applied to the adapter update s * (v @ B.T)."})
    sharing: str = field(
        default="role",
        metadata={"help": "How layers form sharing groups that own one A and one B: 'role' (one group per target "
                          "pattern a layer matched; for a regex target, per name with layer indices removed), "
                          "'shape' (one group per (d_in, d_out)), 'layer' (no sharing: LoRA-like)."})
    share_down_by_input_dim: bool = field(
        default=False,
        metadata={"help": "Share A across every group with the same d_in (B stays per group): fewer parameters."})
    trainable_modules: List[str] = field(
        default_factory=list,
        metadata={"help": "Names or dotted suffixes of extra modules that stay trainable, e.g. ['head']."})
    layer_op: str = field(
        default="kernels",
        metadata={"help": "How an adapted layer computes: 'kernels' (the frozen GEMM, then the backend's "
                          "Triton/C++ adapter kernels, as one autograd node per layer) or 'fold' (the ATen "
                          "whole-layer designs of sas.backends.fold, which fold the update into the weight; "
                          "design picked per shape; measured on CPU only so far). The old names 'adapter' and "
                          "'fused' are accepted and mean 'kernels' and 'fold'."})
    saved_input: str = field(
        default=DEFAULT_SAVED_INPUT,
        metadata={"help": "What each adapted layer keeps of its input x for the backward: 'recompute' (the "
                          "default; exact: nothing of x where x is the output of a recognised producer, a "
                          "LayerNorm, RMSNorm or activation whose backward keeps its input: x is rebuilt bit "
                          "for bit in the backward; elsewhere, and under torch.compile, as 'full'; see "
                          "sas.recompute and sas.memory_plan), 'full' (x itself, exact), 'int8' (int8 plus one "
                          "fp32 absmax scale per row) or 'fp8' (float8 e4m3 plus one fp32 scale per row), each "
                          "about 1 byte per element of x instead of 2 or 4. Only dA = du.T @ x reads it: dx, dB "
                          "and dh stay exact. Layers fed the same input tensor (q, k, v) keep one copy or one "
                          "rebuild, and every mode but 'full' keeps no copy of an x that autograd keeps anyway "
                          "(an attention output). A saved config without this field (saved before it existed) "
                          "loads with the default, which computes the same gradients as the full mode it "
                          "trained with (docs/memory.md)."})
    train_down: bool = field(
        default=True,
        metadata={"help": "Whether the shared down projections A are trained. False (LoRA-FA style): A keeps "
                          "its initial or loaded value and gets no gradient, so a layer keeps only u = x @ A.T "
                          "(4 bytes x rank per row) instead of its input; B, the embeddings and the "
                          "hypernetwork still train."})
    num_tasks: int = field(
        default=1,
        metadata={"help": "Number of tasks served by one model. With more than one, each task t has a learned "
                          "embedding (sas_shared.task_embeddings.<t>) and every layer's modulation is "
                          "h_{t,l} = H(e_l + tau_t); pick tasks per forward with sas.tasks(model, task_ids). "
                          "1 (the default) is the single-task adapter with no task embeddings."})
    base_model_name: Optional[str] = field(
        default=None, metadata={"help": "Architecture the adapter was made for; checked on load when set."})

    def __post_init__(self):
        # Sizes first: they decide how much gets built, and a config may come from an untrusted file.
        for name, most in INT_FIELD_MAXIMA.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
            if value > most:
                raise ValueError(f"{name} must be at most {most:,}, got {value!r}")
        if isinstance(self.targets, str):
            if not self.targets:
                raise ValueError("targets must not be an empty string")
            check_regex(self.targets)
        elif isinstance(self.targets, (list, tuple)):
            if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
                raise ValueError("targets must be a regex str or a non-empty list of non-empty str, "
                                 f"got {self.targets!r}")
            self.targets = list(self.targets)
        else:
            raise ValueError(f"targets must be a regex str or a list of str, got {type(self.targets).__name__}")
        _check_choice("hyper_activation", self.hyper_activation, ACTIVATION_CHOICES)
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or self.scale != self.scale:
            raise ValueError(f"scale must be a finite number, got {self.scale!r}")
        self.scale = float(self.scale)
        if self.scale in (float("inf"), float("-inf")):
            raise ValueError(f"scale must be a finite number, got {self.scale!r}")
        _check_choice("sharing", self.sharing, SHARING_CHOICES)
        # Only a real bool: a truthy string such as "false" (e.g. from a hand-edited JSON file) must not
        # silently turn sharing on.
        if not isinstance(self.share_down_by_input_dim, bool):
            raise ValueError(f"share_down_by_input_dim must be a bool (true or false), "
                             f"got {type(self.share_down_by_input_dim).__name__} {self.share_down_by_input_dim!r}")
        if self.sharing == "layer" and self.share_down_by_input_dim:
            raise ValueError("share_down_by_input_dim=True contradicts sharing='layer' (no sharing)")
        self.layer_op = canonical_layer_op(self.layer_op)
        _check_choice("saved_input", self.saved_input, SAVED_INPUT_CHOICES)
        if not isinstance(self.train_down, bool):
            raise ValueError(f"train_down must be a bool (true or false), "
                             f"got {type(self.train_down).__name__} {self.train_down!r}")
        if not isinstance(self.trainable_modules, (list, tuple)) or not all(
                isinstance(m, str) and m for m in self.trainable_modules):
            raise ValueError(f"trainable_modules must be a list of non-empty str, got {self.trainable_modules!r}")
        self.trainable_modules = list(self.trainable_modules)
        if self.base_model_name is not None and not isinstance(self.base_model_name, str):
            raise ValueError(f"base_model_name must be a str or None, "
                             f"got {type(self.base_model_name).__name__} {self.base_model_name!r}")

    # -- presets ---------------------------------------------------------
    @classmethod
    def vit_budget(cls, **overrides) -> "SaSConfig":
        """ViT preset under 0.05% extra parameters on ViT-B/16 (about 0.033%: 28.6k of 85.8M).

        Rank 4 on ``attn.qkv``, ``attn.proj`` and ``mlp.fc1`` with one A shared by
        all three (they all read 768-wide inputs); ``mlp.fc2`` stays frozen.
        """
        settings = dict(rank=4, targets=["attn.qkv", "attn.proj", "mlp.fc1"], share_down_by_input_dim=True)
        settings.update(overrides)
        return cls(**settings)

    @classmethod
    def bert_budget(cls, **overrides) -> "SaSConfig":
        """Hugging Face BERT preset under 0.05% extra parameters (the SaS paper's budget); the BERT
        counterpart of :meth:`vit_budget`. On all-MiniLM-L6-v2: 9,876 of 22,565,376 (0.044%).

        Rank 4 on query, key, value, the attention output and the FFN's first layer (``intermediate.dense``):
        all read hidden-wide inputs, so one A serves them, and a B per (d_in, d_out) shape is a B per output
        width (hidden or FFN). h stays per layer. The FFN's second layer stays frozen: its input is the FFN
        width, and an A of that width alone would cost 4 x 1,536 on MiniLM.
        """
        settings = dict(rank=4, sharing="shape", share_down_by_input_dim=True,
                        targets=r".*\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                                r"|intermediate\.dense)")
        settings.update(overrides)
        return cls(**settings)

"""Architecture adapters: where the pieces an editor needs live in each family.

The family is read from ``config.model_type`` (never guessed from a folder
name).  Each adapter names, as dotted templates over the layer index, the
transformer blocks, the MLP input projection(s) and output projection, plus the
final norm, the input embedding and the unembedding.  ``out_proj_layout`` says
how the output projection stores its weight: ``"out_in"`` for ``nn.Linear``
(``W @ k``) and ``"in_out"`` for GPT-2's ``Conv1D`` (``k @ W``).

The names are those of transformers 5.  The top-level parts are resolved
robustly, because they are the ones transformers renames between versions:
the input embedding and the unembedding come from the model's own
``get_input_embeddings()``/``get_output_embeddings()`` when it has them, and
otherwise from the spec's name or one of its known aliases in other
transformers versions (:data:`ALIASES`: GPT-NeoX's unembedding was
``embed_out`` before transformers 5 and is ``lm_head`` since).
:meth:`Adapter.unembed_logits` is the model's own hidden-state-to-logits map
(the unembedding plus Gemma 2's final logit soft-capping).
``tests/test_families.py`` loads a tiny random model of every family through
the real loader and runs the editors on it, so a rename shows up there.

This module imports nothing heavy; it works on any object with
``named_modules``/``get_submodule``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import UserError


@dataclass(frozen=True)
class ArchSpec:
    family: str
    layers: str            # e.g. "model.layers" (a ModuleList)
    mlp: str               # relative to a block, e.g. "mlp"
    mlp_in: tuple[str, ...]  # relative to the block, e.g. ("mlp.gate_proj", "mlp.up_proj")
    mlp_out: str           # relative to the block, e.g. "mlp.down_proj"
    final_norm: str
    embed: str
    unembed: str
    out_proj_layout: str = "out_in"


_LLAMA_LIKE: dict[str, Any] = dict(layers="model.layers", mlp="mlp", mlp_in=("mlp.gate_proj", "mlp.up_proj"),
                   mlp_out="mlp.down_proj", final_norm="model.norm", embed="model.embed_tokens",
                   unembed="lm_head")

SPECS: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", **_LLAMA_LIKE),
    "mistral": ArchSpec("mistral", **_LLAMA_LIKE),
    "qwen2": ArchSpec("qwen2", **_LLAMA_LIKE),
    "qwen3": ArchSpec("qwen3", **_LLAMA_LIKE),
    "gemma": ArchSpec("gemma", **_LLAMA_LIKE),
    "gemma2": ArchSpec("gemma2", **_LLAMA_LIKE),
    "olmo": ArchSpec("olmo", **_LLAMA_LIKE),
    "gpt2": ArchSpec("gpt2", layers="transformer.h", mlp="mlp", mlp_in=("mlp.c_fc",),
                     mlp_out="mlp.c_proj", final_norm="transformer.ln_f", embed="transformer.wte",
                     unembed="lm_head", out_proj_layout="in_out"),
    "gptj": ArchSpec("gptj", layers="transformer.h", mlp="mlp", mlp_in=("mlp.fc_in",),
                     mlp_out="mlp.fc_out", final_norm="transformer.ln_f", embed="transformer.wte",
                     unembed="lm_head"),
    "gpt_neox": ArchSpec("gpt_neox", layers="gpt_neox.layers", mlp="mlp",
                         mlp_in=("mlp.dense_h_to_4h",), mlp_out="mlp.dense_4h_to_h",
                         final_norm="gpt_neox.final_layer_norm", embed="gpt_neox.embed_in",
                         unembed="lm_head"),
    "phi": ArchSpec("phi", layers="model.layers", mlp="mlp", mlp_in=("mlp.fc1",), mlp_out="mlp.fc2",
                    final_norm="model.final_layernorm", embed="model.embed_tokens", unembed="lm_head"),
    "phi3": ArchSpec("phi3", layers="model.layers", mlp="mlp", mlp_in=("mlp.gate_up_proj",),
                     mlp_out="mlp.down_proj", final_norm="model.norm", embed="model.embed_tokens",
                     unembed="lm_head"),
}

# Other transformers versions' names for the same module (tried after the spec's own name).
ALIASES: dict[str, tuple[str, ...]] = {
    "lm_head": ("embed_out",),     # GPT-NeoX before transformers 5
    "embed_out": ("lm_head",),
}


class Adapter:
    """Names and fetches the parts of one loaded model."""

    def __init__(self, model, spec: ArchSpec) -> None:
        self.model = model
        self.spec = spec
        self.n_layers = len(model.get_submodule(spec.layers))

    @classmethod
    def for_model(cls, model) -> Adapter:
        family = getattr(model.config, "model_type", None)
        spec = SPECS.get(family or "")
        if spec is None:
            raise UserError(f'unsupported architecture "{family}"; supported: {", ".join(sorted(SPECS))}',
                            "model")
        return cls(model, spec)

    # names -----------------------------------------------------------------
    def check_layer(self, layer: int, where: str = "layer", *, negative: bool = True) -> int:
        """``layer`` as an index ``0..n_layers-1``; negative counts from the end unless ``negative=False``.

        The one layer-range check: anything else (a bool, a float, out of range) is a
        :class:`UserError` naming ``where``."""
        lo = -self.n_layers if negative else 0
        if isinstance(layer, bool) or not isinstance(layer, int) or not lo <= layer < self.n_layers:
            raise UserError(f"layer {layer!r} is out of range; this model has layers 0..{self.n_layers - 1}",
                            where)
        return layer % self.n_layers

    def block_name(self, layer: int) -> str:
        return f"{self.spec.layers}.{self.check_layer(layer)}"

    def mlp_name(self, layer: int) -> str:
        return f"{self.block_name(layer)}.{self.spec.mlp}"

    def mlp_out_name(self, layer: int) -> str:
        return f"{self.block_name(layer)}.{self.spec.mlp_out}"

    def mlp_in_names(self, layer: int) -> list[str]:
        return [f"{self.block_name(layer)}.{n}" for n in self.spec.mlp_in]

    def mlp_out_weight_name(self, layer: int) -> str:
        return self.mlp_out_name(layer) + ".weight"

    # modules ---------------------------------------------------------------
    def block(self, layer: int):
        return self.model.get_submodule(self.block_name(layer))

    def mlp(self, layer: int):
        return self.model.get_submodule(self.mlp_name(layer))

    def mlp_out(self, layer: int):
        return self.model.get_submodule(self.mlp_out_name(layer))

    def mlp_in(self, layer: int) -> list:
        return [self.model.get_submodule(n) for n in self.mlp_in_names(layer)]

    def _named(self, name: str):
        """The module called ``name``, or by one of its aliases in other transformers versions."""
        for candidate in (name, *ALIASES.get(name, ())):
            try:
                return self.model.get_submodule(candidate)
            except AttributeError:
                continue
        raise AttributeError(f'{type(self.model).__name__} has no module "{name}"'
                             + (f' (nor {", ".join(ALIASES[name])})' if name in ALIASES else ""))

    def _declared(self, accessor: str, name: str):
        """The model's own ``get_input_embeddings``/``get_output_embeddings`` when it answers, else by name."""
        get = getattr(self.model, accessor, None)
        if callable(get):
            try:
                mod = get()
            except (AttributeError, NotImplementedError):
                mod = None
            if mod is not None and hasattr(mod, "weight"):
                return mod
        return self._named(name)

    def final_norm(self):
        return self._named(self.spec.final_norm)

    def embed(self):
        return self._declared("get_input_embeddings", self.spec.embed)

    def unembed(self):
        return self._declared("get_output_embeddings", self.spec.unembed)

    def unembed_logits(self, hidden):
        """Logits of final hidden states (after the final norm), as the model's own head computes them.

        The unembedding, then Gemma 2's final soft-capping ``c * tanh(logits / c)`` when the config sets one.
        """
        logits = self.unembed()(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            import torch

            logits = torch.tanh(logits / cap) * cap
        return logits

    @property
    def tied_embeddings(self) -> bool:
        try:
            return self.embed().weight is self.unembed().weight or (
                self.embed().weight.data_ptr() == self.unembed().weight.data_ptr())
        except AttributeError:
            return False

    # shapes ----------------------------------------------------------------
    def mlp_out_matrix(self, layer: int):
        """The output projection as ``(d_out, d_in)`` (a view, transposed for Conv1D)."""
        w = self.mlp_out(layer).weight
        return w if self.spec.out_proj_layout == "out_in" else w.T

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size if hasattr(self.model.config, "hidden_size")
                   else self.model.config.n_embd)

    @property
    def mlp_width(self) -> int:
        return int(self.mlp_out_matrix(0).shape[1])

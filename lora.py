"""lora.py: LoRA (Hu et al. 2021, arXiv 2106.09685) by hand, in the spirit of minLoRA and loralib.

A frozen linear layer W gets a trainable low-rank update:  y = W x + (alpha / r) * B A dropout(x),
A: [r, in] Kaiming-uniform, B: [out, r] zeros, so training starts from exactly the base model.
Adapters are saved in PEFT's layout and key names (adapter_model.safetensors + adapter_config.json),
so `peft.PeftModel.from_pretrained` loads them (checked with PEFT 0.21.2).

DoRA (Liu et al. 2024, arXiv 2402.09353; `dora=True`) splits the adapted weight into a direction
and a trainable magnitude m per output row:  W' = m * (W + s B A) / ||W + s B A||, the norm of each
row, m starting at ||W|| (so training again starts from the base model). As the paper's section
4.3 advises, the norm is treated as a constant in the backward pass (detached): the magnitude
then learns the scale and B A the direction, at little more memory than LoRA. Saved with PEFT's
`lora_magnitude_vector` and `use_dora`, PEFT 0.21.2 loads it with the same logits (checked by hand).
"""
import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."  # PEFT names weights after its wrapper: base_model.model.<path>


class LoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, r, alpha, dropout=0.0, dora=False):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        device = base_layer.weight.device
        # LoRA weights stay float32 even on a bf16 model: updates of lr * 1e-3 would round away in bf16.
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=device)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear and PEFT
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dora = dora
        if dora:  # DoRA's magnitude m: [out], the norm of each row of W (PEFT's name)
            self.lora_magnitude_vector = nn.Parameter(base_layer.weight.detach().float().norm(dim=1))
        self.disabled = False
        self.cached_scale = None  # (state of W, A, B and m, dora_scale()) for decoding
        self.cached_weights = None  # (the dtype, state of A and B; A and B in that dtype)

    def decoding_cache(self, attribute, parameters, compute, dtype=None):
        """compute(), or in inference mode (sampling: one call per generated token) its value from
        the last call, kept in `attribute` until `dtype` or one of `parameters` changes: in place
        (its version counter) or for other data (its address). A swap of `.data` whose new data
        then changes in place is not seen: `forget_decoding_caches` after such swaps."""
        if not torch.is_inference_mode_enabled():
            setattr(self, attribute, None)
            return compute()
        state = (dtype, *((p.data_ptr(), p._version) for p in parameters))
        cached = getattr(self, attribute)
        if cached is None or cached[0] != state:
            cached = (state, compute())
            setattr(self, attribute, cached)
        return cached[1]

    def delta_weight(self):
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)  # [out, in]

    def dora_scale(self):
        """m / ||W + s B A|| per output row: [out], the norm detached (DoRA's section 4.3).

        It costs a pass over W: while sampling it is computed once (`decoding_cache`)."""
        def scale():
            weight = self.base_layer.weight.float() + self.delta_weight().detach()
            return self.lora_magnitude_vector / weight.norm(dim=1).clamp(min=1e-12)
        return self.decoding_cache("cached_scale", (self.base_layer.weight, self.lora_A.weight,
                                                    self.lora_B.weight, self.lora_magnitude_vector),
                                   scale)

    def weights_in(self, dtype):
        """(A, B) in `dtype`: the float32 weights themselves, or their casts (cast once while
        sampling, `decoding_cache`: two kernels a layer and token fewer on a GPU)."""
        a, b = self.lora_A.weight, self.lora_B.weight
        if a.dtype == dtype:
            return a, b
        return self.decoding_cache("cached_weights", (a, b), lambda: (a.to(dtype), b.to(dtype)),
                                   dtype)

    def adapted_weight(self):
        """The weight this layer computes with: W + s B A (LoRA) or DoRA's W', float32 [out, in]."""
        weight = self.base_layer.weight.float() + self.delta_weight()
        return weight * self.dora_scale()[:, None] if self.dora else weight

    def forward(self, x):
        y = self.base_layer(x)
        if self.disabled:
            return y
        # The products in the input's dtype (bfloat16 on a GPU: a float32 GEMM there is several
        # times slower), from float32 master weights: the cast's gradient reaches them in float32.
        dropped = self.dropout(x)
        a, b = self.weights_in(x.dtype)
        update = F.linear(F.linear(dropped, a), b)  # B A x
        if not self.dora:
            return y.add(update, alpha=self.scaling)  # y + s B A x
        # DoRA: m/n (W x + s B A x) + bias = y + (m/n - 1) W x + m/n s B A x, W x = y - bias.
        # With dropout in training, W x is taken on the dropped-out input, as PEFT does.
        scale = self.dora_scale()  # [out]
        if self.training and not isinstance(self.dropout, nn.Identity):
            base = F.linear(dropped, self.base_layer.weight.to(dropped.dtype))
        else:
            base = y - self.base_layer.bias if self.base_layer.bias is not None else y
        return y + ((scale - 1) * base.to(scale.dtype)
                    + scale * self.scaling * update.to(scale.dtype)).to(y.dtype)


def lora_layers(model):
    return [module for module in model.modules() if isinstance(module, LoRALinear)]


def apply_lora(model, r=64, alpha=128, dropout=0.0, targets=DEFAULT_TARGETS, dora=False):
    """Wrap every nn.Linear whose name ends in one of `targets`; freeze all but the LoRA weights
    (and with dora=True DoRA's magnitudes)."""
    model.requires_grad_(False)
    chosen = [(name, module) for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and name.split(".")[-1] in targets]
    if not chosen:
        raise ValueError(f"no linear layer named one of {targets} in the model")
    for name, module in chosen:
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name,
                LoRALinear(module, r, alpha, dropout, dora))
    model.lora_config = {"r": r, "alpha": alpha, "dropout": dropout, "dora": dora,
                         "targets": sorted({name.split(".")[-1] for name, _ in chosen})}
    return model


def forget_decoding_caches(model):
    """Drop every LoRA layer's cached casts and DoRA scales (`LoRALinear.decoding_cache`)."""
    for layer in lora_layers(model):
        layer.cached_scale = layer.cached_weights = None


@contextmanager
def lora_disabled(model):
    """The base model, without a second copy: the GRPO reference and the OPSD fixed teacher."""
    layers = lora_layers(model)
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False


def save_lora(model, folder, base_model=""):
    """adapter_model.safetensors + adapter_config.json in PEFT's layout and key names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {PEFT_PREFIX + name: tensor.detach().contiguous().cpu()
               for name, tensor in model.state_dict().items() if ".lora_" in name}
    save_file(weights, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = model.lora_config
    peft_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
                   "r": config["r"], "lora_alpha": config["alpha"], "lora_dropout": config["dropout"],
                   "target_modules": config["targets"], "bias": "none", "fan_in_fan_out": False,
                   "inference_mode": True, "use_rslora": False, "use_dora": config["dora"]}
    (folder / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))


def load_lora(model, folder):
    """Load an adapter saved by save_lora (or by PEFT); applies LoRA first if the model has none."""
    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    if not lora_layers(model):
        apply_lora(model, config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0),
                   tuple(config["target_modules"]), config.get("use_dora", False))
    weights = {name.removeprefix(PEFT_PREFIX): tensor
               for name, tensor in load_file(folder / "adapter_model.safetensors").items()}
    expected = {name for name in model.state_dict() if ".lora_" in name}
    if set(weights) != expected:
        raise ValueError(f"{folder}: adapter keys do not match the model's LoRA layers")
    model.load_state_dict(weights, strict=False)
    return model


def save_merged(model, tokenizer, folder):
    """Export base + LoRA as one ordinary model folder (save_pretrained) for serving.

    The model itself is left unchanged: merged weights are computed into a separate state dict.
    """
    state = {}
    for name, tensor in model.state_dict().items():
        if ".lora_" not in name:
            state[name.replace(".base_layer.", ".")] = tensor
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            weight = module.base_layer.weight
            state[f"{name}.weight"] = module.adapted_weight().detach().to(weight.dtype)
    model.save_pretrained(folder, state_dict=state)
    tokenizer.save_pretrained(folder)

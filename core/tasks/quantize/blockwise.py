"""Calibrate and quantize a model block by block, so that memory stays bounded.

A *chain* is a list of blocks where each block's output is the next block's
input: open_clip's ``resblocks`` (image and text towers), timm's ViT
``blocks``, and EfficientNet-style ``blocks`` whose stages are flattened into
their blocks. :func:`quantize_chain` captures the calibration inputs of the
first block once, then for each block in turn:

1. runs the block over those inputs with hooks that gather its layers'
   input statistics (per-channel mean magnitude and a bounded sample of
   rows) and which tensors they read (layers that read the same tensor form
   one scale group; a LayerNorm whose output is that tensor can absorb the
   group's scales);
2. quantizes the block's layers (RTN; GPTQ on the sampled rows; AWQ with the
   alpha search measured on the block's own output, then the optional clip
   search, then folding the scales into the LayerNorm where the block's
   output shows that folding is exact, otherwise an explicit input scale);
3. feeds the block's full-precision output to the next block (as AutoAWQ).

Only one block's statistics are alive at a time; the chain's activations are
held once (inputs and outputs of the current block). A chain whose blocks do
not pass their output straight to the next block is detected on the first
batch and its layers fall back to the one-pass path (``calibrate`` +
``quantize_layer``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from visbatch.core.models import LoadedModel
from visbatch.core.tasks.quantize.awq import scaled_effective_weight, search_clip, search_scale

# Chains by container path; a container's children that are nn.Sequential are flattened.
CHAIN_CONTAINERS = ("visual.transformer.resblocks", "transformer.resblocks", "visual.trunk.blocks", "blocks")
AWQ_SEARCH_SAMPLES = 32  # inputs (images or texts) on which the alpha search measures the block output
FOLD_TOLERANCE = 1e-3  # relative difference between folded and explicit-scale block outputs


class _Captured(Exception):
    """Stops the forward pass once the chain's first block has its input."""


@dataclass
class Chain:
    container: str
    blocks: list[tuple[str, nn.Module]]
    tower: str  # "text" for a CLIP text tower, else "visual"


def find_chains(model: LoadedModel, targets) -> tuple[list[Chain], list]:
    """(chains holding targets, targets outside every chain)."""
    chains, inside = [], set()
    for container_name in CHAIN_CONTAINERS:
        try:
            container = model.module.get_submodule(container_name)
        except AttributeError:
            continue
        if not isinstance(container, (nn.Sequential, nn.ModuleList)):
            continue
        if any(container_name.startswith(c.container + ".") or c.container.startswith(container_name + ".")
               for c in chains):
            continue
        blocks = []
        for index, child in enumerate(container):
            name = f"{container_name}.{index}"
            if isinstance(child, nn.Sequential):
                blocks += [(f"{name}.{j}", grandchild) for j, grandchild in enumerate(child)]
            else:
                blocks.append((name, child))
        names = {t.name for t in targets if t.name.startswith(container_name + ".")}
        if len(blocks) < 2 or not names:
            continue
        inside |= names
        tower = "text" if model.family == "open_clip" and not container_name.startswith("visual.") else "visual"
        chains.append(Chain(container_name, blocks, tower))
    return chains, [t for t in targets if t.name not in inside]


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def capture_chain_inputs(chain: Chain, drive) -> list[tuple[tuple, dict]] | None:
    """(args, kwargs) of the first block for every calibration batch; ``drive`` runs the model over
    the batches. None when the chain does not pass each block's output to the next block."""
    first = chain.blocks[0][1]
    captured: list[tuple[tuple, dict]] = []
    seen: dict[int, torch.Tensor] = {}
    checking = [True]

    def grab(module, args, kwargs):
        captured.append((tuple(args), dict(kwargs)))
        if not checking[0]:
            raise _Captured

    def record(index):
        def hook(module, args, kwargs):
            if checking[0]:
                seen[index] = args[0] if args else next(iter(kwargs.values()))
        return hook

    for run in drive():  # one batch unhooked first: lazy decisions (the text tower's trim check) run once
        run()
        break
    handles = [first.register_forward_pre_hook(grab, with_kwargs=True)]
    handles += [block.register_forward_pre_hook(record(i), with_kwargs=True)
                for i, (_, block) in enumerate(chain.blocks)]
    try:
        for run in drive():
            try:
                run()
            except _Captured:
                pass
            checking[0] = False
    finally:
        for handle in handles:
            handle.remove()
    if not captured:
        return None
    # The first batch went through every block: replay it along the chain and compare.
    args, kwargs = captured[0]
    x = args[0]
    for index, (_, block) in enumerate(chain.blocks):
        if index in seen and not torch.allclose(x, seen[index], rtol=1e-4, atol=1e-5):
            return None
        x = _first(block(x, *args[1:], **kwargs))
    return captured


@dataclass
class _Observation:
    stats: dict = field(default_factory=dict)  # target name -> ActivationStats
    groups: list[list] = field(default_factory=list)  # targets reading the same tensor
    norm_of_group: dict[int, tuple[str, nn.Module]] = field(default_factory=dict)  # group index -> LayerNorm


def _observe(block_name: str, block: nn.Module, targets, inputs, generator, outputs: list) -> _Observation:
    from visbatch.core.tasks.quantize import ActivationStats, _input_of

    observation = _Observation({t.name: ActivationStats() for t in targets})
    first_batch: dict[str, torch.Tensor] = {}
    norm_outputs: list[tuple[str, nn.Module, torch.Tensor]] = []
    handles = []
    recording = [True]
    for target in targets:
        def hook(module, args, kwargs, target=target):
            raw = args[0] if args else kwargs["query"]
            if recording[0]:
                first_batch[target.name] = raw  # held, so no tensor id is reused while grouping
            observation.stats[target.name].add(_input_of(target, (raw,)), generator)
        handles.append(target.module.register_forward_pre_hook(hook, with_kwargs=True))
    for name, module in block.named_modules():
        if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            def norm_hook(mod, args, output, name=name):
                if recording[0]:
                    norm_outputs.append((f"{block_name}.{name}", mod, output))
            handles.append(module.register_forward_hook(norm_hook))
    try:
        for args, kwargs in inputs:
            outputs.append(_first(block(*args, **kwargs)))
            recording[0] = False
    finally:
        for handle in handles:
            handle.remove()
    for target in targets:
        if target.name not in first_batch:
            continue
        for group in observation.groups:
            if first_batch[group[0].name] is first_batch[target.name]:
                group.append(target)
                break
        else:
            observation.groups.append([target])
    for index, group in enumerate(observation.groups):
        for norm_name, norm, output in norm_outputs:
            if output is first_batch[group[0].name]:
                observation.norm_of_group[index] = (norm_name, norm)
    return observation


def _set_weight(target, w: torch.Tensor) -> None:
    parameter = target.module.in_proj_weight if target.kind == "mha_in_proj" else target.module.weight
    parameter.data.copy_(w.reshape(parameter.shape).to(parameter.dtype))


def _block_error(block, inputs, references) -> float:
    total, energy = 0.0, 0.0
    for (args, kwargs), reference in zip(inputs, references):
        output = _first(block(*args, **kwargs)).float()
        total += float((output - reference.float()).pow(2).sum())
        energy += float(reference.float().pow(2).sum())
    return total / max(energy, 1e-12)


def _search_inputs(inputs, outputs):
    taken, count = [], 0
    for pair, output in zip(inputs, outputs):
        taken.append((pair, output))
        count += pair[0][0].shape[0] if pair[0][0].dim() else 1
        if count >= AWQ_SEARCH_SAMPLES:
            break
    return [p for p, _ in taken], [o for _, o in taken]


@torch.no_grad()
def quantize_chain(chain: Chain, targets, inputs, bits: int, group_size: int | None, method: str,
                   act_order: bool = False, awq_clip: bool = True) -> tuple[list, dict[str, torch.Tensor]]:
    """Quantize the ``targets`` inside ``chain`` block by block from the first block's captured
    ``inputs``. Returns (QuantizedLayer list, parameter overrides {name: tensor} for folded
    LayerNorms)."""
    from visbatch.core.tasks.quantize import quantize_layer

    generator = torch.Generator().manual_seed(0)
    layers, overrides = [], {}
    for block_name, block in chain.blocks:
        block_targets = [t for t in targets if t.name.startswith(block_name + ".")]
        outputs: list[torch.Tensor] = []
        observation = _observe(block_name, block, block_targets, inputs, generator, outputs)
        if method != "awq":
            layers += [quantize_layer(t, bits, group_size, method, observation.stats[t.name], act_order)
                       for t in block_targets]
        else:
            search_in, search_out = _search_inputs(inputs, outputs)
            originals = {t.name: t.weight().float().cpu().clone() for t in block_targets}
            for index, group in enumerate(observation.groups):
                layers += _awq_group(block, group, observation, index, originals, search_in, search_out,
                                     bits, group_size, awq_clip, overrides)
            for target in block_targets:  # never reached by the block's forward: plain rounding
                if all(target is not t for g in observation.groups for t in g):
                    layers.append(quantize_layer(target, bits, group_size, "rtn", observation.stats[target.name]))
        inputs = [((output,) + args[1:], kwargs) for (args, kwargs), output in zip(inputs, outputs)]
    return layers, overrides


def _awq_group(block, group, observation, index, originals, search_in, search_out, bits, group_size, awq_clip,
               overrides) -> list:
    from visbatch.core.tasks.quantize import QuantizedLayer, _output_error, feeds_softmax

    stats = observation.stats[group[0].name]
    magnitude = stats.mean_abs().float().cpu()
    weights = [originals[t.name] for t in group]

    def evaluate(effective):
        try:
            for target, w in zip(group, effective):
                _set_weight(target, w)
            return _block_error(block, search_in, search_out)
        finally:
            for target in group:
                _set_weight(target, originals[target.name])

    alpha, s, _ = search_scale(weights, magnitude, bits, group_size, evaluate)
    results = []
    for target in group:
        rows = observation.stats[target.name].sample().float()
        clip = (search_clip(originals[target.name] * s.view(1, -1), rows / s.view(1, -1), bits, group_size)
                if awq_clip and not feeds_softmax(target) and rows.numel() else None)
        quantized, effective = scaled_effective_weight(originals[target.name], s, bits, group_size, clip)
        results.append((target, quantized, effective, rows))
    folded = index in observation.norm_of_group and alpha > 0 and _fold_is_exact(
        block, observation.norm_of_group[index][1], s, results, originals, search_in)
    if folded:
        norm_name, norm = observation.norm_of_group[index]
        overrides[f"{norm_name}.weight"] = (norm.weight.detach().float().cpu() / s).to(norm.weight.dtype)
        if norm.bias is not None:
            overrides[f"{norm_name}.bias"] = (norm.bias.detach().float().cpu() / s).to(norm.bias.dtype)
    layers = []
    for target, quantized, effective, rows in results:
        w = originals[target.name]
        layers.append(QuantizedLayer(
            target, quantized, None if folded else (1 / s), alpha,
            float((effective - w).norm() / w.norm().clamp(min=1e-12)), _output_error(w, effective, rows),
            folded_into=observation.norm_of_group[index][0] if folded else None))
    return layers


def _fold_is_exact(block, norm: nn.LayerNorm, s: torch.Tensor, results, originals, search_in) -> bool:
    """Whether dividing the LayerNorm's affine parameters by ``s`` and multiplying the group's
    weights by it leaves the block's output unchanged (it does unless something else reads the
    LayerNorm's output)."""
    weight, bias = norm.weight.detach().clone(), None if norm.bias is None else norm.bias.detach().clone()
    try:
        for target, _, effective, _ in results:
            _set_weight(target, effective)
        explicit = [_first(block(*args, **kwargs)).float() for args, kwargs in search_in]
        for target, _, effective, _ in results:
            _set_weight(target, effective * s.view(1, -1))
        scale = s.to(weight.device, weight.dtype)
        norm.weight.data.div_(scale)
        if bias is not None:
            norm.bias.data.div_(scale)
        folded = [_first(block(*args, **kwargs)).float() for args, kwargs in search_in]
    finally:
        norm.weight.data.copy_(weight)
        if bias is not None:
            norm.bias.data.copy_(bias)
        for target, *_ in results:
            _set_weight(target, originals[target.name])
    difference = sum(float((a - b).pow(2).sum()) for a, b in zip(explicit, folded))
    energy = sum(float(a.pow(2).sum()) for a in explicit)
    return difference <= FOLD_TOLERANCE ** 2 * max(energy, 1e-12)

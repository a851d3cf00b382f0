"""The pipeline split: which layers each stage holds, computed as DeepSpeed's PipelineModule
partitions them ('uniform' or 'parameters'), without building anything."""
from __future__ import annotations

import math

from pretrain.config.schema import Config, ModelConfig
from pretrain.model.size import count_params

__all__ = ["pipeline_layer_params", "partition_uniform", "partition_balanced", "stage_bounds", "stage_blocks"]


def pipeline_layer_params(model_cfg: ModelConfig, padded_vocab: int) -> list[tuple[str, int]]:
    """The pipeline's layer list (`GPT.layers()`: embedding, blocks, head = final norm +
    output matrix) with the parameters each stage holding it stores.

    With tied embeddings the head is DeepSpeed's TiedLayerSpec of the embedding, so the last
    stage holds (and DeepSpeed's 'parameters' partition counts) a copy of the token embedding.
    """
    c = count_params(model_cfg, padded_vocab)
    layers = [("embedding", c["token_embedding"] + c["position_embedding"])]
    layers += [(f"block{i}", c["per_block"]) for i in range(model_cfg.n_layer)]
    layers.append(("head", c["final_norm"] + padded_vocab * model_cfg.d_model))
    return layers


def partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """Boundaries [0, ..., num_items] as deepspeed.runtime.utils.partition_uniform."""
    if num_items <= num_parts:
        return [min(p, num_items) for p in range(num_parts + 1)]
    chunk, residual = divmod(num_items, num_parts)
    parts = [p * chunk for p in range(num_parts + 1)]
    for i in range(residual):
        for j in range(i + 1, num_parts + 1):
            parts[j] += 1
    return parts


def partition_balanced(weights: list[int], num_parts: int) -> list[int]:
    """Boundaries as deepspeed.runtime.utils.partition_balanced (linear-partition DP)."""
    n, m = len(weights), num_parts
    if n <= m:
        return partition_uniform(n, m)
    inf = math.inf
    dp_max = [[inf] * (m + 1) for _ in range(n + 1)]
    dp_min = [[inf] * (m + 1) for _ in range(n + 1)]
    dp_cost = [[inf] * (m + 1) for _ in range(n + 1)]
    position = [[0] * (m + 1) for _ in range(n + 1)]
    prefix = [0.0] * (n + 1)
    for i, w in enumerate(weights):
        prefix[i + 1] = prefix[i] + w
    dp_max[0][0] = 0
    dp_cost[0][0] = 0
    for i in range(1, n + 1):
        for j in range(1, min(i, m) + 1):
            for k in range(i):
                seg = prefix[i] - prefix[k]
                max_sum = max(dp_max[k][j - 1], seg)
                min_sum = min(dp_min[k][j - 1], seg)
                cost = max_sum - min_sum
                if dp_cost[i][j] >= cost:
                    dp_cost[i][j] = cost
                    dp_max[i][j] = max_sum
                    dp_min[i][j] = min_sum
                    position[i][j] = k
    parts = [n]
    for i in reversed(range(1, m + 1)):
        parts.append(position[parts[-1]][i])
    parts.reverse()
    return parts


def stage_bounds(cfg: Config, padded_vocab: int, pp: int) -> list[tuple[int, int]]:
    """[start, stop) of each pipeline stage in the layer list (pipeline_layer_params)."""
    layers = pipeline_layer_params(cfg.model, padded_vocab)
    if cfg.parallel.pipeline_partition == "uniform":
        parts = partition_uniform(len(layers), pp)
    else:
        parts = partition_balanced([w for _, w in layers], pp)
    return [(parts[i], parts[i + 1]) for i in range(pp)]


def stage_blocks(cfg: Config, padded_vocab: int, pp: int) -> list[range]:
    """Transformer blocks (indices) of each pipeline stage, as DeepSpeed partitions
    [embedding, block0..blockL-1, head] with parallel.pipeline_partition."""
    out = []
    for start, stop in stage_bounds(cfg, padded_vocab, pp):
        # layer index i >= 1 is block i-1 for i in 1..L
        lo = max(start, 1) - 1
        hi = min(stop, cfg.model.n_layer + 1) - 1
        out.append(range(lo, max(lo, hi)))
    return out

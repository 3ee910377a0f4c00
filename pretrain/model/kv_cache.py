"""Keys and values of past positions for incremental decoding: the rolling buffer of the Mistral paper.

Each layer keeps `size` slots and position p lives in slot p % size. With a sliding window W the buffer holds W
slots: a query at position p reads only positions p - W + 1 .. p, so the slot a new position overwrites belongs
to a position no later query can see. Without a window, `size` is the longest sequence to decode and nothing is
overwritten. A chunk of at most `size` new positions attends to the old slots and to itself before its keys are
written (the last queries of a chunk of W need keys that the chunk itself overwrites), which is what lets the
prompt be pre-filled in chunks of W.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.config import ModelConfig


class RollingKVCache:
    def __init__(self, cfg: ModelConfig, *, local_kv_heads: int, batch: int, max_positions: int,
                 dtype: torch.dtype, device: torch.device):
        """`max_positions`: the most positions this cache will see (prompt + generated tokens)."""
        self.window = cfg.sliding_window
        self.size = min(self.window, max_positions) if self.window is not None else max_positions
        self.max_positions = max_positions
        shape = (cfg.n_layers, batch, self.size, local_kv_heads, cfg.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        # The position each slot holds, -1 while empty; shared by the layers, updated after a whole forward.
        self.slot_positions = torch.full((self.size,), -1, dtype=torch.long, device=device)
        self.length = 0  # positions consumed so far: the next chunk starts here

    def layer(self, index: int) -> LayerCache:
        return LayerCache(self, index)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal (windowed) attention of a chunk over the cached positions and itself; stores the chunk's keys.
        q: [B, C, Hq, D]; k, v: [B, C, Hkv, D] for positions length .. length + C - 1. Returns [B, C, Hq, D]."""
        chunk = q.shape[1]
        if chunk > self.size:
            raise ValueError(f"a chunk of {chunk} positions does not fit a cache of {self.size}: split it")
        if self.length + chunk > self.max_positions:
            raise ValueError(f"position {self.length + chunk} is beyond this cache's {self.max_positions}")
        query_positions = torch.arange(self.length, self.length + chunk, device=q.device)
        key_positions = torch.cat([self.slot_positions, query_positions])
        visible = (key_positions[None, :] <= query_positions[:, None]) & (key_positions[None, :] >= 0)
        if self.window is not None:
            visible &= key_positions[None, :] > query_positions[:, None] - self.window
        keys = torch.cat([self.keys[layer], k], dim=1)
        values = torch.cat([self.values[layer], v], dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                             attn_mask=visible, enable_gqa=True)
        slots = query_positions % self.size
        self.keys[layer, :, slots] = k
        self.values[layer, :, slots] = v
        return out.transpose(1, 2)

    def advance(self, chunk: int) -> None:
        """After every layer has attended: the chunk's positions now occupy their slots."""
        positions = torch.arange(self.length, self.length + chunk, device=self.slot_positions.device)
        self.slot_positions[positions % self.size] = positions
        self.length += chunk


class LayerCache:
    """One layer's view of the cache, handed to that layer's attention."""

    def __init__(self, cache: RollingKVCache, index: int):
        self.cache = cache
        self.index = index

    @property
    def start(self) -> int:
        return self.cache.length

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.cache.attend(self.index, q, k, v)

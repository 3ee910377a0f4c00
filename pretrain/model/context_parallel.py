"""Context parallelism (`parallel.cp`): each sequence split into cp contiguous chunks over a context-parallel group,
with only the sliding window's edge exchanged.

Query i sees keys i - W + 1 .. i, so the rank that holds positions [start, start + L) needs, besides its own keys
and values, only the W - 1 before `start`: its "halo". They come from the rank before it, and from several
ranks before it when W - 1 exceeds a chunk. Every chunk holds the same number of queries, each seeing at most W
keys, so the work is balanced without reordering the chunks (ring attention over a causal mask needs a zigzag
order for that). Without a window the halo is everything before the chunk.

The exchange is one `all_to_all_single` over the group, in which each rank sends the tail of its chunk to each
rank whose halo it reaches (empty pieces to the others), through torch's functional collectives: differentiable
(the backward pass sends the halo's gradients back the same way, to be added to the sender's own) and traceable,
so it stays inside a compiled decoder layer. The attention then runs over the queries of the chunk against
[halo; chunk] keys, its causal diagonal aligned at the bottom right (`attention.attention` with longer keys).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from pretrain import parallel


class ContextParallel:
    """This rank's place in its context-parallel group: chunk `rank` of `size` of every sequence."""

    def __init__(self, group: dist.ProcessGroup, rank: int, size: int):
        self.group, self.rank, self.size = group, rank, size

    @classmethod
    def of_current_group(cls) -> ContextParallel | None:
        """The context-parallel group parallel.init_distributed built, or None where there is none (cp = 1)."""
        if parallel.cp_size() <= 1:  # 0 where no process group is initialized
            return None
        return cls(parallel.cp_group(), parallel.cp_rank(), parallel.cp_size())

    def chunk_start(self, chunk_len: int) -> int:
        """The position in the whole sequence of this rank's first token."""
        return self.rank * chunk_len

    def _overlap(self, source: int, target: int, chunk_len: int, reach: int | None) -> int:
        """How many of the last positions of chunk `source` lie within `reach` positions before chunk `target`."""
        if source >= target:
            return 0
        target_start = target * chunk_len
        halo_start = 0 if reach is None else max(0, target_start - reach)
        return max(0, (source + 1) * chunk_len - max(source * chunk_len, halo_start))

    def halo(self, x: torch.Tensor, reach: int | None) -> torch.Tensor:
        """x: this rank's chunk, sequence first [L, ...]. Returns the H positions before the chunk within `reach` of it
        (all of them for `reach` None) [H, ...], in order, gathered from the ranks before this one; differentiable."""
        chunk_len = x.shape[0]
        send = [self._overlap(self.rank, target, chunk_len, reach) for target in range(self.size)]
        receive = [self._overlap(source, self.rank, chunk_len, reach) for source in range(self.size)]
        outgoing = torch.cat([x[chunk_len - count:] for count in send])  # the tail for each rank, in rank order
        return funcol.all_to_all_single_autograd(outgoing, receive, send, self.group)

    def extend_keys(self, k: torch.Tensor, v: torch.Tensor, reach: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [B, L, Hkv, D] of this rank's chunk -> [B, H + L, Hkv, D]: the halo's keys and values, then the
        chunk's; one exchange for both."""
        kv = torch.stack((k, v), dim=2).transpose(0, 1)  # [L, B, 2, Hkv, D]
        halo = self.halo(kv, reach).transpose(0, 1)  # [B, H, 2, Hkv, D]
        return torch.cat((halo[:, :, 0], k), dim=1), torch.cat((halo[:, :, 1], v), dim=1)

    def extend_tokens(self, tokens: torch.Tensor, reach: int | None) -> torch.Tensor:
        """tokens: [B, L] of this rank's chunk -> [B, H + L], the halo's tokens first (documents are told apart by
        their end-of-document tokens, so the halo's are needed to know which keys share a query's document)."""
        return torch.cat((self.halo(tokens.t(), reach).t(), tokens), dim=1)

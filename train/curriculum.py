"""Short captions first: a curriculum for the first steps of training.

A model that learns to caption from scratch (or a projector that has not yet aligned) learns fastest from the
simplest examples: an image with one object and a three-word caption ties what the image shows to what is
said about it more directly than a long caption does. `ShortCaptionsFirstSampler` orders the first epoch so
that its first `first_examples` draws all come from the shortest captions, then continues with every other
example; later epochs are plain shuffles. With `grow=True` the pool of allowed captions grows linearly from the
shortest fraction to all of them over those draws (a "competence" curriculum, Platanios et al., 2019), so
captions of middle length come in before the longest. Every example is still seen exactly once per epoch, so the data's
mix over an epoch is unchanged: only its order is.

Caption length is counted in words (for LLaVA-style conversations, the words of the assistant's turns),
read from the dataset's records without loading any image.
"""

from collections.abc import Iterable

import torch
from torch.utils.data import Sampler


class ShortCaptionsFirstSampler(Sampler):
    """Epoch 0: `first_examples` shuffled draws from the `shortest_fraction` of examples with the fewest caption
    words, then every remaining example, shuffled. Other epochs: a shuffle. Deterministic per (seed, epoch), so a
    resumed run sees the order an uninterrupted one would.

    Args:
        caption_words: caption length (in words) of each example of the dataset, in dataset order.
        first_examples: how many of the epoch's first draws come from the shortest captions (the curriculum's
            optimizer steps times the global batch size); at most the size of that pool.
        shortest_fraction: the share of examples, shortest captions first, that the first draws come from.
        seed: the shuffles' seed.
    """

    def __init__(
        self,
        caption_words: Iterable[int],
        first_examples: int,
        shortest_fraction: float,
        seed: int = 0,
        grow: bool = False,
    ):
        if not 0 < shortest_fraction <= 1:
            raise ValueError(f"shortest_fraction must be in (0, 1], got {shortest_fraction}.")
        if first_examples < 0:
            raise ValueError(f"first_examples must be >= 0, got {first_examples}.")
        self.words = torch.as_tensor(list(caption_words), dtype=torch.long)
        self.pool_size = max(1, round(shortest_fraction * len(self.words)))
        self.first_examples = min(first_examples, self.pool_size)
        self.seed = seed
        self.grow = grow
        if grow:  # every example may be drawn by the end; the pool then spans the whole dataset
            self.first_examples = min(first_examples, len(self.words))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by accelerate's data loader at the start of each epoch."""
        self.epoch = epoch

    def __len__(self):
        return len(self.words)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.words), generator=generator)
        if self.epoch > 0 or self.first_examples == 0:
            return iter(order.tolist())
        # The pool: the shortest captions, ties broken by the shuffle (a stable sort of the shuffled order).
        by_length = order[torch.argsort(self.words[order], stable=True)]
        if self.grow:
            first = self._growing_draws(by_length, generator)
        else:
            pool = by_length[: self.pool_size]
            first = pool[torch.randperm(self.pool_size, generator=generator)][: self.first_examples]
        taken = torch.zeros(len(self.words), dtype=torch.bool)
        taken[first] = True
        return iter(torch.cat([first, order[~taken[order]]]).tolist())

    def _growing_draws(self, by_length: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Draw t (of `first_examples`) is uniform over the not-yet-drawn examples among the shortest
        `pool_size + (n - pool_size) * t / first_examples` (rejection sampling on a used mask)."""
        n, total = len(by_length), self.first_examples
        used = torch.zeros(n, dtype=torch.bool)
        drawn = []
        uniforms = torch.rand(4 * total + 64, generator=generator).tolist()
        for t in range(total):
            allowed = self.pool_size + (n - self.pool_size) * t // total
            while True:
                if not uniforms:
                    uniforms = torch.rand(4 * total + 64, generator=generator).tolist()
                position = min(int(uniforms.pop() * allowed), allowed - 1)
                if not used[position]:
                    break
            used[position] = True
            drawn.append(position)
        return by_length[torch.tensor(drawn, dtype=torch.long)]

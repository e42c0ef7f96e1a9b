"""A KV cache that appends decode steps into preallocated buffers instead of `torch.cat`-ing every step.

transformers' `DynamicLayer` concatenates the whole cache at every decode step; on a CPU that means
allocating and copying ~B·L·H·D floats per layer per token, which was the largest single cost of a
batched decode step here (and of page faults for the freshly allocated memory). `GrowableLayer` keeps a
buffer with spare capacity and exposes `keys`/`values` as views of its filled part, so an append is one
small copy. Everything else (crop, batch_repeat_interleave, batch_select_indices, deepcopy) is inherited:
those replace `keys`/`values` with other tensors, and the next `update` notices and adopts them.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

SPARE_TOKENS = 64  # capacity added whenever a buffer is (re)allocated
CAP_ALIGN = 64  # capacities are multiples of this, so any page size dividing it tiles a buffer (QUEST page gather)


def _capacity(n: int) -> int:
    return -(-n // CAP_ALIGN) * CAP_ALIGN


class GrowableLayer(DynamicLayer):
    """DynamicLayer with amortised O(new tokens) appends."""

    def _owns(self) -> bool:
        """True if keys/values are still views of this layer's buffers (not replaced by crop/select/...)."""
        kb = getattr(self, "_kbuf", None)
        return (kb is not None and self.keys.data_ptr() == kb.data_ptr() and self.keys.shape[0] == kb.shape[0]
                and self.values.data_ptr() == self._vbuf.data_ptr())

    def _adopt(self, extra: int) -> None:
        """Copy the current keys/values into fresh buffers with room for `extra` more tokens."""
        self._pages = None
        B, H, L, D = self.keys.shape
        cap = _capacity(L + max(extra, SPARE_TOKENS))
        self._kbuf = self.keys.new_empty(B, H, cap, D)
        self._vbuf = self.values.new_empty(B, H, cap, self.values.shape[-1])
        self._kbuf[:, :, :L] = self.keys
        self._vbuf[:, :, :L] = self.values
        _zero_tail(self._kbuf, self._vbuf, L)
        self.keys, self.values = self._kbuf[:, :, :L], self._vbuf[:, :, :L]  # owned from here on (page_bounds sizes by it)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
            self._adopt(0)
            new_len = key_states.shape[-2]
        else:
            L, n = self.keys.shape[-2], key_states.shape[-2]
            stale = not self._owns() or L + n > self._kbuf.shape[-2]
            if stale or (self._kbuf.is_inference() and not torch.is_inference_mode_enabled()):
                self._adopt(n)
            self._kbuf[:, :, L: L + n] = key_states
            self._vbuf[:, :, L: L + n] = value_states
            new_len = L + n
        self.keys = self._kbuf[:, :, :new_len]
        self.values = self._vbuf[:, :, :new_len]
        return self.keys, self.values

    def next_slot(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The whole key and value buffers [B, H, capacity, D], with room for one more token at position
        len(keys) (re-allocated as `update` would), for a kernel that writes that token in place; `advance`
        then takes it in. None if the layer holds nothing yet."""
        if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
            return None
        L = self.keys.shape[-2]
        if not self._owns() or L + 1 > self._kbuf.shape[-2] or (
                self._kbuf.is_inference() and not torch.is_inference_mode_enabled()):
            self._adopt(1)
        return self._kbuf, self._vbuf

    def advance(self) -> None:
        """Take in the token a kernel wrote at position len(keys) of the buffers `next_slot` returned."""
        n = self.keys.shape[-2] + 1
        self.keys, self.values = self._kbuf.narrow(2, 0, n), self._vbuf.narrow(2, 0, n)  # narrow: fewer µs than [:, :, :n]

    def padded(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The whole key and value buffers [B, H, capacity, D], contiguous, positions >= the filled length
        finite (zeros or cropped-away entries), or None when keys/values are not this layer's buffers.

        Low-precision CPU matmuls copy a strided operand (the filled prefix of a buffer) to a contiguous one
        first: for bf16 that copy costs 3-4x the product, so decode attention may multiply by the whole
        buffer and mask the tail instead."""
        return (self._kbuf, self._vbuf) if self._owns() else None

    def crop(self, max_length: int) -> None:
        super().crop(max_length)
        pages = getattr(self, "_pages", None)
        if pages is not None:  # page summaries past the new end are stale
            page, pmax, pmin, done = pages
            self._pages = (page, pmax, pmin, min(done, self.keys.shape[-2] // page))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._pages = None
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._pages = None
        super().batch_select_indices(indices)

    def page_bounds(self, page: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Elementwise max and min of the keys of each page of `page` tokens, aligned to position 0: two
        [B, H, P, D], the last page partial if the length is not a multiple (what `quest_page_bounds` computes),
        the two halves of one [B, H, P, 2D] buffer as there.

        Kept up to date as tokens arrive: a page is reduced once, when it is complete, so a decode step reads
        the newest page instead of the whole cache (QUEST's page metadata)."""
        keys = self.keys
        B, H, L, D = keys.shape
        n_full, pages = L // page, getattr(self, "_pages", None)
        if (pages is None or pages[0] != page or not self._owns() or pages[1].shape[0] != B
                or pages[1].shape[2] * page < L):
            cap = -(-max(L, self._kbuf.shape[-2] if self._owns() else L) // page) + 1
            both = keys.new_empty(B, H, cap, 2 * D)  # max | min side by side: one product scores both
            self._page_buf = both
            pmax, pmin, done = both[..., :D], both[..., D:], 0
        else:
            _, pmax, pmin, done = pages
        if n_full > done:
            blk = keys[:, :, done * page: n_full * page].reshape(B, H, n_full - done, page, D)
            pmax[:, :, done:n_full], pmin[:, :, done:n_full] = blk.amax(dim=3), blk.amin(dim=3)
        P = n_full
        if L % page:  # the partial last page changes every step: not kept
            tail = keys[:, :, n_full * page:]
            pmax[:, :, n_full], pmin[:, :, n_full] = tail.amax(dim=2), tail.amin(dim=2)
            P += 1
        self._pages = (page, pmax, pmin, n_full)
        return pmax[:, :, :P], pmin[:, :, :P]

    def page_buffer(self, page: int) -> torch.Tensor:
        """The [B, H, pages, 2D] buffer behind `page_bounds` (each page's key max | min), up to date for the keys
        held and with a page for one more token: a kernel appending a key folds it in there (a later
        `page_bounds` recomputes the pages it changed from the keys anyway)."""
        self.page_bounds(page)
        return self._page_buf

    @classmethod
    def repeated(cls, src: DynamicLayer, k: int, spare: int = SPARE_TOKENS) -> "GrowableLayer":
        """A layer holding every row of `src` k times in a row (rows b·k … b·k+k−1 from row b), written straight
        into buffers with room for `spare` more tokens: one copy, where deepcopy + batch_repeat_interleave and
        the first append after it make three."""
        keys, values = src.keys, src.values
        out = cls()
        if keys is None or keys.dim() != 4:  # a layer that holds nothing yet
            if keys is not None:
                out.lazy_initialization(keys, values)
            return out
        B, H, L, D = keys.shape
        Dv, cap = values.shape[-1], _capacity(L + max(1, spare))
        out.lazy_initialization(keys, values)
        out._kbuf = keys.new_empty(B * k, H, cap, D)
        out._vbuf = values.new_empty(B * k, H, cap, Dv)
        out._kbuf.view(B, k, H, cap, D)[..., :L, :].copy_(keys[:, None].expand(B, k, H, L, D))
        out._vbuf.view(B, k, H, cap, Dv)[..., :L, :].copy_(values[:, None].expand(B, k, H, L, Dv))
        _zero_tail(out._kbuf, out._vbuf, L)
        out.keys, out.values = out._kbuf[:, :, :L], out._vbuf[:, :, :L]
        return out


class GrowableCache(DynamicCache):
    """A DynamicCache whose layers are GrowableLayer (full attention only, as in Llama)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer_class_to_replicate = GrowableLayer

    def next_slots(self) -> list[torch.Tensor] | None:
        """[keys 0, values 0, keys 1, …]: every layer's buffers with room for the next token
        (`GrowableLayer.next_slot`), or None when a layer cannot give them."""
        slots = []
        for layer in self.layers:
            slot = layer.next_slot() if isinstance(layer, GrowableLayer) else None
            if slot is None:
                return None
            slots.extend(slot)
        return slots

    def advance(self) -> None:
        """Every layer takes in the token written into the buffers of `next_slots`."""
        for layer in self.layers:
            layer.advance()

    @classmethod
    def repeated(cls, cache: DynamicCache, k: int = 1, spare: int = SPARE_TOKENS) -> "GrowableCache":
        """An independent copy of `cache` with each row repeated k times, room for `spare` appended tokens."""
        out = cls()
        with torch.inference_mode(torch.is_inference_mode_enabled() or _any_inference(cache)):
            out.layers = [GrowableLayer.repeated(layer, k, spare) for layer in cache.layers]
        return out


def _zero_tail(kbuf: torch.Tensor, vbuf: torch.Tensor, L: int) -> None:
    """Zero the unfilled positions >= L of fresh buffers (`GrowableLayer.padded` exposes them to matmuls, where
    uninitialised memory could hold NaN); the filled part is written by a copy, not zeroed first."""
    kbuf[:, :, L:].zero_()
    vbuf[:, :, L:].zero_()


def _any_inference(cache: DynamicCache) -> bool:
    return any(layer.keys is not None and layer.keys.is_inference() for layer in cache.layers)

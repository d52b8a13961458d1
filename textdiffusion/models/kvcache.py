"""Keys and values reused across denoising steps (Fast-dLLM's prefix and dual cache), for block denoising.

With ``--block-length`` only the current block changes from step to step, yet a plain step re-reads
every position. Here the encoder runs layer by layer from the checkpoint's own weights (no change to
the saved format) and keeps each layer's keys and values:

* at the first step of a block, one full forward stores every layer's keys/values (after rotary, for
  ModernBERT) and gives that step's logits;
* ``prefix``: later steps of the block compute only the block and everything after it as queries; the
  positions before the block contribute their cached keys/values;
* ``dual``: the positions after the block are frozen too; a step computes only the block's positions.

* ``block``: for a block-diffusion encoder (``models/block.EncoderBlockDiffusionLM``), exact. Attention is
  block-causal (a position sees the blocks up to its own, the current block sees everything before it and
  itself), so a finished block's keys/values never change: each call computes only the block just finished
  (once, clean, appended for good) and the current block, against the cache.

Within a block the prefix and dual modes are an approximation (the cached positions would attend to the block's new tokens),
whose quality cost ``benchmarks/generation_speed.py`` measures; with ``refresh="step"`` every step is a
full forward and the result equals the uncached model. Rows of a batch move through their blocks at
their own pace: each call runs the rows that start a block as one full sub-batch and the rest as one
partial sub-batch; finished rows cost nothing.

Supported: ModernBERT (local sliding-window and global layers, rotary, pre-norm, GLU), the post-LN
BERT family (BERT, RoBERTa and DistilRoBERTa-shaped RoBERTa configs, MPNet with its relative position
bias) and the Llama family adapted to diffusion (``models/adapt.py``: RMSNorm pre-norm, rotary, grouped-query
attention, SwiGLU; full attention and shifted logits). Anything else falls back to the uncached path with a
one-line notice.

**Shifted logits** (a causal LM adapted to diffusion): the logit at position i is read from the hidden
state at i - 1 (position 0 from its own). A block's first position therefore needs the state of the
position just *before* the block, which lies in the cached prefix. So a cached step's queries start one
position early: ``[start - 1, end)`` in dual mode, ``[start - 1, row end)`` in prefix mode; that extra
query also refreshes its own keys/values (its token is committed, but its deeper layers now see the block's
new tokens). The logits are then read at ``positions - 1``. Give the cache the denoiser
(``CausalDiffusionLM``), not the bare causal LM: the wrapper is what says the logits are shifted, and a
Llama without it (a plain causal LM) is refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from textdiffusion.core.architectures import architecture, masked_lm_head
from textdiffusion.core.denoiser import TrainedModule

CACHE_MODES = ("none", "prefix", "dual")  # and "block", chosen by a block-diffusion model itself (not a flag)
# what `generate --cache` accepts: "auto" is dual wherever it applies (blocks, a supported architecture; every
# guidance method included) and none elsewhere, silently; benchmarks/generation_speed.py is why dual is the choice
CACHE_CHOICES = ("auto",) + CACHE_MODES
REFRESH = ("block", "step")


def _unwrap(model) -> tuple:
    """(the Hugging Face model, whether its logits are shifted) of a model or of a denoiser around one."""
    if isinstance(model, TrainedModule):
        return model.model, bool(getattr(model, "shifted_logits", False))
    return model, False


def cache_support(model) -> str | None:
    """None when ``model`` (a Hugging Face model, or the denoiser around it) can use the cache, otherwise why
    not (one line)."""
    inner, shifted = _unwrap(model)
    config = inner.config
    kind = config.model_type
    arch = architecture(inner)
    if arch is None or arch.kv_cache is None:
        return f"--cache needs ModernBERT, BERT, RoBERTa, MPNet or an adapted Llama; {kind!r} is not supported"
    if masked_lm_head(inner) is None:
        return f"--cache: no known masked-LM head for {kind!r}"
    if kind in ("bert", "roberta") and (getattr(config, "is_decoder", False) or
                                        getattr(config, "position_embedding_type", "absolute") != "absolute"):
        return f"--cache: {kind!r} with relative positions or as a decoder is not supported"
    if arch.kv_cache == "llama" and not shifted:
        return (f"--cache: a {kind!r} causal LM denoises only adapted to diffusion (train --adapt-from-causal; "
                "pass its CausalDiffusionLM, whose logits are shifted), not as a plain causal LM")
    if getattr(model, "attention_ratio", 1.0) != 1.0:
        return "--cache needs full attention; this denoiser is still annealing from causal attention (train mode)"
    return None


class DenoisingKVCache:
    """Per-layer keys/values of a batch, and the forward passes that fill and reuse them."""

    def __init__(self, model, mode: str = "prefix", refresh: str = "block", block_size: int | None = None):
        if mode == "block" and not block_size:
            raise ValueError("the block cache needs the model's block_size.")
        if mode not in CACHE_MODES[1:] + ("block",):
            raise ValueError(f"`cache` must be one of {CACHE_MODES[1:]} here, got {mode!r}.")
        if refresh not in REFRESH:
            raise ValueError(f"`cache_refresh` must be one of {REFRESH}, got {refresh!r}.")
        reason = cache_support(model)
        if reason:
            raise ValueError(reason)
        self.mode, self.refresh, self.block_size = mode, refresh, block_size
        self.model, self.shifted = _unwrap(model)  # shifted: the logit at i is read from the state at i - 1
        self.kind = self.model.config.model_type
        self.family = architecture(self.model).kv_cache  # "modernbert" | "post-ln" | "llama"
        self.base = self.model.base_model
        self.head = masked_lm_head(self.model)
        self.keys: list[torch.Tensor] = []  # per layer [b, h, l, d] (h: the key/value heads)
        self.values: list[torch.Tensor] = []
        self.block_start: torch.Tensor | None = None  # [b] first position of the block each row's cache is for
        self.cached_upto: torch.Tensor | None = None  # block mode: [b] positions before it are exact and final
        self.full_rows = self.partial_rows = 0  # rows run through each path (a cost counter for tests)

    @property
    def length(self) -> int:
        """The positions every row is padded to (the run pads its rows to it)."""
        return self.keys[0].shape[2]

    # -- the entry point ---------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, x: torch.Tensor, attention: torch.Tensor, region: torch.Tensor,
               positions: torch.Tensor) -> torch.Tensor:
        """Logits [n, V] at ``positions`` ([b, l] bool, row-major), which lie in ``region`` ([b, l] bool, the
        current block of each row). Rows with no position cost nothing."""
        b, l = x.shape
        if not self.keys or self.keys[0].shape[:1] != (b,) or self.keys[0].shape[2] != l:
            self._allocate(b, l, x.device)
        arange = torch.arange(l, device=x.device)
        start = torch.where(region, arange, l).min(1).values  # [b] first position of the current block
        end = torch.where(region, arange + 1, 0).max(1).values  # [b] one past its last position
        active = positions.any(1)  # [b]
        if self.mode == "block":
            return self._block_logits(x, attention, positions, start, end, active)
        fresh = active & ((start != self.block_start) | (self.refresh == "step"))  # [b] rows starting a block
        reuse = active & ~fresh
        hidden = torch.empty(b, l, self.base.config.hidden_size, device=x.device, dtype=self.keys[0].dtype)
        key_ok = attention.bool()  # [b, l]
        if bool(fresh.any()):
            rows = fresh.nonzero().squeeze(1)  # [r]
            qpos = arange.expand(len(rows), l)  # [r, l]
            self._forward(x, key_ok, rows, qpos, torch.ones_like(qpos, dtype=torch.bool), hidden)
            self.block_start[rows] = start[rows]
            self.full_rows += len(rows)
        if bool(reuse.any()):
            rows = reuse.nonzero().squeeze(1)
            last = key_ok[rows].sum(1) if self.mode == "prefix" else end[rows]  # [r] queries end here
            first = (start[rows] - int(self.shifted)).clamp_min(0)  # shifted: the state just before the block too
            n_q = int((last - first).max())
            qpos = first[:, None] + torch.arange(n_q, device=x.device)  # [r, n_q]
            valid = qpos < last[:, None]  # [r, n_q] slots beyond a row's window are padding
            self._forward(x, key_ok, rows, qpos.clamp_max(l - 1), valid, hidden)
            self.partial_rows += len(rows)
        if not self.shifted:
            return self.head(self._final_norm(hidden[positions]))  # [n, V]
        row, col = positions.nonzero(as_tuple=True)  # [n] each, row-major like hidden[positions]
        return self.head(self._final_norm(hidden[row, (col - 1).clamp_min(0)]))  # [n, V]: position i reads i - 1

    def _block_logits(self, x, attention, positions, start, end, active) -> torch.Tensor:
        """Block mode: each active row's queries are its positions not yet final (the block just finished, or the
        prompt at a row's first call) and its current block; afterwards everything before the block is final."""
        hidden = torch.empty(*x.shape, self.base.config.hidden_size, device=x.device, dtype=self.keys[0].dtype)
        rows = active.nonzero().squeeze(1)  # every position asked for lies in a computed slot
        if len(rows):
            first, last = self.cached_upto[rows], end[rows]
            qpos = first[:, None] + torch.arange(int((last - first).max()), device=x.device)  # [r, q]
            valid = qpos < last[:, None]
            self._forward(x, attention.bool(), rows, qpos.clamp_max(x.shape[1] - 1), valid, hidden,
                          block=(start[rows], last))
            self.cached_upto[rows] = start[rows]
            self.partial_rows += len(rows)
        return self.head(self._final_norm(hidden[positions]))  # [n, V]

    # -- rows that join and leave (the server's batch, driven by pipelines.denoising.DenoisingRun) ---------------
    def keep_rows(self, keep: torch.Tensor) -> None:
        """Keep only the rows ``keep`` ([r] long, in their new order): a request that leaves takes its rows'
        keys/values with it; the others keep theirs, so no remaining row recomputes anything."""
        if not self.keys:
            return
        self.keys = [k.index_select(0, keep) for k in self.keys]
        self.values = [v.index_select(0, keep) for v in self.values]
        self.block_start = self.block_start.index_select(0, keep)
        self.cached_upto = self.cached_upto.index_select(0, keep)

    def add_rows(self, n: int, length: int, device) -> None:
        """Make room for ``n`` new rows at the end (a request that joins) and widen every row to ``length``
        positions if it is longer. New rows have no block yet, so their first call is a full forward; the
        rows already there keep their keys/values (the widened positions are padding, never attended to)."""
        if not self.keys:
            self._allocate(n, length, device)
            return
        l = self.keys[0].shape[2]
        grow = max(length, l) - l
        def widen(t: torch.Tensor) -> torch.Tensor:  # [b, h, l, d] -> [b + n, h, l + grow, d]
            return F.pad(t, (0, 0, 0, grow, 0, 0, 0, n))
        self.keys = [widen(k) for k in self.keys]
        self.values = [widen(v) for v in self.values]
        self.block_start = torch.cat([self.block_start, self.block_start.new_full((n,), -1)])
        self.cached_upto = torch.cat([self.cached_upto, self.cached_upto.new_zeros(n)])
        if grow:
            self._tables = self._position_tables(l + grow, device, self.keys[0].dtype)

    def _allocate(self, b: int, l: int, device) -> None:
        cfg = self.base.config
        if self.family == "llama":  # grouped-query attention: the cache holds the key/value heads only
            shape = (b, cfg.num_key_value_heads, l, self._layers()[0].self_attn.head_dim)
        else:
            shape = (b, cfg.num_attention_heads, l, cfg.hidden_size // cfg.num_attention_heads)
        dtype = next(self.model.parameters()).dtype
        n = cfg.num_hidden_layers
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n)]
        self.block_start = torch.full((b,), -1, dtype=torch.long, device=device)
        self.cached_upto = torch.zeros(b, dtype=torch.long, device=device)
        self._tables = self._position_tables(l, device, dtype)

    # -- the layer-by-layer forward ----------------------------------------------------------------
    def _forward(self, x, key_ok, rows, qpos, valid, hidden, block=None) -> None:
        """Hidden states of ``rows`` at query slots ``qpos`` [r, q] (``valid`` [r, q] marks real slots) into
        ``hidden`` [b, l, d]; the slots' keys/values are written to the cache, the others are read from it.
        ``block``: (start, end) [r] each of the rows' current blocks, for block-causal attention."""
        l = x.shape[1]
        r = rows[:, None].expand_as(qpos)  # [r, q] batch row of each slot
        if self.kind == "modernbert":  # token embeddings only (positions are rotary): just the query slots
            h = self.base.embeddings(input_ids=x[r, qpos])  # [r, q, d]
        elif self.family == "llama":  # the same, from the bare embedding table
            h = self.base.embed_tokens(x[r, qpos])  # [r, q, d]
        else:  # learned positions (RoBERTa's depend on padding): embed whole rows, keep the slots
            h = self.base.embeddings(input_ids=x[rows])  # [r, l, d]
            h = h.gather(1, qpos[..., None].expand(-1, -1, h.shape[-1]))  # [r, q, d]
        # where the slots' keys/values go: one slice when every row has the same contiguous window
        # (batch 1, or rows in step), else a scatter of the real slots
        same = bool(valid.all()) and bool((qpos[:, 0] == qpos[0, 0]).all())
        write = (slice(int(qpos[0, 0]), int(qpos[0, 0]) + qpos.shape[1]) if same
                 else (r[valid], qpos[valid]))
        masks = self._masks(key_ok[rows], qpos, valid, l, block)
        masks["qpos"] = qpos  # the rotary tables are gathered at these once per call (_rotary)
        for i, layer in enumerate(self._layers()):
            h = self._layer(i, layer, h, rows, write, valid, masks)
        if same:
            hidden[rows, write] = h
        else:
            hidden[r[valid], qpos[valid]] = h[valid]

    def _masks(self, key_ok, qpos, valid, l, block=None) -> dict:
        """Attention masks [r, 1, q, l] (True: attend) shared by every layer: "full" (padding only; None when
        there is none), "local" (ModernBERT's window |query - key| <= window // 2), "bias" (MPNet, additive).
        With ``block`` (start, end) attention is block-causal: a query in the current block sees every key before
        the block's end; a query before it the keys of the trained blocks up to its own, before the block."""
        keys = torch.arange(l, device=qpos.device)
        ok = key_ok[:, None, :]
        if block is not None:
            start, end = block[0][:, None, None], block[1][:, None, None]  # [r, 1, 1]
            q = qpos[:, :, None]
            ok = ok & torch.where(q >= start, keys < end,
                                  (keys < start) & (keys // self.block_size <= q // self.block_size))
        ok = ok | (qpos[:, :, None] == keys)  # [r, q, l]: a query always sees itself
        ok |= ~valid[:, :, None]  # padding slots see everything: no empty softmax
        masks = {"full": None if bool(ok.all()) else ok[:, None]}
        if self.kind == "modernbert":
            near = (qpos[:, :, None] - keys).abs() <= self.base.config.sliding_window  # [r, q, l]
            masks["local"] = (ok & (near | ~valid[:, :, None]))[:, None]
        if self.kind == "mpnet":  # relative position bias, the same for every layer, at the query rows
            bias = self._tables["bias"][0][:, qpos].transpose(0, 1)  # [r, h, q, l]
            masks["bias"] = bias.masked_fill(~ok[:, None], float("-inf")).to(self.keys[0].dtype)
        return masks

    def _attend(self, i, q, k, v, rows, write, valid, mask):
        """Write the slots' k/v [r, h, q, d] into layer i's cache, then attend over all l positions."""
        kc, vc = self.keys[i], self.values[i]
        whole = len(rows) == kc.shape[0]
        if isinstance(write, slice):
            if whole:
                kc[:, :, write], vc[:, :, write] = k, v
            else:
                kc[rows, :, write], vc[rows, :, write] = k, v
        else:
            kc[write[0], :, write[1]] = k.transpose(1, 2)[valid]  # [n_valid, h, d]
            vc[write[0], :, write[1]] = v.transpose(1, 2)[valid]
        keys, values = (kc, vc) if whole else (kc[rows], vc[rows])  # [r, kv, l, d]
        r, heads, n_q, d = q.shape
        group = heads // keys.shape[1]  # query heads per key/value head (grouped-query attention), else 1
        if group > 1:  # fold each group's query heads into the query axis: the cached keys/values are not copied
            q = q.reshape(r, keys.shape[1], group * n_q, d)  # [r, kv, group*q, d]: head h = kv * group + j
            mask = None if mask is None else mask.repeat(1, 1, group, 1)  # [r, 1, group*q, l]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [r, h, q, d] ([r, kv, group*q, d])
        return out.reshape(r, heads, n_q, d).transpose(1, 2).flatten(2)  # [r, q, h*d]

    def _layers(self):
        if self.family in ("modernbert", "llama"):
            return self.base.layers
        return self.base.encoder.layer

    def _layer(self, i, layer, h, rows, write, valid, masks):
        heads = self.base.config.num_attention_heads
        if self.kind == "modernbert":
            a = layer.attn_norm(h)
            qkv = layer.attn.Wqkv(a).view(*h.shape[:2], 3, heads, -1)  # [r, q, 3, h, d]
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # [r, h, q, d]
            if layer.attention_type not in masks:
                masks[layer.attention_type] = self._rotary(layer.attention_type, masks["qpos"])
            cos, sin = masks[layer.attention_type]
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            mask = masks["local"] if layer.attn.sliding_window is not None else masks["full"]
            out = self._attend(i, q, k, v, rows, write, valid, mask)
            h = h + layer.attn.Wo(out)
            return h + layer.mlp(layer.mlp_norm(h))
        if self.family == "llama":  # RMSNorm pre-norm, rotary, grouped-query attention, SwiGLU
            attn = layer.self_attn
            a = layer.input_layernorm(h)
            q, k, v = (p(a).view(*h.shape[:2], -1, attn.head_dim).transpose(1, 2)
                       for p in (attn.q_proj, attn.k_proj, attn.v_proj))  # [r, h, q, d]; k, v [r, kv, q, d]
            if "rotary" not in masks:
                masks["rotary"] = self._rotary("rotary", masks["qpos"])
            q, k = _rotate(q, *masks["rotary"]), _rotate(k, *masks["rotary"])
            out = self._attend(i, q, k, v, rows, write, valid, masks["full"])
            h = h + attn.o_proj(out)
            return h + layer.mlp(layer.post_attention_layernorm(h))
        mpnet = self.kind == "mpnet"
        attn = layer.attention.attn if mpnet else layer.attention.self
        proj = (attn.q, attn.k, attn.v) if mpnet else (attn.query, attn.key, attn.value)
        q, k, v = (p(h).view(*h.shape[:2], heads, -1).transpose(1, 2) for p in proj)  # [r, h, q, d]
        out = self._attend(i, q, k, v, rows, write, valid, masks["bias"] if mpnet else masks["full"])
        if mpnet:
            a = layer.attention.LayerNorm(attn.o(out) + h)
        else:
            a = layer.attention.output.LayerNorm(layer.attention.output.dense(out) + h)
        return layer.output.LayerNorm(layer.output.dense(layer.intermediate(a)) + a)

    def _rotary(self, layer_type: str, qpos: torch.Tensor):
        """cos, sin [r, 1, q, d] of this layer type at the query positions."""
        return tuple(t[qpos][:, None] for t in self._tables[layer_type])

    def _final_norm(self, h: torch.Tensor) -> torch.Tensor:
        if self.family == "llama":
            return self.base.norm(h)
        return self.base.final_norm(h) if self.kind == "modernbert" else h

    def _position_tables(self, l: int, device, dtype) -> dict:
        """ModernBERT: rotary cos/sin [l, d] per layer type; Llama: one rotary cos/sin [l, d]; MPNet: the relative
        position bias [1, h, l, l]."""
        if self.family == "llama":
            probe = torch.zeros(1, l, 1, device=device, dtype=dtype)  # the tables come back in this dtype
            cos, sin = self.base.rotary_emb(probe, torch.arange(l, device=device)[None])  # [1, l, d] each
            return {"rotary": (cos[0], sin[0])}
        if self.kind == "modernbert":
            probe = torch.zeros(1, l, 1, device=device, dtype=dtype)
            positions = torch.arange(l, device=device)[None]
            return {t: tuple(c[0] for c in self.base.rotary_emb(probe, positions, t))
                    for t in set(self.base.config.layer_types)}
        if self.kind == "mpnet":
            return {"bias": self.base.encoder.compute_position_bias(torch.zeros(1, l, 1, device=device))}
        return {}


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in float32, as the reference implementation does."""
    f = t.float()
    half = f.shape[-1] // 2
    rotated = torch.cat((-f[..., half:], f[..., :half]), dim=-1)
    return (f * cos + rotated * sin).to(t.dtype)

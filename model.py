"""
GPT-2 in one file.

    GPTConfig   the hyperparameters (and named presets: gpt2 ... gpt2-xl, gpt2-1.3b)
    GPT         token (+ position) embeddings -> n_layer pre-norm Blocks -> ln_f -> lm_head

Each Block is  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x)).  Attention goes through
F.scaled_dot_product_attention, which picks flash attention on a GPU. The lm_head shares its
weight with the token embedding wte (weight tying, as in GPT-2). Names follow OpenAI's GPT-2
checkpoints (wte, wpe, h, ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj, ln_f).

Every option is off by default, and then the model is exactly GPT-2:
  - rope=True: no position table wpe; queries and keys are rotated by their position (RoPE).
  - from recent from-scratch recipes (modded-nanogpt, nanochat; docs/modern.md): qk_norm
    (RMS-normalised queries and keys per head), mlp="relu2", zero_init_proj (every block
    starts as the identity), tie_embeddings=False (a separate lm_head).
  - the Llama family's block (SmolLM2, TinyLlama, Llama 3.2; docs/llama.md): norm="rmsnorm",
    mlp="swiglu" with its own mlp_hidden width, and n_kv_head < n_head (grouped-query attention:
    the KV cache then holds n_kv_head heads).

This file is the model only: it imports torch and the standard library. Hugging Face weights
(from_pretrained, and the export) are in hf_weights.py, the optimizers in optim.py, DDP and
FSDP wrapping in runtime.py.

Shapes in comments: B batch, T time (sequence length), C channels (n_embd), nh heads,
hs head size (C // nh), nkv key/value heads (n_kv_head), H the MLP's hidden width, V vocabulary.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest context the model sees (the size of wpe)
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 128: faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # 0 for pretraining; 0.1-0.2 helps small data sets
    bias: bool = True  # biases in Linears and LayerNorms, as GPT-2 has them
    rope: bool = False  # rotary position embeddings instead of the learned wpe
    rope_theta: float = 10000.0  # RoPE's base: wavelengths go from 2*pi to 2*pi*theta
    gelu: str = "tanh"  # GPT-2 used GELU's tanh approximation; "none" is the exact erf form
    # from-scratch options (off = GPT-2)
    qk_norm: bool = False  # RMSNorm queries and keys per head: bounded logits, stabler at high lr
    mlp: str = "gelu"  # gelu (GPT-2) | relu2: ReLU(x)^2, sparse and cheaper | swiglu: SiLU(gate) * up (Llama)
    zero_init_proj: bool = False  # residual projections (c_proj) start at zero: each block the identity at step 0
    tie_embeddings: bool = True  # False: lm_head gets its own weight instead of sharing wte's
    # Llama-family options (off = GPT-2): with rope=True, bias=False and tie_embeddings as the
    # model has it, these make the block of Llama, SmolLM2, TinyLlama (from_pretrained loads them)
    norm: str = "layernorm"  # layernorm (GPT-2) | rmsnorm: scale by 1/RMS, no mean, no bias (Llama)
    norm_eps: float = 1e-5  # added to the variance in every norm (LayerNorm's default; Llamas say theirs)
    mlp_hidden: int = 0  # the MLP's hidden width; 0 = 4 * n_embd (GPT-2). SwiGLU models use ~8/3 * n_embd
    n_kv_head: int = 0  # key/value heads; 0 = n_head. Fewer: grouped-query attention, n_head / n_kv_head share one


# The OpenAI GPT-2 family, and a 1.3B model of GPT-3 XL's shape (head size 128).
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "gpt2-1.3b": dict(n_layer=24, n_head=16, n_embd=2048),  # 1.3B
}


def preset(name, **overrides):
    """GPTConfig of a named size, e.g. preset("gpt2-medium", rope=True)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


def unwrap(model):
    """The GPT inside torch.compile (._orig_mod) and DDP (.module) wrappers: its state dict
    has clean names, and its methods (generate, hidden_states) are reachable."""
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


# -----------------------------------------------------------------------------
# rotary position embeddings


def rope_tables(head_size, n_pos, theta):
    """cos and sin of shape (n_pos, head_size // 2): position p turns channel pair i by the
    angle p * theta^(-2i / head_size)."""
    inv_freq = theta ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)  # (hs/2,)
    angles = torch.outer(torch.arange(n_pos, dtype=torch.float32), inv_freq)  # (n_pos, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate x (B, nh, T, hs) by the angles of its positions (cos, sin: (T, hs/2), or
    (B, 1, T, hs/2) when each row has its own positions).

    The channels are split in halves: (x1[i], x2[i]) is rotated as a 2-D vector. The dot
    product of two rotated vectors depends only on the difference of their angles, so
    attention scores depend on relative position only.
    """
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, nh, T, hs/2) each; rotate in fp32
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.type_as(x)  # back to the autocast dtype, so q, k and v agree


# -----------------------------------------------------------------------------
# the transformer


def make_norm(config):
    """The model's normalisation over C: GPT-2's LayerNorm (subtract the mean, divide by the
    standard deviation, then a gain and a bias) or Llama's RMSNorm (divide by the root mean
    square only, then a gain): one reduction fewer, and it trains as well."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def attention_mask(T, pos, pad, device):
    """Which keys T new queries may see when the KV cache already holds pos tokens: None where
    SDPA's own choice is right (is_causal for a fresh sequence; one new token sees every key),
    else a bool mask (T, pos + T), True where a query may look.

    SDPA's is_causal mask is aligned top-left: right for a fresh sequence, wrong for queries
    that come after cached keys, which need the causal mask shifted right by pos.
    pad (B,): left padding (prompts of different lengths in one batch): row b's first pad[b]
    columns hold no tokens and no token sees them. The mask is then (B, 1, T, pos + T)."""
    if pad is None and (pos == 0 or T == 1):
        return None
    query = torch.arange(pos, pos + T, device=device).view(T, 1)  # (T, 1): the queries' columns
    key = torch.arange(pos + T, device=device)  # (pos + T,): the keys' columns
    mask = key <= query  # (T, pos + T): causal, shifted right by pos
    if pad is not None:
        pad = pad.view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        # padding queries see the padding before them: a row with nothing to see would be NaN
        mask = mask & ((key >= pad) | (query < pad))  # (B, 1, T, pos + T)
    return mask


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.n_kv_head = config.n_kv_head or config.n_head
        assert config.n_head % self.n_kv_head == 0, "n_head must be a multiple of n_kv_head"
        hs = config.n_embd // config.n_head
        # the rows of c_attn's output: queries of all heads, then keys and values of the kv
        # heads (C, C, C without GQA). lora.py, Muon and the Llama export cut c_attn at these rows.
        self.qkv_sizes = [config.n_embd, self.n_kv_head * hs, self.n_kv_head * hs]
        # queries, keys and values of all heads in one matmul
        self.c_attn = nn.Linear(config.n_embd, sum(self.qkv_sizes), bias=config.bias)
        # the output projection, back into the residual stream
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_PROJ = True  # build-nanogpt's NANOGPT_SCALE_INIT: see GPT._init_weights
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            # every head's query and key scaled to RMS 1 (times a learned gain per channel, shared
            # by the heads): attention logits cannot grow without bound as the weights do, which
            # lets higher learning rates (and Muon) train without loss spikes
            self.q_norm = nn.RMSNorm(hs, eps=1e-6)
            self.k_norm = nn.RMSNorm(hs, eps=1e-6)

    def forward(self, x, rope=None, cache=None, pos=0, mask=None):
        """x (B, T, C). rope: (cos, sin) of x's positions, or None. cache: this layer's key/value
        buffers while generating (a dict), or None; pos: how many tokens it holds already (the
        column of x's first token). mask: attention_mask's, None for the plain causal mask."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.qkv_sizes, dim=2)  # (B, T, C), 2 x (B, T, nkv * hs)
        hs, nkv = C // self.n_head, self.n_kv_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if self.qk_norm:  # over the last dim, hs: each head of each token on its own
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)

        if cache is not None:
            # the KV cache: write this chunk's keys and values after the ones cached, then attend
            # over all of them. The buffers are made once, at the cache's size, empty (every slot
            # is written before it is read), with the nkv heads only: GQA's cache is nh/nkv smaller
            if "k" not in cache:
                cache["k"] = k.new_empty(B, nkv, cache["size"], hs)
                cache["v"] = v.new_empty(B, nkv, cache["size"], hs)
            cache["k"][:, :, pos:pos + T], cache["v"][:, :, pos:pos + T] = k, v
            k, v = cache["k"][:, :, :pos + T], cache["v"][:, :, :pos + T]  # (B, nkv, pos + T, hs)
        if nkv < self.n_head:
            # grouped-query attention: query head j reads key/value head j // (nh / nkv). The
            # copy is made after the cache, so the cache holds only nkv heads
            k = k.repeat_interleave(self.n_head // nkv, dim=1)  # (B, nh, ..., hs)
            v = v.repeat_interleave(self.n_head // nkv, dim=1)

        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and pos == 0,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        H = config.mlp_hidden or 4 * config.n_embd
        self.kind = config.mlp
        # SwiGLU (Shazeer 2020; Llama): SiLU(gate) * up. c_fc computes gate and up in one
        # matmul, its output rows [gate | up], H each (Llama's gate_proj and up_proj stacked)
        self.c_fc = nn.Linear(config.n_embd, 2 * H if self.kind == "swiglu" else H, bias=config.bias)
        self.gelu = nn.GELU(approximate=config.gelu)
        self.c_proj = nn.Linear(H, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_PROJ = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):  # (B, T, C) -> (B, T, H) -> (B, T, C)
        h = self.c_fc(x)  # (B, T, H), or (B, T, 2H) for SwiGLU
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up  # the gate decides, per channel, how much of up passes
        elif self.kind == "relu2":
            # ReLU^2 (Primer, So et al. 2021): zero for half the inputs, quadratic above; in
            # modded-nanogpt's speedrun it beat GELU at equal steps and costs less to compute
            h = F.relu(h).square()
        else:
            h = self.gelu(h)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None, pos=0, mask=None):
        # pre-norm: each sublayer reads a normalised copy and adds its output to the stream
        x = x + self.attn(self.ln_1(x), rope, cache, pos, mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings (V, C)
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        if not config.rope:
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)  # positions (block_size, C)
        else:
            # not parameters and not saved: recomputed from the config on load
            cos, sin = rope_tables(config.n_embd // config.n_head, config.block_size, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # weight tying: the output layer scores a token by how well the final hidden state
            # matches its embedding. One tensor, so it is counted, stored and updated once.
            self.transformer.wte.weight = self.lm_head.weight
        # untied, reading tokens and predicting them are separate jobs with separate weights:
        # V x C more parameters, but no extra compute per token (wte is a lookup)

        self.apply(self._init_weights)

    def _init_weights(self, module):
        # GPT-2's init: N(0, 0.02) everywhere, zero biases, and the two projections that
        # write into the residual stream scaled down by 1/sqrt(2*n_layer): the stream is a sum
        # of 2*n_layer such outputs, so this keeps its variance from growing with depth.
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_PROJ", False):
                std /= math.sqrt(2 * self.config.n_layer)
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "RESIDUAL_PROJ", False) and self.config.zero_init_proj:
                # the block adds nothing until it has learned something: the untrained model is
                # embeddings -> ln_f -> lm_head, and depth cannot hurt at init. The gradient still
                # reaches c_proj (its input is not zero), so it moves at the first step.
                torch.nn.init.zeros_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=False):
        """Parameters, a tied wte/lm_head counted once. non_embedding=True leaves out the
        tables that are only looked up: the position table, and wte when lm_head has its own
        weight (tied, the one tensor stays: as lm_head it does real work per token)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if non_embedding and not self.config.rope:
            n -= self.transformer.wpe.weight.numel()
        if non_embedding and not self.config.tie_embeddings:
            n -= self.transformer.wte.weight.numel()
        return n

    def hidden_states(self, idx, kv_cache=None, pos=0, pad=None, embeds=None):
        """idx (B, T) token ids -> the final hidden states (B, T, C): the whole model but lm_head.
        A caller that wants the logits of a few positions only applies lm_head to those
        (hellaswag.py: the context and padding positions are never scored, and lm_head is
        the largest matmul of a small model). kv_cache, pos and pad: see generate().
        embeds (B, T, C), given instead of idx (None): the inputs' embeddings themselves, for a
        caller that puts other vectors among the tokens' (vision.py: an image's)."""
        x = self.transformer.wte(idx) if embeds is None else embeds  # (B, T, C)
        B, T = x.shape[:2]
        assert pos + T <= self.config.block_size, f"{pos + T} positions, block_size is {self.config.block_size}"
        positions = torch.arange(pos, pos + T, device=x.device)  # (T,)
        if pad is not None:  # left-padded rows count their positions from their first token
            positions = (positions - pad.view(B, 1)).clamp(min=0)  # (B, T)
        rope = None
        if self.config.rope:  # (1, T, hs/2), or (B, 1, T, hs/2) with pad: broadcast over the heads
            rope = (self.rope_cos[positions].unsqueeze(-3), self.rope_sin[positions].unsqueeze(-3))
        else:
            x = x + self.transformer.wpe(positions)  # (T, C) broadcasts over the batch
        x = self.transformer.drop(x)
        mask = attention_mask(T, pos, pad, x.device)  # None for training's plain causal mask
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope, None if kv_cache is None else kv_cache[i], pos, mask)
        return self.transformer.ln_f(x)  # (B, T, C)

    def forward(self, idx, targets=None, kv_cache=None, pos=0):
        """idx (B, T) token ids -> (logits (B, T, V), loss or None).

        targets (B, T): the next token at every position; -1 marks a position to ignore
        (padding, or a prompt in instruction tuning). kv_cache / pos: see generate().
        """
        logits = self.lm_head(self.hidden_states(idx, kv_cache, pos))  # (B, T, V)
        loss = None
        if targets is not None:
            # cross_entropy upcasts bf16 logits to fp32 under autocast
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def logits_at(self, idx, where):
        """idx (B, T), where (B, T) bool -> the logits of the True positions only, (n, V):
        hellaswag.py scores the endings' tokens, and lm_head is the largest matmul of a small
        model. Under FSDP it is a forward of its own (runtime.fully_shard registers it)."""
        return self.lm_head(self.hidden_states(idx)[where])

    # -------------------------------------------------------------------------
    # generation

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 use_cache=True, on_token=None, stop_token=None, generator=None, pad=None):
        """Extend idx (B, T) by max_new_tokens sampled tokens; returns (B, T + max_new_tokens).

        temperature=0 picks the most likely token (greedy). top_k keeps the k likeliest
        tokens, top_p the smallest set whose probability reaches p (sample_next, below).
        on_token(tokens (B, 1)) is called after every step, so a caller can print as the text
        comes. stop_token (e.g. <|endoftext|>) ends each sequence on its own: a row that has
        produced it produces only stop_token from then on, and generation ends once every row has.

        With the KV cache the prompt is run once and each later step runs only the newest
        token, reading the keys and values of the earlier ones from the cache. Once the
        sequence is longer than block_size, the model may only see the last block_size
        tokens, at positions 0..block_size-1: every cached key has changed then (its position,
        and in deeper layers what it attended to), so each further step re-runs the last
        block_size tokens from scratch. That is exactly what a full recompute does; a rolling
        cache that just dropped the oldest entry would give different tokens.

        pad (B,): prompts of different lengths in one batch (align.py's PPO rollouts), padded
        on the left so that they end together: row b's first pad[b] columns are padding, which
        no token sees and the positions skip. Each row samples what it would sample alone.
        """
        was_training = self.training
        self.eval()
        try:
            block_size = self.config.block_size
            if pad is not None:
                pad = torch.as_tensor(pad, device=idx.device)
                if pad.shape != (idx.size(0),) or not 0 <= int(pad.min()) <= int(pad.max()) < idx.size(1):
                    raise ValueError(f"pad must hold one count per row of idx, each leaving that row a token of "
                                     f"its {idx.size(1)} columns")
                pad = pad if pad.any() else None  # no padding at all: SDPA's own causal mask (flash on a GPU)
            cache, cached = None, 0  # cached: how many columns of idx the cache holds
            done = torch.zeros(idx.size(0), 1, dtype=torch.bool, device=idx.device)  # (B, 1): rows that stopped
            for i in range(max_new_tokens):
                # hidden states, not logits: only the last position predicts, so lm_head (the
                # largest matmul of a small model) runs on that one position
                if use_cache and cache is not None and idx.size(1) <= block_size:
                    h = self.hidden_states(idx[:, cached:], kv_cache=cache, pos=cached, pad=pad)  # the new token
                    cached = idx.size(1)
                else:
                    # the first step, past block_size, or no cache: the last block_size tokens from
                    # scratch (with the cache into a fresh one, as long as this sample can get: a
                    # Llama's block_size is thousands of tokens). Columns cut off the left cut padding first.
                    context = idx[:, -block_size:]
                    context_pad = None if pad is None else (pad - (idx.size(1) - context.size(1))).clamp(min=0)
                    if use_cache:
                        size = min(block_size, idx.size(1) + max_new_tokens - i)
                        cache = [{"size": size} for _ in self.transformer.h]
                        cached = context.size(1)
                    h = self.hidden_states(context, kv_cache=cache, pad=context_pad)
                logits = self.lm_head(h[:, -1, :]).float()  # (B, V)
                idx_next = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
                if stop_token is not None:  # finished rows are padded with stop_token
                    idx_next = idx_next.masked_fill(done, stop_token)
                    done = done | (idx_next == stop_token)
                idx = torch.cat((idx, idx_next), dim=1)
                if on_token is not None:
                    on_token(idx_next)
                if stop_token is not None and done.all():
                    break
            return idx
        finally:
            self.train(was_training)

    # -------------------------------------------------------------------------
    # the optimizers' parameter groups, pretrained weights, a shorter context

    def param_groups(self, weight_decay, muon=False):
        """The trainable parameters as torch param groups, (AdamW's, Muon's); optim.py builds the
        optimizers from them. Only parameters that require grad count (a LoRA run freezes the base).

        AdamW decays the matrices (2-D and up: Linear weights, embeddings) and not the biases
        and norm gains, which only shift and scale. With muon the 2-D weights inside the blocks
        (c_attn, c_proj, c_fc) go to Muon instead, c_attn cut into its q, k and v rows and a
        SwiGLU c_fc into gate and up ("split": each orthogonalised on its own); embeddings and
        lm_head stay with AdamW (a lookup table and a classifier are not the linear maps
        Muon's argument is about)."""
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        matrices = {n: p for n, p in params.items() if muon and n.startswith("transformer.h.") and p.dim() == 2}
        rest = [p for n, p in params.items() if n not in matrices]
        adamw = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
                 {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
        if not muon:
            return adamw, []
        sizes = self.transformer.h[0].attn.qkv_sizes  # with GQA, k and v have fewer rows than q
        qkv = [p for n, p in matrices.items() if n.endswith("attn.c_attn.weight")]
        gate_up = [p for n, p in matrices.items() if self.config.mlp == "swiglu" and n.endswith("mlp.c_fc.weight")]
        others = [p for p in matrices.values() if not any(p is m for m in qkv + gate_up)]
        groups = [{"params": qkv, "split": 3 if len(set(sizes)) == 1 else sizes}, {"params": others, "split": 1}]
        if gate_up:  # (only for SwiGLU: a GPT-2's Muon keeps its two groups)
            groups.append({"params": gate_up, "split": 2})
        return adamw, groups

    @classmethod
    def from_pretrained(cls, name_or_path, override_args=None):
        """A GPT with the weights of a Hugging Face model: one of OpenAI's GPT-2s by name (gpt2,
        gpt2-medium, gpt2-large, gpt2-xl), a Llama-family Hub name (HuggingFaceTB/SmolLM2-135M),
        or a local folder of either. override_args may set dropout, and a block_size smaller
        than the model's (the position table, or RoPE's, is cropped). hf_weights.py does the
        reading: the folder checks, the config mapping and the weight names."""
        from hf_weights import read_pretrained  # transformers and the Hub stay out of this file
        override_args = dict(override_args or {})
        if set(override_args) - {"dropout", "block_size"}:
            raise ValueError(f"from_pretrained can override only dropout and block_size, not {sorted(override_args)}")
        config_args, state_dict = read_pretrained(name_or_path)
        model = cls(GPTConfig(**config_args, dropout=override_args.get("dropout", 0.0)))
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as e:  # names or shapes that do not fit: one line, not PyTorch's list
            first = (str(e).splitlines()[1:] or [str(e)])[0].strip()[:200]  # the first missing or odd name
            raise ValueError(f"{name_or_path}: weights that do not fit this GPT ({first})") from None
        if "block_size" in override_args:
            model.crop_block_size(override_args["block_size"])
        return model

    def crop_block_size(self, block_size):
        """Use a shorter context than the model was built with (e.g. GPT-2's 1024 -> 256)."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        if self.config.rope:
            self.rope_cos, self.rope_sin = self.rope_cos[:block_size], self.rope_sin[:block_size]
        else:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick the next token from logits (B, V): returns (B, 1). generate's sampling step."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # greedy
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")  # below the k-th largest: never
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        # nucleus: keep the likeliest tokens until their mass reaches top_p (at least one)
        sorted_p, sorted_i = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= top_p  # mass before this token already enough
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, sorted_i, sorted_p)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # renormalises itself


# -----------------------------------------------------------------------------
# FLOPs, for MFU (model FLOPs utilisation)


def flops_per_token(model, seq_len=None):
    """Training FLOPs per token (forward + backward), the estimate of the PaLM paper:

        6 * N  +  12 * n_layer * n_embd * T

    6N: every parameter takes part in one multiply-add (2 FLOPs) in the forward pass and
    two in the backward pass (gradients of inputs and of weights); N leaves out the
    position table (a lookup, no matmul) and counts the token table once, as the lm_head
    (untied: wte is a lookup too, lm_head's matmul is what costs).
    The second term is attention's two matmuls (QK^T and AV) over T keys, also x6/2 per
    layer and channel. LayerNorm, GELU and softmax are left out, as is customary.
    """
    cfg = model.config
    T = cfg.block_size if seq_len is None else seq_len
    return 6 * model.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * T


def estimate_mfu(model, tokens_per_iter, dt, peak_flops, seq_len=None):
    """Model FLOPs utilisation of one device: achieved training FLOP/s over its peak (e.g.
    989.5e12 for an H100 SXM in bf16; runtime.PEAK_FLOPS). tokens_per_iter: this device's
    tokens per iteration (a run's global tokens / ranks), dt: seconds per iteration."""
    return flops_per_token(model, seq_len) * tokens_per_iter / dt / peak_flops

"""
GPT-2 in one file.

    GPTConfig   the hyperparameters (and named presets: gpt2 ... gpt2-xl, gpt2-1.3b)
    GPT         token (+ position) embeddings -> n_layer pre-norm Blocks -> ln_f -> lm_head

Each Block is  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x)).  Attention goes through
F.scaled_dot_product_attention, which picks flash attention on a GPU. The lm_head shares its
weight with the token embedding wte (weight tying, as in GPT-2). With rope=True there is no
position table wpe: queries and keys are rotated by their position instead (RoPE).

Four more options, all off by default (then the model is exactly GPT-2 and OpenAI's weights
load and export), come from recent from-scratch recipes (modded-nanogpt, nanochat):
qk_norm (RMS-normalised queries and keys per head), mlp="relu2" (ReLU squared instead of
GELU), zero_init_proj (every block starts as the identity) and tie_embeddings=False (a
separate lm_head). docs/modern.md says what each does and what it measured.

Three more make the block of today's small open models (the Llama family: SmolLM2, TinyLlama,
Llama 3.2): norm="rmsnorm", mlp="swiglu" with its own mlp_hidden width, and n_kv_head < n_head
(grouped-query attention: the KV cache then holds n_kv_head heads). With rope=True and
bias=False that is LlamaForCausalLM exactly, and from_pretrained loads its weights too
(docs/llama.md).

Names follow OpenAI's GPT-2 checkpoints (wte, wpe, h, ln_1, attn.c_attn, attn.c_proj, ln_2,
mlp.c_fc, mlp.c_proj, ln_f), so from_pretrained is a copy with a few transposes.

Shapes in comments: B batch, T time (sequence length), C channels (n_embd), nh heads,
hs head size (C // nh), nkv key/value heads (n_kv_head), H the MLP's hidden width, V vocabulary.
"""

import inspect
import math
import os
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
    qk_norm: bool = False  # RMSNorm queries and keys per head before attention: bounded logits, stabler at high lr
    mlp: str = "gelu"  # gelu (GPT-2) | relu2: ReLU(x)^2, sparse and cheaper | swiglu: SiLU(gate) * up (Llama)
    zero_init_proj: bool = False  # residual projections (c_proj) start at zero: each block the identity at step 0
    tie_embeddings: bool = True  # False: lm_head gets its own weight instead of sharing wte's
    # Llama-family options (off = GPT-2): with rope=True, bias=False and tie_embeddings as the
    # model has it, these make the block of Llama, SmolLM2, TinyLlama (from_pretrained loads them)
    norm: str = "layernorm"  # layernorm (GPT-2) | rmsnorm: scale by 1/RMS, no mean, no bias (Llama)
    norm_eps: float = 1e-5  # added to the variance in every norm (LayerNorm's default; Llamas say theirs)
    mlp_hidden: int = 0  # the MLP's hidden width; 0 = 4 * n_embd (GPT-2). SwiGLU models use ~8/3 * n_embd
    n_kv_head: int = 0  # key/value heads; 0 = n_head. Fewer: grouped-query attention, n_head / n_kv_head queries share one


# The OpenAI GPT-2 family, and a 1.3B model of GPT-3 XL's shape (head size 128).
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "gpt2-1.3b": dict(n_layer=24, n_head=16, n_embd=2048),  # 1.3B
}
OPENAI_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # from_pretrained's names (no 1.3B)
# Llama-family Hub models whose shapes --plan and bench.py know without a download (their
# config.json's numbers; from_pretrained reads the real file)
HUB_SHAPES = {
    "HuggingFaceTB/SmolLM2-135M": dict(block_size=8192, vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3,
                                       n_embd=576, mlp="swiglu", mlp_hidden=1536, norm="rmsnorm", norm_eps=1e-5,
                                       rope=True, rope_theta=100000.0, bias=False, tie_embeddings=True),
}


def unwrap(model):
    """The GPT inside torch.compile (._orig_mod) and DDP (.module) wrappers: its state dict
    has clean names, and its methods (generate, hidden_states) are reachable."""
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def preset(name, **overrides):
    """GPTConfig of a named size, e.g. preset("gpt2-medium", rope=True)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


# -----------------------------------------------------------------------------
# rotary position embeddings


def rope_tables(head_size, n_pos, theta):
    """cos and sin of shape (n_pos, head_size // 2): position p turns channel pair i by the
    angle p * theta^(-2i / head_size)."""
    inv_freq = theta ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)  # (hs/2,)
    angles = torch.outer(torch.arange(n_pos, dtype=torch.float32), inv_freq)  # (n_pos, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate x (B, nh, T, hs) by the angles of its positions (cos, sin: (T, hs/2)).

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


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.n_kv_head = config.n_kv_head or config.n_head
        assert config.n_head % self.n_kv_head == 0, "n_head must be a multiple of n_kv_head"
        hs = config.n_embd // config.n_head
        # the rows of c_attn's output: queries of all heads, then keys and values of the kv
        # heads (C, C, C without GQA). lora.py and Muon cut c_attn's weight at these rows.
        self.qkv_sizes = [config.n_embd, self.n_kv_head * hs, self.n_kv_head * hs]
        # queries, keys and values of all heads in one matmul
        self.c_attn = nn.Linear(config.n_embd, sum(self.qkv_sizes), bias=config.bias)
        # the output projection, back into the residual stream
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_PROJ = True  # init scaled by 1/sqrt(2*n_layer), see GPT._init_weights
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.dropout = config.dropout
        if config.qk_norm:
            # every head's query and key scaled to RMS 1 (times a learned gain per channel, shared
            # by the heads): attention logits cannot grow without bound as the weights do, which
            # lets higher learning rates (and Muon) train without loss spikes
            hs = config.n_embd // config.n_head
            self.q_norm = nn.RMSNorm(hs, eps=1e-6)
            self.k_norm = nn.RMSNorm(hs, eps=1e-6)
        self.qk_norm = config.qk_norm
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, cache=None, pos=0):
        """x (B, T, C). rope: (cos, sin) for positions pos..pos+T-1, or None.
        cache: this layer's dict of key/value buffers during generation, or None.
        pos: how many tokens the cache already holds (the position of x's first token)."""
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
            # write this chunk's keys and values after the ones already cached, then attend
            # over everything so far. The buffers are allocated once, at block_size.
            if "k" not in cache:
                n = cache["size"]
                # empty, not zeros: every slot is written before it is read. Only the nkv heads
                # are kept: with GQA the cache is n_head / n_kv_head times smaller
                cache["k"] = k.new_empty(B, nkv, n, hs)
                cache["v"] = v.new_empty(B, nkv, n, hs)
            cache["k"][:, :, pos:pos + T] = k
            cache["v"][:, :, pos:pos + T] = v
            k, v = cache["k"][:, :, :pos + T], cache["v"][:, :, :pos + T]  # (B, nkv, pos+T, hs)
        if nkv < self.n_head:
            # grouped-query attention: query head j reads key/value head j // (nh / nkv). The
            # copy is made after the cache, so the cache holds only nkv heads
            k = k.repeat_interleave(self.n_head // nkv, dim=1)  # (B, nh, ..., hs)
            v = v.repeat_interleave(self.n_head // nkv, dim=1)

        # SDPA's is_causal mask is aligned top-left: right for a fresh sequence, wrong for
        # queries that come after cached keys. One new token may see every key (no mask);
        # a chunk after a cache needs the causal mask shifted right by pos.
        mask, is_causal = None, True
        if pos > 0:
            is_causal = False
            if T > 1:
                mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
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

    def forward(self, x, rope=None, cache=None, pos=0):
        # pre-norm: each sublayer reads a normalised copy and adds its output to the stream
        x = x + self.attn(self.ln_1(x), rope, cache, pos)
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

    def hidden_states(self, idx, kv_cache=None, pos=0):
        """idx (B, T) token ids -> the final hidden states (B, T, C): the whole model but lm_head.
        A caller that wants the logits of a few positions only applies lm_head to those
        (hellaswag.py: the context and padding positions are never scored, and lm_head is
        the largest matmul of a small model)."""
        B, T = idx.size()
        assert pos + T <= self.config.block_size, f"cannot run {pos + T} positions, block_size is {self.config.block_size}"
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.config.rope:
            rope = (self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T])  # 2 x (T, hs/2)
        else:
            positions = torch.arange(pos, pos + T, dtype=torch.long, device=idx.device)  # (T,)
            x = x + self.transformer.wpe(positions)  # (T, C) broadcasts over the batch
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope, None if kv_cache is None else kv_cache[i], pos)
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
        model. Under FSDP it is a forward of its own (fully_shard registers it)."""
        return self.lm_head(self.hidden_states(idx)[where])

    # -------------------------------------------------------------------------
    # generation

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 use_cache=True, on_token=None, stop_token=None, generator=None, lengths=None):
        """Extend idx (B, T) by max_new_tokens sampled tokens; returns (B, T + max_new_tokens).

        temperature=0 picks the most likely token (greedy). top_k keeps the k likeliest
        tokens, top_p the smallest set whose probability reaches p. on_token(tokens (B, 1))
        is called after every step, so a caller can print as the text comes. stop_token (e.g.
        <|endoftext|>) ends each sequence on its own: a row that has produced it produces only
        stop_token from then on, and generation ends once every row has.

        With the KV cache the prompt is run once and each later step runs only the newest
        token, reading the keys and values of the earlier ones from the cache. Once the
        sequence is longer than block_size, the model may only see the last block_size
        tokens, at positions 0..block_size-1: every cached key has changed then (its position,
        and in deeper layers what it attended to), so each further step re-runs the last
        block_size tokens from scratch. That is exactly what a full recompute does; a rolling
        cache that just dropped the oldest entry would give different tokens.

        Prompts of different lengths (PPO's rollouts): lengths (B,) gives each row's prompt
        length, the rest of its idx row being padding. Sampling starts after the shortest prompt;
        a longer prompt's own tokens are fed in place of the samples until it ends (a stop_token
        among them ends nothing). Every row is then one unbroken sequence from position 0 (no
        padding inside: no attention mask), and row b's new tokens start at lengths[b]. Returns
        (B, min(lengths) + max_new_tokens).
        """
        was_training = self.training
        self.eval()
        try:
            block_size = self.config.block_size
            cache, cached = None, 0  # cached: how many tokens of idx the cache holds
            done = torch.zeros(idx.size(0), 1, dtype=torch.bool, device=idx.device)  # (B, 1): rows that stopped
            if lengths is not None:  # the prompts, (B, T); generation starts from the shortest one
                prompts, lengths = idx, torch.as_tensor(lengths, device=idx.device).view(-1, 1)  # (B, 1)
                shortest, longest = int(lengths.min()), int(lengths.max())  # (one host sync, before the loop)
                if shortest < 1 or longest > idx.size(1) or longest - shortest > max_new_tokens:
                    raise ValueError(f"lengths from {shortest} to {longest}: each must be within idx's "
                                     f"{idx.size(1)} columns, and max_new_tokens={max_new_tokens} must cover "
                                     f"the longest prompt past the shortest")
                idx = idx[:, :shortest]
            for i in range(max_new_tokens):
                # hidden states, not logits: only the last position predicts, so lm_head (the
                # largest matmul of a small model) runs on that one position
                if not use_cache:
                    h = self.hidden_states(idx[:, -block_size:])
                elif idx.size(1) <= block_size and cache is not None:
                    h = self.hidden_states(idx[:, cached:], kv_cache=cache, pos=cached)  # the new token(s) only
                    cached = idx.size(1)
                else:
                    # the first step, or past block_size: (re)fill a fresh cache, as long as this
                    # sample can get (a Llama's block_size is thousands of tokens)
                    size = min(block_size, idx.size(1) + max_new_tokens - i)
                    cache = [{"size": size} for _ in self.transformer.h]
                    context = idx[:, -block_size:]
                    h = self.hidden_states(context, kv_cache=cache, pos=0)
                    cached = context.size(1)
                logits = self.lm_head(h[:, -1, :]).float()  # (B, V)
                idx_next = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
                in_prompt = torch.zeros_like(done)  # (B, 1): rows still reading their prompt
                if lengths is not None and idx.size(1) < prompts.size(1):
                    in_prompt = idx.size(1) < lengths
                    idx_next = torch.where(in_prompt, prompts[:, idx.size(1):idx.size(1) + 1], idx_next)
                if stop_token is not None:  # finished rows are padded with stop_token
                    idx_next = idx_next.masked_fill(done, stop_token)
                    done = done | ((idx_next == stop_token) & ~in_prompt)
                idx = torch.cat((idx, idx_next), dim=1)
                if on_token is not None:
                    on_token(idx_next)
                if stop_token is not None and done.all():
                    break
            return idx
        finally:
            self.train(was_training)

    # -------------------------------------------------------------------------
    # pretrained weights: OpenAI's GPT-2, and Llama-family models

    @classmethod
    def from_pretrained(cls, name_or_path, override_args=None):
        """A GPT with the weights of a Hugging Face model: GPT-2 (one of OpenAI's by name: gpt2,
        gpt2-medium, gpt2-large, gpt2-xl; or a GPT2LMHeadModel folder) or a Llama-family
        LlamaForCausalLM (a local folder, or a Hub name such as HuggingFaceTB/SmolLM2-135M).
        Names are downloaded and cached by transformers; a folder is what save_pretrained
        writes (config.json plus weights). override_args may set dropout, and a block_size
        smaller than the model's (the position table, or RoPE's, is cropped)."""
        override_args = dict(override_args or {})
        if set(override_args) - {"dropout", "block_size"}:
            raise ValueError(f"from_pretrained can override only dropout and block_size, not {sorted(override_args)}")
        local = os.path.isdir(name_or_path)
        kind = hf_model_type(name_or_path, local)
        hf = load_hf_model(name_or_path, local, kind)
        if kind == "gpt2":
            config = gpt2_config(hf.config.to_dict(), name_or_path)
        else:
            config = llama_config(hf.config.to_dict(), name_or_path)
        config.dropout = override_args.get("dropout", 0.0)
        model = cls(config)
        if kind == "gpt2":
            copy_gpt2_weights(model, hf.state_dict())
        else:
            copy_llama_weights(model, hf.state_dict())
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


HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}  # the model types that load


def hf_model_type(name_or_path, local):
    """"gpt2" or "llama": what a name or a local folder holds, checked before any weights are
    read (a local folder's config.json; a Hub name's config, fetched by transformers)."""
    if not local and name_or_path in OPENAI_MODELS:
        return "gpt2"
    if local:
        return check_hf_folder(name_or_path)
    if "/" not in name_or_path:  # a Hub model is always OWNER/NAME
        raise OSError(f"{name_or_path!r} is neither a local Hugging Face model folder, one of "
                      f"{', '.join(OPENAI_MODELS)}, nor a Hub name (OWNER/NAME, e.g. HuggingFaceTB/SmolLM2-135M)")
    from configurator import quiet_offline_hub
    quiet_offline_hub()  # before transformers reads the setting at import
    try:
        from transformers import AutoConfig
    except ImportError:
        raise ImportError("loading Hugging Face weights needs transformers: pip install transformers") from None
    try:
        kind = AutoConfig.from_pretrained(name_or_path).model_type
    except Exception as e:  # offline, no such repository, a gated one
        raise OSError(f"could not fetch {name_or_path!r}'s config ({type(e).__name__}): offline, misspelt, or gated? "
                      "Be online once so transformers caches it, or pass a local folder") from None
    if kind not in HF_CLASSES:
        raise ValueError(f"{name_or_path} is a {kind} model; only GPT-2 (gpt2) and Llama-family (llama) models load here")
    return kind


def load_hf_model(name_or_path, local, kind):
    """transformers' GPT2LMHeadModel or LlamaForCausalLM, from the Hub (cached) or a local folder,
    with every way it can fail said in one line (an OSError or ValueError)."""
    if not local:
        from configurator import quiet_offline_hub
        quiet_offline_hub()
    try:
        import transformers
    except ImportError:
        raise ImportError("loading Hugging Face weights needs transformers: pip install transformers") from None
    try:
        return getattr(transformers, HF_CLASSES[kind]).from_pretrained(name_or_path, local_files_only=local)
    except OSError:
        if local:
            raise
        raise OSError(f"could not load {name_or_path!r}: offline? Be online once so transformers caches it, "
                      "or pass a local folder written by save_pretrained") from None
    except Exception as e:  # a corrupt or refused weights file in a local folder
        if not local:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise OSError(f"could not read the weights in {name_or_path}: {type(e).__name__}: {first}") from None


def check_hf_folder(path):
    """A local Hugging Face folder must hold a GPT-2 or a Llama: say plainly what else it is
    (another architecture, no weights, a broken config.json) instead of loading it half-right.
    Returns its model type; the config is checked field by field (gpt2_config, llama_config)."""
    import json

    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            hc = json.load(f)
    except FileNotFoundError:
        raise OSError(f"{path} has no config.json: not a Hugging Face model folder (save_pretrained writes one)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise OSError(f"{path}/config.json is not valid JSON ({e})") from None
    kind = hc.get("model_type") if isinstance(hc, dict) else None
    if kind not in HF_CLASSES:
        raise ValueError(f"{path} holds a {kind or 'model of unknown type'} (config.json's model_type): only GPT-2 "
                         "(model_type gpt2) and Llama-family models (model_type llama) load here")
    try:  # refuses what does not fit, before the weights are read
        (gpt2_config if kind == "gpt2" else llama_config)(hc, path)
    except KeyError as e:
        raise ValueError(f"{path}/config.json has no {e.args[0]}, which a {kind} model's config must give") from None
    weights = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
    if not any(os.path.isfile(os.path.join(path, w)) for w in weights):
        raise OSError(f"{path} has a config.json but no weights ({' or '.join(weights[:2])})")
    return kind


def gpt2_config(hc, where):
    """Our GPTConfig for a GPT2LMHeadModel's config (a dict), or a ValueError naming the field
    that has no place in our GPT."""
    act = hc.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        raise ValueError(f"{where}: activation {act!r} is not GPT-2's GELU")
    if hc.get("scale_attn_by_inverse_layer_idx") or hc.get("reorder_and_upcast_attn"):
        raise ValueError(f"{where}: non-standard GPT-2 attention options are not supported")
    n_embd = hc.get("n_embd", 768)
    if hc.get("n_inner") not in (None, 4 * n_embd):
        raise ValueError(f"{where}: n_inner={hc['n_inner']} is not 4 x n_embd; this GPT's MLP is 4 x n_embd wide")
    return GPTConfig(block_size=hc.get("n_positions", 1024), vocab_size=hc.get("vocab_size", 50257),
                     n_layer=hc.get("n_layer", 12), n_head=hc.get("n_head", 12), n_embd=n_embd, bias=True,
                     dropout=0.0, gelu="none" if act == "gelu" else "tanh")


def llama_config(hc, where):
    """Our GPTConfig for a LlamaForCausalLM's config (a dict: config.json, or transformers'
    to_dict(), which keeps RoPE's settings in rope_parameters), or a ValueError naming the field
    we cannot represent: RoPE scaling (Llama 3.1/3.2's "llama3" long-context variant), biases,
    an activation other than SiLU, a head size other than hidden_size / num_attention_heads."""
    rope = dict(hc.get("rope_parameters") or {})
    scaling = hc.get("rope_scaling") or {}
    types = {rope.get("rope_type"), scaling.get("rope_type"), scaling.get("type")} - {None, "default"}
    rope_type = types.pop() if types else "default"
    if rope_type != "default":
        raise ValueError(f"{where}: rope_scaling {rope_type!r} is not supported (only plain RoPE, rope_theta alone)")
    if hc.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {hc['hidden_act']!r} is not supported (Llama's SwiGLU uses silu)")
    for field in ("attention_bias", "mlp_bias"):
        if hc.get(field):
            raise ValueError(f"{where}: {field}=true is not supported (this GPT's Llama form has no biases)")
    n_embd, n_head = hc["hidden_size"], hc["num_attention_heads"]
    if hc.get("head_dim") not in (None, n_embd // n_head):
        raise ValueError(f"{where}: head_dim={hc['head_dim']} is not hidden_size / num_attention_heads "
                         f"= {n_embd // n_head}, which this GPT's heads are")
    theta = rope.get("rope_theta", hc.get("rope_theta", 10000.0))
    return GPTConfig(block_size=hc.get("max_position_embeddings", 2048), vocab_size=hc["vocab_size"],
                     n_layer=hc["num_hidden_layers"], n_head=n_head, n_embd=n_embd,
                     n_kv_head=hc.get("num_key_value_heads") or n_head, dropout=0.0, bias=False, rope=True,
                     rope_theta=float(theta), norm="rmsnorm", norm_eps=hc.get("rms_norm_eps", 1e-6), mlp="swiglu",
                     mlp_hidden=hc["intermediate_size"], tie_embeddings=bool(hc.get("tie_word_embeddings", False)))


def copy_gpt2_weights(model, sd_hf):
    """Copy a Hugging Face GPT2LMHeadModel's state dict into our GPT of the same shape."""
    sd = model.state_dict()
    # Hugging Face stores these four as Conv1D, weight (in, out): transpose to Linear's (out, in)
    transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    keys = list(sd)  # ours has no mask buffers: SDPA builds the causal mask itself
    hf_keys = [k for k in sd_hf if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    assert set(keys) == set(hf_keys), f"key mismatch: {sorted(set(keys) ^ set(hf_keys))[:5]}"
    with torch.no_grad():
        for k in keys:
            w = sd_hf[k].t() if k.endswith(transposed) else sd_hf[k]
            assert w.shape == sd[k].shape, f"{k}: {tuple(w.shape)} vs {tuple(sd[k].shape)}"
            sd[k].copy_(w)


def llama_names(config):
    """Our weight names -> the LlamaForCausalLM weights they are made of, stacked along dim 0
    (both are nn.Linear, (out, in): no transposes). c_attn is q_proj, k_proj, v_proj on top of
    each other, c_fc is gate_proj over up_proj. Loading stacks, export_hf.py cuts them apart."""
    names = {"transformer.wte.weight": ["model.embed_tokens.weight"], "transformer.ln_f.weight": ["model.norm.weight"]}
    if not config.tie_embeddings:  # tied, lm_head is wte
        names["lm_head.weight"] = ["lm_head.weight"]
    for i in range(config.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        names[ours + "ln_1.weight"] = [theirs + "input_layernorm.weight"]
        names[ours + "attn.c_attn.weight"] = [theirs + f"self_attn.{x}_proj.weight" for x in "qkv"]
        names[ours + "attn.c_proj.weight"] = [theirs + "self_attn.o_proj.weight"]
        names[ours + "ln_2.weight"] = [theirs + "post_attention_layernorm.weight"]
        names[ours + "mlp.c_fc.weight"] = [theirs + "mlp.gate_proj.weight", theirs + "mlp.up_proj.weight"]
        names[ours + "mlp.c_proj.weight"] = [theirs + "mlp.down_proj.weight"]
    return names


def copy_llama_weights(model, sd_hf):
    """Copy a LlamaForCausalLM's state dict into our GPT of its shape (llama_config)."""
    sd = model.state_dict()
    names = llama_names(model.config)
    used = {k for parts in names.values() for k in parts}
    # tied models may list lm_head.weight too (the same tensor as embed_tokens); RoPE's tables are recomputed
    extra = sorted(k for k in sd_hf if k not in used and k != "lm_head.weight" and "rotary_emb" not in k)
    missing = sorted(k for k in used if k not in sd_hf)
    assert not extra and not missing, f"weights that do not fit: unexpected {extra[:3]}, missing {missing[:3]}"
    with torch.no_grad():
        for ours, parts in names.items():
            w = torch.cat([sd_hf[k] for k in parts], dim=0)
            assert w.shape == sd[ours].shape, f"{ours}: {tuple(w.shape)} vs {tuple(sd[ours].shape)}"
            sd[ours].copy_(w)


# -----------------------------------------------------------------------------
# training helpers: the optimizers, FSDP sharding, the FLOP count behind MFU



def configure_optimizers(model, weight_decay, learning_rate, betas, device_type, muon=None, verbose=True):
    """The optimizers, as a list: [AdamW], or with muon (a dict: lr, momentum, weight_decay)
    [Muon, AdamW]. The caller steps every one of them.

    AdamW puts weight decay on the matrices (2-D and up: Linear weights, embeddings) and
    none on biases and norm gains, which only shift and scale. With muon, the 2-D weights
    inside the blocks (c_attn, c_proj, c_fc) go to Muon (below) instead, which
    orthogonalises each matrix's momentum (Newton-Schulz) so that every direction of the
    matrix moves by about the same amount (c_attn as its three matrices, q, k and v); embeddings and lm_head stay with AdamW (a
    lookup table and a classifier are not the linear maps Muon's argument is about).
    Only parameters that require grad are optimised (a LoRA run freezes the base).
    Every param group records its starting lr as base_lr: the schedule multiplies it."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    in_blocks = lambda n: n.startswith("transformer.h.")
    matrices = [p for n, p in params.items() if muon is not None and in_blocks(n) and p.dim() == 2]
    rest = [p for p in params.values() if not any(p is m for m in matrices)]
    decay = [p for p in rest if p.dim() >= 2]
    no_decay = [p for p in rest if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay, "base_lr": learning_rate},
              {"params": no_decay, "weight_decay": 0.0, "base_lr": learning_rate}]
    # the fused kernel updates all tensors in a few passes instead of one op per tensor and
    # step: on CUDA far fewer launches, on CPU (torch >= 2.4) half the optimizer time
    fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
    say = print if verbose else (lambda *a: None)
    say(f"decayed tensors: {len(decay)}, with {sum(p.numel() for p in decay):,} parameters")
    say(f"non-decayed tensors: {len(no_decay)}, with {sum(p.numel() for p in no_decay):,} parameters")
    say(f"using fused AdamW: {fused}")
    adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))
    if muon is None:
        return [adamw]
    # c_attn's weight is three maps stacked, q, k and v: orthogonalised one by one (with GQA k
    # and v have fewer rows than q: the split lists the rows). A SwiGLU c_fc is gate over up.
    cfg = model.config
    sizes = [cfg.n_embd, *[(cfg.n_kv_head or cfg.n_head) * cfg.n_embd // cfg.n_head] * 2]
    qkv_split = (3 if sizes[0] == sizes[1] else sizes) if muon.get("split_qkv", True) else 1
    named = [(n, p) for n, p in params.items() if any(p is m for m in matrices)]
    qkv = [p for n, p in named if n.endswith("attn.c_attn.weight")]
    gate_up = [p for n, p in named if cfg.mlp == "swiglu" and n.endswith("mlp.c_fc.weight")]
    others = [p for p in matrices if not any(p is m for m in qkv + gate_up)]
    groups = [{"params": qkv, "split": qkv_split, "base_lr": muon["lr"]},
              {"params": others, "split": 1, "base_lr": muon["lr"]}]
    if gate_up:  # (only for SwiGLU: a GPT-2's optimizer keeps its two groups)
        groups.append({"params": gate_up, "split": 2, "base_lr": muon["lr"]})
    from configurator import native_bf16_gpu
    ns_dtype = torch.bfloat16 if device_type == "cuda" and native_bf16_gpu() else torch.float32
    say(f"Muon tensors: {len(matrices)}, with {sum(p.numel() for p in matrices):,} parameters; "
        f"q, k, v apart: {groups[0]['split'] != 1}; Newton-Schulz in {str(ns_dtype).replace('torch.', '')}")
    opt = Muon(groups, lr=muon["lr"], momentum=muon["momentum"], weight_decay=muon["weight_decay"], ns_dtype=ns_dtype)
    return [opt, adamw]


def newton_schulz(G, steps=5, dtype=torch.bfloat16, eps=1e-7):
    """G (A, B) -> about the nearest semi-orthogonal matrix, U V^T of G = U S V^T: every
    singular value pushed to roughly 1 (0.7-1.2; exactly 1 is not needed) by five steps of the
    quintic X <- aX + b(XX^T)X + c(XX^T)^2 X, with Keller Jordan's coefficients (they maximise
    the slope at zero, so small singular values grow fastest). Works on the wide side (A <= B),
    so XX^T is the smaller Gram matrix. dtype: bf16 where the hardware multiplies it natively
    (Ampere and newer GPUs); fp32 elsewhere, where bf16 would be emulated and ~50x slower."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = G.size(0) > G.size(1)
    X = G.to(dtype)
    X = X.T if tall else X
    X = X / X.norm().clamp(min=eps)  # Frobenius norm >= spectral norm: singular values <= 1
    for _ in range(steps):
        A = X @ X.T  # (A, A)
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.addmm(X, B, X, beta=a)  # a X + B X
    return (X.T if tall else X).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights: SGD with Nesterov momentum whose update is orthogonalised
    (newton_schulz), so that every direction of the matrix moves by about the same amount,
    whatever the gradient's spectrum. An (A, B) matrix's step is scaled by sqrt(max(1, A/B)),
    as in Keller Jordan's Muon (the speedrun's learning rates assume it). A param group's
    "split" cuts each matrix into that many equal row blocks, or blocks of the listed row counts,
    orthogonalised apart (c_attn's q, k, v; a SwiGLU c_fc's gate and up). Weight decay is
    decoupled: lr * weight_decay per step. The state is one
    "momentum_buffer" per weight, as torch.optim.Muon's (with split=1 and bf16 the steps are
    the same as torch.optim.Muon's, adjust_lr_fn="original": a test checks it)."""

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0, nesterov=True, ns_steps=5,
                 ns_dtype=torch.bfloat16):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                      ns_steps=ns_steps, split=1))
        self.ns_dtype = ns_dtype  # the device's, not the checkpoint's: not in the param groups

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # (the Optimizer interface; train.py passes none)
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mom, split = group["lr"], group["momentum"], group.get("split", 1)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mom)  # buf = mom * buf + (1 - mom) * grad
                update = p.grad.lerp(buf, mom) if group["nesterov"] else buf  # Nesterov: look one step ahead
                # FSDP: p, its gradient and buffer are DTensors, this rank's rows of each. Newton-
                # Schulz needs the whole matrix: gathered once, then plain tensors (DTensor would
                # give the same numbers op by op, at 2.6x the time on CPU). Every rank then
                # orthogonalises every matrix, and keeps its own rows of the result.
                sharded = hasattr(update, "full_tensor")
                if sharded:
                    update = update.full_tensor()
                # each block of rows its own matrix, with its own shape's scale (relative to the
                # first block's, which goes into alpha: equal blocks multiply by exactly 1)
                blocks = update.split(split, dim=0) if isinstance(split, list) else update.chunk(split, dim=0)
                scales = [max(1, u.size(0) / u.size(1)) ** 0.5 for u in blocks]
                update = torch.cat([newton_schulz(u, group["ns_steps"], self.ns_dtype) * (s / scales[0])
                                    for u, s in zip(blocks, scales)])
                if sharded:
                    update = rows_of_shard(update, p)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * scales[0])
        return loss


def rows_of_shard(full, shard):
    """The rows of full (A, B) that this rank holds of shard, an FSDP weight (a DTensor cut along
    its rows the way torch.chunk cuts: ranks past the last piece hold none), as a DTensor like it."""
    from torch.distributed.tensor import DTensor
    mesh = shard.device_mesh
    pieces = full.chunk(mesh.size(), dim=0)
    rank = mesh.get_local_rank()
    mine = pieces[rank] if rank < len(pieces) else full[:0]
    if mine.shape != shard.to_local().shape:  # (FSDP's layout changed: fail loudly, never train wrong)
        raise RuntimeError(f"Muon under FSDP: rows {tuple(mine.shape)} but the shard is {tuple(shard.to_local().shape)}")
    # the global shape is given, not inferred: from_local would take it as rows x ranks, wrong
    # (and different on each rank) when the rows do not split evenly
    return DTensor.from_local(mine.contiguous(), mesh, shard.placements, run_check=False,
                              shape=shard.shape, stride=shard.stride())


def fully_shard(model, param_dtype=torch.float32):
    """Shard a GPT across the ranks of the process group with FSDP2 (train.py and
    bench.py with fsdp=True, under torchrun). Each rank then keeps 1/N of every weight, of
    its gradient and (the optimizer being built afterwards) of the AdamW moments; a
    Block's full weights are all-gathered just before it runs and freed after, forward and
    backward. One unit per Block, then the root for what is left (wte = lm_head, wpe, ln_f):
    the tied weight stays one parameter, in the root's unit. The weights move to the
    current device (cuda:LOCAL_RANK) as they are sharded. param_dtype bf16/fp16: the
    gathered weights are cast for compute, while gradients are reduced and the shards
    updated in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, register_fsdp_forward_method
    from torch.distributed.fsdp import fully_shard as fsdp_shard
    mp = MixedPrecisionPolicy(param_dtype=None if param_dtype == torch.float32 else param_dtype,
                              reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fsdp_shard(block, mp_policy=mp)
    fsdp_shard(model, mp_policy=mp)  # model's class becomes an FSDP subclass of GPT
    # FSDP gathers the root's weights (wte = lm_head, wpe, ln_f) around forward() only: the
    # HellaSwag scorer's own entry point gets the same gathering
    register_fsdp_forward_method(model, "logits_at")
    return model

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
    989.5e12 for an H100 SXM in bf16). tokens_per_iter: this device's tokens per iteration (a
    run's global tokens / ranks), dt: seconds per iteration."""
    return flops_per_token(model, seq_len) * tokens_per_iter / dt / peak_flops


# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, for MFU. The first key
# found in torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989.5e12,  # SXM ("NVIDIA H100 80GB HBM3")
    "H200": 989.5e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L4": 121e12,
    "RTX 4090": 165.2e12,
    "RTX 3090": 71e12,
}


def peak_flops(device_name):
    """The bf16 peak of a GPU by name, or None if unknown (then MFU is not reported)."""
    return next((flops for key, flops in PEAK_FLOPS.items() if key in device_name), None)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick the next token from logits (B, V): returns (B, 1)."""
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

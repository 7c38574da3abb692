"""
Learning from preferences, after SFT: a reward model, PPO against it, or Direct Preference Optimization.

    python prepare_preferences.py --input=pairs.jsonl --out_dir=data/prefs
    python align.py --method=dpo --init_from=out-sft --dataset=prefs --out_dir=out-dpo
    python align.py --method=reward --init_from=out-sft --dataset=prefs --out_dir=out-rm
    python align.py --method=ppo --init_from=out-sft --reward_from=out-rm --dataset=prefs --out_dir=out-ppo
    python sample.py --out_dir=out-dpo --start "Name three primary colors."

The data are preference pairs: a prompt x, the answer people chose y_w and the one they rejected
y_l. log p(y | x) is the sum of the answer tokens' log-probabilities (the prompt is never
scored). docs/alignment.md has the derivations; in short:

  reward (Bradley-Terry): a scalar head on the GPT trunk, read at the answer's last token, gives
      r(x, y); P(y_w preferred to y_l) = sigmoid(r(x, y_w) - r(x, y_l)); the loss is its -log.
  ppo (InstructGPT): the policy samples answers to the prompts; each gets the reward model's
      score (or --reward_fn's) minus a per-token KL penalty to the reference; a value head and
      GAE give advantages, and a few epochs of PPO's clipped surrogate follow.
  dpo: the policy pi starts as the reference pi_ref (the starting model, frozen). Its implicit
      reward is beta * log(pi(y|x) / pi_ref(y|x)), and the loss is Bradley-Terry's on it:
      -log sigmoid(beta * [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))]).
      At step 0 pi = pi_ref, so every margin is 0 and the loss is log 2. With LoRA the
      reference is the same weights with the adapters switched off: no second copy.

The settings, the log (log.txt), the checkpoint (ckpt.pt: sample.py, hellaswag.py and
export_hf.py read it; a reward model's holds reward_head.weight beside the GPT, a PPO policy's
value_head.weight), DDP under torchrun (and --fsdp for DPO), Ctrl-C and --init_from=resume work as in
train.py.
"""

import copy
import math
import os
import signal
import threading
import time

from configurator import UserError, autocast_context, configure, die, exit_on_ctrl_c, print_config, resolve_dtype

if __name__ == "__main__":
    exit_on_ctrl_c()  # first: a Ctrl-C while torch loads (seconds) ends in one line, not a traceback

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F

import lora
from checkpoint import check_same_tokenizer, claim_out_dir, load_checkpoint, load_model, restore_run, save_run
from dataloader import SFTLoader, eot_of, get_tokenizer, read_meta
from optim import configure_optimizers
from runtime import (StopFlag, close_world, ddp_wrap, evaluates_at, format_time, fully_shard, nonfinite, rank_failed,
                     setup_world, stop_agreed, worse_than_best)

DEFAULTS = dict(
    method="dpo",  # dpo | reward | ppo
    out_dir="out-dpo",
    init_from="",  # the starting model: a run's out_dir (an SFT run, usually), an HF folder or name; or resume
    overwrite=False,  # replace a run already in out_dir
    dataset="",  # data/<dataset>/ from prepare_preferences.py (meta.json "format": "preference")
    beta=0.1,  # DPO: how far the policy may move from the reference (larger = closer to it)
    batch_size=8,  # pairs per micro-batch on each rank (a micro-batch runs 2 x batch_size sequences)
    total_batch_size=0,  # pairs per optimizer step over all ranks; 0 = one micro-batch per rank
    block_size=512,  # the longest pair (prompt + the longer answer) it reads
    max_iters=300,  # optimizer steps
    learning_rate=5e-6,  # AdamW's rate after warmup, held constant (DPO's paper: 1e-6 for 7B models)
    warmup_iters=20,  # linear warmup from 0
    weight_decay=0.0,
    grad_clip=1.0,
    eval_interval=50,  # val loss and accuracy every this many steps (and at the end)
    eval_iters=20,  # val micro-batches per evaluation
    log_interval=10,
    checkpoint_interval=0,  # also save every this many steps (0 = at the end and on a stop only)
    keep_interval=0,  # keep ckpt_STEP.pt every this many steps (0 = only the latest)
    lora_rank=0,  # DPO with LoRA: the reference is the base with the adapters off
    lora_alpha=16.0,
    lora_dropout=0.0,
    lora_targets="q,v",
    dropout=0.0,
    device="auto",
    dtype="auto",
    seed=1337,
    pg_timeout=600,  # seconds a rank waits for the others in a collective
    fsdp=False,  # DPO under torchrun: the policy and the reference sharded over the ranks (FSDP2), not copied
    compile=False,  # torch.compile the trained model's forward, as train.py (a GPU: faster after the first steps)
    # PPO (--method=ppo): rollouts from the dataset's prompts, scored by a reward model or a function
    reward_from="",  # a reward model's out_dir (align.py --method=reward)
    reward_fn="",  # or module:function, answer text in, float out (a checkable task), instead of a reward model
    max_new_tokens=64,  # the longest sampled answer
    temperature=1.0,  # sampling temperature of the rollouts (PPO: must be 1, the policy being optimised)
    kl_coef=0.05,  # the per-token KL penalty to the reference, subtracted from the reward
    ppo_epochs=4,  # optimizer passes over each batch of rollouts
    clip_range=0.2,  # PPO's clip of the probability ratio (and of the value's change)
    vf_coef=0.5,  # the value loss's weight next to the policy's
    gamma=1.0,  # discount over an answer's tokens
    lam=0.95,  # GAE's lambda: bias (0) against variance (1) of the advantages
    wandb_log=False,
    wandb_project="gpt2-align",
    wandb_run_name="run",
)


# -----------------------------------------------------------------------------
# the two objectives


def token_logps(model, x, y):
    """(N, L): the log-probability of each target, the answer tokens; 0 where y == -1 (the prompt
    and the padding: not scored). x, y (N, L)."""
    logits, _ = model(x)  # (N, L, V)
    logp = -F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none")
    return logp.view(y.shape)


def sequence_logps(model, x, y):
    """(N,): each row's summed log-probability of its answer tokens."""
    return token_logps(model, x, y).sum(dim=1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """DPO over B pairs (each argument (B,): summed log-probs). Returns (the mean loss, stats):
    acc is the share of pairs whose implicit reward ranks chosen first; margin, chosen and
    rejected are the mean implicit rewards' difference and the rewards themselves."""
    chosen = beta * (policy_chosen - ref_chosen)  # (B,) implicit rewards
    rejected = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen - rejected)
    return loss.mean(), dict(acc=(chosen > rejected).float().mean(), margin=(chosen - rejected).mean(),
                             chosen=chosen.mean(), rejected=rejected.mean())


def reward_loss(r_chosen, r_rejected):
    """Bradley-Terry over B pairs of scalar rewards (B,): (the mean loss, stats)."""
    loss = -F.logsigmoid(r_chosen - r_rejected)
    return loss.mean(), dict(acc=(r_chosen > r_rejected).float().mean(), margin=(r_chosen - r_rejected).mean(),
                             chosen=r_chosen.mean(), rejected=r_rejected.mean())


class Scorer(nn.Module):
    """A reward model: the GPT trunk (no lm_head) and gpt.reward_head, C -> 1, read at each row's
    last answer token: the position whose target is the end marker, which has read the whole
    answer. (A module of its own so that DDP sees its forward.)"""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, x, y):  # (N, L) -> (N,)
        h = self.gpt.hidden_states(x)  # (N, L, C)
        last = y.size(1) - 1 - (y != -1).flip(1).int().argmax(dim=1)  # (N,) the last scored position
        return self.gpt.reward_head(h[torch.arange(x.size(0), device=x.device), last]).squeeze(-1).float()


def add_head(gpt, state=None, name="reward_head"):
    """Give the GPT a scalar head, C -> 1 (zeros: every reward 0 at the start, loss log 2), or load
    it: reward_head for a reward model, value_head for PPO's value estimate."""
    head = nn.Linear(gpt.config.n_embd, 1, bias=False, device=gpt.lm_head.weight.device)
    with torch.no_grad():
        head.weight.copy_(state) if state is not None else head.weight.zero_()
    setattr(gpt, name, head)
    if name == "reward_head" and not gpt.config.tie_embeddings:  # lm_head takes no part: DDP must not wait for it
        gpt.lm_head.weight.requires_grad_(False)
    return gpt


def pair_loss(cfg, model, reference, x, y):
    """The method's loss and stats on one micro-batch of B pairs (x, y: (2B, L), chosen rows first)."""
    B = x.size(0) // 2
    if cfg["method"] == "reward":
        r = model(x, y)  # (2B,)
        return reward_loss(r[:B], r[B:])
    logps = sequence_logps(model, x, y)  # (2B,)
    with torch.no_grad():
        ref = reference(x, y).sum(dim=1)
    return dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], cfg["beta"])


def make_reference(cfg, raw_model, init_from, shard_dtype=None):
    """The frozen pi_ref (DPO's, and PPO's KL anchor) as a function (x, y) -> per-token log-probs
    (N, L): the adapters switched off (LoRA), or a frozen copy of the starting model (under FSDP
    sharded like the policy: shard_dtype is its compute dtype)."""
    if cfg["lora_rank"] > 0:
        def reference(x, y):
            was_training = raw_model.training
            lora.set_lora_enabled(raw_model, False)
            raw_model.eval()  # the reference has no dropout
            try:
                return token_logps(raw_model, x, y)
            finally:
                lora.set_lora_enabled(raw_model, True)
                raw_model.train(was_training)
        return reference
    frozen = copy.deepcopy(raw_model).eval() if init_from is None else load_start(cfg, init_from, raw_model)
    for p in frozen.parameters():
        p.requires_grad_(False)
    if shard_dtype is None:
        return lambda x, y: token_logps(frozen, x, y)
    fully_shard(frozen, param_dtype=shard_dtype)

    def sharded_reference(x, y):
        logps = token_logps(frozen, x, y)
        # FSDP frees a root's gathered weights (wte = lm_head, wpe, ln_f) at the end of backward,
        # which the reference never runs: free them here, or every rank keeps them whole
        frozen.reshard()
        return logps
    sharded_reference.model = frozen  # (for the test that checks it stays sharded)
    return sharded_reference


def run_of_ours(path):
    """A run's folder (its ckpt.pt), or one of its checkpoint files (RUN/ckpt_best.pt), as sample.py
    takes them; anything else is a Hugging Face name or folder."""
    return os.path.isfile(os.path.join(path, "ckpt.pt")) or (path.endswith(".pt") and os.path.isfile(path))


def load_start(cfg, init_from, like):
    """The starting model again (a resumed DPO run's reference), on like's device, eval mode."""
    ours = run_of_ours(init_from)
    model, _ = load_model(out_dir=init_from) if ours else load_model(init_from=init_from)
    if lora.has_lora(model):
        lora.merge_lora(model)
    model.crop_block_size(min(cfg["block_size"], model.config.block_size))
    return model.to(like.lm_head.weight.device).eval()


# -----------------------------------------------------------------------------
# PPO: a policy trained on its own samples against a reward, with a KL penalty to the reference


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation over (N, T) per-token rewards and values; mask is 1 on the
    answer's positions (contiguous in each row), 0 elsewhere. delta_t = r_t + gamma V_{t+1} - V_t
    (V after the last answer token: 0), A_t = delta_t + gamma lam A_{t+1}: the advantages (0 off
    the answer) and the returns A + V, the value head's targets."""
    T = rewards.size(1)
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_mask = mask[:, t + 1] if t + 1 < T else torch.zeros_like(mask[:, 0])
        next_value = values[:, t + 1] * next_mask if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * next_mask * last
        adv[:, t] = last * mask[:, t]
    return adv, (adv + values) * mask


class PolicyValue(nn.Module):
    """The policy and its value head on one trunk: per-token log-probs of the targets, values and
    entropies, each (N, L). (A module of its own so that DDP sees its forward.)"""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, x, y):
        h = self.gpt.hidden_states(x)  # (N, L, C)
        logp_all = F.log_softmax(self.gpt.lm_head(h).float(), dim=-1)  # (N, L, V)
        logp = logp_all.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (N, L)
        with torch.no_grad():  # logged only: no (N, L, V) graph kept for it
            entropy = -(logp_all.exp() * logp_all).sum(dim=-1)
        return logp, self.gpt.value_head(h).squeeze(-1).float(), entropy


REWARD_WAIT_S = 60  # a --reward_fn call running this long is named on the console


def load_reward(cfg, meta, device):
    """The reward as a function (x, y, answers' texts) -> (N,): a reward model's score
    (--reward_from, a run of --method=reward) or a Python function's (--reward_fn=module:function,
    text in, float out)."""
    if cfg["reward_fn"]:
        import importlib
        import sys
        sys.path.insert(0, os.getcwd())  # a module in the folder the run starts in
        module, _, name = cfg["reward_fn"].partition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # not found, a syntax error, or its own code failing at import
            raise UserError(f"--reward_fn={cfg['reward_fn']}: cannot import it ({type(e).__name__}: {e}); "
                            "give module:function, the module in this folder or on the Python path") from None

        def call(text):
            """fn(text). A call that takes REWARD_WAIT_S is named on the console (a function that never
            returns would hang the run without a word), and a Ctrl-C or SIGTERM while it runs ends the
            run at once in one line: the stop the loop would take waits for fn, maybe forever."""
            signals = []

            def interrupt(signum, frame):
                signals.append(signal.Signals(signum).name)
                raise KeyboardInterrupt

            timer = threading.Timer(REWARD_WAIT_S, lambda: print(
                f"still waiting for --reward_fn={cfg['reward_fn']} on {text[:60]!r} after {REWARD_WAIT_S:g} s "
                "(the run goes on when it returns; Ctrl-C ends it)", flush=True))
            timer.daemon = True
            timer.start()
            kept = [signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)]
            try:
                return fn(text)
            except BaseException as e:  # also its own sys.exit() or KeyboardInterrupt
                if signals:
                    raise UserError(f"{signals[0]} while --reward_fn={cfg['reward_fn']} ran on {text[:60]!r}: "
                                    f"stopped without saving this step; {cfg['out_dir']}/ckpt.pt, if any, is the last "
                                    "(continue with --init_from=resume)") from None
                raise UserError(f"--reward_fn={cfg['reward_fn']} raised {type(e).__name__}: {e} "
                                f"on {text[:60]!r}") from None
            finally:
                timer.cancel()
                for s, handler in zip((signal.SIGINT, signal.SIGTERM), kept):
                    signal.signal(s, handler)

        def score(x, y, texts):
            out = []
            for text in texts:
                r = call(text)
                if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
                    raise UserError(f"--reward_fn={cfg['reward_fn']} returned {r!r} for {text[:60]!r}; it must return a finite number")
                out.append(float(r))
            return torch.tensor(out, device=device)
        return score
    ckpt = load_checkpoint(os.path.join(cfg["reward_from"], "ckpt.pt"))
    if "reward_head.weight" not in ckpt.get("model", {}):
        raise UserError(f"--reward_from={cfg['reward_from']} is not a reward model (no reward_head in its checkpoint): "
                        "train one with --method=reward")
    rm, rm_meta = load_model(out_dir=cfg["reward_from"])
    check_same_tokenizer(rm_meta, meta, cfg["reward_from"], cfg["dataset"])
    if rm.config.block_size < cfg["block_size"]:  # it scores prompt + answer, up to block_size + 1 tokens
        raise UserError(f"--reward_from={cfg['reward_from']} reads {rm.config.block_size} positions, fewer than "
                        f"block_size={cfg['block_size']}: use a block_size of at most {rm.config.block_size}")
    scorer = Scorer(add_head(rm, ckpt["model"]["reward_head.weight"])).to(device).eval()
    for p in scorer.parameters():
        p.requires_grad_(False)
    return lambda x, y, texts: scorer(x, y)


def prompts_of(loader):
    """The distinct prompts (token lists) of a preference or SFT split, in file order."""
    rows = loader.index[0::2] if loader.pairs else loader.index
    return [loader.tokens[start:start + p].astype("int64").tolist() for start, p, _ in rows.tolist()]


def rollout(cfg, raw_model, prompts, eot, generator, device, step=0):
    """Sample an answer for each prompt with the KV cache (temperature, up to max_new_tokens, ended
    at the end marker), as (x, y) padded like SFT batches: y the answer tokens, -1 elsewhere. Also
    the answers' token lists (without the end marker). The prompts go in one batch, left-padded to
    end together (generate's pad): one forward reads them all, then each step samples every row.
    NaN/inf probabilities (a diverged policy) stop the run at this step, as a NaN loss does."""
    # prompt and answer must fit the policy's block_size (and the reward model's: block_size)
    budgets = [max(1, min(cfg["max_new_tokens"], cfg["block_size"] + 1 - len(p))) for p in prompts]
    # a batch is as wide as its longest prompt plus its largest budget: where that passes block_size
    # (a long prompt beside a short one), generate would re-run the whole window at every step. So
    # the prompts are cut into batches that fit, longest first (usually one batch)
    batches = []
    for i in sorted(range(len(prompts)), key=lambda i: -len(prompts[i])):
        width = batches and len(prompts[batches[-1][0]]) + max(budgets[j] for j in batches[-1] + [i]) - 1
        if not batches or width > cfg["block_size"]:  # (the last sampled token is never fed back: - 1)
            batches.append([])
        batches[-1].append(i)
    new = [None] * len(prompts)  # each prompt's sampled tokens
    for rows in batches:
        P = len(prompts[rows[0]])  # the longest prompt of the batch
        idx = torch.full((len(rows), P), eot, dtype=torch.long)  # (N, P): prompts on the right, padding left
        for r, i in enumerate(rows):
            idx[r, P - len(prompts[i]):] = torch.tensor(prompts[i])
        pad = torch.tensor([P - len(prompts[i]) for i in rows])
        try:
            out = raw_model.generate(idx.to(device), max(budgets[i] for i in rows), temperature=cfg["temperature"],
                                     stop_token=eot, generator=generator, pad=pad.to(device))[:, P:].tolist()
        except RuntimeError as e:  # torch.multinomial's words for NaN/inf (or negative) probabilities
            if "probability tensor contains" not in str(e):
                raise
            raise nonfinite(cfg.get("out_dir", "."), step, what="the policy's next-token probabilities are not "
                            "finite (sampling answers)") from None
        for r, i in enumerate(rows):
            new[i] = out[r][:budgets[i]]
    seqs, answers = [], []
    for p, tokens in zip(prompts, new):
        answer = tokens[:tokens.index(eot) + 1] if eot in tokens else tokens  # through the first end marker
        seqs.append((p, answer))
        answers.append([t for t in answer if t != eot])
    # padded on the right to a multiple of 64 tokens (at most block_size), as SFT batches are: a
    # compiled model then sees a few lengths, not a new one every step
    need = max(len(p) + len(a) for p, a in seqs) - 1
    L = max(need, min(-(-need // 64) * 64, cfg["block_size"]))
    x = torch.zeros(len(seqs), L, dtype=torch.long)
    y = torch.full((len(seqs), L), -1, dtype=torch.long)
    for i, (p, a) in enumerate(seqs):
        tok = torch.tensor(p + a)
        x[i, :len(tok) - 1] = tok[:-1]
        y[i, len(p) - 1:len(tok) - 1] = tok[len(p):]
    return x.to(device), y.to(device), answers


def ppo_step(cfg, ctx, step):
    """One PPO iteration, as in InstructGPT: sample answers to this rank's prompts, score them
    (reward minus a per-token KL penalty to the reference), estimate advantages with GAE, then
    ppo_epochs passes of the clipped surrogate and value losses on the batch. Returns this rank's
    stats (reward, KL per answer, entropy, clip fraction, loss)."""
    raw, model, world = ctx["raw"], ctx["model"], ctx["world"]
    rng = np.random.default_rng([cfg["seed"], step])  # the step's prompts: the same on a resumed run
    chosen = rng.choice(len(ctx["prompts"]), size=cfg["batch_size"] * world.size, replace=False)
    mine = [ctx["prompts"][i] for i in chosen[world.rank * cfg["batch_size"]:(world.rank + 1) * cfg["batch_size"]]]
    gen = torch.Generator(device=world.device).manual_seed(cfg["seed"] * 1_000_003 + step * world.size + world.rank)
    with torch.no_grad(), ctx["autocast"]:
        x, y, answers = rollout(cfg, raw, mine, ctx["eot"], gen, world.device, step)
        mask = (y != -1).float()
        logp_old, values_old, _ = ctx["module"](x, y)
        kl = (logp_old - ctx["reference"](x, y)) * mask  # (N, L) per token, the sample's estimate
        score = ctx["reward"](x, y, [ctx["decode"](a) for a in answers]).float()  # (N,)
        rewards = -cfg["kl_coef"] * kl
        last = y.size(1) - 1 - (y != -1).flip(1).int().argmax(dim=1)  # each answer's last position
        rewards[torch.arange(len(x)), last] += score
        adv, returns = gae(rewards, values_old * mask, mask, cfg["gamma"], cfg["lam"])
        n = mask.sum()
        mean = (adv * mask).sum() / n
        adv = (adv - mean) * torch.rsqrt(((adv - mean) ** 2 * mask).sum() / n + 1e-8) * mask  # whitened
    eps = cfg["clip_range"]
    masked_mean = lambda t: (t * mask).sum() / n
    for _ in range(cfg["ppo_epochs"]):
        with ctx["autocast"]:
            logp, values, entropy = model(x, y)
            ratio = torch.exp(logp - logp_old)
            pg = masked_mean(torch.max(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps)))
            v_clipped = values_old + (values - values_old).clamp(-eps, eps)
            vf = 0.5 * masked_mean(torch.max((values - returns) ** 2, (v_clipped - returns) ** 2))
            loss = pg + cfg["vf_coef"] * vf
        ctx["scaler"].scale(loss).backward()
        ctx["step_optimizer"]()
    clip_frac = masked_mean(((ratio - 1).abs() > eps).float())
    return torch.stack([score.mean(), kl.sum(1).mean(), masked_mean(entropy), clip_frac, loss]).detach().float()


# -----------------------------------------------------------------------------
# set-up


PPO_ONLY = ("reward_from", "reward_fn", "max_new_tokens", "temperature", "kl_coef", "ppo_epochs", "clip_range",
            "vf_coef", "gamma", "lam")


def check_settings(cfg):
    if cfg["method"] not in ("dpo", "reward", "ppo"):
        die(f"--method must be dpo, reward or ppo, got {cfg['method']!r}")
    if cfg["method"] == "ppo":
        if bool(cfg["reward_from"]) == bool(cfg["reward_fn"]):
            die("PPO needs one reward: --reward_from=RM_RUN (a --method=reward run) or --reward_fn=module:function")
        if cfg["lora_rank"] > 0 or cfg["total_batch_size"]:
            die("PPO here trains the whole policy with batch_size prompts per rank: drop --lora_rank and --total_batch_size")
        if cfg["temperature"] != 1.0:  # the rollouts must come from the policy that is scored and optimised
            die(f"PPO samples at temperature 1 (the policy it optimises), got --temperature={cfg['temperature']}")
        for key in ("max_new_tokens", "ppo_epochs"):
            if cfg[key] < 1:
                die(f"--{key} must be at least 1, got {cfg[key]}")
        for key in ("temperature", "kl_coef", "clip_range", "vf_coef", "gamma", "lam"):
            if cfg[key] < 0:
                die(f"--{key} must not be negative, got {cfg[key]}")
        for key in ("gamma", "lam"):  # a discount and GAE's mix: weights of the future, at most 1
            if cfg[key] > 1:
                die(f"--{key} must be between 0 and 1 (1 and 0.95 are usual), got {cfg[key]}")
    else:  # PPO's settings given to another method would be ignored without a word
        given = [k for k in PPO_ONLY if cfg[k] != DEFAULTS[k]]
        if given:
            die(f"{', '.join('--' + k for k in given)} {'is' if len(given) == 1 else 'are'} PPO's: drop "
                f"{'it' if len(given) == 1 else 'them'} for --method={cfg['method']}, or use --method=ppo")
    if cfg["lora_rank"] > 0:
        try:
            lora.parse_targets(cfg["lora_targets"])
        except ValueError as e:
            die(str(e))
    if not cfg["init_from"] or not cfg["dataset"]:
        die("give the starting model and the pairs: --init_from=RUN_OR_HF_MODEL --dataset=NAME (prepare_preferences.py)")
    for key in ("batch_size", "block_size", "max_iters", "eval_iters", "log_interval"):
        if cfg[key] < 1:
            die(f"--{key} must be at least 1, got {cfg[key]}")
    for key in ("total_batch_size", "learning_rate", "warmup_iters", "weight_decay", "grad_clip", "eval_interval",
                "checkpoint_interval", "keep_interval", "lora_rank"):
        if cfg[key] < 0:
            die(f"--{key} must not be negative, got {cfg[key]}")
    if cfg["beta"] <= 0:
        die(f"--beta must be positive (0.1 is usual), got {cfg['beta']}")
    if cfg["method"] == "reward" and cfg["lora_rank"] > 0:  # an adapter checkpoint would leave the head behind
        die("a reward model trains its trunk and head in full: drop --lora_rank (LoRA is for --method=dpo)")
    if cfg["fsdp"]:  # as train.py's FSDP, for the method whose models are plain GPTs called by forward()
        if cfg["method"] != "dpo":
            die(f"--fsdp is built for --method=dpo; --method={cfg['method']} runs under DDP: drop --fsdp")
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401 (FSDP2: PyTorch 2.6 and later)
        except ImportError:
            die(f"--fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard), in PyTorch 2.6 and later (this is "
                f"{torch.__version__}): pip install -U 'torch>=2.6', or drop --fsdp")
        if cfg["lora_rank"] > 0:
            die("--fsdp trains every weight of the policy: drop --lora_rank (a LoRA run needs no sharding)")
        if cfg["dtype"] == "float16":
            die("--fsdp trains in bfloat16 or float32, not float16 (it has no GradScaler): set --dtype=bfloat16 "
                "or --dtype=float32")
        if "RANK" not in os.environ:
            die("--fsdp shards the models over the processes torchrun starts: run it under torchrun, or drop --fsdp")


def setup(cfg, world, meta, ptdtype, say):
    """(raw_model, base, reference, start checkpoint or None): the model to train, where a LoRA
    run's frozen base comes from, DPO's reference and (resuming) the checkpoint. Under FSDP both
    models are sharded here, before the optimizer is built (its moments are sharded too)."""
    resume = cfg["init_from"] == "resume"
    ckpt = load_checkpoint(os.path.join(cfg["out_dir"], "ckpt.pt")) if resume else None
    if resume:
        old = ckpt.get("config", {})
        for key in ("method", "lora_rank", "lora_targets", "dataset"):
            if old.get(key) != cfg[key]:
                raise UserError(f"{cfg['out_dir']} was aligned with {key}={old.get(key)!r}; resume it with the same")
        start = base = ckpt.get("base") or old["init_from"]  # the starting model, saved as "base" (below)
        raw_model, model_meta = load_model(out_dir=cfg["out_dir"], dropout=cfg["dropout"])
        if cfg["block_size"] > raw_model.config.block_size:
            raise UserError(f"block_size={cfg['block_size']} is larger than the run's {raw_model.config.block_size}")
    else:
        start = cfg["init_from"]
        ours = run_of_ours(start)
        raw_model, model_meta = (load_model(out_dir=start, dropout=cfg["dropout"]) if ours
                                 else load_model(init_from=start, dropout=cfg["dropout"]))
        if lora.has_lora(raw_model):
            lora.merge_lora(raw_model)
        if cfg["block_size"] > raw_model.config.block_size:
            raise UserError(f"block_size={cfg['block_size']} is larger than {start}'s {raw_model.config.block_size}")
        raw_model.crop_block_size(cfg["block_size"])
        if cfg["lora_rank"] > 0:
            lora.apply_lora(raw_model, rank=cfg["lora_rank"], alpha=cfg["lora_alpha"], dropout=cfg["lora_dropout"],
                            targets=cfg["lora_targets"], verbose=world.master)
        # the starting model by its absolute path: a LoRA run's frozen base, and for every method where a
        # resumed run finds its reference again (load_model reads "base" for LoRA runs only)
        base = os.path.abspath(start) if os.path.isdir(start) else start
    check_same_tokenizer(model_meta, meta, start, cfg["dataset"])
    if world.fsdp and ptdtype == torch.float16:  # dtype=auto on a GPU without native bf16
        raise UserError("this GPU has no native bfloat16 and FSDP does not train in float16: set --dtype=float32")
    if not world.fsdp:  # (FSDP moves each shard to the device as it cuts it)
        raw_model.to(world.device)
    reference = (make_reference(cfg, raw_model, start if resume else None, ptdtype if world.fsdp else None)
                 if cfg["method"] != "reward" else None)
    if world.fsdp:
        fully_shard(raw_model, param_dtype=ptdtype)
        say(f"FSDP: the policy and the reference sharded over {world.size} ranks, one unit per Block")
    if cfg["method"] != "dpo":  # the reward model's head, or PPO's value head beside the policy's lm_head
        name = "reward_head" if cfg["method"] == "reward" else "value_head"
        add_head(raw_model, ckpt["model"][f"{name}.weight"] if resume else None, name)
    say(f"{cfg['method']} from {start}: {raw_model.num_params():,} parameters")
    return raw_model, base, reference, ckpt


def evaluate(cfg, model, reference, loader, world, autocast):
    """The val loss and stats, means over eval_iters micro-batches on every rank (the same pairs
    each time)."""
    model.eval()
    loader.reset()
    sums = torch.zeros(5, device=world.device)  # loss, acc, margin, chosen, rejected
    with torch.no_grad():
        for _ in range(cfg["eval_iters"]):
            x, y = loader.next_batch()
            with autocast:
                loss, stats = pair_loss(cfg, model, reference, x.to(world.device), y.to(world.device))
            sums += torch.stack([loss, *stats.values()]).float()
    model.train()
    if world.ddp:
        dist.all_reduce(sums)
    values = (sums / (cfg["eval_iters"] * world.size)).tolist()
    return dict(zip(("loss", "acc", "margin", "chosen", "rejected"), values))


def evaluate_ppo(cfg, ctx, prompts, step):
    """The mean reward and KL (per answer, to the reference) of eval_iters x batch_size answers
    sampled for the val prompts (taken in turn, again from the first when they run out) with a
    fixed seed: every evaluation draws them the same way. (Each rank scores the same prompts.)"""
    gen = torch.Generator(device=ctx["world"].device).manual_seed(cfg["seed"])
    B, reward, kl = cfg["batch_size"], 0.0, 0.0
    with torch.no_grad(), ctx["autocast"]:
        for k in range(cfg["eval_iters"]):
            batch = [prompts[(k * B + j) % len(prompts)] for j in range(B)]
            x, y, answers = rollout(cfg, ctx["raw"], batch, ctx["eot"], gen, ctx["world"].device, step)
            kl += ((ctx["module"](x, y)[0] - ctx["reference"](x, y)) * (y != -1)).sum(1).mean().item()
            reward += ctx["reward"](x, y, [ctx["decode"](a) for a in answers]).float().mean().item()
    return {"reward": reward / cfg["eval_iters"], "kl": kl / cfg["eval_iters"]}


def lr_at(step, cfg):
    """Linear warmup, then constant (as DPO's paper trains)."""
    return cfg["learning_rate"] * min(1.0, (step + 1) / cfg["warmup_iters"]) if cfg["warmup_iters"] else cfg["learning_rate"]


# -----------------------------------------------------------------------------
# the run


def align(cfg, world):
    stop = StopFlag()
    say = print if world.master else (lambda *a, **k: None)
    ptdtype = resolve_dtype(cfg["dtype"], world.device_type)
    resume = cfg["init_from"] == "resume"
    lock, log = claim_out_dir(cfg, resume, world)  # noqa: F841 (held while the run lives)
    data_dir = os.path.join("data", cfg["dataset"])
    meta = read_meta(data_dir)
    if meta.get("format") != "preference":
        raise UserError(f"data/{cfg['dataset']} is not a preference dataset (its meta.json format is "
                        f"{meta.get('format', 'a token stream')!r}): prepare one with prepare_preferences.py")
    step_pairs = cfg["total_batch_size"] or cfg["batch_size"] * world.size
    if step_pairs % (cfg["batch_size"] * world.size):
        raise UserError(f"total_batch_size={step_pairs} pairs is not a multiple of batch_size x ranks = "
                        f"{cfg['batch_size'] * world.size}")
    grad_accum = step_pairs // (cfg["batch_size"] * world.size)
    common = dict(rank=world.rank, world_size=world.size, pairs=True)
    train_loader = SFTLoader(data_dir, "train", cfg["batch_size"], cfg["block_size"], seed=cfg["seed"],
                             grad_accum=grad_accum, **common)
    val_loader = SFTLoader(data_dir, "val", cfg["batch_size"], cfg["block_size"], shuffle=False, **common)
    if world.master:
        print_config(cfg)
    unit = "prompts" if cfg["method"] == "ppo" else "pairs"
    say(f"device {world.device}, {world.size} rank(s), {step_pairs} {unit} per step = {cfg['batch_size']} x "
        f"{world.size} ranks x {grad_accum} accumulation steps")
    torch.manual_seed(cfg["seed"])
    raw_model, base, reference, ckpt = setup(cfg, world, meta, ptdtype, say)
    optimizers = configure_optimizers(raw_model, cfg["weight_decay"], cfg["learning_rate"], (0.9, 0.95),
                                      world.device_type, verbose=False)
    scaler = torch.amp.GradScaler(world.device_type, enabled=(ptdtype == torch.float16))
    measured = bool(resume and ckpt.get("evaluated"))  # its step was evaluated (PPO: no val loss says so)
    step, val_loss, best_val = (restore_run(ckpt, cfg["out_dir"], raw_model, optimizers, scaler, train_loader, world, say)
                                if resume else (0, None, None))
    del ckpt
    module = {"reward": Scorer, "ppo": PolicyValue}.get(cfg["method"], lambda m: m)(raw_model)
    if cfg["compile"]:  # as train.py's wrap: under FSDP each Block on its own, else the whole module
        say("compiling the model (the first steps are slow)...")
        if world.fsdp:
            for block in raw_model.transformer.h:
                block.forward = torch.compile(block.forward)
        else:
            module = torch.compile(module)  # (the batches come in a few lengths: multiples of 64 tokens)
    model = ddp_wrap(module, world.device, world.device_type) if world.ddp and not world.fsdp else module
    autocast = autocast_context(world.device_type, ptdtype)
    params = [p for p in raw_model.parameters() if p.requires_grad]
    ppo = cfg["method"] == "ppo"
    names = ("reward", "kl", "entropy", "clip_frac", "train") if ppo else ("train", "acc", "margin", "chosen", "rejected")
    norms = []

    def step_optimizer():  # clip, step, clear: once per optimizer step (PPO: once per epoch)
        scaler.unscale_(optimizers[0])
        norms.append(torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"] or float("inf")))
        scaler.step(optimizers[0])
        scaler.update()
        optimizers[0].zero_grad(set_to_none=True)

    if ppo:
        ctx = dict(raw=raw_model, model=model, module=module, world=world, autocast=autocast, scaler=scaler,
                   reference=reference, reward=load_reward(cfg, meta, world.device), eot=eot_of(meta),
                   decode=get_tokenizer(meta)[1], prompts=prompts_of(train_loader), step_optimizer=step_optimizer)
        val_prompts = prompts_of(val_loader)
    start_step, t0 = step, time.time()

    while True:
        last = step >= cfg["max_iters"]
        stopping = stop_agreed(stop, world)
        due = cfg["checkpoint_interval"] and step % cfg["checkpoint_interval"] == 0 and step > start_step
        val_loss = None if step > start_step else val_loss
        measured = measured and step == start_step
        if evaluates_at(step, start_step, last, measured or val_loss is not None, cfg) and not stopping:
            measured = True
            if ppo:  # the mean reward and KL of answers to the same val prompts, sampled with the same seed
                val = evaluate_ppo(cfg, ctx, val_prompts, step)
                say(f"step {step}: val reward {val['reward']:.4f}, KL {val['kl']:.4f}")
                log(step, val_reward=val["reward"], val_kl=val["kl"])
            else:
                val = evaluate(cfg, module, reference, val_loader, world, autocast)
                val_loss = val["loss"]
                say(f"step {step}: val loss {val_loss:.4f}, acc {val['acc']:.4f}, margin {val['margin']:.4f}"
                    + worse_than_best(val_loss, best_val))
                log(step, val=val_loss, val_acc=val["acc"], val_margin=val["margin"])
        if (last or stopping or due) and step > start_step:
            best_val = save_run(cfg, step, val_loss, best_val, model=raw_model, optimizers=optimizers, scaler=scaler,
                                loader=train_loader, meta=meta, base=base, world=world, evaluated=measured)
        if last or stopping:
            if stopping:
                say(f"stopped at step {step}; continue with --init_from=resume")
            break

        lr = lr_at(step, cfg)
        for group in optimizers[0].param_groups:
            group["lr"] = lr
        norms.clear()
        if ppo:
            sums = ppo_step(cfg, ctx, step)  # (its prompts are drawn by the step number: a resume repeats them)
        else:
            batches, _ = train_loader.next_step(world.device)
            sums = torch.zeros(5, device=world.device)  # loss, acc, margin, chosen, rejected: this rank's means
            for micro, (x, y, weight) in enumerate(batches):
                sync = world.ddp and not world.fsdp and micro < len(batches) - 1  # (FSDP: reduce-scatters each)
                with model.no_sync() if sync else torch.enable_grad():
                    with autocast:
                        loss, stats = pair_loss(cfg, model, reference, x, y)
                    scaler.scale(loss * weight).backward()  # weight: 1 / accumulation steps
                sums += torch.stack([loss.detach(), *(v.detach() for v in stats.values())]).float() * weight
            step_optimizer()
        step += 1
        if step % cfg["log_interval"] == 0 or step == cfg["max_iters"]:
            if world.ddp:
                dist.all_reduce(sums)
            values = dict(zip(names, (sums / world.size).tolist()))
            if not all(map(math.isfinite, values.values())):
                raise nonfinite(cfg["out_dir"], step - 1)
            log(step - 1, **values, lr=lr, norm=(norms[-1].full_tensor() if world.fsdp else norms[-1]).item())
            say(f"step {step - 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()) + f", lr {lr:.2e}", flush=True)
    say(f"done in {format_time(time.time() - t0)}")


def main():
    cfg = configure(DEFAULTS)
    check_settings(cfg)
    world = setup_world(cfg["device"], fsdp=cfg["fsdp"], timeout_s=cfg["pg_timeout"])
    try:
        align(cfg, world)
    except UserError as e:
        die(str(e))
    except Exception as e:
        if world.ddp:
            rank_failed(world, e, cfg["pg_timeout"])
        raise
    finally:
        close_world(world)


if __name__ == "__main__":
    main()

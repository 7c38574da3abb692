"""
Serve one model over HTTP with OpenAI's API, and a chat page for the browser.

    python serve.py --out_dir=out-alpaca                # a run of ours (a LoRA run too); empty = the newest out*/
    python serve.py --init_from=gpt2 --port=8080        # OpenAI's GPT-2, a local HF folder, a Llama's Hub name
    python serve.py --out_dir=out-dpo --host=0.0.0.0    # reachable from other machines (default: this one only)

Then open http://127.0.0.1:8000/ for the chat page, or use any OpenAI client:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")   # the key is not checked
    client.chat.completions.create(model="out-alpaca", messages=[{"role": "user", "content": "Hi"}])

GET /v1/models                 the one model served (its id is --out_dir or --init_from as given)
POST /v1/completions           continue the prompt as it is (sample.py --instruct=False)
POST /v1/chat/completions      answer the conversation in the model's template: its chat template, or
                               the instruction template of an SFT run (sample.py --chat reads it so)
Both take max_tokens, temperature, top_p, stop, seed, n, stream (server-sent events, as OpenAI sends
them; stream_options.include_usage adds the usage), and top_k beyond OpenAI's fields. With a seed,
choice i samples what `sample.py --seed=SEED+i --top_k=0` samples. Bad requests get OpenAI's error JSON
with status 400 (404 for another model's name).

How requests share the model (continuous batching): one thread owns the model. Requests wait in a
queue; before every decoding step that thread takes in those that fit: it runs their prompts in one
left-padded forward (a fresh KV cache), samples their first tokens, and joins their caches to the
running batch's, padded on the left so that every row's next token lands in the same column. Each
step then runs one token per row through the model and samples every row with its own settings and
random generator, so a row draws what it would draw alone. A row leaves the batch when it ends (its
eos, a stop string, max_tokens) or when its client goes away. docs/serving.md has the measurements.
"""

import asyncio
import collections
import json
import os
import queue
import secrets
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

from configurator import UserError, autocast_context, configure, die, exit_on_ctrl_c, print_config, resolve_device, \
    resolve_dtype

if __name__ == "__main__":
    exit_on_ctrl_c()  # first: a Ctrl-C while torch loads (seconds) ends in one line, not a traceback

import torch

from checkpoint import checkpoint_path, load_checkpoint, load_model, newest_checkpoint
from dataloader import encode_pair, eot_of, get_tokenizer, with_bos
from model import sample_next

DEFAULTS = dict(
    out_dir="",  # a run's folder (or one of its .pt files: RUN/ckpt_best.pt); empty = the newest out*/ckpt.pt here
    init_from="",  # or OpenAI's weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl; a local HF folder; a Llama's Hub name
    host="127.0.0.1",  # where to listen (uvicorn's --host): 127.0.0.1 = this machine only, 0.0.0.0 = every network
    port=8000,  # uvicorn's --port
    max_batch=8,  # choices decoded together in one batch; 1 = one at a time, in the order they came (a plain queue)
    max_tokens=256,  # new tokens of a request that sets no max_tokens (fewer where the context ends first)
    temperature=1.0,  # of a request that sets none (OpenAI's default); 0 = always the likeliest token
    top_k=0,  # of a request that sets none (OpenAI's API has no top_k; 0 = no limit); a request may send top_k
    device="auto",  # auto | cpu | cuda | cuda:N | mps
    dtype="auto",  # auto | float32 | bfloat16 | float16
    log_level="info",  # uvicorn's: info logs every request, warning only what goes wrong
)

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "chat.html")  # the chat page at /


# -----------------------------------------------------------------------------
# the decoding thread: one batch, rows joining and leaving between steps


@dataclass
class Job:
    """One request: the event loop that waits for it and the queue its rows' text goes to."""
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    cancelled: bool = False  # its client has gone (or has all it wants): its rows are dropped


@dataclass
class Row:
    """One choice of a request: its prompt's token ids and its own sampling settings."""
    job: Job
    index: int  # the choice's index in the answer
    prompt: list
    max_tokens: int
    temperature: float
    top_k: int  # 0 = no limit
    top_p: float
    stop: list  # strings that end the text (not included)
    generator: torch.Generator
    out: list = field(default_factory=list)  # the tokens sampled so far (the end marker not among them)
    sent: int = 0  # how many characters of the text have been sent
    done: bool = False


def tokenizer_size(meta):
    """How many ids the tokenizer has (the model may have more rows: vocab_size is padded)."""
    return {"char": len(meta.get("chars", [])), "hf": meta.get("vocab_size")}.get(meta["tokenizer"], 50257)


class Engine:
    """Owns the model; run() is the decoding thread. The batch's state: rows (row b of every
    tensor is rows[b]), cache (the KV cache, one {"k", "v"} per layer, (B, nkv, size, hs)),
    cached (columns filled: row b's tokens are its last cached - pad[b]), pad (B,) and tokens
    (B, 1), the token each row feeds next."""

    def __init__(self, model, meta, max_batch, autocast):
        self.model, self.max_batch, self.autocast = model.eval(), max_batch, autocast
        self.block_size, self.eot = model.config.block_size, eot_of(meta)
        decode, known = get_tokenizer(meta)[1], tokenizer_size(meta)
        # ids past the tokenizer's (GPT-2's 50257 padded to 50304 rows) are never trained on, so all but
        # never sampled; one would be no text, not a KeyError that fails the whole batch
        self.decode = lambda ids: decode([t for t in ids if t < known])
        self.inbox = queue.Queue()  # lists of rows from the HTTP side; None stops the thread
        self.lock = threading.Lock()  # held through each step (a test holds it to line requests up)
        self.stats = dict(submitted=0, most_rows=0, dropped=0, disconnected=0)
        self.rows, self.cache, self.cached, self.pad, self.tokens = [], None, 0, None, None

    def submit(self, rows):
        self.stats["submitted"] += 1
        self.inbox.put(rows)

    def run(self):
        waiting = collections.deque()  # rows not yet in the batch, oldest first
        while True:
            if not self.rows and not waiting:
                waiting.extend(self.inbox.get() or [None])  # nothing to do: sleep until a request comes
            with self.lock:
                while not self.inbox.empty():
                    waiting.extend(self.inbox.get() or [None])
                if None in waiting:
                    return
                new = []  # oldest first, none skipped: a long request is not starved by short ones
                while waiting and len(self.rows) + len(new) < self.max_batch:
                    if waiting[0].job.cancelled:  # its client left while it waited
                        waiting.popleft()
                    elif self.fits(new + [waiting[0]]):
                        new.append(waiting.popleft())
                    else:
                        break
                try:
                    with torch.no_grad(), self.autocast:
                        self.admit(new)
                        self.drop_finished()
                        if self.rows:
                            self.step()
                            self.drop_finished()
                except Exception as e:  # a bug or out of memory: every row in the batch fails, the server goes on
                    traceback.print_exc()
                    for r in self.rows + new:
                        self.send(r, {"error": f"{type(e).__name__}: {e}"})
                    self.rows, self.cache = [], None

    def fits(self, new):
        """Can these rows join the batch? After they join, the widest prompt sets the column every
        row writes next, and every row must still reach its max_tokens within block_size columns."""
        if not self.rows and len(new) == 1:
            return True  # (the request checks made sure one prompt and its max_tokens fit)
        width = max([self.cached] * bool(self.rows) + [len(r.prompt) for r in new])
        left = max([r.max_tokens - len(r.out) for r in self.rows] + [r.max_tokens - 1 for r in new])
        return width + left <= self.block_size

    def admit(self, new):
        """Run the new rows' prompts (one left-padded batch, as align.rollout does), sample their
        first tokens, and join them to the batch."""
        if not new:
            return
        device = self.model.lm_head.weight.device
        width = max(len(r.prompt) for r in new)
        idx = torch.zeros(len(new), width, dtype=torch.long)  # (N, width): prompts on the right
        for b, r in enumerate(new):
            idx[b, width - len(r.prompt):] = torch.tensor(r.prompt)
        pad = torch.tensor([width - len(r.prompt) for r in new], device=device)  # (N,)
        # a cache with room for every new row's tokens to come, used as it is when the batch is empty
        cache = [{"size": width + max(r.max_tokens - 1 for r in new)} for _ in self.model.transformer.h]
        h = self.model.hidden_states(idx.to(device), kv_cache=cache, pad=pad if pad.any() else None)
        tokens = self.sample(new, self.model.lm_head(h[:, -1, :]).float())  # (N, 1)
        if not self.rows:
            self.rows, self.cache, self.cached, self.pad, self.tokens = new, cache, width, pad, tokens
            return
        # both sides padded on the left to the wider one's columns, into buffers with room for
        # every row's remaining tokens (zeros, not garbage: a padded column is masked, yet a NaN
        # there would still reach the output through attention's 0 x NaN)
        W = max(self.cached, width)
        size = W + max(r.max_tokens - len(r.out) for r in self.rows + new)
        for layer, fresh in zip(self.cache, cache):
            for key in ("k", "v"):
                old = layer[key]
                buf = old.new_zeros(old.size(0) + len(new), old.size(1), size, old.size(3))  # (B + N, nkv, size, hs)
                buf[:old.size(0), :, W - self.cached:W] = old[:, :, :self.cached]
                buf[old.size(0):, :, W - width:W] = fresh[key][:, :, :width]
                layer[key] = buf
        self.pad = torch.cat([self.pad + W - self.cached, pad + W - width])
        self.rows, self.cached, self.tokens = self.rows + new, W, torch.cat([self.tokens, tokens])

    def step(self):
        """One token for every row: each feeds its last token, the cache grows by one column."""
        self.stats["most_rows"] = max(self.stats["most_rows"], len(self.rows))
        h = self.model.hidden_states(self.tokens, kv_cache=self.cache, pos=self.cached,
                                     pad=self.pad if self.pad.any() else None)  # (B, 1, C)
        self.cached += 1
        self.tokens = self.sample(self.rows, self.model.lm_head(h[:, -1, :]).float())

    def sample(self, rows, logits):
        """The next token of each row (logits (B, V) -> (B, 1)), each with its own settings and
        generator, and its text sent on."""
        tokens = torch.cat([sample_next(logits[b:b + 1], r.temperature, r.top_k or None, r.top_p, r.generator)
                            for b, r in enumerate(rows)])  # (B, 1)
        for r, t in zip(rows, tokens.tolist()):
            self.emit(r, t[0])
        return tokens

    def drop_finished(self):
        """Rows that ended, or whose client went away, leave the batch; columns that are padding
        in every row left are cut off the left."""
        keep = [b for b, r in enumerate(self.rows) if not r.done and not r.job.cancelled]
        self.stats["dropped"] += sum(not r.done for r in self.rows) - len(keep)  # those that did not end
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache = [], None
            return
        index = torch.tensor(keep, device=self.pad.device)
        self.rows, self.pad, self.tokens = [self.rows[b] for b in keep], self.pad[index], self.tokens[index]
        cut = int(self.pad.min())
        for layer in self.cache:
            for key in ("k", "v"):
                layer[key] = layer[key][index, :, cut:]
        self.pad, self.cached = self.pad - cut, self.cached - cut

    def emit(self, row, token):
        """Add a sampled token to its row, and send what of the text is final: a character still
        incomplete (a BPE token can end inside one) and the end of the text that may yet become a
        stop string wait for the next token."""
        finish = "stop" if token == self.eot else None
        if finish is None:
            row.out.append(token)
        text = self.decode(row.out)
        found = [i for i in (text.find(s) for s in row.stop) if i >= 0]
        if found:
            text, finish = text[:min(found)], "stop"
        elif finish is None and len(row.out) == row.max_tokens:
            finish = "length"
        end = len(text)
        if not finish:
            if text.endswith("\ufffd"):
                return
            end -= max((k for s in row.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        row.done = finish is not None
        if end > row.sent or finish:
            self.send(row, {"index": row.index, "text": text[row.sent:end], "finish": finish, "tokens": len(row.out)})
            row.sent = end

    def send(self, row, event):
        try:
            row.job.loop.call_soon_threadsafe(row.job.queue.put_nowait, event)
        except RuntimeError:  # the event loop has closed (the server is stopping)
            row.job.cancelled = True


# -----------------------------------------------------------------------------
# requests: OpenAI's fields read and checked, prompts built


class RequestError(Exception):
    """A request we refuse, sent as OpenAI's error JSON with this status."""

    def __init__(self, message, param=None, status=400, code=None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


def number(body, key, default, low, high, whole=False):
    """body[key], or default when absent or null; a number within [low, high] (a whole one if whole)."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) or not low <= value <= high:
        raise RequestError(f"{key} must be {'a whole number' if whole else 'a number'} from {low} to {high}, "
                           f"got {value!r}", key)
    return value


def text_of(content, where):
    """A message's content: a string, or OpenAI's list of parts, of which only text parts are read."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError(f"{where}.content must be a string or a list of text parts (this model reads text only)", where)


def chat_prompt(meta, messages):
    """The token ids the model reads before its answer to a conversation, in the model's
    template, read as sample.py --chat reads one: a chat template renders the whole conversation
    at once; Alpaca's renders each user turn as an instruction, its answer after it, ended by the
    end marker (a system message goes before the next instruction, as Alpaca has no place for it).
    The messages are text: a "</s>" or "<|endoftext|>" in them is not the end marker."""
    import prepare_alpaca
    from dataloader import encode_chat
    template = meta.get("template") or ("chat" if meta.get("chat_template") else "alpaca")
    if template == "chat":
        try:
            return with_bos(meta, encode_chat(meta, messages))
        except Exception as e:  # the template's own checks (roles out of order, ...)
            raise RequestError(f"the model's chat template refused these messages: {e}", "messages") from None
    encode = get_tokenizer(meta, specials=False)[0]
    ids, system, prompt = [], "", None
    for i, m in enumerate(messages):
        if m["role"] == "system":
            system += m["content"] + "\n\n"
        elif m["role"] == "user" and prompt is None:
            prompt = prepare_alpaca.instruction_prompt(meta, system + m["content"])
            ids, system = ids + encode(prompt), ""  # each prompt on its own, as every SFT example's prompt was
        elif m["role"] == "assistant" and prompt is not None:
            ids += encode_pair(encode, prompt, m["content"])[1] + [eot_of(meta)]  # an answer as it follows its prompt
            prompt = None
        else:
            raise RequestError(f"messages[{i}]: the turns must alternate user, assistant, user, ... (system "
                               "messages anywhere)", f"messages[{i}].role")
    if prompt is None:
        raise RequestError("the last message must be the user's (a system message may follow it)", "messages")
    return with_bos(meta, ids)


def completion_prompts(meta, encode, prompt, vocab):
    """The prompt(s) of /v1/completions as token-id lists: a string, a list of strings, a list of
    token ids, or a list of those lists."""
    if isinstance(prompt, str):
        return [with_bos(meta, encode(prompt))]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return [with_bos(meta, encode(p)) for p in prompt]
    lists = prompt if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt) else [prompt]
    for ids in lists:
        if not isinstance(ids, list) or not all(type(t) is int and 0 <= t < vocab for t in ids):  # (not bools)
            raise RequestError(f"prompt must be a string, a list of strings, or token ids from 0 to {vocab - 1} "
                               "(a list, or a list of lists)", "prompt")
    return lists


def read_request(body, chat, ctx):
    """Check a request's fields and build its rows' settings: (prompts, settings). Raises
    RequestError for anything a client must change."""
    if body.get("model") is not None and body["model"] != ctx["name"]:
        raise RequestError(f"the model {body['model']!r} does not exist here: this server has {ctx['name']!r} "
                           "(GET /v1/models)", "model", 404, "model_not_found")
    for key, neutral in (("logprobs", (None, False, 0)), ("top_logprobs", (None, 0)), ("echo", (None, False)),
                         ("suffix", (None, "")), ("presence_penalty", (None, 0)), ("frequency_penalty", (None, 0)),
                         ("logit_bias", (None, {})), ("tools", (None, [])), ("functions", (None, []))):
        if key in body and body[key] not in neutral:
            raise RequestError(f"{key} is not supported by this server", key)
    if body.get("best_of") not in (None, 1, body.get("n", 1)):
        raise RequestError("best_of is not supported by this server", "best_of")
    max_key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    s = dict(max_tokens=number(body, max_key, None, 1, ctx["block_size"], whole=True),
             temperature=number(body, "temperature", ctx["temperature"], 0, 2),
             top_p=number(body, "top_p", 1.0, 0, 1), top_k=number(body, "top_k", ctx["top_k"], 0, 10**9, whole=True),
             n=number(body, "n", 1, 1, 128, whole=True), seed=number(body, "seed", None, 0, 2**63 - 1, whole=True))
    if s["top_p"] == 0:  # the smallest set of tokens with probability 0: the likeliest alone
        s["temperature"], s["top_p"] = 0, 1.0
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(x, str) and x for x in stop)):
        raise RequestError("stop must be a string or a list of up to 4 non-empty strings", "stop")
    s["stop"] = stop
    for key in ("stream", "stream_options"):
        if body.get(key) is not None and not isinstance(body[key], (bool if key == "stream" else dict)):
            raise RequestError(f"{key} must be {'true or false' if key == 'stream' else 'an object'}", key)
    s["stream"], s["usage"] = bool(body.get("stream")), bool((body.get("stream_options") or {}).get("include_usage"))
    try:
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise RequestError("messages must be a non-empty list of {role, content} objects", "messages")
            if ctx["meta"]["tokenizer"] == "char":
                raise RequestError("this model is character-level: it has no chat template; use /v1/completions",
                                   "messages", code="chat_unsupported")
            clean = []
            for i, m in enumerate(messages):
                role = m.get("role") if isinstance(m, dict) else None
                if role not in ("system", "developer", "user", "assistant"):
                    raise RequestError(f"messages[{i}].role must be system, user or assistant, got {role!r}",
                                       f"messages[{i}].role")
                clean.append({"role": "system" if role == "developer" else role,
                              "content": text_of(m.get("content"), f"messages[{i}]")})
            prompts = [chat_prompt(ctx["meta"], clean)]
        else:
            if "prompt" not in body:
                raise RequestError("prompt is missing", "prompt")
            prompts = completion_prompts(ctx["meta"], ctx["encode"], body["prompt"], ctx["vocab"])
    except UserError as e:  # text the tokenizer cannot encode (a character-level model's missing characters)
        raise RequestError(str(e), "messages" if chat else "prompt") from None
    for ids in prompts:
        if not ids:
            raise RequestError("the prompt is empty", "prompt")
        room = ctx["block_size"] - len(ids)
        if room < 1 or (s["max_tokens"] or 0) > room:
            raise RequestError(f"this model's context is {ctx['block_size']} tokens, and {len(ids)} of them are "
                               f"the prompt" + (f", {s['max_tokens']} the completion" if room >= 1 else "")
                               + ": shorten the prompt" + (" or max_tokens" if room >= 1 else ""),
                               "messages" if chat else "prompt", code="context_length_exceeded")
    return prompts, s


def make_rows(job, prompts, s, device, default_max_tokens, block_size):
    """n rows per prompt; choice i of a seeded request samples from seed + i."""
    rows = []
    for p, ids in enumerate(prompts):
        for i in range(s["n"]):
            generator = torch.Generator(device=device)
            generator.manual_seed(s["seed"] + i) if s["seed"] is not None else generator.seed()
            rows.append(Row(job, p * s["n"] + i, ids, s["max_tokens"] or min(default_max_tokens, block_size - len(ids)),
                            s["temperature"], s["top_k"], s["top_p"], s["stop"], generator))
    return rows


# -----------------------------------------------------------------------------
# the HTTP side: Starlette routes on uvicorn


def error_json(message, status, param=None, code=None):
    from starlette.responses import JSONResponse
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def make_app(model, meta, name, cfg, autocast):
    """The Starlette app serving model; its Engine (app.state.engine) starts and stops with it."""
    try:
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
        from starlette.routing import Route
    except ImportError:
        raise UserError("serving needs starlette and uvicorn: pip install uvicorn starlette") from None
    import contextlib
    engine = Engine(model, meta, cfg["max_batch"], autocast)
    encode = get_tokenizer(meta)[0]
    vocab = tokenizer_size(meta)
    template = None if meta["tokenizer"] == "char" else meta.get("template") or (
        "chat" if meta.get("chat_template") else "alpaca")
    ctx = dict(name=name, meta=meta, encode=encode, vocab=vocab, block_size=model.config.block_size,
               temperature=cfg["temperature"], top_k=cfg["top_k"])
    device = model.lm_head.weight.device
    with open(PAGE, encoding="utf-8") as f:
        page = f.read()

    async def events(job, n_rows, request=None):
        """The job's events as the decoding thread sends them, until all its rows have ended. With
        request (an answer sent whole), it also stops when the client has gone. Either way the rows
        still running are then dropped."""
        try:
            while n_rows:
                try:
                    event = await asyncio.wait_for(job.queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if request is not None and await request.is_disconnected():
                        return
                    continue
                if "error" in event or event["finish"]:
                    n_rows -= 1
                yield event
        finally:
            if n_rows:  # a stream's client closed it (Starlette cancels the stream), or went away
                engine.stats["disconnected"] += 1
            job.cancelled = True

    async def create(request, chat):
        try:
            body = json.loads(await request.body())
        except ValueError as e:  # not JSON, or not UTF-8
            raise RequestError(f"the body is not valid JSON ({e}); send a JSON object") from None
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        prompts, s = read_request(body, chat, ctx)
        job = Job(asyncio.get_running_loop(), asyncio.Queue())
        rows = make_rows(job, prompts, s, device, cfg["max_tokens"], ctx["block_size"])
        engine.submit(rows)
        kind = ("chat.completion.chunk" if s["stream"] else "chat.completion") if chat else "text_completion"
        head = dict(id=("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12), created=int(time.time()), model=name,
                    object=kind)
        n_prompt = sum(map(len, prompts))  # each prompt counted once, whatever n is (as OpenAI counts)
        usage = lambda tokens: dict(prompt_tokens=n_prompt, completion_tokens=tokens, total_tokens=n_prompt + tokens)
        if s["stream"]:
            return StreamingResponse(stream(job, rows, head, chat, s, usage), media_type="text/event-stream")
        texts, finish, tokens = [""] * len(rows), [None] * len(rows), 0
        async for e in events(job, len(rows), request):
            if "error" in e:
                return error_json(f"generation failed: {e['error']}", 500)
            texts[e["index"]] += e["text"]
            if e["finish"]:
                finish[e["index"]], tokens = e["finish"], tokens + e["tokens"]
        if None in finish:  # the client has gone: no one reads this
            return JSONResponse({}, status_code=499)
        choices = [dict(index=i, message=dict(role="assistant", content=t), logprobs=None, finish_reason=f) if chat else
                   dict(index=i, text=t, logprobs=None, finish_reason=f) for i, (t, f) in enumerate(zip(texts, finish))]
        return JSONResponse(dict(head, choices=choices, usage=usage(tokens)))

    async def stream(job, rows, head, chat, s, usage):
        """Server-sent events, as OpenAI sends them: a chunk per piece of text (a chat's first
        chunk of each choice names the role), a last one per choice with its finish_reason, the
        usage if asked for, then [DONE]."""
        sse = lambda data: f"data: {json.dumps(data)}\n\n"
        piece = lambda i, text, finish: (dict(index=i, delta=text, logprobs=None, finish_reason=finish) if chat else
                                         dict(index=i, text=text, logprobs=None, finish_reason=finish))
        if chat:
            for i in range(len(rows)):
                yield sse(dict(head, choices=[piece(i, {"role": "assistant", "content": ""}, None)]))
        tokens = 0
        async for e in events(job, len(rows)):
            if "error" in e:
                yield sse({"error": {"message": f"generation failed: {e['error']}", "type": "server_error",
                                     "param": None, "code": None}})
                return
            if e["text"]:
                yield sse(dict(head, choices=[piece(e["index"], {"content": e["text"]} if chat else e["text"], None)]))
            if e["finish"]:
                tokens += e["tokens"]
                yield sse(dict(head, choices=[piece(e["index"], {} if chat else "", e["finish"])]))
        if s["usage"]:
            yield sse(dict(head, choices=[], usage=usage(tokens)))
        yield "data: [DONE]\n\n"

    async def models(request):
        # context_length and chat_template go beyond OpenAI's fields: the chat page reads them
        return JSONResponse({"object": "list", "data": [dict(id=name, object="model", created=int(time.time()),
                                                             owned_by="nanogpt", context_length=ctx["block_size"],
                                                             chat_template=template)]})

    async def completions(request):
        return await create(request, chat=False)

    async def chat_completions(request):
        return await create(request, chat=True)

    async def home(request):
        return HTMLResponse(page)

    async def refused(request, e):
        return error_json(str(e), e.status, e.param, e.code)

    async def http_error(request, e):  # Starlette's own: an unknown path (404), a wrong method (405)
        return error_json(f"{request.method} {request.url.path}: {e.detail}", e.status_code)

    async def crashed(request, e):  # a bug: the traceback goes to the server's log, the client gets one line
        return error_json(f"internal error ({type(e).__name__}); the server's log has the details", 500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        thread = threading.Thread(target=engine.run, name="decoding", daemon=True)
        thread.start()
        yield
        engine.inbox.put(None)
        thread.join(timeout=10)

    routes = [Route("/", home), Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={RequestError: refused, HTTPException: http_error, Exception: crashed})
    app.state.engine = engine
    return app


def serve_in_thread(app, host="127.0.0.1", port=0):
    """Run app under uvicorn in a background thread (bench.py and the tests do): returns its URL
    and a function that stops it. port=0 takes a free port."""
    import uvicorn
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]

    def stop():
        server.should_exit = True
        thread.join()
    return f"http://{host}:{port}", stop


def check_address(host, port):
    """Fail now, in one line, where uvicorn could not listen later (after the model has loaded)."""
    import socket
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            s.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}): is another server there? Choose "
                        "another --port (or --host)") from None


def load(cfg, device):
    """(model, meta, name) of the settings' out_dir or init_from, as sample.py loads them."""
    if cfg["init_from"]:
        model, meta = load_model(init_from=cfg["init_from"], device=device)
        return model, meta, cfg["init_from"].rstrip("/")
    out_dir = cfg["out_dir"]
    if not out_dir:
        path = newest_checkpoint()
        if path is None:
            raise UserError("no out*/ckpt.pt here: train a model first (see README), or give --out_dir or "
                            "--init_from=gpt2")
        out_dir = os.path.dirname(path)
    if (load_checkpoint(checkpoint_path(out_dir)).get("config") or {}).get("method") == "reward":
        raise UserError(f"{out_dir} is a reward model (align.py --method=reward): it scores answers, its lm_head "
                        "was never trained to write them; serve the policy (a DPO, PPO or SFT run) instead")
    model, meta = load_model(out_dir=out_dir, device=device)
    print(f"loaded {checkpoint_path(out_dir)}", file=sys.stderr)
    return model, meta, os.path.normpath(out_dir)


def main():
    cfg = configure(DEFAULTS)
    if cfg["init_from"] and cfg["out_dir"]:
        die(f"give --out_dir (a run of ours) or --init_from (OpenAI's weights, an HF folder), not both: "
            f"--out_dir={cfg['out_dir']} --init_from={cfg['init_from']}")
    if not 0 <= cfg["port"] <= 65535:
        die(f"--port must be from 0 to 65535, got {cfg['port']}")
    if cfg["max_batch"] < 1 or cfg["max_tokens"] < 1:
        die(f"--max_batch and --max_tokens must be at least 1, got {cfg['max_batch']} and {cfg['max_tokens']}")
    if cfg["temperature"] < 0 or cfg["top_k"] < 0:
        die(f"need temperature >= 0 and top_k >= 0 (0 = no limit); got {cfg['temperature']} and {cfg['top_k']}")
    if cfg["log_level"] not in ("critical", "error", "warning", "info", "debug", "trace"):
        die(f"--log_level must be critical, error, warning, info, debug or trace, got {cfg['log_level']!r}")
    try:
        import uvicorn
    except ImportError:
        die("serving needs uvicorn and starlette: pip install uvicorn starlette")
    device, device_type = resolve_device(cfg["device"])
    autocast = autocast_context(device_type, resolve_dtype(cfg["dtype"], device_type))
    print_config(cfg, file=sys.stderr)
    try:
        check_address(cfg["host"], cfg["port"])
        model, meta, name = load(cfg, device)
        app = make_app(model, meta, name, cfg, autocast)
    except UserError as e:
        die(str(e))
    tuned = meta.get("format") in ("sft", "preference") or meta.get("chat_template")
    if meta["tokenizer"] != "char" and not tuned:
        print("note: this model was not tuned on instructions: chat answers in Alpaca's template, which it never "
              "learnt (fine-tune it with prepare_alpaca.py first); completions are what it does", file=sys.stderr)
    host = f"[{cfg['host']}]" if ":" in cfg["host"] else cfg["host"]
    print(f"serving {name} at http://{host}:{cfg['port']}/ (the chat page; OpenAI's API under /v1)", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=cfg["host"], port=cfg["port"], log_level=cfg["log_level"])


if __name__ == "__main__":
    main()

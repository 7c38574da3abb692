"""
Token files, tokenizers and the batch loader.

Token file (the llm.c / modded-nanogpt format, so their FineWeb shards work as they are):

    header: 256 int32  = [MAGIC=20240520, VERSION=1, n_tokens, 0, 0, ...]   (1024 bytes)
    body:   n_tokens uint16 tokens                                           (2 * n_tokens bytes)

VERSION=2 is the same with uint32 tokens (4 * n_tokens bytes), for vocabularies of more than
65,536 ids (Llama 3's 128K); files whose ids fit in uint16 are always written as version 1,
so every file of a GPT-2 dataset stays readable by llm.c and modded-nanogpt.

A dataset is a folder data/<name>/ holding files whose names contain "train" or "val"
(train.bin, val.bin, or fineweb_train_000001.bin ...) and a meta.json that names the tokenizer:
{"tokenizer": "gpt2"} or {"tokenizer": "char", "chars": [...]} (a char's id is its index).

Two loaders, one interface: DataLoader cuts token streams into (B, T) blocks; SFTLoader
batches whole instruction examples. Both deal each DDP rank its own rows of every global
batch, give train.py a whole optimizer step at a time with next_step(), and save their
position in a few integers (state_dict), so a resumed run sees exactly the batches an
uninterrupted run would have seen.
"""

import contextlib
import filecmp
import functools
import glob
import hashlib
import json
import os
import shutil

import numpy as np
import torch

from configurator import UserError, atomic_write

MAGIC = 20240520
TOKEN_DTYPES = {1: np.uint16, 2: np.uint32}  # the header's version -> the dtype of the tokens
HEADER_INTS = 256  # the header is 256 int32 = 1024 bytes
EOT = 50256  # GPT-2's <|endoftext|>, which separates documents


# -----------------------------------------------------------------------------
# token files


def write_tokens(path, tokens):
    """Write `tokens` (any int sequence of ids >= 0) as a token file, atomically (an interrupted
    write never leaves half a file under the real name): version 1 (uint16) when every id fits,
    else version 2 (uint32)."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**32):
        raise UserError(f"{path}: token ids must be in 0..2**32-1")
    version = 1 if not tokens.size or tokens.max() < 2**16 else 2
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[0], header[1], header[2] = MAGIC, version, len(tokens)
    with atomic_write(path) as f:
        f.write(header.tobytes())
        f.write(tokens.astype(TOKEN_DTYPES[version]).tobytes())


def read_tokens(path):
    """Return the tokens of a token file as a read-only uint16 (version 1) or uint32 (version 2)
    memmap: nothing is loaded into memory until it is indexed. Checks the magic, the version and
    the length."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such token file")
    size = os.path.getsize(path)
    if size < HEADER_INTS * 4:
        raise UserError(f"{path}: too short for a token-file header ({size} bytes); re-run its prepare script")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != MAGIC:
        raise UserError(f"{path}: bad magic number {header[0]} (expected {MAGIC}); not a token file, or a corrupt one")
    if header[1] not in TOKEN_DTYPES:
        raise UserError(f"{path}: unsupported version {header[1]} (expected 1, uint16 tokens, or 2, uint32)")
    dtype = TOKEN_DTYPES[int(header[1])]
    n = int(header[2])
    expected = HEADER_INTS * 4 + np.dtype(dtype).itemsize * n
    if size != expected:
        raise UserError(f"{path}: header says {n:,} tokens ({expected:,} bytes) but the file has {size:,} bytes; "
                        "it is truncated or corrupt: re-run its prepare script")
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_INTS * 4, shape=(n,))


def check_ids(tokens, vocab_size, path):
    top = int(tokens.max()) if len(tokens) else 0
    if top >= vocab_size:
        raise UserError(f"{path} holds token id {top}, but the vocabulary has {vocab_size} ids (meta.json): the "
                        "token files and meta.json come from different runs; re-run the prepare script")


def write_meta(data_dir, meta):
    with atomic_write(os.path.join(data_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


def dataset_files(data_dir):
    """The files of a prepared dataset in data_dir: token files, SFT indexes, meta.json and
    prepare_fineweb.py's resume record (sorted names; none if the folder is not there)."""
    if not os.path.isdir(data_dir):
        return []
    return sorted(f for f in os.listdir(data_dir) if f.endswith((".bin", "_index.npy"))
                  or f in ("meta.json", "prepare_progress.json"))


def describe_folder(data_dir):
    """What a folder holds, for a refusal: its dataset's tokenizer and format, and its first files."""
    names = sorted(os.listdir(data_dir))
    what = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    try:
        meta = read_meta(data_dir)
        return f"a dataset of tokenizer {meta.get('tokenizer')}, {meta.get('format', 'a token stream')}: {what}"
    except UserError:
        return what


@contextlib.contextmanager
def staging(out_dir):
    """A folder beside out_dir to write a dataset into, before publish_dataset moves it in;
    removed whatever happens (a failed write's error names out_dir's file, as the user knows it)."""
    tmp = f"{out_dir.rstrip('/')}.tmp-{os.getpid()}"
    try:
        yield tmp
    except UserError as e:
        raise UserError(str(e).replace(tmp, out_dir.rstrip("/"))) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_dataset(tmp, out_dir, overwrite):
    """Move the dataset written into tmp (a sibling of out_dir) into out_dir; tmp is removed
    either way. A folder already holding files: the same dataset, byte for byte, is left as it
    is (a preparation run again); anything else is refused unless overwrite, which removes the
    old dataset's files first. Returns whether anything was written."""
    try:
        new = sorted(os.listdir(tmp))
        old = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
        if old == new and all(filecmp.cmp(os.path.join(tmp, f), os.path.join(out_dir, f), shallow=False) for f in new):
            print(f"{out_dir} already holds this dataset, byte for byte: nothing changed")
            return False
        if old and not overwrite:
            raise UserError(f"{out_dir} already holds {describe_folder(out_dir)}: choose another --out_dir, or replace "
                            "its dataset with --overwrite")
        for f in dataset_files(out_dir):
            os.remove(os.path.join(out_dir, f))
        os.makedirs(out_dir, exist_ok=True)
        for f in new:
            os.replace(os.path.join(tmp, f), os.path.join(out_dir, f))
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path) and glob.glob(os.path.join(data_dir, "*.bin")):
        # shards written by llm.c's or modded-nanogpt's scripts come without a meta.json; they
        # are always GPT-2 BPE
        print(f"note: {path} not found; taking the token files there as GPT-2 BPE")
        return {"tokenizer": "gpt2"}
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: prepare the dataset first (e.g. python prepare_shakespeare.py)")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({type(e).__name__}); re-run the dataset's prepare script") from None
    problem = None
    if not isinstance(meta, dict) or meta.get("tokenizer") not in ("gpt2", "char", "hf"):
        problem = 'it must be an object with "tokenizer": "gpt2", "char" or "hf"'
    elif meta["tokenizer"] == "hf" and not (isinstance(meta.get("path"), str) and isinstance(meta.get("vocab_size"), int)
                                            and isinstance(meta.get("eot"), int)):
        problem = 'a Hugging Face tokenizer needs "path", "vocab_size" and "eot"'
    elif meta["tokenizer"] == "char" and not (isinstance(meta.get("chars"), list) and meta["chars"]
                                              and all(isinstance(c, str) and len(c) == 1 for c in meta["chars"])):
        problem = 'a char tokenizer needs "chars": a list of single characters'
    if problem:
        raise UserError(f"{path}: {problem}; re-run the dataset's prepare script")
    return meta


def vocab_size_of(meta):
    """The embedding rows a new model needs for this tokenizer."""
    if meta["tokenizer"] == "char":
        return len(meta["chars"])
    if meta["tokenizer"] == "hf":  # padded to a multiple of 128 too (SmolLM2's 49152 already is)
        return -(-meta["vocab_size"] // 128) * 128
    return 50304  # GPT-2's 50257, padded to a multiple of 128 for fast matmuls


def list_shards(data_dir, split):
    """The token files of one split ("train" or "val"), sorted by name."""
    if not os.path.isdir(data_dir):
        raise UserError(f"dataset folder {data_dir} not found: prepare it first (e.g. python prepare_shakespeare.py)")
    files = sorted(f for f in glob.glob(os.path.join(data_dir, "*.bin")) if split in os.path.basename(f))
    if not files:
        raise UserError(f"no {split} token files (*{split}*.bin) in {data_dir}")
    return files


# -----------------------------------------------------------------------------
# tokenizers


def get_gpt2_encoding():
    """tiktoken's GPT-2 BPE. Its files are downloaded once and cached; offline, point
    TIKTOKEN_CACHE_DIR at a cache that holds them."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # no network and no cache: a wall of HTTP errors helps nobody
        raise UserError(f"cannot load the GPT-2 BPE files ({type(e).__name__}): be online once so tiktoken "
                        "caches them, or set TIKTOKEN_CACHE_DIR to a folder that holds them") from None


@functools.lru_cache(maxsize=4)
def get_hf_tokenizer(name_or_path):
    """transformers' fast tokenizer of a Hugging Face model: a local folder (tokenizer.json and
    tokenizer_config.json, as save_pretrained writes them) or a Hub name (fetched once, cached).
    The Llama family's models bring their own vocabularies, special tokens and chat templates."""
    local = os.path.isdir(name_or_path)
    if not local:
        from configurator import quiet_offline_hub
        quiet_offline_hub()
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UserError("a Hugging Face tokenizer needs transformers: pip install transformers") from None
    try:
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=local)
    except Exception as e:  # no tokenizer files, offline, a broken tokenizer.json
        first = (str(e).strip().splitlines() or [""])[0][:160]
        where = "a folder with tokenizer.json" if local else "offline? Be online once so transformers caches it, or give a local folder"
        raise UserError(f"cannot load the tokenizer of {name_or_path} ({type(e).__name__}: {first}); it needs {where}") from None


def hf_tokenizer_meta(name_or_path):
    """The meta (meta.json, a checkpoint's "meta") of a Hugging Face tokenizer: where it is,
    its size, its end-of-text id (eos: documents and answers end there), the ids it puts
    before every text (Llama's <s>; none for GPT-2-style BPE), whether it has a chat template,
    and a fingerprint of its vocabulary, so that two copies of one tokenizer match and two
    different ones do not (check_same_tokenizer)."""
    tok = get_hf_tokenizer(name_or_path)
    if tok.eos_token_id is None:
        raise UserError(f"the tokenizer of {name_or_path} has no eos token: it cannot end documents or answers")
    with_special, plain = tok("x")["input_ids"], tok("x", add_special_tokens=False)["input_ids"]
    bos = with_special[:len(with_special) - len(plain)] if with_special[-len(plain):] == plain else []
    vocab = json.dumps(sorted(tok.get_vocab().items()))
    return {"tokenizer": "hf", "path": os.path.abspath(name_or_path) if os.path.isdir(name_or_path) else name_or_path,
            "vocab_size": len(tok), "eot": tok.eos_token_id, "bos": bos, "chat_template": bool(tok.chat_template),
            "fingerprint": hashlib.sha256(vocab.encode()).hexdigest()[:16]}


def eot_of(meta):
    """The id that ends a document or an answer (sample.py stops there), or None (characters)."""
    return {"gpt2": EOT, "hf": meta.get("eot")}.get(meta.get("tokenizer"))


def encode_chat(meta, messages):
    """The token ids of a conversation ([{"role", "content"}, ...]) in a Hugging Face model's chat
    template, ready for the assistant's answer: rendered whole and encoded whole, the template's
    markers read as its special tokens, the messages' own text kept as text (a "</s>" typed in a
    turn is not the end marker). A marker found inside a message is encoded again as plain text."""
    tok = get_hf_tokenizer(meta["path"])
    render = lambda msgs: tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    text = render(messages)
    # where the template puts each message's text: rendered once more with a mark in its place
    marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
    parts = render([dict(m, content=k) for m, k in zip(messages, marks)]).split("\ue000")
    spans, rebuilt = [], parts[0]
    for part, m in zip(parts[1:], messages):
        spans.append((len(rebuilt), len(rebuilt) + len(m["content"])))
        rebuilt += m["content"] + part.split("\ue001", 1)[1]
    if rebuilt != text or len(parts) != len(messages) + 1:  # a template that rewrites a message (trims it...)
        spans = []  # its text cannot be told from the template's: read as it is
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    markers, ids = set(tok.added_tokens_decoder), []
    for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
        if t in markers and any(s <= a and b <= e for s, e in spans):
            ids += tok(text[a:b], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        else:
            ids.append(t)
    return ids


def with_bos(meta, ids):
    """ids of a text's start with the tokenizer's bos before them (Llama's <s>; GPT-2 has none),
    unless they begin with it already (a chat template writes it itself)."""
    bos = meta.get("bos") or []
    return ids if ids[:len(bos)] == bos else bos + ids


def encode_pair(encode, first, second):
    """The tokens of the text first + second, split where first ends: (first's tokens, the rest).
    That is how the model reads second in running text: encoding it on its own would not be for
    SentencePiece-family tokenizers (Llama 2, TinyLlama, Mistral), which put a '▁' before every
    text they are given: "the king" + " is dead" -> [▁the ▁k ing] + [▁ ▁is ...], an extra
    token the model never sees inside a text. GPT-2's BPE and byte-level BPEs agree either way.
    first keeps its own encoding (what a prompt is at sampling time): where a merge crosses the
    join, second gets the whole's tokens after that many (lm-evaluation-harness does the same)."""
    head = encode(first)
    return head, encode(first + second)[len(head):]


def get_tokenizer(meta, specials=True):
    """Return (encode, decode) for a dataset's meta.json: encode(str) -> list[int],
    decode(list[int]) -> str. encode adds no special tokens (a caller adds meta["bos"] where a
    text starts), but reads the eot marker's text as the marker; with specials=False (text a user
    typed) the text of every special token stays text: "</s>" is a few ordinary tokens."""
    kind = meta.get("tokenizer")
    if kind == "gpt2":
        enc = get_gpt2_encoding()
        allowed = {"<|endoftext|>"} if specials else set()
        encode = lambda s: enc.encode(s, allowed_special=allowed, disallowed_special=())
        return encode, enc.decode
    if kind == "hf":
        tok = get_hf_tokenizer(meta["path"])
        return (lambda s: tok(s, add_special_tokens=False, split_special_tokens=not specials)["input_ids"]), tok.decode
    if kind == "char":
        chars = meta["chars"]
        stoi = {c: i for i, c in enumerate(chars)}

        def encode(s):
            missing = sorted(set(c for c in s if c not in stoi))
            if missing:
                raise UserError(f"the text has characters this model's vocabulary lacks: {missing!r}")
            return [stoi[c] for c in s]

        return encode, lambda ids: "".join(chars[i] for i in ids)
    raise UserError(f"unknown tokenizer {kind!r} in meta.json (expected 'gpt2', 'char' or 'hf')")


# -----------------------------------------------------------------------------
# the batch loader


def to_device(batch, device):
    """A CPU batch on `device`. To a GPU through page-locked (pinned) memory, copied without
    blocking: the CPU goes on to the next micro-batch while the copy and the step run. The
    batch is one contiguous tensor (pinning a strided view would copy it once more)."""
    if str(device).startswith("cuda"):
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


class DataLoader:
    """Batches of (x, y), each (B, T) int64, from the token files of one split.

    shuffle=True (training): each epoch visits the shards in a new seeded order, and within a
    shard the sequences in a new seeded order from a new random offset, so no epoch repeats
    the last one's batches (fixed shard order gives a periodic pattern in the loss curve).
    shuffle=False (validation): the same sequences in the same order every time; reset()
    goes back to the start, so every evaluation sees the same batches.

    One optimizer step reads B * world_size * grad_accum consecutive sequences of the order:
    micro-step m of rank r takes rows [(m * world_size + r) * B, ... + B). Ranks never see the
    same data, and 2 ranks x 1 micro-step read exactly the rows that 1 rank x 2 micro-steps
    read: DDP and gradient accumulation see the same global batch.
    """

    def __init__(self, data_dir, split, batch_size, block_size, rank=0, world_size=1, seed=1337,
                 shuffle=True, grad_accum=1, vocab_size=None):
        self.files = list_shards(data_dir, split)
        self.vocab_size, self._checked = vocab_size, set()  # files whose ids were checked against it
        self.B, self.T = batch_size, block_size
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.seed, self.shuffle = seed, shuffle
        # a shard too small for one global batch is skipped; if all are, say so now
        self.lengths = [len(read_tokens(f)) for f in self.files]
        need = self.B * self.world_size * self.grad_accum * self.T + 1
        if max(self.lengths) < need:
            raise UserError(f"{data_dir}: the largest {split} file has {max(self.lengths):,} tokens, fewer than one "
                            f"step needs ({need:,} = batch_size*world_size*grad_accum*block_size+1); "
                            "use a smaller batch_size, block_size or total_batch_size")
        self.reset()

    def reset(self):
        self.epoch, self.shard_pos, self.seq_pos, self.micro = 0, 0, 0, 0
        self._order = None  # computed lazily for the current (epoch, shard)

    def state_dict(self):
        return {"epoch": self.epoch, "shard_pos": self.shard_pos, "seq_pos": self.seq_pos, "micro": self.micro}

    def load_state_dict(self, state):
        self.epoch, self.shard_pos, self.seq_pos, self.micro = (state[k] for k in ("epoch", "shard_pos", "seq_pos", "micro"))
        self._order = None

    def _shard_order(self):
        # which file is the shard_pos-th of this epoch
        if not self.shuffle:
            return list(range(len(self.files)))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.files)).tolist()

    def _load_shard(self):
        # the current shard's tokens, and the start of every sequence in visiting order
        self._file_idx = self._shard_order()[self.shard_pos]
        self._tokens = read_tokens(self.files[self._file_idx])
        if self.vocab_size and self._file_idx not in self._checked:  # once per file: an id past the
            check_ids(self._tokens, self.vocab_size, self.files[self._file_idx])  # vocabulary would crash the model
            self._checked.add(self._file_idx)
        n_tok = len(self._tokens)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, self._file_idx])
            # a new cut of the text each epoch; in a shard barely larger than one step, a smaller
            # offset, so that the step still fits (else that epoch would find no batch in it)
            step_rows = self.B * self.world_size * self.grad_accum
            offset = int(rng.integers(0, max(1, min(self.T, n_tok - step_rows * self.T))))
            n_seq = (n_tok - 1 - offset) // self.T
            self._order = offset + rng.permutation(n_seq) * self.T
        else:
            n_seq = (n_tok - 1) // self.T
            self._order = np.arange(n_seq) * self.T

    def _next_rows(self):
        """The next micro-batch of this rank as one (B, T + 1) int64 CPU tensor."""
        global_rows = self.B * self.world_size
        step_rows = global_rows * self.grad_accum  # a whole optimizer step comes from one shard
        while True:
            if self._order is None:
                self._load_shard()
            if self.micro > 0 or self.seq_pos + step_rows <= len(self._order):
                break
            # this shard is used up (or too small): go to the next one, or the next epoch
            self.seq_pos = 0
            self.shard_pos += 1
            if self.shard_pos == len(self.files):
                self.shard_pos = 0
                self.epoch += 1
            self._order = None
        first = self.seq_pos + self.rank * self.B
        starts = self._order[first:first + self.B]
        self.seq_pos += global_rows
        self.micro = (self.micro + 1) % self.grad_accum
        # fancy-index the memmap: only these B rows are read from disk
        rows = np.stack([self._tokens[s:s + self.T + 1] for s in starts]).astype(np.int64)
        return torch.from_numpy(rows)  # (B, T + 1): x is its first T columns, y its last T

    def next_batch(self):
        """Return (x, y): (B, T) int64 CPU tensors, y being x shifted left by one token."""
        buf = self._next_rows()
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()  # (as next_step's: see there)

    def next_step(self, device="cpu"):
        """This rank's grad_accum micro-batches of the next optimizer step, each (x, y, weight)
        on `device`, and the step's real tokens (all ranks). weight is the micro-batch's share of
        the step's loss targets, times world_size (DDP averages the ranks' gradients): here every
        token is a target, so it is 1 / grad_accum."""
        batches = []
        for _ in range(self.grad_accum):
            buf = to_device(self._next_rows(), device)  # one copy of (B, T + 1) to the device
            # x and y contiguous, not views of buf with its stride T + 1: an evaluation's batches
            # reach a GPU contiguous (a strided view is copied dense), and torch.compile would
            # recompile the training graph for a symbolic stride after the first evaluation
            batches.append((buf[:, :-1].contiguous(), buf[:, 1:].contiguous(), 1 / self.grad_accum))
        return batches, self.B * self.T * self.world_size * self.grad_accum


# -----------------------------------------------------------------------------
# instruction (SFT) datasets
#
# The same token files, the examples back to back: prompt, response, <|endoftext|>. Beside
# each split's token file, SPLIT_index.npy holds one row per example, (start, prompt_len,
# length): where the example begins in SPLIT.bin, how many of its tokens are prompt, and how
# many it has in all (the rest, after the prompt, is the response with its <|endoftext|>).
# meta.json adds "format": "sft" and the template's name. prepare_alpaca.py writes them.


def write_sft(data_dir, split, examples):
    """Write one split of an instruction dataset: SPLIT.bin and SPLIT_index.npy.
    examples: a list of (prompt_ids, response_ids), each response ending with <|endoftext|>."""
    prompt_lens = np.array([len(p) for p, _ in examples], dtype=np.int64)
    lengths = np.array([len(p) + len(r) for p, r in examples], dtype=np.int64)
    if (prompt_lens < 1).any() or (lengths <= prompt_lens).any():
        raise UserError(f"{split}: every example needs a prompt and a response of at least one token")
    starts = np.cumsum(lengths) - lengths  # each example begins where the one before ended
    index = np.stack([starts, prompt_lens, lengths], axis=1)  # (n, 3)
    write_tokens(os.path.join(data_dir, f"{split}.bin"), [t for p, r in examples for t in (*p, *r)])
    with atomic_write(os.path.join(data_dir, f"{split}_index.npy")) as f:
        np.save(f, index, allow_pickle=False)


def read_sft(data_dir, split):
    """Return (tokens, index) of one split: the uint16 memmap of SPLIT.bin and the (n, 3) int64
    array of (start, prompt_len, length), checked against each other."""
    path = os.path.join(data_dir, f"{split}_index.npy")
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: an instruction dataset needs it; re-run prepare_alpaca.py")
    tokens = read_tokens(os.path.join(data_dir, f"{split}.bin"))
    try:
        index = np.load(path, allow_pickle=False)  # plain numbers only: loading runs no code
    except ValueError as e:
        raise UserError(f"{path} could not be read ({e}); re-run prepare_alpaca.py") from None
    if index.ndim != 2 or index.shape[1] != 3 or index.shape[0] == 0 or index.dtype.kind not in "iu":
        raise UserError(f"{path}: expected a non-empty (n, 3) integer array, got {index.shape} {index.dtype}")
    index = index.astype(np.int64)
    start, prompt_len, length = index.T
    bad = (start < 0) | (prompt_len < 1) | (length <= prompt_len) | (start + length > len(tokens))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise UserError(f"{path}: example {i} {tuple(index[i])} does not fit {split}.bin ({len(tokens):,} tokens); "
                        "the two files come from different runs: re-run prepare_alpaca.py")
    return tokens, index


PAD_MULTIPLE = 64  # SFT micro-batches are padded to a multiple of this many tokens


class SFTLoader:
    """Batches of whole instruction examples: (x, y), each (B, L) int64, L = the longest
    example of the batch minus one, rounded up to a multiple of 64 and at most block_size
    ("dynamic padding", in a few buckets).

    Row i is one example: x its tokens but the last, y its tokens but the first (the next
    token at every position), both padded on the right up to L. y is -1 on the prompt and on
    the padding, so the loss falls on the response and its <|endoftext|> only. Padding cannot
    change the real tokens' outputs: attention is causal, so no token sees the padding after
    it, and each row holds one example, so no example attends to another. Examples are never
    cut; an example longer than block_size + 1 tokens is an error here (prepare_alpaca.py
    drops them with --max_len).

    The order of the examples is a seeded permutation, a new one each epoch (shuffle=False:
    file order, for validation). An optimizer step takes the next B * world_size * grad_accum
    examples of the order, dealt the way DataLoader deals rows: micro-step m of rank r gets
    examples [(m * world_size + r) * B, ... + B), so 2 ranks x 1 micro-step see exactly what
    1 rank x 2 micro-steps see. The last examples of an epoch too few for a whole step are
    skipped in that epoch (others, after the reshuffle, in the next).

    group_by_length=True: every micro-batch is padded to its longest example, so a batch of one
    long and seven short examples is mostly padding. Grouping draws the same random examples,
    then, in windows of 50 optimizer steps, sorts them by length, cuts the window into steps
    and shuffles the steps' order: each step holds examples of similar length, and the long
    steps are not all at the start. Every step is still B * world_size * grad_accum examples
    dealt as above (DDP = accumulation holds).

    `epoch` is the number of the pass in progress, from 0. The whole position is three integers
    and the grouping flag (state_dict), so a resumed run sees exactly the batches an
    uninterrupted one would, and keeps the grouping it began with.

    pairs=True (preference data, prepare_preferences.py): examples 2i and 2i+1 are one prompt
    with its chosen and its rejected answer, and everything above counts pairs: the order
    shuffles pairs, batch_size is pairs, and a micro-batch is (2B, L): the B chosen rows, then
    the B rejected rows of the same pairs, in the same order.
    """

    def __init__(self, data_dir, split, batch_size, block_size, rank=0, world_size=1, seed=1337,
                 shuffle=True, grad_accum=1, group_by_length=False, vocab_size=None, pairs=False):
        self.tokens, self.index = read_sft(data_dir, split)
        self.pairs = pairs
        if pairs and (len(self.index) % 2 or (self.index[0::2, 1] != self.index[1::2, 1]).any()):
            raise UserError(f"{data_dir}/{split}_index.npy is not a list of pairs (chosen, rejected) of one prompt each; "
                            "re-run prepare_preferences.py")
        if pairs:  # a pair whose answers are the same tokens prefers nothing: DPO would sit at log 2 on it
            same = [i // 2 for i in range(0, len(self.index), 2)
                    if np.array_equal(self.tokens[self.index[i, 0]:self.index[i, 0] + self.index[i, 2]],
                                      self.tokens[self.index[i + 1, 0]:self.index[i + 1, 0] + self.index[i + 1, 2]])]
            if same:
                raise UserError(f"{data_dir}/{split}: {len(same)} pair(s) have the same chosen and rejected answer "
                                f"(the first: pair {same[0]}); prepare_preferences.py refuses such pairs: re-run it")
        self.n_units = len(self.index) // 2 if pairs else len(self.index)  # what batch_size counts
        if vocab_size:
            check_ids(self.tokens, vocab_size, os.path.join(data_dir, f"{split}.bin"))
        self.group_by_length = group_by_length and shuffle
        self.B, self.T = batch_size, block_size
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.seed, self.shuffle = seed, shuffle
        too_long = int((self.index[:, 2] - 1 > block_size).sum())
        if too_long:
            raise UserError(f"{data_dir}: {too_long} {split} examples are longer than block_size+1 = {block_size + 1} "
                            f"tokens (the longest has {self.index[:, 2].max()}); re-run prepare_alpaca.py with "
                            f"--max_len={block_size}, or raise block_size")
        need = self.B * self.world_size * self.grad_accum
        if self.n_units < need:
            what = f"one step needs ({need} = batch_size {self.B} x {self.world_size} ranks x {self.grad_accum} " \
                   "accumulation steps); use a smaller batch_size or total_batch_size" if shuffle else \
                   f"one batch needs ({need} = batch_size {self.B} x {self.world_size} ranks); use a smaller batch_size"
            raise UserError(f"{data_dir}: {self.n_units} {split} {'pairs' if pairs else 'examples'}, fewer than {what}")
        self.reset()

    def reset(self):
        self.epoch, self.pos, self.micro = 0, 0, 0
        self._order = None  # the permutation of the current epoch, computed when first needed

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos, "micro": self.micro, "group_by_length": self.group_by_length}

    def load_state_dict(self, state):
        self.epoch, self.pos, self.micro = state["epoch"], state["pos"], state["micro"]
        self.group_by_length = state["group_by_length"]  # the order is part of the position
        self._order = None

    def next_batch(self):
        """Return (x, y): this rank's next micro-batch, (B, L) int64 CPU tensors, L <= block_size."""
        step_rows = self.B * self.world_size * self.grad_accum
        if self.micro == 0 and self.pos + step_rows > self.n_units:
            self.epoch, self.pos, self._order = self.epoch + 1, 0, None  # the next epoch
        if self._order is None:
            self._order = self._epoch_order(step_rows)
        first = self.pos + self.rank * self.B
        rows = self.index[self._rows(self._order[first:first + self.B])]  # (B or 2B, 3): start, prompt_len, length
        self.pos += self.B * self.world_size
        self.micro = (self.micro + 1) % self.grad_accum
        # padded to the longest example, rounded up to a multiple of 64 (at most block_size): a
        # handful of shapes, so torch.compile and cuBLAS see the same few, not one per length
        L = min(self.T, -(-(int(rows[:, 2].max()) - 1) // PAD_MULTIPLE) * PAD_MULTIPLE)
        x = torch.zeros(len(rows), L, dtype=torch.long)  # padding: token 0, seen by nothing, never a target
        y = torch.full((len(rows), L), -1, dtype=torch.long)
        for i, (start, p, n) in enumerate(rows.tolist()):
            tok = torch.from_numpy(self.tokens[start:start + n].astype(np.int64))  # (n,)
            x[i, :n - 1] = tok[:-1]
            y[i, p - 1:n - 1] = tok[p:]  # position j predicts token j+1: the first target is the response's first token
        return x, y

    def _rows(self, units):
        """Rows of self.index for examples (or pairs: all chosen rows, then all rejected rows)."""
        return np.concatenate([2 * units, 2 * units + 1]) if self.pairs else units

    def _epoch_order(self, step_rows):
        """The order in which this epoch visits the examples or pairs (indices of them)."""
        n = self.n_units
        lengths = np.maximum(self.index[0::2, 2], self.index[1::2, 2]) if self.pairs else self.index[:, 2]
        if not self.shuffle:
            return np.arange(n)
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n)
        if not self.group_by_length:
            return order
        # the examples that fill whole steps are grouped; the rest, a random few, stay at the
        # end, where the epoch skips them
        whole = n - n % step_rows
        window = 50 * step_rows
        grouped = []
        for w in range(0, whole, window):
            chunk = order[w:min(w + window, whole)]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]  # by length
            steps = chunk.reshape(-1, step_rows)  # (steps in the window, step_rows)
            grouped.append(steps[rng.permutation(len(steps))].reshape(-1))
        return np.concatenate(grouped + [order[whole:]])

    def next_step(self, device="cpu"):
        """This rank's grad_accum micro-batches of the next optimizer step, each (x, y, weight)
        on `device`, and the step's real tokens (all ranks, padding not counted). weight is the
        micro-batch's share of the step's loss targets (its response tokens over the whole
        step's), times world_size (DDP averages the ranks' gradients): the weighted sum of the
        micro-batch losses over micro-steps and ranks is the mean over every target of the step.
        Every rank knows the whole step's examples from the index, so no rank asks the others."""
        assert self.micro == 0, "next_step() must start at a step boundary"
        micro = [self.next_batch() for _ in range(self.grad_accum)]
        step_rows = self.B * self.world_size * self.grad_accum
        rows = self.index[self._rows(self._order[self.pos - step_rows:self.pos])]  # the step's examples, every rank's
        n_targets = int((rows[:, 2] - rows[:, 1]).sum())  # response tokens (with <|endoftext|>)
        n_tokens = int((rows[:, 2] - 1).sum())  # input tokens, padding not counted
        batches = []
        for x, y in micro:
            xy = to_device(torch.stack([x, y]), device)  # one copy of (2, B, L)
            # pairs: a loss is a mean over pairs, and every micro-batch holds B of the step's pairs
            weight = self.B * self.world_size / step_rows if self.pairs else int((y != -1).sum()) * self.world_size / n_targets
            batches.append((xy[0], xy[1], weight))
        return batches, n_tokens

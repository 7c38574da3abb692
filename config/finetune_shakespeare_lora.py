# GPT-2 small (124M) adapted to Shakespeare with LoRA: only low-rank adapters on the query and
# value projections are trained (0.29M parameters, 0.24%), the pretrained weights stay frozen.
# python prepare_shakespeare.py --tokenizer=gpt2 && python train.py config/finetune_shakespeare_lora.py
# ckpt.pt then holds the adapters (~1 MB) and the name of the base ("gpt2"), not the base itself;
# sample.py --out_dir=out-shakespeare-lora applies them to GPT-2 again. Compare with
# config/finetune_shakespeare.py, the full fine-tune of all 124M weights.
out_dir = "out-shakespeare-lora"
dataset = "shakespeare"  # data/shakespeare: GPT-2 BPE, ~304k train and ~34k val tokens
init_from = "gpt2"  # OpenAI's weights (transformers downloads them once)

lora_rank = 8  # r: the rank of each update B A; 4-16 are all common, 8 is plenty for one style
lora_alpha = 16.0  # updates are scaled by alpha / r = 2; keep alpha when trying another r
lora_dropout = 0.1  # dropout on the adapters' input only (the LoRA paper's GPT-2 setting)
lora_targets = "q,v"  # queries and values, as in the LoRA paper; add k, attn_proj, mlp_* for harder shifts
dropout = 0.0  # the frozen base runs exactly as pretrained

block_size = 256  # GPT-2's 1024 positions cropped to 256: 4x cheaper, and speeches are short
batch_size = 16  # sequences per micro-batch
total_batch_size = 4096  # tokens per optimizer step (16 x 256): one micro-batch on one GPU
max_iters = 200  # 200 x 4096 = 0.8M tokens, about 2.7 passes over the training text

# Adam moves each adapter entry by about the learning rate per step, and B A starts at zero,
# so LoRA wants a far larger rate than a full fine-tune (the paper used 2e-4 with alpha/r = 8
# for GPT-2; alpha/r = 2 here asks for about 4x that).
learning_rate = 1e-3
min_lr = 1e-4  # cosine decay to learning_rate / 10 at max_iters
warmup_iters = 20
weight_decay = 0.01  # on A and B: pulls the update towards zero, i.e. towards GPT-2 itself

eval_interval = 25  # validate often: the whole run is 200 steps
eval_iters = 8  # 8 x 16 x 256 = 33k tokens: about the whole validation text
log_interval = 5
checkpoint_interval = 50  # an adapter checkpoint is ~1 MB + optimizer: cheap to write often

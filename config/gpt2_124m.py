# GPT-2 small (124M) on 10B tokens of FineWeb-edu: one epoch, 19,073 steps of 2^19 tokens.
# python prepare_fineweb.py     then, on an 8-GPU node:
# torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py
# Fewer GPUs work unchanged: gradient accumulation makes up the same 524,288 tokens a step.
out_dir = "out-gpt2-124m"
dataset = "fineweb_edu10B"  # data/fineweb_edu10B from prepare_fineweb.py

n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
rope = False  # True: rotary positions instead of learned ones (a little better at this size)

total_batch_size = 524288  # 2^19 tokens per step, about GPT-3 small's 0.5M
batch_size = 64  # micro-batch per GPU; lower it (32, 16) if memory runs out: accumulation grows
max_iters = 19073  # 10e9 tokens / 524,288 tokens per step
learning_rate = 6e-4  # GPT-3 small's peak
min_lr = 6e-5  # learning_rate / 10
warmup_iters = 715  # 375M tokens of warmup, as GPT-3 did
weight_decay = 0.1
grad_clip = 1.0

eval_interval = 250
eval_iters = 20  # 20 x 64 x 1024 tokens x ranks of validation
hellaswag_interval = 250
checkpoint_interval = 250  # ckpt.pt is overwritten: resume loses at most 250 steps
keep_interval = 5000  # and a copy is kept every 5000 steps
log_interval = 10  # each log line syncs host and GPU (and all-reduces the loss): not every step
compile = True

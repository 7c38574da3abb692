# A 1.3B GPT (GPT-3 XL's shape: 24 layers, width 2048, head size 128) on 10B tokens of
# FineWeb-edu: one epoch at twice the 124M's batch, 9,536 steps of 2^20 tokens.
# python prepare_fineweb.py     then, on an 8-GPU node:
# torchrun --standalone --nproc_per_node=8 train.py config/gpt2_1.3b.py
# Fewer GPUs work unchanged: gradient accumulation makes up the same 1,048,576 tokens a step.
# Hyperparameters: llm.c's scripts/run_gpt2_1558M.sh, its nearest published size (lr 6e-4 with
# 2^20-token steps, decay to 10% of the peak, 700 warmup steps, weight decay 0.1). The GPT-3
# paper used lr 2e-4 for this exact shape: fall back to it if the loss spikes.
# Target (the seed projects): val loss 2.87, HellaSwag 0.3414.
out_dir = "out-gpt2-1.3b"
dataset = "fineweb_edu10B"  # data/fineweb_edu10B from prepare_fineweb.py

n_layer = 24
n_head = 16
n_embd = 2048  # head size 128
block_size = 1024
rope = False  # True: rotary positions instead of learned ones (a little better at 124M: HellaSwag 0.3083 vs 0.3036)

total_batch_size = 1048576  # 2^20 tokens per step: GPT-3 XL's 1M, and llm.c's 1558M run
batch_size = 8  # micro-batch per GPU (llm.c ran 16 on an 80 GB H100 in C); raise it if memory allows
max_iters = 9536  # 10e9 tokens / 1,048,576 tokens per step
learning_rate = 6e-4  # llm.c's 1558M peak (GPT-3 XL: 2e-4)
min_lr = 6e-5  # learning_rate / 10
warmup_iters = 700  # llm.c's 1558M warmup (734M tokens)
weight_decay = 0.1
grad_clip = 1.0

eval_interval = 250
eval_iters = 160  # 160 x 8 x 1024 tokens x ranks: as many validation tokens as the 124M recipe
hellaswag_interval = 250
checkpoint_interval = 250  # ckpt.pt (~16 GB with the optimizer) is overwritten: resume loses <= 250 steps
keep_interval = 0  # no extra copies: each would take another ~16 GB of disk
log_interval = 10  # each log line syncs host and GPU (and all-reduces the loss): not every step
compile = True

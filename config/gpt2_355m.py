# GPT-2 medium (355M) on 10B tokens of FineWeb-edu: one epoch, 19,073 steps of 2^19 tokens.
# python prepare_fineweb.py     then, on an 8-GPU node:
# torchrun --standalone --nproc_per_node=8 train.py config/gpt2_355m.py
# Fewer GPUs work unchanged: gradient accumulation makes up the same 524,288 tokens a step.
# Hyperparameters: llm.c's scripts/run_gpt2_350M.sh (lr 3e-4, 2^19-token steps, weight decay
# 0.1, ~700 warmup steps), which are GPT-3 Medium's; the 10B-token length, min_lr = lr/10 and
# the 375M-token warmup are build-nanogpt's 124M recipe carried over. (llm.c trained this size
# for 30B tokens; here it gets the same 10B tokens as the 124M, so the two compare directly.)
# Target (the seed projects): val loss 2.88, HellaSwag 0.3266.
out_dir = "out-gpt2-355m"
dataset = "fineweb_edu10B"  # data/fineweb_edu10B from prepare_fineweb.py

n_layer = 24
n_head = 16
n_embd = 1024  # head size 64, as in all GPT-2 sizes
block_size = 1024
rope = False  # True: rotary positions instead of learned ones (a little better at 124M: HellaSwag 0.3083 vs 0.3036)

total_batch_size = 524288  # 2^19 tokens per step, GPT-3 Medium's 0.5M
batch_size = 32  # micro-batch per GPU (llm.c fits 64 on an 80 GB GPU in C); lower it if memory runs out
max_iters = 19073  # 10e9 tokens / 524,288 tokens per step
learning_rate = 3e-4  # llm.c's 350M peak, GPT-3 Medium's: half the 124M's, as wider models need
min_lr = 3e-5  # learning_rate / 10
warmup_iters = 715  # 375M tokens of warmup, as GPT-3 did (llm.c: 700 steps)
weight_decay = 0.1
grad_clip = 1.0

eval_interval = 250
eval_iters = 40  # 40 x 32 x 1024 tokens x ranks: as many validation tokens as the 124M recipe
hellaswag_interval = 250
checkpoint_interval = 1000  # ckpt.pt (~4 GB with the optimizer) is overwritten: resume loses <= 1000 steps
keep_interval = 5000  # and a copy is kept every 5000 steps
log_interval = 10  # each log line syncs host and GPU (and all-reduces the loss): not every step
compile = True

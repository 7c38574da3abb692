# GPT-2 small (124M shape) on FineWeb-edu with Muon, RoPE and the from-scratch options.
# torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m_modern.py
# The step count is an ESTIMATE, not a measurement: modded-nanogpt's logs reach val 3.28 in
# 3.25B tokens with Muon, 2.67B adding ReLU^2, QK-norm and zero-init projections, 2.40B with an
# untied head (KellerJordan/modded-nanogpt records 2024-10-10, 2024-10-14, 2024-11-03), where
# AdamW (llm.c) needs 10B. Those records also changed other things and used FineWeb, not -edu:
# check the val curve against gpt2_124m.py's before trusting the estimate.
out_dir = "out-gpt2-124m-modern"
dataset = "fineweb_edu10B"  # data/fineweb_edu10B from prepare_fineweb.py, the same data as gpt2_124m.py

n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
rope = True  # rotary positions (the speedrun's baseline has them)
qk_norm = True  # RMS-normalised queries and keys per head
mlp = "relu2"  # ReLU squared instead of GELU
zero_init_proj = True  # every block starts as the identity
tie_embeddings = False  # a separate lm_head (38.6M more parameters, no more compute per token)

total_batch_size = 524288  # 2^19 tokens per step, as gpt2_124m.py and the speedrun
batch_size = 64  # micro-batch per GPU; lower it (32, 16) if memory runs out: accumulation grows
max_iters = 5100  # ~2.67B tokens: the estimate above, between the 2.40B and 3.25B records
optimizer = "muon"  # Muon for the blocks' matrices, AdamW for embeddings, lm_head, gains, biases
muon_lr = 0.02  # Muon's peak: the best on the laptop model (docs/modern.md), not tuned at this size
muon_momentum = 0.95
muon_weight_decay = 0.0  # the records above used none
learning_rate = 6e-4  # AdamW's peak, for embeddings, lm_head, gains and biases
min_lr = 6e-5  # learning_rate / 10; Muon's floor is muon_lr / 10 (the schedule scales both)
warmup_iters = 200  # Muon needs little warmup; AdamW's Adam moments want a few hundred steps
weight_decay = 0.1  # AdamW's, on embeddings and lm_head
grad_clip = 1.0

eval_interval = 250
eval_iters = 20  # 20 x 64 x 1024 tokens x ranks of validation
hellaswag_interval = 250
checkpoint_interval = 250  # ckpt.pt is overwritten: resume loses at most 250 steps
keep_interval = 2500  # and a copy is kept every 2500 steps
log_interval = 10  # each log line syncs host and GPU (and all-reduces the loss): not every step
compile = True

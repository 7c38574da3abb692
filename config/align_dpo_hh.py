# DPO on Anthropic's HH-RLHF after instruction tuning: GPT-2 124M fine-tuned on Alpaca
# (config/finetune_alpaca.py) learns which of two answers people preferred.
# python prepare_preferences.py && python align.py config/align_dpo_hh.py
# then: python sample.py --out_dir=out-dpo-hh --chat
method = "dpo"
out_dir = "out-dpo-hh"
init_from = "out-alpaca"  # the SFT run: DPO's reference is this model, frozen
dataset = "hh_rlhf"  # data/hh_rlhf from prepare_preferences.py (its default)
beta = 0.1  # the DPO paper's value: larger keeps the policy nearer the reference
block_size = 512  # prepare_preferences.py's default --max_len
batch_size = 8  # pairs per micro-batch: 16 sequences of up to 512 tokens
total_batch_size = 64  # pairs per optimizer step (the DPO paper used 64)
max_iters = 2500  # ~1 epoch of HH-RLHF's ~160K pairs at 64 per step
learning_rate = 1e-6  # the DPO paper's rate, after a 150-step warmup, held constant
warmup_iters = 150
eval_interval = 250
eval_iters = 40
log_interval = 10
checkpoint_interval = 500
